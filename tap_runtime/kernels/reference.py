"""Plain-torch reference kernel: dequantize to float32 once, then an ordinary matmul.

Slow and memory-hungry on purpose: it is the ground truth the packed kernels are tested against.
"""

from __future__ import annotations

import torch

from ..planes import Plane, RowQuantized, dequantize_plane, dequantize_rows

__all__ = ["ReferenceKernel"]


class ReferenceKernel:
    name = "reference"

    def __init__(self, device: torch.device | str | None = None):
        self.device = None if device is None else torch.device(device)

    def _placed(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.device is None else tensor.to(self.device)

    def prepare_plane(self, plane: Plane) -> torch.Tensor:
        return self._placed(dequantize_plane(plane, torch.float32))  # (out_features, in_features)

    def matmul_plane(self, x: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) @ prepared.t()

    def prepare_rows(self, rows: RowQuantized) -> torch.Tensor:
        return self._placed(dequantize_rows(rows, torch.float32))

    def matmul_rows(self, x: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) @ prepared.t()
