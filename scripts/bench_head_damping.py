"""The tied embedding/head rows: GPTQ's damping, judged by the KL each side of the tie causes.

A tied matrix is read twice: as the output head (its error reaches the logits through the final
hidden states, which GPTQ compensates for) and as the input embedding (a looked-up row's own
error enters the residual stream unchanged, which GPTQ's compensation makes larger). This script
quantizes the rows as the converter does (8-bit, the converter's column scales, GPTQ on the
final hidden states' second moment) at several dampings and, for each, measures the mean KL
against the fp32 model with only the embedding replaced, only the head replaced, and both (the
tied matrix). The Hessian comes from --hessian-windows calibration windows, the KL from
--windows other calibration windows; no evaluation text is read.

    python scripts/bench_head_damping.py --model models/gemma3 --dampings 0.01,0.1,1
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_common import environment, set_threads, window_quality
from calibration.data import load_calibration_text, make_windows, tokenize_text
from tap_convert.column_scales import choose_column_scales
from tap_convert.convert import _tokenizer_adds_bos
from tap_convert.gptq import gptq_rows
from tap_convert.quantize import quantize_rows
from tap_runtime.architectures import get_architecture
from tap_runtime.planes import RowQuantized, dequantize_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="fp32 source model with a tied embedding/head")
    parser.add_argument("--calib", default="wikitext")
    parser.add_argument("--hessian-windows", type=int, default=32)
    parser.add_argument("--windows", type=int, default=16, help="calibration windows the KL is measured on")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dampings", default="0.01,0.1,1")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    set_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight.data_ptr() != embedding.weight.data_ptr():
        raise SystemExit(f"{args.model}: the head is not tied to the embedding; nothing to trade")
    text = load_calibration_text(args.calib)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    needs_bos = get_architecture(config.model_type).needs_bos
    bos = tokenizer.bos_token_id if (needs_bos or _tokenizer_adds_bos(tokenizer)) else None
    windows = make_windows(tokenize_text(tokenizer, text), args.hessian_windows + args.windows, args.seq_len, 0, bos,
                           source=text.source)
    hessian_windows, kl_windows = windows[: args.hessian_windows], windows[args.hessian_windows :]

    source = embedding.weight.detach().clone()
    hessian, count = torch.zeros(source.shape[1], source.shape[1]), 0

    def accumulate(_module, inputs):
        nonlocal hessian, count
        hidden = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        hessian += hidden.t() @ hidden
        count += hidden.shape[0]

    hook = head.register_forward_pre_hook(accumulate)
    with torch.inference_mode():
        for window in hessian_windows:
            model(window.unsqueeze(0))
        hook.remove()
        references = [torch.log_softmax(model(w.unsqueeze(0)).logits[0, :-1].float(), -1) for w in kl_windows]
    hessian /= count

    # The converter's column scales for a tied matrix are chosen on its weight-space error.
    exponent, column_scales, _ = choose_column_scales(source)
    scaled = source if column_scales is None else source / column_scales
    scaled_hessian = hessian if column_scales is None else hessian * column_scales.unsqueeze(0) * column_scales.unsqueeze(1)
    candidates = {"round-to-nearest": quantize_rows(scaled)}
    for damping in (float(d) for d in args.dampings.split(",")):
        tick = time.perf_counter()
        candidates[f"GPTQ, damping {damping:g}"] = gptq_rows(scaled, scaled_hessian, damping=damping)
        print(f"  GPTQ rows at damping {damping:g}: {time.perf_counter() - tick:.0f} s", flush=True)

    model.lm_head.weight = torch.nn.Parameter(source.clone())  # untie, so each side can be swapped alone
    model.config.tie_word_embeddings = False

    def kl(embedding_rows: torch.Tensor, head_rows: torch.Tensor) -> float:
        embedding.weight.data.copy_(embedding_rows)
        model.lm_head.weight.data.copy_(head_rows)
        return window_quality(lambda ids: model(ids).logits, kl_windows, references)[1]

    print(f"# bench_head_damping: {args.model}, column-scale exponent {exponent}, Hessian from {args.hessian_windows} "
          f"{args.calib} calibration windows, KL on {args.windows} others")
    print(f"# {environment()}")
    print("| rows | weight rel. error | KL, embedding only | KL, head only | KL, tied (both) |")
    print("|---|---|---|---|---|")
    for name, rows in candidates.items():
        approximation = dequantize_rows(RowQuantized(rows.qweight, rows.scales, column_scales))
        error = float((approximation - source).norm() / source.norm())
        print(f"| {name} | {error:.4f} | {kl(approximation, source):.5f} | {kl(source, approximation):.5f} | "
              f"{kl(approximation, approximation):.5f} |", flush=True)


if __name__ == "__main__":
    main()
