"""Pages of tensors read through a memory map can be handed back without losing their values."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from tap_runtime.pages import page_out, return_freed_heap

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux-only here")


@linux_only
def test_file_backed_tensor_keeps_its_values(tmp_path):
    path = tmp_path / "weights.bin"
    values = np.arange(4 * 1024 * 1024, dtype=np.uint8) % 251
    values.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    tensor = torch.from_numpy(np.asarray(mapped))
    checksum = int(tensor.to(torch.int64).sum())
    assert page_out(tensor)
    # Re-read from the page cache: same bytes.
    assert int(tensor.to(torch.int64).sum()) == checksum
    assert torch.equal(tensor[:1000], torch.from_numpy(values[:1000]))


@linux_only
def test_anonymous_memory_is_never_lost():
    tensor = torch.arange(1 << 20, dtype=torch.float32)
    assert page_out(tensor) in (True, False)
    assert torch.equal(tensor, torch.arange(1 << 20, dtype=torch.float32))


def test_small_or_strided_tensors_are_left_alone():
    assert not page_out(torch.ones(16))  # smaller than one whole page
    assert not page_out(torch.ones(4096, 8)[:, 0])  # not contiguous
    assert not page_out(torch.empty(0))
    assert return_freed_heap() in (True, False)


_FAULT_COUNT = r"""
import resource, sys, torch
from tap_runtime.pages import keep_freed_heap
if sys.argv[1] == "keep":
    assert keep_freed_heap()
def pass_of_temporaries():
    # Two 20 MiB activations alive at once, then both freed: as one layer of a prefill.
    a, b = torch.empty(5 * 2**20), torch.empty(5 * 2**20)
    a.fill_(1.0)
    b.fill_(1.0)
pass_of_temporaries()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    pass_of_temporaries()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@linux_only
def test_kept_heap_reuses_freed_activations_instead_of_faulting_them_in():
    """Each setting in a fresh process: the allocator settings are process-wide."""
    import subprocess

    def faults(setting: str) -> int:
        done = subprocess.run([sys.executable, "-c", _FAULT_COUNT, setting], capture_output=True, text=True, check=True)
        return int(done.stdout.strip().splitlines()[-1])

    default = faults("default")
    # 10 passes of 40 MiB are 102,400 pages when nothing is reused; glibc's adaptive threshold
    # reuses some of them, more or less depending on what ran in the process before.
    if default < 1000:
        pytest.skip(f"this allocator already reuses freed blocks ({default} page faults)")
    assert faults("keep") < default / 20
