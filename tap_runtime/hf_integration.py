"""Teach transformers' ``from_pretrained`` to load TAP checkpoints (its quantizer extension point).

Importing ``tap_runtime`` registers ``quant_method: "tap"``. Without that import, transformers
meets plane 0's uint8 ``weight`` tensors, whose shapes differ from the model's, and refuses to
load instead of filling the model with random weights.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import read_checkpoint, read_router_tensors, resolve_checkpoint
from .format import FORMAT_VERSION, QUANT_METHOD, ROUTING_FILE
from .modeling import prepare_model, replace_modules

__all__ = ["TapQuantizationConfig", "TapHfQuantizer", "LoadOptions", "load_options", "register"]


@dataclass(frozen=True)
class LoadOptions:
    """Options of :func:`tap_runtime.load` that transformers has no argument for."""

    kernel: str = "auto"
    verify: bool = True
    keep_portable: bool = False
    device: str = "cpu"
    residual_cache_bytes: int | None = None  # memory-efficient mode's budget; None: pack every plane at load
    offloaded: frozenset[str] | None = None  # linears whose packed planes stay in host memory (offload_to_cpu)


_OPTIONS: contextvars.ContextVar[LoadOptions] = contextvars.ContextVar("tap_load_options", default=LoadOptions())


@contextlib.contextmanager
def load_options(options: LoadOptions):
    token = _OPTIONS.set(options)
    try:
        yield
    finally:
        _OPTIONS.reset(token)


class TapQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a TAP checkpoint's config.json."""

    def __init__(
        self,
        format_version: int = FORMAT_VERSION,
        tiers: list[int] | tuple[int, ...] = (4, 8),
        routing_table: str = ROUTING_FILE,
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.tiers = list(tiers)
        self.routing_table = routing_table


class TapHfQuantizer(HfQuantizer):
    """Loads pre-converted TAP checkpoints; TAP converts with ``tap-convert``, not here."""

    requires_calibration = True

    def __init__(self, quantization_config: TapQuantizationConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self._checkpoint = None
        self._compute_dtype = torch.float32

    def _checkpoint_directory(self, model, checkpoint_files) -> Path:
        if checkpoint_files:
            directory = Path(checkpoint_files[0]).parent
            if (directory / ROUTING_FILE).is_file():
                return directory
        # From the Hub, transformers fetched only the shards: fetch the whole snapshot (cached).
        return resolve_checkpoint(model.config.name_or_path)

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """transformers tells the quantizer the dtype it resolved; the residual stream runs in it."""
        if isinstance(dtype, torch.dtype):
            self._compute_dtype = dtype
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
        options = _OPTIONS.get()
        directory = self._checkpoint_directory(model, checkpoint_files)
        self._checkpoint = read_checkpoint(directory, verify=options.verify)
        replace_modules(model, self._checkpoint.table, source=str(directory / ROUTING_FILE))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        options = _OPTIONS.get()
        checkpoint = self._checkpoint
        tensors = read_router_tensors(checkpoint.directory)
        prepare_model(
            model,
            checkpoint.table,
            tensors,
            compute_dtype=self._compute_dtype,
            kernel_name=options.kernel,
            keep_portable=options.keep_portable,
            device=options.device,
            residual_cache_bytes=options.residual_cache_bytes,
            weights_directory=checkpoint.directory,
            offloaded=options.offloaded,
        )
        model.tap_checkpoint = checkpoint
        return model

    def is_serializable(self, **kwargs: Any) -> bool:
        # Kernels keep their own layouts; re-save by converting again with tap-convert.
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the config and quantizer once (importing tap_runtime twice must not fail)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(TapQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(TapHfQuantizer)
