"""Pack 4-bit codes two to a byte and back, exactly.

This is the portable on-disk layout (low nibble = even column). Kernels convert it to their
own tiled layouts at load time, so a checkpoint does not depend on the CPU or GPU that runs it.
"""

from __future__ import annotations

import torch

__all__ = ["pack_int4", "unpack_int4"]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes in [0, 15] into bytes.

    Args:
        codes: integer tensor (rows, cols) with even ``cols`` and values in [0, 15].
    Returns:
        uint8 tensor (rows, cols // 2); byte j holds column 2j in its low nibble.
    Example:
        >>> pack_int4(torch.tensor([[1, 2]])).tolist()
        [[33]]
    """
    if codes.dim() != 2 or codes.shape[1] % 2:
        raise ValueError(f"pack_int4 expects a 2-D tensor with an even number of columns; got {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("pack_int4 expects codes in [0, 15]")
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`.

    Args:
        packed: uint8 tensor (rows, cols // 2).
    Returns:
        uint8 tensor (rows, cols) of codes in [0, 15].
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_int4 expects a 2-D uint8 tensor; got {packed.dtype} {tuple(packed.shape)}")
    low = packed & 0x0F
    high = packed >> 4
    # (rows, cols // 2, 2) -> (rows, cols): interleave low and high nibbles back into columns.
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)
