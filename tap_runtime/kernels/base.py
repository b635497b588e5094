"""The interface every kernel implements: prepare quantized tensors once, then multiply.

A kernel turns the portable planes read from disk into whatever layout it multiplies fastest,
so checkpoints stay independent of the machine that runs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..planes import Plane, RowQuantized

__all__ = ["Kernel", "SplitPlane"]


@dataclass
class SplitPlane:
    """A plane with a level table, prepared by a kernel that multiplies even codes only: its two
    even parts (tap_runtime.planes.split_levels), each in that kernel's own layout. The product
    is the sum of the parts' products."""

    parts: tuple[Any, Any]


class Kernel(Protocol):
    """Weight-only quantized matmul.

    Outputs come in the kernel's own dtype (bfloat16 for the packed kernels, float32 for the
    reference): a token on the base tier needs no widening; callers widen to float32 before
    adding residual planes, so those add without loss.
    """

    name: str

    def prepare_plane(self, plane: Plane) -> Any:
        """Convert one 4-bit plane (out_features, in_features) to the kernel's own layout."""

    def matmul_plane(self, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        """x (tokens, in_features) @ plane.T -> (tokens, out_features) in the kernel's dtype."""

    def prepare_rows(self, rows: RowQuantized) -> Any:
        """Convert an 8-bit row-wise matrix (out_features, in_features) to the kernel's layout.

        ``rows.column_scales`` is always None here: the head folds column scales into its input.
        """

    def matmul_rows(self, x: torch.Tensor, prepared: Any) -> torch.Tensor:
        """x (tokens, in_features) @ rows.T -> (tokens, out_features) in the kernel's dtype."""
