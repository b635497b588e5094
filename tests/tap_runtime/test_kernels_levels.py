"""Planes whose codes stand for a level table (PlaneSpec.levels, format 7) in every kernel: the
native builds look the levels up (VNNI or AVX2, whichever this machine builds), torch's packed
kernel multiplies the plane's two even parts (tap_runtime.planes.split_levels)."""

import pytest
import torch

from tap_runtime.format import PlaneSpec
from tap_runtime.kernels import ReferenceKernel
from tap_runtime.kernels.base import SplitPlane
from tap_runtime.kernels.cpu import CpuPackedKernel, cpu_kernels_available
from tap_runtime.kernels.native import native_kernels
from tap_runtime.kernels.vnni import ALL_NARROW, ALL_WIDE, CpuVnniKernel, block_quantized_activations, tile_group_params, tile_plane_codes
from tap_runtime.packing import pack_int4
from tap_runtime.planes import Plane, dequantize_plane, split_levels

LEVELS = (2, 12, 21, 29, 36, 43, 50, 57, 63, 70, 76, 83, 91, 98, 107, 118)
needs_native = pytest.mark.skipif(native_kernels() is None, reason="TAP's native CPU kernels are unavailable here")


def _level_plane(shape, group_size=64, symmetric=False, seed=0, levels=LEVELS) -> Plane:
    """Random codes, scales and zeros (zeros on the stored eighths) under a level table."""
    generator = torch.Generator().manual_seed(seed)
    rows, width = shape
    spec = PlaneSpec(4, group_size, symmetric, levels=levels)
    codes = torch.randint(0, 16, shape, generator=generator, dtype=torch.uint8)
    scales = (torch.rand(rows, width // group_size, generator=generator) * 0.02 + 1e-3).to(torch.float16)
    zeros = None
    if not symmetric:
        zeros = spec.round_zeros(torch.rand(rows, width // group_size, generator=generator) * 8 + 4).to(torch.float16)
    return Plane(spec, pack_int4(codes), scales, zeros)


def test_a_level_plane_dequantizes_through_its_table():
    plane = _level_plane((8, 128))
    codes = torch.stack([(plane.qweight & 0x0F), (plane.qweight >> 4)], dim=-1).reshape(8, 128).to(torch.int64)
    values = torch.tensor(LEVELS, dtype=torch.float32)[codes] / 8
    expected = (values.view(8, 2, 64) - plane.zeros.float().unsqueeze(-1)) * plane.scales.float().unsqueeze(-1)
    torch.testing.assert_close(dequantize_plane(plane), expected.view(8, 128), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_split_levels_gives_two_even_planes_that_sum_to_the_plane(symmetric):
    plane = _level_plane((12, 192), symmetric=symmetric)
    high, low = split_levels(plane)
    assert high.spec.levels is None and low.spec.levels is None and not low.spec.symmetric
    assert high.spec.symmetric == symmetric
    torch.testing.assert_close(dequantize_plane(high) + dequantize_plane(low), dequantize_plane(plane), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="needs a plane with a level table"):
        split_levels(high)


@needs_native
@pytest.mark.parametrize("bits", [8, 15])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("shape,group_size", [((40, 64 * 9), 64), ((37, 256), 128), ((24, 64 * 37), 64)], ids=["9-blocks", "37rows-g128", "3-chunks"])
def test_native_products_of_a_level_plane_are_the_plane_times_the_quantized_activations(bits, symmetric, shape, group_size):
    """The one-token kernel and the lane kernels, with the table looked up, are the dequantized
    plane (levels and all) times the block-quantized activations, as for even codes."""
    plane = _level_plane(shape, group_size, symmetric)
    kernel = CpuVnniKernel()
    prepared = kernel.prepare_plane(plane)
    assert torch.equal(prepared.levels, torch.tensor(LEVELS, dtype=torch.uint8))
    x = torch.randn(6, shape[1], generator=torch.Generator().manual_seed(5)) + 0.5
    expected = block_quantized_activations(x, 127 if bits == 8 else 16383).double() @ dequantize_plane(plane, torch.float64).t()
    args = (x, prepared.weight, prepared.scales, prepared.zeros, group_size)
    rows = shape[0]
    products = {
        "one-token": kernel.native.matmul_w4(*args, ALL_NARROW if bits == 8 else ALL_WIDE, 0, rows, prepared.levels),
        "lanes": kernel.native.matmul_w4_lanes(*args, 0, rows, bits == 15, prepared.levels),
    }
    if bits == 8:
        products["many"] = kernel.native.matmul_w4_many(*args, 0, rows, prepared.levels)
        into = torch.zeros(6, rows)
        products["rows-add"] = kernel.native.matmul_w4_rows_add(x, torch.arange(6), *args[1:], 0, rows, into, prepared.levels)
    tolerance = 1e-5 * float(expected.abs().max())  # float32 sums
    for name, got in products.items():
        assert torch.allclose(got.double(), expected, rtol=0, atol=tolerance), name
    # Without the table the same codes give another product: the levels are really read.
    even = kernel.native.matmul_w4(*args, ALL_WIDE, 0, rows)
    assert float((even.double() - expected).abs().max()) > 100 * tolerance


@needs_native
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_level_products_hold_at_the_extremes(sign):
    """Every code at the table's top level (120 eighths, 15 code steps) times every activation
    at its largest code (15 bits: high byte 127 or -128) is the most any sum ever holds; on AVX2
    two such maddubs results would overflow int16, so each is widened first. Still exact."""
    rows, width = 16, 64 * 18
    levels = tuple(range(0, 105, 7)) + (120,)
    weight = tile_plane_codes(torch.full((rows, width), 15, dtype=torch.uint8), 4)
    ones, zeros = torch.ones(rows, width // 64, dtype=torch.float16), torch.zeros(rows, width // 64, dtype=torch.float16)
    scales, zero_points = tile_group_params(ones, 4, 64), tile_group_params(zeros, 4, 64)
    table = torch.tensor(levels, dtype=torch.uint8)
    x = torch.full((3, width), sign)
    expected = torch.full((3, rows), sign * 15 * width)
    native = native_kernels()
    for wide in (True, False):
        assert torch.allclose(native.matmul_w4_lanes(x, weight, scales, zero_points, 64, 0, rows, wide, table), expected, rtol=1e-6)
    for wide_above in (ALL_WIDE, ALL_NARROW):
        assert torch.allclose(native.matmul_w4(x, weight, scales, zero_points, 64, wide_above, 0, rows, table), expected, rtol=1e-6)
    assert torch.allclose(native.matmul_w4_many(x, weight, scales, zero_points, 64, 0, rows, table), expected, rtol=1e-6)


@needs_native
@pytest.mark.parametrize("dense_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_dense_unpack_of_a_level_plane_and_of_a_tier_sum(dense_dtype):
    """The dense paths unpack through the table too: one plane, and the float32 sum of a level
    base plane and an even residual plane, rounded once."""
    base = _level_plane((37, 256), 128)
    generator = torch.Generator().manual_seed(9)
    residual_spec = PlaneSpec(4, 128, True)
    residual = Plane(
        residual_spec, pack_int4(torch.randint(0, 16, (37, 256), generator=generator, dtype=torch.uint8)),
        (torch.rand(37, 2, generator=generator) * 1e-3).to(torch.float16),
    )
    kernel = CpuVnniKernel(dense_dtype=dense_dtype)
    prepared = [kernel.prepare_plane(p) for p in (base, residual)]
    assert prepared[1].levels is None
    exact = dequantize_plane(base)
    torch.testing.assert_close(kernel.dequantize_plane(prepared[0]), exact.to(dense_dtype), rtol=0, atol=0)
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(2))  # past either build's dense crossover
    summed = kernel.matmul_plane_sum(x, prepared)
    expected = x.to(dense_dtype).float() @ (exact + dequantize_plane(residual)).to(dense_dtype).float().t()
    torch.testing.assert_close(summed.float(), expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


@needs_native
def test_native_ops_refuse_a_malformed_table():
    plane = _level_plane((8, 128))
    prepared = CpuVnniKernel().prepare_plane(plane)
    x = torch.randn(2, 128)
    args = (x, prepared.weight, prepared.scales, prepared.zeros, 64, ALL_WIDE, 0, 8)
    with pytest.raises(RuntimeError, match="levels must be 16 contiguous uint8"):
        native_kernels().matmul_w4(*args, torch.arange(8, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match=r"levels must lie in \[0, 120\]"):
        native_kernels().matmul_w4(*args, torch.full((16,), 200, dtype=torch.uint8))


@needs_native
def test_stacked_planes_keep_one_table_and_refuse_mixed_ones():
    kernel = CpuVnniKernel()
    parts = [kernel.prepare_plane(_level_plane((64, 128), seed=s)) for s in range(3)]
    fused, views = kernel.fuse_planes(parts)
    assert all(torch.equal(v.levels, fused.levels) for v in views)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    for part, view in zip(parts, views):
        torch.testing.assert_close(kernel.matmul_plane(x, view), kernel.matmul_plane(x, part), rtol=0, atol=0)
    other = kernel.prepare_plane(_level_plane((64, 128), seed=4, levels=tuple(range(0, 121, 8))))
    assert kernel.fuse_planes([kernel.prepare_plane(_level_plane((64, 128))), other]) is None


@pytest.mark.skipif(not cpu_kernels_available(), reason="torch's packed CPU int4 ops are missing")
@pytest.mark.parametrize("tokens", [1, 7, 300], ids=lambda t: f"m{t}")
def test_torchs_packed_kernel_multiplies_a_level_plane_as_its_two_even_parts(tokens):
    """torch's int4 op has no table: the kernel prepares the two even parts and sums their
    products in float32, within the op's bfloat16 rounding of the reference; stacked (q/k/v)
    level planes fuse part by part."""
    kernel = CpuPackedKernel()
    plane = _level_plane((64, 256), 32)
    prepared = kernel.prepare_plane(plane)
    assert type(prepared) is SplitPlane
    x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(3))
    expected = ReferenceKernel().matmul_plane(x, ReferenceKernel().prepare_plane(plane))
    got = kernel.matmul_plane(x, prepared)
    assert got.dtype == torch.float32
    assert float((got - expected).norm() / expected.norm()) < 1e-2
    torch.testing.assert_close(kernel.dequantize_plane(prepared).float(), dequantize_plane(plane), rtol=1e-2, atol=1e-3)
    fused, views = kernel.fuse_planes([prepared, kernel.prepare_plane(_level_plane((64, 256), 32, seed=1))])
    assert type(fused) is SplitPlane and all(type(v) is SplitPlane for v in views)
    torch.testing.assert_close(kernel.matmul_plane(x, views[0]), got, rtol=0, atol=0)
