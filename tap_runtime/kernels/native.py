"""Build (once per machine) and load TAP's own C++ CPU kernels (csrc/tap_cpu_int4.cpp, with the
decode step's fused small operations and whole-layer step from csrc/tap_decode_ops.cpp and the
prefill's causal attention from csrc/tap_prefill_attention.cpp in the same module).

The extension is compiled on first use with torch's cpp_extension (ninja + the system C++
compiler, ``-march=native``) into torch's extension cache, so every machine gets code for its
own CPU: AVX-512 VNNI where the CPU has it, else AVX2 + FMA + F16C (the same products with
maddubs/madd for VNNI's dot product, and 8-row lanes for 16-row ones; ``instruction_set()`` says
which; ``TAP_NATIVE_MARCH=znver3`` builds the AVX2 variant on an AVX-512 machine, for testing
it). It is optional: without a compiler, on a CPU with neither, or with
``TAP_NATIVE_KERNELS=0``, :func:`native_kernels` returns None with the reason in
:func:`native_unavailable_reason`, and the runtime uses torch's packed kernels instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["native_kernels", "native_unavailable_reason", "cpu_flags", "SOURCE", "SOURCES", "HEADERS"]

SOURCE = Path(__file__).with_name("csrc") / "tap_cpu_int4.cpp"
SOURCES = (SOURCE, SOURCE.with_name("tap_decode_ops.cpp"), SOURCE.with_name("tap_prefill_attention.cpp"))
HEADERS = (SOURCE.with_name("vector_exp.h"),)
# TAP_NATIVE_MARCH: the -march to build for (default native). A developer on an AVX-512 machine
# can build and test the AVX2 build with TAP_NATIVE_MARCH=znver3 (or haswell).
_FLAGS = ["-O3", f"-march={os.environ.get('TAP_NATIVE_MARCH', 'native')}", "-fopenmp"]
_log = logging.getLogger(__name__)
_state: dict[str, object] = {}


def cpu_flags() -> str:
    """The CPU's feature flags as /proc/cpuinfo lists them (the processor's name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _module_name() -> str:
    # One build per source, CPU and torch: a home directory shared by different machines must
    # not hand one CPU's -march=native code to another.
    digest = hashlib.sha256()
    for part in (*(source.read_bytes() for source in SOURCES + HEADERS), cpu_flags().encode(), torch.__version__.encode(), " ".join(_FLAGS).encode()):
        digest.update(part)
    return f"tap_cpu_int4_{digest.hexdigest()[:12]}"


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load

    return load(_module_name(), [str(source) for source in SOURCES], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], verbose=False)


def native_kernels() -> ModuleType | None:
    """The compiled extension, or None when it cannot be used here (reason logged once)."""
    if "module" not in _state:
        module, reason = None, None
        if os.environ.get("TAP_NATIVE_KERNELS", "1") == "0":
            reason = "disabled by TAP_NATIVE_KERNELS=0"
        elif platform.machine().lower() not in ("x86_64", "amd64"):
            reason = f"the native kernels are x86-64 only (this is {platform.machine()})"
        else:
            try:
                module = _build()
            except Exception as error:  # no compiler, no ninja, a failed build: all mean "not here"
                reason = f"building {SOURCE.name} failed: {type(error).__name__}: {str(error).strip()[:300]}"
            else:
                if not module.instruction_set():
                    module, reason = None, "this CPU lacks both AVX-512 VNNI and AVX2 + FMA + F16C"
        _state["module"], _state["reason"] = module, reason
        if reason:
            _log.info("TAP native CPU kernels unavailable: %s; using torch's packed kernels", reason)
    return _state["module"]  # type: ignore[return-value]


def native_unavailable_reason() -> str | None:
    native_kernels()
    return _state["reason"]  # type: ignore[return-value]
