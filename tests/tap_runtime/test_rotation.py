"""The block Hadamard rotation shared by converter and runtime (tap_runtime/rotation.py)."""

import pytest
import torch

from tap_runtime.rotation import (
    hadamard_matrix,
    is_valid_rotation,
    rotate_input,
    rotate_mean_square,
    rotate_second_moment,
    rotate_weight,
    rotation_block,
)


@pytest.mark.parametrize(
    "in_features, block", [(576, 64), (640, 64), (8960, 64), (1536, 64), (96, 32), (48, 16), (40, 0), (7, 0)]
)
def test_rotation_block_is_the_largest_power_of_two_dividing_the_width(in_features, block):
    assert rotation_block(in_features) == block
    assert is_valid_rotation(block, in_features)


def test_is_valid_rotation_refuses_blocks_that_do_not_fit():
    assert not is_valid_rotation(48, 96)  # not a power of two
    assert not is_valid_rotation(128, 64)  # wider than the input
    assert not is_valid_rotation(1, 64)


@pytest.mark.parametrize("block", [16, 64])
def test_hadamard_is_orthogonal_symmetric_and_its_own_inverse(block):
    h = hadamard_matrix(block)
    torch.testing.assert_close(h @ h, torch.eye(block), atol=1e-6, rtol=0)
    assert torch.equal(h, h.t())
    x = torch.randn(5, 3 * block)
    torch.testing.assert_close(rotate_input(rotate_input(x, block), block), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rotated_linear_gives_the_same_output(dtype):
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(24, 128, generator=generator), torch.randn(2, 6, 128, generator=generator).to(dtype)
    rotated = rotate_input(x, 64)
    assert rotated.dtype == torch.float32  # rotated in float32 whatever came in
    torch.testing.assert_close(rotated @ rotate_weight(weight, 64).t(), x.float() @ weight.t(), atol=1e-4, rtol=1e-4)
    assert rotate_input(x, 0) is x and rotate_weight(weight, 0) is weight


def test_rotated_statistics_are_those_of_the_rotated_inputs():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(300, 64, generator=generator) * torch.linspace(0.1, 5.0, 64)  # uneven channels
    second_moment = x.t() @ x / x.shape[0]
    rotated = rotate_input(x, 32)
    torch.testing.assert_close(rotate_second_moment(second_moment, 32), rotated.t() @ rotated / x.shape[0], atol=1e-3, rtol=1e-4)
    # From the diagonal alone: every channel of a block gets the block's mean (correlations unknown).
    mean_square = x.pow(2).mean(dim=0)
    expected = mean_square.reshape(2, 32).mean(dim=1).repeat_interleave(32)
    torch.testing.assert_close(rotate_mean_square(mean_square, 32), expected)
    torch.testing.assert_close(rotate_second_moment(mean_square, 32), expected)
    # The layer's output error is the same measured either way round.
    error = torch.randn(8, 64, generator=generator) * 0.01
    plain = torch.trace(error @ second_moment @ error.t())
    turned = torch.trace(rotate_weight(error, 32) @ rotate_second_moment(second_moment, 32) @ rotate_weight(error, 32).t())
    torch.testing.assert_close(turned, plain, rtol=1e-4, atol=0)


def test_torch_and_native_rotations_agree(monkeypatch):
    import tap_runtime.kernels.native as native

    x = torch.randn(4, 192)
    with_native = rotate_input(x, 64)
    monkeypatch.setitem(native._state, "module", None)
    torch.testing.assert_close(rotate_input(x, 64), with_native, atol=1e-5, rtol=1e-5)
