"""Two conversions of one model, alternated in one process: prefill time of the module forward.

bench_speed.py runs every row in a fresh process, which suits peak memory but lets the
machine's drift and a process's own history move a row by 10-30%. To compare two checkpoints
of the same model (e.g. ``tap-convert --rotation hadamard`` against ``none``) this script loads
both into one process and alternates --passes forwards over the same --tokens tokens of held-out
WikiText (the module forward, as transformers' generate runs a prefill), at the routing given,
and prints the median seconds of each, their ratio, and the seconds spent rotating inputs
(tap_runtime.rotation.rotate_input, as called by the linears). With --decode N it then
alternates greedy decodes of N new tokens after a 32-token prompt (TapModel.generate, the lean
loop) and prints the median decode tok/s of each and the median of the per-round ratios.

    python scripts/bench_checkpoint_ab.py --model models/gemma3 --tap models/gemma3-tap-hr --other-tap models/gemma3-tap-h01
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoTokenizer

import tap_runtime
from tap_runtime import dense_mlp as tap_dense_mlp
from tap_runtime import layers as tap_layers
from bench_common import environment, heldout_text, set_threads


class RotationClock:
    """Wraps rotate_input where the linears and the dense MLP call it, summing its seconds."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0
        self._original = tap_layers.rotate_input

    def __call__(self, x, block):
        tick = time.perf_counter()
        out = self._original(x, block)
        if block:
            self.seconds += time.perf_counter() - tick
            self.calls += 1
        return out

    def install(self) -> None:
        tap_layers.rotate_input = tap_dense_mlp.rotate_input = self


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the source model (for its tokenizer)")
    parser.add_argument("--tap", required=True)
    parser.add_argument("--other-tap", required=True)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--passes", type=int, default=5, help="timed passes per checkpoint, after one warm-up each")
    parser.add_argument("--routing", default="fixed", choices=["fixed", "budget"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode", type=int, default=0, help="new tokens per alternated decode (0: prefill only)")
    args = parser.parse_args()
    set_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = torch.tensor([tokenizer(heldout_text("wikitext"), add_special_tokens=False)["input_ids"][: args.tokens]])
    taps = {path: tap_runtime.load(path) for path in (args.tap, args.other_tap)}
    for tap in taps.values():
        tap.set_routing(args.routing, tier=tap.table.tiers[0] if args.routing == "fixed" else None)
    clock = RotationClock()
    clock.install()
    seconds = {path: [] for path in taps}
    rotating = {path: [] for path in taps}
    with torch.inference_mode():
        for index in range(args.passes + 1):
            for path, tap in taps.items():
                clock.seconds, clock.calls = 0.0, 0
                tick = time.perf_counter()
                tap.model(ids, use_cache=False, logits_to_keep=1)
                if index:  # the first pass of each is a warm-up
                    seconds[path].append(time.perf_counter() - tick)
                    rotating[path].append(clock.seconds)
    print(f"# bench_checkpoint_ab: {args.tap} against {args.other_tap}; {args.tokens} tokens, routing {args.routing}, "
          f"{args.passes} alternated passes each after a warm-up")
    print(f"# {environment()}")
    print(f"{'checkpoint':40s} {'median s':>9s} {'rotating s':>10s} {'passes':>s}")
    for path in taps:
        print(f"{path:40s} {statistics.median(seconds[path]):9.4f} {statistics.median(rotating[path]):10.4f} "
              + " ".join(f"{s:.3f}" for s in seconds[path]))
    ratio = statistics.median(seconds[args.tap]) / statistics.median(seconds[args.other_tap])
    print(f"time ratio {args.tap} / {args.other_tap}: {ratio:.3f}")
    if args.decode:
        prompt = ids[:, :32]
        rates = {path: [] for path in taps}
        for index in range(args.passes + 1):
            for path, tap in taps.items():
                done = tap.generate(input_ids=prompt, max_new_tokens=args.decode, eos_token_id=[])
                if index:
                    rates[path].append(done.metrics.decode_tokens_per_second)
        print(f"decode, {args.decode} new tokens, {args.passes} alternated rounds after a warm-up:")
        for path in taps:
            print(f"{path:40s} {statistics.median(rates[path]):7.1f} tok/s  " + " ".join(f"{r:.1f}" for r in rates[path]))
        ratios = [a / b for a, b in zip(rates[args.tap], rates[args.other_tap])]
        print(f"decode tok/s ratio {args.tap} / {args.other_tap}: median {statistics.median(ratios):.3f} "
              f"(rounds {' '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
