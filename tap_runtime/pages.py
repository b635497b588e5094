"""Page-level memory handling: give copied shard pages back, tune glibc's heap, ask for huge pages.

Hand the pages of a tensor read from a memory-mapped shard back to the OS once it is copied.

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
import math
import mmap
import sys

import torch

__all__ = ["page_out", "return_freed_heap", "keep_freed_heap", "huge_page_copy", "huge_page_empty", "set_huge_pages", "MAX_HEAP_BLOCK_BYTES"]

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


HUGE_PAGE_BYTES = 2 * 2**20  # x86-64's transparent huge page
_huge_pages = {"enabled": True}


def set_huge_pages(enabled: bool) -> None:
    """Whether :func:`huge_page_empty` asks for huge pages (process-wide; on by default)."""
    _huge_pages["enabled"] = bool(enabled)


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in anonymous memory advised for transparent huge pages.

    Decode streams every plane from DRAM once per token; with 4 KiB pages that is a TLB miss
    every 4 KiB. In one process, planes on 2 MiB pages streamed through TAP's kernel 3% faster
    (scripts/bench_plane_stream.py). Under 2 MiB, on other systems, or after
    ``set_huge_pages(False)`` this is ``torch.empty``; where THP is off the memory simply stays
    on 4 KiB pages. The mapping lives as long as the tensor (``torch.frombuffer`` holds it).
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not _huge_pages["enabled"] or not sys.platform.startswith("linux") or nbytes < HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        region.close()
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(region, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)


def huge_page_copy(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` copied into :func:`huge_page_empty` memory; small or non-CPU tensors, or with
    huge pages off, ``tensor`` itself."""
    nbytes = tensor.numel() * tensor.element_size()
    if not _huge_pages["enabled"] or tensor.device.type != "cpu" or nbytes < HUGE_PAGE_BYTES:
        return tensor
    out = huge_page_empty(tuple(tensor.shape), tensor.dtype)
    out.copy_(tensor)
    return out
