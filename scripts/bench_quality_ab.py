"""Two or more conversions of one model on the same held-out windows: quality side by side.

bench_quality.py scores one checkpoint per run and recomputes the fp32 references each time
(the slow part on gemma's 262k vocabulary). To compare conversions that differ in one option
(e.g. ``tap-convert --gptq-refit-rounds 2 --gptq-descent-sweeps 3`` against the default) this
script computes the fp32 references once per text and scores every checkpoint in --taps on the
same windows at the same rows: every token on the base tier, budget routing at --budget-bits,
every token on the top tier. Printed per text: perplexity ratio and mean KL against fp32 for
each checkpoint and row, and the KL ratio of each later checkpoint to the first. Each ratio's
90% bootstrap interval over windows (how far another draw of text this size could move it) is
printed as the rows are measured.

    python scripts/bench_quality_ab.py --model models/gemma3 --taps models/gemma3-tap-hr,models/gemma3-tap-cd --texts wikitext,c4 --budget-bits 4.6
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tap_runtime
from bench_common import environment, eval_windows, fp32_references, heldout_text, ratio_interval, set_threads, tap_quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the fp32 source model directory")
    parser.add_argument("--taps", required=True, help="comma list of TAP checkpoints converted from it; the first is the baseline")
    parser.add_argument("--texts", default="wikitext,c4", help="held-out texts (wikitext / c4 / a .txt path)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--budget-bits", type=float, default=4.6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    paths = args.taps.split(",")
    if len(paths) < 2:
        parser.error("--taps needs at least two checkpoints to compare")
    taps = [tap_runtime.load(path) for path in paths]
    bos_flags = {bool(tap.table.calibration.extra.get("bos_prepended")) for tap in taps}
    if len(bos_flags) != 1:
        raise SystemExit("the checkpoints disagree on whether windows start with BOS; they are not conversions of one setup")
    reference_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    bos = tokenizer.bos_token_id if bos_flags.pop() else None
    rows = (
        ("base tier", lambda tap: tap.set_routing("fixed", tier=tap.table.tiers[0])),
        (f"budget at {args.budget_bits:g} bits", lambda tap: tap.set_routing("budget", bits=args.budget_bits)),
        ("top tier", lambda tap: tap.set_routing("fixed", tier=tap.table.tiers[-1])),
    )
    started = time.perf_counter()
    results = {}
    for text in args.texts.split(","):
        windows = eval_windows(tokenizer, heldout_text(text), args.ctx, args.windows, bos)
        references, fp32_ppl, fp32_nlls = fp32_references(reference_model, windows, per_window=True)
        for path, tap in zip(paths, taps):
            for label, route in rows:
                route(tap)
                with torch.inference_mode():
                    results[text, path, label] = row = tap_quality(tap, windows, references)
                row["ppl_ratio"] = row["ppl"] / fp32_ppl
                row["interval"] = ratio_interval(row["window_nlls"], fp32_nlls, windows.shape[1] - 1)
                print(f"  {text} {path} {label}: {row['ppl_ratio']:.4f} (90% over windows {row['interval'][0]:.4f}-"
                      f"{row['interval'][1]:.4f}) / {row['kl']:.5f}", flush=True)
        del references
    print(f"# bench_quality_ab: {args.model}; {args.windows} windows x {args.ctx} tokens of each held-out text")
    print(f"# {environment()}; {time.perf_counter() - started:.0f}s")
    print(f"{'text':9s} {'row':22s} " + " ".join(f"{p[-28:]:>28s}" for p in paths) + "  KL ratio to first")
    for text in args.texts.split(","):
        for label, _ in rows:
            cells = [results[text, p, label] for p in paths]
            ratios = ", ".join(f"{c['kl'] / cells[0]['kl']:.3f}" for c in cells[1:])
            print(f"{text:9s} {label:22s} " + " ".join(f"{c['ppl_ratio']:>12.4f} / {c['kl']:.5f} ({c['avg_bits']:.2f})"[-28:].rjust(28) for c in cells) + f"  {ratios}")


if __name__ == "__main__":
    main()
