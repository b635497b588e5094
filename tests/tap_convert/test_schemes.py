"""Base-plane schemes: the log quantizer's levels, error measurement, and the automatic choice."""

import torch

from tap_convert.schemes import choose_scheme, log_quantize, scheme_errors


def test_log_levels_are_zero_or_signed_powers_of_two_of_the_group_max():
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    out = log_quantize(weight, 32).reshape(8, 2, 32)
    scale = weight.reshape(8, 2, 32).abs().amax(-1, keepdim=True)
    ratio = (out.abs() / scale)[out != 0]
    exponents = -torch.log2(ratio)
    assert torch.allclose(exponents, exponents.round(), atol=1e-5) and exponents.max() <= 6
    assert torch.equal(torch.sign(out[out != 0]), torch.sign(weight.reshape(8, 2, 32)[out != 0]))


def test_heavy_tails_favour_log_and_offsets_favour_asymmetric():
    generator = torch.Generator().manual_seed(1)
    heavy = torch.distributions.StudentT(1.5).sample((64, 128)).clamp(-200, 200)
    ones = torch.ones(128)
    heavy_errors = scheme_errors(heavy, 64, ones, ones)
    assert heavy_errors["logarithmic"] < heavy_errors["symmetric"]
    shifted = torch.rand(64, 128, generator=generator) + 0.5  # all positive: a zero point helps
    shifted_errors = scheme_errors(shifted, 64, ones, ones)
    assert shifted_errors["asymmetric"] < shifted_errors["symmetric"]
    scheme, reason = choose_scheme(heavy_errors)
    assert scheme in ("asymmetric", "symmetric") and "logarithmic" in reason  # measured, never run
    assert choose_scheme(shifted_errors, "symmetric")[0] == "symmetric"
