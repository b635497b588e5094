"""Packed weight-only kernels on CPU: torch's int4 (tinygemm layout) and int8 matmuls.

Both take bfloat16 activations: on x86 their float32 paths are generic fallbacks that run
about 25x slower than the bfloat16 ones (measured with torch 2.13, AVX2), so activations are
cast to bfloat16 at the kernel boundary and results come back in bfloat16.

Many tokens at once (prefill) are compute-bound, where torch's int4 kernel loses to a dense
GEMM (5.6 ms against 3.5 ms with the unpacking, for 512 x 576 -> 1536 on 2 AVX-512 cores). From
``dense_min_tokens`` tokens on, the plane is unpacked from the kernel's own packed layout into
a transient matrix and multiplied densely; nothing dense stays resident. That matrix is
bfloat16 where the CPU multiplies bfloat16 in hardware, float32 elsewhere (on AVX2 a bfloat16
GEMM runs 7x slower than a float32 one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..planes import Plane, RowQuantized, split_levels
from ..packing import unpack_int4
from .base import SplitPlane
from .native import cpu_flags

__all__ = [
    "CpuPackedKernel",
    "cpu_kernels_available",
    "cpu_int4_layout_known",
    "cpu_bfloat16_gemm_native",
    "unpack_cpu_int4pack",
    "aligned",
    "INT4_ROW_MULTIPLE",
    "INT8_COL_MULTIPLE",
]

# torch's CPU int4 packer needs out_features % 16 == 0 and lays rows out in blocks of 64 rows on
# AVX-512 builds and 32 on AVX2 (see unpack_cpu_int4pack); padding to 64 keeps every block
# regular under either, so the layout can be unpacked.
INT4_ROW_MULTIPLE = 64
# Block heights the packer is known to use, widest vector unit first; probed once at start-up.
_CANDIDATE_BLOCK_ROWS = (64, 32)
# torch's int8 weight-only matmul gives wrong results (or crashes) unless in_features % 16 == 0.
INT8_COL_MULTIPLE = 16
_INNER_K_TILES = 2
# The head's largest logits recomputed in float32 per token (CpuPackedKernel.matmul_rows), in
# calls of at most REFINE_MAX_TOKENS tokens: decode steps, not prefill's whole-window logits.
REFINE_TOP = 16
REFINE_MAX_TOKENS = 8
# Where prefill multiplies in float32 (no bfloat16 hardware), the head too from this many tokens
# on (int8 kernel faster below: 52 ms against 92 at 32 tokens, 185 against 139 at 128 on
# SmolLM2's head), a slice of HEAD_DENSE_ROWS rows widened at a time.
HEAD_DENSE_MIN_TOKENS = 128
HEAD_DENSE_ROWS = 8192
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


def unpack_cpu_int4pack(packed: torch.Tensor, in_features: int, block_rows: int | None = None) -> torch.Tensor:
    """Codes (rows, in_features) from ``_convert_weight_to_int4pack_for_cpu``'s output.

    For each block of ``block_rows`` rows (64 on AVX-512 CPUs, 32 on AVX2; by default the one
    this CPU's packer uses, found by :func:`cpu_int4_block_rows`) the packer writes, for every
    column k, ``block_rows / 2`` bytes whose low nibble is row d and high nibble row
    d + block_rows / 2 of the block.
    """
    if block_rows is None:
        block_rows = cpu_int4_block_rows()
        if block_rows is None:
            raise RuntimeError("torch's packed int4 layout on this CPU is not one TAP can unpack")
    blocks = packed.shape[0] // block_rows
    half = block_rows // 2
    low = (packed & 0x0F).view(blocks, in_features, half)
    high = (packed >> 4).view(blocks, in_features, half)
    return torch.cat((low, high), dim=-1).permute(0, 2, 1).reshape(blocks * block_rows, in_features)


_BLOCK_ROWS_PROBED = False
_BLOCK_ROWS: int | None = None


def cpu_int4_block_rows() -> int | None:
    """Block height of this CPU's packed int4 layout, or None if it is none TAP can read (once).

    torch picks the layout by the CPU's vector unit at run time, so it is probed, not assumed:
    random codes are packed and each candidate unpacking is checked against them.
    """
    global _BLOCK_ROWS_PROBED, _BLOCK_ROWS
    if not _BLOCK_ROWS_PROBED:
        _BLOCK_ROWS_PROBED = True
        rows = 2 * max(_CANDIDATE_BLOCK_ROWS)
        codes = torch.randint(0, 16, (rows, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, _INNER_K_TILES)
        except (RuntimeError, AttributeError):
            return None
        if packed.shape == (codes.shape[0], codes.shape[1] // 2):
            for block_rows in _CANDIDATE_BLOCK_ROWS:
                if torch.equal(unpack_cpu_int4pack(packed, codes.shape[1], block_rows).to(torch.int32), codes):
                    _BLOCK_ROWS = block_rows
                    break
    return _BLOCK_ROWS


def cpu_int4_layout_known() -> bool:
    """Whether this CPU's packed int4 layout is one :func:`unpack_cpu_int4pack` reads."""
    return cpu_int4_block_rows() is not None


def cpu_bfloat16_gemm_native() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512_BF16 or AMX).

    Without it torch widens bfloat16 in software: on 2 AVX2 cores (AMD EPYC, torch 2.13) a
    512-token product with a 1536 x 576 matrix took 62 ms in bfloat16 against 8 ms in float32.
    """
    flags = set(cpu_flags().split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


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
    exact_scales: torch.Tensor  # float32 (out_features,): the stored scales, for refine_top


class CpuPackedKernel:
    """int4 planes and int8 rows through torch's packed CPU ops; dense bf16 GEMM for prefill.

    ``dense_min_tokens``: from this many tokens in one call on, planes are unpacked to a
    transient bfloat16 matrix (measured crossover on 2 AVX-512 cores: 128 to 256 tokens depending
    on the shape; scripts/bench_kernels.py); ``None`` keeps the int4 kernel for every call.
    ``dense_dtype``: the transient matrix's type; by default bfloat16 where the CPU multiplies it
    in hardware and float32 elsewhere (:func:`cpu_bfloat16_gemm_native`).
    ``refine_top``: how many of each decoded token's largest head outputs are recomputed in
    float32 (see :meth:`matmul_rows`); 0 leaves the kernel's bfloat16 logits as they are.
    """

    name = "cpu-packed"

    def __init__(self, dense_min_tokens: int | None = 256, refine_top: int = REFINE_TOP, dense_dtype: torch.dtype | None = None):
        self.dense_min_tokens = dense_min_tokens if cpu_int4_layout_known() else None
        if dense_dtype is None:
            dense_dtype = torch.bfloat16 if cpu_bfloat16_gemm_native() else torch.float32
        if dense_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"dense_dtype must be torch.bfloat16 or torch.float32, got {dense_dtype}")
        self.dense_dtype = dense_dtype
        self.refine_top = refine_top

    def prepare_plane(self, plane: Plane) -> _PackedPlane | SplitPlane:
        if plane.spec.levels is not None:  # torch's op multiplies even codes only
            return SplitPlane(tuple(self.prepare_plane(part) for part in split_levels(plane)))
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

    def dequantize_plane(self, prepared: _PackedPlane | SplitPlane) -> torch.Tensor:
        """The plane as a ``dense_dtype`` (padded_out, in_features) matrix, from the packed layout."""
        if type(prepared) is SplitPlane:
            high, low = (self.dequantize_plane(part).to(torch.float32) for part in prepared.parts)
            return high.add_(low).to(self.dense_dtype)
        in_features = prepared.packed.shape[1] * 2
        groups = in_features // prepared.group_size
        # float32 arithmetic: torch's elementwise bfloat16 ops on CPU are ~3x slower.
        codes = unpack_cpu_int4pack(prepared.packed, in_features).to(torch.float32)
        codes = codes.view(codes.shape[0], groups, prepared.group_size)
        scale_and_zero = prepared.scale_and_zero.to(torch.float32)
        scale = scale_and_zero[..., 0].t().unsqueeze(-1)  # (out, groups, 1)
        # (q - 8) * scale + offset = q * scale + (offset - 8 * scale)
        shift = (scale_and_zero[..., 1] - 8 * scale_and_zero[..., 0]).t().unsqueeze(-1)
        return codes.mul_(scale).add_(shift).view(codes.shape[0], in_features).to(self.dense_dtype)

    def matmul_plane(self, x: torch.Tensor, prepared: _PackedPlane | SplitPlane) -> torch.Tensor:
        if type(prepared) is SplitPlane:
            # Summed in float32 and left there: rounding the sum to bfloat16 again would double
            # the bfloat16 rounding of an even plane's product.
            high, low = (self.matmul_plane(x, part) for part in prepared.parts)
            return high.to(torch.float32) + low.to(torch.float32)
        if self.dense_min_tokens is not None and x.shape[0] >= self.dense_min_tokens:
            out = torch.mm(x.to(self.dense_dtype), self.dequantize_plane(prepared).t())
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
        (different group sizes, or padded rows between them). Planes split for a level table
        fuse part by part."""
        if all(type(p) is SplitPlane for p in parts):
            fused = [self.fuse_planes([p.parts[i] for p in parts]) for i in range(2)]
            if any(f is None for f in fused):
                return None
            (high, high_views), (low, low_views) = fused
            return SplitPlane((high, low)), [SplitPlane(pair) for pair in zip(high_views, low_views)]
        if any(type(p) is not _PackedPlane for p in parts):
            return None
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
        return _PackedRows(
            aligned(rows.qweight), aligned(rows.scales.to(torch.bfloat16)), rows.scales.to(torch.float32).contiguous()
        )

    def matmul_rows(self, x: torch.Tensor, prepared: _PackedRows) -> torch.Tensor:
        """The output head's logits. torch's int8 kernel takes bfloat16 inputs and rounds its
        results to bfloat16 (3 significant digits: logits near 20 land on steps of 0.125), so
        tokens a greedy step must tell apart tie. For a few tokens per call (decode), each
        token's ``refine_top`` largest logits are recomputed in float32 from the float32
        activations and the stored scales: the pick among them is then exact unless more than
        ``refine_top`` tokens lie within the kernel's rounding of the best one."""
        if self.dense_dtype == torch.float32 and x.shape[0] >= HEAD_DENSE_MIN_TOKENS:
            return self._dense_rows(x.to(torch.float32), prepared)
        out = torch.ops.aten._weight_int8pack_mm(aligned(x.to(torch.bfloat16)), prepared.qweight, prepared.scales)
        if not self.refine_top or x.shape[0] > REFINE_MAX_TOKENS:
            return out
        top = out.topk(min(self.refine_top, out.shape[-1]), dim=-1).indices  # (tokens, k)
        exact = torch.einsum("tki,ti->tk", prepared.qweight[top].to(torch.float32), x.to(torch.float32))
        return out.to(torch.float32).scatter_(-1, top, exact * prepared.exact_scales[top])

    @staticmethod
    def _dense_rows(x: torch.Tensor, prepared: _PackedRows) -> torch.Tensor:
        """Many tokens through the head on a CPU without bfloat16 hardware: slices of rows widened
        to float32 and multiplied densely (SmolLM2's head at 512 tokens: 516 ms against 805 ms
        for the int8 kernel on 2 AVX2 cores, and no bfloat16 rounding of the logits)."""
        out = torch.empty(x.shape[0], prepared.qweight.shape[0], dtype=torch.float32)
        for start in range(0, prepared.qweight.shape[0], HEAD_DENSE_ROWS):
            stop = start + HEAD_DENSE_ROWS
            weight = prepared.qweight[start:stop].to(torch.float32).mul_(prepared.exact_scales[start:stop].unsqueeze(-1))
            out[:, start:stop] = x @ weight.t()
        return out
