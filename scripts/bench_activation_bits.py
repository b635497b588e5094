"""What 8-bit activations on the base plane cost and buy: token-by-token quality and decode speed.

TAP's VNNI kernel quantizes activations to 15 bits; with ``CpuVnniKernel.coarse_base`` it uses 8
bits for a call whose tokens read the base plane alone (they already carry the 4-bit plane's
error). This script measures both settings on the same checkpoint, in one process:

- quality: held-out windows fed one token at a time through the lean loop (so every product
  goes through the one-token kernel, as in decode), KL and perplexity against fp32, for the
  default routing and for every token on the base tier;
- speed: decode tok/s (128 new tokens, default routing), the two settings alternated.

    python scripts/bench_activation_bits.py --model models/smollm2 --tap models/smollm2-tap
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from bench_common import environment, load_tap_and_windows, set_threads
from tap_runtime.decode import FastDecoder
from tap_runtime.kernels.vnni import CpuVnniKernel


def _set_coarse(tap, coarse: bool) -> None:
    kernels = {id(m.kernel): m.kernel for m in tap.model.modules() if isinstance(getattr(m, "kernel", None), CpuVnniKernel)}
    if not kernels:
        raise SystemExit("the checkpoint did not load with TAP's VNNI kernel (kernel 'cpu-vnni'); nothing to compare")
    for kernel in kernels.values():
        kernel.coarse_base = coarse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the fp32 source model directory")
    parser.add_argument("--tap", required=True)
    parser.add_argument("--text", default="wikitext")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    set_threads(args.threads)
    started = time.perf_counter()
    tap, _, windows = load_tap_and_windows(args)
    settings = {"8-bit on base-only calls": True, "15-bit everywhere (default)": False}
    rows = []
    if not args.skip_quality:
        reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        with torch.inference_mode():
            reference_logprobs = [torch.log_softmax(reference(w.unsqueeze(0)).logits[0, :-1].float(), -1) for w in windows]
            count = sum(w.numel() - 1 for w in windows)
            fp32_nll = sum(-lp.gather(-1, w[1:, None]).sum().item() for lp, w in zip(reference_logprobs, windows))
            del reference
            for routing in (("budget", None), ("fixed", tap.table.tiers[0])):
                for label, coarse in settings.items():
                    _set_coarse(tap, coarse)
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
    tap.set_routing()
    prompt = windows[0, :32].unsqueeze(0)
    rates: dict[str, list[float]] = {label: [] for label in settings}
    for _ in range(args.rounds):
        for label, coarse in settings.items():
            _set_coarse(tap, coarse)
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
    medians = {label: statistics.median(r) for label, r in rates.items()}
    coarse_label, fine_label = list(settings)  # ratio: 8-bit setting over the default
    print(f"\ndecode tok/s, default routing, {args.new_tokens} new tokens, medians of {args.rounds} alternated rounds: "
          + ", ".join(f"{label} {rate:.1f}" for label, rate in medians.items())
          + f"; ratio {medians[coarse_label] / medians[fine_label]:.3f}")


if __name__ == "__main__":
    main()
