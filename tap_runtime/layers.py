"""Modules that replace a model's linears, embeddings and output head with quantized ones.

Their parameters carry the checkpoint's tensor names (``weight``, ``weight_scales``, ...), so
transformers' own loader fills them straight from the safetensors shards. After loading,
:meth:`prepare` hands the portable planes to a kernel, which keeps its own packed layout, and
drops the portable copies.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .format import (
    EmbeddingPolicy,
    LinearPolicy,
    embedding_tensor_suffix,
    plane_tensor_suffix,
)
from .kernels import Kernel, ReferenceKernel
from .pages import page_out
from .planes import Plane, RowQuantized
from .offload import HostPlane
from .residency import LazyPlane, ResidualPlaneCache
from .rotation import rotate_input
from .router import ALL_TOKENS, LayerRouting

__all__ = ["TapLinear", "TapEmbedding", "TapHead", "RoutedRows", "run_planes"]


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


def _plane_shapes(policy: LinearPolicy, plane_index: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    spec = policy.planes[plane_index]
    groups = policy.in_features // spec.group_size
    shapes = {
        "qweight": ((policy.out_features, policy.in_features // 2), torch.uint8),
        "scales": ((policy.out_features, groups), spec.scale_dtype),
        "zeros": ((policy.out_features, groups), spec.zero_dtype),
        "scale_reference": ((1,), torch.float32),
    }
    return {name: shapes[name] for name in spec.fields}


_RESOLVED_ON_USE = (LazyPlane, HostPlane)


def _packed(prepared):
    """A kernel-ready plane; a residual plane left in the mapped file is packed (or found) now,
    one left in host memory by offloading is copied to the device now."""
    return prepared.resolve() if type(prepared) in _RESOLVED_ON_USE else prepared


@dataclass(frozen=True)
class RoutedRows:
    """Rows ``indices`` of a product, in float32, that replace the same rows of a bfloat16 one."""

    indices: torch.Tensor
    rows: torch.Tensor

    def into(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` in float32 with these rows written in."""
        return out.to(torch.float32).index_copy_(0, self.indices, self.rows)


def run_planes(
    x: torch.Tensor,
    kernel: Kernel,
    prepared: list,
    always_planes: int,
    routing: LayerRouting | None,
    bias: torch.Tensor | None,
    out_features: int,
    kernel_dtype: bool = False,
    rotation: int = 0,
    shared_rotation: "SharedInputRotation | None" = None,
) -> torch.Tensor:
    """x (..., in) through nested planes: the first ``always_planes`` for every token, the rest
    for the tokens ``routing`` sends there (gather their rows, multiply, scatter-add).

    ``kernel_dtype``: return ``(out, routed)`` with out (tokens, out) as the products came out
    instead of x's dtype, for a caller whose next step reads either (see tap_runtime.dense_mlp):
    bfloat16 from a dense product, float32 where residual products were added to it. Where one
    residual plane serves a routed subset, out stays the bfloat16 base product and ``routed``
    holds those rows in float32 with their residual added (else None).

    ``rotation``: the Hadamard block of the planes' input (LinearPolicy.input_rotation); x is
    rotated once here, for every plane (or once for its siblings: ``shared_rotation``)."""
    leading = x.shape[:-1]
    if rotation and shared_rotation is not None:
        flat = shared_rotation.rows(x, rotation)
    else:
        flat = rotate_input(x.reshape(-1, x.shape[-1]), rotation)
    # Planes below min_tier serve every token; the router decides only above it.
    work = [(plane_index, ALL_TOKENS) for plane_index in range(1, always_planes)]
    if routing is not None:
        for plane_index in range(always_planes, len(prepared)):
            indices = routing.indices_for_plane(plane_index)
            if indices is None:
                break  # planes nest: nobody above this one either
            work.append((plane_index, indices))
    # Planes every token of this call reads: a many-token call on a kernel that can multiplies
    # once by their sum (unpacked together, rounded to bfloat16 once) instead of once per plane.
    shared = 1 + sum(1 for _ in itertools.takewhile(lambda item: item[1] is ALL_TOKENS, work))
    summed = getattr(kernel, "matmul_plane_sum", None)
    out = summed(flat, [_packed(p) for p in prepared[:shared]]) if shared > 1 and summed is not None else None
    if out is not None:
        work = work[shared - 1 :]
    else:
        base_product = getattr(kernel, "matmul_base", None)
        if base_product is not None:
            # Kernels that can spend fewer activation bits on a token that reads the base plane alone.
            out = base_product(flat, _packed(prepared[0]), alone=not work)
        else:
            out = kernel.matmul_plane(flat, _packed(prepared[0]))
    routed_product = getattr(kernel, "matmul_routed", None)

    def residual(rows: torch.Tensor, plane) -> torch.Tensor:
        return routed_product(rows, plane, flat.shape[0]) if routed_product is not None else kernel.matmul_plane(rows, plane)

    if kernel_dtype and out.dtype == torch.bfloat16 and len(work) == 1 and work[0][1] is not ALL_TOKENS:
        # A caller that reads bfloat16 (the dense MLP) gets the base product as it is and the
        # routed rows apart, base + residual in float32: widening the whole (tokens, out) matrix
        # for a tenth of its rows cost more than the residual product, and rounding the routed
        # rows to bfloat16 cost Qwen2.5-1.5B 2.4% of its KL (those are the tokens that matter).
        plane_index, indices = work[0]
        rows = out.index_select(0, indices).to(torch.float32)
        rows += residual(flat.index_select(0, indices), _packed(prepared[plane_index])).to(torch.float32)
        if bias is not None:
            out, rows = out + bias, rows + bias
        return out, RoutedRows(indices, rows)
    if work:
        # Residual planes are small corrections: add them in float32.
        out = out.to(torch.float32)
        routed_add = getattr(kernel, "matmul_routed_add", None)
        for plane_index, indices in work:
            plane = _packed(prepared[plane_index])
            if indices is ALL_TOKENS:
                out += kernel.matmul_plane(flat, plane)
            elif routed_add is None or not routed_add(flat, indices, plane, out):
                extra = residual(flat.index_select(0, indices), plane)
                out.index_add_(0, indices, extra.to(torch.float32))
    if bias is not None:
        out = out + bias
    if kernel_dtype:
        return out, None
    return out.to(x.dtype).reshape(*leading, out_features)


class TapLinear(nn.Module):
    """A linear layer stored as nested 4-bit planes; each token reads the planes of its tier.

    Every token goes through the base plane; the tokens the router sent higher also go through
    the residual plane(s): gather their rows, multiply, scatter-add into the output.
    """

    def __init__(self, policy: LinearPolicy):
        super().__init__()
        self.policy = policy
        self.in_features = policy.in_features
        self.out_features = policy.out_features
        for plane_index in range(len(policy.planes)):
            for field_name, (shape, dtype) in _plane_shapes(policy, plane_index).items():
                self.register_parameter(
                    plane_tensor_suffix(plane_index, field_name), _frozen(torch.empty(shape, dtype=dtype))
                )
        if policy.bias:
            self.bias = _frozen(torch.empty(policy.out_features, dtype=torch.float32))
        else:
            self.register_parameter("bias", None)
        self.routing: LayerRouting | None = None
        self.kernel: Kernel | None = None
        self._prepared: list = []
        # Set by share_input_rotations where siblings (q/k/v, gate/up) read one rotated input.
        self.shared_rotation: SharedInputRotation | None = None

    def planes(self) -> list[Plane]:
        """The portable planes as loaded, decoded (available until :meth:`prepare` releases them)."""
        return [
            Plane.from_stored(spec, {f: getattr(self, plane_tensor_suffix(i, f)).data for f in spec.fields})
            for i, spec in enumerate(self.policy.planes)
        ]

    def prepare(
        self,
        kernel: Kernel,
        keep_portable: bool = False,
        residual_cache: ResidualPlaneCache | None = None,
        residual_sources: list[tuple[Path, dict[str, str]]] | None = None,
    ) -> None:
        """Convert the planes to ``kernel``'s layout; free the portable copies unless asked not to.

        With ``residual_cache`` (memory-efficient mode) only the planes every token reads are
        packed now; plane i >= always_planes is read from ``residual_sources[i]`` (shard file,
        field -> tensor name) and packed when a routed token first needs it.
        """
        planes = self.planes()
        self.kernel = kernel
        if residual_cache is None:
            self._prepared = [kernel.prepare_plane(p) for p in planes]
        else:
            always = self.policy.always_planes
            self._prepared = [
                kernel.prepare_plane(p) if i < always else LazyPlane(p.spec, *residual_sources[i], residual_cache)
                for i, p in enumerate(planes)
            ]
        if not keep_portable:
            for plane_index, plane in enumerate(planes):
                for field_name in plane.spec.fields:
                    # The loaded tensor views the mapped shard: its pages can go now.
                    page_out(getattr(self, plane_tensor_suffix(plane_index, field_name)).data)
                    delattr(self, plane_tensor_suffix(plane_index, field_name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            raise RuntimeError("TapLinear used before prepare(); load the model with tap_runtime.load()")
        return run_planes(
            x, self.kernel, self._prepared, self.policy.always_planes, self.routing, self.bias, self.out_features,
            rotation=self.policy.input_rotation, shared_rotation=self.shared_rotation,
        )

    def products(self, x: torch.Tensor, input_rotated: bool = False) -> tuple[torch.Tensor, RoutedRows | None]:
        """forward() on (tokens, in) without the final cast: (bfloat16 or float32 (tokens, out),
        the routed rows kept apart in float32 or None); see run_planes' ``kernel_dtype``.
        ``input_rotated``: x is already x H (the caller applied the policy's input rotation)."""
        if self.kernel is None:
            raise RuntimeError("TapLinear used before prepare(); load the model with tap_runtime.load()")
        return run_planes(
            x, self.kernel, self._prepared, self.policy.always_planes, self.routing, self.bias, self.out_features, True,
            0 if input_rotated else self.policy.input_rotation,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tiers={list(self.policy.tiers)}"


# Sibling projections that the model's own forward calls one after another with one tensor.
SIBLING_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


class SharedInputRotation:
    """One rotation of an input that several sibling linears read (q, k and v; gate and up).

    Through the model's own forward each sibling would transform the same tensor again; the
    first one rotates it and holds the result until the others have taken it. A sibling uses it
    only when handed that very tensor object (held meanwhile, so its address cannot pass to
    another); the hold ends with the last sibling, or with the next rotation. Modifying the
    input in place between the siblings' calls would go unseen: the model code never does.
    """

    def __init__(self, size: int):
        self.size = size
        self._entry: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pending = 0

    def rows(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """x (..., in) as rotated rows (tokens, in)."""
        entry = self._entry
        if entry is not None and entry[0] is x:
            self._pending -= 1
            if self._pending <= 0:
                self._entry = None
            return entry[1]
        rotated = rotate_input(x.reshape(-1, x.shape[-1]), block)
        self._entry, self._pending = (x, rotated), self.size - 1
        return rotated


def share_input_rotations(model: nn.Module) -> int:
    """Give each group of sibling TapLinears with one input rotation a SharedInputRotation.

    Returns how many groups share one; a linear outside any group keeps rotating for itself.
    """
    groups = 0
    for parent in model.modules():
        for names in SIBLING_PROJECTIONS:
            members = [getattr(parent, name, None) for name in names]
            if not all(isinstance(m, TapLinear) for m in members):
                continue
            blocks = {m.policy.input_rotation for m in members}
            if len(blocks) != 1 or not next(iter(blocks)):
                continue
            shared = SharedInputRotation(len(members))
            for member in members:
                member.shared_rotation = shared
            groups += 1
    return groups


def _register_rows(module: nn.Module, policy: EmbeddingPolicy) -> None:
    """Empty row tensors under the checkpoint's names, for transformers' loader to fill."""
    shapes = {
        "qweight": ((policy.num_embeddings, policy.embedding_dim), torch.int8),
        "scales": ((policy.num_embeddings,), torch.float16),
        "column_scales": ((policy.embedding_dim,), torch.float32),
    }
    for field_name in policy.fields:
        shape, dtype = shapes[field_name]
        module.register_parameter(embedding_tensor_suffix(field_name), _frozen(torch.empty(shape, dtype=dtype)))


def _read_rows(module: nn.Module, policy: EmbeddingPolicy) -> RowQuantized:
    return RowQuantized(*(getattr(module, embedding_tensor_suffix(f)).data for f in policy.fields))


class TapEmbedding(nn.Module):
    """An 8-bit row-wise embedding. ``output_scale`` carries e.g. Gemma's sqrt(hidden) factor."""

    def __init__(self, policy: EmbeddingPolicy, output_scale: float | None = None, padding_idx: int | None = None):
        super().__init__()
        self.policy = policy
        self.num_embeddings = policy.num_embeddings
        self.embedding_dim = policy.embedding_dim
        self.padding_idx = padding_idx
        self.output_scale = output_scale
        _register_rows(self, policy)
        self.compute_dtype = torch.float32

    def rows(self) -> RowQuantized:
        return _read_rows(self, self.policy)

    def prepare(self, compute_dtype: torch.dtype) -> None:
        self.compute_dtype = compute_dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.rows()
        # Gather first, then dequantize: only the looked-up rows are ever widened.
        out = rows.qweight[input_ids].to(torch.float32) * rows.scales[input_ids].to(torch.float32).unsqueeze(-1)
        if rows.column_scales is not None:
            out = out * rows.column_scales
        if self.output_scale is not None:
            out = out * self.output_scale
        return out.to(self.compute_dtype)


def _shares_memory(prepared, tensor: torch.Tensor) -> bool:
    """Whether a kernel's prepared rows still read ``tensor``'s memory (rather than a copy)."""
    fields = (prepared,) if isinstance(prepared, torch.Tensor) else getattr(prepared, "__dict__", {}).values()
    storage = tensor.untyped_storage().data_ptr()
    return any(isinstance(v, torch.Tensor) and v.device == tensor.device and v.untyped_storage().data_ptr() == storage for v in fields)


class TapHead(nn.Module):
    """An 8-bit output head; when tied it reads the embedding's rows instead of its own.

    Column scales, where the rows carry them, multiply the head's input (x * c) . q_v == x . (q_v * c),
    so the kernel only ever sees plain per-row int8 codes.
    """

    def __init__(self, policy: EmbeddingPolicy, tied_embedding: TapEmbedding | None = None):
        super().__init__()
        self.policy = policy
        self.in_features = policy.embedding_dim
        self.out_features = policy.num_embeddings
        # A plain list keeps the tied embedding out of this module's parameters and state_dict.
        self._tied = [tied_embedding] if tied_embedding is not None else []
        if tied_embedding is not None:
            # transformers' weight tying looks for `weight` on the head; share the embedding's.
            # Forward reads codes and scales from the embedding itself, so both stay in step.
            self.weight = tied_embedding.weight
        else:
            _register_rows(self, policy)
        self.kernel: Kernel | None = None
        self._prepared = None
        self._column_scales: torch.Tensor | None = None

    def rows(self) -> RowQuantized:
        if self._tied:
            return self._tied[0].rows()
        if not hasattr(self, embedding_tensor_suffix("qweight")):
            raise RuntimeError("this head's portable rows were released by prepare(); load with keep_portable=True to keep them")
        return _read_rows(self, self.policy)

    def prepare(self, kernel: Kernel, keep_portable: bool = False) -> None:
        """Hand the rows to ``kernel``. An untied head then drops its portable rows (unless
        ``keep_portable``): the kernel holds what it reads, a copy in its own layout or the
        same tensor, so keeping them would hold the largest matrix of the model twice."""
        rows = self.rows()
        self._column_scales = rows.column_scales
        device = getattr(kernel, "device", None)
        if self._column_scales is not None and device is not None:
            # Beside the kernel's rows: a per-call host-to-device copy would cost a sync per token.
            self._column_scales = self._column_scales.to(device)
        codes = RowQuantized(rows.qweight, rows.scales)
        try:
            self._prepared = kernel.prepare_rows(codes)
            self.kernel = kernel
        except ValueError:
            # Shapes the packed kernel cannot take (in_features % 16 != 0) use the reference.
            self.kernel = ReferenceKernel(getattr(kernel, "device", None))
            self._prepared = self.kernel.prepare_rows(codes)
        if not self._tied and not keep_portable:
            qweight = getattr(self, embedding_tensor_suffix("qweight"))
            delattr(self, embedding_tensor_suffix("qweight"))
            if not _shares_memory(self._prepared, qweight.data):
                page_out(qweight.data)  # mapped shard pages the kernel copied: they can go now

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            raise RuntimeError("TapHead used before prepare(); load the model with tap_runtime.load()")
        leading = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self._column_scales is not None:
            x = x * self._column_scales.to(device=x.device, dtype=x.dtype)
        out = self.kernel.matmul_rows(x, self._prepared)
        return out.to(x.dtype).reshape(*leading, self.out_features)
