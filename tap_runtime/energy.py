"""Energy of a stretch of work: measured from hardware counters where they exist, else estimated.

Readings always say how they were obtained (``method``): ``measured-nvml`` (NVIDIA's
total-energy counter), ``measured-amdsmi`` (AMD's energy accumulator), ``measured-rapl``
(Linux powercap, CPU packages) or ``estimated`` (bytes moved and operations executed times
published per-operation energies, named in the reading). An estimate is never reported as a
measurement. The shape follows Zeus: ``begin_window(name)`` ... ``end_window(name)``, or a
``with`` block.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "EnergyReading",
    "WorkCounts",
    "EnergyEstimator",
    "EnergyMonitor",
    "HOROWITZ_45NM",
    "available_counters",
]

_log = logging.getLogger(__name__)
_POWERCAP = Path("/sys/class/powercap")


@dataclass(frozen=True)
class WorkCounts:
    """What a stretch of work moved and computed; the estimate's inputs.

    weight_bytes: bytes of weights read (for TAP: the planes each token's tier reads).
    cache_bytes: bytes of KV cache / activations read and written.
    macs_by_dtype: multiply-accumulates per operand type, e.g. {"int4": ..., "bf16": ...}.
    """

    weight_bytes: float = 0.0
    cache_bytes: float = 0.0
    macs_by_dtype: dict[str, float] = field(default_factory=dict)

    def __add__(self, other: "WorkCounts") -> "WorkCounts":
        macs = dict(self.macs_by_dtype)
        for key, value in other.macs_by_dtype.items():
            macs[key] = macs.get(key, 0.0) + value
        return WorkCounts(self.weight_bytes + other.weight_bytes, self.cache_bytes + other.cache_bytes, macs)


# Energies per operation from M. Horowitz, "Computing's energy problem (and what we can do about
# it)", ISSCC 2014, 45 nm at 0.9 V: DRAM read 1.3-2.6 nJ per 64 bits (upper end: 2.6 nJ / 8 B),
# fp32 multiply 3.7 pJ + add 0.9 pJ, fp16 multiply 1.1 pJ + add 0.4 pJ, int8 multiply 0.2 pJ +
# add 0.03 pJ (int32 add 0.1 pJ). int4 MACs are counted at the int8 figure (no smaller one is
# published there); bf16 at the fp16 figure. Newer processes scale all of these down, but the
# ratio of memory to arithmetic energy, which decides the savings, changes far less.
HOROWITZ_45NM = {
    "source": "M. Horowitz, Computing's energy problem, ISSCC 2014 (45 nm, 0.9 V)",
    "dram_pj_per_byte": 2600.0 / 8,
    "mac_pj": {"fp32": 3.7 + 0.9, "fp16": 1.1 + 0.4, "bf16": 1.1 + 0.4, "int8": 0.2 + 0.03, "int4": 0.2 + 0.03},
}


@dataclass
class EnergyReading:
    """Energy of one window. ``method`` says whether it was measured and by which counter."""

    name: str
    joules: float
    seconds: float
    method: str
    source: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        return self.method.startswith("measured-")

    @property
    def watts(self) -> float:
        return self.joules / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "joules": self.joules,
            "seconds": self.seconds,
            "watts": self.watts,
            "method": self.method,
            "source": self.source,
            "details": self.details,
        }


class EnergyEstimator:
    """Energy from work counts and per-operation energies (default: :data:`HOROWITZ_45NM`)."""

    def __init__(self, constants: dict[str, Any] | None = None):
        self.constants = constants or HOROWITZ_45NM

    def joules(self, work: WorkCounts) -> float:
        c = self.constants
        memory_pj = (work.weight_bytes + work.cache_bytes) * c["dram_pj_per_byte"]
        compute_pj = 0.0
        for dtype, macs in work.macs_by_dtype.items():
            if dtype not in c["mac_pj"]:
                raise ValueError(f"no energy per MAC for {dtype!r}; known: {sorted(c['mac_pj'])}")
            compute_pj += macs * c["mac_pj"][dtype]
        return (memory_pj + compute_pj) * 1e-12

    def describe(self) -> str:
        c = self.constants
        macs = ", ".join(f"{k} {v:g} pJ/MAC" for k, v in c["mac_pj"].items())
        return f"estimate: DRAM {c['dram_pj_per_byte']:g} pJ/byte, {macs}; from {c['source']}"


# ----- counters ------------------------------------------------------------------------------
class _NvmlCounter:
    method = "measured-nvml"

    def __init__(self, index: int):
        import pynvml  # from nvidia-ml-py

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(self._handle)
        self.source = f"NVML nvmlDeviceGetTotalEnergyConsumption, GPU {index} ({name if isinstance(name, str) else name.decode()})"
        self.read_joules()  # raises NVMLError_NotSupported on GPUs before Volta

    def read_joules(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0  # mJ -> J


class _AmdSmiCounter:
    method = "measured-amdsmi"

    def __init__(self, index: int):
        import amdsmi

        amdsmi.amdsmi_init()
        self._amdsmi = amdsmi
        self._handle = amdsmi.amdsmi_get_processor_handles()[index]
        self.source = f"amdsmi amdsmi_get_energy_count, GPU {index}"
        self.read_joules()

    def read_joules(self) -> float:
        info = self._amdsmi.amdsmi_get_energy_count(self._handle)
        accumulator = info.get("energy_accumulator", info.get("power"))
        resolution = info.get("counter_resolution", 15.3)  # microjoules per count
        return float(accumulator) * float(resolution) * 1e-6


class _RaplCounter:
    """Sum of the CPU package domains of Linux powercap (intel-rapl / amd via the same files)."""

    method = "measured-rapl"

    def __init__(self, root: Path = _POWERCAP):
        self._domains: list[tuple[Path, float]] = []
        for domain in sorted(root.glob("intel-rapl:*")):
            if domain.name.count(":") != 1:
                continue  # sub-domains (core, uncore, dram) are inside the package figure
            energy = domain / "energy_uj"
            if not energy.is_file():
                continue
            energy.read_text()  # raises PermissionError when not readable (often root-only)
            max_range = float((domain / "max_energy_range_uj").read_text())
            self._domains.append((energy, max_range))
        if not self._domains:
            raise FileNotFoundError(f"no readable RAPL package domain under {root}")
        self.source = f"Linux powercap RAPL, {len(self._domains)} package domain(s) under {root}"
        self._last = [float(path.read_text()) for path, _ in self._domains]
        self._total_uj = 0.0

    def read_joules(self) -> float:
        for i, (path, max_range) in enumerate(self._domains):
            now = float(path.read_text())
            delta = now - self._last[i]
            if delta < 0:  # the counter wrapped
                delta += max_range
            self._total_uj += delta
            self._last[i] = now
        return self._total_uj * 1e-6


def _open_counter(kind: str, index: int, powercap_root: Path):
    if kind == "nvml":
        return _NvmlCounter(index)
    if kind == "amdsmi":
        return _AmdSmiCounter(index)
    if kind == "rapl":
        return _RaplCounter(powercap_root)
    raise ValueError(f"unknown energy counter {kind!r}; expected nvml, amdsmi or rapl")


def available_counters(device: torch.device | str = "cpu", powercap_root: Path = _POWERCAP) -> dict[str, str]:
    """Which counters can be read for ``device``: {kind: source or the reason it cannot}."""
    device = torch.device(device)
    kinds = ("nvml", "amdsmi") if device.type == "cuda" else ("rapl",)
    found = {}
    for kind in kinds:
        try:
            found[kind] = _open_counter(kind, device.index or 0, powercap_root).source
        except Exception as error:  # noqa: BLE001 - every failure is a reason to report
            found[kind] = f"unavailable: {type(error).__name__}: {error}"
    return found


class EnergyMonitor:
    """Energy per named window on ``device``: a hardware counter when readable, else an estimate.

    Example:
        >>> monitor = EnergyMonitor("cpu")
        >>> monitor.begin_window("decode")
        >>> reading = monitor.end_window("decode", work=WorkCounts(weight_bytes=1e6))
        >>> reading.method in ("measured-rapl", "estimated")
        True
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        estimator: EnergyEstimator | None = None,
        counter: str | None = None,
        powercap_root: Path = _POWERCAP,
    ):
        self.device = torch.device(device)
        self.estimator = estimator or EnergyEstimator()
        self.counter = None
        self.unavailable: dict[str, str] = {}
        kinds = [counter] if counter else (["nvml", "amdsmi"] if self.device.type == "cuda" else ["rapl"])
        for kind in kinds:
            try:
                self.counter = _open_counter(kind, self.device.index or 0, powercap_root)
                break
            except Exception as error:  # noqa: BLE001 - fall back to the next counter, then the estimate
                self.unavailable[kind] = f"{type(error).__name__}: {error}"
        if self.counter is None and counter:
            raise RuntimeError(f"energy counter {counter!r} is not readable here: {self.unavailable[counter]}")
        self._windows: dict[str, tuple[float, float | None]] = {}
        self.last: EnergyReading | None = None

    @property
    def method(self) -> str:
        return self.counter.method if self.counter is not None else "estimated"

    def _sync(self) -> None:
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)

    def begin_window(self, name: str) -> None:
        if name in self._windows:
            raise ValueError(f"energy window {name!r} is already open")
        self._sync()
        joules = self.counter.read_joules() if self.counter is not None else None
        self._windows[name] = (time.perf_counter(), joules)

    def end_window(self, name: str, work: WorkCounts | None = None) -> EnergyReading:
        """Close ``name``. ``work`` is required when no counter exists (it is what gets estimated)."""
        if name not in self._windows:
            raise ValueError(f"energy window {name!r} was never begun")
        self._sync()
        start, start_joules = self._windows.pop(name)
        seconds = time.perf_counter() - start
        details: dict[str, Any] = {}
        if work is not None:
            details["estimated_joules"] = self.estimator.joules(work)
            details["estimate_source"] = self.estimator.describe()
        if self.counter is not None:
            joules = self.counter.read_joules() - start_joules
            reading = EnergyReading(name, joules, seconds, self.counter.method, self.counter.source, details)
        else:
            if work is None:
                raise ValueError(
                    f"no energy counter is readable here ({self.unavailable}); pass work=WorkCounts(...) to estimate"
                )
            details["counters_unavailable"] = dict(self.unavailable)
            reading = EnergyReading(name, details["estimated_joules"], seconds, "estimated", self.estimator.describe(), details)
        self.last = reading
        return reading

    # ----- with-block form: one anonymous window ------------------------------------------------
    def __enter__(self) -> "EnergyMonitor":
        self.begin_window("__with__")
        self.work: WorkCounts | None = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            self._windows.pop("__with__", None)
            return
        self.end_window("__with__", work=self.work)
