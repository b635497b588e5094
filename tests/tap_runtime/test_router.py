from dataclasses import replace

import pytest
import torch

from tap_runtime.errors import InvalidConfigError
from tap_runtime.format import RouterSpec
from tap_runtime.kernels.native import native_kernels
from tap_runtime.router import ALL_TOKENS, TokenRouter, hidden_norm_feature


def _router(num_layers=2, tiers=(4, 8), thresholds=None, weight=1.0) -> TokenRouter:
    spec = RouterSpec(
        signals=("hidden_norm",),
        normalisation={"hidden_norm": {"transform": "log_rms", "layer_mean": [0.0] * num_layers, "layer_std": [1.0] * num_layers}},
        weights={"hidden_norm": weight},
        bias=0.0,
        thresholds=thresholds or tuple((0.0,) * (len(tiers) - 1) for _ in range(num_layers)),
        tier_shares={str(t): 0.1 / 4**k for k, t in enumerate(tiers[1:])},
    )
    return TokenRouter(spec, tiers, num_layers, token_log_frequency=None)


def _hidden(tokens=4000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(1, tokens, 1, generator=generator))
    return torch.randn(1, tokens, 32, generator=generator) * scales


def test_thresholds_at_the_calibration_quantile_send_the_requested_share():
    hidden = _hidden()
    scores = hidden_norm_feature(hidden).reshape(-1)
    threshold = float(torch.quantile(scores, 0.9))
    router = _router(num_layers=1, thresholds=((threshold,),))
    router.begin_forward(None, None)
    router.route_layer(0, _hidden(seed=1))  # fresh tokens from the same distribution
    share = router.counts[0, 1].item() / router.counts[0].sum().item()
    assert share == pytest.approx(0.1, abs=0.02)


def test_higher_score_means_higher_tier_and_indices_are_the_routed_tokens():
    router = _router(num_layers=1, thresholds=((0.0,),))
    hidden = torch.stack([torch.full((8,), 0.1), torch.full((8,), 10.0), torch.full((8,), 0.2)]).unsqueeze(0)
    router.route_layer(0, hidden)
    assert router.layers[0].indices_for_plane(1).tolist() == [1]
    assert router.tier_counts() == {4: 2, 8: 1}


def test_nested_tiers_use_one_score():
    router = _router(num_layers=1, tiers=(4, 8, 16), thresholds=((0.0, 1.0),))
    hidden = torch.stack([torch.full((8,), v) for v in (0.5, 1.5, 5.0)]).unsqueeze(0)
    router.route_layer(0, hidden)
    assert router.layers[0].indices_for_plane(1).tolist() == [1, 2]
    assert router.layers[0].indices_for_plane(2).tolist() == [2]


def test_fixed_mode_routes_everyone():
    router = _router()
    router.set_mode("fixed", tier=8)
    router.route_layer(0, _hidden(tokens=10))
    assert router.layers[0].indices_for_plane(1) is ALL_TOKENS
    router.set_mode("fixed", tier=4)
    router.route_layer(1, _hidden(tokens=10))
    assert router.layers[1].indices_for_plane(1) is None


def test_random_mode_uses_the_share_and_is_seeded():
    router = _router(num_layers=1)
    router.set_mode("random", shares=(0.25,), seed=3)
    router.route_layer(0, _hidden(tokens=8000))
    first = router.layers[0].indices_for_plane(1).clone()
    assert first.numel() / 8000 == pytest.approx(0.25, abs=0.02)
    router.set_mode("random", shares=(0.25,), seed=3)
    router.route_layer(0, _hidden(tokens=8000))
    assert torch.equal(first, router.layers[0].indices_for_plane(1))


def test_invalid_modes_are_refused():
    router = _router()
    with pytest.raises(InvalidConfigError, match="routing mode 'smart' is unknown"):
        router.set_mode("smart")
    with pytest.raises(InvalidConfigError, match="fixed tier 16 is not in this checkpoint"):
        router.set_mode("fixed", tier=16)
    with pytest.raises(InvalidConfigError, match="random shares"):
        router.set_mode("random", shares=(1.5,))


def test_topk_mode_routes_exactly_the_share_by_the_chosen_score():
    router = _router(num_layers=1)
    router.set_mode("topk", shares=(0.2,), score="hidden_norm", sign=1.0)
    hidden = torch.stack([torch.full((8,), float(v)) for v in range(1, 11)]).unsqueeze(0)
    router.begin_forward(None, torch.arange(10).unsqueeze(0))
    router.route_layer(0, hidden)
    assert router.layers[0].indices_for_plane(1).tolist() == [8, 9]  # the two largest norms
    router.set_mode("topk", shares=(0.2,), score="hidden_norm", sign=-1.0)
    router.route_layer(0, hidden)
    assert router.layers[0].indices_for_plane(1).tolist() == [0, 1]
    with pytest.raises(InvalidConfigError, match="topk score 'entropy' is unknown"):
        router.set_mode("topk", shares=(0.2,), score="entropy")


def test_single_token_fast_path_decides_as_the_batch_path():
    """Decode (one token per pass) takes a scalar path; its tiers must equal the batched ones."""
    spec = RouterSpec(
        signals=("hidden_norm", "error_estimate"),
        normalisation={
            "hidden_norm": {"transform": "log_rms", "layer_mean": [0.3, -0.2], "layer_std": [1.5, 0.7]},
            "error_estimate": {"transform": "log_sketched_base_error", "layer_mean": [1.0, 2.0], "layer_std": [2.0, 3.0]},
        },
        weights={"hidden_norm": 1.3, "error_estimate": 0.8},
        bias=-0.4,
        thresholds=((0.1, 0.9), (-0.2, 0.5)),
        tier_shares={"8": 0.1, "16": 0.025},
    )
    hidden = _hidden(tokens=300, seed=3)
    sketches = [torch.randn(32, 4, generator=torch.Generator().manual_seed(i)).half() for i in range(2)]
    norms = [torch.nn.LayerNorm(32) for _ in range(2)]

    def make() -> TokenRouter:
        router = TokenRouter(spec, (4, 8, 16), 2, token_log_frequency=None, error_sketches=list(sketches))
        router.input_norms = norms
        router.set_mode("learned")  # fixed thresholds: budget mode's would move between the two paths
        return router

    for layer in range(2):
        batched = make()
        batched.route_layer(layer, hidden)
        single = make()
        tiers = []
        for t in range(hidden.shape[1]):
            single.route_layer(layer, hidden[:, t : t + 1])
            plane1, plane2 = single.layers[layer].indices_for_plane(1), single.layers[layer].indices_for_plane(2)
            tiers.append((plane1 is ALL_TOKENS) + (plane2 is ALL_TOKENS))
        expected = [0] * hidden.shape[1]
        for level in (1, 2):
            indices = batched.layers[layer].indices_for_plane(level)
            for i in ([] if indices is None else range(hidden.shape[1]) if indices is ALL_TOKENS else indices.tolist()):
                expected[i] += 1
        assert tiers == expected and torch.equal(single.counts, batched.counts)
        assert 0 < sum(tiers) < 2 * hidden.shape[1]


@pytest.mark.skipif(native_kernels() is None, reason="TAP's native CPU kernels are unavailable here")
def test_single_token_score_is_the_same_from_the_native_module(monkeypatch):
    """Decode's one native call for both signals scores a token as the torch operators do."""
    spec = RouterSpec(
        signals=("hidden_norm", "error_estimate"),
        normalisation={
            "hidden_norm": {"transform": "log_rms", "layer_mean": [0.3], "layer_std": [1.5]},
            "error_estimate": {"transform": "log_sketched_base_error", "layer_mean": [1.0], "layer_std": [2.0]},
        },
        weights={"hidden_norm": 1.3, "error_estimate": 0.8},
        bias=-0.4,
        thresholds=((0.1,),),
        tier_shares={"8": 0.1},
    )
    router = TokenRouter(spec, (4, 8), 1, token_log_frequency=None, error_sketches=[torch.randn(32, 4).half()])
    norm = torch.nn.LayerNorm(32)
    hidden = _hidden(tokens=50, seed=4)
    for t in range(hidden.shape[1]):
        token = hidden[:, t : t + 1].contiguous()
        normed = norm(token).detach()
        assert router._native_decode_features(0, token, normed) is not None
        native = router._decode_score(0, token, normed)
        with monkeypatch.context() as patch:
            patch.setattr("tap_runtime.router.native_kernels", lambda: None)
            assert router._native_decode_features(0, token, normed) is None
            assert native == pytest.approx(router._decode_score(0, token, normed), rel=1e-5, abs=1e-6)


def test_budget_mode_holds_the_share_when_the_text_shifts():
    """Scores shifted far above calibration: learned routing over-spends, budget mode does not."""
    scores = hidden_norm_feature(_hidden(tokens=4000)).reshape(-1)
    threshold = float(torch.quantile(scores, 0.9))
    shifted = _hidden(tokens=3000, seed=7) * 3.0  # log-rms up by log(3): far more tokens pass
    learned = _router(num_layers=1, thresholds=((threshold,),))
    learned.set_mode("learned")
    for t in range(1000):
        learned.route_layer(0, shifted[:, t : t + 1])
    learned_share = learned.counts[0, 1].item() / 1000
    budget = _router(num_layers=1, thresholds=((threshold,),))
    budget.set_mode("budget", shares=(0.1,))
    budget.route_layer(0, shifted[:, :512])  # prefill: exactly the top 10%
    assert budget.counts[0, 1].item() == round(0.1 * 512)
    budget.reset_counts()
    for t in range(512, 3000):  # decode, one token at a time
        budget.route_layer(0, shifted[:, t : t + 1])
    budget_share = budget.counts[0, 1].item() / 2488
    assert learned_share > 0.3
    assert budget_share == pytest.approx(0.1, abs=0.03)


def test_budget_mode_holds_the_share_over_a_short_generation_that_scores_lower_than_its_prompt():
    """A model's own generation scores lower than the prompt it read (Qwen2.5-1.5B: 2.4% routed
    over 128 tokens under the old fixed-step controller). The window of decode scores, with the
    running deficit, holds the share from its tenth score on."""
    router = _router(num_layers=1)
    router.set_mode("budget", shares=(0.1,))
    router.route_layer(0, _hidden(tokens=32, seed=3) * 4.0)  # prefill: exactly its top 10%
    assert router.counts[0, 1].item() == round(0.1 * 32)
    router.reset_counts()
    generated = _hidden(tokens=128, seed=9) * 0.25  # log-rms down by log 16 against the prompt
    routed = []
    for t in range(128):
        router.route_layer(0, generated[:, t : t + 1])
        routed.append(router.layers[0].indices_for_plane(1) is ALL_TOKENS)
    assert sum(routed[:10]) == 0  # the prompt's cut until the window holds 1 / share scores
    assert sum(routed[10:]) / 118 == pytest.approx(0.1, abs=0.04)


def test_budget_mode_holds_the_share_while_decode_scores_keep_falling():
    """A greedy repetition loop: each repeat scores a little lower than the last, so the newest
    score sits below the window's quantile. The running deficit keeps the share."""
    router = _router(num_layers=1)
    router.set_mode("budget", shares=(0.1,))
    router.route_layer(0, _hidden(tokens=32, seed=3))
    router.reset_counts()
    loop = _hidden(tokens=16, seed=5)
    for t in range(256):  # the same 16 tokens again and again, each pass 3% smaller
        router.route_layer(0, loop[:, t % 16 : t % 16 + 1] * 0.97 ** (t // 16))
    assert router.counts[0, 1].item() / 256 == pytest.approx(0.1, abs=0.03)


def test_budget_window_quantile_deficit_and_limits():
    import numpy as np

    from tap_runtime.budget import BUDGET_HORIZON, BUDGET_WINDOW, BudgetWindow, effective_share, min_scores, window_quantile

    scores = torch.randn(400, generator=torch.Generator().manual_seed(4)).tolist()
    assert window_quantile(sorted(scores[:100]), 0.1) == pytest.approx(np.quantile(scores[:100], 0.9), abs=1e-12)
    assert window_quantile([1.0, 2.0], 0.0) == float("inf") and window_quantile([1.0, 2.0], 1.0) == float("-inf")
    assert (min_scores(0.1), min_scores(0.025), min_scores(0.004)) == (10, 40, BUDGET_WINDOW)
    assert effective_share(0.1, 50, 2.0) == pytest.approx(0.1 + 3.0 / BUDGET_HORIZON)  # 3 tokens behind
    assert effective_share(0.1, 10, 9.0) == 0.0 and effective_share(0.1, 400, 0.0) == 1.0  # within [0, 1]
    window = BudgetWindow((0.5, 0.7), (0.1, 0.025))
    for score in scores:  # decided as the router does: on the thresholds before the score
        window.add(score, sum(score >= t for t in window.thresholds))
    last = scores[-BUDGET_WINDOW:]
    assert list(window.recent) == last and window.ordered == sorted(last) and window.decoded == 400
    asked = [window_quantile(window.ordered, effective_share(s, window.decoded, window.routed[k])) for k, s in enumerate(window.shares)]
    assert window.thresholds == [asked[0], max(asked)]  # nested: the top tier never asks less
    assert window.routed[0] / 400 == pytest.approx(0.1, abs=0.02)
    assert window.routed[1] / 400 == pytest.approx(0.025, abs=0.01)
    fresh = BudgetWindow((0.5, 0.7), (0.1, 0.025))
    for score in scores[:39]:
        fresh.add(score, 0)
    assert fresh.thresholds[1] == 0.7  # 39 scores cannot rank a 2.5% share yet
    fresh.replace(scores[:150], 150, [15.0, 3.75])  # on budget: the window's plain quantiles
    kept = scores[150 - BUDGET_WINDOW : 150]
    assert fresh.thresholds == pytest.approx([np.quantile(kept, 0.9), np.quantile(kept, 0.975)])


def test_modes_without_shares_use_the_fitted_shares_not_the_last_ones():
    router = _router(num_layers=1)
    router.set_mode("random", shares=(0.7,))
    router.set_mode("budget")
    assert router.random_shares == (0.1,)


def test_single_token_static_score_matches_the_batch_one():
    """Position and token-frequency terms: scalar arithmetic in decode, tensors in a batch."""
    spec = RouterSpec(
        signals=("hidden_norm", "position", "token_frequency"),
        normalisation={
            "hidden_norm": {"transform": "log_rms", "layer_mean": [0.1], "layer_std": [1.2]},
            "position": {"transform": "log1p", "mean": 3.0, "std": 1.5},
            "token_frequency": {"transform": "log_frequency", "mean": -8.0, "std": 2.0},
        },
        weights={"hidden_norm": 0.9, "position": -0.7, "token_frequency": -0.5},
        bias=0.2,
        thresholds=((0.4,),),
        tier_shares={"8": 0.1},
    )
    frequency = torch.log(torch.rand(50, generator=torch.Generator().manual_seed(1)) * 1e-3 + 1e-6)
    hidden = _hidden(tokens=120, seed=5)
    ids = torch.randint(0, 60, (1, 120), generator=torch.Generator().manual_seed(2))  # some beyond the table
    positions = torch.arange(120).unsqueeze(0)
    batched = TokenRouter(spec, (4, 8), 1, token_log_frequency=frequency)
    batched.set_mode("learned")  # fixed thresholds: the two paths must agree token by token
    batched.begin_forward(ids, positions)
    batched.route_layer(0, hidden)
    single = TokenRouter(spec, (4, 8), 1, token_log_frequency=frequency)
    single.set_mode("learned")
    for t in range(120):
        single.begin_forward(ids[:, t : t + 1], positions[:, t : t + 1])
        single.route_layer(0, hidden[:, t : t + 1])
    assert torch.equal(single.counts, batched.counts)
    assert 0 < int(batched.counts[0, 1]) < 120


def test_default_routing_holds_the_share_and_restarts_per_sequence():
    """The default is budget mode; each sequence starts again from the fitted thresholds."""
    scores = hidden_norm_feature(_hidden(tokens=4000)).reshape(-1)
    threshold = float(torch.quantile(scores, 0.9))
    router = _router(num_layers=1, thresholds=((threshold,),))
    assert router.mode == "budget"
    shifted = _hidden(tokens=200, seed=7) * 3.0

    def one_sequence() -> list[int]:
        router.begin_sequence()
        tiers = []
        for t in range(200):
            router.route_layer(0, shifted[:, t : t + 1])
            tiers.append(int(router.layers[0].indices_for_plane(1) is ALL_TOKENS))
        return tiers

    first = one_sequence()
    assert router._budget_rows[0][0] > threshold  # the shifted text pushed the threshold up
    assert one_sequence() == first


def _sensitivity_spec(num_layers: int) -> RouterSpec:
    return RouterSpec(
        signals=("hidden_norm", "error_estimate", "sensitivity"),
        normalisation={
            "hidden_norm": {"transform": "log_rms", "layer_mean": [0.3, -0.2][:num_layers], "layer_std": [1.5, 0.7][:num_layers]},
            "error_estimate": {"transform": "log_sketched_base_error", "layer_mean": [1.0, 2.0][:num_layers], "layer_std": [2.0, 3.0][:num_layers]},
            "sensitivity": {"transform": "normed_input_dot_probe", "layer_mean": [0.1, -0.3][:num_layers], "layer_std": [0.8, 1.2][:num_layers]},
        },
        weights={"hidden_norm": 0.4, "error_estimate": 0.3, "sensitivity": 1.5},
        bias=-0.4,
        thresholds=((0.1,), (-0.2,))[:num_layers],
        tier_shares={"8": 0.1},
    )


def test_sensitivity_signal_decides_alike_in_decode_and_in_a_batch():
    """The probe's dot product joins the score in the scalar decode path as in the batch path."""
    spec = _sensitivity_spec(2)
    hidden = _hidden(tokens=300, seed=5)
    sketches = [torch.randn(32, 4, generator=torch.Generator().manual_seed(i)).half() for i in range(2)]
    probes = [torch.randn(32, generator=torch.Generator().manual_seed(10 + i)) for i in range(2)]
    norms = [torch.nn.LayerNorm(32) for _ in range(2)]

    def make() -> TokenRouter:
        router = TokenRouter(spec, (4, 8), 2, token_log_frequency=None, error_sketches=list(sketches), sensitivity_probes=probes)
        router.input_norms = norms
        router.set_mode("learned")
        return router

    for layer in range(2):
        batched = make()
        batched.route_layer(layer, hidden)
        indices = batched.layers[layer].indices_for_plane(1)
        expected = torch.zeros(hidden.shape[1], dtype=torch.bool)
        expected[indices] = True
        single = make()
        decided = []
        for t in range(hidden.shape[1]):
            token = hidden[:, t : t + 1].contiguous()
            single.route_layer(layer, token, norms[layer](token).detach())
            decided.append(single.layers[layer].indices_for_plane(1) is ALL_TOKENS)
        assert torch.equal(torch.tensor(decided), expected)
        assert 0 < int(expected.sum()) < hidden.shape[1]
    # The probe matters: with its weight at zero the same router routes other tokens.
    with_probe = make()
    with_probe.route_layer(0, hidden)
    spec_without = replace(spec, weights={**spec.weights, "sensitivity": 0.0})
    without = TokenRouter(spec_without, (4, 8), 2, token_log_frequency=None, error_sketches=list(sketches), sensitivity_probes=probes)
    without.input_norms = norms
    without.set_mode("learned")
    without.route_layer(0, hidden)
    assert not torch.equal(with_probe.layers[0].indices_for_plane(1), without.layers[0].indices_for_plane(1))


@pytest.mark.skipif(native_kernels() is None, reason="TAP's native CPU kernels are unavailable here")
def test_sensitivity_signal_scores_alike_with_and_without_the_native_module(monkeypatch):
    spec = _sensitivity_spec(1)
    router = TokenRouter(
        spec, (4, 8), 1, token_log_frequency=None, error_sketches=[torch.randn(32, 4).half()], sensitivity_probes=[torch.randn(32)]
    )
    norm = torch.nn.LayerNorm(32)
    hidden = _hidden(tokens=50, seed=6)
    for t in range(hidden.shape[1]):
        token = hidden[:, t : t + 1].contiguous()
        normed = norm(token).detach()
        features = router._native_decode_features(0, token, normed)
        assert len(features) == 3  # the probe's dot product comes from the same native call
        assert features[2] == pytest.approx(float(normed.reshape(-1) @ router.sensitivity_probes[0]), rel=1e-5, abs=1e-5)
        native = router._decode_score(0, token, normed)
        with monkeypatch.context() as patch:
            patch.setattr("tap_runtime.router.native_kernels", lambda: None)
            assert native == pytest.approx(router._decode_score(0, token, normed), rel=1e-5, abs=1e-5)


def test_a_router_reading_the_sensitivity_without_probes_is_refused():
    router = TokenRouter(_sensitivity_spec(1), (4, 8), 1, token_log_frequency=None, error_sketches=[torch.randn(32, 4)])
    router.input_norms = [torch.nn.LayerNorm(32)]
    router.set_mode("learned")
    with pytest.raises(InvalidConfigError, match="no probe vectors"):
        router.route_layer(0, _hidden(tokens=20))
