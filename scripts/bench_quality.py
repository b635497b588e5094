"""Perplexity and KL divergence of a TAP checkpoint against its fp32 source, on held-out text.

Rows, all measured in one run on the same windows: fp32; TAP with learned routing (the learned
score against fixed calibrated thresholds, so the share follows the text); TAP with every token
on the top tier; TAP with every token on the base tier; TAP with tokens routed at random at the
share the learned router actually used on this text; TAP budget routing (the default: the same
score with the share held at the converted one) and random routing at that share. KL is the mean
per-token KL(fp32 || TAP) of the next-token distributions.

    python scripts/bench_quality.py --model models/smollm2 --tap models/smollm2-tap \
        --text wikitext --windows 16 --ctx 512
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tap_runtime
from bench_common import environment, eval_windows, fp32_references, heldout_text, set_threads, tap_quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the fp32 source model directory")
    parser.add_argument("--tap", required=True, help="the TAP checkpoint converted from it")
    parser.add_argument("--text", default="wikitext", help="wikitext / c4 (held-out parts) or a .txt path")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernel", default="auto", help="tap_runtime.load's kernel (reference: float32 dequantized weights)")
    parser.add_argument("--base-activation-bits", type=int, choices=[15, 8], default=None,
                        help="tap_runtime.load's base_activation_bits (default: the kernel's; cpu-avx2 takes 8 bits in "
                             "a window's base products, 15 reproduces the figures measured before that default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-routing row")
    parser.add_argument("--rows", default=None, help="comma list of budget / top; each alone runs only that row (and its random twin)")
    parser.add_argument("--budget-bits", type=float, default=None,
                        help="add a budget-routing row (and its random twin) at the share that reads this many "
                             "average weight bits (two-tier checkpoints); the share is arithmetic, not fitted")
    parser.add_argument("--update-card", action="store_true", help="write the table into the checkpoint's model card")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    set_threads(args.threads)

    tap = tap_runtime.load(args.tap, kernel=args.kernel, base_activation_bits=args.base_activation_bits)
    reference_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    bos = tokenizer.bos_token_id if tap.table.calibration.extra.get("bos_prepended") else None
    windows = eval_windows(tokenizer, heldout_text(args.text), args.ctx, args.windows, bos)

    rows = {}
    started = time.perf_counter()
    reference_logits, fp32_ppl = fp32_references(reference_model, windows)  # targets: every token but the first
    rows["fp32"] = {"ppl": fp32_ppl, "kl": 0.0, "top1": 1.0, "share_above_base": None, "avg_bits": 32.0}
    del reference_model
    with torch.inference_mode():

        def run(label: str) -> dict:
            rows[label] = tap_quality(tap, windows, reference_logits)
            return rows[label]

        wanted = set(args.rows.split(",")) if args.rows else None
        if wanted is not None and "top" in wanted:
            tap.set_routing("fixed", tier=tap.table.tiers[-1])
            run(f"tap all tokens tier {tap.table.tiers[-1]}")
        if wanted is None or wanted - {"budget", "top"}:
            tap.set_routing("learned")
            learned = run("tap learned routing")
            top = tap.table.tiers[-1]
            tap.set_routing("fixed", tier=top)
            run(f"tap all tokens tier {top}")
            tap.set_routing("fixed", tier=tap.table.tiers[0])
            run(f"tap all tokens tier {tap.table.tiers[0]}")
            shares = tuple(learned["share_above_base"] / 4**k for k in range(len(tap.table.tiers) - 1))
            tap.set_routing("random", shares=shares, seed=args.seed)
            run("tap random routing, same share")
        if wanted is None or "budget" in wanted:
            tap.set_routing("budget")  # the fitted shares, held on this text
            budget = run("tap budget routing (default)")
            shares = tuple(budget["share_above_base"] / 4**k for k in range(len(tap.table.tiers) - 1))
            tap.set_routing("random", shares=shares, seed=args.seed)
            run("tap random routing, budget's share")
        if args.budget_bits is not None:
            tap.set_routing("budget", bits=args.budget_bits)
            run(f"tap budget routing at {args.budget_bits:g} bits")
            tap.set_routing("random", bits=args.budget_bits, seed=args.seed)
            run(f"tap random routing at {args.budget_bits:g} bits")
        tap.set_routing()

    fp32_ppl = rows["fp32"]["ppl"]
    print(f"# bench_quality: {args.tap} vs {args.model}; text={args.text} held-out, {args.windows} windows x {args.ctx} tokens")
    kernel = tap.kernel
    prefill_bits = (8 if getattr(kernel, "lane_base", False) else 15) if hasattr(kernel, "lane_base") else None
    kernel_line = f"kernel {getattr(kernel, 'name', type(kernel).__name__)}" + (f", {prefill_bits}-bit base activations in a window's products" if prefill_bits else "")
    print(f"# {environment()}; {kernel_line}; {time.perf_counter() - started:.0f}s")
    print(f"{'config':34s} {'ppl':>9s} {'ppl ratio':>10s} {'mean KL':>9s} {'top-1 agree':>11s} {'share>base':>11s} {'avg bits':>9s}")
    for label, row in rows.items():
        share = "-" if row["share_above_base"] is None else f"{row['share_above_base']:.3f}"
        print(
            f"{label:34s} {row['ppl']:9.3f} {row['ppl'] / fp32_ppl:10.4f} {row['kl']:9.5f} {row['top1']:11.3f} "
            f"{share:>11s} {row['avg_bits']:9.2f}"
        )
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump({"args": vars(args), "environment": environment(), "rows": rows}, handle, indent=2)
    if args.update_card:
        from tap_convert.hub import write_measured_quality

        table = "\n".join(
            f"| {label} | {row['ppl'] / fp32_ppl:.4f} | {row['kl']:.4f} | {row['top1']:.3f} | "
            f"{'-' if row['share_above_base'] is None else format(row['share_above_base'], '.3f')} | {row['avg_bits']:.2f} |"
            for label, row in rows.items()
        )
        command = "python scripts/bench_quality.py " + " ".join(sys.argv[1:])
        write_measured_quality(args.tap, table, command, environment(), f"{args.text} held-out, {args.windows} windows x {args.ctx} tokens")
        print(f"measured quality written into {args.tap}/README.md")


if __name__ == "__main__":
    main()
