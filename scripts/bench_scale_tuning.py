"""Would tuning the base planes' group scales and zero points end to end pay? (measured before building it)

GPTQ fits each linear alone against its own output error. End-to-end tuning (as EfficientQAT's
E2E-QP does for step sizes) keeps every 4-bit code and moves only the base planes' group scales
(as log-scale offsets) and zero points, against the KL of the model's logits to the fp32 model's
on calibration windows. It measures whether that recovers quality the per-layer fit leaves, and
whether the gain survives the checkpoint's storage grid (scales in steps of 2**(1/32), zero
points in eighths of a code step).

The student is the fp32 source model with each quantized linear replaced by its base plane
(turned back by the input rotation) and the embedding/head by the checkpoint's 8-bit rows. The
windows are the checkpoint's own calibration source (seed 0, as the converter draws them);
evaluation is every token on the base tier, on the TAP model (reference kernel) with the tuned
planes swapped in, on held-out WikiText and C4 windows that no calibration saw.

    python scripts/bench_scale_tuning.py --model models/gemma3 --tap models/gemma3-tap-hr --steps 40 --lr 3e-4
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import tap_runtime
from bench_common import environment, eval_windows, fp32_references, heldout_text, set_threads, tap_quality
from calibration.data import load_calibration_text, make_windows, tokenize_text
from tap_runtime.layers import TapEmbedding, TapLinear
from tap_runtime.packing import unpack_int4
from tap_runtime.planes import Plane, dequantize_rows
from tap_runtime.rotation import rotate_weight


class TunedBasePlane(nn.Module):
    """A linear whose weight is its base plane's fixed codes under trainable scales and zeros."""

    def __init__(self, plane: Plane, rotation: int, bias: torch.Tensor | None):
        super().__init__()
        group = plane.spec.group_size
        codes = unpack_int4(plane.qweight).to(torch.float32)
        self.shape = codes.shape
        self.register_buffer("codes", codes.view(codes.shape[0], -1, group))
        self.register_buffer("scales0", plane.scales.to(torch.float32))
        self.register_buffer("zeros0", plane.zeros_or_implied().to(torch.float32))
        self.log_scale = nn.Parameter(torch.zeros_like(self.scales0))
        # A symmetric plane stores no zero point, so only an asymmetric one may move it.
        self.zero_shift = nn.Parameter(torch.zeros_like(self.zeros0), requires_grad=not plane.spec.symmetric)
        self.spec, self.reference, self.rotation, self.bias = plane.spec, plane.scale_reference, rotation, bias

    def scales_and_zeros(self, stored_grid: bool) -> tuple[torch.Tensor, torch.Tensor]:
        scales, zeros = self.scales0 * torch.exp(self.log_scale), self.zeros0 + self.zero_shift
        if stored_grid:
            reference = self.reference if self.reference is None else torch.maximum(self.reference, scales.max().reshape(1))
            scales, zeros = self.spec.round_scales(scales, reference), self.spec.round_zeros(zeros)
        return scales, zeros

    def plane_weight(self, stored_grid: bool = False) -> torch.Tensor:
        """The base plane as the planes store it (rotated input basis), float32 (out, in)."""
        scales, zeros = self.scales_and_zeros(stored_grid)
        return ((self.codes - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, rotate_weight(self.plane_weight(), self.rotation), self.bias)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the fp32 source model directory")
    parser.add_argument("--tap", required=True, help="a TAP checkpoint converted from it")
    parser.add_argument("--steps", type=int, default=40, help="Adam steps, one calibration window each")
    parser.add_argument("--lr", type=float, default=3e-4, help="learning rate of the log-scales and zero points")
    parser.add_argument("--calib-windows", type=int, default=128)
    parser.add_argument("--windows", type=int, default=8, help="held-out windows per text")
    parser.add_argument("--text", default="wikitext,c4")
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
    tuned: dict[str, TunedBasePlane] = {}
    tap_linears: dict[str, TapLinear] = {}
    for name, module in tap.model.named_modules():
        if isinstance(module, TapEmbedding):
            student_modules[name].weight.data.copy_(dequantize_rows(module.rows()))  # tied heads follow
        elif isinstance(module, TapLinear):
            bias = None if module.bias is None else module.bias.data.to(torch.float32)
            tuned[name] = TunedBasePlane(module.planes()[0], module.policy.input_rotation, bias)
            parent, _, child = name.rpartition(".")
            setattr(student_modules[parent], child, tuned[name])
            tap_linears[name] = module
    parameters = [p for t in tuned.values() for p in (t.log_scale, t.zero_shift) if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=args.lr)
    calibration = make_windows(
        tokenize_text(tokenizer, load_calibration_text(tap.table.calibration.dataset)), args.calib_windows, 512, 0, bos
    )
    evaluations = {}
    for text in args.text.split(","):
        windows = eval_windows(tokenizer, heldout_text(text), 512, args.windows, bos)
        references, fp32_ppl = fp32_references(teacher, windows)
        evaluations[text] = (windows, references, fp32_ppl)

    def measure(stored_grid: bool | None) -> dict[str, tuple[float, float]]:
        """Every token on the base tier, with the tuned planes (None: the stored ones)."""
        with torch.no_grad():
            for name, module in tap_linears.items():
                module._prepared[0] = stored[name] if stored_grid is None else tuned[name].plane_weight(stored_grid)
        tap.set_routing("fixed", tier=tap.table.tiers[0])
        results = {}
        for text, (windows, references, fp32_ppl) in evaluations.items():
            quality = tap_quality(tap, windows, references)
            results[text] = (quality["ppl"] / fp32_ppl, quality["kl"])
        return results

    stored = {name: module._prepared[0].clone() for name, module in tap_linears.items()}
    rows = [("stored base planes (GPTQ)", measure(None))]
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
    moved = torch.cat([t.log_scale.detach().abs().flatten() for t in tuned.values()])
    print(f"# |log-scale offset|: median {moved.median():.5f}, largest {moved.max():.5f}; "
          f"half a storage step of 2**(1/32) is {0.5 * torch.log(torch.tensor(2.0)) / 32:.5f}")
    rows.append((f"tuned {args.steps} steps, float scales and zeros", measure(False)))
    rows.append((f"tuned {args.steps} steps, on the stored grid", measure(True)))

    print(f"# bench_scale_tuning: {args.tap} vs {args.model}; {args.steps} steps at lr {args.lr} on "
          f"{tap.table.calibration.dataset} calibration windows; every token on the base tier; "
          f"{args.windows} held-out windows x 512 per text")
    print(f"# {environment()}")
    texts = list(evaluations)
    print("| base planes | " + " | ".join(f"{t}: ppl ratio / mean KL" for t in texts) + " |")
    print("|---|" + "---|" * len(texts))
    for label, results in rows:
        print(f"| {label} | " + " | ".join(f"{results[t][0]:.4f} / {results[t][1]:.5f}" for t in texts) + " |")
    print(f"# {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
