"""The loss-gradient pass on a tiny real model: shapes, finiteness, and weights left untouched."""

import torch
from transformers import AutoModelForCausalLM

from calibration.capture import collect_loss_gradients
from tap_runtime.architectures import get_architecture
from tap_runtime.modeling import iter_linear_sites, linear_weight


def test_loss_gradients_measure_every_layer_and_touch_no_weight(tiny_model_factory):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_factory("llama")), dtype=torch.float32).eval()
    spec = get_architecture("llama")
    sites = list(iter_linear_sites(model, spec))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    windows = torch.randint(3, 320, (3, 20), generator=torch.Generator().manual_seed(0))
    # A base tier that is the weight rounded to a coarse grid, so every layer has an error.
    result = collect_loss_gradients(model, spec, sites, lambda s: (linear_weight(s) * 8).round() / 8, windows, progress=False)
    assert result.gradient_norm.shape == result.loss_impact.shape == (2, 3, 20)
    assert torch.isnan(result.gradient_norm[:, :, -1]).all()  # the last position predicts nothing
    assert torch.isfinite(result.gradient_norm[:, :, :-1]).all() and torch.isfinite(result.loss_impact[:, :, :-1]).all()
    assert result.gradient_norm[:, :, :-1].std() > 0
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name
        assert parameter.grad is None and parameter.requires_grad  # nothing accumulated, flags restored


def test_identical_base_weights_have_no_loss_impact(tiny_model_factory):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_factory("qwen2")), dtype=torch.float32).eval()
    spec = get_architecture("qwen2")
    sites = list(iter_linear_sites(model, spec))
    windows = torch.randint(3, 320, (1, 12), generator=torch.Generator().manual_seed(1))
    result = collect_loss_gradients(model, spec, sites, lambda s: linear_weight(s).clone(), windows, progress=False)
    assert (result.loss_impact[:, :, :-1] < -30).all()  # log of ~0
