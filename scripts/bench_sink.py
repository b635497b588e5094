"""How much of a tier's loss is the attention sink's: the first token's keys and values.

For each tier, every token runs on that tier; then the key/value projections (the
architecture's ``key_value_projections``) are given their float32 output for the first
``--first`` positions of each window, all else unchanged. If the first row recovers most of the
tier's KL, the quantized keys and values of the sequence's first token, which every later token
attends to, are where that tier loses.

    python scripts/bench_sink.py --model models/smollm2 --tap models/smollm2-tap --windows 16

Prints perplexity ratio and mean KL(fp32 || TAP) per (tier, first positions exact).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from bench_common import environment, load_tap_and_windows, set_threads
from tap_runtime.architectures import get_architecture
from tap_runtime.layers import TapLinear


class FirstPositionsExact(nn.Module):
    """A quantized projection whose output at the first ``first`` positions comes from ``exact``."""

    def __init__(self, quantized: nn.Module, exact: nn.Module):
        super().__init__()
        self.quantized, self.exact, self.first = quantized, exact, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quantized(x)
        if self.first:
            out = out.clone()
            out[:, : self.first] = self.exact(x[:, : self.first]).to(out.dtype)
        return out


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent), leaf, module)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the fp32 source model directory")
    parser.add_argument("--tap", required=True)
    parser.add_argument("--text", default="wikitext")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--first", default="0,1,4", help="comma list of how many first positions get exact keys/values")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    started = time.perf_counter()
    tap, _, windows = load_tap_and_windows(args)
    reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    spec = get_architecture(tap.table.model_type)

    with torch.inference_mode():
        references = [torch.log_softmax(reference(w.unsqueeze(0)).logits[0, :-1].float(), -1) for w in windows]

    def score(model: nn.Module) -> tuple[float, float]:
        nll = kl = 0.0
        count = 0
        with torch.inference_mode():
            for window, ref in zip(windows, references):
                log_probs = torch.log_softmax(model(window.unsqueeze(0)).logits[0, :-1].float(), -1)
                nll -= log_probs.gather(-1, window[1:].unsqueeze(-1)).sum().item()
                kl += (ref.exp() * (ref - log_probs)).sum().item()
                count += window.numel() - 1
        return math.exp(nll / count), kl / count

    fp32_ppl, _ = score(reference)
    exact_modules = dict(reference.named_modules())
    wrapped = []
    for name, module in list(tap.model.named_modules()):
        if isinstance(module, TapLinear) and any(name.endswith("." + p) for p in spec.key_value_projections):
            wrapper = FirstPositionsExact(module, exact_modules[name])
            _replace(tap.model, name, wrapper)
            wrapped.append(wrapper)
    if not wrapped:
        raise SystemExit(f"{args.tap}: no key/value projections {spec.key_value_projections} among the quantized linears")

    rows = []
    for tier in tap.table.tiers:
        tap.set_routing("fixed", tier=tier)
        for first in (int(f) for f in args.first.split(",")):
            for wrapper in wrapped:
                wrapper.first = first
            ppl, kl = score(tap.model)
            rows.append({"tier": tier, "first_exact": first, "ppl_ratio": ppl / fp32_ppl, "kl": kl})
    print(f"# bench_sink: {args.tap} vs {args.model}; text={args.text} held-out, {args.windows} windows x {args.ctx} tokens")
    print(f"# {environment()}; {time.perf_counter() - started:.0f}s; {len(wrapped)} key/value projections")
    print(f"{'tier':>4s} {'first positions exact':>22s} {'ppl ratio':>10s} {'mean KL':>9s}")
    for row in rows:
        print(f"{row['tier']:4d} {row['first_exact']:22d} {row['ppl_ratio']:10.4f} {row['kl']:9.5f}")
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump({"args": vars(args), "environment": environment(), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
