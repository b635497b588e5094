"""Where a prefill's time goes: wall time of a 512-token forward in alternating rounds, then
torch.profiler over one forward per row, per operator.

Rows: HF fp32, and TAP with the base tier only and with budget routing (the default). The rows
run in turn within each round, in one process, and the wall time is each row's median: on a
machine whose speed drifts between processes (the 2-core development VM drifts 10-20%) this is
the ratio to go by. The profile sums matrix products (``aten::mm`` and TAP's native plane and
row products, which the profiler sees through record_function), attention, TAP's other native
operators (rotation, SiLU) and the rest, so the prefill ratio's ceiling can be read off.

    python scripts/profile_prefill.py --model models/smollm2 --tap models/smollm2-tap --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tap_runtime
from bench_common import environment, heldout_text, set_threads
from tap_runtime.kernels.native import native_kernels

_ATTENTION = "aten::_scaled_dot_product_flash_attention_for_cpu"
_NATIVE_PRODUCTS = ("matmul_w4", "matmul_w4_lanes", "matmul_w4_many", "matmul_w4_rows_add", "matmul_w8")
_NATIVE_ATTENTION = ("attend_causal",)
_NATIVE_OTHER = ("hadamard_blocks", "silu_mul_rows", "dequantize_w4", "dequantize_w4_sum")
_CATEGORIES = ("matrix products", "attention", "TAP native other", "other operators")


@contextlib.contextmanager
def _labelled_native_calls():
    """Each native kernel call inside a record_function named after it (restored on exit)."""
    native = native_kernels()
    names = [n for n in _NATIVE_PRODUCTS + _NATIVE_ATTENTION + _NATIVE_OTHER if native is not None and hasattr(native, n)]
    originals = {n: getattr(native, n) for n in names}

    def labelled(name, function):
        def call(*args, **kwargs):
            with torch.profiler.record_function(f"tap::{name}"):
                return function(*args, **kwargs)

        return call

    for name, function in originals.items():
        setattr(native, name, labelled(name, function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(native, name, function)


def _category(key: str) -> str:
    if key == "aten::mm" or key in {f"tap::{n}" for n in _NATIVE_PRODUCTS}:
        return "matrix products"
    if key == _ATTENTION or key in {f"tap::{n}" for n in _NATIVE_ATTENTION}:
        return "attention"
    if key in {f"tap::{n}" for n in _NATIVE_OTHER}:
        return "TAP native other"
    return "other operators"


def _profile(forward) -> dict[str, float]:
    with _labelled_native_calls(), torch.profiler.profile() as prof:
        forward()
    totals = dict.fromkeys(_CATEGORIES, 0.0)
    for event in prof.key_averages():
        totals[_category(event.key)] += event.self_cpu_time_total / 1e3
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tap", required=True)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of wall-time measurement (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--base-activation-bits", type=int, default=None, choices=(8, 15),
                        help="tap_runtime.load's base_activation_bits (default: the kernel's own choice)")
    args = parser.parse_args()
    set_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = torch.tensor(tokenizer(heldout_text("wikitext"), add_special_tokens=False)["input_ids"][: args.tokens]).unsqueeze(0)
    if getattr(tokenizer, "bos_token_id", None) is not None and "gemma" in type(tokenizer).__name__.lower():
        ids[0, 0] = tokenizer.bos_token_id  # gemma needs its BOS token first
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tap = tap_runtime.load(args.tap, base_activation_bits=args.base_activation_bits)

    def run(model, routing=None):
        def prepare():
            if routing is not None:
                tap.set_routing(routing[0], **routing[1])

        def forward():
            model(ids, use_cache=False, logits_to_keep=1)

        return prepare, forward

    rows = {
        "HF fp32": run(hf),
        "TAP base tier": run(tap.model, ("fixed", {"tier": tap.table.tiers[0]})),
        "TAP budget (default)": run(tap.model, ("budget", {})),
    }
    walls: dict[str, list[float]] = {label: [] for label in rows}
    with torch.inference_mode():
        for round_index in range(args.rounds + 1):
            for label, (prepare, forward) in rows.items():
                prepare()
                tick = time.perf_counter()
                forward()
                if round_index:  # round 0 warms up
                    walls[label].append(time.perf_counter() - tick)
        profiles = {}
        for label, (prepare, forward) in rows.items():
            prepare()
            profiles[label] = _profile(forward)
    print(f"# profile_prefill: {args.tap} vs {args.model}; {ids.shape[1]} tokens, one forward, logits for the last")
    print(f"# wall: median of {args.rounds} alternating rounds in one process; the other columns: one profiled forward per row")
    print(f"# {environment()}")
    print(f"{'row':22s} {'wall ms':>8s} {'x fp32':>7s} {'matmul ms':>10s} {'attention ms':>13s} {'TAP native other ms':>20s} {'other ms':>9s}")
    medians = {label: statistics.median(values) * 1e3 for label, values in walls.items()}
    for label, totals in profiles.items():
        print(f"{label:22s} {medians[label]:8.1f} {medians['HF fp32'] / medians[label]:7.2f} {totals['matrix products']:10.1f} "
              f"{totals['attention']:13.1f} {totals['TAP native other']:20.1f} {totals['other operators']:9.1f}")


if __name__ == "__main__":
    main()
