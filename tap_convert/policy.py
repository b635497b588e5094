"""Per-layer policy from measured sensitivity: how much each tier hurts, and which layers to promote.

A layer's sensitivity at a tier is its relative output error on the calibration inputs,
tr(E H E^T) / tr(W H W^T) with E = W - dequant(tier) and H the layer-input second moment (only
its diagonal for layers too wide for a full H). Given a target of average weight bits read per
token, :func:`allocate_min_tiers` promotes, for every token, the layers whose base tier costs
the most error per extra bit, as EXL2's measurement pass and llama.cpp's Q4_K_M promotion of
attn_v/ffn_down do, but chosen from these measurements.
"""

from __future__ import annotations

import torch

# The allocation itself is shared with the runtime (set_routing's promote): one rule for both.
from tap_runtime.allocation import allocate_min_tiers, average_bits, expected_bits

__all__ = ["output_energy", "relative_output_error", "expected_bits", "average_bits", "allocate_min_tiers"]


def output_energy(weight: torch.Tensor, second_moment: torch.Tensor) -> float:
    """tr(W H W^T): the layer's output energy on the calibration inputs, the denominator of
    :func:`relative_output_error` (computed once where one weight is scored against many
    approximations)."""
    weight = weight.to(torch.float32)
    if second_moment.dim() == 2:
        return float(((weight @ second_moment) * weight).sum())
    return float((weight.pow(2) * second_moment).sum())


def relative_output_error(
    weight: torch.Tensor, approximation: torch.Tensor, second_moment: torch.Tensor, energy: float | None = None
) -> float:
    """tr(E H E^T) / tr(W H W^T); ``second_moment`` is H (in, in) or its diagonal (in,);
    ``energy``: tr(W H W^T) if already known (:func:`output_energy`)."""
    weight = weight.to(torch.float32)
    error = weight - approximation.to(torch.float32)
    if energy is None:
        energy = output_energy(weight, second_moment)
    return output_energy(error, second_moment) / max(energy, 1e-30)
