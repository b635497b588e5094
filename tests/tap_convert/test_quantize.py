import pytest
import torch

from tap_convert.quantize import quantize_plane, quantize_rows, quantize_tiers, sqnr_db
from tap_runtime.format import PlaneSpec
from tap_runtime.planes import Plane, dequantize_plane, dequantize_planes, dequantize_rows


def _weight(out_features=96, in_features=256, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(out_features, in_features, generator=generator) * 0.02).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [32, 64, 128], ids=lambda g: f"g{g}")
def test_base_plane_meets_4bit_sqnr(group_size, symmetric, dtype):
    weight = _weight(dtype=dtype)
    plane = quantize_plane(weight, PlaneSpec(4, group_size, symmetric))
    assert plane.qweight.shape == (96, 128)
    assert plane.scales.shape == (96, 256 // group_size)
    assert (plane.zeros is None) == symmetric
    # Gaussian weights at 4 bits with per-group ranges: about 20 dB (6 dB per bit, less clipping loss).
    assert sqnr_db(weight.float(), dequantize_plane(plane)) > 18.0


@pytest.mark.parametrize("group_size", [32, 64], ids=lambda g: f"g{g}")
def test_each_added_tier_raises_sqnr(group_size):
    weight = _weight()
    specs = (PlaneSpec(4, group_size, False), PlaneSpec(4, group_size, True), PlaneSpec(4, group_size, True))
    planes = quantize_tiers(weight, specs)
    sqnrs = [sqnr_db(weight, dequantize_planes(planes, count)) for count in (1, 2, 3)]
    assert sqnrs[0] > 18.0
    # A 4-bit residual plane adds roughly another 4 bits of precision each time.
    assert sqnrs[1] > sqnrs[0] + 15.0
    assert sqnrs[2] > sqnrs[1] + 10.0


def test_importance_weighting_lowers_the_weighted_error():
    weight = _weight(in_features=128)
    importance = torch.ones(128)
    importance[:16] = 100.0  # a few channels carry most of the activation energy
    spec = PlaneSpec(4, 64, False)

    def weighted_error(plane):
        return float((((dequantize_plane(plane) - weight) ** 2) * importance).sum())

    assert weighted_error(quantize_plane(weight, spec, importance)) < weighted_error(quantize_plane(weight, spec))


def test_clip_search_is_never_worse_than_plain_min_max():
    weight = _weight()
    weight[0, 0] = 1.0  # one outlier stretches its group's range
    spec = PlaneSpec(4, 64, False)
    plane = quantize_plane(weight, spec)
    groups = weight.reshape(96, 4, 64)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).half().float()
    zero = (-low / scale).half().float()
    rtn = ((torch.clamp(torch.round(groups / scale + zero), 0, 15) - zero) * scale).reshape(96, 256)
    assert ((dequantize_plane(plane) - weight) ** 2).sum() <= ((rtn - weight) ** 2).sum() + 1e-9


def test_a_group_of_zeros_round_trips():
    weight = torch.zeros(16, 64)
    plane = quantize_plane(weight, PlaneSpec(4, 32, False))
    assert torch.count_nonzero(dequantize_plane(plane)) == 0


def test_in_features_must_be_a_multiple_of_group_size():
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        quantize_plane(torch.zeros(4, 48), PlaneSpec(4, 32, False))


def test_rows_quantize_to_int8_with_high_sqnr():
    weight = _weight(out_features=500, in_features=64)
    rows = quantize_rows(weight)
    assert rows.qweight.dtype == torch.int8 and rows.scales.shape == (500,)
    assert sqnr_db(weight, dequantize_rows(rows)) > 38.0


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_log_coded_scales_cost_almost_nothing_and_store_exactly(symmetric):
    """8-bit log-coded scales (format 3) move each scale by at most 1.1%; the codes are chosen
    against the stored scales, so the plane stays as good as with float16 scales."""
    weight = _weight(in_features=512, seed=4)
    narrow = quantize_plane(weight, PlaneSpec(4, 64, symmetric))
    wide = quantize_plane(weight, PlaneSpec(4, 64, symmetric, scale_bits=16))
    assert sqnr_db(weight, dequantize_plane(narrow)) > sqnr_db(weight, dequantize_plane(wide)) - 0.05
    stored = narrow.stored_tensors()
    assert stored["scales"].dtype == torch.uint8 and stored["scale_reference"].dtype == torch.float32
    # The largest group's unclipped scale is the reference: nothing needs a larger code.
    assert narrow.scales.float().max() <= stored["scale_reference"] * (1 + 1e-3)
    # What is stored decodes to exactly the plane the converter measured.
    assert torch.equal(dequantize_plane(Plane.from_stored(narrow.spec, stored)), dequantize_plane(narrow))


def test_residual_plane_keeps_its_gain_with_log_coded_scales():
    weight = _weight(seed=5)
    errors = {}
    for scale_bits in (8, 16):
        specs = (PlaneSpec(4, 64, False, scale_bits=scale_bits), PlaneSpec(4, 64, True, scale_bits=scale_bits))
        errors[scale_bits] = sqnr_db(weight, dequantize_planes(quantize_tiers(weight, specs), 2))
    assert errors[8] > errors[16] - 0.1


def test_clip_search_walks_the_stored_scale_grid_one_code_at_a_time():
    """With log-coded scales the candidates are consecutive codes below the unclipped scale."""
    from tap_convert.quantize import CLIP_RATIOS, _candidate, clip_ratios, scale_reference_for

    spec = PlaneSpec(4, 64, True)
    assert clip_ratios(PlaneSpec(4, 64, True, scale_bits=16)) == CLIP_RATIOS
    group = _weight(out_features=1, in_features=64, seed=6).reshape(1, 1, 64)
    reference = scale_reference_for(group.reshape(1, 64), spec) * 4  # leave codes above and below
    codes = [int(spec.encode_scales(_candidate(group, r, spec, reference)[0].reshape(1).half(), reference)) for r in clip_ratios(spec)]
    assert codes == list(range(codes[0], codes[0] + len(codes))) and len(codes) == 17
    assert min(clip_ratios(spec)) == pytest.approx(min(CLIP_RATIOS), abs=0.01)
