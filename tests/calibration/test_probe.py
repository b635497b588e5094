"""The sensitivity probe: a ridge fit that finds a planted direction, ignores the held-out
windows, and gives the values the runtime's own feature computes."""

import pytest
import torch

from calibration.capture import TokenSignals
from calibration.probe import add_sensitivity, fit_sensitivity_probes, holdout_windows
from tap_runtime.router import sensitivity_feature


def _signals(num_layers=2, windows=8, seq=128, hidden=24, seed=0) -> tuple[TokenSignals, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    normed = torch.randn(num_layers, windows, seq, hidden, generator=generator) * torch.linspace(0.5, 2.0, hidden)
    directions = torch.randn(num_layers, hidden, generator=generator)
    impact = torch.einsum("lwsh,lh->lws", normed, directions) + 0.3 * torch.randn(num_layers, windows, seq, generator=generator)
    zeros = torch.zeros(num_layers, windows, seq)
    signals = TokenSignals(
        token_ids=torch.zeros(windows, seq, dtype=torch.long),
        position=torch.zeros(windows, seq),
        predictive_entropy=torch.zeros(windows, seq),
        hidden_norm=zeros,
        attention_received=zeros,
        base_error=zeros,
        loss_impact=impact - 5.0,
        at_base_tier=True,
        normed_inputs=normed.to(torch.bfloat16),
    )
    return signals, directions


def test_the_probe_finds_a_planted_direction():
    signals, directions = _signals()
    probes = fit_sensitivity_probes(signals)
    assert len(probes) == 2 and probes[0].shape == (24,)
    for probe, direction in zip(probes, directions):
        assert torch.nn.functional.cosine_similarity(probe, direction, dim=0) > 0.98
        assert float(probe.norm() / direction.norm()) == pytest.approx(1.0, abs=0.05)


def test_held_out_windows_do_not_move_the_probe():
    signals, _ = _signals()
    held = holdout_windows(8)
    assert held == 2
    changed, _ = _signals()
    changed.loss_impact[:, -held:] = torch.randn(changed.loss_impact[:, -held:].shape) * 100
    for a, b in zip(fit_sensitivity_probes(signals), fit_sensitivity_probes(changed)):
        assert torch.equal(a, b)


def test_sensitivity_values_are_the_runtime_feature():
    signals, _ = _signals()
    probes = fit_sensitivity_probes(signals)
    with_values = add_sensitivity(signals, probes)
    assert with_values.sensitivity.shape == (2, 8, 128)
    expected = sensitivity_feature(signals.normed_inputs[1, 3], probes[1])
    torch.testing.assert_close(with_values.sensitivity[1, 3], expected)


def test_a_pass_without_normed_inputs_is_refused():
    signals, _ = _signals()
    signals.normed_inputs = None
    with pytest.raises(ValueError, match="needs the normed inputs"):
        fit_sensitivity_probes(signals)
