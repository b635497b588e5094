"""The one-kernel router decision (Triton; without a GPU, run by Triton's CPU interpreter)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Before Triton is first imported: its language library is built for the interpreter then.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tap_runtime
from tap_runtime.graph_decode import DeviceRouter, GraphDecoder

triton = pytest.importorskip("triton", reason="Triton is optional (CUDA builds of torch ship it)")


@pytest.fixture
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter was not switched on before Triton was imported")
    return torch.device("cpu")


@pytest.mark.parametrize("mode", ["learned", "budget"])
def test_fused_decision_matches_the_tensor_ops(converted_factory, device, mode):
    """Same score (to float32 rounding of the norms), tier, flags, budget thresholds and counts."""
    # The kernel reads the norm and the error sketch; a probe router keeps tensor ops (use_fused_kernel).
    tap = tap_runtime.load(converted_factory("llama", router_target="layer_error"), device=device)
    tap.set_routing(mode)
    hidden_size = tap.model.config.hidden_size
    plain = DeviceRouter(tap.router, hidden_size, device)
    fused = DeviceRouter(tap.router, hidden_size, device)
    fused.use_fused_kernel()
    assert fused.fused and not plain.fused
    generator = torch.Generator().manual_seed(3)
    routed = 0
    for trial in range(24):
        token = torch.tensor([[trial * 11 % 250]], device=device)
        position = torch.tensor([trial + 3], device=device)
        hidden = (torch.randn(1, 1, hidden_size, generator=generator) * 10 ** (trial / 6 - 2)).to(device)
        for router in (plain, fused):
            router.begin_step(token, position)
        for layer in range(tap.router.num_layers):
            normed = tap.router.input_norms[layer](hidden)
            want = plain.flags(layer, hidden, normed, as_int=True)
            got = fused.flags(layer, hidden, normed, as_int=True)
            routed += int(want[0])
            assert [int(f) for f in got] == [int(f) for f in want], (trial, layer)
    torch.testing.assert_close(fused.thresholds, plain.thresholds, rtol=1e-5, atol=1e-7)  # budget: quantiles of the scores
    assert torch.equal(fused.counts, plain.counts)
    assert 0 < routed < 24 * tap.router.num_layers  # both outcomes were exercised


def test_fused_scores_agree_with_the_host_router(converted_factory, device):
    # The kernel reads the norm and the error sketch; a probe router keeps tensor ops (use_fused_kernel).
    tap = tap_runtime.load(converted_factory("llama", router_target="layer_error"), device=device)
    tap.set_routing("learned")
    router = DeviceRouter(tap.router, tap.model.config.hidden_size, device)
    router.use_fused_kernel()
    hidden = torch.randn(1, 1, tap.model.config.hidden_size, generator=torch.Generator().manual_seed(5)).to(device)
    tap.router.begin_forward(torch.tensor([[17]]), torch.tensor([[4]]))
    router.begin_step(torch.tensor([[17]], device=device), torch.tensor([4], device=device))
    for layer in range(tap.router.num_layers):
        normed = tap.router.input_norms[layer](hidden)
        router.flags(layer, hidden, normed, as_int=True)
        expected = tap.router._decode_score(layer, hidden, normed)
        assert abs(float(router.scores[layer]) - expected) < 1e-5 * max(1.0, abs(expected))


def test_graph_step_with_the_fused_router_decodes_as_the_lean_loop(converted_factory):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU interpreter check (the CUDA tests cover the captured step)")
    from tap_runtime.decode import FastDecoder

    tap = tap_runtime.load(converted_factory("qwen2"), kernel="cpu-packed", keep_portable=True)
    ids = tap.encode("The river flows past the old mill and")
    results = []
    for decoder in (FastDecoder(tap.model), GraphDecoder(tap.model, capture=False, residual="gated", fused_router=True)):
        tap.router.begin_sequence()
        tap.router.reset_counts()
        tokens = decoder.generate(ids, 16, eos_token_id=[]).token_ids
        results.append((tokens, tap.router.counts.clone()))
    assert results[1][0] == results[0][0]
    assert torch.equal(results[1][1], results[0][1]) and results[0][1][:, 1:].sum() > 0
