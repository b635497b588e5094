"""A prompt's causal attention on the native kernel (tap_runtime.prefill_attention, csrc/tap_prefill_attention.cpp)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import tap_runtime
from tap_runtime.kernels.native import native_kernels
from tap_runtime.prefill_attention import ATTENTION_NAME, is_plain_causal, prefill_attention_forward

pytestmark = pytest.mark.skipif(native_kernels() is None, reason="TAP's native CPU kernels are unavailable here")


def _qkv(batch, heads, kv_heads, seq_len, head_dim, strided, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # as a projection's output viewed per head: (batch, seq, heads, dim).transpose(1, 2)
        make = lambda h: torch.randn(batch, seq_len, h, head_dim, generator=g).transpose(1, 2)
    else:
        make = lambda h: torch.randn(batch, h, seq_len, head_dim, generator=g)
    return make(heads), make(kv_heads), make(kv_heads)


@pytest.mark.parametrize(
    "batch,heads,kv_heads,seq_len,head_dim,strided",
    [
        (1, 9, 3, 130, 64, True),  # SmolLM2's heads; partial query block and partial 16-key chunk
        (2, 4, 4, 37, 32, False),  # batch of two, no grouping
        (1, 12, 2, 96, 128, True),  # Qwen2.5-1.5B's heads; whole blocks
        (1, 2, 1, 2, 16, True),  # two tokens
        (1, 4, 1, 49, 256, False),  # gemma-3's head_dim; one row past a query block
    ],
)
def test_attend_causal_is_sdpas_causal_attention(batch, heads, kv_heads, seq_len, head_dim, strided):
    q, k, v = _qkv(batch, heads, kv_heads, seq_len, head_dim, strided)
    scale = 0.7 * head_dim**-0.5
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    got = native_kernels().attend_causal(q, k, v, scale)
    assert got.shape == (batch, seq_len, heads, head_dim) and got.is_contiguous()
    torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,seq_len", [(16, 130), (1, 40), (50, 200), (7, 49), (300, 130)])
def test_attend_causal_with_a_window_is_sdpa_under_the_sliding_window_mask(window, seq_len):
    """window > 0: each query sees its last `window` keys (itself included), as transformers'
    sliding-window layers do; a window past the prompt is plain causal attention."""
    q, k, v = _qkv(1, 4, 2, seq_len, 64, strided=True, seed=window)
    i = torch.arange(seq_len)
    visible = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=0.125, enable_gqa=True)
    got = native_kernels().attend_causal(q, k, v, 0.125, window)
    torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="window must be >= 0"):
        native_kernels().attend_causal(q, k, v, 0.125, -1)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda q, k, v: (q.double(), k, v), "float32"),
        (lambda q, k, v: (q[..., :24], k[..., :24], v[..., :24]), "multiple of 16"),
        (lambda q, k, v: (q[:, :3], k[:, :2], v[:, :2]), "multiple of num_kv_heads"),
        (lambda q, k, v: (q, k, v[:, :, :5]), "k and v must be"),
        (lambda q, k, v: (q, k.transpose(2, 3), v), "head_dim must be contiguous"),
    ],
)
def test_attend_causal_names_what_is_wrong(change, message):
    q, k, v = _qkv(1, 4, 2, 32, 32, strided=False)
    with pytest.raises(RuntimeError, match=message):
        native_kernels().attend_causal(*change(q, k, v), 0.1)


def _count_native_calls(monkeypatch):
    native = native_kernels()
    calls = []
    original = native.attend_causal

    def counted(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(native, "attend_causal", counted)
    return calls


def _load(path):
    """15-bit base activations and no bfloat16 dense products (VNNI's many-token path): both
    would let the kernels' last-bit differences flip a rounding downstream, which is not under test."""
    tap = tap_runtime.load(path, base_activation_bits=15)
    if hasattr(tap.kernel, "vnni_dense_min_tokens"):
        tap.kernel.vnni_dense_min_tokens = 1 << 30
    tap.set_routing("fixed", tier=8)
    return tap


def _assert_logits_agree(native, reference):
    """Attention outputs agree to float32 rounding; downstream, a last-bit difference can still
    flip a 15-bit activation code, most visibly in the head (one scale per token, and gemma's
    hidden states have large outliers), which moves a few logits by up to ~1e-3 of the peak.
    So: every logit within 5e-3 of the peak, and on average within 1e-4 of it."""
    peak = float(reference.abs().max())
    assert float((native - reference).abs().max()) <= 5e-3 * peak
    assert float((native - reference).abs().mean()) <= 1e-4 * peak


def _logits(tap, ids, attention, **kwargs):
    tap.model.set_attn_implementation(attention)
    with torch.inference_mode():
        return tap.model(ids, **kwargs).logits.float()


def test_tap_prompts_attend_natively_and_give_sdpas_logits(converted_factory, tiny_model_factory, monkeypatch):
    tap = _load(converted_factory("llama"))
    assert tap.model.config._attn_implementation == ATTENTION_NAME and tap.model.tap_native_attention
    # A model the process loads itself keeps sdpa: only TAP's models take the native kernel.
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_factory("llama")))
    assert plain.config._attn_implementation == "sdpa"
    calls = _count_native_calls(monkeypatch)
    ids = torch.randint(3, 320, (1, 40), generator=torch.Generator().manual_seed(0))
    native = _logits(tap, ids, ATTENTION_NAME)
    assert len(calls) == tap.table.num_layers and calls[0] == (1, 4, 40, 16)
    _assert_logits_agree(native, _logits(tap, ids, "sdpa"))


def test_calls_the_kernel_cannot_take_fall_through_to_sdpa(converted_factory, monkeypatch):
    tap = _load(converted_factory("llama"))
    calls = _count_native_calls(monkeypatch)
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: a mask beyond causality
    native = _logits(tap, ids, ATTENTION_NAME, attention_mask=mask)
    assert calls == []
    torch.testing.assert_close(native, _logits(tap, ids, "sdpa", attention_mask=mask))
    # Decode steps (one query against the cache) are sdpa's too; the prompt before them is native.
    tap.model.set_attn_implementation(ATTENTION_NAME)
    with torch.inference_mode():
        out = tap.model.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 27) and len(calls) == tap.table.num_layers
    # No backward in the kernel: a call that needs one goes to sdpa, and the gradient flows.
    calls.clear()
    q, k, v = _qkv(1, 4, 2, 12, 16, strided=False)
    q.requires_grad_(True)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    out, _ = prefill_attention_forward(module, q, k, v, None, scaling=0.25)
    out.sum().backward()
    assert calls == [] and q.grad is not None

def test_gemmas_sliding_layers_keep_their_window(converted_factory, monkeypatch):
    """gemma-3's sliding layers (window 16 here) get a sliding-window mask for a 40-token prompt,
    and the kernel takes it with their window; its full-attention layers, maskless, run natively
    too. Logits match sdpa's throughout."""
    tap = _load(converted_factory("gemma3_text"))
    assert tap.model.config._attn_implementation == ATTENTION_NAME
    calls = _count_native_calls(monkeypatch)
    ids = torch.randint(3, 320, (1, 40), generator=torch.Generator().manual_seed(2))
    native = _logits(tap, ids, ATTENTION_NAME)
    layer_types = tap.model.config.get_text_config().layer_types
    assert len(calls) == len(layer_types) and "sliding_attention" in layer_types
    reference = _logits(tap, ids, "sdpa")
    _assert_logits_agree(native, reference)
    # A prompt within the window: transformers still builds the sliding layers' mask, and it is
    # the causal pattern itself.
    calls.clear()
    short = ids[:, :12]
    native = _logits(tap, short, ATTENTION_NAME)
    assert len(calls) == len(layer_types)
    reference = _logits(tap, short, "sdpa")
    _assert_logits_agree(native, reference)


def test_only_the_causal_pattern_itself_counts_as_plain_causal():
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert is_plain_causal(causal, 6) and is_plain_causal(causal.expand(2, 1, 6, 6), 6)
    padded = causal.clone()
    padded[:, 0] = False  # a padded first position
    window = causal & ~torch.ones(6, 6, dtype=torch.bool).tril(-3)  # a window of 3
    for mask in (padded, window, causal.float(), causal[:5, :5], causal.expand(1, 2, 6, 6)):
        assert not is_plain_causal(mask, 6)
    assert is_plain_causal(window, 6, window=3) and is_plain_causal(causal, 6, window=6)
    assert not is_plain_causal(window, 6, window=2) and not is_plain_causal(padded & window, 6, window=3)


@pytest.mark.parametrize("model_type,prompt_len", [("llama", 30), ("gemma3_text", 12), ("gemma3_text", 30)])
def test_the_lean_loops_prompt_attends_natively_and_gives_sdpas_logits(converted_factory, monkeypatch, model_type, prompt_len):
    """TAP's own decoder loop (tap_runtime.decode) runs a prompt from position 0 through the
    kernel too (gemma's sliding layers with their window, 16 here); a chunk after cached
    positions (an explicit mask) and decode steps keep SDPA."""
    import tap_runtime.decode as decode

    tap = _load(converted_factory(model_type))
    calls = _count_native_calls(monkeypatch)
    ids = torch.randint(3, 320, (1, prompt_len), generator=torch.Generator().manual_seed(3))
    decoder = decode.FastDecoder(tap.model)
    decoder._allocate(ids.shape[1] + 4, torch.float32, ids.device)
    with torch.inference_mode():
        native = decoder.forward(ids, 0, all_logits=True)
        assert len(calls) == tap.table.num_layers
        decoder.forward(ids[:, :10], 0)
        decoder.forward(ids[:, 10:], 10)
        assert len(calls) == 2 * tap.table.num_layers
        monkeypatch.setattr(decode, "attend_prompt", lambda *args: None)
        reference = decoder.forward(ids, 0, all_logits=True)
    _assert_logits_agree(native, reference)
