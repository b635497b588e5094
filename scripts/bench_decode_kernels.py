"""Where a decode step's time goes: every TAP kernel call of a lean-loop decode, timed by shape.

Wraps the native kernel module's matmuls with timers, decodes --new-tokens tokens on the base
tier (so every call is one whole token), and prints per plane shape: calls, microseconds per
call and weight GB/s, plus the head's, against the whole step. In the model the planes stream
from memory, unlike scripts/bench_kernels.py's repeated calls on one plane.

    python scripts/bench_decode_kernels.py --tap models/qwen1.5b-tap
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

import tap_runtime
import tap_runtime.decode as decode
from bench_common import environment
from tap_runtime.kernels.native import native_kernels, native_unavailable_reason
from tap_runtime.kernels.vnni import CpuVnniKernel


class _TimedNative:
    """The native module with its matmuls timed per weight shape."""

    def __init__(self, module):
        self.module = module
        self.stats = collections.defaultdict(lambda: [0.0, 0, 0])

    def __getattr__(self, name):
        function = getattr(self.module, name)
        if name not in ("matmul_w4", "matmul_w8"):
            return function

        def timed(x, weight, *rest):
            tick = time.perf_counter()
            out = function(x, weight, *rest)
            entry = self.stats[(name, tuple(weight.shape))]
            entry[0] += time.perf_counter() - tick
            entry[1] += 1
            entry[2] = weight.numel()
            return out

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tap", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=33)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if native_kernels() is None:
        raise SystemExit(f"TAP's native kernels are unavailable here: {native_unavailable_reason()}")
    tap = tap_runtime.load(args.tap)
    tap.set_routing("fixed", tier=tap.table.tiers[0])
    timed = _TimedNative(native_kernels())
    decode.native_kernels = lambda: timed  # the lean loop's direct path
    for module in tap.model.modules():
        if isinstance(getattr(module, "kernel", None), CpuVnniKernel):
            module.kernel.native = timed  # the head and any module-path call
    ids = tap.encode("The river flows past the old mill and the")
    decoder = decode.FastDecoder(tap.model)
    with torch.inference_mode():
        decoder.generate(ids, 8, eos_token_id=[])  # warm-up
        timed.stats.clear()
        result = decoder.generate(ids, args.new_tokens, eos_token_id=[])
    steps = args.new_tokens - 1
    step_ms = (result.end - result.first_token_time) / steps * 1e3
    print(f"# bench_decode_kernels: {args.tap}, base tier, {steps} decode steps; {environment()}")
    print(f"# step {step_ms:.2f} ms ({1e3 / step_ms:.1f} tok/s); calls below include the prompt's prefill calls")
    print(f"{'kernel':10s} {'weight shape':>14s} {'calls':>6s} {'us/call':>8s} {'GB/s':>6s} {'ms/step':>8s}")
    kernel_ms = 0.0
    for (name, shape), (seconds, calls, numel) in sorted(timed.stats.items()):
        per_call = seconds / calls
        kernel_ms += seconds / steps * 1e3
        print(f"{name:10s} {str(shape):>14s} {calls:6d} {per_call * 1e6:8.0f} {numel / per_call / 1e9:6.1f} {seconds / steps * 1e3:8.2f}")
    print(f"kernels {kernel_ms:.2f} ms of a {step_ms:.2f} ms step")


if __name__ == "__main__":
    main()
