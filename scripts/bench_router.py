"""Router ablation: does per-token routing beat simply spending the same bits per layer?

All rows run on the same held-out windows in one run, at the same average weight bits read
per token as the learned router actually used on this text:
  uniform base tier          every token on the base tier (fewer bits: the floor)
  learned (deployed)         the fitted score with its calibration thresholds
  learned, top-k             the fitted score, routing exactly the learned share per layer
  <signal> alone, top-k      one runtime signal (direction from its calibration AUC), same share
  random, same share         tokens drawn at random at the learned share
  static per-layer mix       no token routing: the layers with the best calibration error
                             reduction per bit run tier 8 for every token, same average bits
  all tokens top tier        the ceiling
Reports perplexity ratio and mean KL(fp32 || TAP).

    python scripts/bench_router.py --model models/smollm2 --tap models/smollm2-tap --windows 16
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tap_runtime
from bench_common import environment, eval_windows, heldout_text, set_threads, window_quality
from tap_convert.policy import allocate_min_tiers, average_bits
from tap_runtime.metrics import weight_bits_read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tap", required=True)
    parser.add_argument("--text", default="wikitext")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    started = time.perf_counter()

    tap = tap_runtime.load(args.tap)
    reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    bos = tokenizer.bos_token_id if tap.table.calibration.extra.get("bos_prepended") else None
    windows = eval_windows(tokenizer, heldout_text(args.text), args.ctx, args.windows, bos)
    with torch.inference_mode():
        reference_logprobs = [
            torch.log_softmax(reference(w.unsqueeze(0)).logits[0, :-1].float(), -1).to(torch.bfloat16) for w in windows
        ]
    del reference
    base_tier, top_tier = tap.table.tiers[0], tap.table.tiers[-1]
    rows: dict[str, dict] = {}

    def measure(label: str) -> dict:
        tap.router.reset_counts()
        ppl, kl = window_quality(lambda ids: tap(ids).logits, windows, reference_logprobs)
        counts = tap.router.counts.clone()
        rows[label] = {
            "ppl": ppl,
            "kl": kl,
            "share_above_base": 1.0 - float(counts[:, 0].sum()) / float(counts.sum()),
            "avg_bits": weight_bits_read(tap.table, counts)["avg_weight_bits_per_token"],
        }
        print(f"  {label}: {rows[label]}", flush=True)
        return rows[label]

    with torch.no_grad():
        reference_nll = 0.0
        for window, ref in zip(windows, reference_logprobs):
            reference_nll -= ref.float().gather(-1, window[1:, None]).sum().item()
        fp32_ppl = math.exp(reference_nll / sum(w.numel() - 1 for w in windows))

    tap.set_routing("fixed", tier=base_tier)
    measure("uniform base tier")
    tap.set_routing("learned")
    learned = measure("learned (deployed thresholds)")
    levels = len(tap.table.tiers) - 1
    shares = tuple(learned["share_above_base"] / 4**k for k in range(levels))
    tap.set_routing("topk", shares=shares, score="learned")
    measure("learned, top-k at same share")
    auc = tap.table.router.fit.get("single_signal_auc", {})
    for signal in tap.table.router.signals:
        sign = 1.0 if (auc.get(signal) or 0.5) >= 0.5 else -1.0
        tap.set_routing("topk", shares=shares, score=signal, sign=sign)
        measure(f"{signal} alone ({'+' if sign > 0 else '-'}), top-k")
    tap.set_routing("random", shares=shares, seed=0)
    measure("random, same share")

    # Static mix: no routing; promote whole modules by calibration sensitivity to the same bits.
    no_routing = {str(t): 0.0 for t in tap.table.tiers[1:]}
    policies = allocate_min_tiers(tap.table.linear, no_routing, learned["avg_bits"])
    tap.set_min_tiers({name: p.min_tier for name, p in policies.items()})
    tap.set_routing("fixed", tier=base_tier)
    static = measure("static per-layer mix, no routing")
    static["promoted_modules"] = sum(1 for p in policies.values() if p.min_tier != base_tier)
    static["planned_avg_bits"] = average_bits(policies, no_routing)
    tap.set_min_tiers({})
    tap.set_routing("fixed", tier=top_tier)
    measure(f"all tokens tier {top_tier}")

    print(f"# bench_router: {args.tap} vs {args.model}; text={args.text} held-out, {args.windows} windows x {args.ctx}")
    print(f"# {environment()}; {time.perf_counter() - started:.0f}s")
    print(f"{'row':38s} {'avg bits':>8s} {'share>base':>10s} {'ppl ratio':>10s} {'mean KL':>9s}")
    for label, row in rows.items():
        print(f"{label:38s} {row['avg_bits']:8.3f} {row['share_above_base']:10.3f} {row['ppl'] / fp32_ppl:10.4f} {row['kl']:9.5f}")
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump({"args": vars(args), "environment": environment(), "fp32_ppl": fp32_ppl, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
