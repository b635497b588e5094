"""Gemma 3 text models: scaled embeddings, tied head, a 262k vocabulary, and a mandatory BOS."""

from .base import ArchitectureSpec

SPEC = ArchitectureSpec(
    family="gemma3",
    model_types=("gemma3_text",),
    decoder_layers="model.layers",
    needs_bos=True,
)
