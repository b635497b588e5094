"""``load()``: from a directory or Hub repo id to a ready TapModel, verifying every file first."""

from __future__ import annotations

import os
from typing import Any

import torch

from .checkpoint import read_checkpoint, resolve_checkpoint
from .hf_integration import LoadOptions, load_options
from .kernels import KERNEL_NAMES
from .errors import InvalidConfigError
from .model import TapModel
from .pages import return_freed_heap

__all__ = ["load"]


def load(
    path_or_repo_id: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    kernel: str = "auto",
    revision: str | None = None,
    verify: bool = True,
    keep_portable: bool = False,
    memory_efficient: bool = False,
    residual_cache_mb: float = 64.0,
) -> TapModel:
    """Load a TAP checkpoint.

    Args:
        path_or_repo_id: a directory written by ``tap-convert`` or a Hub repo id ``org/name``.
        device: where to run: ``cpu`` or ``cuda`` (packed kernels on both; sm80+ for CUDA).
        dtype: dtype of the unquantized parts (norms, attention, residual stream).
        kernel: ``auto`` (fastest packed kernel), ``cpu-packed``, ``cuda-packed`` or ``reference``.
        revision: Hub revision (branch, tag or commit) when loading from the Hub.
        verify: check every file's sha256 against the routing table before loading.
        keep_portable: keep the on-disk planes in memory beside the kernel's packed copies.
        memory_efficient: pack only the planes every token reads; residual planes stay in the
            memory-mapped shard and are packed when a routed token first needs them, into one
            least-recently-used cache of ``residual_cache_mb`` MiB (CPU only).
    Returns:
        a :class:`TapModel`; its ``.model`` is a regular transformers model.
    Example:
        >>> m = load("./smollm2-tap")                      # doctest: +SKIP
        >>> m.generate("Hello", max_new_tokens=5).text     # doctest: +SKIP
    """
    if kernel not in KERNEL_NAMES:
        raise InvalidConfigError(f"kernel {kernel!r} is unknown; expected one of {list(KERNEL_NAMES)}.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = resolve_checkpoint(path_or_repo_id, revision=revision)
    # Read and verify up front so a bad file fails before transformers allocates anything.
    checkpoint = read_checkpoint(directory, verify=verify)
    # The quantizer hook verified nothing twice: it re-reads the manifest but skips hashing.
    device = torch.device(device)
    if memory_efficient and residual_cache_mb < 0:
        raise InvalidConfigError(f"residual_cache_mb must be >= 0, got {residual_cache_mb}.")
    cache_bytes = int(residual_cache_mb * 2**20) if memory_efficient else None
    options = LoadOptions(kernel=kernel, verify=False, keep_portable=keep_portable, device=str(device), residual_cache_bytes=cache_bytes)
    with load_options(options):
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, device_map=None)
    model.to(device)
    model.eval()
    model.requires_grad_(False)  # an inference runtime: no autograd graph behind any output
    tokenizer: Any = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError):
        tokenizer = None
    return_freed_heap()  # transient unpacked codes from packing, freed but still resident
    return TapModel(model, tokenizer, checkpoint)
