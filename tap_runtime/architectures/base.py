"""What an architecture entry says: where the decoder layers are and what the model needs.

Which modules get quantized is the same rule for every family (linears inside decoder layers
become routed 4-bit planes; embeddings and the output head become 8-bit rows; the rest stays
float32), so an entry only records what differs between families.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ArchitectureSpec"]


@dataclass(frozen=True)
class ArchitectureSpec:
    """One model family.

    family: a short name, e.g. ``llama``.
    model_types: the ``config.model_type`` values it covers.
    decoder_layers: dotted path from the CausalLM to its ``nn.ModuleList`` of decoder layers.
    attention: name of the self-attention child of a decoder layer (calibration reads its
        attention weights to measure how much attention each token receives).
    input_norm: name of the norm a decoder layer applies to its input before attention; the
        router's error estimate reads the token through it.
    needs_bos: every sequence must start with BOS (Gemma degrades badly without it).
    key_value_projections: names, inside a decoder layer, of the linears that make attention
        keys and values; the converter weights the sequence's first token up in their Hessian
        (every later token reads that token's key and value: the attention sink).
    """

    family: str
    model_types: tuple[str, ...]
    decoder_layers: str
    attention: str = "self_attn"
    input_norm: str = "input_layernorm"
    needs_bos: bool = False
    key_value_projections: tuple[str, ...] = ("self_attn.k_proj", "self_attn.v_proj")
