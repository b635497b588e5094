"""The base plane's level table (tap_convert.levels) and quantizing onto it (quantize, gptq)."""

import pytest
import torch

from tap_convert.gptq import descend_codes, gptq_plane, refit_group_parameters
from tap_convert.levels import fit_levels, lloyd_levels, stored_levels
from tap_convert.quantize import quantize_plane, sqnr_db
from tap_runtime.format import LEVEL_STEPS_PER_CODE, PlaneSpec
from tap_runtime.packing import unpack_int4
from tap_runtime.planes import dequantize_plane
from tap_runtime.rotation import rotate_weight

from .test_gptq import _problem


def test_lloyd_on_uniform_values_spaces_the_levels_evenly_across_the_range():
    values = torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 15
    levels = lloyd_levels(values, iterations=200)
    assert torch.allclose(levels, (torch.arange(16) + 0.5) * 15 / 16, atol=0.05)


def test_stored_levels_are_strictly_increasing_eighths_in_range():
    assert stored_levels(torch.arange(16, dtype=torch.float32)) == tuple(range(0, 121, 8))
    crowded = stored_levels(torch.full((16,), 7.0))
    assert len(crowded) == 16 and all(b > a for a, b in zip(crowded, crowded[1:]))
    at_the_edges = stored_levels(torch.tensor([-1.0] * 8 + [16.0] * 8))
    assert at_the_edges[0] == 0 and at_the_edges[-1] == 15 * LEVEL_STEPS_PER_CODE
    assert all(b > a for a, b in zip(at_the_edges, at_the_edges[1:]))
    PlaneSpec(4, 64, False, levels=at_the_edges)  # a valid table


def _bell_weights(seed: int, count: int = 3) -> list[torch.Tensor]:
    """Rotated Gaussian weights: bell-shaped within each group, as real rotated weights are."""
    generator = torch.Generator().manual_seed(seed)
    return [rotate_weight(torch.randn(64, 256, generator=generator) * 0.05, 64) for _ in range(count)]


def test_fitted_levels_crowd_the_middle_and_are_deterministic():
    weights = _bell_weights(0)
    levels = fit_levels(((w, 64) for w in weights), len(weights), seed=3)
    assert levels == fit_levels(((w, 64) for w in weights), len(weights), seed=3)
    gaps = [b - a for a, b in zip(levels, levels[1:])]
    assert max(gaps[6:9]) < min(gaps[0], gaps[-1])  # denser where the values are
    with pytest.raises(ValueError, match="at least one weight"):
        fit_levels(iter(()), 0)


def test_fitted_levels_lower_the_weighted_error_of_round_to_nearest():
    weights = _bell_weights(1)
    levels = fit_levels(((w, 64) for w in weights), len(weights))
    for weight in _bell_weights(2):  # other weights of the same kind
        even = dequantize_plane(quantize_plane(weight, PlaneSpec(4, 64, False)))
        fitted_plane = quantize_plane(weight, PlaneSpec(4, 64, False, levels=levels))
        assert fitted_plane.spec.levels == levels
        fitted = dequantize_plane(fitted_plane)
        assert float(((fitted - weight) ** 2).sum()) < 0.95 * float(((even - weight) ** 2).sum())


def test_gptq_onto_fitted_levels_lowers_the_output_error():
    weight, inputs, moment = _problem(in_features=256)
    weight = rotate_weight(weight, 64)
    inputs = rotate_weight(inputs, 64)
    levels = fit_levels([(weight, 64)], 1)
    reference = inputs @ weight.t()
    hessian = inputs.t() @ inputs / inputs.shape[0]
    even = gptq_plane(weight, PlaneSpec(4, 64, False), hessian)
    fitted = gptq_plane(weight, PlaneSpec(4, 64, False, levels=levels), hessian)
    assert sqnr_db(reference, inputs @ dequantize_plane(fitted).t()) > sqnr_db(reference, inputs @ dequantize_plane(even).t()) + 0.2


def test_descent_and_refit_read_codes_as_their_levels():
    """Coordinate descent and the least-squares refit work on the levels, not on the raw codes:
    neither may raise a row's output error, and descent moves codes to the nearest level."""
    weight, inputs, moment = _problem(in_features=256, seed=4)
    levels = fit_levels([(weight, 64)], 1)
    spec = PlaneSpec(4, 64, False, levels=levels)
    damped = moment.hessian + 0.01 * torch.diag(moment.hessian).mean() * torch.eye(256)
    plane = gptq_plane(weight, spec, moment.hessian)

    def row_errors(codes, scales, zeros):
        values = spec.dequantize_codes(codes).view(64, 4, 64)
        error = weight - ((values - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)).view(64, 256)
        return ((error @ damped) * error).sum(1)

    codes = unpack_int4(plane.qweight)
    before = row_errors(codes, plane.scales, plane.zeros)
    descended = descend_codes(weight, codes, plane.scales.float(), plane.zeros.float(), spec, damped, sweeps=3)
    assert torch.all(row_errors(descended, plane.scales, plane.zeros) <= before * (1 + 1e-5))
    assert not torch.equal(descended, codes)
    refit = refit_group_parameters(weight, codes, plane.scales.float(), plane.zeros.float(), spec, moment.hessian, plane.scale_reference)
    if refit is not None:
        assert torch.all(row_errors(codes, *refit) <= before * (1 + 1e-5))
    refitted = gptq_plane(weight, spec, moment.hessian, refit_rounds=1, descent_sweeps=1)
    assert float(row_errors(unpack_int4(refitted.qweight), refitted.scales, refitted.zeros).sum()) < float(before.sum())
