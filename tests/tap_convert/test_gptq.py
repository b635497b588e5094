import pytest
import torch

from calibration.stats import InputSecondMoment
from tap_convert.gptq import gptq_plane, gptq_rows, gptq_tiers
from tap_convert.quantize import quantize_plane, quantize_rows, quantize_tiers, sqnr_db
from tap_runtime.format import PlaneSpec
from tap_runtime.planes import Plane, dequantize_plane, dequantize_planes


def _problem(in_features=128, out_features=64, tokens=2048, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Correlated inputs with a few strong channels, as real layer inputs are.
    mixing = torch.randn(in_features, in_features, generator=generator) / in_features**0.5
    scales = torch.ones(in_features)
    scales[:8] = 10.0
    inputs = (torch.randn(tokens, in_features, generator=generator) @ mixing) * scales
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    moment = InputSecondMoment(in_features)
    moment.add_batch(inputs[: tokens // 2])
    moment.add_batch(inputs[tokens // 2 :])
    return weight, inputs, moment


def test_second_moment_matches_a_direct_computation():
    _, inputs, moment = _problem()
    assert torch.allclose(moment.hessian, inputs.t() @ inputs / inputs.shape[0], rtol=1e-4, atol=1e-4)
    assert torch.allclose(moment.mean_square, torch.diag(moment.hessian), rtol=1e-4)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [32, 64], ids=lambda g: f"g{g}")
def test_gptq_output_error_beats_round_to_nearest(group_size, symmetric):
    weight, inputs, moment = _problem()
    spec = PlaneSpec(4, group_size, symmetric)
    reference = inputs @ weight.t()
    gptq = inputs @ dequantize_plane(gptq_plane(weight, spec, moment.hessian)).t()
    rtn = inputs @ dequantize_plane(quantize_plane(weight, spec, moment.mean_square)).t()
    # Output SQNR on the calibration inputs is what GPTQ optimises.
    assert sqnr_db(reference, gptq) > sqnr_db(reference, rtn) + 1.0


def test_gptq_tiers_nest_and_each_tier_improves_the_output():
    weight, inputs, moment = _problem()
    specs = (PlaneSpec(4, 32, False), PlaneSpec(4, 32, True))
    planes = gptq_tiers(weight, specs, moment.hessian)
    reference = inputs @ weight.t()
    base = sqnr_db(reference, inputs @ dequantize_planes(planes, 1).t())
    top = sqnr_db(reference, inputs @ dequantize_planes(planes, 2).t())
    assert top > base + 10.0
    rtn_planes = quantize_tiers(weight, specs, moment.mean_square)
    rtn_base = sqnr_db(reference, inputs @ dequantize_planes(rtn_planes, 1).t())
    rtn_top = sqnr_db(reference, inputs @ dequantize_planes(rtn_planes, 2).t())
    # GPTQ's gain is in the base plane; the top tier ends up level with round-to-nearest.
    assert base > rtn_base + 3.0
    assert top > rtn_top - 1.5


def test_dead_input_channels_are_zeroed_not_nan():
    weight, _, moment = _problem()
    hessian = moment.hessian.clone()
    hessian[5, :] = 0
    hessian[:, 5] = 0
    plane = gptq_plane(weight, PlaneSpec(4, 32, False), hessian)
    dense = dequantize_plane(plane)
    assert torch.isfinite(dense).all()


def test_gptq_rows_beat_round_to_nearest_rows_on_the_output(monkeypatch):
    """The 8-bit head: same per-row scales as round-to-nearest, less output error on the inputs."""
    import tap_convert.gptq as gptq_module

    monkeypatch.setattr(gptq_module, "_ROW_CHUNK", 40)  # several row chunks, one of them partial
    weight, inputs, moment = _problem(out_features=100)
    rtn = quantize_rows(weight)
    compensated = gptq_rows(weight, moment.hessian)
    assert compensated.qweight.dtype == torch.int8 and compensated.qweight.shape == weight.shape
    assert torch.equal(compensated.scales, rtn.scales)
    reference = inputs @ weight.t()

    def output(rows):
        return inputs @ (rows.qweight.to(torch.float32) * rows.scales.to(torch.float32).unsqueeze(1)).t()

    assert sqnr_db(reference, output(compensated)) > sqnr_db(reference, output(rtn)) + 3.0


def test_weighting_the_first_position_makes_the_sink_token_nearly_exact():
    """The attention sink: each window starts with an input along one direction, a small part of
    the Hessian. Weighted by the window length, GPTQ all but removes that token's error at a
    small cost to the rest."""
    generator = torch.Generator().manual_seed(1)
    windows, seq_len, in_features = 16, 64, 128
    inputs = torch.randn(windows, seq_len, in_features, generator=generator)
    sink = torch.randn(in_features, generator=generator)
    inputs[:, 0] = sink + 0.1 * torch.randn(windows, in_features, generator=generator)
    weight = torch.randn(48, in_features, generator=generator) * 0.05
    moment = InputSecondMoment(in_features)
    moment.add_batch(inputs)
    spec = PlaneSpec(4, 32, False)
    plain = dequantize_plane(gptq_plane(weight, spec, moment.hessian))
    weighted = dequantize_plane(gptq_plane(weight, spec, moment.hessian_with_first_weighted(seq_len)))
    first, rest = inputs[:, 0], inputs[:, 1:].reshape(-1, in_features)
    assert sqnr_db(first @ weight.t(), first @ weighted.t()) > sqnr_db(first @ weight.t(), first @ plain.t()) + 6.0
    assert sqnr_db(rest @ weight.t(), rest @ weighted.t()) > sqnr_db(rest @ weight.t(), rest @ plain.t()) - 1.0


def _skewed_problem(seed=0):
    """Inputs whose channel strengths vary widely and are shuffled across the groups, as real
    layer inputs' are: the case act-order exists for."""
    generator = torch.Generator().manual_seed(seed)
    in_features = 128
    strengths = torch.logspace(-1, 1, in_features)[torch.randperm(in_features, generator=generator)]
    mixing = torch.eye(in_features) + torch.randn(in_features, in_features, generator=generator) * 0.1
    inputs = (torch.randn(4096, in_features, generator=generator) @ mixing) * strengths
    weight = torch.randn(96, in_features, generator=generator) * 0.05
    moment = InputSecondMoment(in_features)
    moment.add_batch(inputs)
    return weight, inputs, moment


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_activation_order_lowers_the_output_error_of_column_order(symmetric):
    weight, inputs, moment = _skewed_problem()
    spec = PlaneSpec(4, 32, symmetric)
    reference = inputs @ weight.t()
    by_activation = sqnr_db(reference, inputs @ dequantize_plane(gptq_plane(weight, spec, moment.hessian, "activation")).t())
    by_column = sqnr_db(reference, inputs @ dequantize_plane(gptq_plane(weight, spec, moment.hessian, "column")).t())
    assert by_activation > by_column + 0.3


def test_activation_order_keeps_codes_in_their_own_columns_and_groups():
    """Permuting the work must not permute the result: a weight whose columns already lie on one
    plane's grid comes back exactly, whatever order the columns were visited in."""
    generator = torch.Generator().manual_seed(3)
    spec = PlaneSpec(4, 32, False, scale_bits=16)  # float16 scales: the grid below is exactly storable
    codes = torch.randint(0, 16, (24, 96), generator=generator).float()
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every group spans the whole grid
    scales = (torch.rand(24, 3, generator=generator) * 0.01 + 0.005).to(torch.float16).float().repeat_interleave(32, dim=1)
    weight = (codes - 8) * scales
    hessian = torch.diag(torch.logspace(-2, 2, 96)[torch.randperm(96, generator=generator)])
    plane = gptq_plane(weight, spec, hessian, "activation")
    assert (dequantize_plane(plane) - weight).abs().max() < 1e-3 * scales.min()


def test_gptq_tiers_pass_their_order_on_and_reject_unknown_orders():
    weight, inputs, moment = _skewed_problem(seed=1)
    specs = (PlaneSpec(4, 32, False), PlaneSpec(4, 32, True))
    column = gptq_tiers(weight, specs, moment.hessian, "column")
    assert torch.equal(column[0].qweight, gptq_plane(weight, specs[0], moment.hessian, "column").qweight)
    activation = gptq_tiers(weight, specs, moment.hessian)  # the default
    assert torch.equal(activation[0].qweight, gptq_plane(weight, specs[0], moment.hessian, "activation").qweight)
    reference = inputs @ weight.t()
    assert sqnr_db(reference, inputs @ dequantize_planes(activation, 2).t()) > sqnr_db(reference, inputs @ dequantize_planes(activation, 1).t()) + 10
    with pytest.raises(ValueError, match="order 'random' is unknown"):
        gptq_plane(weight, specs[0], moment.hessian, "random")


@pytest.mark.parametrize("order", ["activation", "column"])
def test_log_coded_scales_keep_the_output_error_and_store_exactly(order):
    """Scale codes are fixed before the weights are rounded (or, in column order, when the group
    starts), so GPTQ compensates against the scales that are stored."""
    weight, inputs, moment = _skewed_problem(seed=1)
    reference = inputs @ weight.t()
    narrow = gptq_plane(weight, PlaneSpec(4, 32, False), moment.hessian, order)
    wide = gptq_plane(weight, PlaneSpec(4, 32, False, scale_bits=16), moment.hessian, order)
    assert sqnr_db(reference, inputs @ dequantize_plane(narrow).t()) > sqnr_db(reference, inputs @ dequantize_plane(wide).t()) - 0.1
    restored = Plane.from_stored(narrow.spec, narrow.stored_tensors())
    assert torch.equal(dequantize_plane(restored), dequantize_plane(narrow))


def test_damping_trades_the_fit_windows_output_error_for_each_weights_own_error():
    weight, inputs, moment = _problem()
    spec = PlaneSpec(4, 32, False)
    reference = inputs @ weight.t()
    light = dequantize_plane(gptq_plane(weight, spec, moment.hessian, damping=0.01))
    heavy = dequantize_plane(gptq_plane(weight, spec, moment.hessian, damping=10.0))
    # On the windows it was fitted on, light damping gives the smaller output error...
    assert sqnr_db(reference, inputs @ light.t()) > sqnr_db(reference, inputs @ heavy.t()) + 1.0
    # ...and heavy damping the smaller error in the weights themselves.
    assert (heavy - weight).pow(2).sum() < 0.8 * (light - weight).pow(2).sum()


def test_damping_is_passed_on_and_must_be_positive():
    weight, _, moment = _problem()
    specs = (PlaneSpec(4, 32, False), PlaneSpec(4, 32, True))
    tiers = gptq_tiers(weight, specs, moment.hessian, damping=0.3)
    assert torch.equal(tiers[0].qweight, gptq_plane(weight, specs[0], moment.hessian, damping=0.3).qweight)
    assert not torch.equal(tiers[0].qweight, gptq_plane(weight, specs[0], moment.hessian, damping=0.01).qweight)
    for damping in (0.0, -0.1):
        with pytest.raises(ValueError, match="damping must be positive"):
            gptq_plane(weight, specs[0], moment.hessian, damping=damping)
        with pytest.raises(ValueError, match="damping must be positive"):
            gptq_rows(weight, moment.hessian, damping=damping)


def test_hadamard_rotation_lowers_the_output_error_of_heavy_tailed_weights():
    """Real weights are heavy-tailed: a few large weights per row stretch their group's scale.
    Quantizing W H against the rotated inputs' Hessian (as the converter does) spreads them
    over the block and lowers both tiers' output error."""
    from tap_runtime.rotation import rotate_second_moment, rotate_weight

    weight, inputs, moment = _problem()
    generator = torch.Generator().manual_seed(7)
    heavy = weight * torch.exp(torch.randn(weight.shape, generator=generator))  # log-normal magnitudes
    specs = (PlaneSpec(4, 64, False), PlaneSpec(4, 64, False))
    reference = inputs @ heavy.t()
    plain = gptq_tiers(heavy, specs, moment.hessian)
    turned = gptq_tiers(rotate_weight(heavy, 64), specs, rotate_second_moment(moment.hessian, 64))
    for count in (1, 2):
        plain_sqnr = sqnr_db(reference, inputs @ dequantize_planes(plain, count).t())
        turned_sqnr = sqnr_db(reference, inputs @ rotate_weight(dequantize_planes(turned, count), 64).t())
        assert turned_sqnr > plain_sqnr + 2.0, (count, turned_sqnr, plain_sqnr)  # measured +6.6 and +11 dB


def _row_errors(weight, plane, hessian):
    error = weight - dequantize_plane(plane)
    return ((error @ hessian) * error).sum(1)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_refit_rounds_lower_the_output_error_and_never_raise_a_rows(symmetric):
    """Rows are independent in GPTQ, and each refit or pass is kept per row only where it is
    better, so no row's output error (under the damped Hessian GPTQ minimises) may rise."""
    weight, inputs, moment = _skewed_problem(seed=2)
    spec = PlaneSpec(4, 32, symmetric)
    damped = moment.hessian + 0.01 * torch.diag(moment.hessian).mean() * torch.eye(weight.shape[1])
    plain = gptq_plane(weight, spec, moment.hessian)
    refitted = gptq_plane(weight, spec, moment.hessian, refit_rounds=2)
    assert torch.all(_row_errors(weight, refitted, damped) <= _row_errors(weight, plain, damped) * (1 + 1e-5))
    reference = inputs @ weight.t()
    assert sqnr_db(reference, inputs @ dequantize_plane(refitted).t()) > sqnr_db(reference, inputs @ dequantize_plane(plain).t()) + 0.1
    # What is stored decodes to exactly what was measured: the refit stays on the stored grids.
    restored = Plane.from_stored(refitted.spec, refitted.stored_tensors())
    assert torch.equal(dequantize_plane(restored), dequantize_plane(refitted))


def test_refit_recovers_the_scales_and_zeros_of_weights_on_a_grid():
    """Given the right codes and wrong parameters, the least-squares refit finds the grid."""
    from tap_convert.gptq import refit_group_parameters

    generator = torch.Generator().manual_seed(5)
    spec = PlaneSpec(4, 32, False, scale_bits=16)
    codes = torch.randint(0, 16, (16, 96), generator=generator).to(torch.uint8)
    scales = (torch.rand(16, 3, generator=generator) * 0.01 + 0.005).to(torch.float16).float()
    zeros = torch.randint(4, 12, (16, 3), generator=generator).float()
    weight = ((codes.float().view(16, 3, 32) - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).view(16, 96)
    mixing = torch.eye(96) + 0.2 * torch.randn(96, 96, generator=generator)
    hessian = mixing @ mixing.t()
    refit = refit_group_parameters(weight, codes, scales * 1.2, zeros + 1.5, spec, hessian, None, damping=1e-6)
    assert refit is not None
    assert torch.allclose(refit[0], scales, rtol=2e-3)
    assert torch.allclose(refit[1], zeros, atol=2e-2)


def test_refit_rounds_are_passed_on_by_gptq_tiers():
    weight, _, moment = _skewed_problem(seed=3)
    specs = (PlaneSpec(4, 32, False), PlaneSpec(4, 32, True))
    tiers = gptq_tiers(weight, specs, moment.hessian, refit_rounds=1)
    assert torch.equal(tiers[0].qweight, gptq_plane(weight, specs[0], moment.hessian, refit_rounds=1).qweight)
    assert torch.equal(tiers[0].scales, gptq_plane(weight, specs[0], moment.hessian, refit_rounds=1).scales)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_descent_sweeps_lower_every_rows_output_error_and_stop_when_settled(symmetric):
    """Each coordinate step takes the best integer code for its row's error with the others
    held, so no row may get worse, and a sweep that moves nothing ends the descent."""
    from tap_convert.gptq import descend_codes
    from tap_runtime.packing import unpack_int4

    weight, inputs, moment = _skewed_problem(seed=4)
    spec = PlaneSpec(4, 32, symmetric)
    damped = moment.hessian + 0.01 * torch.diag(moment.hessian).mean() * torch.eye(weight.shape[1])
    plain = gptq_plane(weight, spec, moment.hessian)
    descended = gptq_plane(weight, spec, moment.hessian, descent_sweeps=3)
    assert torch.equal(descended.scales, plain.scales)  # only the codes move
    assert torch.all(_row_errors(weight, descended, damped) <= _row_errors(weight, plain, damped) * (1 + 1e-5))
    reference = inputs @ weight.t()
    assert sqnr_db(reference, inputs @ dequantize_plane(descended).t()) > sqnr_db(reference, inputs @ dequantize_plane(plain).t()) + 0.05
    codes = unpack_int4(descended.qweight)
    zeros = None if symmetric else descended.zeros.float()
    settled = descend_codes(weight, codes, descended.scales.float(), zeros, spec, damped, sweeps=50)
    again = descend_codes(weight, settled, descended.scales.float(), zeros, spec, damped, sweeps=1)
    assert torch.equal(again, settled)
    assert int(settled.max()) <= 15


def test_descent_sweeps_are_passed_on_by_gptq_tiers():
    weight, _, moment = _skewed_problem(seed=3)
    specs = (PlaneSpec(4, 32, False), PlaneSpec(4, 32, True))
    tiers = gptq_tiers(weight, specs, moment.hessian, descent_sweeps=2)
    assert torch.equal(tiers[0].qweight, gptq_plane(weight, specs[0], moment.hessian, descent_sweeps=2).qweight)
    assert not torch.equal(tiers[0].qweight, gptq_plane(weight, specs[0], moment.hessian).qweight)


@pytest.mark.parametrize("symmetric", [True, False])
def test_static_pass_matches_textbook_gptq(symmetric):
    """The blocked, transposed act-order pass against GPTQ written out column by column, unblocked."""
    from tap_convert.gptq import _inverse_hessian_factor, _static_gptq_pass, _static_group_parameters, scale_reference_for

    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(2048, 256, generator=generator) * torch.linspace(0.2, 2.0, 256)
    hessian = inputs.t() @ inputs / inputs.shape[0]
    weight = torch.randn(48, 256, generator=generator) * 0.05
    spec = PlaneSpec(4, 64, symmetric)
    importance = torch.diag(hessian)
    reference = scale_reference_for(weight, spec)
    scales, zeros = _static_group_parameters(weight, spec, importance, reference)
    order = torch.argsort(torch.diag(hessian), descending=True, stable=True)
    factor = _inverse_hessian_factor(hessian[order][:, order], torch.zeros(256, dtype=torch.bool), 0.01)
    codes = _static_gptq_pass(weight, order, factor, scales, zeros, spec)

    expected = torch.zeros(48, 256, dtype=torch.uint8)
    work = weight[:, order].clone().double()
    upper = factor.double()
    for i, column in enumerate(order.tolist()):
        s, z = scales[:, column // 64].double(), zeros[:, column // 64].double()
        q = torch.clamp(torch.round(work[:, i] / s + z), 0, 15)
        expected[:, column] = q.to(torch.uint8)
        work[:, i + 1 :] -= ((work[:, i] - (q - z) * s) / upper[i, i]).unsqueeze(1) * upper[i, i + 1 :].unsqueeze(0)
    assert (codes == expected).float().mean() > 0.995  # float32 against float64: rare ties may round apart
    assert (codes.int() - expected.int()).abs().max() <= 1


def test_gptq_rows_match_textbook_gptq_across_row_chunks(monkeypatch):
    """The blocked, transposed head pass (several row chunks) against unblocked float64 GPTQ."""
    import tap_convert.gptq as gptq_module
    from tap_convert.gptq import _inverse_hessian_factor

    monkeypatch.setattr(gptq_module, "_ROW_CHUNK", 128)
    generator = torch.Generator().manual_seed(4)
    inputs = torch.randn(2048, 192, generator=generator) * torch.linspace(0.2, 2.0, 192)
    hessian = inputs.t() @ inputs / inputs.shape[0]
    weight = torch.randn(300, 192, generator=generator)
    rows = gptq_rows(weight, hessian, damping=0.1)

    scale = rows.scales.double().clamp_min(1e-8)
    upper = _inverse_hessian_factor(hessian, torch.zeros(192, dtype=torch.bool), 0.1).double()
    work = weight.double().clone()
    expected = torch.empty(300, 192, dtype=torch.int8)
    for i in range(192):
        q = torch.clamp(torch.round(work[:, i] / scale), -127, 127)
        expected[:, i] = q.to(torch.int8)
        work[:, i + 1 :] -= ((work[:, i] - q * scale) / upper[i, i]).unsqueeze(1) * upper[i, i + 1 :].unsqueeze(0)
    assert (rows.qweight == expected).float().mean() > 0.995
    assert (rows.qweight.int() - expected.int()).abs().max() <= 1
