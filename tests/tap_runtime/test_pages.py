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



_HEAP_USE = r"""
import ctypes, sys, torch
from tap_runtime.pages import keep_freed_heap
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_heap()
before = libc.mallinfo2()
block = torch.empty(4 * 2**20)  # a 16 MiB activation
block.fill_(1.0)
during = libc.mallinfo2()
del block
after = libc.mallinfo2()
print(during.hblkhd - before.hblkhd, after.arena - before.arena)
"""


@linux_only
def test_kept_heap_serves_activations_from_the_heap_and_keeps_them_there():
    """A 16 MiB block: by default glibc maps it afresh (so its pages are faulted in again on every
    use); with the heap kept it comes from the heap and stays there once freed, for the next layer.
    Each setting in a fresh process, since the settings are process-wide."""
    import subprocess

    def heap_use(setting: str) -> tuple[int, int]:
        done = subprocess.run([sys.executable, "-c", _HEAP_USE, setting], capture_output=True, text=True)
        if done.returncode and "mallinfo2" in done.stderr:
            pytest.skip("this C library has no mallinfo2 (glibc >= 2.33)")
        assert done.returncode == 0, done.stderr
        mapped, heap_kept = map(int, done.stdout.split())
        return mapped, heap_kept

    mapped, heap_kept = heap_use("default")
    assert mapped >= 16 * 2**20 and heap_kept < 2**20
    mapped, heap_kept = heap_use("keep")
    assert mapped == 0 and heap_kept >= 15 * 2**20  # less whatever free heap it found


def test_huge_page_copies_hold_the_same_values_and_outlive_their_mapping():
    import gc

    from tap_runtime.pages import HUGE_PAGE_BYTES, huge_page_copy, huge_page_empty

    source = torch.arange(3 * HUGE_PAGE_BYTES // 2, dtype=torch.int16).view(3, -1)  # 3 x 2 MiB
    copy = huge_page_copy(source)
    gc.collect()  # nothing but the tensor holds the mapping now
    assert copy.data_ptr() != source.data_ptr() and copy.dtype == source.dtype
    assert torch.equal(copy, source)
    copy += 1  # private, writable memory
    assert torch.equal(copy - 1, source)
    empty = huge_page_empty((HUGE_PAGE_BYTES,), torch.uint8)
    assert empty.shape == (HUGE_PAGE_BYTES,) and empty.dtype == torch.uint8
    small = torch.ones(16)
    assert huge_page_copy(small) is small  # under one huge page: left where it is


def test_huge_pages_can_be_turned_off():
    from tap_runtime.pages import HUGE_PAGE_BYTES, huge_page_copy, set_huge_pages

    source = torch.zeros(HUGE_PAGE_BYTES, dtype=torch.uint8)
    set_huge_pages(False)
    try:
        assert huge_page_copy(source) is source
    finally:
        set_huge_pages(True)
