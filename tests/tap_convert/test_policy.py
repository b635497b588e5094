import pytest
import torch

from tap_convert.policy import allocate_min_tiers, average_bits, expected_bits, relative_output_error
from tap_runtime.format import LinearPolicy, PlaneSpec

SHARES = {"8": 0.1}


def _policy(name, out_features, sensitivity):
    specs = (PlaneSpec(4, 64, False), PlaneSpec(4, 64, True))
    return LinearPolicy(name, 256, out_features, False, 0, (4, 8), specs, sensitivity=sensitivity)


def test_relative_output_error_full_and_diagonal_agree_for_white_inputs():
    weight = torch.randn(8, 16)
    approximation = weight + 0.1 * torch.randn(8, 16)
    full = relative_output_error(weight, approximation, torch.eye(16))
    diagonal = relative_output_error(weight, approximation, torch.ones(16))
    assert full == pytest.approx(diagonal, rel=1e-5)
    assert full == pytest.approx(float((weight - approximation).pow(2).sum() / weight.pow(2).sum()), rel=1e-5)


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
