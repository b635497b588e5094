"""A residual-plane product that reads its routing flag on the GPU and skips the plane when unset.

Inside a captured CUDA graph every kernel runs on every replay, so a branch on the routing
decision needs either a conditional graph node (torch's ``CUDAGraph.begin_capture_to_if_node``,
from torch 2.13) or a kernel that looks at the flag itself. This is the second: a Triton
matrix-vector product over the plane's portable layout (two 4-bit codes per byte, low nibble
first; float16 group scales and zero points), ``out += x @ W_plane.T`` when ``flag`` is
nonzero. With the flag unset each program reads one byte and returns, so a token the router
keeps on the base tier reads none of the plane. Batch 1 only: it is the graph step's kernel.

Triton is optional (it ships with CUDA builds of torch); ``TRITON_INTERPRET=1`` runs the same
kernel on the CPU, which is how the tests check it without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

from ..planes import Plane

__all__ = ["gated_kernel_available", "gated_plane_add", "GATED_BLOCK_ROWS"]

GATED_BLOCK_ROWS = 32  # output rows per program


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def gated_kernel_available(device: torch.device | str) -> bool:
    """True when Triton can run the kernel for tensors on ``device``."""
    device = torch.device(device)
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=2)
def _kernel(interpreting: bool):
    """The jitted kernel, built on first use (and again if the interpreter is switched on)."""
    import triton
    import triton.language as tl

    @triton.jit
    def gated_w4_gemv(flag_ptr, x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, rows_total, columns, implied_zero,
                      GROUPS: tl.constexpr, GROUP: tl.constexpr, BLOCK_ROWS: tl.constexpr, HAS_ZEROS: tl.constexpr):
        if tl.load(flag_ptr) != 0:
            rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            live = rows < rows_total
            pairs = tl.arange(0, GROUP // 2)
            acc = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
            for g in range(0, GROUPS):
                packed = tl.load(q_ptr + rows[:, None] * (columns // 2) + g * (GROUP // 2) + pairs[None, :],
                                 mask=live[:, None], other=0)
                low = (packed & 15).to(tl.float32)
                high = (packed >> 4).to(tl.float32)
                x_even = tl.load(x_ptr + g * GROUP + 2 * pairs).to(tl.float32)
                x_odd = tl.load(x_ptr + g * GROUP + 2 * pairs + 1).to(tl.float32)
                dot = tl.sum(low * x_even[None, :] + high * x_odd[None, :], axis=1)
                x_sum = tl.sum(x_even + x_odd, axis=0)
                scale = tl.load(s_ptr + rows * GROUPS + g, mask=live, other=0).to(tl.float32)
                if HAS_ZEROS:
                    zero = tl.load(z_ptr + rows * GROUPS + g, mask=live, other=0).to(tl.float32)
                else:
                    zero = implied_zero
                # sum((q - z) * x) * s, with the zero taken out of the inner sum.
                acc += scale * (dot - zero * x_sum)
            before = tl.load(out_ptr + rows, mask=live, other=0)
            tl.store(out_ptr + rows, before + acc, mask=live)

    return gated_w4_gemv


def gated_plane_add(flag: torch.Tensor, x: torch.Tensor, plane: Plane, out: torch.Tensor) -> None:
    """``out += x @ dequantize(plane).T`` where ``flag`` (a 0-dim tensor) is nonzero, else nothing.

    x: (1, in) or (in,); out: float32 (1, out_features), contiguous, updated in place.
    """
    import triton

    if plane.spec.levels is not None:
        raise ValueError("gated_plane_add multiplies even codes only; this plane has a level table (PlaneSpec.levels)")
    out_features = plane.qweight.shape[0]
    in_features = plane.qweight.shape[1] * 2
    group_size = plane.spec.group_size
    if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != out_features:
        raise ValueError(f"gated_plane_add needs a contiguous float32 output of {out_features} values; got {out.dtype} {tuple(out.shape)}")
    if x.numel() != in_features or in_features % group_size:
        raise ValueError(f"gated_plane_add needs one token of {in_features} features in groups of {group_size}; got {tuple(x.shape)}")
    zeros = plane.zeros
    kernel = _kernel(_interpreting())
    grid = (triton.cdiv(out_features, GATED_BLOCK_ROWS),)
    kernel[grid](
        flag, x.reshape(-1).contiguous(), plane.qweight, plane.scales, zeros if zeros is not None else plane.scales, out,
        out_features, in_features, float(plane.spec.implied_zero),
        GROUPS=in_features // group_size, GROUP=group_size, BLOCK_ROWS=GATED_BLOCK_ROWS, HAS_ZEROS=zeros is not None,
    )
