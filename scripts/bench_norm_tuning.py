"""Would tuning the normalisation gains end to end pay? (measured before building it)

The checkpoint keeps every norm's weight in float (float16 where that is exact, else float32),
so unlike the base planes' group scales (bench_scale_tuning.py: their tuned values round back
to the stored grid) a tuned norm costs no bits and survives storage exactly. This trains only
those gains, as norm tweaking does, against the KL of the model's logits to the fp32 model's
on the checkpoint's own calibration windows (seed 0, as the converter draws them), with every
quantized linear on its base plane (turned back by the input rotation) and the embedding/head
on the checkpoint's 8-bit rows.

A norm serves a token whatever tier its layer reads, so the tuned gains are measured under
three routings: every token on the base tier, budget routing at ``--budget-bits`` and every
token on the top tier, on the TAP model (reference kernel) with the tuned gains swapped in,
on held-out windows of WikiText and C4 that no calibration saw.

    python scripts/bench_norm_tuning.py --model models/gemma3 --tap models/gemma3-tap-lv2 --steps 40 --lr 1e-3
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tap_runtime
from bench_common import environment, eval_windows, fp32_references, heldout_text, set_threads, tap_quality
from calibration.data import load_calibration_text, make_windows, tokenize_text
from tap_runtime.layers import TapEmbedding, TapLinear
from tap_runtime.planes import dequantize_linear, dequantize_rows


def norm_gains(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every normalisation module's weight, by module name (RMSNorm/LayerNorm of any family)."""
    return {
        name: module.weight
        for name, module in model.named_modules()
        if "norm" in type(module).__name__.lower() and isinstance(getattr(module, "weight", None), torch.nn.Parameter)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the fp32 source model directory")
    parser.add_argument("--tap", required=True, help="a TAP checkpoint converted from it")
    parser.add_argument("--steps", type=int, default=40, help="Adam steps, one calibration window each")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the norm gains")
    parser.add_argument("--calib-windows", type=int, default=128)
    parser.add_argument("--windows", type=int, default=8, help="held-out windows per text")
    parser.add_argument("--text", default="wikitext,c4")
    parser.add_argument("--budget-bits", type=float, default=4.6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()

    tap = tap_runtime.load(args.tap, kernel="reference", keep_portable=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    bos = tokenizer.bos_token_id if tap.table.calibration.extra.get("bos_prepended") else None
    teacher = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().requires_grad_(False)
    student_modules = dict(student.named_modules())
    with torch.no_grad():
        for name, module in tap.model.named_modules():
            if isinstance(module, TapEmbedding):
                student_modules[name].weight.data.copy_(dequantize_rows(module.rows()))  # tied heads follow
            elif isinstance(module, TapLinear):
                weight = dequantize_linear(module.planes(), module.policy)  # the planes every token reads
                source = student_modules[name]
                source.weight.data = weight if isinstance(source, torch.nn.Linear) else weight.t().contiguous()
    gains = norm_gains(student)
    tap_gains = norm_gains(tap.model)
    missing = sorted(set(gains) - set(tap_gains))
    if missing:
        raise SystemExit(f"{args.tap}: norms {missing[:3]} of {args.model} not found in the TAP model")
    for parameter in gains.values():
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(list(gains.values()), lr=args.lr)
    calibration = make_windows(
        tokenize_text(tokenizer, load_calibration_text(tap.table.calibration.dataset)), args.calib_windows, 512, 0, bos
    )
    evaluations = {}
    for text in args.text.split(","):
        windows = eval_windows(tokenizer, heldout_text(text), 512, args.windows, bos)
        references, fp32_ppl = fp32_references(teacher, windows)
        evaluations[text] = (windows, references, fp32_ppl)
    routings = [
        ("base tier", lambda: tap.set_routing("fixed", tier=tap.table.tiers[0])),
        (f"budget at {args.budget_bits:g} bits", lambda: tap.set_routing("budget", bits=args.budget_bits)),
        ("top tier", lambda: tap.set_routing("fixed", tier=tap.table.tiers[-1])),
    ]

    def measure(weights: dict[str, torch.Tensor]) -> dict[tuple[str, str], dict]:
        with torch.no_grad():
            for name, parameter in tap_gains.items():
                if name in weights:
                    parameter.data.copy_(weights[name].to(parameter.dtype))
        results = {}
        for label, set_routing in routings:
            set_routing()
            for text, (windows, references, fp32_ppl) in evaluations.items():
                quality = tap_quality(tap, windows, references)
                results[(label, text)] = {**quality, "ratio": quality["ppl"] / fp32_ppl}
        tap.set_routing()
        return results

    stored = {name: parameter.detach().clone() for name, parameter in gains.items()}
    before = measure(stored)
    for step in range(args.steps):
        ids = calibration[step % calibration.shape[0]].unsqueeze(0)
        with torch.no_grad():
            target = torch.log_softmax(teacher(ids).logits[0].float(), -1)
        logprobs = torch.log_softmax(student(ids).logits[0].float(), -1)
        loss = (target.exp() * (target - logprobs)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"# step {step}: calibration KL {loss.item():.5f} ({time.perf_counter() - started:.0f}s)", flush=True)
    tuned = {name: parameter.detach().clone() for name, parameter in gains.items()}
    # Against each norm's root mean square: gemma's norms store the gain's offset from 1, near 0.
    relative = torch.cat([((tuned[n] - stored[n]).abs() / stored[n].pow(2).mean().sqrt().clamp_min(1e-6)).flatten() for n in stored])
    print(f"# {len(gains)} norms, {relative.numel()} gains; change relative to each norm's rms: "
          f"median {relative.median():.4f}, largest {relative.max():.4f}")
    after = measure(tuned)

    print(f"# bench_norm_tuning: {args.tap} vs {args.model}; {args.steps} steps at lr {args.lr} on "
          f"{tap.table.calibration.dataset} calibration windows, every linear on its base plane; "
          f"{args.windows} held-out windows x 512 per text")
    print(f"# {environment()}")
    print("| routing | text | stored norms: bits, ppl ratio / mean KL | tuned norms: bits, ppl ratio / mean KL | KL ratio |")
    print("|---|---|---|---|---|")
    for key in before:
        b, a = before[key], after[key]
        print(f"| {key[0]} | {key[1]} | {b['avg_bits']:.3f}, {b['ratio']:.4f} / {b['kl']:.5f} | "
              f"{a['avg_bits']:.3f}, {a['ratio']:.4f} / {a['kl']:.5f} | {a['kl'] / b['kl']:.3f} |")
    print(f"# {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
