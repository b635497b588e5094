"""Where prefill time goes, and how far above HF fp32 a bfloat16-GEMM prefill can get on this CPU.

TAP's prefill (many tokens per call) unpacks each plane into a transient bfloat16 matrix and
multiplies densely; the routed tokens' residual planes take a second, smaller product. So its
linears can at best run at the machine's bfloat16 GEMM rate, and the rest of the forward
(attention, norms, activations) is the same float32 work HF does. This script measures, in one
process and alternating the rows: each forward's total time and the part spent in linear layers
(HF: nn.Linear calls; TAP: every plane product, dequantization and routed gather included), and
prints the ratio to HF fp32 that TAP would reach if its linears ran at HF bf16's linear speed.

    python scripts/bench_prefill_ceiling.py --model models/qwen1.5b --tap models/qwen1.5b-tap-v4
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import tap_runtime
from tap_runtime import layers as tap_layers
from bench_common import environment, heldout_text, set_threads


class LinearClock:
    """Seconds spent inside the timed calls since the last reset."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started: list[float] = []

    def before(self, *_args) -> None:
        self._started.append(time.perf_counter())

    def after(self, *_args) -> None:
        self.seconds += time.perf_counter() - self._started.pop()


def clock_hf_linears(model: nn.Module) -> LinearClock:
    clock = LinearClock()
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not model.get_output_embeddings():
            module.register_forward_pre_hook(clock.before)
            module.register_forward_hook(clock.after)
    return clock


def clock_tap_planes() -> LinearClock:
    """Times every TapLinear's plane products (tap_runtime.layers.run_planes, looked up per call)."""
    clock = LinearClock()
    run_planes = tap_layers.run_planes

    def timed(*args, **kwargs):
        clock.before()
        try:
            return run_planes(*args, **kwargs)
        finally:
            clock.after()

    tap_layers.run_planes = timed
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the fp32 source model directory")
    parser.add_argument("--tap", required=True)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = torch.tensor(tokenizer(heldout_text("wikitext"), add_special_tokens=False)["input_ids"][: args.tokens]).unsqueeze(0)

    fp32 = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    tap = tap_runtime.load(args.tap)
    clocks = {"hf-fp32": clock_hf_linears(fp32), "hf-bf16": clock_hf_linears(bf16)}
    clocks["tap-base"] = clocks["tap-budget"] = clock_tap_planes()

    def routed(mode: str) -> Callable[[], None]:
        def run() -> None:
            if mode == "base":
                tap.set_routing("fixed", tier=tap.table.tiers[0])
            else:
                tap.set_routing(mode)
            tap.router.reset_counts()
            tap.model(ids, use_cache=False, logits_to_keep=1)
        return run

    rows: dict[str, Callable[[], None]] = {
        "hf-fp32": lambda: fp32(ids, use_cache=False, logits_to_keep=1),
        "hf-bf16": lambda: bf16(ids, use_cache=False, logits_to_keep=1),
        "tap-base": routed("base"),
        "tap-budget": routed("budget"),
    }
    totals: dict[str, list[float]] = {name: [] for name in rows}
    linear: dict[str, list[float]] = {name: [] for name in rows}
    with torch.inference_mode():
        for round_index in range(args.rounds + 1):
            for name, run in rows.items():
                clocks[name].seconds = 0.0
                tick = time.perf_counter()
                run()
                elapsed = time.perf_counter() - tick
                if round_index:  # round 0 warms up
                    totals[name].append(elapsed)
                    linear[name].append(clocks[name].seconds)

    median = {name: statistics.median(v) for name, v in totals.items()}
    in_linear = {name: statistics.median(v) for name, v in linear.items()}
    print(f"# bench_prefill_ceiling: {args.tap} vs {args.model}; {ids.shape[1]} tokens, one forward keeping the last logits; "
          f"medians of {args.rounds} alternated rounds")
    print(f"# {environment()}")
    print(f"{'row':12s} {'total s':>8s} {'tok/s':>8s} {'x fp32':>7s} {'linears s':>10s} {'rest s':>7s}")
    for name in rows:
        total = median[name]
        print(f"{name:12s} {total:8.3f} {ids.shape[1] / total:8.1f} {median['hf-fp32'] / total:7.2f} "
              f"{in_linear[name]:10.3f} {total - in_linear[name]:7.3f}")
    gemm_speedup = in_linear["hf-fp32"] / in_linear["hf-bf16"]
    print(f"bf16 linears run {gemm_speedup:.2f}x fp32's; the rest of the forward is float32 in HF fp32 and TAP alike.")
    counts = tap.router.counts  # the last budget forward's decisions
    routed_share = 1.0 - float(counts[:, 0].sum() / counts.sum())
    for name, work in (("tap-base", 1.0), ("tap-budget", 1.0 + routed_share)):
        # TAP's linears at HF bf16's linear time, times the products routed tokens add (one more
        # plane each, the same size as the base plane), and TAP's own measured rest.
        best = in_linear["hf-bf16"] * work + (median[name] - in_linear[name])
        print(f"{name}: linears take {in_linear[name] / in_linear['hf-bf16']:.2f}x HF bf16's; at HF bf16's linear speed "
              f"with x{work:.2f} the products it would prefill at {median['hf-fp32'] / best:.2f}x fp32 "
              f"(measured {median['hf-fp32'] / median[name]:.2f}x)")


if __name__ == "__main__":
    main()
