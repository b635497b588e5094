"""Kernel choice: the fastest packed kernel available for the device, the reference otherwise.

CPU: TAP's own kernels (built on first use, see .native) where a compiler is present and the
CPU has AVX-512 VNNI (``cpu-vnni``) or AVX2 + FMA + F16C (``cpu-avx2``), else torch's packed
int4/int8 CPU ops (``cpu-packed``). CUDA (sm80+): torch's
tinygemm int4 and int8 ops.

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
from .native import native_kernels, native_unavailable_reason
from .reference import ReferenceKernel
from .vnni import CpuVnniKernel

__all__ = [
    "Kernel",
    "CpuPackedKernel",
    "CpuVnniKernel",
    "CudaPackedKernel",
    "ReferenceKernel",
    "KERNEL_NAMES",
    "select_kernel",
]

KERNEL_NAMES = ("auto", "cpu-vnni", "cpu-avx2", "cpu-packed", "cuda-packed", "reference")
_NATIVE_BUILDS = {"cpu-vnni": "avx512-vnni", "cpu-avx2": "avx2"}
_log = logging.getLogger(__name__)


def select_kernel(name: str = "auto", device: torch.device | str = "cpu") -> Kernel:
    """Pick a kernel by name; ``auto`` takes the device's packed kernel when torch has it."""
    device = torch.device(device)
    if name not in KERNEL_NAMES:
        raise InvalidConfigError(f"kernel {name!r} is unknown; expected one of {list(KERNEL_NAMES)}.")
    if name == "reference":
        return ReferenceKernel(device)
    native = native_kernels() if device.type == "cpu" and cpu_kernels_available() else None
    build = native.instruction_set() if native is not None else ""
    if native is not None and (name == "auto" or _NATIVE_BUILDS.get(name) == build):
        return CpuVnniKernel()
    if name in _NATIVE_BUILDS:
        if device.type != "cpu":
            reason = f"it needs device cpu; got {device}"
        elif native is None:
            reason = native_unavailable_reason() or "torch's packed CPU ops are missing"
        else:
            reason = f"this CPU's native build is {build!r} (kernel 'cpu-{'vnni' if build == 'avx512-vnni' else 'avx2'}')"
        raise InvalidConfigError(f"kernel {name!r} is not available: {reason}. Use kernel='auto'.")
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
