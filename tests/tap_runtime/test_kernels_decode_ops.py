"""The decode step's fused native operations (kernels/csrc/tap_decode_ops.cpp) against torch's."""

import math

import pytest
import torch
import torch.nn.functional as F

from tap_runtime.kernels.native import native_kernels
from tap_runtime.rotation import hadamard_matrix, rotate_input

pytestmark = pytest.mark.skipif(native_kernels() is None, reason="TAP's native CPU kernels are unavailable here")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotate-half rotary embedding."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def test_add_rms_norm_adds_in_place_and_normalises_like_torch():
    generator = torch.Generator().manual_seed(0)
    hidden, delta, weight = (torch.randn(1, 1, 576, generator=generator) for _ in range(3))
    expected_hidden = hidden + delta
    expected = F.rms_norm(expected_hidden, (576,), weight.reshape(-1), 1e-5)
    normed = native_kernels().add_rms_norm(hidden, delta, weight.reshape(-1), 1e-5)
    assert torch.equal(hidden, expected_hidden)  # the residual add is done in place
    assert normed.shape == hidden.shape
    torch.testing.assert_close(normed, expected, rtol=1e-5, atol=1e-6)
    before = hidden.clone()
    torch.testing.assert_close(native_kernels().add_rms_norm(hidden, None, weight.reshape(-1), 1e-5), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(hidden, before)  # no delta: hidden untouched


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(12, 2, 128), (9, 3, 64), (4, 4, 40)])
@pytest.mark.parametrize("first", [0, 5])
def test_attend_one_rotates_writes_the_cache_and_attends_like_sdpa(heads, kv_heads, head_dim, first):
    generator = torch.Generator().manual_seed(1)
    max_length, position = 64, 37
    qkv = torch.randn(1, (heads + 2 * kv_heads) * head_dim, generator=generator)
    angles = torch.rand(head_dim // 2, generator=generator) * 6.0
    cos, sin = torch.cat((angles, angles)).cos(), torch.cat((angles, angles)).sin()
    keys = torch.randn(1, kv_heads, max_length, head_dim, generator=generator)
    values = torch.randn(1, kv_heads, max_length, head_dim, generator=generator)
    expected_keys, expected_values = keys.clone(), values.clone()

    q, k, v = qkv.reshape(-1).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
    query = _rotate(q.view(1, heads, 1, head_dim), cos, sin)
    expected_keys[:, :, position] = _rotate(k.view(1, kv_heads, head_dim), cos, sin)
    expected_values[:, :, position] = v.view(1, kv_heads, head_dim)
    scale = head_dim**-0.5
    expected = F.scaled_dot_product_attention(
        query, expected_keys[:, :, first : position + 1], expected_values[:, :, first : position + 1],
        scale=scale, enable_gqa=kv_heads != heads,
    ).transpose(1, 2).reshape(1, -1)

    out = native_kernels().attend_one(qkv, cos, sin, keys, values, position, first, heads, kv_heads, scale)
    torch.testing.assert_close(keys, expected_keys, rtol=1e-6, atol=1e-6)
    assert torch.equal(values, expected_values)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_attend_one_refuses_shapes_that_do_not_fit():
    native = native_kernels()
    qkv, cos, sin = torch.randn(1, 4 * 8), torch.randn(8), torch.randn(8)
    cache = torch.zeros(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="do not fit a cache"):
        native.attend_one(qkv, cos, sin, cache, cache.clone(), 4, 0, 2, 1, 0.3)
    with pytest.raises(RuntimeError, match="qkv has"):
        native.attend_one(torch.randn(1, 30), cos, sin, cache, cache.clone(), 1, 0, 2, 1, 0.3)
    with pytest.raises(RuntimeError, match="multiple of num_kv_heads"):
        native.attend_one(qkv, cos, sin, cache, cache.clone(), 1, 0, 3, 2, 0.3)
    with pytest.raises(RuntimeError, match="float32"):
        native.attend_one(qkv.double(), cos, sin, cache, cache.clone(), 1, 0, 2, 1, 0.3)


def test_silu_mul_matches_torch_across_the_float_range():
    gate = torch.cat((torch.linspace(-120.0, 120.0, 4001), torch.randn(1003) * 4))  # not a multiple of 16
    up = torch.randn_like(gate)
    out = native_kernels().silu_mul(torch.cat((gate, up)).view(1, -1))
    expected = F.silu(gate) * up
    assert out.shape == (1, gate.numel())
    torch.testing.assert_close(out.reshape(-1), expected, rtol=2e-6, atol=1e-30)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("rotation", [0, 64])
def test_gelu_tanh_gated_rows_are_torchs_tanh_gelu_times_up(rotation):
    """Gemma's gate activation (GELU, tanh form) through the same pass as SiLU's, computed as
    g * sigmoid(2u): torch's 0.5 g (1 + tanh u) to float32 rounding, far tails included."""
    generator = torch.Generator().manual_seed(4)
    gate = torch.randn(23, 256, generator=generator) * 4
    gate[0, :4] = torch.tensor([-60.0, -12.0, 12.0, 60.0])
    up = torch.randn(23, 256, generator=generator)
    got = native_kernels().silu_mul_rows(gate, up, rotation, True, True)
    expected = F.gelu(gate, approximate="tanh") * up
    if rotation:
        expected = rotate_input(expected, rotation)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    silu = native_kernels().silu_mul_rows(gate, up, rotation, True)
    assert not torch.allclose(silu, got, rtol=1e-3, atol=1e-3)  # the flag does change the activation


@pytest.mark.parametrize("gate_dtype,up_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_silu_mul_rows_rounds_torchs_float32_product_once(gate_dtype, up_dtype):
    generator = torch.Generator().manual_seed(3)
    gate = (torch.randn(37, 300, generator=generator) * 6).to(gate_dtype)
    up = torch.randn(37, 300, generator=generator).to(up_dtype)
    got = native_kernels().silu_mul_rows(gate, up, 0)
    expected = (F.silu(gate.float()) * up.float()).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == gate.shape
    # The exps differ in the last float32 bits, which can move a bfloat16 rounding by one step.
    assert torch.allclose(got.float(), expected.float(), rtol=2**-7, atol=1e-30)
    assert (got != expected).float().mean() < 0.002
    with pytest.raises(RuntimeError, match="one shape"):
        native_kernels().silu_mul_rows(gate, up[:, :10].contiguous(), 0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        native_kernels().silu_mul_rows(gate.double(), up.double(), 0)


def test_silu_mul_rows_rotates_in_float32_before_rounding():
    generator = torch.Generator().manual_seed(4)
    gate, up = torch.randn(9, 320, generator=generator) * 4, torch.randn(9, 320, generator=generator)
    got = native_kernels().silu_mul_rows(gate, up, 64)
    expected = rotate_input(F.silu(gate) * up, 64).to(torch.bfloat16)
    assert torch.allclose(got.float(), expected.float(), rtol=2**-7, atol=1e-30)
    assert (got != expected).float().mean() < 0.002
    with pytest.raises(RuntimeError, match="power of two that divides 320"):
        native_kernels().silu_mul_rows(gate, up, 48)


@pytest.mark.parametrize("rotation", [0, 64])
def test_silu_mul_rows_float_output_is_the_unrounded_product(rotation):
    generator = torch.Generator().manual_seed(6)
    gate = (torch.randn(11, 320, generator=generator) * 4).to(torch.bfloat16)
    up = torch.randn(11, 320, generator=generator)
    got = native_kernels().silu_mul_rows(gate, up, rotation, True)
    expected = rotate_input(F.silu(gate.float()) * up, rotation)
    assert got.dtype == torch.float32 and got.shape == gate.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # The bfloat16 output is this one rounded once (the same float32 values before the rounding).
    assert torch.equal(native_kernels().silu_mul_rows(gate, up, rotation), got.to(torch.bfloat16))


def _butterflies(x: torch.Tensor, block: int) -> torch.Tensor:
    """The fast transform in the scalar loop's order, stage by stage in torch: (a, c) -> (a + c, a - c)."""
    values = x.reshape(-1, block).clone()
    h = 1
    while h < block:
        pairs = values.view(-1, block // (2 * h), 2, h)
        a, c = pairs[:, :, 0].clone(), pairs[:, :, 1].clone()
        pairs[:, :, 0], pairs[:, :, 1] = a + c, a - c
        h *= 2
    return (values * (1 / math.sqrt(block))).reshape_as(x)


@pytest.mark.parametrize("block", [2, 8, 16, 32, 64, 128, 256])
def test_hadamard_blocks_gives_the_scalar_butterflies_bits_in_every_build(block):
    # The vector paths (AVX-512, AVX2) must add in the scalar loop's order, so that every CPU
    # path (module, decode step, dense MLP) rotates an input to the same bits.
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(9))
    assert torch.equal(native_kernels().hadamard_blocks(x, block), _butterflies(x, block))


@pytest.mark.parametrize("block", [16, 64, 128])
def test_hadamard_blocks_is_the_block_hadamard_matmul_and_its_own_inverse(block):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 640, generator=generator)
    got = native_kernels().hadamard_blocks(x, block)
    expected = (x.reshape(3, 7, 640 // block, block) @ hadamard_matrix(block)).reshape_as(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(native_kernels().hadamard_blocks(got, block), x, rtol=1e-5, atol=1e-5)
    # Rows are independent: a row gives the same bits alone as among others.
    assert torch.equal(native_kernels().hadamard_blocks(x[1:2].contiguous(), block), got[1:2])
    with pytest.raises(RuntimeError, match="multiple of the Hadamard block"):
        native_kernels().hadamard_blocks(x[..., :48].contiguous(), 32)


def test_router_features_are_the_routers_two_signals():
    generator = torch.Generator().manual_seed(2)
    hidden, normed = torch.randn(1, 1, 200, generator=generator) * 3, torch.randn(1, 1, 200, generator=generator)
    sketch = torch.randn(200, 70, generator=generator)  # rank past one register chunk of 64
    hidden_norm, error_estimate = native_kernels().router_features(hidden, normed, sketch)
    assert hidden_norm == pytest.approx(math.log(float(hidden.norm()) / math.sqrt(200)), rel=1e-6)
    assert error_estimate == pytest.approx(math.log(float((normed.reshape(1, -1) @ sketch).norm()) ** 2), rel=1e-6)
    with pytest.raises(RuntimeError, match="sketch must be"):
        native_kernels().router_features(hidden, normed, sketch[:100])
