"""A prefill's plane products through the lane kernels against unpack + GEMM, in one process.

In a many-token call the tokens the router sends to tier 8 need the residual plane for their
rows only. ``CpuVnniKernel.lane_residuals`` (default on) multiplies those rows with the native
lane kernel (8-bit activations per block of 64, the 4-bit plane read as stored: 16 rows per
register on VNNI, 8 on AVX2); off, the plane is unpacked and multiplied densely, as before. On
the AVX2 build the base plane's products go through the 8-row lanes too: with 8-bit activations
(``CpuVnniKernel.lane_base``, the AVX2 default) or 15-bit ones (``wide_lanes``; the "15-bit
lanes" setting). This script
times one --tokens forward (last logits kept, as generate's prefill) on the base tier and with
the default routing under each setting, alternated --rounds times, with the seconds spent in the
routed residual products; with --model (the fp32 source) it then measures perplexity and mean
KL against fp32 on --windows held-out windows under each setting.

    python scripts/bench_lane_residuals.py --tap models/qwen1.5b-tap-v4 --model models/qwen1.5b --windows 2
    python scripts/bench_lane_residuals.py --tap models/smollm2-tap --model models/smollm2 --windows 8
"""

from __future__ import annotations

import statistics
import time

import torch

import tap_runtime
from tap_runtime.layers import TapLinear
from bench_common import environment, eval_windows, heldout_text, prefill_ab_arguments, reference_logprobs, window_quality


def _kernels(tap) -> list:
    kernels = {id(m.kernel): m.kernel for m in tap.model.modules() if isinstance(m, TapLinear) and m.kernel is not None}
    return [k for k in kernels.values() if hasattr(k, "lane_residuals")]


# Settings compared: (lane_residuals, wide_lanes, lane_base (8-bit base products; None: the
# build's default), lanes from the build's lane threshold or, off, from the dense one, as before
# the AVX2 lanes existed).
SETTINGS = {
    "lanes": (True, True, None, True),
    "15-bit lanes": (True, True, False, True),
    "residual lanes": (True, False, False, True),
    "unpack": (False, False, False, False),
}


def _set_lanes(kernels, setting: str, defaults: dict) -> None:
    residuals, wide, base, lane_threshold = SETTINGS[setting]
    for kernel in kernels:
        default_wide, default_min, default_base = defaults[id(kernel)]
        kernel.lane_residuals = residuals
        kernel.wide_lanes = wide and default_wide
        kernel.lane_base = default_base if base is None else base
        kernel.lane_min_tokens = default_min if lane_threshold else kernel.vnni_dense_min_tokens


def main() -> None:
    args = prefill_ab_arguments(__doc__)
    tap = tap_runtime.load(args.tap)
    kernels = _kernels(tap)
    if not kernels:
        raise SystemExit(f"{args.tap}: its linears did not load on TAP's native CPU kernels here, so there is no lane kernel to compare")
    defaults = {id(k): (k.wide_lanes, k.lane_min_tokens, k.lane_base) for k in kernels}
    # Settings that differ from "lanes" on this build only (VNNI: no 15-bit lanes, no 8-bit base by default).
    wide_build, base_build = any(d[0] for d in defaults.values()), any(d[2] for d in defaults.values())
    settings = [name for name in SETTINGS if (name != "residual lanes" or wide_build) and (name != "15-bit lanes" or base_build)]
    print(f"# bench_lane_residuals: {args.tap}; {environment()}; kernel {kernels[0].name}")
    ids = tap.tokenizer(heldout_text("wikitext"), return_tensors="pt", add_special_tokens=False)["input_ids"][:, : args.tokens]
    routed_seconds = [0.0]
    for kernel in kernels:
        product = kernel.matmul_routed

        def timed(*call, _product=product):
            tick = time.perf_counter()
            try:
                return _product(*call)
            finally:
                routed_seconds[0] += time.perf_counter() - tick

        kernel.matmul_routed = timed
    configs = ("base tier", *settings)
    rates: dict[str, list[float]] = {c: [] for c in configs}
    routed: dict[str, list[float]] = {c: [] for c in configs}
    with torch.inference_mode():
        for round_index in range(args.rounds + 1):
            for config in configs:
                if config == "base tier":
                    tap.set_routing("fixed", tier=tap.table.tiers[0])
                    _set_lanes(kernels, "lanes", defaults)
                else:
                    tap.set_routing("budget")
                    _set_lanes(kernels, config, defaults)
                routed_seconds[0] = 0.0
                tick = time.perf_counter()
                tap.model(ids, use_cache=False, logits_to_keep=1)
                if round_index:  # round 0 warms up
                    rates[config].append(ids.shape[1] / (time.perf_counter() - tick))
                    routed[config].append(routed_seconds[0])
    for kernel in kernels:
        del kernel.matmul_routed  # back to the class's method
    for config in configs:
        print(f"prefill {config:14s} {ids.shape[1]} tokens: {statistics.median(rates[config]):7.1f} tok/s; "
              f"routed residual products {statistics.median(routed[config]):.3f} s")
    pairs = [(a, b) for a in settings for b in settings if settings.index(a) < settings.index(b)]
    for a, b in pairs + [(a, "base tier") for a in settings]:
        ratios = [x / y for x, y in zip(rates[a], rates[b])]
        print(f"  {a} / {b}: median {statistics.median(ratios):.3f} (rounds {[round(r, 3) for r in ratios]})")
    tap.set_routing("budget")
    _set_lanes(kernels, "lanes", defaults)
    if not args.model or args.windows <= 0:
        return

    windows = eval_windows(tap.tokenizer, heldout_text("wikitext"), 512, args.windows, tap.tokenizer.bos_token_id)
    references = reference_logprobs(args.model, windows)
    for setting in settings:
        _set_lanes(kernels, setting, defaults)
        ppl, kl = window_quality(lambda ids: tap.model(ids).logits, windows, references)
        print(f"quality default routing, {len(windows)} windows: {setting:14s} ppl {ppl:.4f}  mean KL {kl:.5f}")
    _set_lanes(kernels, "lanes", defaults)


if __name__ == "__main__":
    main()
