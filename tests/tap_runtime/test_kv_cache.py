"""KV caches of the lean loop: the float one is exact, the int8 one is close and a quarter the size."""

from __future__ import annotations

import pytest
import torch

import tap_runtime
from tap_runtime.decode import FastDecoder
from tap_runtime.errors import InvalidConfigError
from tap_runtime.kv_cache import Int8KVCache, StaticKVCache, make_kv_cache

PROMPT = "The river flows past the old mill and then it turns towards the sea, where the gulls wait"


def test_int8_cache_round_trips_each_vector_within_half_a_step():
    generator = torch.Generator().manual_seed(0)
    cache = make_kv_cache("int8", 2, 3, 10, 64, torch.float32, torch.device("cpu"))
    assert isinstance(cache, Int8KVCache)
    key = torch.randn(1, 3, 4, 64, generator=generator) * torch.tensor([1.0, 10.0, 0.01]).view(1, 3, 1, 1)
    value = torch.randn(1, 3, 4, 64, generator=generator)
    cache.write(1, 5, key, value)
    keys, values = cache.read(1, 5, 9)
    assert keys.dtype == torch.float32 and keys.shape == key.shape
    # Each (head, position) vector has its own scale: absmax / 127, so the error is <= half of it.
    step = key.abs().amax(dim=-1, keepdim=True) / 127
    assert torch.all((keys - key).abs() <= step / 2 + 1e-7)
    assert torch.all((values - value).abs() <= value.abs().amax(dim=-1, keepdim=True) / 254 + 1e-7)


def test_int8_cache_is_about_a_quarter_of_float32():
    shape = dict(num_layers=4, kv_heads=3, max_length=128, head_dim=64, dtype=torch.float32, device=torch.device("cpu"))
    full, small = StaticKVCache(**shape), Int8KVCache(**shape)
    assert small.nbytes / full.nbytes == pytest.approx((64 + 4) / (4 * 64))


def test_unknown_cache_kind_is_refused():
    with pytest.raises(InvalidConfigError, match="kv_cache='fp8' is unknown"):
        make_kv_cache("fp8", 1, 1, 1, 8, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_int8_cache_logits_stay_close_to_the_float_cache(converted_factory, model_type):
    tap = tap_runtime.load(converted_factory(model_type))
    tap.set_routing("learned")  # fixed thresholds: a token routes the same in a chunk or alone
    ids = tap.encode(PROMPT)
    logits = {}
    for kind in ("float", "int8"):
        decoder = FastDecoder(tap.model, kv_cache=kind)
        decoder._allocate(ids.shape[1], torch.float32, ids.device)
        with torch.inference_mode():
            # Chunks: later positions read earlier ones back from the cache (past Gemma's window too).
            chunks = [decoder.forward(ids[:, :6], 0, all_logits=True)]
            chunks += [decoder.forward(ids[:, t : t + 1], t, all_logits=True) for t in range(6, ids.shape[1])]
        logits[kind] = torch.cat(chunks)
    with torch.inference_mode():
        eager = tap.model(ids).logits[0]
    # One-token steps and the whole-window pass take different kernel paths (M = 1 against M = T),
    # whose float rounding differs with the machine and thread count (up to 2.5e-3 seen on 16 cores).
    torch.testing.assert_close(logits["float"], eager, rtol=1e-3, atol=1e-2)
    difference = (logits["int8"] - logits["float"]).abs().max() / logits["float"].abs().max()
    # A random tiny model's logits are nearly flat, so this ratio moves with the conversion: the
    # tiny gemma gave 0.014 with column-order GPTQ and 0.057 with act-order. On real gemma the
    # int8 cache adds the same KL under both (0.0062 and 0.0056, scripts/bench_kv_cache.py).
    assert 0 < difference < 0.1


def test_generate_with_an_int8_cache_and_its_refusals(converted_factory):
    tap = tap_runtime.load(converted_factory("llama"))
    result = tap.generate(PROMPT, max_new_tokens=8, kv_cache="int8", eos_token_id=[])
    assert len(result.token_ids) == 8
    assert result.metrics.extra["kv_cache"] == "int8"
    small = result.metrics.extra["kv_cache_bytes"]
    full = tap.generate(PROMPT, max_new_tokens=8, eos_token_id=[]).metrics.extra["kv_cache_bytes"]
    assert small < full / 3
    with pytest.raises(InvalidConfigError, match="lean decode loop's"):
        tap.generate(PROMPT, max_new_tokens=2, kv_cache="int8", decode="eager")
    with pytest.raises(InvalidConfigError, match="is unknown"):
        tap.generate(PROMPT, max_new_tokens=2, kv_cache="int4")
