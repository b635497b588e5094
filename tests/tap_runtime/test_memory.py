"""MemoryTracker windows and the leak check: repeated generation must not grow memory."""

import pytest
import torch

import tap_runtime
from tap_runtime.memory import MemoryTracker


def test_window_sees_a_large_allocation():
    tracker = MemoryTracker()
    tracker.begin_window("alloc")
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    reading = tracker.end_window("alloc")
    assert reading.peak_rss_bytes >= 64 * 2**20 and reading.method in ("VmHWM", "sampled")
    del block
    with pytest.raises(ValueError, match="never begun"):
        tracker.end_window("other")
    tracker.begin_window("a")
    with pytest.raises(ValueError, match="do not nest"):
        tracker.begin_window("b")


def test_leak_check_catches_a_leak_and_passes_repeated_generation(converted_factory):
    hoard = []
    leaky = MemoryTracker.leak_check(lambda: hoard.append(torch.ones(4 * 2**20, dtype=torch.uint8)), repeats=6)
    assert leaky.leaks() and leaky.growth_per_call_bytes > 3 * 2**20

    tap = tap_runtime.load(converted_factory("llama"))
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    report = MemoryTracker.leak_check(lambda: tap.generate(input_ids=ids, max_new_tokens=8), repeats=8)
    assert not report.leaks(), report
