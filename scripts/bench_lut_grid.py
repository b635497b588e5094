"""Would non-uniform 4-bit levels lower the base tier's error enough to pay for a lookup in every
kernel? Measured in float before building anything.

The base plane's codes 0..15 stand for evenly spaced values, (q - zero) x scale. Rotated weights
are bell-shaped within a group, so evenly spaced levels waste resolution in the tails. Here one
table of 16 levels L[0..15] (in code units) replaces the even ones, (L[q] - zero) x scale, as
llama.cpp's IQ4_NL does with its fixed table. The table is fitted once per model (Lloyd's
algorithm) on the rotated weights of every linear, normalised by each group's scale and zero for
the unclipped range; no calibration text is involved.

Both variants run through bench_sequential_gptq's one-shot fit on the same calibration windows
(Hessians from the float model), with the converter's act-order GPTQ, clip search and stored
plane layouts; only the rounding grid of the base plane differs. The residual plane is the
converter's uniform one, fitted to what the base plane leaves. Quality is measured with the
planes swapped into the checkpoint on the reference kernel: every token on the base tier, and
budget routing with the stored router.

    python scripts/bench_lut_grid.py --model models/gemma3 --tap models/gemma3-tap-kl --samples 64 --windows 16 --text c4
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tap_runtime
from bench_common import environment, eval_windows, fp32_references, heldout_text, set_threads, tap_quality
from bench_sequential_gptq import _gptq_planes, fit_variant
from calibration.data import load_calibration_text, make_windows, tokenize_text
from tap_convert.gptq import _inverse_hessian_factor, gptq_plane
from tap_convert.quantize import _candidate, clip_ratios, scale_reference_for
from tap_runtime.architectures import get_architecture
from tap_runtime.layers import TapLinear
from tap_runtime.modeling import iter_linear_sites, linear_weight
from tap_runtime.planes import dequantize_plane
from tap_runtime.rotation import rotate_weight

_BLOCK = 128


def fit_levels(weights: list[torch.Tensor], spec, samples: int = 400_000, iterations: int = 40) -> torch.Tensor:
    """16 levels in code units by Lloyd's algorithm on group-normalised values g / scale + zero."""
    values = []
    for weight in weights:
        groups = weight.reshape(weight.shape[0], -1, spec.group_size)
        scales, zeros = _candidate(groups, 1.0, spec, scale_reference_for(weight, spec))
        values.append((groups / scales + zeros).clamp(0, 2**spec.bits - 1).reshape(-1))
    values = torch.cat(values)
    values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:samples]]
    levels = torch.arange(2**spec.bits, dtype=torch.float32)
    for _ in range(iterations):
        nearest = torch.bucketize(values, (levels[1:] + levels[:-1]) / 2)
        for k in range(levels.numel()):
            members = values[nearest == k]
            if members.numel():
                levels[k] = members.mean()
    return levels


def _lut_round(values: torch.Tensor, levels: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    return levels[torch.bucketize(values, midpoints)]


def lut_gptq_plane(weight, spec, hessian, levels, damping) -> torch.Tensor:
    """The converter's act-order GPTQ with static groups, rounding to ``levels``: (out, in) float32
    of the dequantized plane. Group parameters come from the same clip search, scored on the table."""
    weight = weight.detach().to(torch.float32).clone()
    out_features, in_features = weight.shape
    dead = torch.diag(hessian) == 0
    weight[:, dead] = 0.0
    importance = torch.diag(hessian).clamp_min(0)
    importance = importance + importance.mean() * 1e-3 + 1e-12
    midpoints = (levels[1:] + levels[:-1]) / 2
    reference = scale_reference_for(weight, spec)
    groups = weight.reshape(out_features, -1, spec.group_size)
    group_importance = importance.reshape(-1, spec.group_size)
    best = None
    for ratio in clip_ratios(spec):
        scales, zeros = _candidate(groups, ratio, spec, reference)
        error = (((_lut_round(groups / scales + zeros, levels, midpoints) - zeros) * scales - groups) ** 2 * group_importance).sum(-1, keepdim=True)
        if best is None:
            best = (error, scales, zeros)
        else:
            better = error < best[0]
            best = (torch.where(better, error, best[0]), torch.where(better, scales, best[1]), torch.where(better, zeros, best[2]))
    scales, zeros = best[1].squeeze(-1), best[2].squeeze(-1)  # (out, groups)
    permutation = torch.argsort(torch.diag(hessian), descending=True, stable=True)
    factor = _inverse_hessian_factor(hessian[permutation][:, permutation], dead[permutation], damping)
    group_of_column = permutation // spec.group_size
    weight_t = weight.t()[permutation].contiguous()
    column_scales = scales.t()[group_of_column].contiguous()
    column_zeros = zeros.t()[group_of_column].contiguous()
    dequantized_t = torch.empty(in_features, out_features)
    for start in range(0, in_features, _BLOCK):
        end = min(start + _BLOCK, in_features)
        block = weight_t[start:end]
        block_errors = torch.empty(end - start, out_features)
        block_factor = factor[start:end, start:end]
        for i in range(end - start):
            column, s, z = block[i], column_scales[start + i], column_zeros[start + i]
            value = (_lut_round(column / s + z, levels, midpoints) - z) * s
            dequantized_t[start + i] = value
            error = block_errors[i] = (column - value) / block_factor[i, i]
            if i + 1 < end - start:
                block[i + 1 :] -= block_factor[i, i + 1 :].unsqueeze(1) * error.unsqueeze(0)
        if end < in_features:
            weight_t[end:] -= factor[start:end, end:].t() @ block_errors
    dequantized = torch.empty(out_features, in_features)
    dequantized[:, permutation] = dequantized_t.t()
    return dequantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tap", required=True, help="a two-tier (4/8) GPTQ checkpoint converted from it")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--text", default="c4")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--budget-bits", type=float, default=4.6)
    parser.add_argument("--with-uniform", action="store_true", help="also refit the even grid on the same windows (the control)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    started = time.perf_counter()
    tap = tap_runtime.load(args.tap, kernel="reference")
    extra = tap.table.calibration.extra
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    bos = tokenizer.bos_token_id if extra.get("bos_prepended") else None
    spec = get_architecture(model.config.get_text_config().model_type, source=f"{args.model}/config.json")
    windows = make_windows(tokenize_text(tokenizer, load_calibration_text(tap.table.calibration.dataset)), args.samples, 512, args.seed, bos)
    policies = tap.table.linear
    base_specs = {p.planes[0] for p in policies.values()}
    if len(base_specs) != 1 or next(iter(base_specs)).symmetric:
        raise SystemExit(f"{args.tap}: this script fits one table for asymmetric base planes of one layout; found {base_specs}")
    base_spec = next(iter(base_specs))
    rotated = [rotate_weight(linear_weight(s).float(), policies[s.name].input_rotation)
               for s in iter_linear_sites(model, spec) if s.name in policies]
    levels = fit_levels(rotated, base_spec)
    del rotated

    def lut_planes(weight, specs, hessian, order, damping):
        if order != "activation":
            raise SystemExit(f"checkpoint converted with GPTQ order {order!r}; this script repeats activation order only")
        base = lut_gptq_plane(weight, specs[0], hessian, levels, damping)
        residual = dequantize_plane(gptq_plane(weight - base, specs[1], hessian, order, damping), torch.float32)
        return [base, residual]

    arms = {"lut": lut_planes}
    if args.with_uniform:
        arms = {"uniform": _gptq_planes, **arms}
    planes, seconds = {}, {}
    for label, fitter in arms.items():
        tick = time.perf_counter()
        planes[label] = fit_variant("oneshot", model, spec, tap, windows, args.batch_size, extra.get("sink_weight"),
                                    extra.get("gptq_order", "activation"), extra.get("gptq_damping", 0.01), 0.0, fitter)
        seconds[label] = time.perf_counter() - tick
    print(f"# bench_lut_grid: {args.tap} vs {args.model}; {args.samples} windows (seed {args.seed}); held-out {args.text}, {args.windows} x 512")
    print("# levels (code units): " + " ".join(f"{v:.2f}" for v in levels.tolist()))
    print("# fit seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print(f"# {environment()}")
    modules = {name: m for name, m in tap.model.named_modules() if isinstance(m, TapLinear)}
    base_tier = tap.table.tiers[0]
    for text in args.text.split(","):
        evaluation = eval_windows(tokenizer, heldout_text(text), 512, args.windows, bos)
        references, fp32_ppl = fp32_references(model, evaluation)
        for label, fitted in planes.items():
            for name, module in modules.items():
                module._prepared = list(fitted[name])
            for routing_label, mode, kwargs in (("tier 4", "fixed", {"tier": base_tier}), (f"budget {args.budget_bits}", "budget", {"bits": args.budget_bits})):
                tap.set_routing(mode, **kwargs)
                quality = tap_quality(tap, evaluation, references)
                print(f"{text:9s} {label:8s} {routing_label:12s} {quality['avg_bits']:6.3f} {quality['ppl'] / fp32_ppl:9.4f} {quality['kl']:9.5f}", flush=True)
    print(f"# {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
