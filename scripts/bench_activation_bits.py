"""What 8-bit activations on the base plane cost and buy, in decode and in prefill.

TAP's native kernel (VNNI or AVX2 build) quantizes activations per block of 64 to 15 bits; with
``CpuVnniKernel(base_wide_above=T)`` a call whose tokens read the base plane alone (they already
carry the 4-bit plane's error) takes 8 bits in the blocks whose peak is at most T times their RMS
(T = inf: every block 8 bits). ``load(base_activation_bits=8)`` sets T = inf and also sends every
many-token call's base product through the 8-bit lane kernel instead of the 15-bit path (a
bfloat16 GEMM on VNNI, the 15-bit lanes on AVX2) (``CpuVnniKernel.lane_base``, both builds'
default in prefill). This script measures, on one checkpoint in one process:

- decode quality: held-out windows fed one token at a time through the lean loop (so every
  product goes through the one-token kernel, as in decode), KL and perplexity against fp32, for
  the default routing and for every token on the base tier: 15 bits everywhere, 8 bits
  everywhere and each ``--wide-above`` T;
- how many blocks each T sends to 15 bits, counted on the same windows' base-only calls;
- prefill quality: the same windows as whole forwards (the many-token path), 15 against 8 bits;
- speed: decode tok/s (128 new tokens, default routing) and 512-token prefill tok/s (base tier
  and default routing), the settings alternated.

    python scripts/bench_activation_bits.py --model models/smollm2 --tap models/smollm2-tap-hr --wide-above 4
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from bench_common import environment, load_tap_and_windows, set_threads
from tap_runtime.decode import DirectDecodeLayer, FastDecoder
from tap_runtime.kernels.vnni import ALL_NARROW, ALL_WIDE, BASE_ACTIVATION_BITS, BLOCK, CpuVnniKernel


def _kernels(tap) -> list[CpuVnniKernel]:
    kernels = {id(m.kernel): m.kernel for m in tap.model.modules() if isinstance(getattr(m, "kernel", None), CpuVnniKernel)}
    if not kernels:
        raise SystemExit("the checkpoint did not load with TAP's native kernel (cpu-vnni or cpu-avx2); nothing to compare")
    return list(kernels.values())


def _set_wide_above(tap, wide_above: float) -> None:
    for kernel in _kernels(tap):
        kernel.base_wide_above = wide_above
        kernel.lane_base = False


def _set_bits(tap, bits: int) -> None:
    for kernel in _kernels(tap):
        kernel.set_base_activation_bits(bits)


class _BlockCounter:
    """Counts, for each threshold, the activation blocks of one-token base-only products that it
    would send to 15 bits (the kernel's rule, recomputed in float32 on the products' inputs)."""

    def __init__(self, thresholds: list[float]):
        self.thresholds, self.wide, self.total = thresholds, [0] * len(thresholds), 0
        self._original = DirectDecodeLayer.plane_product

    def __enter__(self):
        counter, original = self, self._original

        def plane_product(flat, plane, wide_above=ALL_WIDE):
            if wide_above != ALL_WIDE and flat.shape[-1] % BLOCK == 0:  # a base-only product
                blocks = flat.float().reshape(-1, BLOCK)
                peak_squared, mean_square = blocks.abs().amax(-1).square(), blocks.square().mean(-1)
                counter.total += blocks.shape[0]
                for i, threshold in enumerate(counter.thresholds):
                    counter.wide[i] += int((peak_squared > threshold * threshold * mean_square).sum())
            return original(flat, plane, wide_above)

        DirectDecodeLayer.plane_product = staticmethod(plane_product)
        return self

    def __exit__(self, *exc):
        DirectDecodeLayer.plane_product = staticmethod(self._original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the fp32 source model directory")
    parser.add_argument("--tap", required=True)
    parser.add_argument("--text", default="wikitext")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--wide-above", type=float, nargs="*", default=[4.0],
                        help="thresholds T to compare: blocks whose peak exceeds T x RMS keep 15 bits")
    args = parser.parse_args()
    set_threads(args.threads)
    started = time.perf_counter()
    tap, _, windows = load_tap_and_windows(args)
    default_bits = 8 if _kernels(tap)[0].lane_base else 15  # the build's prefill default (lane_base)
    settings = {"15-bit everywhere (decode default)": ALL_WIDE, "8-bit on base-only calls": ALL_NARROW}
    for threshold in args.wide_above:
        settings[f"8-bit on base-only calls, 15-bit blocks above {threshold:g} x RMS"] = threshold
    shares: dict[float, float] = {}
    rows = []
    if not args.skip_quality:
        reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        with torch.inference_mode():
            reference_logprobs = [torch.log_softmax(reference(w.unsqueeze(0)).logits[0, :-1].float(), -1) for w in windows]
            count = sum(w.numel() - 1 for w in windows)
            fp32_nll = sum(-lp.gather(-1, w[1:, None]).sum().item() for lp, w in zip(reference_logprobs, windows))
            del reference
            for routing in (("budget", None), ("fixed", tap.table.tiers[0])):
                for label, wide_above in settings.items():
                    _set_wide_above(tap, wide_above)
                    tap.set_routing(*routing)
                    decoder = FastDecoder(tap.model)
                    nll = kl = 0.0
                    for window, ref in zip(windows, reference_logprobs):
                        decoder._allocate(window.numel(), torch.float32, window.device)
                        ids = window.unsqueeze(0)
                        steps = [decoder.forward(ids[:, s : s + 1], s, all_logits=True) for s in range(ids.shape[1])]
                        logprobs = torch.log_softmax(torch.cat(steps)[:-1].float(), -1)
                        nll -= logprobs.gather(-1, window[1:, None]).sum().item()
                        kl += (ref.exp() * (ref - logprobs)).sum().item()
                    name = "default routing" if routing[0] == "budget" else f"every token tier {routing[1]}"
                    rows.append((name, label, math.exp((nll - fp32_nll) / count), kl / count))
        if args.wide_above:
            tap.set_routing()
            _set_wide_above(tap, args.wide_above[0])  # any value but ALL_WIDE routes base-only calls to matmul_base
            decoder = FastDecoder(tap.model)
            decoder.native_layers = False  # whole native layers call the kernels from C++, past the counter
            with torch.inference_mode(), _BlockCounter(args.wide_above) as counter:
                for window in windows:
                    decoder._allocate(window.numel(), torch.float32, window.device)
                    for s in range(window.numel()):
                        decoder.forward(window[None, s : s + 1], s)
            if not counter.total:
                raise SystemExit("no base-only one-token product went through DirectDecodeLayer.plane_product; the count is void")
            shares = {t: w / counter.total for t, w in zip(args.wide_above, counter.wide)}
        prefill_rows = []
        with torch.inference_mode():
            for routing in (("budget", None), ("fixed", tap.table.tiers[0])):
                tap.set_routing(*routing)
                for bits in BASE_ACTIVATION_BITS:
                    _set_bits(tap, bits)
                    nll = kl = 0.0
                    for window, ref in zip(windows, reference_logprobs):
                        logprobs = torch.log_softmax(tap.model(window.unsqueeze(0)).logits[0, :-1].float(), -1)
                        nll -= logprobs.gather(-1, window[1:, None]).sum().item()
                        kl += (ref.exp() * (ref - logprobs)).sum().item()
                    name = "default routing" if routing[0] == "budget" else f"every token tier {routing[1]}"
                    prefill_rows.append((name, bits, math.exp((nll - fp32_nll) / count), kl / count))
        _set_bits(tap, 15)
    prefill_text = torch.cat(list(windows))[: args.prefill_tokens].unsqueeze(0)
    prefill_rates: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for round_index in range(args.rounds + 1):  # round 0 warms up
            for routing in (("fixed", tap.table.tiers[0]), ("budget", None)):
                tap.set_routing(*routing)
                for bits in BASE_ACTIVATION_BITS:
                    _set_bits(tap, bits)
                    tick = time.perf_counter()
                    tap.model(prefill_text, use_cache=False, logits_to_keep=1)
                    if round_index:
                        prefill_rates.setdefault((routing[0], bits), []).append(prefill_text.shape[1] / (time.perf_counter() - tick))
    _set_bits(tap, 15)
    tap.set_routing()
    prompt = windows[0, :32].unsqueeze(0)
    rates: dict[str, list[float]] = {label: [] for label in settings}
    for _ in range(args.rounds):
        for label, wide_above in settings.items():
            _set_wide_above(tap, wide_above)
            tap.generate(input_ids=prompt, max_new_tokens=8, eos_token_id=[])  # warm-up
            done = tap.generate(input_ids=prompt, max_new_tokens=args.new_tokens, eos_token_id=[])
            rates[label].append(done.metrics.decode_tokens_per_second)
    print(f"# bench_activation_bits: {args.tap} vs {args.model}; {args.text} held-out, {args.windows} windows x {args.ctx} "
          f"tokens fed one at a time; {environment()}; {time.perf_counter() - started:.0f}s")
    if rows:
        print("| routing | activations | ppl ratio | mean KL |")
        print("|---|---|---|---|")
        for name, label, ratio, kl in rows:
            print(f"| {name} | {label} | {ratio:.4f} | {kl:.4f} |")
    if shares:
        print("\nblocks of base-only calls kept at 15 bits (default routing, same windows): "
              + ", ".join(f"T = {t:g}: {share:.1%}" for t, share in shares.items()))
    if not args.skip_quality:
        first = _kernels(tap)[0]
        wide_path = "the 15-bit lanes" if first.wide_lanes else f"a {str(first.dense_dtype).removeprefix('torch.')} GEMM"
        print(f"\nprefill path (each window one forward; base products through {wide_path} at 15 bits, the lane kernel at 8):")
        print("| routing | base activations | ppl ratio | mean KL |")
        print("|---|---|---|---|")
        for name, bits, ratio, kl in prefill_rows:
            print(f"| {name} | {bits}-bit | {ratio:.4f} | {kl:.4f} |")
    print(f"\nprefill tok/s, {prefill_text.shape[1]} tokens, medians of {args.rounds} alternated rounds:")
    print(f"| routing | 15-bit | 8-bit | 8 / 15 (median of rounds) |  (default in prefill: {default_bits}-bit)")
    print("|---|---|---|---|")
    for routing, name in (("fixed", "base tier"), ("budget", "default routing")):
        wide, narrow = prefill_rates[(routing, 15)], prefill_rates[(routing, 8)]
        ratio = statistics.median(n / w for n, w in zip(narrow, wide))
        print(f"| {name} | {statistics.median(wide):.1f} | {statistics.median(narrow):.1f} | {ratio:.3f} |")
    medians = {label: statistics.median(r) for label, r in rates.items()}
    default = medians["15-bit everywhere (decode default)"]
    print(f"\ndecode tok/s, default routing, {args.new_tokens} new tokens, medians of {args.rounds} alternated rounds:")
    print("| activations | tok/s | x 15-bit everywhere |")
    print("|---|---|---|")
    for label, rate in medians.items():
        print(f"| {label} | {rate:.1f} | {rate / default:.3f} |")


if __name__ == "__main__":
    main()
