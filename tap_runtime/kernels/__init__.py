"""Kernel choice: the fastest packed kernel available for the device, the reference otherwise.

CPU: torch's packed int4/int8 CPU ops. CUDA (sm80+): torch's tinygemm int4 and int8 ops.

Like optimum-quanto, the choice is made once per model; ``kernel="reference"`` forces the plain
torch path (for tests and debugging).
"""

from __future__ import annotations

import logging

import torch

from ..errors import InvalidConfigError
from .base import Kernel
from .cpu import CpuPackedKernel, cpu_kernels_available
from .cuda import CudaPackedKernel, cuda_kernels_available
from .reference import ReferenceKernel

__all__ = ["Kernel", "CpuPackedKernel", "CudaPackedKernel", "ReferenceKernel", "KERNEL_NAMES", "select_kernel"]

KERNEL_NAMES = ("auto", "cpu-packed", "cuda-packed", "reference")
_log = logging.getLogger(__name__)


def select_kernel(name: str = "auto", device: torch.device | str = "cpu") -> Kernel:
    """Pick a kernel by name; ``auto`` takes the device's packed kernel when torch has it."""
    device = torch.device(device)
    if name not in KERNEL_NAMES:
        raise InvalidConfigError(f"kernel {name!r} is unknown; expected one of {list(KERNEL_NAMES)}.")
    if name == "reference":
        return ReferenceKernel(device)
    if name in ("auto", "cpu-packed") and device.type == "cpu" and cpu_kernels_available():
        return CpuPackedKernel()
    if name in ("auto", "cuda-packed") and device.type == "cuda" and cuda_kernels_available():
        return CudaPackedKernel(device)
    if name != "auto":
        needs = "device cpu and torch's packed int4/int8 CPU ops" if name == "cpu-packed" else "a CUDA device of compute capability >= 8.0"
        raise InvalidConfigError(
            f"kernel {name!r} needs {needs}; got device {device} and torch {torch.__version__}. Use kernel='auto'."
        )
    _log.warning("no packed kernel for device %s in torch %s; using the reference kernel", device, torch.__version__)
    return ReferenceKernel(device)
