"""In-process A/B timings, where this machine's drift between runs would swamp the difference.

Decode: the lean loop's native steps with each layer after its routing decision in one native
call ("native layer"), the same with one native call per stretch of the layer ("native": norms,
rotary, cache write and attention, SiLU, and each projection), its direct path with those as
torch operators (kernels called from the loop, ``torch.rms_norm``), and its module path (every
projection through TapLinear / FusedProjection), alternated --rounds times in one process,
default routing, --new-tokens greedy tokens from a fixed prompt. The native rows are skipped
where the model or machine does not take native steps.
--routing-ab: also alternate the default routing with the base tier on the default path (the
issue's "default >= 0.9x base tier", measured in one process rather than across runs).
--huge-pages-ab: also load the checkpoint a second time with its planes on 4 KiB pages
(tap_runtime.pages.set_huge_pages(False)) and alternate the two copies' default decode.
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


def _first_difference(a: list[int], b: list[int]) -> str:
    """Index of the first differing token, or "none"."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return str(index)
    return "none" if len(a) == len(b) else str(min(len(a), len(b)))


def _compare_page_sizes(tap, args) -> None:
    """Default decode of ``tap`` (planes on huge pages) against a second load on 4 KiB pages."""
    from tap_runtime.pages import set_huge_pages

    set_huge_pages(False)
    try:
        small = tap_runtime.load(args.tap)
    finally:
        set_huge_pages(True)
    small.generate(PROMPT, max_new_tokens=8)
    rates: dict[str, list[float]] = {"2 MiB pages": [], "4 KiB pages": []}
    for _ in range(args.rounds):
        for label, model in (("2 MiB pages", tap), ("4 KiB pages", small)):
            rates[label].append(model.generate(PROMPT, max_new_tokens=args.new_tokens, eos_token_id=[]).metrics.decode_tokens_per_second)
    for label, values in rates.items():
        print(f"decode, planes on {label}: median {statistics.median(values):6.1f} tok/s  rounds {[round(r, 1) for r in values]}")
    ratios = [a / b for a, b in zip(rates["2 MiB pages"], rates["4 KiB pages"])]
    print(f"decode 2 MiB / 4 KiB pages: median ratio {statistics.median(ratios):.3f}")
    del small


def _compare_routings(tap, args) -> None:
    """Default routing against the base tier alone, alternated on the default decode path."""
    rates: dict[str, list[float]] = {"base tier": [], "default routing": []}
    bits: dict[str, list[float]] = {"base tier": [], "default routing": []}
    for _ in range(args.rounds):
        for label in rates:
            if label == "base tier":
                tap.set_routing("fixed", tier=tap.table.tiers[0])
            else:
                tap.set_routing()
            done = tap.generate(PROMPT, max_new_tokens=args.new_tokens, eos_token_id=[])
            rates[label].append(done.metrics.decode_tokens_per_second)
            bits[label].append(done.metrics.avg_weight_bits_per_token)
    tap.set_routing()
    for label, values in rates.items():
        print(f"decode, {label:15s}: median {statistics.median(values):6.1f} tok/s  rounds {[round(r, 1) for r in values]}  "
              f"bits read per token {statistics.median(bits[label]):.2f}")
    ratios = [a / b for a, b in zip(rates["default routing"], rates["base tier"])]
    print(f"decode default / base tier: median ratio {statistics.median(ratios):.3f}  rounds {[round(r, 3) for r in ratios]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tap", required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-prefill", action="store_true", help="decode rows only")
    parser.add_argument("--huge-pages-ab", action="store_true", help="also compare planes on 2 MiB against 4 KiB pages")
    parser.add_argument("--routing-ab", action="store_true", help="also alternate the default routing with the base tier")
    args = parser.parse_args()
    set_threads(args.threads)
    tap = tap_runtime.load(args.tap)
    tap.generate(PROMPT, max_new_tokens=8)  # builds the lean loop
    decoder = tap._fast_decoder
    direct_layers, direct_norms, native_steps = list(decoder.direct), decoder.direct_norms, decoder.native_steps
    native_layers = decoder.native_layers
    paths = (["native layer", "native"] if native_steps else []) + ["direct", "module"]
    decode: dict[str, list[float]] = {path: [] for path in paths}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for path in decode:
            on = path != "module"
            decoder.direct = direct_layers if on else [None] * len(direct_layers)
            decoder.direct_norms = direct_norms and on
            decoder.native_steps = path.startswith("native")
            decoder.native_layers = path == "native layer"
            done = tap.generate(PROMPT, max_new_tokens=args.new_tokens, eos_token_id=[])
            decode[path].append(done.metrics.decode_tokens_per_second)
            tokens[path] = done.token_ids
    decoder.direct, decoder.direct_norms, decoder.native_steps = direct_layers, direct_norms, native_steps
    decoder.native_layers = native_layers

    print(f"# bench_decode_paths: {args.tap}; {args.rounds} alternated rounds; {environment()}")
    for path, rates in decode.items():
        same = sum(a == b for a, b in zip(tokens[path], tokens["direct"]))
        print(f"decode {path:12s} median {statistics.median(rates):6.1f} tok/s  rounds {[round(r, 1) for r in rates]}  "
              f"tokens equal to the direct path's: {same}/{len(tokens['direct'])} (first {_first_difference(tokens[path], tokens['direct'])})")
    for path in decode:
        if path != "direct":
            ratios = [a / b for a, b in zip(decode[path], decode["direct"])]
            print(f"decode {path} / direct: median ratio {statistics.median(ratios):.3f}")
    if native_steps:
        ratios = [a / b for a, b in zip(decode["native layer"], decode["native"])]
        print(f"decode native layer / native: median ratio {statistics.median(ratios):.3f}")
    if args.routing_ab:
        _compare_routings(tap, args)
    if args.huge_pages_ab:
        _compare_page_sizes(tap, args)
    if args.no_prefill:
        return

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

    for label, rates in prefill.items():
        print(f"prefill {label:17s} median {statistics.median(rates):6.1f} tok/s  share > base {shares[label]:.3f}  "
              f"rounds {[round(r) for r in rates]}")


if __name__ == "__main__":
    main()
