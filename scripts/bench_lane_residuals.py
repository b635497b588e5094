"""Routed tokens' residual products in a prefill: the lane kernel against unpack + GEMM, in one process.

In a many-token call the tokens the router sends to tier 8 need the residual plane for their
rows only. ``CpuVnniKernel.lane_residuals`` (default on) multiplies those rows with the native
16-row lane kernel (8-bit activations per block of 64, the 4-bit plane read as stored); off, the
plane is unpacked to bfloat16 and multiplied densely, as before. This script times one --tokens
forward (last logits kept, as generate's prefill) with the default routing, both ways,
alternated --rounds times, and with --model (the fp32 source) measures perplexity and mean KL
against fp32 on --windows held-out windows both ways.

    python scripts/bench_lane_residuals.py --tap models/qwen1.5b-tap-v4 --model models/qwen1.5b --windows 2
    python scripts/bench_lane_residuals.py --tap models/smollm2-tap-v4 --model models/smollm2 --windows 8
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

import tap_runtime
from tap_runtime.layers import TapLinear
from bench_common import environment, eval_windows, heldout_text, set_threads


def _kernels(tap) -> list:
    kernels = {id(m.kernel): m.kernel for m in tap.model.modules() if isinstance(m, TapLinear) and m.kernel is not None}
    return [k for k in kernels.values() if hasattr(k, "lane_residuals")]


def _set_lanes(kernels, on: bool) -> None:
    for kernel in kernels:
        kernel.lane_residuals = on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tap", required=True)
    parser.add_argument("--model", default=None, help="fp32 source model, for the quality part")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--windows", type=int, default=8, help="quality windows of 512 tokens (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    tap = tap_runtime.load(args.tap)
    kernels = _kernels(tap)
    if not kernels:
        raise SystemExit(f"{args.tap}: its linears did not load on TAP's native CPU kernels here, so there is no lane kernel to compare")
    print(f"# bench_lane_residuals: {args.tap}; {environment()}")
    tap.set_routing("budget")
    ids = tap.tokenizer(heldout_text("wikitext"), return_tensors="pt", add_special_tokens=False)["input_ids"][:, : args.tokens]
    rates: dict[bool, list[float]] = {True: [], False: []}
    with torch.inference_mode():
        for round_index in range(args.rounds + 1):
            for on in (True, False):
                _set_lanes(kernels, on)
                tick = time.perf_counter()
                tap.model(ids, use_cache=False, logits_to_keep=1)
                if round_index:  # round 0 warms up
                    rates[on].append(ids.shape[1] / (time.perf_counter() - tick))
    ratios = [a / b for a, b in zip(rates[True], rates[False])]
    print(f"prefill default routing, {ids.shape[1]} tokens: lanes {statistics.median(rates[True]):.1f} tok/s, "
          f"unpack + GEMM {statistics.median(rates[False]):.1f}; lanes / unpack median {statistics.median(ratios):.3f} "
          f"(rounds {[round(r, 3) for r in ratios]})")
    _set_lanes(kernels, True)
    if not args.model or args.windows <= 0:
        return

    windows = eval_windows(tap.tokenizer, heldout_text("wikitext"), 512, args.windows, tap.tokenizer.bos_token_id)
    fp32 = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = [torch.log_softmax(fp32(w.unsqueeze(0)).logits[0, :-1].float(), -1) for w in windows]
    del fp32
    for on in (True, False):
        _set_lanes(kernels, on)
        nll = kl = count = 0.0
        with torch.inference_mode():
            for window, ref in zip(windows, reference):
                logprobs = torch.log_softmax(tap.model(window.unsqueeze(0)).logits[0, :-1].float(), -1)
                nll -= logprobs.gather(-1, window[1:, None]).sum().item()
                kl += (ref.exp() * (ref - logprobs)).sum().item()
                count += window.numel() - 1
        print(f"quality default routing, {len(windows)} windows: {'lanes ' if on else 'unpack'} ppl {math.exp(nll / count):.4f}  "
              f"mean KL {kl / count:.5f}")
    _set_lanes(kernels, True)


if __name__ == "__main__":
    main()
