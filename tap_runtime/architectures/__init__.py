"""Registry of supported model families, one module each (as mlx-lm keeps them)."""

from __future__ import annotations

from ..errors import UnsupportedArchitectureError
from . import gemma3, gpt2, llama
from .base import ArchitectureSpec

__all__ = ["ArchitectureSpec", "SUPPORTED_MODEL_TYPES", "get_architecture"]

_SPECS = (llama.SPEC, gemma3.SPEC, gpt2.SPEC)
_BY_MODEL_TYPE = {model_type: spec for spec in _SPECS for model_type in spec.model_types}
SUPPORTED_MODEL_TYPES = tuple(sorted(_BY_MODEL_TYPE))


def get_architecture(model_type: str, source: str = "config.json") -> ArchitectureSpec:
    """The entry for ``model_type``, or an error naming the file and the supported types."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"{source}: model_type {model_type!r} is not supported; expected one of "
            f"{list(SUPPORTED_MODEL_TYPES)}. Add an entry under tap_runtime/architectures/ for it."
        ) from None
