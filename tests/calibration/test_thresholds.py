import numpy as np
import pytest
import torch

from calibration.capture import TokenSignals
from calibration.thresholds import fit_router, roc_auc, tier_shares


def _signals(num_layers=3, windows=8, seq=200, seed=0) -> TokenSignals:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_layers, windows, seq, generator=generator)
    noise = torch.randn(num_layers, windows, seq, generator=generator) * 0.3
    return TokenSignals(
        token_ids=torch.randint(0, 50, (windows, seq), generator=generator),
        position=torch.log1p(torch.arange(seq, dtype=torch.float32)).expand(windows, seq).clone(),
        predictive_entropy=torch.rand(windows, seq, generator=generator),
        hidden_norm=hidden,
        attention_received=torch.rand(num_layers, windows, seq, generator=generator),
        base_error=torch.exp(hidden + noise),  # error grows with the hidden norm
    )


def test_router_learns_the_predictive_signal_and_hits_the_share():
    signals = _signals()
    spec = fit_router(signals, torch.zeros(50), (4, 8), share=0.1)
    assert spec.weights["hidden_norm"] > 5 * max(abs(spec.weights["position"]), abs(spec.weights["token_frequency"]))
    assert spec.fit["holdout"]["auc"] > 0.9
    assert spec.fit["holdout"]["precision_at_share"] > 0.5
    assert spec.fit["single_signal_auc"]["hidden_norm"] > 0.9
    assert set(spec.excluded_signals) == {"attention_received", "predictive_entropy", "loss_gradient"}
    # Thresholds are the per-layer 90% quantile of the score over the calibration tokens.
    scores = spec.bias + spec.weights["hidden_norm"] * (
        (signals.hidden_norm.numpy() - np.array(spec.normalisation["hidden_norm"]["layer_mean"])[:, None, None])
        / np.array(spec.normalisation["hidden_norm"]["layer_std"])[:, None, None]
    )
    shares = [(scores[layer] >= spec.thresholds[layer][0]).mean() for layer in range(3)]
    assert shares == pytest.approx([0.1] * 3, abs=0.03)


def test_three_tiers_get_nested_shares():
    assert tier_shares((4, 8, 16), 0.1) == {"8": 0.1, "16": 0.025}
    spec = fit_router(_signals(), torch.zeros(50), (4, 8, 16), share=0.1)
    assert all(low < high for low, high in spec.thresholds)


def test_auc():
    assert roc_auc(np.array([0.1, 0.2, 0.9, 0.8]), np.array([0, 0, 1, 1])) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([0, 0, 1, 1])) == 0.0
    assert np.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_loss_impact_target_follows_the_impact_not_the_layer_error():
    signals = _signals()
    generator = torch.Generator().manual_seed(5)
    # The loss impact tracks position here (late tokens matter), the layer error tracks hidden norm.
    impact = signals.position.expand(3, -1, -1) + 0.1 * torch.randn(signals.hidden_norm.shape, generator=generator)
    impact[:, :, -1] = float("nan")  # no loss gradient at the window's last position
    signals.loss_impact = impact
    signals.loss_gradient = impact.clone()
    spec = fit_router(signals, torch.zeros(50), (4, 8), share=0.1, target="loss_impact")
    assert spec.fit["target_name"] == "loss_impact"
    assert abs(spec.weights["position"]) > abs(spec.weights["hidden_norm"])
    assert spec.fit["single_signal_auc"]["loss_gradient"] > 0.9  # measured, reported, not used
    assert "loss_gradient" not in spec.signals


def test_unknown_or_uncollected_target_is_refused():
    with pytest.raises(ValueError, match="router target 'oracle' is unknown"):
        fit_router(_signals(), torch.zeros(50), (4, 8), share=0.1, target="oracle")
    with pytest.raises(ValueError, match="needs the loss-gradient pass"):
        fit_router(_signals(), torch.zeros(50), (4, 8), share=0.1, target="loss_impact")


def test_kl_impact_target_needs_the_base_tier_pass_and_uses_the_sensitivity():
    signals = _signals()
    generator = torch.Generator().manual_seed(6)
    sensitivity = torch.randn(signals.hidden_norm.shape, generator=generator)
    signals.loss_impact = 2.0 * sensitivity + 0.2 * torch.randn(signals.hidden_norm.shape, generator=generator)
    with pytest.raises(ValueError, match="needs the calibration pass at the base tier"):
        fit_router(signals, torch.zeros(50), (4, 8), share=0.1, target="kl_impact")
    signals.at_base_tier = True
    signals.sensitivity = sensitivity
    spec = fit_router(signals, torch.zeros(50), (4, 8), share=0.1, target="kl_impact")
    assert spec.fit["target_name"] == "kl_impact" and "sensitivity_probe" in spec.fit
    assert "sensitivity" in spec.signals
    assert spec.weights["sensitivity"] > 3 * abs(spec.weights["hidden_norm"])
    assert spec.fit["holdout"]["auc"] > 0.9
    assert len(spec.normalisation["sensitivity"]["layer_mean"]) == 3
