"""The lean decode loop gives transformers' tokens and routing, fuses projections without copies."""

from __future__ import annotations

import pytest
import torch

import tap_runtime
from tap_runtime.decode import FastDecoder, FusedProjection, fast_decode_unsupported
from tap_runtime.errors import InvalidConfigError
from tap_runtime.kernels.native import native_kernels
from tap_runtime.kernels.base import SplitPlane
from tap_runtime.kernels.vnni import TiledPlane

from ..conftest import FAST_CONVERT, build_tiny_model, decisive_prompt

PROMPT = "The river flows past the old mill and"


def _eager_tokens(tap, ids, new_tokens):
    with torch.inference_mode():
        out = tap.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=tap.tokenizer.pad_token_id,
        )
    return out[0, ids.shape[1]:].tolist()


def _plane_storage(plane) -> int:
    """Where a packed plane's codes live, for either CPU kernel's layout (a plane split for a
    level table: where its first part's codes live)."""
    if isinstance(plane, SplitPlane):
        plane = plane.parts[0]
    codes = plane.weight if isinstance(plane, TiledPlane) else plane.packed
    return codes.untyped_storage().data_ptr()


@pytest.mark.parametrize("group_size", [32, 64], ids=["g32-torch-kernel", "g64-vnni-kernel"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gemma3_text"])
@pytest.mark.parametrize("routing", [("learned", None), ("fixed", 8), ("fixed", 4)])
def test_lean_loop_matches_transformers_generate(converted_factory, model_type, routing, group_size):
    tap = tap_runtime.load(converted_factory(model_type, group_size=group_size))
    if group_size == 64 and native_kernels() is not None:
        assert isinstance(tap.model.model.layers[0].mlp.down_proj._prepared[0], TiledPlane)
    tap.set_routing(routing[0], tier=routing[1])
    # Up to 24 new tokens: past the tiny Gemma 3's sliding window of 16 positions.
    ids, new_tokens = decisive_prompt(tap, 24, 16)
    tap.router.reset_counts()
    expected = _eager_tokens(tap, ids, new_tokens)
    expected_counts = tap.router.counts.clone()
    tap.router.reset_counts()
    result = FastDecoder(tap.model).generate(ids, new_tokens, eos_token_id=[])
    assert result.token_ids == expected
    # Same decisions per layer and tier: the hooks route exactly as in the eager path.
    assert torch.equal(tap.router.counts, expected_counts)
    assert result.start <= result.first_token_time <= result.end


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_chunked_prefill_equals_one_pass(converted_factory, model_type):
    """New positions after cached ones see the cache and each other causally (explicit mask),
    within the sliding window where a layer has one."""
    tap = tap_runtime.load(converted_factory(model_type))
    tap.set_routing("fixed", tier=8)
    decoder = FastDecoder(tap.model)
    ids = tap.encode(PROMPT + " then it turns towards the sea, where the gulls wait for the boats")
    assert ids.shape[1] > 16 + 5  # longer than the tiny Gemma 3's window after the first chunk
    decoder._allocate(ids.shape[1], torch.float32, ids.device)
    with torch.inference_mode():
        whole = decoder.forward(ids, 0)
        decoder.forward(ids[:, :5], 0)
        chunked = decoder.forward(ids[:, 5:], 5)
        with_eager = tap.model(ids, logits_to_keep=1).logits.reshape(-1)
    # The cache and the one pass order attention's sums differently; downstream a last-bit
    # difference can flip an activation code in the plane kernels (15- and 8-bit), which moves
    # a few logits by up to ~1e-3 of the peak (as in test_prefill_attention._assert_logits_agree).
    peak = float(whole.abs().max())
    assert float((chunked - whole).abs().max()) <= 5e-3 * peak
    assert float((chunked - whole).abs().mean()) <= 2e-4 * peak
    torch.testing.assert_close(whole, with_eager, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module", params=[32, 64], ids=["g32-torch-kernel", "g64-vnni-kernel"])
def wide_llama(request, tmp_path_factory, tiny_tokenizer_dir, calibration_text_file):
    """A llama whose q/k/v and gate/up widths are multiples of 64, so the CPU kernels can stack them."""
    from tap_convert import ConvertOptions, convert

    import tests.conftest as conftest

    saved = conftest.TINY_CONFIGS.get("llama")
    conftest.TINY_CONFIGS["llama"] = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    try:
        source = build_tiny_model("llama", tmp_path_factory.mktemp("wide-llama"), tiny_tokenizer_dir)
    finally:
        conftest.TINY_CONFIGS["llama"] = saved
    out = tmp_path_factory.mktemp("wide-llama-tap") / "ckpt"
    convert(str(source), out, ConvertOptions(calib=str(calibration_text_file), tiers=(4, 8), group_size=request.param, **FAST_CONVERT))
    return out


def test_fused_projections_share_storage_and_keep_results(wide_llama):
    tap = tap_runtime.load(wide_llama)
    ids = tap.encode(PROMPT)
    attention = tap.model.model.layers[0].self_attn
    x = torch.randn(1, 3, 128, generator=torch.Generator().manual_seed(0))
    tap.set_routing("fixed", tier=8)  # both planes for every token, so the residual stack is used too
    tap.router.route_layer(0, x)
    with torch.inference_mode():
        separate = [attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)]
    tap.set_routing("learned")
    expected = _eager_tokens(tap, ids, 10)
    decoder = FastDecoder(tap.model)
    assert all(qkv is not None and gate_up is not None for qkv, gate_up in decoder.fused)
    qkv = decoder.fused[0][0]
    for plane_index in range(2):
        fused_storage = _plane_storage(qkv.prepared[plane_index])
        for module in (attention.q_proj, attention.k_proj, attention.v_proj):
            # Each module now reads a view into the stacked plane: nothing is held twice.
            assert _plane_storage(module._prepared[plane_index]) == fused_storage
    tap.set_routing("fixed", tier=8)
    tap.router.route_layer(0, x)
    with torch.inference_mode():
        fused = qkv(x)
        views = [attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)]
    for before, stacked, view in zip(separate, fused, views):
        torch.testing.assert_close(stacked, before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(view, before, rtol=0, atol=0)
    tap.set_routing("learned")
    # Tokens through the fused loop and, afterwards, through the eager path on the views.
    assert decoder.generate(ids, 10, eos_token_id=[]).token_ids == expected
    assert _eager_tokens(tap, ids, 10) == expected
    # A second decoder on the same model finds the same stacks (the views cannot be re-stacked).
    second = FastDecoder(tap.model)
    assert [pair for pair in second.fused] == [pair for pair in decoder.fused]
    assert second.generate(ids, 10, eos_token_id=[]).token_ids == expected


def test_fusion_declined_for_padded_rows(converted_factory):
    """64-wide k/v planes of the default tiny model are padded in the CPU layout: no fusion."""
    tap = tap_runtime.load(converted_factory("llama"))
    attention = tap.model.model.layers[0].self_attn
    assert FusedProjection.build([attention.q_proj, attention.k_proj, attention.v_proj]) is None


def test_tap_model_generate_paths_agree(converted_factory):
    tap = tap_runtime.load(converted_factory("qwen2"))
    fast = tap.generate(PROMPT, max_new_tokens=8, decode="fast", eos_token_id=[])
    eager = tap.generate(PROMPT, max_new_tokens=8, decode="eager", min_new_tokens=8)
    assert fast.token_ids == eager.token_ids
    assert fast.metrics.extra["decode_path"] == "fast"
    assert eager.metrics.extra["decode_path"] == "eager"
    assert fast.metrics.tier_token_layer_counts == eager.metrics.tier_token_layer_counts
    auto = tap.generate(PROMPT, max_new_tokens=8, eos_token_id=[])
    assert auto.metrics.extra["decode_path"] == "fast"


def test_sampling_is_seeded_and_eos_stops(converted_factory):
    tap = tap_runtime.load(converted_factory("llama"))
    first = tap.generate(PROMPT, max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3, eos_token_id=[])
    second = tap.generate(PROMPT, max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3, eos_token_id=[])
    assert first.token_ids == second.token_ids and len(first.token_ids) == 10
    greedy = tap.generate(PROMPT, max_new_tokens=10, eos_token_id=[])
    stop = greedy.token_ids[2]
    stopped = tap.generate(PROMPT, max_new_tokens=10, eos_token_id=stop)
    assert stopped.token_ids == greedy.token_ids[: greedy.token_ids.index(stop) + 1]


def test_unsupported_requests_fall_back_with_a_reason(converted_factory):
    gpt2 = tap_runtime.load(converted_factory("gpt2"))
    assert "gpt2" in fast_decode_unsupported(gpt2.model, 1, {}, 32)
    out = gpt2.generate(PROMPT, max_new_tokens=4)
    assert out.metrics.extra["decode_path"] == "eager"
    assert "gpt2" in out.metrics.extra["fast_decode_unavailable"]
    with pytest.raises(InvalidConfigError, match="gpt2"):
        gpt2.generate(PROMPT, max_new_tokens=4, decode="fast")
    llama = tap_runtime.load(converted_factory("llama"))
    assert "batch 2" in fast_decode_unsupported(llama.model, 2, {}, 32)
    assert "repetition_penalty" in fast_decode_unsupported(llama.model, 1, {"repetition_penalty": 1.1}, 32)
    assert llama.generate(PROMPT, max_new_tokens=4, repetition_penalty=1.1).metrics.extra["decode_path"] == "eager"
    with pytest.raises(InvalidConfigError, match="decode"):
        llama.generate(PROMPT, max_new_tokens=4, decode="turbo")


def test_lean_loop_on_each_device(converted_factory, device):
    """Where the model runs on a GPU the loop keeps its cache and ids there and routes the same."""
    tap = tap_runtime.load(converted_factory("qwen2"), device=device)
    tap.set_routing("learned")
    ids = tap.encode(PROMPT).to(device)
    expected = _eager_tokens(tap, ids, 8)
    decoder = FastDecoder(tap.model)
    assert decoder.generate(ids, 8, eos_token_id=[]).token_ids == expected
    assert decoder.cache.keys[0].device.type == device.type


def test_fusion_with_residual_planes_left_on_disk(wide_llama):
    """Memory-efficient mode: base planes are stacked; routed tokens read residual planes per module."""
    full = tap_runtime.load(wide_llama)
    lean = tap_runtime.load(wide_llama, memory_efficient=True)
    ids = full.encode(PROMPT)
    expected = FastDecoder(full.model).generate(ids, 10, eos_token_id=[]).token_ids
    decoder = FastDecoder(lean.model)
    assert all(len(qkv.prepared) == 1 for qkv, _ in decoder.fused)  # only the base plane stacked
    assert decoder.generate(ids, 10, eos_token_id=[]).token_ids == expected
    assert lean.model.tap_residual_cache.packs > 0


@pytest.mark.parametrize("group_size", [32, 64], ids=["g32-torch-kernel", "g64-vnni-kernel"])
def test_decode_steps_take_the_direct_path_only_where_every_plane_is_packed(converted_factory, monkeypatch, group_size):
    from tap_runtime.decode import DirectDecodeLayer

    tap = tap_runtime.load(converted_factory("llama", group_size=group_size))
    decoder = FastDecoder(tap.model)
    decoder.native_layers = False  # the per-projection calls under test (whole layers: see below)
    assert all(isinstance(d, DirectDecodeLayer) for d in decoder.direct)
    calls = []
    original = DirectDecodeLayer.project
    monkeypatch.setattr(DirectDecodeLayer, "project", lambda self, *a: calls.append(a[2]) or original(self, *a))
    tap.set_routing("fixed", tier=8)
    ids = tap.encode(PROMPT)
    decoder.generate(ids, 3, eos_token_id=[])
    # 2 decode steps (the first token comes from the prefill) x every projection call, all on 2 planes
    # (q/k/v and gate/up are one call each where their planes stack, else one per module).
    per_step = sum(len(d.qkv) + len(d.gate_up) + 2 for d in decoder.direct)
    assert len(calls) == 2 * per_step and set(calls) == {2}
    lean = tap_runtime.load(converted_factory("llama", group_size=group_size), memory_efficient=True)
    assert all(d is None for d in FastDecoder(lean.model).direct)


@pytest.mark.skipif(native_kernels() is None, reason="TAP's native CPU kernels are unavailable here")
def test_lean_loop_follows_the_kernels_activation_rule_when_it_changes(wide_llama):
    """A base-only step takes the kernel's current 8-/15-bit rule, even in a decoder built before
    the rule changed (TapModel keeps its decoder between calls)."""
    from tap_runtime.kernels.vnni import ALL_NARROW, ALL_WIDE, CpuVnniKernel

    tap = tap_runtime.load(wide_llama)
    down = tap.model.model.layers[0].mlp.down_proj
    kernel = down.kernel
    if not isinstance(kernel, CpuVnniKernel) or type(down._prepared[0]) is not TiledPlane:
        pytest.skip("group size 32: torch's kernel, which has no 8-bit activation rule")
    tap.set_routing("fixed", tier=4)  # every token base-only
    ids = tap.encode(PROMPT)
    decoder = FastDecoder(tap.model)
    decoder._allocate(ids.shape[1] + 1, torch.float32, ids.device)

    def last_step_logits():
        with torch.inference_mode():
            decoder.forward(ids[:, :-1], 0)
            return decoder.forward(ids[:, -1:], ids.shape[1] - 1)

    wide = last_step_logits()
    kernel.base_wide_above = ALL_NARROW
    narrow = last_step_logits()
    kernel.base_wide_above = ALL_WIDE
    assert not torch.equal(wide, narrow)
    torch.testing.assert_close(narrow, wide, rtol=0.05, atol=0.05)  # 8-bit activations: close, not equal
    assert torch.equal(last_step_logits(), wide)


@pytest.mark.skipif(native_kernels() is None, reason="TAP's native CPU kernels are unavailable here")
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("routing", [("learned", None), ("fixed", 8)])
@pytest.mark.parametrize("group_size", [32, 64], ids=["g32-torch-kernel", "g64-vnni-kernel"])
def test_native_steps_match_the_operator_path(converted_factory, model_type, routing, group_size, monkeypatch):
    """Decode steps through the fused native operations give the torch operators' logits to
    float32 rounding, and the same routing decisions, token for token."""
    tap = tap_runtime.load(converted_factory(model_type, group_size=group_size))
    tap.set_routing(routing[0], tier=routing[1])
    decoder = FastDecoder(tap.model)
    assert decoder.native_steps
    native_steps = []
    original = FastDecoder._forward_native_step
    monkeypatch.setattr(FastDecoder, "_forward_native_step", lambda self, *a: native_steps.append(1) or original(self, *a))
    ids = tap.encode(PROMPT)
    following = [5, 17, 3, 99, 42, 7]  # teacher-forced tokens, so both paths see the same inputs
    decoder._allocate(ids.shape[1] + len(following), torch.float32, ids.device)

    def step_logits(native: bool):
        decoder.native_steps = native
        tap.router.reset_counts()
        with torch.inference_mode():
            decoder.forward(ids, 0)
            logits = [decoder.forward(torch.tensor([[token]]), ids.shape[1] + i) for i, token in enumerate(following)]
        return torch.stack(logits), tap.router.counts.clone()

    operator_logits, operator_counts = step_logits(False)
    assert not native_steps
    native_logits, native_counts = step_logits(True)
    assert len(native_steps) == len(following)
    # TAP's VNNI kernel rounds each block of activations to 15 bits, so a float32 rounding
    # difference in its input can move a product by one step (about 6e-5 here).
    scale = float(operator_logits.abs().max())
    torch.testing.assert_close(native_logits, operator_logits, rtol=1e-3, atol=1e-3 * scale)
    assert torch.equal(native_counts, operator_counts)


def test_native_steps_need_llama_family_layers_and_the_native_module(converted_factory, monkeypatch):
    gemma = tap_runtime.load(converted_factory("gemma3_text"))
    assert not FastDecoder(gemma.model).native_steps  # gelu MLP, four norms per layer: operator path
    monkeypatch.setattr("tap_runtime.decode.native_kernels", lambda: None)
    llama = tap_runtime.load(converted_factory("llama"))
    decoder = FastDecoder(llama.model)
    assert not decoder.native_steps
    ids = llama.encode(PROMPT)
    assert decoder.generate(ids, 6, eos_token_id=[]).token_ids == _eager_tokens(llama, ids, 6)


@pytest.mark.skipif(native_kernels() is None, reason="TAP's native CPU kernels are unavailable here")
@pytest.mark.parametrize("routing", [("learned", None), ("fixed", 8), ("fixed", 4)])
def test_whole_layer_native_call_gives_the_per_call_native_logits(wide_llama, routing, monkeypatch):
    """Where a layer's planes are all TAP-kernel planes and stacked, one native call runs the
    layer after its routing decision; it does the per-call native step's arithmetic in the same
    order, so logits and routing decisions are bitwise the same."""
    tap = tap_runtime.load(wide_llama)
    decoder = FastDecoder(tap.model)
    assert decoder.native_steps
    vnni = all(type(p) is TiledPlane for qkv, _ in decoder.fused for p in qkv.prepared)
    bodies = [step.body for step in decoder._native_plan]
    assert all(b is not None for b in bodies) if vnni else all(b is None for b in bodies)
    ids = tap.encode(PROMPT)
    following = [5, 17, 3, 99, 42, 7]
    decoder._allocate(ids.shape[1] + len(following), torch.float32, ids.device)

    def step_logits(whole_layers: bool):
        decoder.native_layers = whole_layers
        tap.router.reset_counts()
        tap.set_routing(routing[0], tier=routing[1])  # budget/learned state restarts alike
        with torch.inference_mode():
            decoder.forward(ids, 0)
            logits = [decoder.forward(torch.tensor([[token]]), ids.shape[1] + i) for i, token in enumerate(following)]
        return torch.stack(logits), tap.router.counts.clone()

    per_call, per_call_counts = step_logits(False)
    native, calls = native_kernels(), []
    original = native.decode_layer
    monkeypatch.setattr(native, "decode_layer", lambda *a: calls.append(1) or original(*a))
    whole, whole_counts = step_logits(True)
    assert len(calls) == (len(following) * len(bodies) if vnni else 0)
    assert torch.equal(whole, per_call)
    assert torch.equal(whole_counts, per_call_counts)
