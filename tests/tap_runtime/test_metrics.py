"""Bits read per token, and the routed shares that spend a given number of bits."""

import pytest
import torch

import tap_runtime
from tap_runtime.errors import InvalidConfigError
from tap_runtime.metrics import shares_for_bits, weight_bits_read


def _bits(table, shares):
    """Bits read per token when a fraction shares[k] of tokens is at or above tier k+1."""
    at_or_above = (1.0, *shares, 0.0)
    row = [at_or_above[k] - at_or_above[k + 1] for k in range(len(table.tiers))]
    counts = torch.tensor([row] * table.num_layers, dtype=torch.float64) * 1000
    return weight_bits_read(table, counts)["avg_weight_bits_per_token"]


@pytest.mark.parametrize("tiers", [(4, 8), (4, 8, 16)])
def test_shares_spend_exactly_the_bits_asked_and_keep_the_fitted_ratios(converted_factory, tiers):
    table = tap_runtime.load(converted_factory("llama", tiers=tiers)).table
    base, top = _bits(table, (0.0,) * (len(tiers) - 1)), _bits(table, (1.0,) * (len(tiers) - 1))
    fitted = tuple(0.1 / (k + 1) for k in range(len(tiers) - 1))
    # The most the fitted ratios allow: the largest share at 1.
    reachable = _bits(table, tuple(share / max(fitted) for share in fitted))
    target = base + 0.3 * (reachable - base)
    shares = shares_for_bits(table, target, fitted)
    assert _bits(table, shares) == pytest.approx(target, abs=1e-9)
    if len(tiers) > 2:
        assert shares[1] / shares[0] == pytest.approx(fitted[1] / fitted[0])
    assert shares_for_bits(table, base, fitted) == pytest.approx((0.0,) * (len(tiers) - 1))
    assert shares_for_bits(table, top + 1, fitted) == (1.0,) * (len(tiers) - 1)
    with pytest.raises(InvalidConfigError, match="below this checkpoint's base tier"):
        shares_for_bits(table, base - 0.5, fitted)


def test_budget_routing_at_a_bit_budget_reads_that_many_bits(converted_factory):
    tap = tap_runtime.load(converted_factory("llama"))
    base = _bits(tap.table, (0.0,))
    target = base + 0.2 * (_bits(tap.table, (1.0,)) - base)
    tap.set_routing("budget", bits=target)
    tap.router.reset_counts()
    ids = torch.randint(3, 320, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tap(ids)  # one pass of many tokens routes exactly its share per layer
    got = weight_bits_read(tap.table, tap.router.counts)["avg_weight_bits_per_token"]
    assert got == pytest.approx(target, abs=0.01)
    with pytest.raises(InvalidConfigError, match="shares or bits"):
        tap.set_routing("budget", shares=(0.1,), bits=target)
    with pytest.raises(InvalidConfigError, match="not of 'fixed'"):
        tap.set_routing("fixed", tier=4, bits=target)
