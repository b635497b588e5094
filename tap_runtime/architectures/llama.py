"""Llama-style decoders (Llama, Mistral, Qwen2/3, SmolLM): q/k/v/o and gate/up/down linears."""

from .base import ArchitectureSpec

SPEC = ArchitectureSpec(
    family="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    decoder_layers="model.layers",
)
