"""CUDA check and benchmark: packed-kernel correctness, decode speed and NVML energy per token.

Real checkpoints are too large to carry to a lent GPU machine, so this builds randomly
initialised models with real architectures' shapes (SmolLM2-135M's config, and
Qwen2.5-1.5B's), converts them on the spot (round-to-nearest, short calibration on the bundled
text) and measures, all in one run and on the same GPU:
  * the CUDA kernel against the reference kernel and the CPU kernel (logits, max relative error);
  * decode tokens/s (batch 1, 32-token prompt, --new-tokens greedy) and prefill tokens/s for
    HF bf16 and TAP (base tier only, budget routing (the default), learned routing, all tokens
    top tier);
  * the same with offload_to_cpu: half (tap-offload-half) or all (tap-offload-all) of the
    decoder planes in pinned host memory, copied in per linear as it runs;
  * energy per generated token from NVML's total-energy counter (EnergyMonitor), with the idle
    power measured in the same run; and peak CUDA memory.
Speed and energy do not depend on the weights' values; routing shares do (random weights
route differently from trained ones), so quality is measured elsewhere (bench_quality.py).

    python scripts/bench_gpu.py --tokenizer models/smollm2 --out gpu-results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    # From SmolLM2-135M-Instruct's config.json.
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
        max_position_embeddings=8192, rms_norm_eps=1e-5,
    ),
    # From Qwen2.5-1.5B-Instruct's config.json.
    "qwen2.5-1.5b": dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
        max_position_embeddings=32768, rms_norm_eps=1e-6,
    ),
}


def build_random_model(shape: str, tokenizer_dir: str, directory: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    fields = dict(SHAPES[shape])
    config = AutoConfig.for_model(
        fields.pop("model_type"), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **fields
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def kernel_agreement(tap_dir: Path, ids: torch.Tensor) -> dict:
    """Max relative logit error of cuda-packed against the reference kernel (on CUDA) and CPU packed."""
    import tap_runtime

    logits = {}
    for name, device, kernel in (("cuda-packed", "cuda", "auto"), ("reference", "cuda", "reference"), ("cpu-packed", "cpu", "auto")):
        tap = tap_runtime.load(tap_dir, device=device, kernel=kernel)
        tap.set_routing("fixed", tier=tap.table.tiers[-1])
        with torch.inference_mode():
            logits[name] = tap.model(ids.to(device)).logits.float().cpu()
        del tap
        torch.cuda.empty_cache()
    ref = logits["reference"]
    scale = ref.abs().max().item()
    return {
        f"{name}_vs_reference_max_rel": (logits[name] - ref).abs().max().item() / scale
        for name in ("cuda-packed", "cpu-packed")
    } | {"argmax_agree_cuda_vs_reference": (logits["cuda-packed"].argmax(-1) == ref.argmax(-1)).float().mean().item()}


def measure_row(row: str, model_dir: Path, tap_dir: Path, prompt: torch.Tensor, long_input: torch.Tensor, args, monitor, idle_watts: float) -> dict:
    from transformers import AutoModelForCausalLM

    from tap_runtime.metrics import FirstTokenClock, weight_bits_read

    tap = None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if row.startswith("hf-"):
        dtype = {"hf-bf16": torch.bfloat16, "hf-fp16": torch.float16}[row]
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to("cuda").eval()
    else:
        import tap_runtime

        offload = {}
        if row.startswith("tap-offload"):
            # Decoder planes beyond a budget stay in pinned host memory, copied in per linear:
            # half of them (-half) or all of them (-all); learned routing.
            from tap_runtime.checkpoint import read_checkpoint
            from tap_runtime.offload import plane_bytes

            table = read_checkpoint(tap_dir, verify=False).table
            layer_bytes = sum(plane_bytes(p) for p in table.linear.values() if p.layer_index is not None)
            share = {"tap-offload-half": 0.5, "tap-offload-all": 0.0}[row]
            offload = dict(offload_to_cpu=True, max_gpu_memory_mb=share * layer_bytes / 2**20)
        tap = tap_runtime.load(tap_dir, device="cuda", dtype=torch.bfloat16, **offload)
        if row == "tap-random10":
            # Random weights make the fitted router's shares meaningless; this row fixes the share
            # at the design point (10% of tokens per layer on the top tier) to time that cost.
            tap.set_routing("random", shares=(0.1,) * (len(tap.table.tiers) - 1))
        else:
            # A "-fast" row is the same routing through the lean loop (host-side routing, no
            # graph), for comparison with the default on CUDA, the captured graph step.
            mode_row = row.removesuffix("-fast").removesuffix("-masked").removesuffix("-unfused")
            mode = {"tap-base": ("fixed", tap.table.tiers[0]), "tap-top": ("fixed", tap.table.tiers[-1]),
                    "tap-budget": ("budget", None),
                    "tap-learned": ("learned", None), "tap-learned-eager": ("learned", None),
                    "tap-offload-half": ("learned", None), "tap-offload-all": ("learned", None)}[mode_row]
            tap.set_routing(mode[0], tier=mode[1])
        if row.endswith("-masked"):
            # The graph step with every residual product run and multiplied by the routing flag:
            # what the step costs when a routed plane cannot be skipped on the device.
            from tap_runtime.graph_decode import GraphDecoder

            tap._graph_decoder = GraphDecoder(tap.model, residual="masked")
        if row.endswith("-unfused"):
            # The graph step with the router as plain tensor ops (about 20 kernels per layer)
            # instead of the one-launch Triton kernel.
            from tap_runtime.graph_decode import GraphDecoder

            tap._graph_decoder = GraphDecoder(tap.model, fused_router=False)
        model = tap.model
    prompt, long_input = prompt.to("cuda"), long_input.to("cuda")
    decode, prefill, joules, bits = [], [], [], []
    with torch.inference_mode():
        for repeat in range(args.repeats + 1):
            monitor.begin_window(row)
            if tap is not None:
                # TapModel.generate: the lean loop (or transformers' generate for the -eager row).
                eager = row.endswith("-eager")
                path = "eager" if eager else "fast" if row.endswith("-fast") else "auto"
                done = tap.generate(
                    input_ids=prompt, max_new_tokens=args.new_tokens, decode=path,
                    **({"min_new_tokens": args.new_tokens} if eager else {"eos_token_id": []}),
                )
                torch.cuda.synchronize()
                reading = monitor.end_window(row)
                decode_rate = done.metrics.decode_tokens_per_second
                decode_path = done.metrics.extra["decode_path"]
                if decode_path == "graph":
                    decode_path += f" ({done.metrics.extra['graph_branches']} branches)"
            else:
                clock = FirstTokenClock()
                model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens, do_sample=False, streamer=clock, pad_token_id=0,
                )
                torch.cuda.synchronize()
                end = time.perf_counter()
                reading = monitor.end_window(row)
                decode_rate = (args.new_tokens - 1) / (end - clock.first_token_time)
                decode_path = "transformers generate"
            torch.cuda.synchronize()
            tick = time.perf_counter()
            model(long_input, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            prefill_s = time.perf_counter() - tick
            if repeat == 0:
                continue
            decode.append(decode_rate)
            prefill.append(long_input.shape[1] / prefill_s)
            joules.append(reading.joules)
            if tap is not None:
                bits.append(weight_bits_read(tap.table, tap.router.counts)["avg_weight_bits_per_token"])
    seconds = args.new_tokens / statistics.median(decode)
    result = {
        "row": row,
        "decode_tokens_per_second": statistics.median(decode),
        "prefill_tokens_per_second": statistics.median(prefill),
        "joules_per_generated_token": statistics.median(joules) / args.new_tokens,
        "joules_above_idle_per_token": max(statistics.median(joules) - idle_watts * seconds, 0.0) / args.new_tokens,
        "energy_method": reading.method,
        "energy_source": reading.source,
        "cuda_peak_bytes": int(torch.cuda.max_memory_allocated()),
        "avg_weight_bits": statistics.median(bits) if bits else 16.0,
        "decode_path": decode_path,
        "host_plane_bytes": tap.model.tap_offload.host_plane_bytes if tap is not None and tap.model.tap_offload else 0,
    }
    del model, tap
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="directory with a tokenizer (e.g. models/smollm2)")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--rows", default="hf-bf16,tap-base,tap-budget,tap-learned,tap-top,tap-base-fast,tap-budget-fast,tap-learned-eager,tap-random10")
    parser.add_argument("--deadline-s", type=float, default=None, help="skip what would start after this many seconds")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration windows of the (random-weight) conversion")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")

    from calibration.data import load_calibration_text
    from tap_convert import ConvertOptions, convert
    from tap_runtime.energy import EnergyMonitor, available_counters
    from tap_runtime.kernels.cuda import CudaPackedKernel

    from bench_common import environment

    report = {
        "environment": environment(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "energy_counters": available_counters("cuda"),
        "int8_path": CudaPackedKernel().int8_path,
        "shapes": {},
    }
    print(json.dumps({k: report[k] for k in ("gpu", "torch", "energy_counters", "int8_path")}, indent=1), flush=True)
    monitor = EnergyMonitor("cuda")
    monitor.begin_window("idle")
    time.sleep(2.0)
    idle = monitor.end_window("idle")
    report["idle_watts"] = idle.watts
    print(f"idle: {idle.watts:.1f} W ({idle.method})", flush=True)

    work = Path(tempfile.mkdtemp(prefix="tap-gpu-"))
    started = time.perf_counter()

    def past_deadline(what: str) -> bool:
        if args.deadline_s is not None and time.perf_counter() - started > args.deadline_s:
            print(f"skipped {what}: past the {args.deadline_s:.0f} s deadline", flush=True)
            report.setdefault("skipped", []).append(what)
            return True
        return False

    for shape in args.shapes.split(","):
        if past_deadline(shape):
            continue
        shape_started = time.perf_counter()
        model_dir = build_random_model(shape, args.tokenizer, work / shape / "model")
        options = ConvertOptions(calib="c4", method="rtn", num_samples=args.calib_samples, seq_len=256,
                                 router_samples=max(2, args.calib_samples // 2), progress=False)
        tick = time.perf_counter()
        convert(str(model_dir), work / shape / "tap", options)
        convert_s = time.perf_counter() - tick
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        ids = torch.tensor(tokenizer("\n\n".join(load_calibration_text("c4").documents[:50]), add_special_tokens=False)["input_ids"][: args.prefill_tokens])
        entry = {"convert_seconds": convert_s, "kernels": kernel_agreement(work / shape / "tap", ids[:128].unsqueeze(0))}
        print(shape, json.dumps(entry), flush=True)
        entry["rows"] = []
        for row in args.rows.split(","):
            if past_deadline(f"{shape}/{row}"):
                continue
            result = measure_row(row, model_dir, work / shape / "tap", ids[:32].unsqueeze(0), ids.unsqueeze(0), args, monitor, idle.watts)
            entry["rows"].append(result)
            print(shape, json.dumps(result), flush=True)
        entry["seconds"] = time.perf_counter() - shape_started
        report["shapes"][shape] = entry
        if not entry["rows"]:
            continue
        base = entry["rows"][0]
        print(f"\n# {shape} on {report['gpu']} (random weights, real shapes); baseline {base['row']}")
        print("# prefill keeps the last position's logits (as generate does); decode path per row in the last column")
        print(f"{'row':17s} {'decode tok/s':>12s} {'x base':>7s} {'prefill tok/s':>13s} {'x base':>7s} {'J/token':>8s} "
              f"{'x base':>7s} {'CUDA peak MiB':>13s} {'avg bits':>8s}  decode path")
        for r in entry["rows"]:
            print(f"{r['row']:17s} {r['decode_tokens_per_second']:12.1f} {r['decode_tokens_per_second'] / base['decode_tokens_per_second']:7.2f} "
                  f"{r['prefill_tokens_per_second']:13.0f} {r['prefill_tokens_per_second'] / base['prefill_tokens_per_second']:7.2f} "
                  f"{r['joules_per_generated_token']:8.3f} {r['joules_per_generated_token'] / base['joules_per_generated_token']:7.2f} "
                  f"{r['cuda_peak_bytes'] / 2**20:13.0f} {r['avg_weight_bits']:8.2f}  {r['decode_path']}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
