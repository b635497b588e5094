"""TAP side by side with the quantizers a practitioner would otherwise use, in one run.

Same model, same held-out text, same windows. Every peer quantizes the linear layers of the
decoder (embeddings and head stay float32 for peers; TAP also stores those at 8 bits). Rows:
TAP at its tiers and default routing, HQQ 4-bit g64, optimum-quanto int4/int8, torchao int8/int4
weight-only, and llama.cpp Q8_0 / Q4_K_M / Q4_0 with and without an importance matrix computed
by llama-imatrix on the same calibration text TAP was fitted on (llama.cpp also quantizes the
embedding and head as it does for its users; one Q4_K_M row keeps them at Q8_0, as TAP does).
A peer that fails to install or run is printed with its error, not dropped. Bits per weight are
those of each method's storage layout (codes plus scales/zeros); llama.cpp's are read from the
GGUF file's tensor sizes; TAP's are the average bits read per token (tier mix included).

    pip install -e '.[bench]' && bash scripts/setup_llama_cpp.sh
    python scripts/bench_peers.py --model models/smollm2 --tap models/smollm2-tap --windows 16
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from collections.abc import Callable

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from bench_common import environment, load_tap_and_windows, set_threads, window_quality
from tap_runtime.metrics import weight_bits_read


def _decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    head = model.get_output_embeddings()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def hqq_4bit_g64(model: nn.Module) -> float:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=4, group_size=64)
    for name, linear in _decoder_linears(model):
        _set_module(model, name, HQQLinear(linear, quant_config=config, compute_dtype=torch.float32, device="cpu"))
    return 4 + 2 * 16 / 64  # 4-bit codes, fp16 scale and zero per 64


def _quanto(weights_name: str) -> Callable[[nn.Module], float]:
    def run(model: nn.Module) -> float:
        from optimum import quanto

        head = [n for n, m in model.named_modules() if m is model.get_output_embeddings()]
        quanto.quantize(model, weights=getattr(quanto, weights_name), exclude=head)
        quanto.freeze(model)
        # quanto: int8 per output channel; int4 in groups of 128 with a scale and a shift each.
        return 8 + 32 / 4096 if weights_name == "qint8" else 4 + 2 * 16 / 128

    return run


def _torchao(kind: str) -> Callable[[nn.Module], float]:
    def run(model: nn.Module) -> float:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        head = model.get_output_embeddings()
        if kind == "int8":
            config, bits = Int8WeightOnlyConfig(), 8 + 16 / 4096
        else:
            config, bits = Int4WeightOnlyConfig(group_size=128, int4_packing_format="plain"), 4 + 2 * 16 / 128
            model.to(torch.bfloat16)
        quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and m is not head)
        return bits

    return run


LLAMA_CPP_PEERS = {
    # label: (quant type, use the importance matrix, extra llama-quantize flags)
    "llama.cpp Q8_0": ("Q8_0", False, ()),
    "llama.cpp Q4_K_M": ("Q4_K_M", False, ()),
    "llama.cpp Q4_K_M + imatrix": ("Q4_K_M", True, ()),
    "llama.cpp Q4_K_M + imatrix + q8_0 embeddings": ("Q4_K_M", True, ("--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0")),
    "llama.cpp Q4_0": ("Q4_0", False, ()),
    "llama.cpp Q4_0 + imatrix": ("Q4_0", True, ()),
}

PEERS: dict[str, Callable[[nn.Module], float]] = {
    "hqq 4-bit g64": hqq_4bit_g64,
    "optimum-quanto int4": _quanto("qint4"),
    "optimum-quanto int8": _quanto("qint8"),
    "torchao int8 weight-only": _torchao("int8"),
    "torchao int4 weight-only g128": _torchao("int4"),
}


def evaluate(forward: Callable, windows: torch.Tensor, reference: list[torch.Tensor]) -> dict:
    # no_grad, not inference_mode: optimum-quanto's int4 tensors refuse inference tensors.
    ppl, kl = window_quality(lambda ids: forward(ids).logits, windows, reference, inference=False)
    return {"ppl": ppl, "kl": kl}


def llama_cpp_row(label: str, args, calib: str, imatrix_settings: tuple[int, int], windows, reference) -> dict:
    """Quantize with llama.cpp's own tools and evaluate through its Python binding."""
    qtype, use_imatrix, extra = LLAMA_CPP_PEERS[label]
    runner = None
    try:
        import llama_cpp_peer as lcp
        from calibration.data import load_calibration_text

        lcp.ensure_available()
        f32 = lcp.f32_gguf(args.model)
        imatrix = None
        if use_imatrix:
            text = "\n\n".join(load_calibration_text(calib).documents)
            imatrix = lcp.importance_matrix(f32, text, calib, *imatrix_settings, threads=args.threads)
        gguf = lcp.quantize(f32, qtype, args.threads, imatrix, extra)
        runner = lcp.LlamaCppLogits(gguf, args.ctx, args.threads)
        result = {**evaluate(runner, windows, reference), "bits": lcp.linear_bits_per_weight(gguf), "file": gguf.name}
        print(f"  {label}: {result}", flush=True)
        return result
    except Exception as exc:  # a peer that breaks is reported, not dropped
        print(f"  {label}: FAILED\n{traceback.format_exc(limit=3)}", flush=True)
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
    finally:
        if runner is not None:
            runner.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tap", required=True)
    parser.add_argument("--text", default="wikitext")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", default=",".join([*PEERS, *LLAMA_CPP_PEERS]))
    parser.add_argument("--skip-tap", action="store_true", help="only the peers (TAP rows are the slow part on big vocabularies)")
    parser.add_argument("--budget-bits", type=float, default=4.6,
                        help="also run the default (budget) routing with its share scaled to read this many weight bits "
                             "per token, for the comparison with peers at that size (0: skip)")
    parser.add_argument("--tap-rows", default="base,learned,budget,budget-bits,top",
                        help="which TAP rows to run, comma-separated")
    parser.add_argument("--calib", default=None, help="text for llama.cpp's importance matrix (default: what TAP was calibrated on)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    started = time.perf_counter()

    tap, tokenizer, windows = load_tap_and_windows(args)
    fp32 = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    reference: list[torch.Tensor] = []
    fp32_nll, fp32_count = 0.0, 0
    with torch.inference_mode():
        for window in windows:
            logprobs = torch.log_softmax(fp32(window.unsqueeze(0)).logits[0, :-1].float(), -1)
            fp32_nll -= logprobs.gather(-1, window[1:, None]).sum().item()
            fp32_count += window.numel() - 1
            reference.append(logprobs.to(torch.bfloat16))
    del fp32
    rows: dict[str, dict] = {"fp32": {"ppl": math.exp(fp32_nll / fp32_count), "kl": 0.0, "bits": 32.0}}

    def tap_row(label: str) -> None:
        tap.router.reset_counts()
        result = evaluate(tap, windows, reference)
        result["bits"] = weight_bits_read(tap.table, tap.router.counts)["avg_weight_bits_per_token"]
        rows[label] = result
        print(f"  {label}: {result}", flush=True)

    tap_rows = set() if args.skip_tap else set(filter(None, args.tap_rows.split(",")))
    if "base" in tap_rows:
        tap.set_routing("fixed", tier=tap.table.tiers[0])
        tap_row(f"TAP tier {tap.table.tiers[0]} (no routing)")
    if "learned" in tap_rows:
        tap.set_routing("learned")
        tap_row("TAP learned routing")
    if "budget" in tap_rows:
        tap.set_routing("budget")
        tap_row("TAP budget routing (default)")
    if "budget-bits" in tap_rows and args.budget_bits:
        # The share comes from the checkpoint's storage arithmetic, not from the evaluated text.
        tap.set_routing("budget", bits=args.budget_bits)
        tap_row(f"TAP budget routing at {args.budget_bits:g} bits")
    if "top" in tap_rows:
        tap.set_routing("fixed", tier=tap.table.tiers[-1])
        tap_row(f"TAP tier {tap.table.tiers[-1]}")
    calib = args.calib or tap.table.calibration.dataset
    imatrix_settings = (tap.table.calibration.seq_len, tap.table.calibration.num_samples)
    tap = None  # free the TAP model before the peers load theirs

    for label in filter(None, args.peers.split(",")):
        if label in LLAMA_CPP_PEERS:
            rows[label] = llama_cpp_row(label, args, calib, imatrix_settings, windows, reference)
            continue
        try:
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
            bits = PEERS[label](model)
            result = evaluate(lambda ids: model(ids), windows, reference)
            rows[label] = {**result, "bits": bits}
            print(f"  {label}: {rows[label]}", flush=True)
        except Exception as exc:  # a peer that breaks is reported, not dropped
            rows[label] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
            print(f"  {label}: FAILED\n{traceback.format_exc(limit=3)}", flush=True)
        finally:
            model = None

    fp32_ppl = rows["fp32"]["ppl"]
    print(f"# bench_peers: {args.model}; text={args.text} held-out, {args.windows} windows x {args.ctx} tokens")
    print(f"# {environment()}; {time.perf_counter() - started:.0f}s")
    print(f"{'method':34s} {'bits/weight':>11s} {'ppl ratio':>10s} {'mean KL':>9s}")
    for label, row in rows.items():
        if "error" in row:
            print(f"{label:34s} {'failed: ' + row['error']}")
        else:
            print(f"{label:34s} {row['bits']:11.3f} {row['ppl'] / fp32_ppl:10.4f} {row['kl']:9.5f}")
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump({"args": vars(args), "environment": environment(), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
