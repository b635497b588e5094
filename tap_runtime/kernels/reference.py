"""Plain-torch reference kernel: dequantize to float32 once, then an ordinary matmul.

Slow and memory-hungry on purpose: it is the ground truth the packed kernels are tested against.
"""

from __future__ import annotations

import torch

from ..planes import Plane, RowQuantized, dequantize_plane, dequantize_rows

__all__ = ["ReferenceKernel"]


class ReferenceKernel:
    name = "reference"

    def prepare_plane(self, plane: Plane) -> torch.Tensor:
        return dequantize_plane(plane, torch.float32)  # (out_features, in_features)

    def matmul_plane(self, x: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) @ prepared.t()

    def prepare_rows(self, rows: RowQuantized) -> torch.Tensor:
        return dequantize_rows(rows, torch.float32)

    def matmul_rows(self, x: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) @ prepared.t()
