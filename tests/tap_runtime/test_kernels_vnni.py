"""TAP's native CPU kernels, VNNI or AVX2 build (kernels/vnni.py, kernels/native.py): layouts,
numerics, fallbacks."""

import pytest
import torch

from tap_convert.quantize import quantize_rows, quantize_tiers
from tap_runtime.errors import InvalidConfigError
from tap_runtime.format import PlaneSpec
from tap_runtime.kernels import ReferenceKernel, native, select_kernel
from tap_runtime.kernels.cpu import _PackedPlane, _PackedRows
from tap_runtime.kernels.native import native_kernels
from tap_runtime.planes import dequantize_plane
from tap_runtime.kernels.vnni import (
    ALL_NARROW,
    ALL_WIDE,
    CpuVnniKernel,
    TiledPlane,
    TiledRows,
    block_quantized_activations,
    tile_group_params,
    tile_plane_codes,
    tile_rows,
    untile_group_params,
    untile_plane_codes,
    untile_rows,
)

needs_native = pytest.mark.skipif(native_kernels() is None, reason="TAP's native CPU kernels are unavailable here")
needs_avx2_build = pytest.mark.skipif(
    native_kernels() is None or native_kernels().compiled_with_vnni(), reason="tests the AVX2 build"
)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b).norm() / b.norm())


def _plane(shape, group_size=64, symmetric=False, seed=0):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05
    (plane,) = quantize_tiers(weight, (PlaneSpec(4, group_size, symmetric),))
    return plane


@pytest.mark.parametrize("rows,width", [(4, 192), (10, 192), (37, 192), (12, 64 * 37)])
def test_plane_layout_round_trips_with_padding(rows, width):
    codes = torch.randint(0, 16, (rows, width), generator=torch.Generator().manual_seed(rows), dtype=torch.uint8)
    tiled = tile_plane_codes(codes, 4)
    assert tiled.shape == (-(-rows // 4) * 4, width // 2)
    back = untile_plane_codes(tiled, width, 4)
    assert torch.equal(back[:rows], codes)
    assert torch.all(back[rows:] == 8)  # padded rows carry the zero code


def test_plane_layout_puts_a_tiles_rows_in_one_stream():
    codes = torch.zeros(4, 64, dtype=torch.uint8)
    codes[1, 0], codes[1, 32] = 3, 5  # row 1, inputs 0 and 32 share byte 0 of row 1's 32 bytes
    tiled = tile_plane_codes(codes, 4).flatten()
    assert tiled[32] == 3 | (5 << 4) and int(tiled.count_nonzero()) == 1


@pytest.mark.parametrize("group_size,groups", [(64, 37), (128, 18), (1024, 3)])
def test_group_parameter_layout_round_trips(group_size, groups):
    params = torch.randn(10, groups, generator=torch.Generator().manual_seed(groups)).half()
    tiled = tile_group_params(params, 4, group_size)
    assert tiled.shape == (12, groups)
    assert torch.equal(untile_group_params(tiled, group_size)[:10], params)


def test_row_layout_round_trips():
    q = torch.randint(-127, 128, (13, 96), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    tiled = tile_rows(q, 4)
    assert tiled.shape == (16, 96)
    assert torch.equal(untile_rows(tiled, 4)[:13], q)


@needs_native
@pytest.mark.parametrize("tokens", [1, 5, 100], ids=lambda t: f"m{t}")
@pytest.mark.parametrize(
    "shape,group_size,symmetric",
    [((100, 576), 64, False), ((37, 256), 128, True), ((64, 640), 64, True), ((24, 64 * 37), 64, False), ((8, 64 * 36), 128, True)],
    ids=["576-g64-asym", "37rows-g128-sym", "640-g64-sym", "3-chunks-g64", "3-chunks-g128"],
)
def test_plane_product_matches_reference(shape, group_size, symmetric, tokens):
    plane = _plane(shape, group_size, symmetric)
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(1))
    expected = ReferenceKernel().matmul_plane(x, ReferenceKernel().prepare_plane(plane))
    kernel = CpuVnniKernel(dense_min_tokens=64)
    prepared = kernel.prepare_plane(plane)
    assert type(prepared) is TiledPlane
    got = kernel.matmul_plane(x, prepared)
    assert got.shape == expected.shape
    if tokens < 64:
        # 15-bit activations: far closer to float32 than torch's bfloat16 activations (~3e-3).
        assert got.dtype == torch.float32 and _relative_error(got, expected) < 5e-4
    else:
        assert _relative_error(got, expected) < 1e-2  # dense bfloat16 path


@needs_native
def test_eight_bit_activations_are_available_and_coarser():
    plane = _plane((128, 512))
    kernel = CpuVnniKernel()
    prepared = kernel.prepare_plane(plane)
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(2))
    expected = ReferenceKernel().matmul_plane(x, ReferenceKernel().prepare_plane(plane))
    args = (prepared.weight, prepared.scales, prepared.zeros, prepared.group_size)
    wide = _relative_error(kernel.native.matmul_w4(x, *args, ALL_WIDE, 0, 128), expected)
    narrow = _relative_error(kernel.native.matmul_w4(x, *args, ALL_NARROW, 0, 128), expected)
    assert wide < 5e-4 < narrow < 5e-2



@needs_native
@pytest.mark.parametrize("bits", [8, 15])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_products_are_the_plane_times_the_quantized_activations(bits, symmetric):
    """The zero-point term takes the quantized activations' sum, so every product (the one-token
    kernel and both lane kernels) is the dequantized plane times the block-quantized activations.
    With the exact float sum, the activations' rounding errors were multiplied by the raw codes
    (0..15) instead of code - zero: 2-3x the error."""
    plane = _plane((40, 64 * 9), 64, symmetric)
    kernel = CpuVnniKernel()
    prepared = kernel.prepare_plane(plane)
    x = torch.randn(6, 64 * 9, generator=torch.Generator().manual_seed(5)) + 0.5
    expected = block_quantized_activations(x, 127 if bits == 8 else 16383).double() @ dequantize_plane(plane, torch.float64).t()
    args = (x, prepared.weight, prepared.scales, prepared.zeros, prepared.group_size)
    products = {
        "one-token": kernel.native.matmul_w4(*args, ALL_NARROW if bits == 8 else ALL_WIDE, 0, 40),
        "lanes": kernel.native.matmul_w4_many(*args, 0, 40) if bits == 8 else kernel.native.matmul_w4_lanes(*args, 0, 40, True),
    }
    tolerance = 1e-5 * float(expected.abs().max())  # float32 sums
    for name, got in products.items():
        assert torch.allclose(got.double(), expected, rtol=0, atol=tolerance), name
    if bits == 8:
        # The exact-sum arithmetic differs from this by the sum over blocks of scale x zero x the
        # block's rounding errors, far outside the tolerance at 8 bits: the test tells them apart.
        rounding = (x - block_quantized_activations(x, 127)).double().reshape(6, 9, 64).sum(-1)
        exact_sum_shift = rounding @ (plane.scales.double() * plane.zeros_or_implied().double()).t()
        assert float(exact_sum_shift.abs().max()) > 10 * tolerance

def _spiky_block(generator) -> torch.Tensor:
    """64 activations whose peak is about 8x their RMS (an outlier channel)."""
    block = torch.randn(64, generator=generator) * 0.5
    block[5] = 30.0
    return block


def _flat_block(generator) -> torch.Tensor:
    """64 activations of equal magnitude: peak == RMS."""
    return torch.where(torch.rand(64, generator=generator) < 0.5, -1.0, 1.0) * 0.7


@needs_native
def test_mixed_activations_take_fifteen_bits_only_in_peaked_blocks():
    plane = _plane((64, 512))
    kernel = CpuVnniKernel()
    prepared = kernel.prepare_plane(plane)
    args = (prepared.weight, prepared.scales, prepared.zeros, prepared.group_size)
    generator = torch.Generator().manual_seed(11)
    spiky = torch.cat([_spiky_block(generator) for _ in range(8)]).unsqueeze(0)
    flat = torch.cat([_flat_block(generator) for _ in range(8)]).unsqueeze(0)

    def product(x, wide_above):
        return kernel.native.matmul_w4(x, *args, wide_above, 0, 64)

    # Every block above the threshold: exactly the all-15-bit product; none: exactly all-8-bit.
    assert torch.equal(product(spiky, 4.0), product(spiky, ALL_WIDE))
    assert torch.equal(product(flat, 4.0), product(flat, ALL_NARROW))
    assert not torch.equal(product(spiky, ALL_NARROW), product(spiky, ALL_WIDE))
    # A mix: each block follows its own rule. Blocks are independent terms of the sum, so the
    # product is the 15-bit product of the spiky blocks plus the 8-bit one of the flat blocks.
    is_spiky = torch.arange(8).repeat_interleave(64) % 2 == 0
    mixed = torch.where(is_spiky, spiky, flat)
    only_spiky, only_flat = torch.where(is_spiky, spiky, 0.0), torch.where(is_spiky, 0.0, flat)
    expected = product(only_spiky, ALL_WIDE) + product(only_flat, ALL_NARROW)
    torch.testing.assert_close(product(mixed, 4.0), expected, rtol=1e-5, atol=1e-5)
    # and it is closer to float32 than 8 bits everywhere
    reference = ReferenceKernel().matmul_plane(mixed, ReferenceKernel().prepare_plane(plane))
    assert _relative_error(product(mixed, 4.0), reference) < _relative_error(product(mixed, ALL_NARROW), reference)


@needs_native
def test_kernel_rejects_a_negative_or_nan_threshold():
    kernel = CpuVnniKernel()
    prepared = kernel.prepare_plane(_plane((16, 128)))
    for bad in (-1.0, float("nan")):
        with pytest.raises(RuntimeError, match="wide_above"):
            kernel.native.matmul_w4(torch.zeros(1, 128), prepared.weight, prepared.scales, prepared.zeros, 64, bad, 0, 16)
        with pytest.raises(ValueError, match="base_wide_above"):
            CpuVnniKernel(base_wide_above=bad)


@needs_native
@pytest.mark.parametrize("dense_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape,group_size", [((37, 256), 128), ((64, 640), 64), ((12, 64 * 37), 64)])
def test_dense_unpack_is_the_reference_plane(shape, group_size, dense_dtype):
    plane = _plane(shape, group_size)
    kernel = CpuVnniKernel(dense_dtype=dense_dtype)
    prepared = kernel.prepare_plane(plane)
    reference = ReferenceKernel().prepare_plane(plane)
    got = kernel.dequantize_plane(prepared)
    assert got.dtype == dense_dtype
    if dense_dtype == torch.bfloat16:
        assert torch.equal(got, reference.to(torch.bfloat16))
    else:  # q * scale - scale * zero in one fused step: within a float32 rounding of the reference
        assert torch.allclose(got, reference, rtol=0, atol=2e-7 * float(reference.abs().max()))
    scratch = kernel._scratch(reference.shape)
    assert torch.equal(kernel.dequantize_plane(prepared, scratch), got)
    assert kernel._scratch(reference.shape).data_ptr() == scratch.data_ptr()  # reused, not reallocated


@needs_native
@pytest.mark.parametrize("dense_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_summed_unpack_in_either_dense_type_is_the_float_sum(dense_dtype):
    """A tier-8 token's dense weight is base + residual summed in float32, then stored as float32 or bfloat16."""
    weight = torch.randn(40, 256, generator=torch.Generator().manual_seed(11))
    base, residual = quantize_tiers(weight, (PlaneSpec(4, 64, False), PlaneSpec(4, 64, False)))
    kernel = CpuVnniKernel(dense_dtype=dense_dtype)
    tiled = [kernel.prepare_plane(p) for p in (base, residual)]
    out = torch.empty(40, 256, dtype=dense_dtype)
    kernel.native.dequantize_w4_sum([t.weight for t in tiled], [t.scales for t in tiled], [t.zeros for t in tiled], 64, 0, out)
    reference = ReferenceKernel()
    expected = reference.prepare_plane(base) + reference.prepare_plane(residual)
    tolerance = 4e-7 if dense_dtype == torch.float32 else 2 ** -8
    assert torch.allclose(out.float(), expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))


@needs_native
@pytest.mark.parametrize("tokens", [0, 1, 5, 13], ids=lambda t: f"m{t}")
@pytest.mark.parametrize(
    "shape,group_size,symmetric",
    [((100, 576), 64, False), ((37, 256), 128, True), ((24, 64 * 37), 64, False), ((20, 64 * 17), 64, True), ((16, 1024), 1024, False)],
    ids=["576-g64-asym", "37rows-g128-sym", "3-chunks-g64", "partial-chunk", "one-group"],
)
def test_lane_product_is_the_eight_bit_product(shape, group_size, symmetric, tokens):
    """The lane kernel (routed rows of a prefill; 16 rows per register on VNNI, 8 on AVX2) does
    matmul_w4's all-8-bit arithmetic: the same integer dot products, summed in another order,
    including rows past a multiple of 16 or 8."""
    kernel = CpuVnniKernel()
    prepared = kernel.prepare_plane(_plane(shape, group_size, symmetric))
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(3))
    args = (prepared.weight, prepared.scales, prepared.zeros, group_size)
    lanes = kernel.native.matmul_w4_many(x, *args, 0, shape[0])
    narrow = kernel.native.matmul_w4(x, *args, ALL_NARROW, 0, shape[0])
    assert lanes.shape == (tokens, shape[0]) and lanes.dtype == torch.float32
    if tokens:
        assert torch.allclose(lanes, narrow, rtol=1e-5, atol=1e-5 * float(narrow.abs().max()))
        expected = ReferenceKernel().matmul_plane(x, ReferenceKernel().prepare_plane(_plane(shape, group_size, symmetric)))
        assert _relative_error(lanes, expected) < 5e-2


@needs_native
@pytest.mark.parametrize("rows", [[], [3], [12, 0, 7, 29, 30], list(range(31))], ids=["none", "one", "unsorted", "all"])
@pytest.mark.parametrize("shape,group_size", [((100, 576), 64), ((37, 256), 128), ((20, 64 * 17), 64)], ids=["576", "37rows", "partial-chunk"])
def test_rows_add_is_the_lane_product_of_those_rows_added_in(shape, group_size, rows):
    """matmul_w4_rows_add (a prefill's routed residuals; 16 rows per register on VNNI, 8 on AVX2)
    reads the listed rows of x and adds their 8-bit lane products into the same rows of `into`:
    bitwise index_add_ of matmul_w4_many over the gathered rows, other rows untouched."""
    native = native_kernels()
    prepared = CpuVnniKernel().prepare_plane(_plane(shape, group_size))
    args = (prepared.weight, prepared.scales, prepared.zeros, group_size, 0, shape[0])
    x = torch.randn(31, shape[1], generator=torch.Generator().manual_seed(5))
    into = torch.randn(31, shape[0], generator=torch.Generator().manual_seed(6))
    index = torch.tensor(rows, dtype=torch.int64)
    expected = into.clone().index_add_(0, index, native.matmul_w4_many(x.index_select(0, index).contiguous(), *args))
    got = native.matmul_w4_rows_add(x, index, *args, into)
    assert got.data_ptr() == into.data_ptr() and torch.equal(into, expected)


@needs_avx2_build
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 7, 31], ids=lambda t: f"m{t}")
@pytest.mark.parametrize(
    "shape,group_size", [((8, 128), 64), ((16, 256), 128), ((20, 192), 64), ((36, 64 * 17), 64), ((100, 576), 64)],
    ids=["one-group", "two-groups", "short-second", "odd-groups-partial-chunk", "576"],
)
def test_paired_row_groups_give_the_bits_of_one_group_at_a_time(shape, group_size, tokens):
    """The AVX2 8-bit lanes take two groups of 8 rows per pass over the tokens (each broadcast
    activation feeds both); every lane's arithmetic is the single group's, in its order, so the
    products and the in-place routed sums are bitwise those of one group at a time, also where the
    second group is short or the number of groups is odd."""
    native = native_kernels()
    prepared = CpuVnniKernel().prepare_plane(_plane(shape, group_size))
    args = (prepared.weight, prepared.scales, prepared.zeros, group_size, 0, shape[0])
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(7))
    into = torch.randn(tokens, shape[0], generator=torch.Generator().manual_seed(8))
    rows = torch.arange(tokens - 1, -1, -2)
    assert native.lane_pairs()
    try:
        results = {}
        for pairs in (True, False):
            native.set_lane_pairs(pairs)
            results[pairs] = (native.matmul_w4_many(x, *args), native.matmul_w4_rows_add(x, rows, *args, into.clone()))
    finally:
        native.set_lane_pairs(True)
    assert all(torch.equal(a, b) for a, b in zip(results[True], results[False]))
    assert not torch.equal(results[True][1], into)


@needs_native
def test_rows_add_refuses_rows_outside_x_and_a_misshaped_output():
    native = native_kernels()
    prepared = CpuVnniKernel().prepare_plane(_plane((16, 128)))
    args = (prepared.weight, prepared.scales, prepared.zeros, 64, 0, 16)
    x = torch.randn(4, 128)
    with pytest.raises(RuntimeError, match="rows must index x's 4 rows"):
        native.matmul_w4_rows_add(x, torch.tensor([1, 4]), *args, torch.zeros(4, 16))
    with pytest.raises(RuntimeError, match="into must be contiguous float32"):
        native.matmul_w4_rows_add(x, torch.tensor([1]), *args, torch.zeros(3, 16))
    with pytest.raises(RuntimeError, match="int64"):
        native.matmul_w4_rows_add(x, torch.tensor([1], dtype=torch.int32), *args, torch.zeros(4, 16))


@needs_native
@pytest.mark.parametrize("wide", [False, True], ids=["8-bit", "15-bit"])
def test_lane_product_reads_a_view_of_a_stacked_plane(wide):
    kernel = CpuVnniKernel()
    width = 64 * 20
    parts = [kernel.prepare_plane(_plane((rows, width), seed=rows)) for rows in (36, 20, 24)]
    _, views = kernel.fuse_planes(parts)
    x = torch.randn(7, width, generator=torch.Generator().manual_seed(4))

    def lanes(plane, first_row, rows):
        args = (x, plane.weight, plane.scales, plane.zeros, plane.group_size, first_row, rows)
        return kernel.native.matmul_w4_lanes(*args, True) if wide else kernel.native.matmul_w4_many(*args)

    for view, part in zip(views, parts):
        got = lanes(view, view.first_row, view.out_features)
        alone = kernel.native.matmul_w4(x, part.weight, part.scales, part.zeros, part.group_size, ALL_WIDE if wide else ALL_NARROW, 0, part.out_features)
        assert torch.allclose(got, alone, rtol=1e-5, atol=1e-5 * float(alone.abs().max()))
    with pytest.raises(RuntimeError, match="tile-aligned"):
        lanes(parts[0], 2, 8)


@needs_native
@pytest.mark.parametrize("tokens", [0, 1, 2, 5, 13], ids=lambda t: f"m{t}")
@pytest.mark.parametrize(
    "shape,group_size,symmetric",
    [((100, 576), 64, False), ((37, 256), 128, True), ((24, 64 * 37), 64, False), ((20, 64 * 17), 64, True), ((16, 1024), 1024, False)],
    ids=["576-g64-asym", "37rows-g128-sym", "3-chunks-g64", "partial-chunk", "one-group"],
)
def test_wide_lane_product_is_the_fifteen_bit_product(shape, group_size, symmetric, tokens):
    """matmul_w4_lanes with 15-bit activations (a many-token call's base product on AVX2) does the
    one-token kernel's default arithmetic: the same integer sums, summed in another order."""
    native = native_kernels()
    prepared = CpuVnniKernel().prepare_plane(_plane(shape, group_size, symmetric))
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(3))
    args = (prepared.weight, prepared.scales, prepared.zeros, group_size)
    lanes = native.matmul_w4_lanes(x, *args, 0, shape[0], True)
    assert lanes.shape == (tokens, shape[0]) and lanes.dtype == torch.float32
    if tokens:
        wide = native.matmul_w4(x, *args, ALL_WIDE, 0, shape[0])
        assert torch.allclose(lanes, wide, rtol=1e-5, atol=1e-5 * float(wide.abs().max()))
        expected = ReferenceKernel().matmul_plane(x, ReferenceKernel().prepare_plane(_plane(shape, group_size, symmetric)))
        assert _relative_error(lanes, expected) < 1e-3
        narrow = native.matmul_w4_lanes(x, *args, 0, shape[0], False)
        assert torch.allclose(narrow, native.matmul_w4(x, *args, ALL_NARROW, 0, shape[0]), rtol=1e-5, atol=1e-5 * float(wide.abs().max()))


@needs_native
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_lane_kernel_int16_sums_hold_at_the_extremes(sign):
    """Every code 15 and every activation at its largest code (15 bits: high byte 127 or -128)
    is the most the kernel's int16 half-block sums ever hold (8 x 2 x 15 x 128 = 30,720): the
    result is still exact."""
    rows, width = 16, 64 * 18
    codes = torch.full((rows, width), 15, dtype=torch.uint8)
    weight = tile_plane_codes(codes, 4)
    ones, zeros = torch.ones(rows, width // 64, dtype=torch.float16), torch.zeros(rows, width // 64, dtype=torch.float16)
    tiled_scales, tiled_zeros = tile_group_params(ones, 4, 64), tile_group_params(zeros, 4, 64)
    x = torch.full((3, width), sign)
    for wide in (True, False):
        out = native_kernels().matmul_w4_lanes(x, weight, tiled_scales, tiled_zeros, 64, 0, rows, wide)
        assert torch.allclose(out, torch.full((3, rows), sign * 15 * width), rtol=1e-6)


@needs_avx2_build
def test_avx2_build_multiplies_many_tokens_through_its_lanes():
    """On AVX2 a many-token call's plane products take the 8-row lanes: by default 8-bit
    activations for base products and routed rows' residuals, 15-bit where every token reads a
    plane; base_activation_bits 15 sends base products to the 15-bit lanes; a few-token call
    keeps the one-token kernel's 15 bits."""
    kernel = CpuVnniKernel()
    assert kernel.name == "cpu-avx2" and kernel.has_lane_kernel and kernel.wide_lanes and kernel.lane_residuals
    assert kernel.lane_min_tokens == 16 and kernel.lane_base and kernel.base_wide_above == ALL_WIDE
    plane = _plane((40, 128))
    prepared = kernel.prepare_plane(plane)
    args = (prepared.weight, prepared.scales, prepared.zeros, 64, 0, 40)
    x = torch.randn(24, 128, generator=torch.Generator().manual_seed(5))
    one_token = kernel.native.matmul_w4(x[:4], prepared.weight, prepared.scales, prepared.zeros, 64, ALL_WIDE, 0, 40)
    assert torch.equal(kernel.matmul_plane(x, prepared), kernel.native.matmul_w4_lanes(x, *args, True))
    assert torch.equal(kernel.matmul_base(x, prepared, alone=True), kernel.native.matmul_w4_many(x, *args))
    assert torch.equal(kernel.matmul_base(x[:4], prepared, alone=True), one_token)  # decode keeps 15 bits
    assert torch.equal(kernel.matmul_routed(x[:3], prepared, call_tokens=24), kernel.native.matmul_w4_lanes(x[:3], *args, False))
    assert torch.equal(kernel.matmul_plane(x[:4], prepared), one_token)
    expected = ReferenceKernel().matmul_plane(x, ReferenceKernel().prepare_plane(plane))
    assert _relative_error(kernel.matmul_base(x, prepared, alone=False), expected) < 5e-2
    kernel.set_base_activation_bits(15)
    assert not kernel.lane_base and kernel.base_wide_above == ALL_WIDE
    assert torch.equal(kernel.matmul_base(x, prepared, alone=True), kernel.native.matmul_w4_lanes(x, *args, True))
    kernel.set_base_activation_bits(8)
    assert kernel.lane_base and kernel.base_wide_above == ALL_NARROW
    assert torch.equal(kernel.matmul_base(x, prepared, alone=False), kernel.native.matmul_w4_many(x, *args))
    # wide_lanes=False: many-token calls unpack the plane and multiply densely again.
    dense = CpuVnniKernel(wide_lanes=False, lane_base=False, dense_min_tokens=16)
    # float32 on an AVX2 CPU; bfloat16 where the AVX2 build runs on a CPU with AVX512-BF16
    # (TAP_NATIVE_MARCH=znver3 on Zen 4).
    tolerance = 1e-5 if dense.dense_dtype == torch.float32 else 1e-2
    assert _relative_error(dense.matmul_plane(x, prepared), expected) < tolerance
    assert _relative_error(dense.matmul_base(x, prepared, alone=True), expected) < tolerance


@needs_native
@pytest.mark.parametrize("wide_above", [ALL_NARROW, 10.0])
def test_base_plane_alone_takes_eight_bit_activations_only_when_asked(wide_above):
    plane = _plane((64, 512))
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(7))
    expected = ReferenceKernel().matmul_plane(x, ReferenceKernel().prepare_plane(plane))
    coarse, fine = CpuVnniKernel(base_wide_above=wide_above), CpuVnniKernel()
    prepared = coarse.prepare_plane(plane)
    alone = coarse.matmul_base(x, prepared, alone=True)
    assert 5e-4 < _relative_error(alone, expected) < 5e-2
    assert torch.equal(alone, coarse.native.matmul_w4(x, prepared.weight, prepared.scales, prepared.zeros, 64, wide_above, 0, 64))
    # A token that also reads a residual plane keeps 15 bits, and so does a kernel told not to.
    assert torch.equal(coarse.matmul_base(x, prepared, alone=False), coarse.matmul_plane(x, prepared))
    assert torch.equal(fine.matmul_base(x, prepared, alone=True), fine.matmul_plane(x, prepared))


@needs_native
def test_zero_input_gives_zero_output():
    kernel = CpuVnniKernel()
    prepared = kernel.prepare_plane(_plane((16, 128)))
    out = kernel.matmul_plane(torch.zeros(1, 128), prepared)
    assert torch.equal(out, torch.zeros(1, 16))


@needs_native
def test_shapes_the_kernel_does_not_take_fall_back_to_torchs():
    kernel = CpuVnniKernel()
    plane = _plane((40, 96), group_size=32)
    prepared = kernel.prepare_plane(plane)
    assert type(prepared) is _PackedPlane
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(3))
    expected = ReferenceKernel().matmul_plane(x, ReferenceKernel().prepare_plane(plane))
    assert _relative_error(kernel.matmul_plane(x, prepared), expected) < 1e-2
    rows = quantize_rows(torch.randn(8, 48))  # 48 inputs: not a multiple of 32
    assert type(kernel.prepare_rows(rows)) is _PackedRows


@needs_native
def test_kernel_checks_its_arguments():
    kernel = CpuVnniKernel()
    prepared = kernel.prepare_plane(_plane((16, 128)))
    with pytest.raises(RuntimeError, match="input columns"):
        kernel.native.matmul_w4(torch.zeros(1, 64), prepared.weight, prepared.scales, prepared.zeros, 64, ALL_WIDE, 0, 16)
    with pytest.raises(RuntimeError, match="tile-aligned view"):
        kernel.native.matmul_w4(torch.zeros(1, 128), prepared.weight, prepared.scales, prepared.zeros, 64, ALL_WIDE, 4, 16)


@needs_native
@pytest.mark.parametrize("tokens", [1, 3, 100], ids=lambda t: f"m{t}")
@pytest.mark.parametrize("shape", [(1000, 576), (33, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_row_product_matches_reference(shape, tokens):
    rows = quantize_rows(torch.randn(*shape, generator=torch.Generator().manual_seed(4)))
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(5))
    expected = ReferenceKernel().matmul_rows(x, ReferenceKernel().prepare_rows(rows))
    kernel = CpuVnniKernel(dense_min_tokens=64)
    prepared = kernel.prepare_rows(rows)
    assert type(prepared) is TiledRows
    got = kernel.matmul_rows(x, prepared)
    assert got.shape == expected.shape
    assert _relative_error(got, expected) < (5e-4 if tokens < 64 else 1e-2)


@needs_native
@pytest.mark.parametrize("shape,group_size", [((37, 256), 128), ((12, 64 * 37), 64)])
def test_summed_unpack_rounds_the_float_sum_of_the_planes_once(shape, group_size):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.05
    planes = quantize_tiers(weight, (PlaneSpec(4, group_size, False), PlaneSpec(4, group_size, False)))
    kernel = CpuVnniKernel(dense_min_tokens=16)
    prepared = [kernel.prepare_plane(p) for p in planes]
    reference = ReferenceKernel()
    total = sum(reference.prepare_plane(p) for p in planes)
    out = torch.empty(shape, dtype=torch.bfloat16)
    got = kernel.native.dequantize_w4_sum(
        [p.weight for p in prepared], [p.scales for p in prepared], [p.zeros for p in prepared], group_size, 0, out
    )
    # float32 sums of the same two terms may differ in the last bit by association order
    assert torch.allclose(got.float(), total.to(torch.bfloat16).float(), rtol=2**-7, atol=0)
    assert (got != total.to(torch.bfloat16)).float().mean() < 0.01
    x = torch.randn(20, shape[1], generator=torch.Generator().manual_seed(2))  # many tokens: the dense path
    summed = kernel.matmul_plane_sum(x, prepared)
    assert _relative_error(summed, x @ total.t()) < 1e-2
    assert kernel.matmul_plane_sum(x[:3], prepared) is None  # few tokens: one kernel call per plane instead
    with pytest.raises(RuntimeError, match="one shape"):
        other = kernel.prepare_plane(_plane((shape[0] + 32, shape[1]), group_size))
        kernel.native.dequantize_w4_sum([prepared[0].weight, other.weight], [prepared[0].scales, other.scales],
                                        [prepared[0].zeros, other.zeros], group_size, 0, out)


@needs_native
def test_fused_planes_equal_their_parts_and_share_storage():
    kernel = CpuVnniKernel()
    width = 64 * 20  # two chunks of the layout
    parts = [kernel.prepare_plane(_plane((rows, width), seed=rows)) for rows in (64, 16, 16)]
    fused, views = kernel.fuse_planes(parts)
    for tokens in (1, 20):  # the kernel, and the dense unpack of each view
        x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(6))
        separate = torch.cat([kernel.matmul_plane(x, p) for p in parts], dim=-1)
        assert torch.allclose(kernel.matmul_plane(x, fused), separate, rtol=0, atol=1e-5)
        for view, part in zip(views, parts):
            assert view.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
            assert torch.allclose(kernel.matmul_plane(x, view), kernel.matmul_plane(x, part), rtol=0, atol=1e-5)
    padded = [kernel.prepare_plane(_plane((rows, 256))) for rows in (10, 16)]
    assert kernel.fuse_planes(padded) is None  # padding rows would sit between the parts


def test_disabled_native_kernels_fall_back_with_a_reason(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("TAP_NATIVE_KERNELS", "0")
    assert native.native_kernels() is None
    assert "TAP_NATIVE_KERNELS=0" in native.native_unavailable_reason()
    assert select_kernel("auto", "cpu").name in ("cpu-packed", "reference")
    with pytest.raises(InvalidConfigError, match="cpu-vnni.*TAP_NATIVE_KERNELS=0"):
        select_kernel("cpu-vnni", "cpu")


def test_a_failed_build_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.delenv("TAP_NATIVE_KERNELS", raising=False)

    def no_compiler():
        raise RuntimeError("c++: command not found")

    monkeypatch.setattr(native, "_build", no_compiler)
    assert native.native_kernels() is None
    assert "c++: command not found" in native.native_unavailable_reason()
