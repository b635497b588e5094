"""Many-token MLPs through tap_runtime.dense_mlp against the module path, in one process.

Speed: one --tokens forward (last logits kept, as generate's prefill) on the base tier and with
the default routing, the dense MLP on and off (``mlp.tap_dense_mlp``), alternated --rounds times.
Quality (with --model, the fp32 source): perplexity and mean KL against fp32 on --windows
held-out windows, default routing and tier 8, both ways.

    python scripts/bench_dense_mlp.py --tap models/qwen1.5b-tap-v4 --model models/qwen1.5b --windows 0
    python scripts/bench_dense_mlp.py --tap models/smollm2-tap-v4 --model models/smollm2 --windows 8
"""

from __future__ import annotations

import statistics
import time

import torch

import tap_runtime
from bench_common import environment, eval_windows, heldout_text, prefill_ab_arguments, reference_logprobs, window_quality


def _set_dense(mlps, on: bool) -> None:
    for mlp in mlps:
        mlp.tap_dense_mlp = on


def _routing(tap, mode: str) -> None:
    if mode == "base tier":
        tap.set_routing("fixed", tier=tap.table.tiers[0])
    elif mode == "tier 8":
        tap.set_routing("fixed", tier=tap.table.tiers[-1])
    else:
        tap.set_routing("budget")


def main() -> None:
    args = prefill_ab_arguments(__doc__)
    tap = tap_runtime.load(args.tap)
    mlps = [m for m in tap.model.modules() if getattr(m, "tap_dense_mlp", None) is not None]
    if not mlps:
        raise SystemExit(f"{args.tap}: no MLP took the dense path here (needs TAP's native CPU kernels and a SiLU MLP)")
    print(f"# bench_dense_mlp: {args.tap}; {len(mlps)} MLPs; {environment()}")
    ids = tap.tokenizer(heldout_text("wikitext"), return_tensors="pt", add_special_tokens=False)["input_ids"][:, : args.tokens]
    rates: dict[tuple[str, bool], list[float]] = {}
    with torch.inference_mode():
        for round_index in range(args.rounds + 1):
            for mode in ("base tier", "default routing"):
                _routing(tap, mode)
                for on in (True, False):
                    _set_dense(mlps, on)
                    tick = time.perf_counter()
                    tap.model(ids, use_cache=False, logits_to_keep=1)
                    if round_index:  # round 0 warms up
                        rates.setdefault((mode, on), []).append(ids.shape[1] / (time.perf_counter() - tick))
    for mode in ("base tier", "default routing"):
        on, off = rates[(mode, True)], rates[(mode, False)]
        ratios = [a / b for a, b in zip(on, off)]
        print(f"prefill {mode:15s} dense {statistics.median(on):7.1f} tok/s  module {statistics.median(off):7.1f}  "
              f"dense / module median {statistics.median(ratios):.3f}  rounds {[round(r, 3) for r in ratios]}")
    _set_dense(mlps, True)
    if not args.model or args.windows <= 0:
        return

    windows = eval_windows(tap.tokenizer, heldout_text("wikitext"), 512, args.windows, tap.tokenizer.bos_token_id)
    references = reference_logprobs(args.model, windows)
    for mode in ("default routing", "tier 8"):
        _routing(tap, mode)
        for on in (True, False):
            _set_dense(mlps, on)
            ppl, kl = window_quality(lambda ids: tap.model(ids).logits, windows, references)
            print(f"quality {mode:15s} {'dense' if on else 'module':6s} ppl {ppl:.4f}  mean KL {kl:.5f}")
    _set_dense(mlps, True)


if __name__ == "__main__":
    main()
