"""Whole modules promoted by calibration sensitivity plus token routing, at one bit budget.

Budget routing (the default) spends the bits above the base tier on tokens: the same share of
every layer's tokens reads the residual planes. The converter's per-layer policy
(``--target-bits``) spends them on modules instead: the ones whose calibration error falls most
per extra bit read run the top tier for every token. This script splits one budget between
the two and measures each split on held-out text, with no refit and no conversion: for each
fraction f in --fractions, ``set_routing("budget", bits=B, promote=f)`` promotes modules
(tap_runtime.allocation.allocate_min_tiers on the sensitivities the checkpoint recorded at
calibration) until f of the bits above the base tier are spent, then budget routing fills the
rest to exactly --budget-bits (shares_for_bits counts the promoted modules). f = 0 is the default routing at that budget; f = 1 promotes modules only
(the routing gets whatever whole modules leave over). Every split is first measured on
--calib-windows fresh windows of the checkpoint's own calibration source (never the evaluation
text), and the split with the lowest KL there is marked as the one chosen; then on the held-out
texts. Printed per text: the measured average bits, promoted modules, routed share, perplexity
ratio and mean KL against fp32.

    python scripts/bench_static_mix.py --model models/gemma3 --tap models/gemma3-tap-hr --texts wikitext,c4 --windows 8
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tap_runtime
from bench_common import environment, eval_windows, fp32_references, heldout_text, set_threads, tap_quality
from calibration.data import load_calibration_text, make_windows, tokenize_text
from tap_runtime.allocation import average_bits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the fp32 source model directory")
    parser.add_argument("--tap", required=True)
    parser.add_argument("--texts", default="wikitext,c4", help="held-out texts (wikitext / c4 / a .txt path)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--budget-bits", type=float, default=4.6)
    parser.add_argument("--fractions", default="0,0.5,1", help="shares of the bits above the base tier spent on whole modules")
    parser.add_argument("--calib-windows", type=int, default=16, help="calibration-source windows that choose the split")
    parser.add_argument("--seed", type=int, default=7, help="which calibration windows (the converter's own seed is 0)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    started = time.perf_counter()
    tap = tap_runtime.load(args.tap)
    table = tap.table
    no_routing = {str(t): 0.0 for t in table.tiers[1:]}
    base_bits = average_bits(table.linear, no_routing)
    if args.budget_bits <= base_bits:
        raise SystemExit(f"--budget-bits {args.budget_bits} is not above the base tier's {base_bits:.3f} bits")
    converted = dict(table.linear)
    splits = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        tap.set_routing("budget", bits=args.budget_bits, promote=fraction)  # the runtime's own allocation
        promoted = sum(1 for name, p in tap.table.linear.items() if p.min_tier != converted[name].min_tier)
        splits.append((fraction, promoted, average_bits(tap.table.linear, no_routing)))
    reference_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    bos = tokenizer.bos_token_id if table.calibration.extra.get("bos_prepended") else None
    calib = table.calibration.dataset
    results = []
    texts = [("calibration", None), *((text, heldout_text(text)) for text in args.texts.split(","))]
    for text, body in texts:
        if body is None:
            windows = make_windows(tokenize_text(tokenizer, load_calibration_text(calib)), args.calib_windows, args.ctx, args.seed, bos)
        else:
            windows = eval_windows(tokenizer, body, args.ctx, args.windows, bos)
        references, fp32_ppl = fp32_references(reference_model, windows)
        for fraction, promoted, static_bits in splits:
            tap.set_routing("budget", bits=args.budget_bits, promote=fraction)
            row = tap_quality(tap, windows, references)
            row.update(text=text, fraction=fraction, promoted=promoted, static_bits=static_bits, ppl_ratio=row["ppl"] / fp32_ppl)
            results.append(row)
            print(f"  {text} f={fraction:g}: {promoted} modules promoted ({static_bits:.3f} bits with no routing), "
                  f"{row['avg_bits']:.3f} bits read, ppl ratio {row['ppl_ratio']:.4f}, KL {row['kl']:.5f}", flush=True)
        tap.set_routing("budget", bits=args.budget_bits, promote=0)
        del references
    calibration_rows = [row for row in results if row["text"] == "calibration"]
    chosen = min(calibration_rows, key=lambda row: row["kl"])["fraction"]
    print(f"# bench_static_mix: {args.tap} vs {args.model}; {args.windows} windows x {args.ctx} tokens of each held-out text; "
          f"budget {args.budget_bits:g} bits (base tier {base_bits:.3f}); split chosen on {args.calib_windows} windows of "
          f"{calib} (seed {args.seed}): f = {chosen:g} (*)")
    print(f"# {environment()}; {time.perf_counter() - started:.0f}s")
    print(f"{'text':11s} {'f':>5s}  {'promoted':>7s} {'static bits':>11s} {'bits read':>9s} {'share > base':>12s} {'ppl ratio':>9s} {'mean KL':>9s}")
    for row in results:
        mark = "*" if row["fraction"] == chosen else " "
        print(f"{row['text']:11s} {row['fraction']:5g}{mark} {row['promoted']:7d} {row['static_bits']:11.3f} {row['avg_bits']:9.3f} "
              f"{row['share_above_base']:12.3f} {row['ppl_ratio']:9.4f} {row['kl']:9.5f}")


if __name__ == "__main__":
    main()
