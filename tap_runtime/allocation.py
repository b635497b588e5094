"""Which modules read the top tier for every token: the per-module allocation of a bit budget.

Shared by the converter (``tap-convert --target-bits``, decided once at conversion) and the
runtime (``TapModel.set_routing(..., bits=B, promote=f)``, decided at load from the same
recorded sensitivities), so both spend bits by one rule. A module's sensitivity at a tier is
its relative output error on the calibration inputs (tap_convert.policy); promoting it costs
the extra bits every token then reads from it.
"""

from __future__ import annotations

from dataclasses import replace

from .format import LinearPolicy

__all__ = ["expected_bits", "average_bits", "allocate_min_tiers"]


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
    policies: dict[str, LinearPolicy], tier_shares: dict[str, float], target_bits: float, budget_name: str | None = None
) -> dict[str, LinearPolicy]:
    """Promote layers one tier at a time, best error reduction per extra bit first, within budget.

    Returns new policies with ``min_tier`` and ``reason`` set for the promoted layers; the
    others are unchanged. A target below the all-base average promotes nothing. ``budget_name``
    names the budget in the recorded reason (default: the converter's ``--target-bits``).
    """
    budget_name = budget_name or f"--target-bits {target_bits}"
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
                f"{old.sensitivity[str(promoted.min_tier)]:.2e}, the best gain per extra bit under {budget_name}"
                + (f"; {old.reason}" if old.reason else "")
            ),
        )
        spent += cost
