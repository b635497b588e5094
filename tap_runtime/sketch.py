"""The router's error sketch of one decoder layer, derived from the residual planes themselves.

A token that stays on the base tier of a linear loses exactly what the next plane would have
added: x R^T, with R that plane's dequantized weight. Over the linears that read the layer's
input norm (q/k/v, GPT-2's c_attn) the loss is x^T G x with G = sum_m R_m^T R_m. The sketch
P = V_r sqrt(L_r) from G's top eigenpairs gives ||x P||^2 ~ x^T G x, the router's
``error_estimate`` signal (DP-LLM's error estimator in its simplest form).

Up to format 3 the converter stored P per layer (a sixth of SmolLM2-135M's router file was
pure float16 sketch). Since R is already in the checkpoint, format 4 stores only which linears
make up each layer's sketch, and converter and runtime both compute P with this one function
from the same stored planes, so the router is fitted on exactly the signal the runtime sees.
"""

from __future__ import annotations

import torch

from .planes import Plane, dequantize_plane
from .rotation import rotate_weight

__all__ = ["SKETCH_RANK", "residual_error_sketch", "input_space_residual"]

SKETCH_RANK = 32
# Subspace iteration: a few extra directions and a few rounds give the top ``rank`` eigenpairs
# of G to well under a percent of x^T G x on real layers, in milliseconds instead of the
# second a full eigendecomposition of a 1536-wide G takes on two cores.
_OVERSAMPLE = 8
_ROUNDS = 6


def input_space_residual(plane: Plane, input_rotation: int) -> torch.Tensor:
    """A residual plane as the weight R (out, in) that multiplies the layer's own input: a rotated
    linear's planes store R H (LinearPolicy.input_rotation), and H is its own inverse."""
    return rotate_weight(dequantize_plane(plane), input_rotation)


def residual_error_sketch(residuals: list[torch.Tensor], hidden_size: int, rank: int = SKETCH_RANK) -> torch.Tensor:
    """P (hidden_size, <= rank) float32 with ||x P||^2 ~ sum_m ||x R_m^T||^2 (see module docstring).

    ``residuals``: the dequantized planes (out_m, hidden_size) a routed token would add; none
    gives a zero sketch (hidden_size, 1). Deterministic: the start subspace is the coordinate
    axes of the largest columns, not random draws, so every machine derives the same sketch.
    """
    if not residuals:
        return torch.zeros(hidden_size, 1)
    stacked = torch.cat([r.to(torch.float32) for r in residuals], dim=0)  # (sum out_m, hidden)
    width = min(rank + _OVERSAMPLE, hidden_size, stacked.shape[0])
    column_energy = stacked.pow(2).sum(dim=0)
    # Ties broken by index (stable sort), so the start is the same everywhere.
    start = torch.sort(column_energy, descending=True, stable=True).indices[:width]
    basis = torch.zeros(hidden_size, width)
    basis[start, torch.arange(width)] = 1.0
    for _ in range(_ROUNDS):
        basis = torch.linalg.qr(stacked.t() @ (stacked @ basis)).Q
    projected = (stacked @ basis).to(torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh(projected.t() @ projected)  # ascending
    keep = min(rank, width)
    top_values = eigenvalues[-keep:].clamp_min(0)
    return (basis.to(torch.float64) @ (eigenvectors[:, -keep:] * top_values.sqrt())).to(torch.float32).contiguous()
