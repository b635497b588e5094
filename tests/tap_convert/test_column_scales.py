import pytest
import torch

from tap_convert.column_scales import choose_column_scales, column_scales_for
from tap_convert.quantize import quantize_rows
from tap_runtime.planes import RowQuantized, dequantize_rows


def _outlier_columns(rows: int = 512, cols: int = 64, seed: int = 0) -> torch.Tensor:
    """Rows whose few large columns set every row's int8 range (gemma-3's embedding shape)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * 0.02
    weight[:, :3] *= 30.0
    return weight


def _relative_error(weight: torch.Tensor, column_scales: torch.Tensor | None) -> float:
    rows = quantize_rows(weight if column_scales is None else weight / column_scales)
    approx = dequantize_rows(RowQuantized(rows.qweight, rows.scales, column_scales))
    return float((weight - approx).pow(2).sum() / weight.pow(2).sum())


def test_outlier_columns_choose_scales_that_cut_the_row_error():
    weight = _outlier_columns()
    exponent, scales, errors = choose_column_scales(weight)
    assert exponent > 0 and scales is not None
    assert errors[exponent] == min(errors.values())
    # The chosen scales cut round-to-nearest row error at least fivefold on this shape.
    assert errors[exponent] < errors[0.0] / 5
    assert _relative_error(weight, scales) == pytest.approx(errors[exponent], rel=1e-4)


def test_even_columns_gain_little_and_never_lose():
    weight = torch.randn(512, 64, generator=torch.Generator().manual_seed(1))
    exponent, _, errors = choose_column_scales(weight)
    assert errors[exponent] <= errors[0.0]


def test_no_scales_at_exponent_zero_and_dead_columns_stay_one():
    weight = _outlier_columns()
    weight[:, 10] = 0.0
    assert column_scales_for(weight, 0.0) is None
    scales = column_scales_for(weight, 1.0)
    assert scales[10] == 1.0
    live = torch.ones(64, dtype=torch.bool)
    live[10] = False
    # Normalised to geometric mean 1 over the live columns, so row scales keep their magnitude.
    assert float(scales[live].log().mean()) == pytest.approx(0.0, abs=1e-5)


def test_a_head_chooses_on_its_output_error():
    weight = _outlier_columns()
    # Inputs that use almost only the outlier columns: their rounding is all the output feels,
    # and plain rows (whose range those columns set) already round them finest.
    inputs = torch.randn(256, 64, generator=torch.Generator().manual_seed(2)) * 1e-3
    inputs[:, :3] = torch.randn(256, 3, generator=torch.Generator().manual_seed(3))
    hessian = inputs.t() @ inputs / inputs.shape[0]
    head_exponent, _, _ = choose_column_scales(weight, hessian)
    lookup_exponent, _, _ = choose_column_scales(weight)
    assert head_exponent < lookup_exponent
