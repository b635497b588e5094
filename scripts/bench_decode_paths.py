"""In-process A/B timings, where this machine's drift between runs would swamp the difference.

Decode: the lean loop's direct path (int4 op called from the loop, ``torch.rms_norm``) against
its module path (every projection through TapLinear / FusedProjection), alternated --rounds
times in one process, default routing, --new-tokens greedy tokens from a fixed prompt.
Prefill: one --prefill-tokens forward under each routing (base tier, learned, budget),
alternated the same way, with the routed share each one used.

    python scripts/bench_decode_paths.py --tap models/smollm2-tap
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tap_runtime
from bench_common import environment, heldout_text, set_threads

PROMPT = "The history of the Roman Empire spans many centuries, and historians have long debated why it"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tap", required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    tap = tap_runtime.load(args.tap)
    tap.generate(PROMPT, max_new_tokens=8)  # builds the lean loop
    decoder = tap._fast_decoder
    direct_layers, direct_norms = list(decoder.direct), decoder.direct_norms
    decode: dict[str, list[float]] = {"direct": [], "module": []}
    for _ in range(args.rounds):
        for path in decode:
            on = path == "direct"
            decoder.direct = direct_layers if on else [None] * len(direct_layers)
            decoder.direct_norms = direct_norms and on
            done = tap.generate(PROMPT, max_new_tokens=args.new_tokens, eos_token_id=[])
            decode[path].append(done.metrics.decode_tokens_per_second)
    decoder.direct, decoder.direct_norms = direct_layers, direct_norms

    ids = tap.tokenizer(heldout_text("wikitext"), return_tensors="pt", add_special_tokens=False)["input_ids"][:, : args.prefill_tokens]
    modes = {"base tier": ("fixed", tap.table.tiers[0]), "learned": ("learned", None), "budget (default)": ("budget", None)}
    prefill: dict[str, list[float]] = {label: [] for label in modes}
    shares: dict[str, float] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for label, (mode, tier) in modes.items():
                tap.set_routing(mode, tier=tier)
                tap.model(ids, use_cache=False, logits_to_keep=1)  # warm-up
                tap.router.reset_counts()
                tick = time.perf_counter()
                tap.model(ids, use_cache=False, logits_to_keep=1)
                prefill[label].append(ids.shape[1] / (time.perf_counter() - tick))
                counts = tap.router.counts
                shares[label] = 1.0 - float(counts[:, 0].sum()) / float(counts.sum())
    tap.set_routing()

    print(f"# bench_decode_paths: {args.tap}; {args.rounds} alternated rounds; {environment()}")
    for path, rates in decode.items():
        print(f"decode {path:7s} median {statistics.median(rates):6.1f} tok/s  rounds {[round(r, 1) for r in rates]}")
    ratios = [a / b for a, b in zip(decode["direct"], decode["module"])]
    print(f"decode direct / module: median ratio {statistics.median(ratios):.3f}")
    for label, rates in prefill.items():
        print(f"prefill {label:17s} median {statistics.median(rates):6.1f} tok/s  share > base {shares[label]:.3f}  "
              f"rounds {[round(r) for r in rates]}")


if __name__ == "__main__":
    main()
