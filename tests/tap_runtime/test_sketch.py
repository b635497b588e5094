import pytest
import torch

from tap_runtime.sketch import SKETCH_RANK, residual_error_sketch


def _layer_residuals(hidden: int = 96, seed: int = 0) -> list[torch.Tensor]:
    # q/k/v-like residual planes with a decaying spectrum, as real ones have.
    generator = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, -2, hidden)
    return [torch.randn(out, hidden, generator=generator) * spectrum for out in (hidden, hidden // 3, hidden // 3)]


def test_sketch_captures_the_top_eigenspace_of_the_residual_gram():
    residuals = _layer_residuals()
    stacked = torch.cat(residuals).to(torch.float64)
    exact = torch.linalg.eigvalsh(stacked.t() @ stacked)[-SKETCH_RANK:].sum()
    sketch = residual_error_sketch(residuals, 96).to(torch.float64)
    assert sketch.shape == (96, SKETCH_RANK)
    # ||P||_F^2 is the energy the sketch keeps: the top-rank eigenvalues' sum, to well under 1%.
    assert sketch.pow(2).sum() == pytest.approx(float(exact), rel=1e-3)


def test_sketch_estimates_each_tokens_error_energy():
    residuals = _layer_residuals()
    stacked = torch.cat(residuals)
    tokens = torch.randn(200, 96)
    true_energy = (tokens @ stacked.t()).pow(2).sum(dim=1)
    estimate = (tokens @ residual_error_sketch(residuals, 96)).pow(2).sum(dim=1)
    assert (estimate <= true_energy * (1 + 1e-4)).all()  # a projection never adds energy
    assert torch.corrcoef(torch.stack([estimate.log(), true_energy.log()]))[0, 1] > 0.95


def test_sketch_is_deterministic_and_needs_no_random_state():
    residuals = _layer_residuals(seed=3)
    torch.manual_seed(1)
    first = residual_error_sketch(residuals, 96)
    torch.manual_seed(2)
    assert torch.equal(first, residual_error_sketch(residuals, 96))


def test_a_layer_without_residual_planes_gets_a_zero_sketch():
    sketch = residual_error_sketch([], 48)
    assert sketch.shape == (48, 1) and not sketch.any()


def test_narrow_layers_keep_at_most_their_width():
    residuals = [torch.randn(8, 16)]
    assert residual_error_sketch(residuals, 16).shape == (16, 8)
