"""Block Walsh-Hadamard rotation of a linear's input (incoherence processing, as in QuIP#/QuaRot).

A linear y = x W^T equals (x H)(W H)^T for any orthogonal H. With H block-diagonal, made of
normalised Hadamard blocks, W H spreads each row's outlier weights over their block, so 4-bit
groups of W H round with less error: on gemma-3-270m the base tier's layer-output error on
held-out calibration windows falls by about a third and tier 8's by half
(scripts/bench_rotation.py). A normalised Sylvester Hadamard block is symmetric and its own
inverse, so the same operation rotates an input, a weight's rows, or brings W H back to W.

The planes of a rotated linear store W H (LinearPolicy.input_rotation is the block size); the
runtime rotates each input once per projection before the plane products, in O(log b) adds per
value: the native kernels' fast Walsh-Hadamard transform where built, a small matmul elsewhere.
Converter and runtime both use these functions, so they cannot disagree on the rotation.
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "MAX_ROTATION_BLOCK",
    "MIN_ROTATION_BLOCK",
    "ROTATIONS",
    "rotation_block",
    "is_valid_rotation",
    "hadamard_matrix",
    "rotate_input",
    "rotate_weight",
    "rotate_second_moment",
    "rotate_mean_square",
]

# 32, 64 and 128 gave the same gain on gemma-3-270m; 64 divides every width of the supported
# families (576, 640, 768, 1536, 2048, 8960, ...) and equals the default group size.
MAX_ROTATION_BLOCK = 64
# Below this a block barely mixes anything; such widths stay unrotated.
MIN_ROTATION_BLOCK = 16
# The converter's choices: rotate every linear whose width allows it, or none.
ROTATIONS = ("hadamard", "none")


def rotation_block(in_features: int, limit: int = MAX_ROTATION_BLOCK) -> int:
    """The Hadamard block for a linear of this input width: the largest power of two that
    divides it, at most ``limit``; 0 (no rotation) where that is below MIN_ROTATION_BLOCK."""
    block = in_features & -in_features  # lowest set bit: the largest power of two dividing it
    block = min(block, limit)
    return block if block >= MIN_ROTATION_BLOCK else 0


def is_valid_rotation(block: int, in_features: int) -> bool:
    """Whether a stored block size can rotate inputs of this width (0: none)."""
    return block == 0 or (block >= 2 and block & (block - 1) == 0 and in_features % block == 0)


@functools.lru_cache(maxsize=None)
def _hadamard(block: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < block:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return (matrix / block**0.5).to(device=device, dtype=dtype)


def hadamard_matrix(block: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix (block, block): symmetric, orthogonal."""
    if block < 1 or block & (block - 1):
        raise ValueError(f"a Hadamard block must be a power of two; got {block}")
    return _hadamard(block, str(device), dtype)


def rotate_input(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (..., in) times the block-diagonal Hadamard matrix, in float32 whatever x's dtype (a
    bfloat16 rotation would add its own rounding to every value); x itself when ``block`` is 0.

    A float32 CPU tensor goes through the native transform when the kernels are built (the
    decode step's whole-layer call uses the same one, so both paths agree bitwise).
    """
    if not block:
        return x
    x = x.to(torch.float32)
    if x.device.type == "cpu":
        from .kernels.native import native_kernels

        native = native_kernels()
        if native is not None and hasattr(native, "hadamard_blocks"):
            return native.hadamard_blocks(x.contiguous(), block)
    shape = x.shape
    blocks = x.reshape(*shape[:-1], shape[-1] // block, block)
    return (blocks @ hadamard_matrix(block, x.device, x.dtype)).reshape(shape)


def rotate_weight(weight: torch.Tensor, block: int) -> torch.Tensor:
    """W H for W (out, in): the matrix the planes store. Applied to W H it gives W back."""
    if not block:
        return weight
    shape = weight.shape
    blocks = weight.to(torch.float32).reshape(shape[0], shape[1] // block, block)
    return (blocks @ hadamard_matrix(block)).reshape(shape)


def rotate_second_moment(second_moment: torch.Tensor, block: int) -> torch.Tensor:
    """H^T S H for the inputs' second moment S (in, in), or the block means of a diagonal (in,):
    the statistics of the rotated inputs x H."""
    if not block:
        return second_moment
    if second_moment.dim() == 1:
        return rotate_mean_square(second_moment, block)
    left = rotate_weight(second_moment, block)  # S H
    return rotate_weight(left.t().contiguous(), block).t().contiguous()  # (S H)^T H = H S H


def rotate_mean_square(mean_square: torch.Tensor, block: int) -> torch.Tensor:
    """The diagonal of H^T diag(m) H: every channel of a block gets the block's mean, since each
    entry of a normalised Hadamard block squares to 1/block. Exact for the diagonal statistics
    (the inputs' correlations, which would add to it, are not known from them)."""
    if not block:
        return mean_square
    means = mean_square.reshape(-1, block).mean(dim=1, keepdim=True)
    return means.expand(-1, block).reshape(-1).clone()
