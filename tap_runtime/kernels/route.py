"""One layer's routing decision for one token as a single Triton kernel (the graph step's router).

The router's decode arithmetic (TokenRouter._decode_score, the threshold comparison, the tier
count) is about twenty tiny tensor operations per layer. In a
captured CUDA graph each is still a kernel of a few microseconds, and on SmolLM2-135M's shapes
they cost the budget row a quarter of its speed against the base tier (README, H200). This
kernel does all of it in one launch: the hidden state's norm, the normed input's projection on
the layer's error sketch, the score in float64, the tier, the residual planes' flags (int32, for
the gated kernel) and the count. Budget mode's window of recent scores (tap_runtime.budget)
is updated after it with tensor ops, from the score the kernel writes.

Triton is optional; ``TRITON_INTERPRET=1`` runs the same kernel on the CPU (the tests).
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["route_kernel_available", "route_token", "ROUTE_BLOCK"]

ROUTE_BLOCK = 256  # hidden features per loop step


def route_kernel_available(device: torch.device | str) -> bool:
    from .gated import gated_kernel_available

    return gated_kernel_available(device)


@functools.lru_cache(maxsize=2)
def _kernel(interpreting: bool):
    import triton
    import triton.language as tl

    @triton.jit
    def route_one_token(hidden_ptr, normed_ptr, sketch_ptr, static_ptr, params_ptr, thresholds_ptr,
                        counts_ptr, flags_ptr, score_ptr, hidden_size,
                        RANK: tl.constexpr, LEVELS: tl.constexpr, LEVELS_P2: tl.constexpr, BLOCK: tl.constexpr,
                        USE_NORM: tl.constexpr, USE_SKETCH: tl.constexpr, STEPS: tl.constexpr):
        columns = tl.arange(0, RANK)
        squares = tl.zeros([BLOCK], dtype=tl.float32)
        projected = tl.zeros([RANK], dtype=tl.float32)
        for start in range(0, STEPS):
            offsets = start * BLOCK + tl.arange(0, BLOCK)
            live = offsets < hidden_size
            if USE_NORM:
                h = tl.load(hidden_ptr + offsets, mask=live, other=0).to(tl.float32)
                squares += h * h
            if USE_SKETCH:
                x = tl.load(normed_ptr + offsets, mask=live, other=0).to(tl.float32)
                sketch = tl.load(sketch_ptr + offsets[:, None] * RANK + columns[None, :], mask=live[:, None], other=0)
                projected += tl.sum(x[:, None] * sketch, axis=0)
        # params: slope of the norm feature, slope of the sketch feature, offset, 1/sqrt(hidden)
        score = tl.load(static_ptr)
        if USE_NORM:
            length = tl.sqrt(tl.sum(squares, axis=0)).to(tl.float64)
            feature = tl.log(tl.maximum(length * tl.load(params_ptr + 3), 1e-12))
            score += tl.load(params_ptr) * feature
        if USE_SKETCH:
            energy = tl.sum(projected * projected, axis=0).to(tl.float64)
            score += tl.load(params_ptr + 1) * tl.log(tl.maximum(energy, 1e-20))
        score += tl.load(params_ptr + 2)
        tl.store(score_ptr, score)
        levels = tl.arange(0, LEVELS_P2)
        real = levels < LEVELS
        thresholds = tl.load(thresholds_ptr + levels, mask=real, other=0)
        tier = tl.sum(((score >= thresholds) & real).to(tl.int32), axis=0)
        # flag k: the token reads residual plane k + 1 (tier > k).
        routed = (tier > levels).to(tl.int32)
        tl.store(flags_ptr + levels, routed, mask=real)
        tl.store(counts_ptr + tier, tl.load(counts_ptr + tier) + 1)

    return route_one_token


def route_token(
    hidden: torch.Tensor,
    normed: torch.Tensor,
    sketch: torch.Tensor | None,
    static_score: torch.Tensor,
    params: torch.Tensor,
    thresholds: torch.Tensor,
    counts: torch.Tensor,
    flags: torch.Tensor,
    score: torch.Tensor,
    use_norm: bool,
) -> None:
    """Route one token in one layer; every output is written in place on the device.

    hidden, normed: (hidden,) the layer input and its norm; sketch: float32 (hidden, rank) or
    None; static_score: float64 0-dim; params: float64 (4,) [norm slope, sketch slope, offset,
    1/sqrt(hidden)]; thresholds: float64 (levels,); counts: int64 (levels + 1,); flags: int32
    (levels,); score: float64 0-dim.
    """
    import triton

    hidden_size = hidden.numel()
    levels = thresholds.numel()
    rank = sketch.shape[1] if sketch is not None else 1
    if rank & (rank - 1):
        raise ValueError(f"route_token needs a power-of-two sketch rank; got {rank}")
    kernel = _kernel(os.environ.get("TRITON_INTERPRET", "0") == "1")
    kernel[(1,)](
        hidden.reshape(-1), normed.reshape(-1), sketch if sketch is not None else params, static_score, params,
        thresholds, counts, flags, score, hidden_size,
        RANK=rank, LEVELS=levels, LEVELS_P2=triton.next_power_of_2(max(levels, 1)), BLOCK=ROUTE_BLOCK,
        USE_NORM=use_norm, USE_SKETCH=sketch is not None, STEPS=triton.cdiv(hidden_size, ROUTE_BLOCK),
    )
