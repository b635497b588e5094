"""A prompt's causal self-attention on TAP's native CPU kernel (``attend_causal``).

transformers picks each layer's attention function by name from its ``AttentionInterface``.
This module registers ``tap_sdpa``: the native kernel where a call is plain causal
self-attention over a whole float32 prompt on the CPU (no mask beyond causality, as many queries
as keys, no dropout, softcap or position bias; a boolean mask is accepted where it is the causal
pattern itself or the sliding-window pattern of the layer's window, as transformers builds for
sliding layers), and torch's SDPA, exactly as transformers' own ``sdpa`` runs it, for every
other call (decode steps, padded batches, chunks after cached positions). Masks are made as for ``sdpa``, so the two agree on which calls are causal.
The HF models a process loads itself keep ``sdpa``: only models TAP loads use the name.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .kernels.native import native_kernels

__all__ = ["ATTENTION_NAME", "attend_prompt", "install_prefill_attention", "is_plain_causal", "native_prefill_window",
           "prefill_attention_forward"]

ATTENTION_NAME = "tap_sdpa"
_log = logging.getLogger(__name__)
_LANES = 16  # the kernel's head_dim granularity


_CAUSAL_PATTERNS: dict[tuple[int, int, str], torch.Tensor] = {}


def is_plain_causal(mask: torch.Tensor, seq_len: int, window: int = 0) -> bool:
    """Whether a boolean mask (seq_len, seq_len), or (batch, 1, seq_len, seq_len), lets each query
    see exactly the keys up to its own position (with ``window``: only the last ``window`` of
    them, itself included, as transformers' sliding-window layers do). transformers builds such
    masks for sliding layers, also where the window covers the whole prompt."""
    if mask.dtype != torch.bool or mask.shape[-2:] != (seq_len, seq_len) or mask.dim() not in (2, 4):
        return False
    if mask.dim() == 4 and mask.shape[1] != 1:
        return False
    key = (seq_len, window, str(mask.device))
    pattern = _CAUSAL_PATTERNS.get(key)
    if pattern is None:
        if len(_CAUSAL_PATTERNS) > 8:
            _CAUSAL_PATTERNS.clear()
        pattern = torch.ones(seq_len, seq_len, dtype=torch.bool, device=mask.device).tril_()
        if window > 0:
            pattern &= ~torch.ones_like(pattern).tril_(-window)  # keys j > i - window
        _CAUSAL_PATTERNS[key] = pattern
    return bool(torch.equal(mask, pattern.expand_as(mask)))


def native_prefill_window(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float, is_causal: bool | None, kwargs: dict) -> int | None:
    """The native kernel's window (0: none) for a call it computes exactly as SDPA, else None:
    no mask and a causal call, or a mask that is the causal pattern itself, or the sliding-window
    pattern of the layer's ``sliding_window`` (with as many keys as queries)."""
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        return None
    if kwargs.get("output_attentions", False) or (dropout and module.training):
        return None
    if query.dim() != 4 or query.shape[2] < 2 or key.shape[2] < query.shape[2]:
        return None
    window = 0
    if attention_mask is not None:
        seq_len, sliding = query.shape[2], kwargs.get("sliding_window") or 0
        if key.shape[2] != seq_len:
            return None
        if is_plain_causal(attention_mask, seq_len):
            window = 0
        elif 0 < sliding < seq_len and is_plain_causal(attention_mask, seq_len, sliding):
            window = sliding
        else:
            return None
    elif not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        return None
    if any(t.device.type != "cpu" or t.dtype != torch.float32 or t.stride(-1) != 1 for t in (query, key, value)):
        return None
    head_dim = query.shape[-1]
    if head_dim % _LANES or key.shape[-1] != head_dim or value.shape[-1] != head_dim:
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return None  # the kernel has no backward
    return window if query.shape[1] % key.shape[1] == 0 else None


def attend_prompt(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, window: int = 0) -> torch.Tensor | None:
    """Causal self-attention of a whole prompt (as many queries as keys; with ``window``, each
    query sees its last ``window`` keys) on the native kernel: (batch, seq_len, heads, head_dim),
    or None where the kernel does not take these tensors (the caller then runs SDPA). For TAP's
    own decoder loop (tap_runtime.decode)."""
    native = native_kernels()
    if native is None or not hasattr(native, "attend_causal") or key.shape[2] != query.shape[2]:
        return None
    if native_prefill_window(_CAUSAL, query, key, value, None, 0.0, True, {}) is None:
        return None
    return native.attend_causal(query, key, value, float(scale), int(window))


class _CausalModule(nn.Module):
    is_causal = True


_CAUSAL = _CausalModule()


def prefill_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (batch, seq_len, heads, head_dim) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    native = native_kernels()
    window = None
    if native is not None and hasattr(native, "attend_causal"):
        window = native_prefill_window(module, query, key, value, attention_mask, dropout, is_causal, kwargs)
    if window is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q_length = query.shape[2]
    # As sdpa does for a prefill into an empty static cache: keys past the prompt are unused.
    key, value = key[:, :, :q_length], value[:, :, :q_length]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return native.attend_causal(query, key, value, float(scale), window), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, prefill_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def install_prefill_attention(model: nn.Module) -> bool:
    """Switch a loaded model from ``sdpa`` to ``tap_sdpa`` where the native kernel is built.
    Other implementations (``eager`` asked for by a user, flash kernels) are left alone.
    Returns whether the model now uses it."""
    native = native_kernels()
    config = model.config
    if native is None or not hasattr(native, "attend_causal") or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    _register()
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, AttributeError) as error:  # a model outside the AttentionInterface keeps its own
        _log.info("native prefill attention not installed: %s", error)
        return False
    return config._attn_implementation == ATTENTION_NAME
