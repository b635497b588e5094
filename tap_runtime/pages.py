"""Hand the pages of a tensor read from a memory-mapped shard back to the OS once it is copied.

transformers loads safetensors shards through a memory map, so every tensor the loader hands
over is a view into the file. After TAP has repacked a plane (or copied a small tensor), its
file pages still count towards the process's resident memory until the mapping goes, which
makes the peak during loading about checkpoint + packed copies. ``madvise(MADV_PAGEOUT)``
asks the kernel to reclaim those pages now: for file-backed clean pages that only drops them
from this process (they are re-read from the page cache if touched again); for anonymous
memory it never loses data. Unsupported systems simply keep the pages.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

__all__ = ["page_out", "return_freed_heap", "keep_freed_heap", "MAX_HEAP_BLOCK_BYTES"]

_MADV_PAGEOUT = 21  # Linux >= 5.4
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        if not sys.platform.startswith("linux"):
            _libc = False
        else:
            try:
                _libc = ctypes.CDLL(None, use_errno=True)
                _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            except (OSError, AttributeError):
                _libc = False
    return _libc.madvise if _libc else None


def page_out(tensor: torch.Tensor) -> bool:
    """Advise the kernel to reclaim the whole pages inside ``tensor``'s bytes (CPU only).

    Returns whether the advice was given. Only pages lying entirely inside the tensor are
    touched, so neighbouring tensors in the same mapping are never affected.
    """
    madvise = _madvise()
    if madvise is None or tensor.device.type != "cpu" or tensor.numel() == 0 or not tensor.is_contiguous():
        return False
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = (start + page - 1) // page * page
    last = end // page * page
    if last <= first:
        return False
    return madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT) == 0


def return_freed_heap() -> bool:
    """Give memory that was freed during loading (transient unpacked codes) back to the OS.

    glibc keeps freed blocks in its heap, where they still count as resident; ``malloc_trim``
    releases them. A no-op where glibc is not the allocator.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)
# glibc's ceiling for the mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
MAX_HEAP_BLOCK_BYTES = 32 * 2**20


def keep_freed_heap(max_block_bytes: int = MAX_HEAP_BLOCK_BYTES) -> bool:
    """Serve blocks up to ``max_block_bytes`` from glibc's heap and keep freed heap memory there.

    A many-token pass (prefill) allocates and frees large activations in every layer. Above
    glibc's mmap threshold each one is a fresh mapping that the kernel faults in and zeroes page
    by page; from the heap, the next layer reuses the same pages. The price: RSS stays near its
    high-water mark after a pass instead of falling back. Process-wide; returns False (and
    changes nothing) where glibc is not the allocator.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    block = min(int(max_block_bytes), MAX_HEAP_BLOCK_BYTES)
    # Trim only above 1 GiB of free heap top: below that, freed activations stay for reuse.
    return bool(mallopt(_M_MMAP_THRESHOLD, block)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**30))
