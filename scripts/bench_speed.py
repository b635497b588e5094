"""Decode and prefill speed, peak memory and size: HF fp32, HF bf16 and TAP, measured in one run.

Each row runs in its own fresh process (so its peak RSS is its own), on the same prompt and
thread count. Decode: batch 1, greedy, a 32-token prompt, exactly --new-tokens new tokens.
Prefill: one forward over --prefill-tokens tokens keeping the last position's logits (as
generate does). Medians of --repeats after a warm-up.

Rows: HF fp32 / bf16 (transformers' generate); TAP base tier only, learned routing (fixed
thresholds: the share follows the text), budget routing (the default: share held at the
converted 10%), learned through transformers' generate (-eager), all
tokens on the top tier; the same base / learned rows loaded in memory-efficient mode
(-lowmem); llama.cpp Q4_K_M and Q8_0 through llama-cpp-python when installed.

    python scripts/bench_speed.py --model models/smollm2 --tap models/smollm2-tap
"""

from __future__ import annotations

import argparse
import math
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_common import environment, heldout_text
from tap_runtime.metrics import FirstTokenClock

ROWS = ("hf-fp32", "hf-fp32-heap", "hf-bf16", "tap-base", "tap-learned", "tap-budget", "tap-learned-eager", "tap-top", "tap-base-lowmem", "tap-learned-lowmem",
        "tap-base-torch", "tap-budget-torch", "tap-budget-heap", "llama.cpp-Q4_K_M", "llama.cpp-Q8_0")
# Optional rows (not run by default): tap-base / tap-budget with -a8 (load(base_activation_bits=8):
# 8-bit activations on every base-only product in decode and on every base product in prefill),
# -a15 (load(base_activation_bits=15): 15 bits everywhere; the default takes 8 in an AVX2
# prefill's base products) or -amix (decode only: 8 bits per block of 64 unless the block's peak
# exceeds 4 x its RMS), see CpuVnniKernel.base_wide_above and .lane_base.
ACTIVATION_SUFFIXES = {"-a8": math.inf, "-a15": 0.0, "-amix": 4.0}
ACTIVATION_BITS = {"-a8": 8, "-a15": 15}
# -unpacked rows (tap-base-unpacked, tap-budget-unpacked, ...) switch TAP's lane kernels off:
# many-token calls unpack planes and multiply densely, as before the AVX2 lanes existed, so one
# run shows what the lanes change.
# -heap rows set glibc to keep freed heap memory for the next layer's activations
# (pages.keep_freed_heap; tap_runtime.load(keep_freed_memory=True), off by default), for HF fp32
# and TAP alike, so the setting's share of a ratio can be read off.
# -torch rows load with kernel="cpu-packed": torch's int4/int8 ops instead of TAP's VNNI kernels
# (the default where the CPU has them), to show what the kernels alone change.
# -lowmem rows load in memory-efficient mode (residual planes read from the shards on demand);
# tap-budget, the default routing, holds the routed share at the fitted one (10% by default) on any text.
# -other rows (tap-base-other, tap-budget-other, ...) load --other-tap instead of --tap: an A/B of
# two conversions of the same model (e.g. --rotation hadamard against none) in one run.
# TAP rows decode through TapModel.generate (the lean loop where the architecture has one); the
# -eager row forces transformers' generate on the same checkpoint, to show what the loop saves.


def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _directory_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def run_llama_cpp_row(row: str, args, ids: torch.Tensor) -> dict:
    """llama.cpp through its Python binding: same token ids, greedy, same thread count."""
    import numpy as np

    import llama_cpp_peer as lcp

    lcp.ensure_available()
    qtype = row.split("-", 1)[1]
    gguf = lcp.quantize(lcp.f32_gguf(args.model), qtype, args.threads)
    runner = lcp.LlamaCppLogits(gguf, max(args.prefill_tokens, args.prompt_tokens + args.new_tokens) + 8, args.threads)
    llm = runner.llm
    load_rss = _vm_hwm_bytes()
    prompt = ids[: args.prompt_tokens].tolist()
    decode_rates, prefill_rates = [], []
    for repeat in range(args.repeats + 1):
        llm.reset()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tick = time.perf_counter()
        for _ in range(args.new_tokens - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        decode_s = time.perf_counter() - tick
        llm.reset()
        tick = time.perf_counter()
        llm.eval(ids.tolist())
        prefill_s = time.perf_counter() - tick
        if repeat == 0:
            continue
        decode_rates.append((args.new_tokens - 1) / decode_s)
        prefill_rates.append(ids.numel() / prefill_s)
    return {
        "row": row,
        "decode_tokens_per_second": statistics.median(decode_rates),
        "prefill_tokens_per_second": statistics.median(prefill_rates),
        "peak_rss_bytes": _vm_hwm_bytes(),
        "rss_after_load_bytes": load_rss,
        "rss_after_imports_bytes": args.import_rss,
        "weight_bytes": gguf.stat().st_size,
        "avg_weight_bits": lcp.linear_bits_per_weight(gguf),
        "note": "logits_all=True (the binding keeps every position's logits), as for the quality rows",
    }


def run_row(row: str, args) -> dict:
    """Measure one row in this process."""
    requested = row
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    import tap_runtime  # imported in every row, so the import baseline is the same

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # The baseline includes this script's own tokenizer (131 MiB for Qwen's), not the model's load.
    args.import_rss = _current_rss_bytes()
    if row.startswith("llama.cpp-"):
        ids = torch.tensor(tokenizer(heldout_text("wikitext"), add_special_tokens=False)["input_ids"][: args.prefill_tokens])
        return run_llama_cpp_row(row, args, ids)
    if row.startswith("hf-"):
        dtype = torch.bfloat16 if row == "hf-bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
        if row.endswith("-heap"):
            from tap_runtime.pages import keep_freed_heap

            keep_freed_heap()
        weight_bytes = _directory_bytes(args.model) * (1 if dtype == torch.float32 else 0.5)
        extra = {}
        kernel_name = None
    else:
        checkpoint = args.tap
        if row.endswith("-other"):
            if not args.other_tap:
                raise SystemExit(f"{row}: needs --other-tap")
            checkpoint, row = args.other_tap, row[: -len("-other")]
        unpacked = row.endswith("-unpacked")
        if unpacked:
            row = row[: -len("-unpacked")]
        wide_above = next((v for suffix, v in ACTIVATION_SUFFIXES.items() if row.endswith(suffix)), None)
        row_kind = row[: row.rindex("-")] if wide_above is not None else row
        tap = tap_runtime.load(
            checkpoint, memory_efficient=row.endswith("-lowmem"), kernel="cpu-packed" if row.endswith("-torch") else "auto",
            keep_freed_memory=row.endswith("-heap"),
            base_activation_bits=next((bits for suffix, bits in ACTIVATION_BITS.items() if row.endswith(suffix)), None),
        )
        mode = {
            "tap-base": ("fixed", tap.table.tiers[0]),
            "tap-top": ("fixed", tap.table.tiers[-1]),
            "tap-learned": ("learned", None),
            "tap-budget": ("budget", None),
            "tap-learned-eager": ("learned", None),
            "tap-base-lowmem": ("fixed", tap.table.tiers[0]),
            "tap-learned-lowmem": ("learned", None),
            "tap-base-torch": ("fixed", tap.table.tiers[0]),
            "tap-budget-torch": ("budget", None),
            "tap-budget-heap": ("budget", None),
        }[row_kind]
        tap.set_routing(mode[0], tier=mode[1])
        if unpacked:
            from tap_runtime.kernels.vnni import CpuVnniKernel

            for kernel in {id(m.kernel): m.kernel for m in tap.model.modules() if isinstance(getattr(m, "kernel", None), CpuVnniKernel)}.values():
                kernel.wide_lanes = kernel.lane_residuals = kernel.lane_base = False
                kernel.lane_min_tokens = kernel.vnni_dense_min_tokens
        if row.endswith("-amix"):
            from tap_runtime.kernels.vnni import CpuVnniKernel

            kernels = {id(m.kernel): m.kernel for m in tap.model.modules() if isinstance(getattr(m, "kernel", None), CpuVnniKernel)}
            if not kernels:
                raise SystemExit(f"{row}: the checkpoint did not load with TAP's VNNI kernel")
            for kernel in kernels.values():
                kernel.base_wide_above = wide_above
        model = tap.model
        weight_bytes = tap.checkpoint.total_bytes
        extra = {"tap": tap}
        from tap_runtime.layers import TapLinear

        kernel_name = next(m.kernel.name for m in model.modules() if isinstance(m, TapLinear))
    load_rss = _vm_hwm_bytes()
    ids = torch.tensor(tokenizer(heldout_text("wikitext"), add_special_tokens=False)["input_ids"][: args.prefill_tokens])
    prompt = ids[: args.prompt_tokens].unsqueeze(0)
    long_input = ids.unsqueeze(0)

    decode_rates, prefill_rates, bits = [], [], []
    decode_path = "transformers generate"
    with torch.inference_mode():
        for repeat in range(args.repeats + 1):
            if "tap" in extra:
                # Exactly --new-tokens tokens: no end-of-sequence stop (lean loop) / min_new_tokens (eager).
                eager = row.endswith("-eager")
                done = extra["tap"].generate(
                    input_ids=prompt, max_new_tokens=args.new_tokens, decode="eager" if eager else "auto",
                    **({"min_new_tokens": args.new_tokens} if eager else {"eos_token_id": []}),
                )
                decode_path = done.metrics.extra["decode_path"]
                decode_rate = done.metrics.decode_tokens_per_second
                bits.append(done.metrics.avg_weight_bits_per_token)
            else:
                clock = FirstTokenClock()
                model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    streamer=clock,
                    pad_token_id=tokenizer.eos_token_id,
                )
                end = time.perf_counter()
                decode_rate = (args.new_tokens - 1) / (end - clock.first_token_time)
            # Prefill as generate runs it: every position through the model, logits for the last.
            tick = time.perf_counter()
            model(long_input, use_cache=False, logits_to_keep=1)
            prefill_s = time.perf_counter() - tick
            if repeat == 0:
                continue  # warm-up
            decode_rates.append(decode_rate)
            prefill_rates.append(long_input.shape[1] / prefill_s)
    return {
        "row": requested,
        "decode_tokens_per_second": statistics.median(decode_rates),
        "prefill_tokens_per_second": statistics.median(prefill_rates),
        "peak_rss_bytes": _vm_hwm_bytes(),
        "rss_after_load_bytes": load_rss,
        "rss_after_imports_bytes": args.import_rss,
        "weight_bytes": int(weight_bytes),
        "avg_weight_bits": statistics.median(bits) if bits else (16.0 if row == "hf-bf16" else 32.0),
        "decode_path": decode_path,
        "kernel": kernel_name,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tap", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="run every row this many times, interleaved; medians across rounds")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--other-tap", default=None, help="a second TAP checkpoint of the same model, for the -other rows")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: measure one row
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_row(args.row, args)))
        return
    rows = args.rows.split(",")
    measured: dict[str, list[dict]] = {row: [] for row in rows}
    # Rounds interleave the rows in time, so a slow spell of a shared machine hits every row alike.
    for _ in range(args.rounds):
        for row in rows:
            command = [sys.executable, __file__, "--row", row] + [
                a for pair in (("--model", args.model), ("--tap", args.tap), ("--threads", str(args.threads)),
                               ("--prompt-tokens", str(args.prompt_tokens)), ("--new-tokens", str(args.new_tokens)),
                               ("--prefill-tokens", str(args.prefill_tokens)), ("--repeats", str(args.repeats))) for a in pair
            ] + (["--other-tap", args.other_tap] if args.other_tap else [])
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{row}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            measured[row].append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = []
    for row in rows:
        runs = measured[row]
        if not runs:
            continue
        merged = dict(runs[0])
        for key in ("decode_tokens_per_second", "prefill_tokens_per_second"):
            merged[key] = statistics.median(r[key] for r in runs)
        for key in ("peak_rss_bytes", "rss_after_load_bytes"):
            merged[key] = max(r[key] for r in runs)
        merged["rss_after_imports_bytes"] = min(r["rss_after_imports_bytes"] for r in runs)
        merged["decode_by_round"] = [r["decode_tokens_per_second"] for r in runs]
        results.append(merged)
    base = next((r for r in results if r["row"] == "hf-fp32"), results[0])
    other = f" (-other rows: {args.other_tap})" if args.other_tap else ""
    print(f"# bench_speed: {args.tap}{other} vs {args.model}; decode batch 1, {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens; prefill {args.prefill_tokens} tokens; median of {args.repeats} repeats "
          f"x {args.rounds} interleaved rounds")
    print(f"# {environment()}")
    print("# load MiB: high-water RSS after loading minus RSS after importing torch, transformers, tap_runtime and the script's tokenizer")
    print("# prefill: one forward over all prefill tokens keeping the last position's logits (as generate does)")
    for r in results:
        if r.get("decode_path"):
            path = {"fast": "the lean static-cache loop (tap_runtime.decode)", "eager": "transformers generate"}.get(r["decode_path"], r["decode_path"])
            kernel = f", kernel {r['kernel']}" if r.get("kernel") else ""
            print(f"# {r['row']}: decode through {path}{kernel}")
    print(f"{'row':17s} {'decode tok/s':>12s} {'x fp32':>7s} {'prefill tok/s':>13s} {'x fp32':>7s} "
          f"{'peak RSS MiB':>12s} {'load MiB':>8s} {'weights MB':>10s} {'x fp16':>7s} {'avg bits':>8s}")
    for r in results:
        print(f"{r['row']:17s} {r['decode_tokens_per_second']:12.1f} {r['decode_tokens_per_second'] / base['decode_tokens_per_second']:7.2f} "
              f"{r['prefill_tokens_per_second']:13.1f} {r['prefill_tokens_per_second'] / base['prefill_tokens_per_second']:7.2f} "
              f"{r['peak_rss_bytes'] / 2**20:12.0f} {(r['rss_after_load_bytes'] - r['rss_after_imports_bytes']) / 2**20:8.0f} {r['weight_bytes'] / 1e6:10.1f} {2 * r['weight_bytes'] / base['weight_bytes']:7.3f} "
              f"{r['avg_weight_bits']:8.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"environment": environment(), "rows": results}, indent=2))


if __name__ == "__main__":
    main()
