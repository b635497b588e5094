"""Does torch.compile speed up CPU decode? An in-process A/B of three ways to run a decode step.

- lean loop: tap_runtime.decode.FastDecoder (the default on the CPU; fused q/k/v and gate/up);
- eager step: tap_runtime.graph_decode's DecodeStep run eagerly (one matmul per linear);
- compiled step: the same DecodeStep through ``torch.compile(fullgraph=True)`` (inductor).

Dynamo cannot trace a data-dependent branch without a graph break, so all three run the base
plane only (residual planes dropped after loading, every token on tier 4): the comparison is of
the per-step overhead around the same matmuls. torch's packed int4 op (``--kernel cpu-packed``)
is an aten op dynamo traces; TAP's own VNNI kernels are calls into a C++ extension it cannot.
Rounds alternate the three, so the machine's drift hits each alike; medians are printed.

    python scripts/bench_compile.py --tap models/smollm2-tap
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tap_runtime
from bench_common import environment, set_threads

PROMPT = "The history of the Roman Empire spans many centuries, and historians have long debated why it"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tap", required=True)
    parser.add_argument("--kernel", default="cpu-packed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)

    from tap_runtime.decode import FastDecoder
    from tap_runtime.graph_decode import GraphDecoder
    from tap_runtime.layers import TapLinear

    tap = tap_runtime.load(args.tap, kernel=args.kernel)
    tap.set_routing("fixed", tier=tap.table.tiers[0])
    for module in tap.model.modules():
        if isinstance(module, TapLinear):
            module._prepared = module._prepared[: module.policy.always_planes]
    ids = tap.encode(PROMPT)
    new = args.new_tokens + 1  # the first new token comes from prefill
    with torch.inference_mode():
        runners = {"lean loop": FastDecoder(tap.model), "eager step": GraphDecoder(tap.model, capture=False)}
        compiled = GraphDecoder(tap.model, capture=False)
        compiled.generate(ids, 2, eos_token_id=[])  # builds the step
        tick = time.perf_counter()
        compiled._step.run = torch.compile(compiled._step.run, dynamic=False, fullgraph=True)
        first = compiled.generate(ids, new, eos_token_id=[])
        compile_s = time.perf_counter() - tick
        runners["compiled step"] = compiled
        reference = runners["lean loop"].generate(ids, new, eos_token_id=[]).token_ids
        rates: dict[str, list[float]] = {name: [] for name in runners}
        agree = {}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                result = runner.generate(ids, new, eos_token_id=[])
                rates[name].append(args.new_tokens / (result.end - result.first_token_time))
                agree[name] = result.token_ids == reference
    print(f"# bench_compile: {args.tap}, kernel {args.kernel}, base plane only, {args.new_tokens} new tokens, "
          f"{args.rounds} alternated rounds; {environment()}")
    print(f"# torch.compile of the step (and its first {new} tokens): {compile_s:.1f} s; "
          f"compiled tokens equal the lean loop's: {first.token_ids == reference}")
    base = statistics.median(rates["lean loop"])
    print(f"{'path':15s} {'median tok/s':>12s} {'x lean loop':>11s}  rounds")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:15s} {median:12.1f} {median / base:11.2f}  {' '.join(f'{v:.1f}' for v in values)}"
              f"{'' if agree[name] else '  (tokens differ from the lean loop)'}")


if __name__ == "__main__":
    main()
