"""Where a prefill's time goes: torch.profiler over one 512-token forward, per operator.

Rows: HF fp32, and TAP with the base tier only and with budget routing (the default). Matrix
products (``aten::mm``), attention and the rest are summed per row, so the prefill ratio's
ceiling can be read off: attention and the element-wise work run in float32 in both models.

    python scripts/profile_prefill.py --model models/smollm2 --tap models/smollm2-tap
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tap_runtime
from bench_common import environment, heldout_text, set_threads

_ATTENTION = "aten::_scaled_dot_product_flash_attention_for_cpu"


def _profile(model, ids: torch.Tensor) -> tuple[float, dict[str, float]]:
    with torch.inference_mode():
        for _ in range(2):
            model(ids, use_cache=False, logits_to_keep=1)
        tick = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        wall = time.perf_counter() - tick
        with torch.profiler.profile() as prof:
            model(ids, use_cache=False, logits_to_keep=1)
    totals = {"matrix products": 0.0, "attention": 0.0, "other operators": 0.0}
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3
        key = "matrix products" if event.key == "aten::mm" else "attention" if event.key == _ATTENTION else "other operators"
        totals[key] += ms
    return wall * 1e3, totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tap", required=True)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = torch.tensor(tokenizer(heldout_text("wikitext"), add_special_tokens=False)["input_ids"][: args.tokens]).unsqueeze(0)
    rows = {}
    rows["HF fp32"] = _profile(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval(), ids)
    tap = tap_runtime.load(args.tap)
    tap.set_routing("fixed", tier=tap.table.tiers[0])
    rows["TAP base tier"] = _profile(tap.model, ids)
    tap.set_routing("budget")
    rows["TAP budget (default)"] = _profile(tap.model, ids)
    print(f"# profile_prefill: {args.tap} vs {args.model}; {ids.shape[1]} tokens, one forward, logits for the last")
    print(f"# {environment()}")
    print(f"{'row':22s} {'wall ms':>8s} {'x fp32':>7s} {'matmul ms':>10s} {'attention ms':>13s} {'other ms':>9s}")
    base_wall = rows["HF fp32"][0]
    for label, (wall, totals) in rows.items():
        print(f"{label:22s} {wall:8.1f} {base_wall / wall:7.2f} {totals['matrix products']:10.1f} "
              f"{totals['attention']:13.1f} {totals['other operators']:9.1f}")


if __name__ == "__main__":
    main()
