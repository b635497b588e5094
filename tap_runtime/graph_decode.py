"""Decode steps replayed as one CUDA graph, with every routing decision made on the GPU.

At batch 1 a GPU decode step is a few hundred kernels of a few microseconds each, so launching
them from the host is the bottleneck, and the eager router makes it worse: it reads each layer's
score back to the host (one sync per layer) to choose which planes run. Here the whole step
(embedding, every layer's score and tier, the base planes, attention over a static cache, the
head, the greedy pick and the budget thresholds' update) is captured once as a CUDA graph and
replayed per token. A token the router keeps on the base tier must still skip the residual
planes' reads, so each residual product is one of (``GraphDecoder(residual=...)``):

- ``conditional``: torch's packed kernel inside a conditional graph node keyed on the flag the
  step computed on the device (CUDA >= 12.4 and torch's ``CUDAGraph.begin_capture_to_if_node``,
  which torch 2.11 lacks);
- ``gated``: a Triton kernel that reads the flag itself and returns at once when it is unset
  (:mod:`tap_runtime.kernels.gated`), where torch has no conditional nodes;
- ``masked``: the product for every token, times the flag: no sync, but tier-8 bytes every step.

The step is plain tensor code, so it also runs eagerly with Python branches (branch mode
``eager``, any device): that is how the tests check on the CPU that it decodes and routes
exactly as the lean loop (:mod:`tap_runtime.decode`) does.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from .decode import DecodeResult, FastDecoder, fast_decode_unsupported
from .errors import InvalidConfigError
from .kernels.gated import gated_kernel_available, gated_plane_add
from .kernels.route import route_kernel_available, route_token
from .layers import TapLinear
from .rotation import rotate_input
from .budget import BUDGET_HORIZON, BUDGET_WINDOW, min_scores
from .router import TokenRouter

__all__ = [
    "GRAPH_ROUTING_MODES",
    "RESIDUAL_MODES",
    "GraphDecoder",
    "DeviceRouter",
    "DecodeStep",
    "conditional_nodes_available",
    "graph_decode_unsupported",
]

_log = logging.getLogger(__name__)

# Routing modes whose decode decision is a pure function of the token, its position and the
# layer input (random and top-k routing draw or rank on the host).
GRAPH_ROUTING_MODES = ("learned", "budget", "fixed")
# How a routed token's residual planes run (GraphDecoder(residual=...)); auto: conditional nodes
# where torch has them, else the flag-reading Triton kernel, else masked (eager on the CPU).
RESIDUAL_MODES = ("auto", "conditional", "gated", "masked", "eager")


def conditional_nodes_available() -> bool:
    """True when this torch build can capture a branch into a CUDA graph conditional node."""
    return torch.cuda.is_available() and hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node")


def graph_decode_unsupported(model: torch.nn.Module, router: TokenRouter, options: dict, max_length: int, kv_cache: str) -> str | None:
    """Why the graph step cannot run this request (None when it can)."""
    from .offload import HostPlane
    from .residency import LazyPlane

    why = fast_decode_unsupported(model, 1, options, max_length)
    if why is not None:
        return why
    if options.get("do_sample"):
        return "sampling: the graph step picks greedily"
    if kv_cache != "float":
        return f"kv_cache={kv_cache!r}: the graph step writes a float cache"
    if router.mode not in GRAPH_ROUTING_MODES:
        return f"routing mode {router.mode!r} is decided on the host (graph step: {', '.join(GRAPH_ROUTING_MODES)})"
    for module in model.modules():
        if isinstance(module, TapLinear):
            if getattr(module, "tap_offloaded", False) or any(type(p) in (LazyPlane, HostPlane) for p in module._prepared):
                return "planes paged in on demand (memory-efficient mode or offload_to_cpu) cannot be captured"
    return None


class _EagerBranches:
    """Python branches: the flag is read on the host (for the CPU and for checking)."""

    mode = "eager"

    def add_if(self, flag: torch.Tensor, out: torch.Tensor, product: Callable[[], torch.Tensor]) -> None:
        if bool(flag):
            out += product()

    def any_true(self, flags: list[torch.Tensor]) -> bool:
        return any(bool(f) for f in flags)


class _AlwaysBranches(_EagerBranches):
    """Warm-up before capture: both sides run once so every kernel is initialised."""

    mode = "warmup"

    def add_if(self, flag: torch.Tensor, out: torch.Tensor, product: Callable[[], torch.Tensor]) -> None:
        out += product()


class _ConditionalBranches:
    """Inside capture: the product becomes a conditional node keyed on the device flag."""

    mode = "conditional"

    def __init__(self, graph: "torch.cuda.CUDAGraph"):
        self.graph = graph

    def add_if(self, flag: torch.Tensor, out: torch.Tensor, product: Callable[[], torch.Tensor]) -> None:
        self.graph.begin_capture_to_if_node(flag)
        try:
            out += product()
        finally:
            self.graph.end_capture_to_conditional_node()

    def any_true(self, flags: list[torch.Tensor]) -> bool:
        raise InvalidConfigError("a kernel that reads the routing choice on the host cannot be captured")


class _GatedBranches(_ConditionalBranches):
    """Inside capture: the plane's product is a kernel that reads the flag itself (Triton)."""

    mode = "gated"


class _MaskedBranches(_ConditionalBranches):
    """Inside capture without conditional nodes: the product always runs, times the flag."""

    mode = "masked"

    def add_if(self, flag: torch.Tensor, out: torch.Tensor, product: Callable[[], torch.Tensor]) -> None:
        value = product()
        out += value * flag.to(value.dtype)


class DeviceRouter:
    """The router's one-token decision (:meth:`TokenRouter.route_layer` in decode) as tensor ops.

    Scores are float64 like the host router's Python floats; budget thresholds and the tier
    counts live on the device and go back to the host router after a sequence.
    """

    def __init__(self, router: TokenRouter, hidden_size: int, device: torch.device):
        if router.mode not in GRAPH_ROUTING_MODES:
            raise InvalidConfigError(f"routing mode {router.mode!r} cannot be decided on the device")
        self.router = router
        self.mode = router.mode
        self.device = device
        self.hidden_size = hidden_size
        self.num_layers = router.num_layers
        num_tiers = len(router.tiers)
        f64 = torch.float64
        self.levels = torch.arange(1, num_tiers, device=device)  # a token reads plane k when tier >= k
        self.counts = torch.zeros(router.num_layers, num_tiers, dtype=torch.int64, device=device)
        self._one = torch.ones(1, dtype=torch.int64, device=device)
        self.fixed_tier = torch.tensor(router.fixed_tier_index, dtype=torch.int64, device=device)
        rows = router._budget_rows if self.mode == "budget" else router._threshold_rows
        self.thresholds = torch.tensor(rows, dtype=f64, device=device).reshape(router.num_layers, num_tiers - 1)
        if self.mode == "budget":
            # The host router's BudgetWindow as a ring on the device: ``slot`` is the step's
            # write, ``filled`` how many decode scores it holds; empty slots hold +inf, so they
            # sort last. budget.effective_share and window_quantile's arithmetic, as tensors.
            shares = router.random_shares
            self.window = torch.full((router.num_layers, BUDGET_WINDOW), math.inf, dtype=f64, device=device)
            self.slot = torch.zeros((), dtype=torch.int64, device=device)
            self.filled = torch.zeros((), dtype=torch.int64, device=device)
            self.decoded = torch.zeros((), dtype=f64, device=device)
            self.routed = torch.zeros(router.num_layers, len(shares), dtype=f64, device=device)
            self.shares = torch.tensor(shares, dtype=f64, device=device)
            self.min_filled = torch.tensor([min_scores(s) for s in shares], dtype=torch.int64, device=device)
            self.fixed_share = torch.tensor([s <= 0.0 or s >= 1.0 for s in shares], device=device)
        self.slopes = dict(router._slopes)
        self.offsets = list(router._offsets)
        self.sketches = None
        if "error_estimate" in self.slopes:
            self.sketches = [router._float_sketch(layer, device) for layer in range(router.num_layers)]
        self.probes = None
        if "sensitivity" in self.slopes:
            self.probes = [router._float_probe(layer, device).reshape(-1, 1) for layer in range(router.num_layers)]
        self.frequency = None
        if router.token_log_frequency is not None:
            self.frequency = router.token_log_frequency.to(device=device, dtype=torch.float32)
        self.input_norms = router.input_norms
        self._static = torch.zeros((), dtype=f64, device=device)
        self.fused = False

    def use_fused_kernel(self) -> None:
        """Decide each layer with one Triton kernel (kernels/route.py) instead of ~20 tensor ops."""
        if self.mode == "fixed":
            return  # nothing to score: the tier is a constant
        if self.probes is not None:
            return  # the kernel reads two signals; the sensitivity's dot product stays in tensor ops
        f64 = torch.float64
        self.params = torch.tensor(
            [
                [self.slopes.get("hidden_norm", [0.0] * self.num_layers)[layer],
                 self.slopes.get("error_estimate", [0.0] * self.num_layers)[layer],
                 self.offsets[layer], 1.0 / math.sqrt(self.hidden_size)]
                for layer in range(self.num_layers)
            ],
            dtype=f64,
            device=self.device,
        )
        if self.sketches is not None:
            # The kernel reads a power-of-two rank; zero columns add nothing to the energy.
            padded = []
            for sketch in self.sketches:
                rank = sketch.shape[1]
                wanted = 1 << max(rank - 1, 0).bit_length()
                padded.append(torch.nn.functional.pad(sketch, (0, wanted - rank)).contiguous() if wanted != rank else sketch.contiguous())
            self.padded_sketches = padded
        self.flag_buffer = torch.zeros(self.num_layers, self.thresholds.shape[1], dtype=torch.int32, device=self.device)
        self.scores = torch.zeros(self.num_layers, dtype=f64, device=self.device)
        self.fused = True

    def flags(self, layer: int, hidden: torch.Tensor, normed: torch.Tensor, as_int: bool) -> list[torch.Tensor]:
        """One 0-dim flag per residual plane: nonzero when the token reads it in this layer."""
        if self.fused:
            route_token(
                hidden, normed, self.padded_sketches[layer] if self.sketches is not None else None, self.static_score,
                self.params[layer], self.thresholds[layer], self.counts[layer], self.flag_buffer[layer],
                self.scores[layer], "hidden_norm" in self.slopes,
            )
            if self.mode == "budget":
                self._take_score(layer, self.scores[layer], self.flag_buffer[layer])
            flags = list(self.flag_buffer[layer])
            return flags if as_int else [flag.to(torch.bool) for flag in flags]
        tier = self.tier_index(layer, hidden, normed)
        flags = [tier >= level for level in range(1, len(self.router.tiers))]
        return [flag.to(torch.int32) for flag in flags] if as_int else flags

    # ----- host <-> device state, once per sequence ---------------------------------------------
    def load_state(self) -> None:
        """Take the host router's current thresholds (budget: and the windows prefill left)."""
        rows = self.router._budget_rows if self.mode == "budget" else self.router._threshold_rows
        self.thresholds.copy_(torch.tensor(rows, dtype=torch.float64).reshape(self.thresholds.shape))
        if self.mode == "budget":
            windows = self.router._budget_windows
            filled = len(windows[0].recent)
            padded = [list(w.recent) + [math.inf] * (BUDGET_WINDOW - filled) for w in windows]  # oldest first
            self.window.copy_(torch.tensor(padded, dtype=torch.float64))
            self.filled.fill_(filled)
            self.decoded.fill_(windows[0].decoded)
            self.routed.copy_(torch.tensor([w.routed for w in windows], dtype=torch.float64))
            self.slot.fill_((filled - 1) % BUDGET_WINDOW)  # the next step writes after the newest
        self.counts.zero_()

    def store_state(self) -> None:
        """Hand the windows and counts back, so the host router reads as if it had decoded."""
        if self.mode == "budget":
            filled = int(self.filled)
            oldest = (int(self.slot) + 1) % BUDGET_WINDOW
            recent = torch.roll(self.window, -oldest, dims=1)[:, BUDGET_WINDOW - filled:].cpu().tolist()
            decoded, routed = int(self.decoded), self.routed.cpu().tolist()
            for window, scores, layer_routed in zip(self.router._budget_windows, recent, routed):
                window.replace(scores, decoded, layer_routed)
        self.router._counts += self.counts.cpu()
        self.counts.zero_()

    def _take_score(self, layer: int, score: torch.Tensor, routed: torch.Tensor) -> None:
        """BudgetWindow.add on the device: the score replaces the oldest, the token's routed
        flags (one per tier above the base) count, the thresholds follow."""
        self.routed[layer] += routed.to(torch.float64)
        self.window[layer].index_copy_(0, self.slot.reshape(1), score.reshape(1).to(torch.float64))
        ordered = torch.sort(self.window[layer]).values
        asked = torch.clamp(self.shares + (self.shares * self.decoded - self.routed[layer]) / BUDGET_HORIZON, 0.0, 1.0)
        asked = torch.where(self.fixed_share, self.shares, asked)
        rank = (1.0 - asked) * (self.filled - 1).to(torch.float64)
        low = torch.floor(rank).to(torch.int64)
        high = torch.minimum(low + 1, self.filled - 1)
        low_score, high_score = ordered.index_select(0, low), ordered.index_select(0, high)
        quantile = low_score + (rank - low.to(torch.float64)) * (high_score - low_score)
        quantile = torch.where(asked <= 0.0, math.inf, torch.where(asked >= 1.0, -math.inf, quantile))
        ready = self.filled >= self.min_filled
        # Nested as BudgetWindow keeps them: a higher tier never asks less.
        self.thresholds[layer].copy_(torch.cummax(torch.where(ready, quantile, self.thresholds[layer]), dim=0).values)

    # ----- per step -------------------------------------------------------------------------------
    def begin_step(self, token: torch.Tensor, position: torch.Tensor) -> None:
        """The layer-independent part of the score (TokenRouter._static_score_of, on the device)."""
        spec, norm, weights = self.router.spec, self.router.spec.normalisation, self.router._weights
        if self.mode == "budget":
            # Every layer's score of this step goes to the same slot.
            self.slot.add_(1).remainder_(BUDGET_WINDOW)
            self.filled.add_(1).clamp_(max=BUDGET_WINDOW)
            self.decoded.add_(1.0)
        score = self._static.fill_(float(spec.bias))
        if "position" in weights:
            stats = norm["position"]
            feature = torch.log1p(position.reshape(()).clamp_min(0).to(torch.float64))
            score = score + weights["position"] * (feature - stats["mean"]) / stats["std"]
        if "token_frequency" in weights and self.frequency is not None:
            stats = norm["token_frequency"]
            ids = token.reshape(1).clamp(0, self.frequency.numel() - 1)
            # index_select, not [ids]: a 0-dim index would be read back to the host.
            feature = self.frequency.index_select(0, ids).reshape(()).to(torch.float64)
            score = score + weights["token_frequency"] * (feature - stats["mean"]) / stats["std"]
        self.static_score = score

    def tier_index(self, layer: int, hidden: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        """This layer's tier index for the step's token: a 0-dim int64 tensor on the device."""
        if self.mode == "fixed":
            tier = self.fixed_tier
        else:
            score = self.static_score
            for name, slopes in self.slopes.items():
                if name == "hidden_norm":
                    length = torch.linalg.vector_norm(hidden.reshape(-1), dtype=torch.float32).to(torch.float64)
                    feature = torch.log((length / math.sqrt(self.hidden_size)).clamp_min(1e-12))
                elif name == "sensitivity":
                    feature = (normed.reshape(1, -1).to(torch.float32) @ self.probes[layer]).reshape(()).to(torch.float64)
                else:
                    projected = normed.reshape(1, -1).to(torch.float32) @ self.sketches[layer]
                    energy = torch.linalg.vector_norm(projected).to(torch.float64) ** 2
                    feature = torch.log(energy.clamp_min(1e-20))
                score = score + slopes[layer] * feature
            score = score + self.offsets[layer]
            passed = score >= self.thresholds[layer]
            tier = passed.sum()
            if self.mode == "budget":
                self._take_score(layer, score, tier > self.levels - 1)
        self.counts[layer].index_add_(0, tier.reshape(1), self._one)
        return tier


class DecodeStep:
    """One decode step on static buffers: reads ``token`` at ``position``, writes the greedy
    next token back into ``token``, into ``picked[position]``, and advances ``position``."""

    def __init__(self, decoder: FastDecoder, router: DeviceRouter, device: torch.device):
        self.decoder = decoder
        self.router = router
        cache = decoder.cache
        self.cache = cache
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.picked = torch.zeros(cache.max_length, dtype=torch.long, device=device)
        self.key_positions = torch.arange(cache.max_length, device=device)
        self.branches = _EagerBranches()
        # True: residual planes go through the flag-reading kernel (kernels/gated.py), eagerly too.
        self.gated = False
        self._portable: dict[tuple[int, int], object] = {}

    def state(self) -> list[torch.Tensor]:
        """Every buffer a step changes besides the cache (whose unread slots do not matter)."""
        router = self.router
        budget = [router.window, router.slot, router.filled, router.decoded, router.routed] if router.mode == "budget" else []
        return [self.token, self.position, self.picked, router.thresholds, router.counts, *budget]

    def _visible(self, window: int | None) -> torch.Tensor:
        """(1, 1, 1, max_length): the keys the step's query sees (causal, within the window)."""
        visible = self.key_positions <= self.position
        if window is not None:
            visible &= self.key_positions > self.position - window
        return visible.reshape(1, 1, 1, -1)

    def linear(self, module, x: torch.Tensor, flags: list[torch.Tensor]) -> torch.Tensor:
        """run_planes for the step's token: base plane(s), then each routed plane under its flag."""
        kernel, planes, always = module.kernel, module._prepared, module.policy.always_planes
        flat = rotate_input(x.reshape(1, -1), module.policy.input_rotation)
        base_product = getattr(kernel, "matmul_base", None)
        if base_product is not None:
            alone = always == 1 and not self.branches.any_true(flags[: len(planes) - 1])
            out = base_product(flat, planes[0], alone=alone)
        else:
            out = kernel.matmul_plane(flat, planes[0])
        if len(planes) > 1:
            out = out.to(torch.float32)
            for plane in planes[1:always]:
                out += kernel.matmul_plane(flat, plane)
            for index in range(always, len(planes)):
                if self.gated:
                    gated_plane_add(flags[index - 1], flat, self.portable_plane(module, index), out)
                else:
                    self.branches.add_if(flags[index - 1], out, lambda plane=planes[index]: kernel.matmul_plane(flat, plane))
        if module.bias is not None:
            out = out + module.bias
        return out.to(x.dtype).reshape(1, 1, module.out_features)

    def portable_plane(self, module, index: int):
        """The plane in its portable layout on the module's device (the gated kernel reads it):
        the CUDA kernel keeps one for prefill; otherwise the loaded planes (keep_portable)."""
        key = (id(module), index)
        if key not in self._portable:
            plane = getattr(module._prepared[index], "portable", None)
            if plane is None:
                try:
                    plane = module.planes()[index]
                except AttributeError:
                    raise InvalidConfigError(
                        "the gated residual kernel needs the planes' portable layout: load on CUDA with the "
                        "default dense prefill, or with keep_portable=True"
                    ) from None
            self._portable[key] = plane
        return self._portable[key]

    def run(self) -> None:
        decoder, router, cache = self.decoder, self.router, self.cache
        token, position = self.token, self.position
        hidden = decoder.body.embed_tokens(token)
        router.begin_step(token, position)
        rotary = decoder._rotary(hidden, position.reshape(1, 1))
        visible = {window: self._visible(window) for window in set(decoder.windows)}
        direct_norms = decoder.direct_norms and hidden.dtype == torch.float32
        shape = (hidden.shape[-1],)
        heads, kv_heads, head_dim = decoder.num_heads, decoder.num_kv_heads, decoder.head_dim
        for index, layer in enumerate(decoder.layers):
            attention, mlp = layer.self_attn, layer.mlp
            norm = layer.input_layernorm
            # .forward: the norm's hook would route on the host; the device router does it here.
            normed = F.rms_norm(hidden, shape, norm.weight, norm.variance_epsilon) if direct_norms else norm.forward(hidden)
            flags = router.flags(index, hidden, normed, as_int=self.gated)
            query = self.linear(attention.q_proj, normed, flags).view(1, 1, heads, head_dim).transpose(1, 2)
            key = self.linear(attention.k_proj, normed, flags).view(1, 1, kv_heads, head_dim).transpose(1, 2)
            value = self.linear(attention.v_proj, normed, flags).view(1, 1, kv_heads, head_dim).transpose(1, 2)
            if decoder.gemma:
                query, key = attention.q_norm(query), attention.k_norm(key)
            cos, sin = rotary[decoder.layer_types[index]]
            query, key = decoder._rotate(query, key, cos, sin)
            cache.keys[index].index_copy_(2, position, key.to(cache.dtype))
            cache.values[index].index_copy_(2, position, value.to(cache.dtype))
            attended = F.scaled_dot_product_attention(
                query,
                cache.keys[index],
                cache.values[index],
                attn_mask=visible[decoder.windows[index]],
                scale=attention.scaling,
                enable_gqa=kv_heads != heads,
            )
            attended = self.linear(attention.o_proj, attended.transpose(1, 2).reshape(1, 1, -1), flags)
            if decoder.gemma:
                hidden = hidden + layer.post_attention_layernorm(attended)
                normed = layer.pre_feedforward_layernorm(hidden)
            else:
                hidden = hidden + attended
                norm = layer.post_attention_layernorm
                normed = F.rms_norm(hidden, shape, norm.weight, norm.variance_epsilon) if direct_norms else norm(hidden)
            activated = mlp.act_fn(self.linear(mlp.gate_proj, normed, flags)) * self.linear(mlp.up_proj, normed, flags)
            out = self.linear(mlp.down_proj, activated, flags)
            hidden = hidden + (layer.post_feedforward_layernorm(out) if decoder.gemma else out)
        logits = decoder.model.lm_head(decoder.body.norm(hidden)).reshape(-1)
        if decoder.softcap is not None:
            logits = torch.tanh(logits / decoder.softcap) * decoder.softcap
        picked = torch.argmax(logits).reshape(1)
        self.picked.index_copy_(0, position, picked)
        token.copy_(picked.reshape(1, 1))
        position.add_(1)


class GraphDecoder:
    """Greedy decode with the step captured as a CUDA graph (``capture=True``, CUDA only) or run
    eagerly (``capture=False``, any device). Prefill is the lean loop's forward."""

    def __init__(self, model: torch.nn.Module, capture: bool | None = None, residual: str = "auto", fused_router: bool | None = None):
        self.model = model
        self.fast = FastDecoder(model)
        self.device = next(model.parameters()).device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise InvalidConfigError(f"CUDA graph capture needs a CUDA device; the model is on {self.device}")
        if residual not in RESIDUAL_MODES:
            raise InvalidConfigError(f"residual={residual!r} is unknown; expected one of {list(RESIDUAL_MODES)}.")
        if residual == "auto":
            residual = self._default_residual()
        if residual == "conditional" and not conditional_nodes_available():
            raise InvalidConfigError(f"residual='conditional' needs CUDA graph conditional nodes, which torch {torch.__version__} lacks")
        if residual == "gated" and not gated_kernel_available(self.device):
            raise InvalidConfigError(f"residual='gated' needs Triton for device {self.device}")
        # How a residual plane runs for a routed token: a conditional graph node, the flag-reading
        # kernel, the product times the flag, or (eager, CPU) a Python branch.
        self.residual = residual
        # The router as one kernel per layer (kernels/route.py): by default wherever the step is
        # captured and Triton runs.
        if fused_router is None:
            fused_router = self.capture and route_kernel_available(self.device)
        if fused_router and not route_kernel_available(self.device):
            raise InvalidConfigError(f"fused_router=True needs Triton for device {self.device}")
        self.fused_router = fused_router
        self.branch_mode = "eager"
        self._graph = None
        self._step: DecodeStep | None = None
        self._captured_for = None

    def _default_residual(self) -> str:
        if not self.capture:
            return "eager"
        if conditional_nodes_available():
            return "conditional"
        return "gated" if gated_kernel_available(self.device) else "masked"

    def _prepare(self, router: TokenRouter) -> DecodeStep:
        """Build (and capture) the step for the current cache and routing mode, once each."""
        policies = tuple(m.policy.always_planes for m in self.model.modules() if isinstance(m, TapLinear))
        key = (router.mode, router.fixed_tier_index, policies)
        if self._step is not None and self._step.cache is self.fast.cache and self._captured_for == key:
            return self._step
        for tensor in self.fast.cache.keys + self.fast.cache.values:
            tensor.zero_()  # masked slots must hold numbers: 0 x NaN would leak into attention
        device_router = DeviceRouter(router, self.fast.config.hidden_size, self.device)
        if self.fused_router:
            device_router.use_fused_kernel()
        step = DecodeStep(self.fast, device_router, self.device)
        step.gated = self.residual == "gated"
        self._graph = None
        if self.capture:
            self._graph = self._capture(step)
        else:
            self.branch_mode = "gated" if step.gated else "eager"
        self._step, self._captured_for = step, key
        return step

    def _capture(self, step: DecodeStep) -> "torch.cuda.CUDAGraph":
        saved = [t.clone() for t in step.state()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step.branches = _AlwaysBranches()
            for _ in range(2):  # every kernel and the allocator's pools, outside the capture
                step.run()
        torch.cuda.current_stream().wait_stream(side)
        for tensor, value in zip(step.state(), saved):
            tensor.copy_(value)
        kinds = {"conditional": [_ConditionalBranches, _MaskedBranches], "gated": [_GatedBranches]}.get(self.residual, [_MaskedBranches])
        for kind in kinds:
            graph = torch.cuda.CUDAGraph()
            step.branches = kind(graph)
            try:
                with torch.cuda.graph(graph):
                    step.run()
            except RuntimeError as error:
                if kind is _MaskedBranches:
                    raise
                # e.g. a driver or CUDA runtime older than 12.4 under a torch that has the API.
                _log.warning("CUDA graph conditional nodes failed (%s); residual planes run masked", error)
                continue
            break
        self.branch_mode = step.branches.mode
        torch.cuda.synchronize()
        return graph

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | list[int] | None = None, **unused) -> DecodeResult:
        """Greedy continuation of ``input_ids`` (1, prompt); the host reads the tokens back once
        at the end, or once per token when a stop id is set."""
        if unused.get("do_sample"):
            raise InvalidConfigError("the graph step picks greedily; use decode='fast' to sample")
        router = self.model.tap_router
        if eos_token_id is None:
            eos_token_id = getattr(self.model.generation_config, "eos_token_id", None)
        stops = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        prompt_length = input_ids.shape[1]
        dtype = self.fast.body.embed_tokens(input_ids[:, :1]).dtype
        self.fast._allocate(prompt_length + max_new_tokens, dtype, input_ids.device)
        with torch.inference_mode():
            step = self._prepare(router)
            start = time.perf_counter()
            logits = self.fast.forward(input_ids, 0)
            token = int(torch.argmax(logits))
            first = time.perf_counter()
            new_ids = [token]
            if token in stops or max_new_tokens <= 1:
                return DecodeResult(new_ids, start, first, time.perf_counter())
            step.router.load_state()
            step.token.fill_(token)
            step.position.fill_(prompt_length)
            remaining = max_new_tokens - 1
            position = prompt_length
            try:
                while remaining:
                    chunk = 1 if stops else remaining
                    for _ in range(chunk):
                        self._graph.replay() if self._graph is not None else step.run()
                    picked = step.picked[position : position + chunk].tolist()
                    position += chunk
                    remaining -= chunk
                    new_ids.extend(picked)
                    if stops and picked[-1] in stops:
                        break
            finally:
                step.router.store_state()
        return DecodeResult(new_ids, start, first, time.perf_counter())
