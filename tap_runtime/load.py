"""``load()``: from a directory or Hub repo id to a ready TapModel, verifying every file first."""

from __future__ import annotations

import os
from typing import Any

import torch

from .checkpoint import read_checkpoint, resolve_checkpoint
from .hf_integration import LoadOptions, load_options
from .kernels import KERNEL_NAMES
from .kernels.vnni import BASE_ACTIVATION_BITS
from .errors import InvalidConfigError
from .model import TapModel
from .offload import offloaded_linears, plan_device_map, plane_bytes
from .pages import keep_freed_heap, return_freed_heap

__all__ = ["load"]


def _offloaded_linears(checkpoint, device: torch.device, device_map, max_gpu_memory_mb, memory_efficient) -> frozenset[str]:
    """The linears ``device_map`` (or the automatic one) keeps in host memory."""
    if device.type != "cuda":
        raise InvalidConfigError(
            f"offload_to_cpu keeps layers that do not fit the GPU in host memory; device {device} is not a GPU "
            f"(on the CPU everything is in host memory already; memory_efficient=True reads residual planes on demand)."
        )
    if memory_efficient:
        raise InvalidConfigError("memory_efficient mode is CPU-only; use offload_to_cpu alone on the GPU.")
    table = checkpoint.table
    gpu = device.index if device.index is not None else torch.cuda.current_device()
    if device_map is None or device_map == "auto":
        if max_gpu_memory_mb is None:
            free, _ = torch.cuda.mem_get_info(gpu)
            layer_bytes = sum(plane_bytes(p) for p in table.linear.values() if p.layer_index is not None)
            other_bytes = max(0, sum(s.num_bytes for s in table.shards) - layer_bytes)
            budget = int(0.8 * free) - other_bytes
        else:
            budget = int(max_gpu_memory_mb * 2**20)
        device_map = plan_device_map(table, max(0, budget), gpu=gpu)
    elif not isinstance(device_map, dict):
        raise InvalidConfigError(f"device_map must be a dict in accelerate's format or 'auto', got {device_map!r}.")
    for prefix, where in device_map.items():
        if where in ("cpu", "disk"):
            continue
        placed = torch.device(f"cuda:{where}" if isinstance(where, int) else where)
        if placed.type != "cuda" or (placed.index if placed.index is not None else gpu) != gpu:
            raise InvalidConfigError(
                f"device_map puts {prefix or 'the model'!r} on {where!r}; TAP runs on one GPU ({device}) with the rest on 'cpu'."
            )
    return frozenset(offloaded_linears(table, device_map))


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
    offload_to_cpu: bool = False,
    device_map: dict[str, Any] | str | None = None,
    max_gpu_memory_mb: float | None = None,
    keep_freed_memory: bool = False,
    base_activation_bits: int | None = None,
) -> TapModel:
    """Load a TAP checkpoint.

    Args:
        path_or_repo_id: a directory written by ``tap-convert`` or a Hub repo id ``org/name``.
        device: where to run: ``cpu`` or ``cuda`` (packed kernels on both; sm80+ for CUDA).
        dtype: dtype of the unquantized parts (norms, attention, residual stream).
        kernel: ``auto`` (fastest packed kernel), ``cpu-vnni`` / ``cpu-avx2`` (TAP's own, by CPU),
            ``cpu-packed`` (torch's),
            ``cuda-packed`` or ``reference``.
        revision: Hub revision (branch, tag or commit) when loading from the Hub.
        verify: check every file's sha256 against the routing table before loading.
        keep_portable: keep the on-disk planes in memory beside the kernel's packed copies.
        memory_efficient: pack only the planes every token reads; residual planes stay in the
            memory-mapped shard and are packed when a routed token first needs them, into one
            least-recently-used cache of ``residual_cache_mb`` MiB (CPU only).
        offload_to_cpu: run on the GPU ``device`` with the decoder layers that do not fit kept in
            host memory, copied in as each linear runs (see :mod:`tap_runtime.offload`).
        device_map: where each decoder layer's planes live, in accelerate's format
            (``{"model.layers.20": "cpu", "": 0}``); ``"auto"`` or None with ``offload_to_cpu``
            fills the GPU in layer order up to ``max_gpu_memory_mb``.
        max_gpu_memory_mb: MiB of packed decoder-layer planes kept on the GPU under ``"auto"``;
            default 80% of the GPU's free memory less the checkpoint's other tensors.
        keep_freed_memory: after loading, have glibc serve activations from its heap and keep
            freed heap memory for the next layer (:func:`tap_runtime.pages.keep_freed_heap`),
            so a prefill does not fault its temporaries in afresh in every layer. Process-wide.
            Off by default: on Qwen2.5-1.5B it made 512-token prefill 6-10% faster but decode
            4-8% slower (scripts/bench_speed.py rows tap-budget / tap-budget-heap).
        base_activation_bits: the activations of the base plane's products on TAP's native
            kernel, per block of 64 inputs. None (default): 15 bits in decode and 8 bits in
            a prefill's base products (the lane kernels, faster than the 15-bit paths on both
            ``cpu-avx2`` and ``cpu-vnni``). 15: 15 bits everywhere. 8: 8 bits in
            decode too (tokens that read the base plane alone). 8 bits take half the dot
            products; they cost 0-2% of KL on a rotated (format 5) checkpoint (README, "8-bit
            activations in prefill"). Other kernels refuse 8 (15 changes nothing there).
    Returns:
        a :class:`TapModel`; its ``.model`` is a regular transformers model.
    Example:
        >>> m = load("./smollm2-tap")                      # doctest: +SKIP
        >>> m.generate("Hello", max_new_tokens=5).text     # doctest: +SKIP
    """
    if kernel not in KERNEL_NAMES:
        raise InvalidConfigError(f"kernel {kernel!r} is unknown; expected one of {list(KERNEL_NAMES)}.")
    if base_activation_bits is not None and base_activation_bits not in BASE_ACTIVATION_BITS:
        raise InvalidConfigError(
            f"base_activation_bits must be None (the kernel's default) or one of {list(BASE_ACTIVATION_BITS)}, got {base_activation_bits!r}."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = resolve_checkpoint(path_or_repo_id, revision=revision)
    # Read and verify up front so a bad file fails before transformers allocates anything.
    checkpoint = read_checkpoint(directory, verify=verify)
    # The quantizer hook verified nothing twice: it re-reads the manifest but skips hashing.
    device = torch.device(device)
    if memory_efficient and residual_cache_mb < 0:
        raise InvalidConfigError(f"residual_cache_mb must be >= 0, got {residual_cache_mb}.")
    cache_bytes = int(residual_cache_mb * 2**20) if memory_efficient else None
    offloaded = None
    if offload_to_cpu or device_map is not None:
        offloaded = _offloaded_linears(checkpoint, device, device_map, max_gpu_memory_mb, memory_efficient)
    options = LoadOptions(
        kernel=kernel,
        verify=False,
        keep_portable=keep_portable,
        device=str(device),
        residual_cache_bytes=cache_bytes,
        offloaded=offloaded,
    )
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
    if base_activation_bits is not None:
        _set_base_activation_bits(model, base_activation_bits)
    return_freed_heap()  # transient unpacked codes from packing, freed but still resident
    if keep_freed_memory:
        keep_freed_heap()
    return TapModel(model, tokenizer, checkpoint)


def _set_base_activation_bits(model, bits: int) -> None:
    """Every linear's kernel takes ``bits`` on its base products. 8 on a kernel without that
    choice is an error, not a silent no-op (the user asked for a speed/quality trade it cannot
    make); 15 there is what such a kernel does anyway (no 8-bit activations)."""
    kernels = {id(m.kernel): m.kernel for m in model.modules() if getattr(m, "kernel", None) is not None}
    unable = sorted({type(k).__name__ for k in kernels.values() if not hasattr(k, "set_base_activation_bits")})
    if bits == 15:
        kernels = {key: k for key, k in kernels.items() if hasattr(k, "set_base_activation_bits")}
    elif unable or not kernels:
        raise InvalidConfigError(
            f"base_activation_bits={bits} needs TAP's native kernel (kernel='cpu-vnni' or 'cpu-avx2'); this model runs on "
            f"{', '.join(unable) or 'no TAP kernel'}."
        )
    for kernel in kernels.values():
        kernel.set_base_activation_bits(bits)
