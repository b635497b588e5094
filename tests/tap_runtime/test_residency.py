"""Memory-efficient mode: residual planes read from the shards on demand, within a byte budget."""

from __future__ import annotations

import pytest
import torch

import tap_runtime
from tap_runtime.errors import InvalidConfigError
from tap_runtime.layers import TapLinear
from tap_runtime.residency import LazyPlane, ResidualPlaneCache, prepared_nbytes

PROMPT = "The river flows past the old mill and"


def _residual_planes(tap) -> list[LazyPlane]:
    return [p for m in tap.model.modules() if isinstance(m, TapLinear) for p in m._prepared if isinstance(p, LazyPlane)]


@pytest.mark.parametrize("routing", [("learned", None), ("fixed", 8)])
def test_same_tokens_as_a_full_load(converted_factory, routing):
    directory = converted_factory("qwen2")
    full = tap_runtime.load(directory)
    lean = tap_runtime.load(directory, memory_efficient=True)
    for tap in (full, lean):
        tap.set_routing(routing[0], tier=routing[1])
    expected = full.generate(PROMPT, max_new_tokens=10, eos_token_id=[])
    got = lean.generate(PROMPT, max_new_tokens=10, eos_token_id=[])
    assert got.token_ids == expected.token_ids
    assert got.metrics.tier_token_layer_counts == expected.metrics.tier_token_layer_counts


def test_base_tier_never_reads_a_residual_plane(converted_factory):
    lean = tap_runtime.load(converted_factory("llama"), memory_efficient=True)
    lazy = _residual_planes(lean)
    assert lazy and all(p.shard.is_file() for p in lazy)  # every linear's residual plane stays on disk
    lean.set_routing("fixed", tier=4)
    lean.generate(PROMPT, max_new_tokens=6)
    cache = lean.model.tap_residual_cache
    assert cache.packs == 0 and cache.resident_bytes == 0


def test_budget_bounds_resident_bytes_and_evicts_least_recent(converted_factory):
    lean = tap_runtime.load(converted_factory("llama"), memory_efficient=True)
    cache = lean.model.tap_residual_cache
    lazy = _residual_planes(lean)
    one = prepared_nbytes(cache.kernel.prepare_plane(lazy[0].read()))
    cache.max_bytes = 2 * one  # every plane of the tiny model has the same size or less
    cache.clear()
    first, second, third = (lazy[i] for i in range(3))
    sizes = {}
    for plane in (first, second, first, third):  # first is used again, so second is the oldest
        sizes[id(plane)] = prepared_nbytes(plane.resolve())
        assert cache.resident_bytes <= cache.max_bytes
    resident = set(cache._entries)
    assert id(second) not in resident and id(first) in resident and id(third) in resident
    assert cache.hits == 1 and cache.packs == 3
    lean.set_routing("fixed", tier=8)
    lean.generate(PROMPT, max_new_tokens=4)  # every plane needed, far more than the budget
    assert cache.resident_bytes <= cache.max_bytes


def test_read_gives_the_stored_plane(converted_factory):
    directory = converted_factory("llama")
    kept = tap_runtime.load(directory, keep_portable=True)
    lean = tap_runtime.load(directory, memory_efficient=True)
    kept_linear = next(m for m in kept.model.modules() if isinstance(m, TapLinear))
    lean_linear = next(m for m in lean.model.modules() if isinstance(m, TapLinear))
    stored = kept_linear.planes()[1]
    read = lean_linear._prepared[1].read()
    assert torch.equal(read.qweight, stored.qweight) and torch.equal(read.scales, stored.scales.to(torch.float16))


def test_refusals(converted_factory):
    with pytest.raises(ValueError, match="max_bytes"):
        ResidualPlaneCache(None, -1)
    with pytest.raises(InvalidConfigError, match="residual_cache_mb"):
        tap_runtime.load(converted_factory("llama"), memory_efficient=True, residual_cache_mb=-1)
