import pytest
import torch

from tap_convert.policy import relative_output_error


def test_relative_output_error_full_and_diagonal_agree_for_white_inputs():
    weight = torch.randn(8, 16)
    approximation = weight + 0.1 * torch.randn(8, 16)
    full = relative_output_error(weight, approximation, torch.eye(16))
    diagonal = relative_output_error(weight, approximation, torch.ones(16))
    assert full == pytest.approx(diagonal, rel=1e-5)
    assert full == pytest.approx(float((weight - approximation).pow(2).sum() / weight.pow(2).sum()), rel=1e-5)


def test_the_converter_allocates_by_the_runtimes_rule():
    import tap_convert.policy
    import tap_runtime.allocation

    # One definition of the allocation, shared by tap-convert --target-bits and set_routing(promote=...).
    assert tap_convert.policy.allocate_min_tiers is tap_runtime.allocation.allocate_min_tiers
