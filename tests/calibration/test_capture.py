"""The calibration passes on tiny real models: every router signal against a direct computation,
the gradients' shapes and finiteness, weights and settings left untouched, and the layer-by-layer
Hessians against the whole-model pass."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from calibration.capture import collect_input_stats, collect_layer_moments, collect_token_signals
from tap_runtime.architectures import get_architecture
from tap_runtime.modeling import decoder_layers, iter_linear_sites, linear_weight


def _coarse(site):
    """A base tier that is the weight rounded to a coarse grid, so every layer has an error."""
    return (linear_weight(site) * 8).round() / 8


def test_gradients_measure_every_layer_and_touch_no_weight(tiny_model_factory):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_factory("llama")), dtype=torch.float32).eval()
    spec = get_architecture("llama")
    sites = list(iter_linear_sites(model, spec))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    attention_before = model.config._attn_implementation
    windows = torch.randint(3, 320, (3, 20), generator=torch.Generator().manual_seed(0))
    result = collect_token_signals(model, spec, sites, _coarse, windows, progress=False)
    assert result.loss_gradient.shape == result.loss_impact.shape == result.base_error.shape == (2, 3, 20)
    assert torch.isnan(result.loss_gradient[:, :, -1]).all()  # the last position predicts nothing
    assert torch.isfinite(result.loss_gradient[:, :, :-1]).all() and torch.isfinite(result.loss_impact[:, :, :-1]).all()
    assert result.loss_gradient[:, :, :-1].std() > 0
    assert (result.base_error > 0).all()
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name
        assert parameter.grad is None and parameter.requires_grad  # nothing accumulated, flags restored
    assert model.config._attn_implementation == attention_before


def test_identical_base_weights_have_no_error_and_no_loss_impact(tiny_model_factory):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_factory("qwen2")), dtype=torch.float32).eval()
    spec = get_architecture("qwen2")
    sites = list(iter_linear_sites(model, spec))
    windows = torch.randint(3, 320, (1, 12), generator=torch.Generator().manual_seed(1))
    result = collect_token_signals(model, spec, sites, lambda s: linear_weight(s).clone(), windows, progress=False)
    assert torch.equal(result.base_error, torch.zeros_like(result.base_error))
    assert (result.loss_impact[:, :, :-1] < -30).all()  # log of ~0


def test_signals_match_a_direct_forward(tiny_model_factory):
    """Entropy, hidden norms and attention received against the model's own outputs, and the
    gradient norm against autograd on the hidden states HF returns."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_factory("llama")), dtype=torch.float32).eval()
    spec = get_architecture("llama")
    sites = list(iter_linear_sites(model, spec))
    windows = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(2))
    result = collect_token_signals(model, spec, sites, _coarse, windows, progress=False)

    model.set_attn_implementation("eager")
    for row in range(windows.shape[0]):
        out = model(input_ids=windows[row : row + 1], output_hidden_states=True, output_attentions=True)
        log_probs = torch.log_softmax(out.logits[0].detach(), dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        assert torch.isnan(result.predictive_entropy[row, 0])
        torch.testing.assert_close(result.predictive_entropy[row, 1:], entropy[:-1], rtol=1e-5, atol=1e-5)
        for layer in range(model.config.num_hidden_layers):
            rms = out.hidden_states[layer][0].detach().pow(2).mean(-1).sqrt()
            torch.testing.assert_close(result.hidden_norm[layer, row], rms.log(), rtol=1e-5, atol=1e-5)
            weights = out.attentions[layer][0].detach().mean(0)  # (q, k) averaged over heads
            received = weights.sum(0) / torch.arange(16, 0, -1, dtype=torch.float32)
            torch.testing.assert_close(result.attention_received[layer, row], received, rtol=1e-5, atol=1e-6)

    # dL/dh at the last decoder layer's output (before the final norm) through autograd.
    ids = windows[:1]
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    captured = {}
    last = model.model.layers[-1]
    handle = last.register_forward_hook(lambda m, a, o: captured.update(h=(o[0] if isinstance(o, tuple) else o)))
    try:
        out = model(inputs_embeds=embeds, labels=ids)
        grad = torch.autograd.grad(out.loss, captured["h"])[0][0]
    finally:
        handle.remove()
    expected = grad.norm(dim=-1).clamp_min(1e-30).log()
    torch.testing.assert_close(result.loss_gradient[-1, 0, :-1], expected[:-1], rtol=1e-4, atol=1e-4)


def test_the_base_tier_pass_takes_the_kl_gradient_at_the_base_model(tiny_model_factory):
    """at_base_tier: the forward runs on the base-tier weights, L is the KL to the full-precision
    logits, e the change to full precision; checked against autograd on a base-tier copy."""
    path = str(tiny_model_factory("llama"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    spec = get_architecture("llama")
    sites = list(iter_linear_sites(model, spec))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    windows = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(3))
    result = collect_token_signals(model, spec, sites, _coarse, windows, progress=False, at_base_tier=True, keep_normed=True)
    assert result.at_base_tier
    assert result.normed_inputs.shape == (2, 2, 16, model.config.hidden_size)
    assert torch.isfinite(result.loss_gradient).all() and torch.isfinite(result.loss_impact).all()  # every position
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for site in iter_linear_sites(base, spec):
        site.module.weight.data = _coarse(site)
    ids = windows[1:2]
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids=ids).logits[0], -1)
    captured = {}
    first = base.model.layers[0]
    handles = [
        first.register_forward_pre_hook(lambda m, a, k: captured.update(x=(a[0] if a else k["hidden_states"])), with_kwargs=True),
        first.register_forward_hook(lambda m, a, o: captured.update(h=(o[0] if isinstance(o, tuple) else o))),
    ]
    try:
        embeds = base.get_input_embeddings()(ids).detach().requires_grad_(True)
        log_probs = torch.log_softmax(base(inputs_embeds=embeds).logits[0], -1)
        kl = (reference.exp() * (reference - log_probs)).sum()
        grad = torch.autograd.grad(kl, captured["h"])[0][0]
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(result.loss_gradient[0, 1], grad.norm(dim=-1).clamp_min(1e-30).log(), rtol=1e-4, atol=1e-4)
    normed = first.input_layernorm(captured["x"])[0].detach()
    torch.testing.assert_close(result.normed_inputs[0, 1].float(), normed, rtol=1e-2, atol=1e-2)
    # e: layer 0 reads the embeddings, which no tier changes, so the full-precision model's own
    # layer-0 output is the rerun's.
    full = {}
    handle = model.model.layers[0].register_forward_hook(lambda m, a, o: full.update(h=(o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    error = (full["h"] - captured["h"].detach())[0]
    torch.testing.assert_close(result.base_error[0, 1], error.norm(dim=-1), rtol=1e-3, atol=1e-4)


def _mixed_gemma3() -> torch.nn.Module:
    """A gemma-3 whose two layers differ in mask and rotary table (sliding, then full attention)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "gemma3_text", vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_layer_by_layer_moments_equal_the_whole_model_pass(model_type, tiny_model_factory):
    """Replaying recorded layer calls on cached hidden states gives pass 1's very Hessians, with
    the same sharing (q/k/v one moment), for every layer kind: gemma's sliding and full layers
    take different masks and rotary tables, and windows longer than its window of 8 tell them apart."""
    if model_type == "gemma3_text":
        model = _mixed_gemma3()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_factory(model_type)), dtype=torch.float32).eval()
    spec = get_architecture(model_type)
    sites = list(iter_linear_sites(model, spec))
    windows = torch.randint(3, 320, (5, 24), generator=torch.Generator().manual_seed(3))
    whole = collect_input_stats(model, sites, windows, batch_size=2, progress=False)
    replayed = {site.name: moment for site, moment in collect_layer_moments(model, spec, sites, windows, 2, progress=False)}
    assert list(replayed) == [site.name for site in sites]
    for site in sites:
        assert replayed[site.name].num_tokens == 5 * 24
        torch.testing.assert_close(replayed[site.name].hessian, whole[site.name].hessian, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(replayed[site.name].hessian_with_first_weighted(24), whole[site.name].hessian_with_first_weighted(24))
        shares = [other.name for other in sites if whole[other.name] is whole[site.name]]
        assert [other.name for other in sites if replayed[other.name] is replayed[site.name]] == shares
    # The layers' own forward is back: the model gives what it gave before.
    assert not any("forward" in vars(layer) for layer in decoder_layers(model, spec))
    again = collect_input_stats(model, sites, windows, batch_size=2, progress=False)
    torch.testing.assert_close(again[sites[-1].name].hessian, whole[sites[-1].name].hessian)


def test_layer_moments_are_handed_out_before_the_next_layer_runs(tiny_model_factory):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_factory("qwen2")), dtype=torch.float32).eval()
    spec = get_architecture("qwen2")
    down = [site for site in iter_linear_sites(model, spec) if site.name.endswith("down_proj")]
    runs = [0, 0]
    for index, layer in enumerate(decoder_layers(model, spec)):
        layer.register_forward_hook(lambda module, args, output, index=index: runs.__setitem__(index, runs[index] + 1))
    windows = torch.randint(3, 320, (4, 16), generator=torch.Generator().manual_seed(4))
    seen = []
    for site, moment in collect_layer_moments(model, spec, down, windows, 2, progress=False, first_position=lambda s: False):
        seen.append((site.layer_index, list(runs)))
        assert moment.sum_outer_first is None and moment.hessian.shape == (128, 128)
    # The recording pass calls every layer once per batch (as the identity): two calls each.
    # Layer 0's moment arrives after its two batches ran and before layer 1 ran for real.
    assert seen == [(0, [4, 2]), (1, [4, 4])]
