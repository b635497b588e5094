"""Per-layer policy from measured sensitivity: how much each tier hurts, and which layers to promote.

A layer's sensitivity at a tier is its relative output error on the calibration inputs,
tr(E H E^T) / tr(W H W^T) with E = W - dequant(tier) and H the layer-input second moment (only
its diagonal for layers too wide for a full H). Given a target of average weight bits read per
token, :func:`allocate_min_tiers` promotes, for every token, the layers whose base tier costs
the most error per extra bit, as EXL2's measurement pass and llama.cpp's Q4_K_M promotion of
attn_v/ffn_down do, but chosen from these measurements.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from tap_runtime.format import LinearPolicy

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


def expected_bits(policy: LinearPolicy, tier_shares: dict[str, float]) -> float:
    """Expected stored bits per weight a token reads from this module, given the routed shares.

    ``tier_shares[str(t)]`` is the share of tokens routed at or above tier t.
    """
    bits = policy.bits_at_tier(policy.tiers[0])
    for lower, upper in zip(policy.tiers, policy.tiers[1:]):
        share = 1.0 if upper <= policy.min_tier else tier_shares.get(str(upper), 0.0)
        bits += share * (policy.bits_at_tier(upper) - policy.bits_at_tier(lower))
    return bits


def average_bits(policies: dict[str, LinearPolicy], tier_shares: dict[str, float]) -> float:
    total = sum(p.num_weights for p in policies.values()) or 1
    return sum(expected_bits(p, tier_shares) * p.num_weights for p in policies.values()) / total


def allocate_min_tiers(
    policies: dict[str, LinearPolicy], tier_shares: dict[str, float], target_bits: float
) -> dict[str, LinearPolicy]:
    """Promote layers one tier at a time, best error reduction per extra bit first, within budget.

    Returns new policies with ``min_tier`` and ``reason`` set for the promoted layers; the
    others are unchanged. A target below the all-base average promotes nothing.
    """
    current = dict(policies)
    total = sum(p.num_weights for p in current.values()) or 1
    spent = average_bits(current, tier_shares) * total
    budget = target_bits * total
    while True:
        best = None
        for name, policy in current.items():
            index = policy.tiers.index(policy.min_tier)
            if index + 1 >= len(policy.tiers) or not policy.sensitivity:
                continue
            promoted = replace(policy, min_tier=policy.tiers[index + 1])
            cost = (expected_bits(promoted, tier_shares) - expected_bits(policy, tier_shares)) * policy.num_weights
            gain = policy.sensitivity[str(policy.min_tier)] - policy.sensitivity[str(promoted.min_tier)]
            if cost <= 0 or spent + cost > budget:
                continue
            if best is None or gain / cost > best[0]:
                best = (gain / cost, name, promoted, cost)
        if best is None:
            return current
        _, name, promoted, cost = best
        old = current[name]
        current[name] = replace(
            promoted,
            reason=(
                f"promoted to tier {promoted.min_tier} for every token: relative output error "
                f"{old.sensitivity[str(old.min_tier)]:.2e} at tier {old.min_tier} vs "
                f"{old.sensitivity[str(promoted.min_tier)]:.2e}, the best gain per extra bit under --target-bits {target_bits}"
                + (f"; {old.reason}" if old.reason else "")
            ),
        )
        spent += cost
