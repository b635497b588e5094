"""Spending a bit budget on whole modules: the shared allocation rule, and set_routing's promote."""

import pytest
import torch

import tap_runtime
from tap_runtime.allocation import allocate_min_tiers, average_bits, expected_bits
from tap_runtime.errors import InvalidConfigError
from tap_runtime.format import LinearPolicy, PlaneSpec
from tap_runtime.metrics import weight_bits_read

SHARES = {"8": 0.1}


def _policy(name, out_features, sensitivity):
    specs = (PlaneSpec(4, 64, False), PlaneSpec(4, 64, True))
    return LinearPolicy(name, 256, out_features, False, 0, (4, 8), specs, sensitivity=sensitivity)


def test_expected_bits_count_the_routed_share():
    policy = _policy("a", 64, {"4": 0.1, "8": 0.001})
    # Scales and zeros a byte per group of 64: 4.25 bits on the base plane, 4.125 on the residual.
    assert expected_bits(policy, SHARES) == pytest.approx(4.25 + 0.1 * 4.125)
    promoted = LinearPolicy(**{**policy.__dict__, "min_tier": 8})
    assert expected_bits(promoted, SHARES) == pytest.approx(8.375)


def test_allocation_promotes_the_best_gain_per_bit_within_budget():
    policies = {
        "cheap_and_sensitive": _policy("cheap_and_sensitive", 64, {"4": 0.20, "8": 0.001}),
        "big_and_sensitive": _policy("big_and_sensitive", 640, {"4": 0.25, "8": 0.001}),
        "robust": _policy("robust", 64, {"4": 0.01, "8": 0.0001}),
    }
    start = average_bits(policies, SHARES)
    target = start + 0.5  # room for the small layers, not for the big one
    allocated = allocate_min_tiers(policies, SHARES, target)
    assert allocated["cheap_and_sensitive"].min_tier == 8
    assert allocated["big_and_sensitive"].min_tier == 4
    assert "promoted to tier 8 for every token" in allocated["cheap_and_sensitive"].reason
    assert average_bits(allocated, SHARES) <= target


def test_a_target_below_the_base_promotes_nothing():
    policies = {"a": _policy("a", 64, {"4": 0.2, "8": 0.001})}
    assert allocate_min_tiers(policies, SHARES, 4.0) == policies


def _bits_read(tap, ids):
    tap.router.reset_counts()
    with torch.inference_mode():
        tap(ids)  # one pass of many tokens routes exactly its share per layer
    return weight_bits_read(tap.table, tap.router.counts)["avg_weight_bits_per_token"]


def test_set_routing_promotes_modules_then_routes_tokens_within_the_bits(converted_factory):
    tap = tap_runtime.load(converted_factory("llama"))
    converted = dict(tap.table.linear)
    no_routing = {str(t): 0.0 for t in tap.table.tiers[1:]}
    base = average_bits(converted, no_routing)
    top = average_bits({n: LinearPolicy(**{**p.__dict__, "min_tier": p.tiers[-1]}) for n, p in converted.items()}, no_routing)
    target = base + 0.4 * (top - base)
    ids = torch.randint(3, 320, (1, 200), generator=torch.Generator().manual_seed(0))

    tap.set_routing("budget", bits=target)
    routed_only_share = tap.router.random_shares[0]
    tap.set_routing("budget", bits=target, promote=0.5)
    expected = allocate_min_tiers(converted, no_routing, base + 0.5 * (target - base))
    promoted = {n for n, p in tap.table.linear.items() if p.min_tier > p.tiers[0]}
    assert promoted and promoted == {n for n, p in expected.items() if p.min_tier > p.tiers[0]}
    assert all("set_routing(bits=" in tap.table.linear[n].reason for n in promoted)
    for name, module in tap.model.named_modules():
        if name in promoted:
            assert module.policy.always_planes == 2  # both planes for every token
    # Half the extra bits went to the modules, so fewer tokens are routed, and the total holds.
    assert 0 < tap.router.random_shares[0] < routed_only_share
    assert _bits_read(tap, ids) == pytest.approx(target, abs=0.02)

    tap.set_routing("budget", bits=target, promote=0)  # back to the converted modules
    assert tap.table.linear == converted
    assert _bits_read(tap, ids) == pytest.approx(target, abs=0.02)


def test_promote_refuses_what_it_cannot_do(converted_factory):
    tap = tap_runtime.load(converted_factory("llama"))
    with pytest.raises(InvalidConfigError, match="give bits too"):
        tap.set_routing("budget", promote=0.5)
    with pytest.raises(InvalidConfigError, match=r"in \[0, 1\]"):
        tap.set_routing("budget", bits=6.0, promote=1.5)
    with pytest.raises(InvalidConfigError, match="below this checkpoint's base tier"):
        tap.set_routing("budget", bits=2.0, promote=0.5)
    with pytest.raises(InvalidConfigError, match="not of 'fixed'"):
        tap.set_routing("fixed", tier=4, bits=6.0, promote=0.5)
    assert all(p.min_tier == p.tiers[0] for p in tap.table.linear.values())  # nothing half-applied
