"""Packed weight-only kernels on CPU: torch's int4 (tinygemm layout) and int8 matmuls.

Both take bfloat16 activations: on x86 their float32 paths are generic fallbacks that run
about 25x slower than the bfloat16 ones (measured with torch 2.13, AVX2), so activations are
cast to bfloat16 at the kernel boundary and results come back in bfloat16.

Many tokens at once (prefill) are compute-bound, where torch's int4 kernel loses to a dense
bfloat16 GEMM (5.6 ms against 3.5 ms with the unpacking, for 512 x 576 -> 1536 on 2 cores). From
``dense_min_tokens`` tokens on, the plane is unpacked from the kernel's own packed layout into
a transient bfloat16 matrix and multiplied densely; nothing dense stays resident.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..planes import Plane, RowQuantized
from ..packing import unpack_int4

__all__ = [
    "CpuPackedKernel",
    "cpu_kernels_available",
    "cpu_int4_layout_known",
    "unpack_cpu_int4pack",
    "aligned",
    "INT4_ROW_MULTIPLE",
    "INT8_COL_MULTIPLE",
]

# torch's CPU int4 packer needs out_features % 16 == 0 and lays rows out in blocks of 64 (see
# unpack_cpu_int4pack); padding to 64 keeps every block regular, so the layout can be unpacked.
INT4_ROW_MULTIPLE = 64
_PACK_BLOCK_ROWS = 64
# torch's int8 weight-only matmul gives wrong results (or crashes) unless in_features % 16 == 0.
INT8_COL_MULTIPLE = 16
_INNER_K_TILES = 2
# torch's int8 kernel crashes on weights that are not 64-byte aligned, which tensors mapped
# straight from a safetensors file often are (the format only aligns to 8 bytes).
_ALIGNMENT_BYTES = 64


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself if contiguous and 64-byte aligned, else an aligned contiguous copy."""
    if torch.compiler.is_compiling():
        # Traced code has no addresses; its fresh buffers come from torch's aligned allocator.
        return tensor.contiguous()
    if tensor.is_contiguous() and tensor.data_ptr() % _ALIGNMENT_BYTES == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def cpu_kernels_available() -> bool:
    ops = torch.ops.aten
    return all(
        hasattr(ops, name)
        for name in ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu", "_weight_int8pack_mm")
    )


def unpack_cpu_int4pack(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Codes (rows, in_features) from ``_convert_weight_to_int4pack_for_cpu``'s output.

    For each block of 64 rows the packer writes, for every column k, 32 bytes whose low nibble is
    row d and high nibble row d + 32 of the block (torch 2.x, checked at start-up by
    :func:`cpu_int4_layout_known`).
    """
    blocks = packed.shape[0] // _PACK_BLOCK_ROWS
    half = _PACK_BLOCK_ROWS // 2
    low = (packed & 0x0F).view(blocks, in_features, half)
    high = (packed >> 4).view(blocks, in_features, half)
    return torch.cat((low, high), dim=-1).permute(0, 2, 1).reshape(blocks * _PACK_BLOCK_ROWS, in_features)


_LAYOUT_KNOWN: bool | None = None


def cpu_int4_layout_known() -> bool:
    """Whether this torch's packed layout is the one :func:`unpack_cpu_int4pack` reads (once)."""
    global _LAYOUT_KNOWN
    if _LAYOUT_KNOWN is None:
        codes = torch.randint(0, 16, (2 * _PACK_BLOCK_ROWS, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, _INNER_K_TILES)
            _LAYOUT_KNOWN = packed.shape == (codes.shape[0], codes.shape[1] // 2) and torch.equal(
                unpack_cpu_int4pack(packed, codes.shape[1]).to(torch.int32), codes
            )
        except RuntimeError:
            _LAYOUT_KNOWN = False
    return _LAYOUT_KNOWN


@dataclass
class _PackedPlane:
    packed: torch.Tensor  # uint8, kernel layout, (padded_out, in_features // 2)
    scale_and_zero: torch.Tensor  # bfloat16 (in_features // group_size, padded_out, 2)
    group_size: int
    out_features: int


@dataclass
class _PackedRows:
    qweight: torch.Tensor  # int8 (out_features, in_features)
    scales: torch.Tensor  # bfloat16 (out_features,)


class CpuPackedKernel:
    """int4 planes and int8 rows through torch's packed CPU ops; dense bf16 GEMM for prefill.

    ``dense_min_tokens``: from this many tokens in one call on, planes are unpacked to a
    transient bfloat16 matrix (measured crossover on 2 AVX-512 cores: 128 to 256 tokens depending
    on the shape; scripts/bench_kernels.py); ``None`` keeps the int4 kernel for every call.
    """

    name = "cpu-packed"

    def __init__(self, dense_min_tokens: int | None = 256):
        self.dense_min_tokens = dense_min_tokens if cpu_int4_layout_known() else None

    def prepare_plane(self, plane: Plane) -> _PackedPlane:
        codes = unpack_int4(plane.qweight).to(torch.int32)  # (out, in)
        out_features = codes.shape[0]
        pad = (-out_features) % INT4_ROW_MULTIPLE
        scales = plane.scales.to(torch.float32)
        zeros = plane.zeros_or_implied().to(torch.float32)
        if pad:
            codes = F.pad(codes, (0, 0, 0, pad), value=8)
            scales = F.pad(scales, (0, 0, 0, pad))
            zeros = F.pad(zeros, (0, 0, 0, pad), value=8.0)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), _INNER_K_TILES)
        # The kernel computes (q - 8) * scale + offset, so offset = (8 - zero) * scale.
        offsets = (8.0 - zeros) * scales
        scale_and_zero = torch.stack((scales, offsets), dim=-1).transpose(0, 1).contiguous()
        return _PackedPlane(packed, scale_and_zero.to(torch.bfloat16), plane.spec.group_size, out_features)

    def dequantize_plane(self, prepared: _PackedPlane) -> torch.Tensor:
        """The plane as a bfloat16 (padded_out, in_features) matrix, from the packed layout."""
        in_features = prepared.packed.shape[1] * 2
        groups = in_features // prepared.group_size
        # float32 arithmetic: torch's elementwise bfloat16 ops on CPU are ~3x slower.
        codes = unpack_cpu_int4pack(prepared.packed, in_features).to(torch.float32)
        codes = codes.view(codes.shape[0], groups, prepared.group_size)
        scale_and_zero = prepared.scale_and_zero.to(torch.float32)
        scale = scale_and_zero[..., 0].t().unsqueeze(-1)  # (out, groups, 1)
        # (q - 8) * scale + offset = q * scale + (offset - 8 * scale)
        shift = (scale_and_zero[..., 1] - 8 * scale_and_zero[..., 0]).t().unsqueeze(-1)
        return codes.mul_(scale).add_(shift).view(codes.shape[0], in_features).to(torch.bfloat16)

    def matmul_plane(self, x: torch.Tensor, prepared: _PackedPlane) -> torch.Tensor:
        if self.dense_min_tokens is not None and x.shape[0] >= self.dense_min_tokens:
            out = torch.mm(x.to(torch.bfloat16), self.dequantize_plane(prepared).t())
            if out.shape[-1] != prepared.out_features:
                out = out[:, : prepared.out_features]
            return out
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            aligned(x.to(torch.bfloat16)), prepared.packed, prepared.group_size, prepared.scale_and_zero
        )
        if out.shape[-1] != prepared.out_features:
            out = out[:, : prepared.out_features]
        return out

    def fuse_planes(self, parts: list[_PackedPlane]) -> tuple[_PackedPlane, list[_PackedPlane]] | None:
        """One plane for several that read the same input (q/k/v, gate/up), and each part again
        as a view into it, so fusing costs no memory. None when the parts cannot be stacked
        (different group sizes, or padded rows between them)."""
        if len({p.group_size for p in parts}) != 1 or len({p.packed.shape[1] for p in parts}) != 1:
            return None
        if any(p.packed.shape[0] != p.out_features for p in parts):
            return None
        packed = torch.cat([p.packed for p in parts])
        fused = _PackedPlane(
            packed,
            torch.cat([p.scale_and_zero for p in parts], dim=1).contiguous(),
            parts[0].group_size,
            sum(p.out_features for p in parts),
        )
        views, offset = [], 0
        for p in parts:
            views.append(_PackedPlane(packed[offset : offset + p.out_features], p.scale_and_zero, p.group_size, p.out_features))
            offset += p.out_features
        return fused, views

    def prepare_rows(self, rows: RowQuantized) -> _PackedRows:
        if rows.qweight.shape[1] % INT8_COL_MULTIPLE:
            raise ValueError(f"int8 kernel needs in_features % {INT8_COL_MULTIPLE} == 0")
        return _PackedRows(aligned(rows.qweight), aligned(rows.scales.to(torch.bfloat16)))

    def matmul_rows(self, x: torch.Tensor, prepared: _PackedRows) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(aligned(x.to(torch.bfloat16)), prepared.qweight, prepared.scales)
