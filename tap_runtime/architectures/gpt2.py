"""GPT-2: fused c_attn and Conv1D layers whose weights are stored transposed (in, out)."""

from .base import ArchitectureSpec

SPEC = ArchitectureSpec(
    family="gpt2",
    model_types=("gpt2",),
    decoder_layers="transformer.h",
    attention="attn",
    input_norm="ln_1",
    key_value_projections=("attn.c_attn",),  # q, k and v in one Conv1D
)
