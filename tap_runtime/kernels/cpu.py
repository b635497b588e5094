"""Packed weight-only kernels on CPU: torch's int4 (tinygemm layout) and int8 matmuls.

Both take bfloat16 activations: on x86 their float32 paths are generic fallbacks that run
about 25x slower than the bfloat16 ones (measured with torch 2.13, AVX2), so activations are
cast to bfloat16 at the kernel boundary and results come back as float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..planes import Plane, RowQuantized
from ..packing import unpack_int4

__all__ = ["CpuPackedKernel", "cpu_kernels_available", "aligned", "INT4_ROW_MULTIPLE", "INT8_COL_MULTIPLE"]

# torch's CPU int4 packer needs out_features % 16 == 0; shorter matrices are padded with zeros.
INT4_ROW_MULTIPLE = 16
# torch's int8 weight-only matmul gives wrong results (or crashes) unless in_features % 16 == 0.
INT8_COL_MULTIPLE = 16
_INNER_K_TILES = 2
# torch's int8 kernel crashes on weights that are not 64-byte aligned, which tensors mapped
# straight from a safetensors file often are (the format only aligns to 8 bytes).
_ALIGNMENT_BYTES = 64


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself if contiguous and 64-byte aligned, else an aligned contiguous copy."""
    if tensor.is_contiguous() and tensor.data_ptr() % _ALIGNMENT_BYTES == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def cpu_kernels_available() -> bool:
    ops = torch.ops.aten
    return all(
        hasattr(ops, name)
        for name in ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu", "_weight_int8pack_mm")
    )


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
    name = "cpu-packed"

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

    def matmul_plane(self, x: torch.Tensor, prepared: _PackedPlane) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            aligned(x.to(torch.bfloat16)), prepared.packed, prepared.group_size, prepared.scale_and_zero
        )
        if out.shape[-1] != prepared.out_features:
            out = out[:, : prepared.out_features]
        return out.to(torch.float32)

    def prepare_rows(self, rows: RowQuantized) -> _PackedRows:
        if rows.qweight.shape[1] % INT8_COL_MULTIPLE:
            raise ValueError(f"int8 kernel needs in_features % {INT8_COL_MULTIPLE} == 0")
        return _PackedRows(aligned(rows.qweight), aligned(rows.scales.to(torch.bfloat16)))

    def matmul_rows(self, x: torch.Tensor, prepared: _PackedRows) -> torch.Tensor:
        out = torch.ops.aten._weight_int8pack_mm(aligned(x.to(torch.bfloat16)), prepared.qweight, prepared.scales)
        return out.to(torch.float32)
