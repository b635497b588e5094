"""MemoryTracker: peak memory per named window, and a leak check over repeated calls.

Peak RSS comes from the kernel's high-water mark (``VmHWM``, reset per window through
``/proc/self/clear_refs``) where Linux allows it, else from sampling (see
:class:`~tap_runtime.metrics.PeakMemory`); CUDA peaks from torch's allocator. Windows do not
nest: the kernel keeps one high-water mark per process.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from .metrics import PeakMemory

__all__ = ["MemoryReading", "LeakReport", "MemoryTracker"]


@dataclass
class MemoryReading:
    name: str
    peak_rss_bytes: int
    rss_after_bytes: int
    method: str
    cuda_peak_bytes: int | None


@dataclass
class LeakReport:
    """RSS after each call (after a warm-up and garbage collection) and its growth."""

    rss_after_each: list[int]
    growth_bytes: int
    growth_per_call_bytes: float
    cuda_after_each: list[int] | None

    def leaks(self, tolerance_bytes: int = 8 * 2**20) -> bool:
        return self.growth_bytes > tolerance_bytes


class MemoryTracker:
    """``begin_window(name)`` / ``end_window(name)`` for peaks; :meth:`leak_check` for growth."""

    def __init__(self) -> None:
        self._open: tuple[str, PeakMemory] | None = None
        self.readings: list[MemoryReading] = []

    def begin_window(self, name: str) -> None:
        if self._open is not None:
            raise ValueError(f"memory window {self._open[0]!r} is still open; windows do not nest (one VmHWM per process)")
        peak = PeakMemory()
        peak.__enter__()
        self._open = (name, peak)

    def end_window(self, name: str) -> MemoryReading:
        if self._open is None or self._open[0] != name:
            raise ValueError(f"memory window {name!r} was never begun")
        _, peak = self._open
        peak.__exit__(None, None, None)
        self._open = None
        reading = MemoryReading(name, peak.peak_rss_bytes, psutil.Process().memory_info().rss, peak.method, peak.cuda_peak_bytes)
        self.readings.append(reading)
        return reading

    @staticmethod
    def leak_check(call: Callable[[], Any], repeats: int = 10, warmup: int = 2) -> LeakReport:
        """Run ``call`` ``warmup + repeats`` times; report RSS after each measured call."""
        process = psutil.Process()
        for _ in range(warmup):
            call()
        rss, cuda = [], [] if torch.cuda.is_available() else None
        for _ in range(repeats):
            call()
            gc.collect()
            rss.append(process.memory_info().rss)
            if cuda is not None:
                cuda.append(int(torch.cuda.memory_allocated()))
        growth = rss[-1] - rss[0]
        return LeakReport(rss, growth, growth / max(repeats - 1, 1), cuda)
