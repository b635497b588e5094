"""TAP's own CPU kernels (AVX-512 VNNI, or AVX2): 4-bit planes and 8-bit rows times 15-bit activations.

torch's CPU int4 kernel widens every weight to bfloat16 and reads several rows as separate
streams; on 2 Zen 4 cores it moves about 16 GB/s of weights. These kernels multiply the 4-bit
codes by integer activations with VNNI dot products and store each tile of rows as one
contiguous stream, which measured about 2x faster for planes and the output head
(scripts/bench_kernels.py). Activations are quantized when a call starts: per block of 64 inputs
for planes, per token for rows, to 15 bits, so the result is closer to float32 than the bfloat16
activations of torch's kernel (relative error ~1e-4 against ~3e-3).

Layouts are made at load time from the portable planes; shapes the kernels do not take (group
sizes or widths that are not multiples of 64, rows not a multiple of 32 wide) fall back to
torch's packed kernel, plane by plane. From 16 tokens at once (prefill, routed subsets of it)
a base product goes through the 16-row lane kernel with 8-bit activations per block of 64
(``lane_base``, the default), and a 15-bit product that every token reads (plane sums,
``lane_base=False``) unpacks the plane into a reused bfloat16 buffer for a dense GEMM: at 512
tokens that is 2.4x a float32 matmul on Qwen2.5-1.5B's gate/up plane, against 1.0x for torch's
int4 kernel (scripts/bench_kernels.py).

On CPUs with AVX2 but no AVX-512 VNNI the same module builds with maddubs/madd in place of the
VNNI dot product (kernel name ``cpu-avx2``): same layouts and arithmetic, and an 8-row lane
kernel in place of the 16-row one. Its float32 dense GEMM is no faster than the integer
products, so from AVX2_LANE_MIN_TOKENS tokens on every plane product goes through the lanes,
reading the plane as stored: 8-bit activations for a prefill's base products (``lane_base``, as
in the VNNI build) and the routed rows' residuals, 15-bit for other products every token
reads (the one-token kernel's arithmetic; ``wide_lanes``). Decode keeps 15 bits. Dense matrices
(plane sums, the head's many-token products) are float32 unless the CPU multiplies bfloat16
natively (``CpuPackedKernel.dense_dtype``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from ..packing import unpack_int4
from ..pages import huge_page_copy, huge_page_empty, page_out
from ..planes import Plane, RowQuantized
from .base import SplitPlane
from .cpu import CpuPackedKernel, _PackedPlane, _PackedRows
from .native import native_kernels

__all__ = ["ALL_NARROW", "ALL_WIDE", "BASE_ACTIVATION_BITS", "CpuVnniKernel", "TiledPlane", "TiledRows", "block_quantized_activations", "tile_plane_codes", "untile_plane_codes", "tile_rows", "untile_rows"]

BLOCK = 64  # inputs per activation scale, and per 32 bytes of packed plane
CHUNK_BLOCKS = 16  # blocks per chunk of the plane layout (the C++ kernel's kChunkBlocks)
_ROW_CHUNK = 32  # inputs per 32-byte chunk of an int8 row
_DENSE_ROWS_CHUNK = 16384  # rows of the head unpacked at a time for many-token calls
_PREPARE_ROWS_CHUNK = 4096  # rows of the head tiled at a time at load (a multiple of any tile)
_EVEN = torch.empty(0, dtype=torch.uint8)  # the native ops' "no level table" in a list of planes' tables
# From this many tokens in one call, planes are unpacked and multiplied densely (the default of
# CpuVnniKernel's dense_min_tokens), per build: scripts/bench_kernels.py measured the crossover.
# AVX2 (2 EPYC cores, float32 GEMM): summed over SmolLM2's, gemma's and Qwen2.5-1.5B's planes
# the native kernel took 175 ms at 128 tokens against 209 ms unpacked, 400 against 334 at 256.
DENSE_MIN_TOKENS = {"avx512-vnni": 16, "avx2": 192}
# From this many tokens in one call, the AVX2 build multiplies planes with its 8-row lane kernel
# (matmul_w4_lanes): 15-bit activations for base products, 8-bit for routed residuals. Summed
# over the six plane shapes of scripts/bench_kernels.py (2 EPYC cores, 2 threads), the 15-bit
# lanes took 17.6 ms at 16 tokens against the one-token kernel's 22.8, and 424 ms at 512 tokens
# against 588 for unpack + float32 GEMM, with the one-token kernel's error (1.1e-4). The VNNI
# build keeps DENSE_MIN_TOKENS (its bfloat16 GEMM runs at twice float32's rate).
AVX2_LANE_MIN_TOKENS = 16
# The native plane kernel's activation rule (its wide_above argument): a block of 64 activations
# takes 15 bits where its peak exceeds wide_above times its RMS, else 8 bits.
ALL_WIDE = 0.0  # every block 15 bits (a block's peak is never below its RMS)
ALL_NARROW = math.inf  # every block 8 bits
BASE_ACTIVATION_BITS = (15, 8)  # load(base_activation_bits=...); None there: the build's default (lane_base)


def _pad_rows(tensor: torch.Tensor, multiple: int, value: int) -> torch.Tensor:
    pad = (-tensor.shape[0]) % multiple
    return F.pad(tensor, (0, 0, 0, pad), value=value) if pad else tensor


def _chunks(blocks: int):
    """(first block, block count) of each chunk of CHUNK_BLOCKS blocks."""
    return [(start, min(CHUNK_BLOCKS, blocks - start)) for start in range(0, blocks, CHUNK_BLOCKS)]


def block_quantized_activations(x: torch.Tensor, levels: int) -> torch.Tensor:
    """x (tokens, in) as the native kernels see it: each block of BLOCK inputs rounded to
    integers at scale peak / levels (127: 8 bits, 16383: 15 bits), nearest even, and back to
    values. A native product is the dequantized plane times this, up to float32 rounding (the
    tests' and scripts/bench_activation_error.py's ground truth)."""
    blocks = x.reshape(x.shape[0], -1, BLOCK)
    scale = blocks.abs().amax(-1, keepdim=True) / levels
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inverse) * scale).reshape_as(x)


def tile_plane_codes(codes: torch.Tensor, tile: int) -> torch.Tensor:
    """Codes (out, in) in [0, 15] -> uint8 (out padded to ``tile``, in // 2) in the kernel's layout.

    Inputs go in chunks of 16 blocks of 64, one chunk after the other; within a chunk, rows go in
    tiles of ``tile``; within a tile, for each block, each row's 32 bytes follow the previous
    row's. Byte t of a block holds input t (low nibble) and t + 32 (high nibble).
    """
    codes = _pad_rows(codes.to(torch.uint8), tile, 8)
    rows, cols = codes.shape
    split = codes.view(rows // tile, tile, cols // BLOCK, 2, BLOCK // 2)
    packed = split[:, :, :, 0] | (split[:, :, :, 1] << 4)  # (tiles, tile, blocks, 32)
    pieces = [packed[:, :, start : start + count].permute(0, 2, 1, 3).reshape(-1) for start, count in _chunks(cols // BLOCK)]
    return torch.cat(pieces).view(rows, cols // 2)


def untile_plane_codes(packed: torch.Tensor, in_features: int, tile: int) -> torch.Tensor:
    """Inverse of :func:`tile_plane_codes` (padded rows included)."""
    rows = packed.shape[0]
    flat = packed.reshape(-1)
    codes = torch.empty(rows, in_features, dtype=torch.uint8)
    offset = 0
    for start, count in _chunks(in_features // BLOCK):
        size = rows * count * (BLOCK // 2)
        chunk = flat[offset : offset + size].view(rows // tile, count, tile, BLOCK // 2)
        offset += size
        split = torch.stack((chunk & 0x0F, chunk >> 4), dim=3)  # (tiles, count, tile, 2, 32)
        codes[:, start * BLOCK : (start + count) * BLOCK] = split.permute(0, 2, 1, 3, 4).reshape(rows, count * BLOCK)
    return codes


def _stack_chunks(parts: list[torch.Tensor], rows: list[int], blocks: int, blocks_per_item: int, item_size: int) -> torch.Tensor:
    """Stack chunked-layout tensors of whole tiles: chunk by chunk, each part's chunk in turn.
    Items are ``item_size`` elements per row, one per ``blocks_per_item`` blocks."""
    flats = [part.reshape(-1) for part in parts]
    pieces = []
    for start, count in _chunks(blocks):
        first, width = start // blocks_per_item * item_size, count // blocks_per_item * item_size
        for flat, part_rows in zip(flats, rows):
            pieces.append(flat[part_rows * first : part_rows * (first + width)])
    return torch.cat(pieces)


def tile_group_params(params: torch.Tensor, tile: int, group_size: int) -> torch.Tensor:
    """float16 scales or zeros (out, groups) -> (out padded to ``tile``, groups) in the planes'
    chunk and tile order: within each chunk's tile, each row's groups of that chunk."""
    params = _pad_rows(params.to(torch.float16), tile, 0)
    rows, groups = params.shape
    per_block = group_size // BLOCK
    pieces = []
    for start, count in _chunks(groups * per_block):
        first, width = start // per_block, count // per_block
        pieces.append(params[:, first : first + width].reshape(-1))  # rows in order = tiles in order
    return torch.cat(pieces).view(rows, groups)


def untile_group_params(tiled: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`tile_group_params` (padded rows included)."""
    rows, groups = tiled.shape
    per_block = group_size // BLOCK
    flat = tiled.reshape(-1)
    params = torch.empty(rows, groups, dtype=tiled.dtype)
    offset = 0
    for start, count in _chunks(groups * per_block):
        first, width = start // per_block, count // per_block
        params[:, first : first + width] = flat[offset : offset + rows * width].view(rows, width)
        offset += rows * width
    return params


def tile_rows(qweight: torch.Tensor, tile: int) -> torch.Tensor:
    """int8 rows (out, in) -> (out padded to ``tile``, in): each tile's rows interleaved by 32 bytes."""
    qweight = _pad_rows(qweight, tile, 0)
    rows, cols = qweight.shape
    return qweight.view(rows // tile, tile, cols // _ROW_CHUNK, _ROW_CHUNK).permute(0, 2, 1, 3).reshape(rows, cols).contiguous()


def untile_rows(tiled: torch.Tensor, tile: int) -> torch.Tensor:
    rows, cols = tiled.shape
    return tiled.view(rows // tile, cols // _ROW_CHUNK, tile, _ROW_CHUNK).permute(0, 2, 1, 3).reshape(rows, cols)


@dataclass
class TiledPlane:
    """Rows [first_row, first_row + out_features) of a stored plane: the whole plane, or one
    projection's rows of a stacked q/k/v or gate/up plane (the chunked layout interleaves rows
    of all projections, so a view keeps the stored plane and its first row)."""

    weight: torch.Tensor  # uint8 (rows padded to the tile, in // 2), see tile_plane_codes
    scales: torch.Tensor  # float16 (rows padded, groups), see tile_group_params
    zeros: torch.Tensor  # float16, as scales; implied zeros materialised
    group_size: int
    out_features: int
    first_row: int = 0
    levels: torch.Tensor | None = None  # uint8 (16,): the plane's level table (PlaneSpec.levels); None: even codes


@dataclass
class TiledRows:
    weight: torch.Tensor  # int8 (out padded to the tile, in), see tile_rows
    scales: torch.Tensor  # float32 (out,)
    code_sums: torch.Tensor  # int32 (out,): the kernel's activation offset is taken back with these
    out_features: int


class CpuVnniKernel(CpuPackedKernel):
    """Planes and rows through TAP's native kernels (VNNI or AVX2 build), other shapes through
    torch's packed kernels.

    ``dense_min_tokens``: from this many tokens in one call on, planes and rows are unpacked to a
    transient ``dense_dtype`` matrix and multiplied densely ("auto": the build's crossover in
    DENSE_MIN_TOKENS, measured by scripts/bench_kernels.py; None: never).
    """

    def __init__(
        self,
        dense_min_tokens: int | None | str = "auto",
        native: ModuleType | None = None,
        base_wide_above: float = ALL_WIDE,
        lane_residuals: bool = True,
        lane_base: bool | None = None,
        dense_dtype: torch.dtype | None = None,
        wide_lanes: bool | None = None,
    ):
        super().__init__(dense_dtype=dense_dtype)
        self.native = native if native is not None else native_kernels()
        if self.native is None:
            raise RuntimeError("the native CPU kernels are not available on this machine")
        self.instruction_set = str(self.native.instruction_set())
        self.name = "cpu-vnni" if self.instruction_set == "avx512-vnni" else "cpu-avx2"
        # Both builds have an 8-bit lane kernel (matmul_w4_many): 16 rows per register on VNNI,
        # 8 on AVX2. The AVX2 build's also takes 15-bit activations (wide_lanes, below).
        vnni = bool(self.native.compiled_with_vnni())
        self.has_lane_kernel = True
        # lane_residuals: in a many-token call, the routed tokens' residual products go through
        # the lane kernel with 8-bit activations (reads the 4-bit plane as stored, no unpack; on
        # VNNI 1.6x the unpack + bfloat16 GEMM on Qwen2.5-1.5B's shapes at 51 rows). The
        # residual is a correction about 16x smaller than the base product, so its 8-bit
        # activations cost far less than 8 bits on the base would. False: unpack + GEMM.
        self.lane_residuals = bool(lane_residuals) and self.has_lane_kernel
        # base_wide_above: for a call whose tokens read the base plane alone, a block of 64
        # activations keeps 15 bits where its peak exceeds this many times its RMS, and takes 8
        # bits (one dot product per weight byte, not two) otherwise. ALL_WIDE (0, the default):
        # 15 bits everywhere; ALL_NARROW (inf): 8 bits everywhere, which on SmolLM2, fed token by
        # token, raised the default routing's KL from 0.040 to 0.056 for 4% more decode speed
        # (scripts/bench_activation_bits.py).
        if not base_wide_above >= 0:
            raise ValueError(f"base_wide_above must be >= 0 (0: all activations 15-bit, inf: all 8-bit), got {base_wide_above}")
        self.base_wide_above = float(base_wide_above)
        # lane_base: in a many-token call (prefill), the base plane's product too goes through the
        # 8-bit lane kernel (8-bit activations per block of 64, the plane read as stored) instead
        # of the 15-bit path (unpack + bfloat16 GEMM on VNNI, the 15-bit lanes on AVX2): one
        # maddubs / dpbusd per weight byte, not two. None: on in both builds. On AVX2 15 bits
        # have no faster path than the float32 GEMM's rate and 8 bits made Qwen2.5-1.5B's prefill
        # 1.6x faster; on Zen 4's VNNI the 16-row lanes made SmolLM2's 512-token default prefill
        # 1.48x faster than unpack + bfloat16 GEMM. Both builds then take the same 8-bit
        # arithmetic in prefill. Since the zero-point term uses the quantized activations' sum,
        # 8 bits cost 0-2% of KL on the rotated checkpoints (README, "8-bit activations in prefill").
        self.lane_base = (True if lane_base is None else bool(lane_base)) and self.has_lane_kernel
        self.tile = int(self.native.tile_rows())
        if dense_min_tokens == "auto":
            dense_min_tokens = DENSE_MIN_TOKENS.get(self.instruction_set, 16)
        self.vnni_dense_min_tokens = dense_min_tokens
        # lane_min_tokens: calls with at least this many tokens are "many-token" calls for the lane
        # kernels (the routed residuals, lane_base, wide_lanes); None: never.
        self.lane_min_tokens = dense_min_tokens if vnni or dense_min_tokens is None else min(dense_min_tokens, AVX2_LANE_MIN_TOKENS)
        # wide_lanes: a many-token call's 15-bit plane products (the base plane's where lane_base
        # is off, and any plane every token reads) go through the 8-row lane kernel with matmul_w4's 15-bit activations
        # per block of 64, reading the plane as stored, instead of unpack + dense GEMM (or the
        # one-token kernel below DENSE_MIN_TOKENS). Default: on in the AVX2 build, where the dense
        # GEMM is float32 and the lanes measured faster at every call size from 16 tokens
        # (AVX2_LANE_MIN_TOKENS); off in the VNNI build, whose bfloat16 GEMM runs at twice float32's rate.
        self.wide_lanes = (not vnni) if wide_lanes is None else bool(wide_lanes)
        self._dense_buffer: torch.Tensor | None = None

    # --- 4-bit planes -------------------------------------------------------------------------
    def takes_plane(self, plane: Plane) -> bool:
        in_features = plane.qweight.shape[1] * 2
        group_size = plane.spec.group_size
        return group_size % BLOCK == 0 and (CHUNK_BLOCKS * BLOCK) % group_size == 0 and in_features % group_size == 0

    def prepare_plane(self, plane: Plane):
        if not self.takes_plane(plane):
            return super().prepare_plane(plane)
        codes = unpack_int4(plane.qweight)
        group_size = plane.spec.group_size
        levels = plane.spec.levels
        return TiledPlane(
            huge_page_copy(tile_plane_codes(codes, self.tile)),
            tile_group_params(plane.scales, self.tile, group_size),
            tile_group_params(plane.zeros_or_implied(), self.tile, group_size),
            group_size,
            codes.shape[0],
            levels=None if levels is None else torch.tensor(levels, dtype=torch.uint8),
        )

    def dequantize_plane(self, prepared, out: torch.Tensor | None = None) -> torch.Tensor:
        """The plane as a ``dense_dtype`` (out_features, in_features) matrix, written into ``out`` if given."""
        if type(prepared) is not TiledPlane:
            return super().dequantize_plane(prepared)
        shape = (prepared.out_features, prepared.weight.shape[1] * 2)
        if out is None:
            out = torch.empty(shape, dtype=self.dense_dtype)
        return self.native.dequantize_w4(
            prepared.weight, prepared.scales, prepared.zeros, prepared.group_size, prepared.first_row, out, prepared.levels
        )

    def _scratch(self, shape: tuple[int, int]) -> torch.Tensor:
        """A reused ``dense_dtype`` buffer for many-token calls: a fresh matrix per call would be
        page-faulted in every time (most of the dense path's cost on Qwen-sized planes)."""
        needed = shape[0] * shape[1]
        if self._dense_buffer is None or self._dense_buffer.numel() < needed or self._dense_buffer.dtype != self.dense_dtype:
            self._dense_buffer = torch.empty(needed, dtype=self.dense_dtype)
        return self._dense_buffer[:needed].view(shape)

    def matmul_plane_sum(self, x: torch.Tensor, planes: list) -> torch.Tensor | None:
        """x times the sum of ``planes`` (the nested planes a token of one tier reads), as one
        dense product: the planes are summed in float32 while unpacking (and rounded to bfloat16
        once where that is the dense type). For many-token calls only (None otherwise, or for
        planes of different layouts), where it spares routed tokens a base-plane product
        followed by a residual one."""
        if self.vnni_dense_min_tokens is None or x.shape[0] < self.vnni_dense_min_tokens or len(planes) > 4:
            return None
        first = planes[0]
        if any(
            type(p) is not TiledPlane or p.group_size != first.group_size or p.first_row != first.first_row
            or p.out_features != first.out_features or p.weight.shape != first.weight.shape
            for p in planes
        ):
            return None
        weight = self._scratch((first.out_features, first.weight.shape[1] * 2))
        levels = [p.levels if p.levels is not None else _EVEN for p in planes] if any(p.levels is not None for p in planes) else []
        self.native.dequantize_w4_sum(
            [p.weight for p in planes], [p.scales for p in planes], [p.zeros for p in planes], first.group_size, first.first_row, weight,
            levels,
        )
        return torch.mm(x.to(self.dense_dtype), weight.t())

    def _many(self, tokens: int) -> bool:
        return self.lane_min_tokens is not None and tokens >= self.lane_min_tokens

    def _lanes(self, x: torch.Tensor, prepared: TiledPlane, wide: bool) -> torch.Tensor:
        """x times the plane through the lane kernel: 15-bit activations (wide, the AVX2 kernel)
        or 8-bit (the build's own: 16 rows per register on VNNI, 8 on AVX2)."""
        args = (x.to(torch.float32).contiguous(), prepared.weight, prepared.scales, prepared.zeros, prepared.group_size,
                prepared.first_row, prepared.out_features)
        if wide:
            return self.native.matmul_w4_lanes(*args, True, prepared.levels)
        return self.native.matmul_w4_many(*args, prepared.levels)

    def matmul_plane(self, x: torch.Tensor, prepared) -> torch.Tensor:
        if type(prepared) is not TiledPlane:
            return super().matmul_plane(x, prepared)
        if self.wide_lanes and self._many(x.shape[0]):
            return self._lanes(x, prepared, wide=True)
        if self.vnni_dense_min_tokens is not None and x.shape[0] >= self.vnni_dense_min_tokens:
            weight = self.dequantize_plane(prepared, self._scratch((prepared.out_features, prepared.weight.shape[1] * 2)))
            return torch.mm(x.to(self.dense_dtype), weight.t())
        return self.native.matmul_w4(
            x.to(torch.float32).contiguous(), prepared.weight, prepared.scales, prepared.zeros, prepared.group_size, ALL_WIDE,
            prepared.first_row, prepared.out_features, prepared.levels,
        )

    def matmul_routed(self, x: torch.Tensor, prepared, call_tokens: int) -> torch.Tensor:
        """x: the rows of a call's routed tokens (of ``call_tokens`` in the call) times a residual
        plane. Many-token calls take the lane kernel (see ``lane_residuals``); a few-token call
        (decode) keeps matmul_plane's 15-bit activations, so a token's arithmetic does not depend
        on how many others were routed with it."""
        if self.lane_residuals and type(prepared) is TiledPlane and self._many(call_tokens):
            return self._lanes(x, prepared, wide=False)
        return self.matmul_plane(x, prepared)

    def matmul_routed_add(self, x: torch.Tensor, indices: torch.Tensor, prepared, out: torch.Tensor) -> bool:
        """``out[indices] += x[indices]`` times a residual plane, in place, in one native call that
        reads the routed rows of x where they are and adds into out's rows: no gathered copy of x
        and no index_add_ (the build's 8-bit lanes, the arithmetic of :meth:`matmul_routed`).
        Returns False, having done nothing, where that call does not apply (the caller then
        gathers, multiplies and scatters)."""
        rows_add = getattr(self.native, "matmul_w4_rows_add", None)
        if (
            rows_add is None or not self.lane_residuals or type(prepared) is not TiledPlane or not self._many(x.shape[0])
            or x.dtype != torch.float32 or not x.is_contiguous() or out.dtype != torch.float32 or not out.is_contiguous()
            or indices.dtype != torch.int64 or indices.device.type != "cpu"
        ):
            return False
        rows_add(x, indices.contiguous(), prepared.weight, prepared.scales, prepared.zeros, prepared.group_size,
                 prepared.first_row, prepared.out_features, out, prepared.levels)
        return True

    def matmul_base(self, x: torch.Tensor, prepared, alone: bool) -> torch.Tensor:
        """The base plane's product; ``alone``: no token of this call reads a residual plane."""
        if type(prepared) is TiledPlane:
            many = self._many(x.shape[0])
            if many and self.lane_base:
                return self._lanes(x, prepared, wide=False)
            if not many and alone and self.base_wide_above != ALL_WIDE:
                return self.native.matmul_w4(
                    x.to(torch.float32).contiguous(), prepared.weight, prepared.scales, prepared.zeros, prepared.group_size,
                    self.base_wide_above, prepared.first_row, prepared.out_features, prepared.levels,
                )
        return self.matmul_plane(x, prepared)

    def many_token_input_dtype(self) -> torch.dtype:
        """The dtype a many-token (prefill) base product reads without converting its input:
        float32 where the lane kernels take it (lane_base or wide_lanes: the AVX2 build),
        else the dense GEMM's (bfloat16 on VNNI). tap_runtime.dense_mlp makes the down
        projection's input in it."""
        return torch.float32 if self.lane_base or self.wide_lanes else self.dense_dtype

    def set_base_activation_bits(self, bits: int) -> None:
        """15: the base plane's products take 15-bit activations everywhere (in many-token calls
        bfloat16 on VNNI, the 15-bit lanes on AVX2). 8: 8 bits per block of 64 in every call whose
        tokens read the base plane alone (decode) and in every many-token call's base product
        (prefill). The constructor's default is neither: 15 bits in decode, and in prefill 8 on
        AVX2 and 15 on VNNI (``lane_base``)."""
        if bits not in BASE_ACTIVATION_BITS:
            raise ValueError(f"base activation bits must be one of {BASE_ACTIVATION_BITS}, got {bits!r}")
        self.base_wide_above = ALL_NARROW if bits == 8 else ALL_WIDE
        self.lane_base = bits == 8 and self.has_lane_kernel

    def fuse_planes(self, parts: list):
        if all(type(p) in (_PackedPlane, SplitPlane) for p in parts):
            return super().fuse_planes(parts)
        if not all(type(p) is TiledPlane for p in parts):
            return None
        if len({p.group_size for p in parts}) != 1 or len({p.weight.shape[1] for p in parts}) != 1:
            return None
        if len({None if p.levels is None else tuple(p.levels.tolist()) for p in parts}) != 1:
            return None  # one stacked plane has one level table
        if any(p.out_features % self.tile or p.first_row or p.weight.shape[0] != p.out_features for p in parts):
            return None  # padded rows between the parts, or parts that are views already
        # Each chunk of the stack is the parts' chunks one after the other (whole tiles each), so
        # stacking copies byte ranges: nothing is unpacked, and the only new memory is the stack.
        group_size = parts[0].group_size
        blocks = parts[0].weight.shape[1] * 2 // BLOCK
        rows = [p.weight.shape[0] for p in parts]
        weight = huge_page_copy(_stack_chunks([p.weight for p in parts], rows, blocks, 1, BLOCK // 2).view(sum(rows), -1))
        per_block = group_size // BLOCK
        scales = _stack_chunks([p.scales for p in parts], rows, blocks, per_block, 1).view(sum(rows), -1)
        zeros = _stack_chunks([p.zeros for p in parts], rows, blocks, per_block, 1).view(sum(rows), -1)
        levels = parts[0].levels
        fused = TiledPlane(weight, scales, zeros, group_size, sum(p.out_features for p in parts), levels=levels)
        views, offset = [], 0
        for p in parts:
            views.append(TiledPlane(weight, scales, zeros, group_size, p.out_features, offset, levels))
            offset += p.out_features
        return fused, views

    # --- 8-bit rows (output head) ---------------------------------------------------------------
    def prepare_rows(self, rows: RowQuantized):
        if rows.qweight.shape[1] % _ROW_CHUNK:
            return super().prepare_rows(rows)
        qweight = rows.qweight
        count, width = qweight.shape
        tiled = huge_page_empty((-(-count // self.tile) * self.tile, width), torch.int8)
        code_sums = torch.empty(count, dtype=torch.int32)
        # A slice of rows at a time, handing each slice's pages back once copied: the rows usually
        # view the mapped shard (or a tied embedding's mapping), and the head is the largest
        # tensor (233 MB on Qwen2.5-1.5B), so copying it whole would hold both at once. An
        # embedding lookup afterwards faults back only the rows it reads.
        for start in range(0, count, _PREPARE_ROWS_CHUNK):
            stop = min(start + _PREPARE_ROWS_CHUNK, count)
            part = qweight[start:stop]
            tiled[start : start + -(-(stop - start) // self.tile) * self.tile] = tile_rows(part, self.tile)
            code_sums[start:stop] = part.sum(dim=1, dtype=torch.int32)
            page_out(part)
        return TiledRows(tiled, rows.scales.to(torch.float32).contiguous(), code_sums, count)

    def matmul_rows(self, x: torch.Tensor, prepared) -> torch.Tensor:
        if type(prepared) is _PackedRows:
            return super().matmul_rows(x, prepared)
        if self.vnni_dense_min_tokens is None or x.shape[0] < self.vnni_dense_min_tokens:
            return self.native.matmul_w8(x.to(torch.float32).contiguous(), prepared.weight, prepared.scales, prepared.code_sums)
        # Many tokens: unpack the head a slice of rows at a time and multiply densely.
        x16 = x.to(self.dense_dtype)
        out = torch.empty(x.shape[0], prepared.out_features, dtype=torch.float32)
        for start in range(0, prepared.out_features, _DENSE_ROWS_CHUNK):
            stop = min(start + _DENSE_ROWS_CHUNK, prepared.out_features)
            tile_start, tile_stop = start // self.tile * self.tile, -(-stop // self.tile) * self.tile
            codes = untile_rows(prepared.weight[tile_start:tile_stop], self.tile)[start - tile_start : stop - tile_start]
            weight = (codes.to(torch.float32) * prepared.scales[start:stop].unsqueeze(-1)).to(self.dense_dtype)
            out[:, start:stop] = torch.mm(x16, weight.t())
        return out
