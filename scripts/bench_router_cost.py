"""What one decode token's routing decision costs per layer, with and without the sensitivity probe.

Times TokenRouter._decode_score (the scalar decode path: the native two-signal call plus, for a
format-6 router, the probe's dot product) on random vectors of the model's width, then again
with the sensitivity term dropped from the same router. Prints microseconds per layer and the
difference per token over all layers.

    python scripts/bench_router_cost.py --tap models/smollm2-tap-kl
"""

from __future__ import annotations

import argparse
import time

import torch

import tap_runtime
from bench_common import environment, set_threads


def per_call_microseconds(router, hidden, normed, layer: int, calls: int) -> float:
    for _ in range(calls // 100):
        router._decode_score(layer, hidden, normed)
    started = time.perf_counter()
    for _ in range(calls):
        router._decode_score(layer, hidden, normed)
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tap", required=True, help="a TAP checkpoint whose router reads the sensitivity signal")
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    tap = tap_runtime.load(args.tap)
    router = tap.router
    if "sensitivity" not in router._slopes:
        raise SystemExit(f"{args.tap}: its router does not read the sensitivity signal (convert with --router-target kl_impact)")
    width = tap.model.config.get_text_config().hidden_size
    generator = torch.Generator().manual_seed(0)
    hidden, normed = torch.randn(1, 1, width, generator=generator), torch.randn(1, 1, width, generator=generator)
    router.set_mode("learned")
    router._static_scalar = 0.0
    layer = router.num_layers // 2
    with_probe = per_call_microseconds(router, hidden, normed, layer, args.calls)
    router._slopes = {name: slopes for name, slopes in router._slopes.items() if name != "sensitivity"}
    without = per_call_microseconds(router, hidden, normed, layer, args.calls)
    print(f"# bench_router_cost: {args.tap}, width {width}, layer {layer}, {args.calls} calls each")
    print(f"# {environment()}")
    print(f"decode score per layer: {with_probe:.2f} us with the probe, {without:.2f} us without")
    print(f"the probe per token over {router.num_layers} layers: {(with_probe - without) * router.num_layers:.0f} us")


if __name__ == "__main__":
    main()
