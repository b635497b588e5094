"""Generate from a TAP checkpoint and print the text with what the call measured.

    python scripts/generate.py models/smollm2-tap "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import json

import torch

import tap_runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="TAP checkpoint directory or Hub repo id")
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    parser.add_argument("--routing", choices=["budget", "learned", "fixed", "random"], default="budget",
                        help="budget (the runtime's default: holds the converted share), learned (fixed thresholds), ...")
    parser.add_argument("--tier", type=int, default=None, help="the tier for --routing fixed")
    parser.add_argument("--sample", action="store_true", help="sample (temperature 0.7) instead of greedy")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--base-activation-bits", type=int, choices=[15, 8], default=None,
                        help="TAP's native kernel: 15 everywhere, or 8 in decode too (default: 15 in decode, and in "
                             "prefill 8 on cpu-avx2, 15 on cpu-vnni; README, 8-bit activations in prefill)")
    parser.add_argument("--json", action="store_true", help="print all metrics as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = tap_runtime.load(args.checkpoint, base_activation_bits=args.base_activation_bits)
    model.set_routing(args.routing, tier=args.tier)
    sampling = {"do_sample": True, "temperature": 0.7} if args.sample else {}
    result = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, chat=not args.no_chat, **sampling)
    print(result.text.strip())
    print()
    print(result.metrics.summary())
    if args.json:
        print(json.dumps(result.metrics.to_dict(), indent=2))


if __name__ == "__main__":
    main()
