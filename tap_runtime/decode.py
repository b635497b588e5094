"""A lean decode loop for Llama-family and Gemma 3 models: static KV cache, little per-step overhead.

At batch 1 a 4-bit model reads so few weight bytes per token that transformers' own generate
loop (dynamic cache growth by concatenation, logits processors, output bookkeeping, module
hooks) costs more than the matmuls: on SmolLM2-135M about two thirds of each decode step was
framework overhead, not kernel time. This loop runs the same modules (the TAP linears with
their routing, the model's own norms and rotary embedding) in a plain schedule:

- the KV cache is allocated once for prompt + new tokens and written in place;
- every layer's input norm still fires the router's hook, so routing is exactly the eager one;
- only the last position goes through the final norm and the output head.

Architectures outside :data:`FAST_DECODE_MODEL_TYPES`, batches above 1 and generation options
this loop does not implement fall back to transformers' ``generate`` (the eager path, also
kept for debugging with ``decode="eager"``); :func:`fast_decode_unsupported` says why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .dense_mlp import dense_mlp_forward
from .errors import InvalidConfigError
from .kernels.cpu import aligned
from .kernels.native import native_kernels
from .kernels.base import SplitPlane
from .kernels.vnni import _EVEN, ALL_WIDE, TiledPlane
from .kv_cache import KV_CACHE_KINDS, StaticKVCache, make_kv_cache
from .prefill_attention import attend_prompt, is_plain_causal
from .rotation import rotate_input
from .router import ALL_TOKENS


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

__all__ = ["FAST_DECODE_MODEL_TYPES", "FastDecoder", "DecodeResult", "fast_decode_unsupported", "SAMPLING_OPTIONS"]

# Decoder layers of the form norm -> q/k/v -> rotary -> attention -> o, norm -> gate/up -> down;
# Gemma 3 adds q/k norms, norms after attention and around the MLP, and sliding-window layers.
FAST_DECODE_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma3_text")
_INT4_MM = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)

# generate() options the loop implements; anything else goes to transformers' generate.
SAMPLING_OPTIONS = frozenset({"do_sample", "temperature", "top_k", "top_p", "pad_token_id", "eos_token_id", "seed"})


def _float32(x: torch.Tensor) -> torch.Tensor:
    """x as contiguous float32, without a dispatch when it already is."""
    return x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def fast_decode_unsupported(model: nn.Module, batch: int, options: dict[str, Any], max_length: int) -> str | None:
    """Why the lean loop cannot run this request (None when it can)."""
    config = _text_config(model)
    if config.model_type not in FAST_DECODE_MODEL_TYPES:
        return f"model type {config.model_type!r} is not in the lean loop ({', '.join(FAST_DECODE_MODEL_TYPES)})"
    if batch != 1:
        return f"batch {batch}: the lean loop decodes one sequence"
    unknown = sorted(set(options) - SAMPLING_OPTIONS)
    if unknown:
        return f"generate options {unknown} are transformers-only"
    if config.model_type == "gemma3_text":
        if getattr(config, "use_bidirectional_attention", False) or getattr(config, "attn_logit_softcapping", None):
            return "bidirectional attention and attention-logit soft-capping are not in the lean loop"
        return None
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return "sliding-window layers are not in the lean loop for this family"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and max_length > window:
        return f"{max_length} positions exceed the sliding window of {window}"
    return None


class FusedProjection:
    """Several TAP linears that read the same input (q/k/v or gate/up) run as one matmul per plane.

    The kernel stacks their packed planes once and hands each module a view into the stack, so
    the eager path keeps working and no weight is held twice. Routing is per layer, so the
    modules share it; if their tiers ever differ (``set_min_tiers``) they run one by one again.
    """

    def __init__(self, modules: list, prepared: list, bias: torch.Tensor | None):
        self.modules = modules
        self.prepared = prepared
        self.bias = bias
        self.sizes = [m.out_features for m in modules]
        self.out_features = sum(self.sizes)

    @classmethod
    def build(cls, modules: list) -> "FusedProjection | None":
        """Stack the modules' planes, or return the stack an earlier build made for these very
        modules (their planes are views into it by now, which cannot be stacked again)."""
        from .layers import TapLinear

        if not all(isinstance(m, TapLinear) and m.kernel is not None for m in modules):
            return None
        earlier = getattr(modules[0], "_fused_projection", None)
        if earlier is not None and len(earlier.modules) == len(modules) and all(a is b for a, b in zip(earlier.modules, modules)):
            return earlier
        if any(getattr(m, "tap_offloaded", False) for m in modules):
            return None  # its planes arrive per call through the offload hook
        kernel = modules[0].kernel
        fuse = getattr(kernel, "fuse_planes", None)
        if fuse is None or any(m.kernel is not kernel or m.routing is not modules[0].routing for m in modules):
            return None
        if len({len(m._prepared) for m in modules}) != 1 or len({m.in_features for m in modules}) != 1:
            return None
        if len({m.policy.input_rotation for m in modules}) != 1:
            return None  # one stacked product reads one rotated input
        from .residency import LazyPlane

        fused_planes, views = [], []
        for plane_index in range(len(modules[0]._prepared)):
            parts = [m._prepared[plane_index] for m in modules]
            if any(type(p) is LazyPlane for p in parts):
                break  # memory-efficient mode: planes from here on are packed on demand, per module
            done = fuse(parts)
            if done is None:
                return None
            fused_planes.append(done[0])
            views.append(done[1])
        if not fused_planes:
            return None
        for plane_index, parts in enumerate(views):
            for module, view in zip(modules, parts):
                module._prepared[plane_index] = view
        bias = None
        present = [m.bias for m in modules if m.bias is not None]
        if present:
            like = present[0]
            bias = torch.cat([m.bias if m.bias is not None else like.new_zeros(m.out_features) for m in modules])
        fused = cls(modules, fused_planes, bias)
        # Kept on the module (outside nn.Module's registries) for the next decoder built on it.
        modules[0]._fused_projection = fused
        return fused

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        from .layers import run_planes

        first = self.modules[0]
        always = {m.policy.always_planes for m in self.modules}
        if len(always) != 1:
            return [m(x) for m in self.modules]
        stacked = len(self.prepared)
        if stacked < len(first._prepared):
            # Planes past the stack (left in the mapped file) run per module when anyone needs them.
            routing = first.routing
            if first.policy.always_planes > stacked or (routing is not None and routing.indices_for_plane(stacked) is not None):
                return [m(x) for m in self.modules]
        out = run_planes(
            x, first.kernel, self.prepared, first.policy.always_planes, first.routing, self.bias, self.out_features,
            rotation=first.policy.input_rotation,
        )
        return list(out.split(self.sizes, dim=-1))

    @property
    def rotation(self) -> int:
        """The Hadamard block of the stacked planes' input (the same for every module)."""
        return self.modules[0].policy.input_rotation


@dataclass(frozen=True)
class _NativeLayer:
    """One layer's tensors and modules for a native step (see FastDecoder._forward_native_step)."""

    input_norm: torch.Tensor
    input_eps: float
    post_norm: torch.Tensor
    post_eps: float
    scaling: float
    o_proj: nn.Module
    down_proj: nn.Module
    qkv: "FusedProjection | None"
    gate_up: "FusedProjection | None"
    qkv_modules: tuple
    gate_up_modules: tuple
    direct: "DirectDecodeLayer"
    body: "_NativeBody | None" = None


class _NativeBody:
    """One layer's planes flattened for the native ``decode_layer`` call: per projection (q/k/v,
    o, gate/up, down) its stored planes' tensors and layout numbers, its bias, and the modules
    whose policies say how many planes every token reads. Built only where every plane of the
    layer is a TAP-kernel plane and q/k/v and gate/up are stacked."""

    __slots__ = ("projections",)

    def __init__(self, projections: tuple):
        self.projections = projections  # 4 x (tensors, meta, bias, modules, input rotation block)

    @classmethod
    def build(cls, qkv: "FusedProjection | None", o_proj: nn.Module, gate_up: "FusedProjection | None", down_proj: nn.Module) -> "_NativeBody | None":
        if qkv is None or gate_up is None:
            return None
        parts = []
        for planes, bias, modules in (
            (qkv.prepared, qkv.bias, qkv.modules),
            (o_proj._prepared, o_proj.bias, (o_proj,)),
            (gate_up.prepared, gate_up.bias, gate_up.modules),
            (down_proj._prepared, down_proj.bias, (down_proj,)),
        ):
            if any(type(plane) is not TiledPlane for plane in planes) or len(planes) != len(modules[0]._prepared):
                return None  # torch's kernel, or planes left in the mapped file
            if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
                return None
            tensors = [
                t for plane in planes for t in (plane.weight, plane.scales, plane.zeros, plane.levels if plane.levels is not None else _EVEN)
            ]
            meta = [n for plane in planes for n in (plane.group_size, plane.first_row, plane.out_features)]
            parts.append((tensors, meta, bias, tuple(modules), modules[0].policy.input_rotation))
        return cls(tuple(parts))

    def planes_used(self, direct: "DirectDecodeLayer") -> list[int] | None:
        """Planes each projection reads for this step's token (DirectDecodeLayer.planes_used's
        rule, in plain loops: this runs for every layer of every step), or None where the module
        path must decide (the stacked modules' tiers differ, or the routing is not one token)."""
        routed = 0
        for entry in direct.routing.plane_indices if direct.routing is not None else ():
            if entry is ALL_TOKENS:
                routed += 1
            elif entry is None:
                break
            else:
                return None
        used = []
        for tensors, _, _, modules, _ in self.projections:
            always = modules[0].policy.always_planes
            for module in modules[1:]:
                if module.policy.always_planes != always:
                    return None
            used.append(min(len(tensors) // 3, max(always, 1 + routed)))
        return used


class DirectDecodeLayer:
    """One layer's packed planes for a decode step that calls torch's int4 op directly.

    At one token per step the matmuls are a few microseconds each and the layers of Python
    around them (module calls, FusedProjection, run_planes, the kernel wrapper, dtype and
    alignment checks) cost as much; this path does the same operations in the same order, so
    outputs are bitwise those of the module path. Built only for the CPU kernel with every plane
    packed (not memory-efficient mode's lazily read planes, not offloaded ones) and stacked.
    """

    __slots__ = ("qkv", "o_proj", "gate_up", "down_proj", "routing", "kernel")

    def __init__(self, qkv: list, o_proj, gate_up: list, down_proj):
        # qkv / gate_up: [FusedProjection] when stacked, else the modules one by one.
        self.qkv, self.o_proj, self.gate_up, self.down_proj = qkv, o_proj, gate_up, down_proj
        self.routing = o_proj.routing
        # Whose activation rule a token that reads the base plane alone follows (see
        # CpuVnniKernel.base_wide_above); read at each call, so a change after the decoder was
        # built takes effect.
        self.kernel = o_proj.kernel

    @classmethod
    def build(cls, layer: nn.Module, qkv: FusedProjection | None, gate_up: FusedProjection | None) -> "DirectDecodeLayer | None":
        from .kernels.cpu import CpuPackedKernel, _PackedPlane
        from .kernels.vnni import CpuVnniKernel
        from .layers import TapLinear

        attention, mlp = layer.self_attn, layer.mlp
        singles = [attention.o_proj, mlp.down_proj]
        qkv_modules = qkv.modules if qkv is not None else [attention.q_proj, attention.k_proj, attention.v_proj]
        gate_up_modules = gate_up.modules if gate_up is not None else [mlp.gate_proj, mlp.up_proj]
        modules = qkv_modules + gate_up_modules + singles
        if not all(isinstance(m, TapLinear) and type(m.kernel) in (CpuPackedKernel, CpuVnniKernel) for m in modules):
            return None
        if any(getattr(m, "tap_offloaded", False) or m.routing is not singles[0].routing for m in modules):
            return None
        for group in (qkv, gate_up):
            if group is not None and len(group.prepared) != len(group.modules[0]._prepared):
                return None  # some planes are not stacked (memory-efficient mode): the module path handles them
        if not all(type(p) in (_PackedPlane, TiledPlane, SplitPlane) for m in modules for p in m._prepared):
            return None
        return cls([qkv] if qkv is not None else qkv_modules, singles[0], [gate_up] if gate_up is not None else gate_up_modules, singles[1])

    def planes_used(self, always: int, available: int) -> int | None:
        """How many planes this step's token reads (run_planes' rule); None: not one whole token."""
        used = always
        indices = self.routing.plane_indices if self.routing is not None else []
        while used < available:
            entry = indices[used - 1] if used - 1 < len(indices) else None
            if entry is None:
                break
            if entry is not ALL_TOKENS:
                return None
            used += 1
        return used

    @staticmethod
    def plane_product(flat: torch.Tensor, plane, wide_above: float = ALL_WIDE) -> torch.Tensor:
        """(1, in) float32 times one packed plane, straight into the kernel's op (TAP's VNNI
        kernel answers in float32, its activations at 15 or 8 bits per block as ``wide_above``
        says; torch's int4 op in bfloat16)."""
        if type(plane) is SplitPlane:  # a level table on torch's kernel: the sum of its even parts
            high, low = (DirectDecodeLayer.plane_product(flat, part, wide_above) for part in plane.parts)
            return high.to(torch.float32) + low.to(torch.float32)
        if type(plane) is TiledPlane:
            return native_kernels().matmul_w4(
                flat, plane.weight, plane.scales, plane.zeros, plane.group_size, wide_above, plane.first_row, plane.out_features,
                plane.levels,
            )
        out = _INT4_MM(aligned(flat.to(torch.bfloat16)), plane.packed, plane.group_size, plane.scale_and_zero)
        return out[:, : plane.out_features] if out.shape[-1] != plane.out_features else out

    def project(
        self, x: torch.Tensor, planes: list, used: int, bias: torch.Tensor | None, out_features: int, rotation: int = 0
    ) -> torch.Tensor:
        """run_planes for one token (x: (1, in) in the compute dtype), without the wrappers."""
        # dtype checks before .to(): each no-op .to() still costs a microsecond of dispatch.
        flat = _float32(x)
        if rotation:
            flat = rotate_input(flat, rotation)
        out = self.plane_product(flat, planes[0], ALL_WIDE if used > 1 else getattr(self.kernel, "base_wide_above", ALL_WIDE))
        if used > 1:
            out = out.to(torch.float32)
            for plane in planes[1:used]:
                out += self.plane_product(flat, plane)
        if bias is not None:
            out = out + bias
        return (out if out.dtype == x.dtype else out.to(x.dtype)).reshape(1, 1, out_features)

    def stacked(self, parts: list, x: torch.Tensor) -> torch.Tensor | None:
        """q/k/v or gate/up for one token as one (1, 1, total) output, from their stacked planes;
        None when they are not stacked or their tiers differ."""
        if len(parts) != 1 or not isinstance(parts[0], FusedProjection):
            return None
        fused = parts[0]
        always = fused.modules[0].policy.always_planes
        for module in fused.modules:
            if module.policy.always_planes != always:
                return None  # their tiers differ (set_min_tiers)
        used = self.planes_used(always, len(fused.prepared))
        if used is None:
            return None
        return self.project(x.reshape(1, -1), fused.prepared, used, fused.bias, fused.out_features, fused.rotation)

    def group(self, parts: list, x: torch.Tensor) -> list[torch.Tensor] | None:
        """q/k/v or gate/up for one token: one stacked matmul per plane, or one per module."""
        if len(parts) == 1 and isinstance(parts[0], FusedProjection):
            out = self.stacked(parts, x)
            return None if out is None else list(out.split(parts[0].sizes, dim=-1))
        outputs = [self.single(module, x) for module in parts]
        return None if any(o is None for o in outputs) else outputs

    def single(self, module, x: torch.Tensor) -> torch.Tensor | None:
        used = self.planes_used(module.policy.always_planes, len(module._prepared))
        if used is None:
            return None
        return self.project(x.reshape(1, -1), module._prepared, used, module.bias, module.out_features, module.policy.input_rotation)


@dataclass
class DecodeResult:
    """New token ids and the two timestamps the metrics need (perf_counter seconds)."""

    token_ids: list[int]
    start: float
    first_token_time: float
    end: float


class FastDecoder:
    """Prefill then decode one sequence with a static KV cache (see the module docstring)."""

    def __init__(self, model: nn.Module, kv_cache: str = "float"):
        config = _text_config(model)
        self.model = model
        self.config = config
        self.body = model.model
        self.layers = list(self.body.layers)
        self.gemma = config.model_type == "gemma3_text"
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * len(self.layers))
        self.layer_types = layer_types
        # Gemma 3: a sliding layer's query sees only the last `sliding_window` positions.
        self.windows = [config.sliding_window if self.gemma and kind == "sliding_attention" else None for kind in layer_types]
        self.softcap = getattr(config, "final_logit_softcapping", None) if self.gemma else None
        if kv_cache not in KV_CACHE_KINDS:
            raise InvalidConfigError(f"kv_cache={kv_cache!r} is unknown; expected one of {list(KV_CACHE_KINDS)}.")
        self.kv_cache_kind = kv_cache
        self.cache: StaticKVCache | None = None
        self.fused: list[tuple] = []
        for layer in self.layers:
            attention, mlp = layer.self_attn, layer.mlp
            qkv = FusedProjection.build([attention.q_proj, attention.k_proj, attention.v_proj])
            gate_up = FusedProjection.build([mlp.gate_proj, mlp.up_proj])
            self.fused.append((qkv, gate_up))
        # Llama-family RMSNorms as one torch op (same arithmetic: x * rsqrt(mean(x^2) + eps) * w);
        # the input norm's router hook is then called here, as the module would.
        self.direct_norms = not self.gemma and all(
            hasattr(norm, "variance_epsilon") and getattr(norm, "weight", None) is not None and not norm._forward_pre_hooks
            # The input norm carries the router's hook and nothing else; the other norm none.
            and len(norm._forward_hooks) == (1 if norm is layer.input_layernorm else 0)
            for layer in self.layers
            for norm in (layer.input_layernorm, layer.post_attention_layernorm)
        )
        # Decode steps (one token) skip the module wrappers where every plane is packed on the CPU.
        self.direct = [DirectDecodeLayer.build(layer, qkv, gate_up) for layer, (qkv, gate_up) in zip(self.layers, self.fused)]
        # ... and, where the native module is built, run each layer's small operations fused
        # (see _forward_native_step); False keeps the torch operators (for A/B and debugging).
        self.native_steps = self._native_steps_supported()
        # ... and, where every plane of a layer is a TAP-kernel plane, everything after the input
        # norm and the routing decision in one native call per layer (False: one call per stretch).
        self.native_layers = True

    def _native_steps_supported(self) -> bool:
        """Llama-family layers (SiLU MLP, RMSNorms, rotate-half rotary) on the direct path, with
        float32 norms on the CPU."""
        if native_kernels() is None or self.gemma or not self.direct_norms or getattr(self.config, "hidden_act", None) != "silu":
            return False
        plan = []
        for layer, direct, (qkv, gate_up) in zip(self.layers, self.direct, self.fused):
            attention, mlp = layer.self_attn, layer.mlp
            sizes = [m.out_features for m in (attention.q_proj, attention.k_proj, attention.v_proj)]
            if direct is None or sizes != [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2:
                return False
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if any(n.weight.dtype != torch.float32 or n.weight.device.type != "cpu" for n in norms):
                return False
            # Everything a step needs, looked up once: nn.Module attribute access costs about a
            # microsecond each, some twenty per layer and step.
            plan.append(_NativeLayer(
                norms[0].weight, norms[0].variance_epsilon, norms[1].weight, norms[1].variance_epsilon, attention.scaling,
                attention.o_proj, mlp.down_proj, qkv, gate_up, (attention.q_proj, attention.k_proj, attention.v_proj),
                (mlp.gate_proj, mlp.up_proj), direct,
                _NativeBody.build(qkv, attention.o_proj, gate_up, mlp.down_proj) if hasattr(native_kernels(), "decode_layer") else None,
            ))
        self._native_plan = plan
        return True

    @staticmethod
    def _rotate(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' apply_rotary_pos_emb, with ``cos``/``sin`` already unsqueezed to
        (1, 1, T, head_dim) once per step rather than once per layer."""
        return (query * cos) + (_rotate_half(query) * sin), (key * cos) + (_rotate_half(key) * sin)

    # ----- cache ---------------------------------------------------------------------------
    def use_kv_cache(self, kind: str) -> None:
        """Switch the cache kind (``float`` or ``int8``); the next call allocates the new one."""
        if kind not in KV_CACHE_KINDS:
            raise InvalidConfigError(f"kv_cache={kind!r} is unknown; expected one of {list(KV_CACHE_KINDS)}.")
        if kind != self.kv_cache_kind:
            self.kv_cache_kind, self.cache = kind, None

    def _allocate(self, max_length: int, dtype: torch.dtype, device: torch.device) -> None:
        if self.cache is not None and self.cache.fits(max_length, dtype, device):
            return  # the cache from the last call is long enough; positions are overwritten
        self.cache = make_kv_cache(self.kv_cache_kind, len(self.layers), self.num_kv_heads, max_length, self.head_dim, dtype, device)

    def _rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin per layer type, unsqueezed once for the heads dimension (not once per layer)."""
        if self.gemma:
            tables = {kind: self.body.rotary_emb(hidden, positions, kind) for kind in set(self.layer_types)}
        else:
            tables = {kind: self.body.rotary_emb(hidden, positions) for kind in set(self.layer_types)}
        return {kind: (cos.unsqueeze(1), sin.unsqueeze(1)) for kind, (cos, sin) in tables.items()}

    @staticmethod
    def _mask(start: int, end: int, window: int | None, device: torch.device) -> tuple[int, torch.Tensor | None, bool]:
        """(first key position, boolean mask or None, is_causal) for queries start..end-1."""
        count = end - start
        first_key = 0 if window is None else max(0, end - count - window + 1)
        if count == 1:
            return first_key, None, False  # one query sees every key in [first_key, end)
        if first_key == 0 and start == 0 and window is None:
            return 0, None, True
        queries = torch.arange(start, end, device=device).unsqueeze(1)
        keys = torch.arange(first_key, end, device=device).unsqueeze(0)
        visible = keys <= queries
        if window is not None:
            visible &= keys > queries - window
        return first_key, visible, False

    # ----- one forward over new positions ----------------------------------------------------
    def forward(self, input_ids: torch.Tensor, start: int, all_logits: bool = False) -> torch.Tensor:
        """Logits (vocab,) of the last of ``input_ids`` (1, T), which sit at positions start..;
        with ``all_logits``, (T, vocab) for every position (for measuring the cache's effect)."""
        count = input_ids.shape[1]
        end = start + count
        device = input_ids.device
        positions = torch.arange(start, end, device=device).unsqueeze(0)
        router = getattr(self.model, "tap_router", None)
        if router is not None:
            router.begin_forward(input_ids, positions.cpu())
        hidden = self.body.embed_tokens(input_ids)
        if count == 1 and self.native_steps and hidden.dtype == torch.float32 and type(self.cache) is StaticKVCache:
            return self._forward_native_step(hidden, positions, start, router, all_logits)
        rotary = self._rotary(hidden, positions)
        masks = {window: self._mask(start, end, window, device) for window in set(self.windows)}
        cache = self.cache
        direct_norms = self.direct_norms and hidden.dtype == torch.float32
        hidden_shape = (hidden.shape[-1],)
        layers = zip(range(len(self.layers)), self.layers, self.fused, self.direct, self.layer_types, self.windows)
        for index, layer, (qkv, gate_up), direct, kind, window in layers:
            attention = layer.self_attn
            if direct_norms:
                normed = F.rms_norm(hidden, hidden_shape, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
                if router is not None:
                    router.route_layer(index, hidden, normed)  # what the norm's hook does
            else:
                normed = layer.input_layernorm(hidden)  # fires the router's hook for this layer
            if count != 1:
                direct = None
            projected = direct.group(direct.qkv, normed) if direct is not None else None
            if projected is not None:
                query, key, value = projected
            elif qkv is not None:
                query, key, value = qkv(normed)
            else:
                query, key, value = attention.q_proj(normed), attention.k_proj(normed), attention.v_proj(normed)
            query = query.view(1, count, self.num_heads, self.head_dim).transpose(1, 2)
            key = key.view(1, count, self.num_kv_heads, self.head_dim).transpose(1, 2)
            value = value.view(1, count, self.num_kv_heads, self.head_dim).transpose(1, 2)
            if self.gemma:
                query, key = attention.q_norm(query), attention.k_norm(key)
            cos, sin = rotary[kind]
            query, key = self._rotate(query, key, cos, sin)
            cache.write(index, start, key, value)
            first_key, mask, causal = masks[window]
            keys, values = cache.read(index, first_key, end)
            # A whole prompt from position 0 (in a sliding layer: the window's own pattern).
            plain = causal and mask is None or (
                first_key == 0 and start == 0 and mask is not None and is_plain_causal(mask, count, window or 0)
            )
            attended = attend_prompt(query, keys, values, attention.scaling, window or 0) if plain else None
            if attended is None:
                attended = F.scaled_dot_product_attention(
                    query,
                    keys,
                    values,
                    attn_mask=mask,
                    is_causal=causal,
                    scale=attention.scaling,
                    enable_gqa=self.num_kv_heads != self.num_heads,
                ).transpose(1, 2)
            attended = attended.reshape(1, count, -1)
            out = direct.single(attention.o_proj, attended) if direct is not None else None
            attended = out if out is not None else attention.o_proj(attended)
            mlp = layer.mlp
            if self.gemma:
                hidden = hidden + layer.post_attention_layernorm(attended)
                normed = layer.pre_feedforward_layernorm(hidden)
            else:
                hidden = hidden + attended
                norm = layer.post_attention_layernorm
                normed = F.rms_norm(hidden, hidden_shape, norm.weight, norm.variance_epsilon) if direct_norms else norm(hidden)
            out = dense_mlp_forward(mlp, normed) if count > 1 and getattr(mlp, "tap_dense_mlp", False) else None
            if out is None:
                projected = direct.group(direct.gate_up, normed) if direct is not None else None
                if projected is None:
                    projected = gate_up(normed) if gate_up is not None else (mlp.gate_proj(normed), mlp.up_proj(normed))
                gate, up = projected
                activated = mlp.act_fn(gate) * up
                out = direct.single(mlp.down_proj, activated) if direct is not None else None
                if out is None:
                    out = mlp.down_proj(activated)
            hidden = hidden + (layer.post_feedforward_layernorm(out) if self.gemma else out)
        last = self.body.norm(hidden if all_logits else hidden[:, -1:])
        logits = self.model.lm_head(last).reshape(-1) if not all_logits else self.model.lm_head(last)[0]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _forward_native_step(self, hidden: torch.Tensor, positions: torch.Tensor, start: int, router, all_logits: bool) -> torch.Tensor:
        """One decode token (hidden (1, 1, size) float32) with each layer's norms, rotary, cache
        write, attention, SiLU and residual adds in four native calls around its four matmuls.

        The torch operators in between cost about 8 ms of a 45 ms step on Qwen2.5-1.5B (some forty
        calls per layer); the arithmetic is the same, in another summation order, so results match
        the operator path to float32 rounding (tests/tap_runtime/test_decode.py).
        """
        native = native_kernels()
        hidden = hidden.clone()  # updated in place below; the embedding's output may be shared
        cos, sin = self.body.rotary_emb(hidden, positions)
        cos, sin = cos.reshape(-1).to(torch.float32).contiguous(), sin.reshape(-1).to(torch.float32).contiguous()
        cache = self.cache
        pending = None  # the last layer's MLP output, added to hidden by the next norm
        heads, kv_heads = self.num_heads, self.num_kv_heads
        whole_layers = self.native_layers
        for index, step in enumerate(self._native_plan):
            direct = step.direct
            normed = native.add_rms_norm(hidden, pending, step.input_norm, step.input_eps)
            if router is not None:
                router.route_layer(index, hidden, normed)
            body = step.body if whole_layers else None
            used = body.planes_used(direct) if body is not None else None
            if used is not None:
                # The rest of the layer in one native call (same arithmetic, same order).
                (qkv, qkv_meta, qkv_bias, _, qkv_rot), (o, o_meta, o_bias, _, o_rot), (gu, gu_meta, gu_bias, _, gu_rot), (dn, dn_meta, dn_bias, _, dn_rot) = body.projections
                pending = native.decode_layer(
                    hidden, normed, qkv, qkv_meta, used[0], qkv_bias, o, o_meta, used[1], o_bias, gu, gu_meta, used[2], gu_bias,
                    dn, dn_meta, used[3], dn_bias, getattr(direct.kernel, "base_wide_above", ALL_WIDE), cos, sin,
                    cache.keys[index], cache.values[index], start, heads, kv_heads, step.scaling, step.post_norm, step.post_eps,
                    [qkv_rot, o_rot, gu_rot, dn_rot],
                )
                continue
            projected = self._joined(direct, direct.qkv, step.qkv, step.qkv_modules, normed)
            attended = native.attend_one(projected, cos, sin, cache.keys[index], cache.values[index], start, 0, heads, kv_heads, step.scaling)
            out = direct.single(step.o_proj, attended)
            if out is None:
                out = step.o_proj(attended.view(1, 1, -1))
            normed = native.add_rms_norm(hidden, _float32(out), step.post_norm, step.post_eps)
            projected = self._joined(direct, direct.gate_up, step.gate_up, step.gate_up_modules, normed)
            activated = native.silu_mul(projected)
            pending = direct.single(step.down_proj, activated)
            if pending is None:
                pending = step.down_proj(activated.view(1, 1, -1))
            pending = _float32(pending)
        hidden += pending.view_as(hidden)
        logits = self.model.lm_head(self.body.norm(hidden))
        logits = logits[0] if all_logits else logits.reshape(-1)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @staticmethod
    def _joined(direct: DirectDecodeLayer, parts: list, fused: FusedProjection | None, modules: tuple, x: torch.Tensor) -> torch.Tensor:
        """q/k/v or gate/up of one token as one float32 (1, total): stacked, else one by one."""
        out = direct.stacked(parts, x)
        if out is None:
            pieces = direct.group(parts, x)
            if pieces is None:
                pieces = fused(x) if fused is not None else [m(x) for m in modules]
            out = torch.cat(pieces, dim=-1)
        return _float32(out)

    # ----- generation ----------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        seed: int | None = None,
        pad_token_id: int | None = None,  # accepted for parity with generate(); one sequence needs none
    ) -> DecodeResult:
        """Greedy or sampled continuation of ``input_ids`` (1, prompt), at most ``max_new_tokens``."""
        del pad_token_id
        if eos_token_id is None:
            eos_token_id = getattr(self.model.generation_config, "eos_token_id", None)
        stops = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        generator = None
        if do_sample and seed is not None:
            generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        prompt_length = input_ids.shape[1]
        dtype = self.body.embed_tokens(input_ids[:, :1]).dtype
        self._allocate(prompt_length + max_new_tokens, dtype, input_ids.device)
        new_ids: list[int] = []
        start = time.perf_counter()
        first = start
        with torch.inference_mode():
            logits = self.forward(input_ids, 0)
            position = prompt_length
            for step in range(max_new_tokens):
                token = self._pick(logits, do_sample, temperature, top_k, top_p, generator)
                new_ids.append(token)
                if step == 0:
                    first = time.perf_counter()
                if token in stops or step == max_new_tokens - 1:
                    break
                logits = self.forward(torch.tensor([[token]], device=input_ids.device), position)
                position += 1
        return DecodeResult(new_ids, start, first, time.perf_counter())

    @staticmethod
    def _pick(logits, do_sample, temperature, top_k, top_p, generator) -> int:
        if not do_sample:
            return int(torch.argmax(logits))
        scores = logits.to(torch.float32) / max(float(temperature), 1e-5)
        if top_k:
            kth = torch.topk(scores, min(int(top_k), scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
            # Drop a token once the ones before it already cover top_p (the first always stays).
            drop = (cumulative - torch.softmax(ordered, dim=-1)) > top_p
            scores = scores.index_fill(0, order[drop], float("-inf"))
        return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))
