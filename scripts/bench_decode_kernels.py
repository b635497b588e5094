"""Where a decode step's time goes: every TAP kernel call of a lean-loop decode, timed by shape.

Wraps the native kernel module's matmuls with timers, decodes --new-tokens tokens on the base
tier (so every call is one whole token), and prints per plane shape: calls, microseconds per
call and weight GB/s, plus the head's, against the whole step. In the model the planes stream
from memory, unlike scripts/bench_kernels.py's repeated calls on one plane.

    python scripts/bench_decode_kernels.py --tap models/qwen1.5b-tap

--overhead: instead, time the step with every kernel matmul replaced by a call that returns
zeros of the right shape, so what is left is the step's own work (norms, attention, routing,
Python), for the native steps and the torch-operator path, base tier and default routing,
alternated --rounds times in one process.
"""

from __future__ import annotations

import argparse
import collections
import statistics
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


class _ZeroNative:
    """The native module with its matmuls answering zeros at once (their cost taken out)."""

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        if name == "matmul_w4":
            return lambda x, weight, scales, zeros, group_size, wide_above, first_row, rows: torch.zeros(x.shape[0], rows)
        if name == "matmul_w8":
            return lambda x, weight, row_scales, row_sums: torch.zeros(x.shape[0], row_scales.numel())
        return getattr(self.module, name)


def _use_native(tap, module) -> None:
    decode.native_kernels = lambda: module  # the lean loop's direct path and native steps
    for layer in tap.model.modules():
        if isinstance(getattr(layer, "kernel", None), CpuVnniKernel):
            layer.kernel.native = module  # the head and any module-path call


def _overhead(tap, args) -> None:
    """Step time without the kernels' own time, per path and routing."""
    ids = tap.encode("The river flows past the old mill and the")
    decoder = decode.FastDecoder(tap.model)
    decoder.native_layers = False  # a whole-layer native call runs its matmuls where no wrapper sees them
    _use_native(tap, _ZeroNative(native_kernels()))
    results: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    routings = {"base tier": ("fixed", tap.table.tiers[0]), "default routing": ("budget", None)}
    native_supported = decoder.native_steps
    with torch.inference_mode():
        for _ in range(args.rounds):
            for label, (mode, tier) in routings.items():
                tap.set_routing(mode, tier=tier)
                for native in ([True, False] if native_supported else [False]):
                    decoder.native_steps = native
                    decoder.generate(ids, 4, eos_token_id=[])
                    result = decoder.generate(ids, args.new_tokens, eos_token_id=[])
                    step_ms = (result.end - result.first_token_time) / (args.new_tokens - 1) * 1e3
                    results[(label, "native steps" if native else "torch operators")].append(step_ms)
    print(f"# bench_decode_kernels --overhead: {args.tap}, kernels answering zeros, {args.new_tokens - 1} steps, "
          f"{args.rounds} alternated rounds; {environment()}")
    for (label, path), values in results.items():
        print(f"{label:16s} {path:16s} median {statistics.median(values):6.2f} ms/step  rounds {[round(v, 2) for v in values]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tap", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--overhead", action="store_true", help="time the step with the kernels taken out")
    parser.add_argument("--rounds", type=int, default=3, help="with --overhead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if native_kernels() is None:
        raise SystemExit(f"TAP's native kernels are unavailable here: {native_unavailable_reason()}")
    tap = tap_runtime.load(args.tap)
    if args.overhead:
        _overhead(tap, args)
        return
    tap.set_routing("fixed", tier=tap.table.tiers[0])
    timed = _TimedNative(native_kernels())
    decode.native_kernels = lambda: timed  # the lean loop's direct path
    for module in tap.model.modules():
        if isinstance(getattr(module, "kernel", None), CpuVnniKernel):
            module.kernel.native = timed  # the head and any module-path call
    ids = tap.encode("The river flows past the old mill and the")
    decoder = decode.FastDecoder(tap.model)
    decoder.native_layers = False  # a whole-layer native call runs its matmuls where no wrapper sees them
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
