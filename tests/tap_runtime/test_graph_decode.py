"""The graph step decodes and routes as the lean loop does; on CUDA it is captured and replayed."""

from __future__ import annotations

import pytest
import torch

import tap_runtime
from tap_runtime.decode import FastDecoder
from tap_runtime.errors import InvalidConfigError
from tap_runtime.graph_decode import DeviceRouter, GraphDecoder, conditional_nodes_available, graph_decode_unsupported

from ..conftest import decisive_prompt

PROMPT = "The river flows past the old mill and"
ROUTINGS = [("budget", None), ("learned", None), ("fixed", 8), ("fixed", 4)]


def _lean(tap, ids, new_tokens):
    tap.router.begin_sequence()
    tap.router.reset_counts()
    tokens = FastDecoder(tap.model).generate(ids, new_tokens, eos_token_id=[]).token_ids
    return tokens, tap.router.counts.clone(), [list(r) for r in tap.router._budget_rows]


def _graph(tap, ids, new_tokens, capture=False, decoder=None):
    tap.router.begin_sequence()
    tap.router.reset_counts()
    decoder = decoder or GraphDecoder(tap.model, capture=capture)
    tokens = decoder.generate(ids, new_tokens, eos_token_id=[]).token_ids
    return tokens, tap.router.counts.clone(), [list(r) for r in tap.router._budget_rows]


@pytest.mark.parametrize("group_size", [32, 64], ids=["g32-torch-kernel", "g64-vnni-kernel"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: f"{r[0]}{r[1] or ''}")
def test_device_step_decodes_and_routes_as_the_lean_loop(converted_factory, model_type, routing, group_size):
    """Same tokens, same per-layer tier counts, same budget thresholds afterwards (24 new tokens:
    past the tiny Gemma 3's sliding window), with every decision made by tensor ops."""
    tap = tap_runtime.load(converted_factory(model_type, group_size=group_size))
    tap.set_routing(routing[0], tier=routing[1])
    ids, new_tokens = decisive_prompt(tap, 24, 16)
    tokens, counts, rows = _lean(tap, ids, new_tokens)
    got_tokens, got_counts, got_rows = _graph(tap, ids, new_tokens)
    assert got_tokens == tokens
    assert torch.equal(got_counts, counts)
    if routing[0] == "budget":
        assert counts[:, 1:].sum() > 0  # some tokens were routed up, so the branch was taken
        # Budget thresholds are quantiles of recent scores, which the host (native float32
        # features) and the device (float64 tensor ops) compute to about 1e-5.
        torch.testing.assert_close(torch.tensor(got_rows), torch.tensor(rows), rtol=1e-4, atol=1e-6)


def test_device_router_matches_the_host_score(converted_factory):
    """Layer by layer, the device tier equals route_layer's for the same hidden state (the
    default router, sensitivity probe included)."""
    tap = tap_runtime.load(converted_factory("llama"))
    assert "sensitivity" in tap.router._slopes
    tap.set_routing("learned")
    router = tap.router
    device_router = DeviceRouter(router, tap.model.config.hidden_size, torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    agree = 0
    for trial in range(40):
        token, position = trial * 7 % 200, trial
        hidden = torch.randn(1, 1, tap.model.config.hidden_size, generator=generator) * (0.2 + trial / 10)
        router.begin_forward(torch.tensor([[token]]), torch.tensor([[position]]))
        device_router.begin_step(torch.tensor([[token]]), torch.tensor([position]))
        for layer in range(router.num_layers):
            normed = router.input_norms[layer](hidden)
            router.route_layer(layer, hidden, normed)
            host_tier = sum(1 for entry in router.layers[layer].plane_indices if entry is not None)
            agree += int(device_router.tier_index(layer, hidden, normed)) == host_tier
    assert agree == 40 * router.num_layers


def test_stop_ids_end_the_sequence(converted_factory):
    tap = tap_runtime.load(converted_factory("llama"))
    ids = tap.encode(PROMPT)
    greedy = tap.generate(input_ids=ids, max_new_tokens=10, decode="graph", eos_token_id=[])
    assert greedy.metrics.extra["decode_path"] == "graph"
    assert greedy.metrics.extra["graph_branches"] == "eager"
    stop = greedy.token_ids[3]
    stopped = tap.generate(input_ids=ids, max_new_tokens=10, decode="graph", eos_token_id=stop)
    assert stopped.token_ids == greedy.token_ids[: greedy.token_ids.index(stop) + 1]
    # The metrics count only the decisions of tokens decoded before the stop.
    assert sum(stopped.metrics.tier_token_layer_counts.values()) < sum(greedy.metrics.tier_token_layer_counts.values())


def test_requests_the_step_cannot_take_are_refused_with_a_reason(converted_factory):
    tap = tap_runtime.load(converted_factory("llama"))
    router = tap.router
    assert graph_decode_unsupported(tap.model, router, {}, 64, "float") is None
    assert "sampling" in graph_decode_unsupported(tap.model, router, {"do_sample": True}, 64, "float")
    assert "int8" in graph_decode_unsupported(tap.model, router, {}, 64, "int8")
    tap.set_routing("random")
    assert "random" in graph_decode_unsupported(tap.model, router, {}, 64, "float")
    with pytest.raises(InvalidConfigError, match="random"):
        tap.generate(PROMPT, max_new_tokens=4, decode="graph")
    tap.set_routing("budget")
    lean = tap_runtime.load(converted_factory("llama"), memory_efficient=True)
    assert "memory-efficient" in graph_decode_unsupported(lean.model, lean.router, {}, 64, "float")
    # auto on the CPU stays on the lean loop; sampling with decode="graph" is refused.
    assert tap.generate(PROMPT, max_new_tokens=4, eos_token_id=[]).metrics.extra["decode_path"] == "fast"
    with pytest.raises(InvalidConfigError, match="sampl"):
        tap.generate(PROMPT, max_new_tokens=4, decode="graph", do_sample=True)
    with pytest.raises(InvalidConfigError, match="CUDA"):
        GraphDecoder(tap.model, capture=True)
    with pytest.raises(InvalidConfigError, match="residual"):
        GraphDecoder(tap.model, capture=False, residual="sometimes")
    if not conditional_nodes_available():
        with pytest.raises(InvalidConfigError, match="conditional nodes"):
            GraphDecoder(tap.model, capture=False, residual="conditional")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: f"{r[0]}{r[1] or ''}")
def test_cuda_graph_replay_matches_the_eager_step(converted_factory, model_type, routing):
    """Captured once, replayed per token: the eager step's tokens, counts and thresholds, and a
    second sequence through the same graph starts again from the fitted state. Then the masked
    fallback, which must decide the same."""
    tap = tap_runtime.load(converted_factory(model_type), device="cuda", dtype=torch.bfloat16)
    tap.set_routing(routing[0], tier=routing[1])
    ids = tap.encode(PROMPT).to("cuda")
    decoder = GraphDecoder(tap.model, capture=True)
    # The same arithmetic run eagerly: the flag-reading kernel where the graph uses it, else
    # torch's kernel behind a Python branch (as inside a conditional node or times the flag).
    eager = GraphDecoder(tap.model, capture=False, residual="gated" if decoder.residual == "gated" else "eager")
    expected = _graph(tap, ids, 24, decoder=eager)
    first = _graph(tap, ids, 24, decoder=decoder)
    assert decoder.branch_mode == decoder.residual
    assert decoder.residual == ("conditional" if conditional_nodes_available() else "gated")
    again = _graph(tap, ids, 24, decoder=decoder)
    for got in (first, again):
        assert got[0] == expected[0]
        assert torch.equal(got[1], expected[1])
        if routing[0] == "budget":
            torch.testing.assert_close(torch.tensor(got[2]), torch.tensor(expected[2]), rtol=0, atol=1e-9)
    if decoder.residual == "gated":
        expected = _graph(tap, ids, 24, decoder=GraphDecoder(tap.model, capture=False, residual="eager"))
    masked = GraphDecoder(tap.model, capture=True, residual="masked")
    got = _graph(tap, ids, 24, decoder=masked)
    assert masked.branch_mode == "masked"
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_takes_the_graph(converted_factory):
    tap = tap_runtime.load(converted_factory("qwen2"), device="cuda", dtype=torch.bfloat16)
    out = tap.generate(PROMPT, max_new_tokens=8, eos_token_id=[])
    assert out.metrics.extra["decode_path"] == "graph"
    fast = tap.generate(PROMPT, max_new_tokens=8, eos_token_id=[], decode="fast")
    # bfloat16 attention over the whole masked cache (graph) and over the filled slice (lean
    # loop) round differently, so only the first tokens must agree.
    assert out.token_ids[:4] == fast.token_ids[:4]
    assert sum(out.metrics.tier_token_layer_counts.values()) == sum(fast.metrics.tier_token_layer_counts.values())


def test_device_step_decodes_a_layer_error_router_as_the_lean_loop(converted_factory):
    """The default router reads the sensitivity probe (every test above); a checkpoint fitted to
    the layer error has no probe, and the device step still decides as the lean loop."""
    tap = tap_runtime.load(converted_factory("llama", router_target="layer_error"))
    assert "sensitivity" not in tap.router._slopes
    tap.set_routing("budget")
    ids, new_tokens = decisive_prompt(tap, 24, 16)
    tokens, counts, rows = _lean(tap, ids, new_tokens)
    got_tokens, got_counts, got_rows = _graph(tap, ids, new_tokens)
    assert got_tokens == tokens and torch.equal(got_counts, counts)
    assert counts[:, 1:].sum() > 0
    torch.testing.assert_close(torch.tensor(got_rows), torch.tensor(rows), rtol=1e-4, atol=1e-6)  # quantiles of scores
