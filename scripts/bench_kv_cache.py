"""The int8 KV cache (dynamic per-vector scales) against the float one: quality, size and speed.

Quality: each held-out window runs through the lean decode loop in chunks of --chunk tokens,
so every chunk attends to the earlier positions read back from the cache, with the default
routing; perplexity ratio and mean KL against the fp32 model on the same windows, for both
caches. Size: the cache's bytes for one window. Speed: decode tokens/s of generate (32-token
prompt, --new-tokens greedy) with each cache, alternated --rounds times (this machine drifts).

    python scripts/bench_kv_cache.py --model models/smollm2 --tap models/smollm2-tap --windows 8
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the fp32 source model directory")
    parser.add_argument("--tap", required=True, help="the TAP checkpoint converted from it")
    parser.add_argument("--text", default="wikitext", help="wikitext / c4 (held-out parts) or a .txt path")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=64, help="tokens per forward; later chunks read the cache")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    started = time.perf_counter()

    tap, tokenizer, windows = load_tap_and_windows(args)
    reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rows = {}
    with torch.inference_mode():
        reference_logprobs = [torch.log_softmax(reference(w.unsqueeze(0)).logits[0, :-1].float(), -1) for w in windows]
        nll = sum(-lp.gather(-1, w[1:, None]).sum().item() for lp, w in zip(reference_logprobs, windows))
        count = sum(w.numel() - 1 for w in windows)
        rows["fp32 (no cache)"] = {"ppl": math.exp(nll / count), "kl": 0.0, "cache_bytes": 0}
        del reference
        for kind in ("float", "int8"):
            decoder = FastDecoder(tap.model, kv_cache=kind)
            tap.set_routing()  # the default routing
            nll = kl = 0.0
            for window, ref in zip(windows, reference_logprobs):
                decoder._allocate(window.numel(), torch.float32, window.device)
                ids = window.unsqueeze(0)
                chunks = [decoder.forward(ids[:, s : s + args.chunk], s, all_logits=True) for s in range(0, ids.shape[1], args.chunk)]
                logprobs = torch.log_softmax(torch.cat(chunks)[:-1].float(), -1)
                nll -= logprobs.gather(-1, window[1:, None]).sum().item()
                kl += (ref.exp() * (ref - logprobs)).sum().item()
            rows[f"TAP default routing, {kind} KV cache"] = {"ppl": math.exp(nll / count), "kl": kl / count, "cache_bytes": decoder.cache.nbytes}

    prompt = windows[0, :32].unsqueeze(0)
    rates: dict[str, list[float]] = {"float": [], "int8": []}
    for _ in range(args.rounds):
        for kind in rates:
            tap.generate(input_ids=prompt, max_new_tokens=8, kv_cache=kind, eos_token_id=[])  # warm-up
            done = tap.generate(input_ids=prompt, max_new_tokens=args.new_tokens, kv_cache=kind, eos_token_id=[])
            rates[kind].append(done.metrics.decode_tokens_per_second)

    fp32_ppl = rows["fp32 (no cache)"]["ppl"]
    print(f"# bench_kv_cache: {args.tap} vs {args.model}; text={args.text} held-out, {args.windows} windows x {args.ctx} tokens, "
          f"chunks of {args.chunk}")
    print(f"# {environment()}; {time.perf_counter() - started:.0f}s")
    print("| config | ppl | ppl ratio | mean KL | cache bytes per window |")
    print("|---|---|---|---|---|")
    for label, row in rows.items():
        print(f"| {label} | {row['ppl']:.3f} | {row['ppl'] / fp32_ppl:.4f} | {row['kl']:.4f} | {row['cache_bytes']:,} |")
    float_rate, int8_rate = statistics.median(rates["float"]), statistics.median(rates["int8"])
    print(f"\ndecode tok/s ({args.new_tokens} new tokens, medians of {args.rounds} alternated rounds): "
          f"float cache {float_rate:.1f}, int8 cache {int8_rate:.1f} ({int8_rate / float_rate:.2f}x)")


if __name__ == "__main__":
    main()
