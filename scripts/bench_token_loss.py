"""Where does a perplexity ratio come from? Per-token losses of two or more checkpoints on the
same held-out windows, against the fp32 model.

A perplexity ratio is exp(mean over tokens of NLL_tap - NLL_fp32). Two checkpoints with the same
mean KL can differ in it when a few tokens carry large, same-signed NLL changes; 16 windows of
512 tokens hold only ~8,000 tokens, so a handful of them can move the ratio by points. This
script prints, for the routing row asked:

- each checkpoint's perplexity ratio and mean KL, with a 90% bootstrap interval over windows;
- for each later checkpoint against the first: the ratio of their perplexities with its
  bootstrap interval, how much of the log-perplexity difference the 10 / 100 tokens with the
  largest NLL change carry, and the ratio with those tokens left out;
- the tokens behind the largest changes (window, position, token, both NLLs and the fp32 one);
- with ``--special-spellings ids`` (how text was read before the thirty-sixth session), what the
  targets that are reserved special ids (gemma's ``<unk>`` in WikiText) carry.

    python scripts/bench_token_loss.py --model models/gemma3 --taps models/gemma3-tap-kl-c4,models/gemma3-tap-lv-c4 --text wikitext
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tap_runtime
from bench_common import environment, eval_windows, heldout_text, ratio_interval, set_threads


def token_losses(model_call, windows: torch.Tensor, reference_log_probs=None):
    """Per window, (NLL per predicted token, KL to the reference per token or None, log-probs kept
    only when no reference is given)."""
    nlls, kls, kept = [], [], []
    with torch.inference_mode():
        for index, window in enumerate(windows):
            log_probs = torch.log_softmax(model_call(window.unsqueeze(0)).logits[0, :-1].float(), dim=-1)
            nlls.append(-log_probs.gather(-1, window[1:].unsqueeze(-1)).squeeze(-1))
            if reference_log_probs is None:
                kept.append(log_probs.to(torch.bfloat16))
                kls.append(None)
            else:
                reference = reference_log_probs[index].float()
                kls.append((reference.exp() * (reference - log_probs)).sum(-1))
    return nlls, kls, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the fp32 source model directory")
    parser.add_argument("--taps", required=True, help="comma list of checkpoints converted from it; the first is the baseline")
    parser.add_argument("--text", default="wikitext", help="held-out text (wikitext / c4 / a .txt path)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--row", default="budget", choices=("base", "budget", "top"))
    parser.add_argument("--budget-bits", type=float, default=4.6)
    parser.add_argument("--show", type=int, default=15, help="tokens listed per comparison")
    parser.add_argument("--special-spellings", choices=("text", "ids"), default="text",
                        help="text (what every benchmark reads since the thirty-sixth session) or ids: a special "
                        "token's spelling in the text becomes its reserved id, as benchmarks read it before")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    started = time.perf_counter()
    paths = args.taps.split(",")
    taps = [tap_runtime.load(path) for path in paths]
    bos_flags = {bool(tap.table.calibration.extra.get("bos_prepended")) for tap in taps}
    if len(bos_flags) != 1:
        raise SystemExit("the checkpoints disagree on whether windows start with BOS; they are not conversions of one setup")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    bos = tokenizer.bos_token_id if bos_flags.pop() else None
    if args.special_spellings == "ids":
        ids = torch.tensor(tokenizer(heldout_text(args.text), add_special_tokens=False)["input_ids"])
        body = args.ctx - (bos is not None)
        available = ids.numel() // body
        picks = torch.linspace(0, available - 1, args.windows).round().long()
        windows = ids[: available * body].view(available, body)[picks]
        if bos is not None:
            windows = torch.cat([torch.full((args.windows, 1), bos), windows], dim=1)
    else:
        windows = eval_windows(tokenizer, heldout_text(args.text), args.ctx, args.windows, bos)
    special = torch.isin(windows[:, 1:], torch.tensor(sorted(tokenizer.all_special_ids)))
    reference_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    fp_nll, _, reference_log_probs = token_losses(reference_model, windows)
    del reference_model
    fp_nll = torch.stack(fp_nll)

    nll_of, kl_of = {}, {}
    for path, tap in zip(paths, taps):
        if args.row == "base":
            tap.set_routing("fixed", tier=tap.table.tiers[0])
        elif args.row == "top":
            tap.set_routing("fixed", tier=tap.table.tiers[-1])
        else:
            tap.set_routing("budget", bits=args.budget_bits)
        nlls, kls, _ = token_losses(tap, windows, reference_log_probs)
        nll_of[path], kl_of[path] = torch.stack(nlls), torch.stack(kls)

    print(f"# bench_token_loss: {args.model}; {args.windows} windows x {args.ctx} tokens of {args.text}; row {args.row}"
          + (f" at {args.budget_bits:g} bits" if args.row == "budget" else ""))
    print(f"# {environment()}; {time.perf_counter() - started:.0f}s")
    print(f"fp32 perplexity {math.exp(fp_nll.mean()):.3f}; {int(special.sum())} of {special.numel()} targets are special ids, "
          f"carrying {float(fp_nll[special].sum()):.0f} of {float(fp_nll.sum()):.0f} nats")
    for path in paths:
        delta = nll_of[path] - fp_nll
        low, high = ratio_interval(nll_of[path].sum(1).tolist(), fp_nll.sum(1).tolist(), fp_nll.shape[1])
        without = f", {math.exp(delta[~special].mean()):.4f} without special-id targets" if special.any() else ""
        print(f"{path}: ppl ratio {math.exp(delta.mean()):.4f} (90% bootstrap over windows {low:.4f}-{high:.4f}){without}, "
              f"mean KL {kl_of[path].mean():.5f}")
    first = paths[0]
    for path in paths[1:]:
        change = nll_of[path] - nll_of[first]
        low, high = ratio_interval(nll_of[path].sum(1).tolist(), nll_of[first].sum(1).tolist(), fp_nll.shape[1])
        total = float(change.sum())
        order = change.flatten().abs().argsort(descending=True)
        print(f"\n{path} against {first}: ppl ratio {math.exp(change.mean()):.4f} (90% bootstrap {low:.4f}-{high:.4f}); "
              f"summed NLL change {total:+.1f} nats over {change.numel()} tokens")
        for top in (10, 100, 1000):
            picked = change.flatten()[order[:top]]
            rest = (total - float(picked.sum())) / (change.numel() - top)
            print(f"  largest {top:4d} |changes|: sum {float(picked.sum()):+.1f} nats; ratio without them {math.exp(rest):.4f}")
        if special.any():
            kept = change[~special]
            print(f"  special-id targets: {float(change[special].sum()):+.1f} nats; ratio without them {math.exp(kept.mean()):.4f}")
        per_window = change.sum(1)
        print("  per window summed change: " + " ".join(f"{v:+.1f}" for v in per_window.tolist()))
        print(f"  {'window':>6s} {'pos':>4s} {'token':24s} {'fp32 NLL':>8s} {first[-14:]:>14s} {path[-14:]:>14s}")
        for flat in order[: args.show].tolist():
            w, p = divmod(flat, change.shape[1])
            token = repr(tokenizer.decode([int(windows[w, p + 1])]))[:24]
            print(f"  {w:6d} {p:4d} {token:24s} {float(fp_nll[w, p]):8.3f} {float(nll_of[first][w, p]):14.3f} {float(nll_of[path][w, p]):14.3f}")


if __name__ == "__main__":
    main()
