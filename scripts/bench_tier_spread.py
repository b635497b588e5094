"""How far a perplexity ratio near 1 can be trusted: its spread across windows, per checkpoint.

A ratio such as 1.003 is exp of the mean per-token log-likelihood difference against fp32.
Tokens inside one window are correlated, windows are not, so the standard error here is taken
across windows: the standard deviation of the per-window mean differences over sqrt(windows).
With several checkpoints (e.g. two conversions of one model) the paired difference of each
against the first is reported the same way, on the same windows.

    python scripts/bench_tier_spread.py --model models/gemma3 --text c4 --windows 16 \
        --tap models/gemma3-tap-v2 models/gemma3-tap-ao
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tap_runtime
from bench_common import environment, eval_windows, heldout_text, set_threads


def _window_nll(logits: torch.Tensor, window: torch.Tensor) -> float:
    """Mean next-token NLL over one window (the first token is never scored)."""
    log_probs = torch.log_softmax(logits.to(torch.float32), dim=-1)
    return float(-log_probs.gather(-1, window[1:, None]).mean())


def _mean_and_error(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the fp32 source model directory")
    parser.add_argument("--tap", required=True, nargs="+", help="checkpoints converted from it")
    parser.add_argument("--tier", default="top", help="top, base or a tier number; every token on it")
    parser.add_argument("--text", default="wikitext")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    first = tap_runtime.load(args.tap[0])
    bos = tokenizer.bos_token_id if first.table.calibration.extra.get("bos_prepended") else None
    del first
    windows = eval_windows(tokenizer, heldout_text(args.text), args.ctx, args.windows, bos)
    with torch.inference_mode():
        reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        fp32 = [_window_nll(reference(w[None]).logits[0, :-1], w) for w in windows]
        del reference
        differences = {}
        for path in args.tap:
            tap = tap_runtime.load(path)
            tiers = tap.table.tiers
            tier = tiers[-1] if args.tier == "top" else tiers[0] if args.tier == "base" else int(args.tier)
            tap.set_routing("fixed", tier=tier)
            differences[path] = [_window_nll(tap(w[None]).logits[0, :-1], w) - ref for w, ref in zip(windows, fp32)]
            del tap
    print(f"# bench_tier_spread: every token on tier {args.tier}; text={args.text} held-out, {args.windows} windows x {args.ctx} tokens")
    print(f"# {environment()}")
    print(f"{'checkpoint':34s} {'ppl ratio':>9s} {'2 SE range':>17s} {'vs first':>9s} {'2 SE range':>17s}")
    baseline = differences[args.tap[0]]
    for path, values in differences.items():
        mean, error = _mean_and_error(values)
        line = f"{path:34s} {math.exp(mean):9.4f} {math.exp(mean - 2 * error):8.4f}-{math.exp(mean + 2 * error):.4f}"
        if path != args.tap[0]:
            paired, paired_error = _mean_and_error([a - b for a, b in zip(values, baseline)])
            line += f" {math.exp(paired):9.4f} {math.exp(paired - 2 * paired_error):8.4f}-{math.exp(paired + 2 * paired_error):.4f}"
        print(line)


if __name__ == "__main__":
    main()
