"""Fit the sensitivity probe: one vector per decoder layer that reads a token's normed input and
predicts how much routing the token up in that layer would lower the KL to full precision.

The router's other signals predict how large a token's base-tier error is. What routing buys is
that error projected on the token's sensitivity, |g . e| with g the KL gradient at the base-tier
model; oracle routings show the sensitivity is most of it (README "How far token routing could
go"). A ridge regression of log |g . e| on the layer's normed input, fitted on calibration windows
only, is a part of that the runtime can see before the layer runs, for one dot product.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from tap_runtime.router import sensitivity_feature

from .capture import TokenSignals

__all__ = ["PROBE_PENALTY", "holdout_windows", "fit_sensitivity_probes", "add_sensitivity"]

# Ridge penalty on the z-scored channels (tokens number in the thousands per layer, channels in
# the hundreds): the value the probe was measured with (scripts/bench_router_ceiling.py).
PROBE_PENALTY = 10.0


def holdout_windows(num_windows: int, fraction: float = 0.25) -> int:
    """How many of the last router windows every fit leaves out to measure itself on."""
    if num_windows < 2:
        return 0
    return max(int(math.floor(num_windows * fraction)), 1)


def _ridge_direction(features: torch.Tensor, target: torch.Tensor, penalty: float) -> torch.Tensor:
    """v with features @ v + c ~ target (ridge on z-scored columns), in the raw features' units."""
    features, target = features.double(), target.double()
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    design = (features - mean) / std
    centred = target - target.mean()
    gram = design.T @ design + penalty * torch.eye(design.shape[1], dtype=torch.float64)
    weights = torch.linalg.solve(gram, design.T @ centred)
    # z-scoring folds into the vector; its offset is the router's per-layer normalisation's job.
    return (weights / std).float()


def fit_sensitivity_probes(signals: TokenSignals, penalty: float = PROBE_PENALTY) -> list[torch.Tensor]:
    """Per layer, the (hidden,) probe vector fitted on the windows the router's fit trains on.

    Needs ``signals.normed_inputs`` and a finite ``signals.loss_impact`` (a pass at the base tier).
    """
    if signals.normed_inputs is None or signals.loss_impact is None:
        raise ValueError("the sensitivity probe needs the normed inputs and the loss impact of a calibration pass")
    num_layers, num_windows = signals.loss_impact.shape[:2]
    train = num_windows - holdout_windows(num_windows)
    probes = []
    for layer in range(num_layers):
        features = signals.normed_inputs[layer, :train].reshape(-1, signals.normed_inputs.shape[-1])
        target = signals.loss_impact[layer, :train].reshape(-1)
        keep = torch.isfinite(target)
        probes.append(_ridge_direction(features[keep], target[keep], penalty))
    return probes


def add_sensitivity(signals: TokenSignals, probes: list[torch.Tensor]) -> TokenSignals:
    """``signals`` with ``sensitivity`` (num_layers, num_windows, seq_len) = normed input . probe,
    as the runtime computes it (tap_runtime.router.sensitivity_feature)."""
    values = torch.stack(
        [sensitivity_feature(signals.normed_inputs[layer], probe) for layer, probe in enumerate(probes)]
    )
    return replace(signals, sensitivity=values)
