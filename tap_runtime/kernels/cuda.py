"""Packed weight-only kernels on NVIDIA GPUs: torch's tinygemm int4 and int8 matmuls.

The int4 kernel (``_weight_int4pack_mm``, sm80+) reads the same scale/offset pairs as the CPU
one, so planes convert the same way; only the packed layout differs. tinygemm is built for few
tokens; from ``dense_min_tokens`` tokens on (prefill) the plane is dequantized to a transient
bfloat16 matrix from a copy of its portable codes kept on the GPU (the same 4 bits per weight
again: weights then cost 1 byte each on the GPU instead of 0.5, still half of bfloat16) and
multiplied with cuBLAS. ``dense_min_tokens=None`` keeps only the packed copy. The int8 head uses
``_weight_int8pack_mm`` when this torch build has it for CUDA, else a bfloat16 copy of the
head's rows (twice the bytes; the fallback is named in :attr:`CudaPackedKernel.int8_path`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..packing import unpack_int4
from ..planes import Plane, RowQuantized, dequantize_plane, split_levels
from .base import SplitPlane

__all__ = ["CudaPackedKernel", "cuda_kernels_available", "inner_k_tiles"]

# tinygemm reads rows in tiles of 8 columns of 16-row fragments; pad out_features to 16.
_ROW_MULTIPLE = 16
_GROUP_SIZES = (32, 64, 128, 256)


def cuda_kernels_available() -> bool:
    """True when a CUDA device of compute capability >= 8.0 and torch's int4 ops are present."""
    if not torch.cuda.is_available():
        return False
    ops = torch.ops.aten
    if not (hasattr(ops, "_convert_weight_to_int4pack") and hasattr(ops, "_weight_int4pack_mm")):
        return False
    return torch.cuda.get_device_capability()[0] >= 8


def inner_k_tiles(in_features: int) -> int:
    """The largest tile count tinygemm accepts for this width (in_features % (tiles * 16) == 0)."""
    for tiles in (8, 4, 2):
        if in_features % (tiles * 16) == 0:
            return tiles
    raise ValueError(f"CUDA int4 kernel needs in_features % 32 == 0; got {in_features}")


def tinygemm_bytes(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) codes in [0, 15] -> uint8 (out, in // 2) with the even column in the HIGH nibble.

    That is the order ``_convert_weight_to_int4pack`` expects on CUDA (the opposite of TAP's
    on-disk order, see :mod:`tap_runtime.packing`).
    """
    codes = codes.to(torch.uint8)
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


@dataclass
class _PackedPlane:
    packed: torch.Tensor
    scale_and_zero: torch.Tensor  # bfloat16 (in // group_size, padded_out, 2)
    group_size: int
    out_features: int
    portable: Plane | None = None  # on the GPU, for the dense prefill path


@dataclass
class _PackedRows:
    weight: torch.Tensor  # int8 (out, in) for the int8 kernel, or bfloat16 (out, in) fallback
    scales: torch.Tensor | None  # bfloat16 (out,) with the int8 kernel


class CudaPackedKernel:
    """Weight-only int4/int8 matmuls on one CUDA device; every prepared tensor lives there."""

    name = "cuda-packed"

    def __init__(self, device: torch.device | str = "cuda", dense_min_tokens: int | None = 64):
        self.device = torch.device(device)
        self.dense_min_tokens = dense_min_tokens
        self.int8_path = "int8pack" if self._int8_kernel_works() else "bf16-rows"

    def _int8_kernel_works(self) -> bool:
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return False
        try:
            x = torch.ones(1, 32, dtype=torch.bfloat16, device=self.device)
            w = torch.ones(16, 32, dtype=torch.int8, device=self.device)
            s = torch.ones(16, dtype=torch.bfloat16, device=self.device)
            out = torch.ops.aten._weight_int8pack_mm(x, w, s)
            return bool(torch.allclose(out.float(), torch.full_like(out.float(), 32.0)))
        except (RuntimeError, NotImplementedError):
            return False

    def prepare_plane(self, plane: Plane) -> _PackedPlane | SplitPlane:
        if plane.spec.levels is not None:  # tinygemm multiplies even codes only
            return SplitPlane(tuple(self.prepare_plane(part) for part in split_levels(plane)))
        group_size = plane.spec.group_size
        if group_size not in _GROUP_SIZES:
            raise ValueError(f"CUDA int4 kernel needs group size in {_GROUP_SIZES}; got {group_size}")
        codes = unpack_int4(plane.qweight.cpu()).to(torch.int32)
        out_features, in_features = codes.shape
        tiles = inner_k_tiles(in_features)
        pad = (-out_features) % _ROW_MULTIPLE
        scales = plane.scales.cpu().to(torch.float32)
        zeros = plane.zeros_or_implied().cpu().to(torch.float32)
        if pad:
            codes = F.pad(codes, (0, 0, 0, pad), value=8)
            scales = F.pad(scales, (0, 0, 0, pad))
            zeros = F.pad(zeros, (0, 0, 0, pad), value=8.0)
        packed = torch.ops.aten._convert_weight_to_int4pack(tinygemm_bytes(codes).to(self.device), tiles)
        # Same convention as the CPU kernel: (q - 8) * scale + offset with offset = (8 - zero) * scale.
        offsets = (8.0 - zeros) * scales
        scale_and_zero = torch.stack((scales, offsets), dim=-1).transpose(0, 1).contiguous()
        portable = None
        if self.dense_min_tokens is not None:
            portable = Plane(
                plane.spec,
                plane.qweight.to(self.device),
                plane.scales.to(self.device),
                None if plane.zeros is None else plane.zeros.to(self.device),
            )
        return _PackedPlane(packed, scale_and_zero.to(device=self.device, dtype=torch.bfloat16), group_size, out_features, portable)

    def matmul_plane(self, x: torch.Tensor, prepared: _PackedPlane | SplitPlane) -> torch.Tensor:
        if type(prepared) is SplitPlane:
            high, low = (self.matmul_plane(x, part) for part in prepared.parts)
            return high.to(torch.float32) + low.to(torch.float32)  # float32, as CpuPackedKernel's
        if prepared.portable is not None and x.shape[0] >= self.dense_min_tokens:
            return x.to(torch.bfloat16) @ dequantize_plane(prepared.portable, torch.bfloat16).t()
        out = torch.ops.aten._weight_int4pack_mm(
            x.to(torch.bfloat16).contiguous(), prepared.packed, prepared.group_size, prepared.scale_and_zero
        )
        if out.shape[-1] != prepared.out_features:
            out = out[:, : prepared.out_features]
        return out

    def prepare_rows(self, rows: RowQuantized) -> _PackedRows:
        if self.int8_path == "int8pack":
            return _PackedRows(
                rows.qweight.to(self.device).contiguous(), rows.scales.to(device=self.device, dtype=torch.bfloat16)
            )
        weight = rows.qweight.to(self.device, torch.bfloat16) * rows.scales.to(self.device, torch.bfloat16).unsqueeze(-1)
        return _PackedRows(weight, None)

    def matmul_rows(self, x: torch.Tensor, prepared: _PackedRows) -> torch.Tensor:
        x = x.to(torch.bfloat16).contiguous()
        if prepared.scales is not None:
            out = torch.ops.aten._weight_int8pack_mm(x, prepared.weight, prepared.scales)
        else:
            out = x @ prepared.weight.t()
        return out
