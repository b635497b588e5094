"""How much of a tier's loss is the 8-bit output head's: the same TAP model with its own head
and with the fp32 model's head (and embedding) swapped in, on the same held-out windows.

    python scripts/bench_head_share.py --model models/smollm2 --tap models/smollm2-tap --tier 8
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import AutoModelForCausalLM

from bench_common import environment, load_tap_and_windows, set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the fp32 source model directory")
    parser.add_argument("--tap", required=True)
    parser.add_argument("--tier", type=int, default=8, help="every token on this tier")
    parser.add_argument("--text", default="wikitext")
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    tap, _, windows = load_tap_and_windows(args)
    tap.set_routing("fixed", tier=args.tier)
    reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    with torch.inference_mode():
        references = [torch.log_softmax(reference(w.unsqueeze(0)).logits[0, :-1].float(), -1) for w in windows]

    def evaluate(model) -> tuple[float, float]:
        nll = kl = 0.0
        count = 0
        with torch.inference_mode():
            for window, ref in zip(windows, references):
                logprobs = torch.log_softmax(model(window.unsqueeze(0)).logits[0, :-1].float(), -1)
                nll -= logprobs.gather(-1, window[1:, None]).sum().item()
                kl += (ref.exp() * (ref - logprobs)).sum().item()
                count += window.numel() - 1
        return math.exp(nll / count), kl / count

    fp32_ppl, _ = evaluate(reference)
    model = tap.model
    rows = {f"TAP tier {args.tier}": evaluate(model)}
    own_head, own_embedding = model.lm_head, model.model.embed_tokens
    model.lm_head = reference.lm_head
    rows[f"TAP tier {args.tier}, fp32 head"] = evaluate(model)
    model.model.embed_tokens = reference.model.embed_tokens
    rows[f"TAP tier {args.tier}, fp32 head and embedding"] = evaluate(model)
    model.lm_head, model.model.embed_tokens = own_head, own_embedding
    head_methods = {name: policy.method for name, policy in tap.table.embeddings.items()}
    print(f"# bench_head_share: {args.tap} vs {args.model}; {args.windows} windows x {args.ctx} of {args.text}; rows {head_methods}")
    print(f"# {environment()}")
    print("| config | ppl ratio | mean KL |\n|---|---|---|")
    for label, (ppl, kl) in rows.items():
        print(f"| {label} | {ppl / fp32_ppl:.4f} | {kl:.5f} |")


if __name__ == "__main__":
    main()
