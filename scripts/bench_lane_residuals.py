"""Routed tokens' residual products in a prefill: the lane kernel against unpack + GEMM, in one process.

In a many-token call the tokens the router sends to tier 8 need the residual plane for their
rows only. ``CpuVnniKernel.lane_residuals`` (default on) multiplies those rows with the native
16-row lane kernel (8-bit activations per block of 64, the 4-bit plane read as stored); off, the
plane is unpacked to bfloat16 and multiplied densely, as before. This script times one --tokens
forward (last logits kept, as generate's prefill) on the base tier and with the default routing
both ways, alternated --rounds times, with the seconds spent in the routed residual products;
with --model (the fp32 source) it then measures perplexity and mean KL against fp32 on
--windows held-out windows both ways.

    python scripts/bench_lane_residuals.py --tap models/qwen1.5b-tap-v4 --model models/qwen1.5b --windows 2
    python scripts/bench_lane_residuals.py --tap models/smollm2-tap-v4 --model models/smollm2 --windows 8
"""

from __future__ import annotations

import statistics
import time

import torch

import tap_runtime
from tap_runtime.layers import TapLinear
from bench_common import environment, eval_windows, heldout_text, prefill_ab_arguments, reference_logprobs, window_quality


def _kernels(tap) -> list:
    kernels = {id(m.kernel): m.kernel for m in tap.model.modules() if isinstance(m, TapLinear) and m.kernel is not None}
    return [k for k in kernels.values() if hasattr(k, "lane_residuals")]


def _set_lanes(kernels, on: bool) -> None:
    for kernel in kernels:
        kernel.lane_residuals = on


def main() -> None:
    args = prefill_ab_arguments(__doc__)
    tap = tap_runtime.load(args.tap)
    kernels = _kernels(tap)
    if not kernels:
        raise SystemExit(f"{args.tap}: its linears did not load on TAP's native CPU kernels here, so there is no lane kernel to compare")
    print(f"# bench_lane_residuals: {args.tap}; {environment()}")
    ids = tap.tokenizer(heldout_text("wikitext"), return_tensors="pt", add_special_tokens=False)["input_ids"][:, : args.tokens]
    routed_seconds = [0.0]
    for kernel in kernels:
        product = kernel.matmul_routed

        def timed(*call, _product=product):
            tick = time.perf_counter()
            try:
                return _product(*call)
            finally:
                routed_seconds[0] += time.perf_counter() - tick

        kernel.matmul_routed = timed
    configs = ("base tier", "lanes", "unpack")
    rates: dict[str, list[float]] = {c: [] for c in configs}
    routed: dict[str, list[float]] = {c: [] for c in configs}
    with torch.inference_mode():
        for round_index in range(args.rounds + 1):
            for config in configs:
                if config == "base tier":
                    tap.set_routing("fixed", tier=tap.table.tiers[0])
                else:
                    tap.set_routing("budget")
                    _set_lanes(kernels, config == "lanes")
                routed_seconds[0] = 0.0
                tick = time.perf_counter()
                tap.model(ids, use_cache=False, logits_to_keep=1)
                if round_index:  # round 0 warms up
                    rates[config].append(ids.shape[1] / (time.perf_counter() - tick))
                    routed[config].append(routed_seconds[0])
    for kernel in kernels:
        del kernel.matmul_routed  # back to the class's method
    for config in configs:
        print(f"prefill {config:9s} {ids.shape[1]} tokens: {statistics.median(rates[config]):7.1f} tok/s; "
              f"routed residual products {statistics.median(routed[config]):.3f} s")
    for a, b in (("lanes", "unpack"), ("lanes", "base tier"), ("unpack", "base tier")):
        ratios = [x / y for x, y in zip(rates[a], rates[b])]
        print(f"  {a} / {b}: median {statistics.median(ratios):.3f} (rounds {[round(r, 3) for r in ratios]})")
    tap.set_routing("budget")
    _set_lanes(kernels, True)
    if not args.model or args.windows <= 0:
        return

    windows = eval_windows(tap.tokenizer, heldout_text("wikitext"), 512, args.windows, tap.tokenizer.bos_token_id)
    references = reference_logprobs(args.model, windows)
    for on in (True, False):
        _set_lanes(kernels, on)
        ppl, kl = window_quality(lambda ids: tap.model(ids).logits, windows, references)
        print(f"quality default routing, {len(windows)} windows: {'lanes ' if on else 'unpack'} ppl {ppl:.4f}  mean KL {kl:.5f}")
    _set_lanes(kernels, True)


if __name__ == "__main__":
    main()
