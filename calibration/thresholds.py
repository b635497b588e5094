"""Fit the token router: a logistic score over normalised signals, and per-layer thresholds.

Target: in each decoder layer, the tokens whose layer output error on the base tier is in the
top ``share`` (they gain most from the residual plane). The router may only use signals the
runtime can compute before the layer runs (``RUNTIME_SIGNALS``); the others are measured and
reported so their predictive power is on record. Fit quality is measured on calibration
windows held out from the fit, never on evaluation text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.stats import rankdata

from tap_runtime.format import ALL_SIGNALS, PER_LAYER_SIGNALS, ROUTER_TARGETS, RUNTIME_SIGNALS, RouterSpec

from .capture import TokenSignals
from .probe import holdout_windows

__all__ = ["tier_shares", "signal_matrix", "roc_auc", "fit_router"]

_L2 = 1e-3
_EXCLUDED_REASONS = {
    "attention_received": "needs attention from later tokens, which do not exist when a token is routed",
    "predictive_entropy": "needs the previous position's logits, which prefill has not computed yet",
    "loss_gradient": "needs the next token and a backward pass; inference has neither",
}


def tier_shares(tiers: tuple[int, ...], share: float) -> dict[str, float]:
    """Share of tokens at or above each tier above the base: ``share``, then a quarter of it."""
    return {str(tier): share / 4**k for k, tier in enumerate(tiers[1:])}


@dataclass
class _Normalised:
    features: dict[str, np.ndarray]  # signal -> (num_layers, num_windows, seq_len) z-scores
    normalisation: dict[str, dict]


def _z(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    finite = values[np.isfinite(values)]
    mean = float(finite.mean()) if finite.size else 0.0
    std = float(finite.std()) if finite.size else 1.0
    std = std if std > 1e-8 else 1.0
    z = (values - mean) / std
    return np.where(np.isfinite(z), z, 0.0), mean, std


def signal_matrix(signals: TokenSignals, token_log_frequency: torch.Tensor) -> _Normalised:
    """Every signal as per-(layer, window, position) z-scores, with the statistics used."""
    num_layers = signals.hidden_norm.shape[0]
    features: dict[str, np.ndarray] = {}
    normalisation: dict[str, dict] = {}
    per_layer = {
        "hidden_norm": (signals.hidden_norm, "log_rms"),
        "attention_received": (signals.attention_received, "mean_attention_from_later_queries"),
        "error_estimate": (signals.error_estimate, "log_sketched_base_error"),
        "sensitivity": (signals.sensitivity, "normed_input_dot_probe"),
        "loss_gradient": (signals.loss_gradient, "log_norm_of_loss_gradient_at_layer_output"),
    }
    for name in PER_LAYER_SIGNALS:
        values, transform = per_layer[name]
        if values is None:
            continue
        values = values.numpy().astype(np.float64)
        # nan-aware: positions without a value (the loss gradient's last position) score 0.
        means = np.nanmean(values.reshape(num_layers, -1), axis=1)
        stds = np.nanstd(values.reshape(num_layers, -1), axis=1)
        stds = np.where(stds > 1e-8, stds, 1.0)
        z = (values - means[:, None, None]) / stds[:, None, None]
        features[name] = np.where(np.isfinite(z), z, 0.0)
        normalisation[name] = {
            "transform": transform,
            "layer_mean": [float(m) for m in means],
            "layer_std": [float(s) for s in stds],
        }
    hidden = features["hidden_norm"]
    per_token = {
        "position": (signals.position.numpy().astype(np.float64), "log1p"),
        "token_frequency": (
            token_log_frequency[signals.token_ids].numpy().astype(np.float64),
            "log_unigram_probability",
        ),
        "predictive_entropy": (signals.predictive_entropy.numpy().astype(np.float64), "nats_previous_position"),
    }
    for name, (values, transform) in per_token.items():
        z, mean, std = _z(values)
        features[name] = np.broadcast_to(z, hidden.shape)
        normalisation[name] = {"transform": transform, "mean": mean, "std": std}
    return _Normalised(features, normalisation)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U); 0.5 is chance."""
    labels = labels.astype(bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _top_share_labels(errors: np.ndarray, share: float) -> np.ndarray:
    """(layers, windows, seq) -> bool, True for each layer's top ``share`` errors."""
    flat = errors.reshape(errors.shape[0], -1)
    cut = np.quantile(flat, 1.0 - share, axis=1)
    return errors >= cut[:, None, None]


def _fit_logistic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression; returns (weights, bias)."""
    y = y.astype(np.float64)

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = params[:-1], params[-1]
        logits = x @ w + b
        # log(1 + e^z) - y z, computed stably
        value = np.mean(np.logaddexp(0.0, logits) - y * logits) + _L2 * float(w @ w)
        p = 1.0 / (1.0 + np.exp(-logits))
        grad_w = x.T @ (p - y) / len(y) + 2 * _L2 * w
        grad_b = float(np.mean(p - y))
        return value, np.append(grad_w, grad_b)

    result = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B")
    return result.x[:-1], float(result.x[-1])


def _routing_quality(scores: np.ndarray, errors: np.ndarray, labels: np.ndarray, share: float) -> dict[str, float]:
    """How well routing the top ``share`` by score, per layer, catches the costly tokens."""
    num_layers = scores.shape[0]
    flat_scores = scores.reshape(num_layers, -1)
    cut = np.quantile(flat_scores, 1.0 - share, axis=1)
    routed = scores >= cut[:, None, None]
    squared = errors**2
    return {
        "auc": roc_auc(scores.reshape(-1), labels.reshape(-1)),
        "precision_at_share": float(labels[routed].mean()) if routed.any() else float("nan"),
        "error_mass_routed": float(squared[routed].sum() / max(squared.sum(), 1e-30)),
    }


def fit_router(
    signals: TokenSignals,
    token_log_frequency: torch.Tensor,
    tiers: tuple[int, ...],
    share: float,
    holdout_fraction: float = 0.25,
    target: str = "layer_error",
) -> RouterSpec:
    """Fit weights on part of the router windows, measure on the rest, set thresholds on all.

    ``target`` is what the top ``share`` is taken of: ``layer_error`` (L2 of the base-tier
    change in the layer output), ``loss_impact`` (|dL/dh . e|, needs ``signals.loss_impact``) or
    ``kl_impact`` (the same from a pass at the base tier against the KL to full precision).
    The window split is :func:`calibration.probe.holdout_windows`', the sensitivity probe's too.
    """
    if target not in ROUTER_TARGETS:
        raise ValueError(f"router target {target!r} is unknown; expected one of {list(ROUTER_TARGETS)}")
    normalised = signal_matrix(signals, token_log_frequency)
    if target == "kl_impact" and not signals.at_base_tier:
        raise ValueError("router target 'kl_impact' needs the calibration pass at the base tier (at_base_tier=True)")
    if target in ("loss_impact", "kl_impact"):
        if signals.loss_impact is None:
            raise ValueError(f"router target {target!r} needs the loss-gradient pass (signals.loss_impact)")
        impact = signals.loss_impact.numpy().astype(np.float64)
        errors = np.exp(np.where(np.isfinite(impact), impact, -np.inf))  # last position: 0, never a target
    else:
        errors = signals.base_error.numpy().astype(np.float64)
    labels = _top_share_labels(errors, share)
    num_windows = errors.shape[1]
    num_holdout = holdout_windows(num_windows, holdout_fraction)
    train = slice(0, num_windows - num_holdout)
    held = slice(num_windows - num_holdout, num_windows) if num_holdout else slice(0, num_windows)

    def stack(names: tuple[str, ...], rows: slice) -> np.ndarray:
        return np.stack([normalised.features[n][:, rows].reshape(-1) for n in names], axis=1)

    runtime = tuple(name for name in RUNTIME_SIGNALS if name in normalised.features)
    weights, bias = _fit_logistic(stack(runtime, train), labels[:, train].reshape(-1))

    def score(rows: slice) -> np.ndarray:
        shape = errors[:, rows].shape
        return (stack(runtime, rows) @ weights + bias).reshape(shape)

    quality = _routing_quality(score(held), errors[:, held], labels[:, held], share)
    single = {
        name: roc_auc(normalised.features[name][:, held].reshape(-1), labels[:, held].reshape(-1))
        for name in ALL_SIGNALS
        if name in normalised.features
    }
    all_scores = score(slice(0, num_windows))
    flat_scores = all_scores.reshape(all_scores.shape[0], -1)
    shares = tier_shares(tiers, share)
    thresholds = [
        [float(np.quantile(flat_scores[layer], 1.0 - shares[str(tier)])) for tier in tiers[1:]]
        for layer in range(flat_scores.shape[0])
    ]
    fit = {
        "target": {
            "layer_error": f"top {share:.0%} of tokens by layer-output error (L2) on the base tier, per layer",
            "loss_impact": f"top {share:.0%} of tokens by first-order loss change |dL/dh . e| on the base tier, per layer",
            "kl_impact": (
                f"top {share:.0%} of tokens by first-order change |dKL/dh . e| of the KL to the float32 model, "
                "at the base-tier model, e the layer output's change to full precision, per layer"
            ),
        }[target],
        "target_name": target,
        "method": "logistic regression on z-scored runtime signals, L2 1e-3",
        "train_windows": train.stop - train.start,
        "holdout_windows": num_holdout,
        "holdout": quality,
        "random_routing_expectation": {"auc": 0.5, "precision_at_share": share, "error_mass_routed": share},
        "single_signal_auc": single,
    }
    if "sensitivity" in runtime:
        fit["sensitivity_probe"] = (
            "per layer, a ridge regression of the target's log |dKL/dh . e| on the layer's normed input "
            "(calibration.probe), fitted on the train windows only"
        )
    runtime_normalisation = {name: normalised.normalisation[name] for name in runtime}
    return RouterSpec(
        signals=runtime,
        normalisation=runtime_normalisation,
        weights={name: float(w) for name, w in zip(runtime, weights)},
        bias=bias,
        thresholds=tuple(tuple(row) for row in thresholds),
        tier_shares=shares,
        fit=_finite_json(fit),
        excluded_signals=dict(_EXCLUDED_REASONS),
        score_percentiles=tuple(
            tuple(round(float(v), 6) for v in np.quantile(flat_scores[layer], np.linspace(0.0, 1.0, 101)))
            for layer in range(flat_scores.shape[0])
        ),
    )


def _finite_json(value):
    """NaN is not JSON: record undefined figures as null."""
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
