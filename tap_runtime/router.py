"""Per-token, per-layer precision routing from the routing table's fitted score.

Before each decoder layer runs, the router scores every token from signals it can compute at
that moment (hidden-state norm at the layer input, position, token-id frequency) and picks a
tier index per token; the layer's :class:`~tap_runtime.layers.TapLinear` modules read that
choice. The signal transforms live here and the calibration imports them, so what the router
was fitted on and what it computes at run time are one definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .budget import BudgetWindow
from .errors import InvalidConfigError
from .format import RouterSpec
from .kernels.native import native_kernels

__all__ = [
    "ROUTING_MODES",
    "ALL_TOKENS",
    "hidden_norm_feature",
    "position_feature",
    "error_estimate_feature",
    "sensitivity_feature",
    "LayerRouting",
    "TokenRouter",
]

ROUTING_MODES = ("learned", "fixed", "random", "topk", "budget")
# The default: the learned score with the routed share held at the converted one (--share), so a
# checkpoint costs on any text what it was converted to cost. With fixed thresholds ("learned")
# the share drifts with the text (13-51% for a fitted 10%, README), and the cost with it.
DEFAULT_ROUTING = "budget"
# From this many tokens in one pass, budget mode routes exactly the top share of the pass.
BUDGET_EXACT_MIN_TOKENS = 16
ALL_TOKENS = "all"  # marker: every token of the batch runs this plane, no gather needed


def hidden_norm_feature(hidden_states: torch.Tensor) -> torch.Tensor:
    """log of the root-mean-square of each token's hidden state: (..., hidden) -> (...)."""
    rms = hidden_states.detach().to(torch.float32).pow(2).mean(dim=-1).sqrt()
    return torch.log(rms.clamp_min(1e-12))


def error_estimate_feature(normed: torch.Tensor, sketch: torch.Tensor) -> torch.Tensor:
    """log ||x P||^2 for each token x of the layer's normed input: (..., hidden) -> (...)."""
    projected = normed.detach().to(torch.float32) @ sketch.to(device=normed.device, dtype=torch.float32)
    return torch.log(projected.pow(2).sum(dim=-1).clamp_min(1e-20))


def sensitivity_feature(normed: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """norm(h) . v for each token of the layer's normed input: (..., hidden) -> (...).

    v is the layer's probe (format 6), fitted so that this predicts log |g . e|: how much the
    KL to the float32 model moves when the layer runs on the base tier for this token.
    """
    return normed.detach().to(torch.float32) @ probe.to(device=normed.device, dtype=torch.float32)


def position_feature(positions: torch.Tensor) -> torch.Tensor:
    """log(1 + position): early positions differ most from one another."""
    return torch.log1p(positions.to(torch.float32).clamp_min(0))


@dataclass
class LayerRouting:
    """The tier choice for the tokens of the current forward pass in one decoder layer.

    ``plane_indices[k]`` is what plane k+1 (a residual plane) must process: None (no token),
    :data:`ALL_TOKENS`, or a LongTensor of flat token indices.
    """

    layer_index: int
    plane_indices: list[Any] = field(default_factory=list)

    def indices_for_plane(self, plane_index: int) -> Any:
        if plane_index - 1 < len(self.plane_indices):
            return self.plane_indices[plane_index - 1]
        return None


class TokenRouter:
    """Scores tokens and assigns each a tier per layer; also counts tokens per tier per layer."""

    def __init__(
        self,
        spec: RouterSpec,
        tiers: tuple[int, ...],
        num_layers: int,
        token_log_frequency: torch.Tensor | None,
        error_sketches: list[torch.Tensor] | None = None,
        sensitivity_probes: list[torch.Tensor] | None = None,
    ):
        self.spec = spec
        self.tiers = tuple(tiers)
        self.num_layers = num_layers
        self.layers = [LayerRouting(i) for i in range(num_layers)]
        self.token_log_frequency = token_log_frequency
        self.error_sketches = error_sketches
        self.sensitivity_probes = sensitivity_probes
        # Set by the model wiring: each layer's input norm, which the error estimate reads through.
        self.input_norms: list | None = None
        # (num_layers, len(tiers) - 1): a token reaches tier k+1 when its score >= thresholds[l, k].
        self.thresholds = torch.tensor(spec.thresholds, dtype=torch.float32).reshape(num_layers, len(tiers) - 1)
        norm = spec.normalisation
        self._weights = {s: float(spec.weights.get(s, 0.0)) for s in spec.signals}
        self._layer_stats = {
            name: (
                torch.tensor(norm[name]["layer_mean"], dtype=torch.float32),
                torch.tensor(norm[name]["layer_std"], dtype=torch.float32),
            )
            for name in spec.normalisation
            if "layer_mean" in norm[name]
        }
        # Per layer, the z-scoring folded into one slope and offset per signal (Python floats, so
        # a decode step scores a token with a handful of tensor ops).
        self._slopes = {
            name: [self._weights[name] / float(std) for std in stats[1]]
            for name, stats in self._layer_stats.items()
            if name in self._weights
        }
        self._offsets = [
            -sum(self._weights[name] * float(stats[0][l]) / float(stats[1][l]) for name, stats in self._layer_stats.items() if name in self._weights)
            for l in range(num_layers)
        ]
        self._threshold_rows = [[float(t) for t in row] for row in self.thresholds]
        self.mode = "learned"
        self._budget_windows: list[BudgetWindow] = []
        self.fixed_tier_index = 0
        self.topk_score = "learned"
        self.topk_sign = 1.0
        self.random_shares: tuple[float, ...] = tuple(
            float(spec.tier_shares.get(str(t), 0.0)) for t in self.tiers[1:]
        )
        self._generator = torch.Generator().manual_seed(0)
        self._static_score: torch.Tensor | None = None
        self._counts = torch.zeros(num_layers, len(self.tiers), dtype=torch.int64)
        # Decode steps count in plain Python (a tensor update per layer per token costs more
        # than the decision itself); folded into the tensor whenever counts are read.
        self._pending = [[0] * len(self.tiers) for _ in range(num_layers)]
        self._has_pending = False
        self.set_mode(DEFAULT_ROUTING)

    # ----- configuration -------------------------------------------------------------------
    def set_mode(
        self,
        mode: str,
        tier: int | None = None,
        shares: tuple[float, ...] | None = None,
        seed: int = 0,
        score: str = "learned",
        sign: float = 1.0,
    ) -> None:
        """Choose how tokens are routed.

        ``learned``: the fitted score and thresholds. ``fixed``: every token at ``tier``.
        ``random``: each token independently above the base with the fitted shares (or
        ``shares``, one per tier above the base), seeded; the baseline routing must beat.
        ``topk``: in each layer of each forward pass, exactly the top ``shares`` of tokens by
        ``score`` (``learned`` or one runtime signal, times ``sign``): for ablations at equal
        share; it needs many tokens per pass, so it is for prefill, not decode.
        ``budget``: the learned score, with thresholds that keep each layer's share at the
        fitted shares (or ``shares``) on any text: a pass of many tokens (prefill) routes
        exactly its top share; a decode token is routed when its score reaches the top share of
        the layer's last BUDGET_WINDOW decode scores, a share that also makes up the sequence's
        running deficit (tap_runtime.budget), so the share holds even when the text differs
        from the calibration text.
        """
        if mode not in ROUTING_MODES:
            raise InvalidConfigError(f"routing mode {mode!r} is unknown; expected one of {list(ROUTING_MODES)}.")
        if mode == "fixed":
            if tier not in self.tiers:
                raise InvalidConfigError(f"fixed tier {tier!r} is not in this checkpoint; expected one of {list(self.tiers)}.")
            self.fixed_tier_index = self.tiers.index(tier)
        if mode == "topk" and score != "learned" and score not in self.spec.normalisation:
            raise InvalidConfigError(
                f"topk score {score!r} is unknown; expected 'learned' or one of {sorted(self.spec.normalisation)}."
            )
        if mode in ("random", "topk", "budget"):
            # Without explicit shares: the fitted ones (never the last call's).
            self.random_shares = tuple(float(self.spec.tier_shares.get(str(t), 0.0)) for t in self.tiers[1:])
            if shares is not None:
                if len(shares) != len(self.tiers) - 1 or any(not 0 <= s <= 1 for s in shares):
                    raise InvalidConfigError(
                        f"random shares {shares} are invalid; expected {len(self.tiers) - 1} values in [0, 1]."
                    )
                self.random_shares = tuple(float(s) for s in shares)
            self._generator = torch.Generator().manual_seed(seed)
        self.topk_score, self.topk_sign = score, float(sign)
        self.mode = mode
        if mode == "budget":
            self._budget_windows = self._fresh_budget_windows()

    def _fresh_budget_windows(self) -> list[BudgetWindow]:
        """Per layer: the fitted thresholds and no decode scores yet."""
        return [BudgetWindow(self._threshold_rows[layer], self.random_shares) for layer in range(self.num_layers)]

    @property
    def _budget_rows(self) -> list[list[float]]:
        """Budget mode's current thresholds, one row per layer (the windows' own lists)."""
        return [window.thresholds for window in self._budget_windows]

    def set_thresholds(self, thresholds: tuple[tuple[float, ...], ...]) -> None:
        """Replace the per-layer thresholds (one row per layer, one value per tier above the base)."""
        table = torch.tensor(thresholds, dtype=torch.float32)
        if table.shape != self.thresholds.shape:
            raise InvalidConfigError(f"thresholds of shape {tuple(table.shape)} given; expected {tuple(self.thresholds.shape)}.")
        self.thresholds = table
        self._threshold_rows = [[float(t) for t in row] for row in table]
        self.begin_sequence()

    def begin_sequence(self) -> None:
        """A new sequence starts from the fitted thresholds with no decode scores: budget mode's
        windows (filled by the last sequence) go back, so equal prompts route equally."""
        if self.mode == "budget":
            self._budget_windows = self._fresh_budget_windows()

    def reset_counts(self) -> None:
        self._counts.zero_()
        self._pending = [[0] * len(self.tiers) for _ in range(self.num_layers)]
        self._has_pending = False

    @property
    def counts(self) -> torch.Tensor:
        """(num_layers, len(tiers)) token decisions per tier since the last reset."""
        if self._has_pending:
            self._counts += torch.tensor(self._pending, dtype=torch.int64)
            self._pending = [[0] * len(self.tiers) for _ in range(self.num_layers)]
            self._has_pending = False
        return self._counts

    # ----- per forward pass ----------------------------------------------------------------
    def begin_forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor | None) -> None:
        """Precompute the part of the score that is the same in every layer. Shapes (batch, seq)."""
        self._static_scalar = None
        if self.mode not in ("learned", "topk", "budget"):
            self._static_score = None
            return
        self._token_features = (input_ids, positions)
        if input_ids is not None and input_ids.numel() == 1 and positions is not None:
            # Decode: one token, so the shared part of its score is plain arithmetic on floats.
            self._static_score = None
            self._static_scalar = self._static_score_of(int(input_ids.reshape(-1)[0]), int(positions.reshape(-1)[0]))
            return
        shape = input_ids.shape if input_ids is not None else positions.shape if positions is not None else None
        if shape is None:
            self._static_score = None
            return
        score = torch.full(shape, self.spec.bias, dtype=torch.float32)
        norm = self.spec.normalisation
        if "position" in self._weights and positions is not None:
            stats = norm["position"]
            score += self._weights["position"] * (position_feature(positions) - stats["mean"]) / stats["std"]
        if "token_frequency" in self._weights and input_ids is not None and self.token_log_frequency is not None:
            stats = norm["token_frequency"]
            ids = input_ids.clamp(0, self.token_log_frequency.numel() - 1)
            feature = self.token_log_frequency[ids.cpu()].to(score.device)
            score += self._weights["token_frequency"] * (feature - stats["mean"]) / stats["std"]
        # Without ids (inputs_embeds) the frequency term stays at its calibration mean, i.e. 0.
        self._static_score = score.reshape(-1)

    def _static_score_of(self, token_id: int, position: int) -> float:
        """:meth:`begin_forward`'s score for one token, without tensor operations."""
        norm = self.spec.normalisation
        score = float(self.spec.bias)
        if "position" in self._weights:
            stats = norm["position"]
            score += self._weights["position"] * (math.log1p(max(position, 0)) - stats["mean"]) / stats["std"]
        if "token_frequency" in self._weights and self.token_log_frequency is not None:
            stats = norm["token_frequency"]
            if not hasattr(self, "_log_frequency_list"):
                self._log_frequency_list = self.token_log_frequency.tolist()
            table = self._log_frequency_list
            feature = table[min(max(token_id, 0), len(table) - 1)]
            score += self._weights["token_frequency"] * (feature - stats["mean"]) / stats["std"]
        return score

    def route_layer(self, layer_index: int, hidden_states: torch.Tensor, normed: torch.Tensor | None = None) -> None:
        """Assign every token of ``hidden_states`` (batch, seq, hidden) a tier for this layer.

        ``normed`` is the layer's input norm applied to ``hidden_states`` when the caller has it
        (the runtime routes from the norm's forward hook); otherwise it is computed here.
        """
        num_tokens = hidden_states.shape[0] * hidden_states.shape[1]
        routing = self.layers[layer_index]
        if self.mode in ("learned", "budget") and num_tokens == 1:
            # Decode: one token, one score, plain Python from here on.
            score = self._decode_score(layer_index, hidden_states, normed)
            if self.mode == "learned":
                tier_index = sum(score >= t for t in self._threshold_rows[layer_index])
            else:
                window = self._budget_windows[layer_index]
                tier_index = sum(score >= t for t in window.thresholds)
                window.add(score, tier_index)
            self._pending[layer_index][tier_index] += 1
            self._has_pending = True
            routing.plane_indices = [ALL_TOKENS if tier_index >= level else None for level in range(1, len(self.tiers))]
            return
        if self.mode == "fixed":
            tier_index = torch.full((num_tokens,), self.fixed_tier_index, dtype=torch.int64)
        elif self.mode == "random":
            draws = torch.rand(num_tokens, generator=self._generator)
            tier_index = torch.zeros(num_tokens, dtype=torch.int64)
            # Shares are "at or above tier k+1" and shrink with k, so one draw nests the tiers.
            for share in self.random_shares:
                tier_index += (draws < share).to(torch.int64)
        elif self.mode == "budget":
            score = self._layer_score(layer_index, hidden_states, num_tokens, normed)
            window = self._budget_windows[layer_index]
            rows = list(window.thresholds)
            if num_tokens >= BUDGET_EXACT_MIN_TOKENS:
                ordered = torch.sort(score, descending=True).values
                for k, share in enumerate(self.random_shares):
                    cut = int(round(share * num_tokens))
                    # Threshold halfway between the last routed and the first kept score.
                    if 0 < cut < num_tokens:
                        rows[k] = float((ordered[cut - 1] + ordered[cut]) / 2)
                    elif cut == 0:
                        rows[k] = math.inf
                    else:
                        rows[k] = -math.inf
                window.set_cut(rows)
            tier_index = (score.unsqueeze(-1) >= torch.tensor(rows, dtype=score.dtype)).sum(dim=-1)
            if num_tokens < BUDGET_EXACT_MIN_TOKENS:
                # A few tokens at once: decode of a batch.
                for value, tier in zip(score.reshape(-1).tolist(), tier_index.reshape(-1).tolist()):
                    window.add(value, tier)
        elif self.mode == "topk":
            score = self._topk_score(layer_index, hidden_states, num_tokens, normed)
            tier_index = torch.zeros(num_tokens, dtype=torch.int64)
            order = torch.argsort(score, descending=True)
            for share in self.random_shares:
                tier_index[order[: int(round(share * num_tokens))]] += 1
        else:
            score = self._layer_score(layer_index, hidden_states, num_tokens, normed)
            # Count thresholds passed: 0 -> base tier, 1 -> next tier, ...
            tier_index = (score.unsqueeze(-1) >= self.thresholds[layer_index]).sum(dim=-1)
        self._counts[layer_index] += torch.bincount(tier_index, minlength=len(self.tiers))
        routing.plane_indices = []
        for level in range(1, len(self.tiers)):
            mask = tier_index >= level
            count = int(mask.sum())
            if count == 0:
                routing.plane_indices.append(None)
            elif count == num_tokens:
                routing.plane_indices.append(ALL_TOKENS)
            else:
                routing.plane_indices.append(mask.nonzero().squeeze(-1).to(hidden_states.device))

    def _raw_feature(self, name: str, layer_index: int, hidden_states: torch.Tensor, normed: torch.Tensor | None) -> torch.Tensor:
        """The untransformed per-layer signal of every token, on the activations' device: (tokens,)."""
        if name == "hidden_norm":
            return hidden_norm_feature(hidden_states).reshape(-1)
        if normed is None:
            normed = self.input_norms[layer_index](hidden_states)
        if name == "sensitivity":
            return sensitivity_feature(normed, self._float_probe(layer_index, normed.device)).reshape(-1)
        sketch = self.error_sketches[layer_index]
        if sketch.device != normed.device:
            # Once per layer and device: the sketch then stays beside the activations.
            sketch = self.error_sketches[layer_index] = sketch.to(normed.device)
        return error_estimate_feature(normed, sketch).reshape(-1)

    def _layer_feature(self, name: str, layer_index: int, hidden_states: torch.Tensor, normed: torch.Tensor | None = None) -> torch.Tensor:
        """z-scored per-layer signal of every token: (tokens,)."""
        mean, std = self._layer_stats[name]
        return (self._raw_feature(name, layer_index, hidden_states, normed).cpu() - mean[layer_index]) / std[layer_index]

    def _topk_score(self, layer_index: int, hidden_states: torch.Tensor, num_tokens: int, normed: torch.Tensor | None = None) -> torch.Tensor:
        if self.topk_score == "learned":
            return self._layer_score(layer_index, hidden_states, num_tokens, normed)
        norm = self.spec.normalisation[self.topk_score]
        input_ids, positions = getattr(self, "_token_features", (None, None))
        if self.topk_score in self._layer_stats:
            z = self._layer_feature(self.topk_score, layer_index, hidden_states, normed)
        elif self.topk_score == "position":
            z = (position_feature(positions).reshape(-1) - norm["mean"]) / norm["std"]
        else:
            ids = input_ids.reshape(-1).clamp(0, self.token_log_frequency.numel() - 1).cpu()
            z = (self.token_log_frequency[ids] - norm["mean"]) / norm["std"]
        return self.topk_sign * z

    def _decode_score(self, layer_index: int, hidden_states: torch.Tensor, normed: torch.Tensor | None) -> float:
        """:meth:`_layer_score` for a single token with the fewest tensor operations (decode)."""
        static = self._static_score
        if getattr(self, "_static_scalar", None) is not None:
            score = self._static_scalar
        else:
            score = float(static[0]) if static is not None and static.numel() == 1 else self.spec.bias
        native_features = self._native_decode_features(layer_index, hidden_states, normed)
        if native_features is not None:
            slopes = self._slopes
            score += slopes["hidden_norm"][layer_index] * native_features[0] + slopes["error_estimate"][layer_index] * native_features[1]
            if "sensitivity" in slopes:
                score += slopes["sensitivity"][layer_index] * native_features[2]
            return score + self._offsets[layer_index]
        for name, slopes in self._slopes.items():
            if name == "sensitivity":
                if normed is None:
                    normed = self.input_norms[layer_index](hidden_states)
                probe = self._float_probe(layer_index, normed.device)
                feature = float(torch.dot(normed.reshape(-1).to(torch.float32), probe))
            elif name == "hidden_norm":
                # log rms = log(||h|| / sqrt(hidden)), as hidden_norm_feature computes it.
                norm = float(torch.linalg.vector_norm(hidden_states.reshape(-1), dtype=torch.float32))
                feature = math.log(max(norm / math.sqrt(hidden_states.shape[-1]), 1e-12))
            else:
                if normed is None:
                    normed = self.input_norms[layer_index](hidden_states)
                sketch = self._float_sketch(layer_index, normed.device)
                projected = normed.reshape(1, -1).to(torch.float32) @ sketch
                # log ||x P||^2, as error_estimate_feature computes it.
                feature = math.log(max(float(torch.linalg.vector_norm(projected)) ** 2, 1e-20))
            score += slopes[layer_index] * feature
        return score + self._offsets[layer_index]

    def _native_decode_features(self, layer_index: int, hidden_states: torch.Tensor, normed: torch.Tensor | None) -> tuple[float, ...] | None:
        """(hidden_norm, error_estimate[, sensitivity]) of one token in one native call (about 7
        against 27 microseconds of torch operators), when the router uses those two signals (and
        at most the sensitivity besides) and both vectors are contiguous float32 on the CPU; else None."""
        slopes = self._slopes
        others = set(slopes) - {"hidden_norm", "error_estimate", "sensitivity"}
        if normed is None or others or "hidden_norm" not in slopes or "error_estimate" not in slopes:
            return None
        for t in (hidden_states, normed):
            if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                return None
        native = native_kernels()
        if native is None:
            return None
        sketch = self._float_sketch(layer_index, normed.device)
        if not sketch.is_contiguous():
            return None
        if "sensitivity" in slopes:
            probe = self._float_probe(layer_index, normed.device)
            return tuple(native.router_features_with_probe(hidden_states, normed, sketch, probe))
        return tuple(native.router_features(hidden_states, normed, sketch))

    def _float_probe(self, layer_index: int, device: torch.device) -> torch.Tensor:
        cache = self.__dict__.setdefault("_float_probes", {})
        key = (layer_index, device)
        if key not in cache:
            if self.sensitivity_probes is None:
                raise InvalidConfigError("the router reads the sensitivity signal but was given no probe vectors.")
            cache[key] = self.sensitivity_probes[layer_index].to(device=device, dtype=torch.float32).contiguous()
        return cache[key]

    def _float_sketch(self, layer_index: int, device: torch.device) -> torch.Tensor:
        cache = self.__dict__.setdefault("_float_sketches", {})
        key = (layer_index, device)
        if key not in cache:
            cache[key] = self.error_sketches[layer_index].to(device=device, dtype=torch.float32)
        return cache[key]

    def _layer_score(self, layer_index: int, hidden_states: torch.Tensor, num_tokens: int, normed: torch.Tensor | None = None) -> torch.Tensor:
        """Fitted score of every token in this layer: (tokens,), on the CPU."""
        static = self._static_score
        if static is None or static.numel() != num_tokens:
            scalar = getattr(self, "_static_scalar", None)
            fill = scalar if scalar is not None and num_tokens == 1 else self.spec.bias
            static = torch.full((num_tokens,), fill, dtype=torch.float32)
        layer_part = None
        for name, slopes in self._slopes.items():
            term = self._raw_feature(name, layer_index, hidden_states, normed) * slopes[layer_index]
            layer_part = term if layer_part is None else layer_part + term
        if layer_part is None:
            return static
        return static + (layer_part.cpu() + self._offsets[layer_index])

    # ----- reporting -----------------------------------------------------------------------
    def tier_counts(self) -> dict[int, int]:
        """Token-layer decisions per tier since the last reset."""
        totals = self.counts.sum(dim=0)
        return {tier: int(totals[i]) for i, tier in enumerate(self.tiers)}
