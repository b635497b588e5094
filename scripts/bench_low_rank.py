"""Would a low-rank correction of the base plane buy more quality per bit than routing does?
Measured in float before building anything.

The base plane leaves an error E = W H - Q (rotated space). Its activation-weighted form E S,
with S = (H^T X^T X H / n + damping)^(1/2) from calibration inputs, has a decaying spectrum even
where E itself looks like noise: a rank-r term L = U V with U V S the best rank-r approximation
of E S minimises the layer's output error on the calibration inputs (LQER, QERA, EoRA). Storing
U and V at 8 bits costs r (in + out) bytes per linear, bits that budget routing could instead
spend on routed tokens. So every row here is at the same average bits read per token: the
correction's bits are taken off the routing budget.

The planes are the checkpoint's own, swapped on the reference kernel: the base plane becomes
Q + L and the residual plane R - L, so a routed token still reads exactly base + residual.
The router is the stored one.

    python scripts/bench_low_rank.py --model models/gemma3 --tap models/gemma3-tap-kl --ranks 0,8,16 --text c4,wikitext
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

import tap_runtime
from bench_common import environment, eval_windows, fp32_references, heldout_text, plane_swap_setup, set_threads, tap_quality
from tap_runtime.rotation import rotate_second_moment, rotate_weight


def input_second_moments(model, sites, windows: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Every site's mean x^T x (in, in) over the calibration windows, from the float model."""
    sums = {s.name: torch.zeros(s.in_features, s.in_features, dtype=torch.float64) for s in sites}
    counts = dict.fromkeys(sums, 0)

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] += (x.t() @ x).double()
            counts[name] += x.shape[0]

        return hook

    handles = [s.module.register_forward_pre_hook(hook_for(s.name)) for s in sites]
    try:
        with torch.inference_mode():
            for batch in tqdm(windows.split(batch_size), desc="second moments"):
                model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).float() for name in sums}


def quantize_factor(factor: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-row rounding of a (rows, r) factor to ``bits``, dequantized."""
    top = 2 ** (bits - 1) - 1
    scale = factor.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / top
    return (factor / scale).round().clamp(-top, top) * scale


def low_rank_corrections(error: torch.Tensor, second_moment: torch.Tensor, ranks: list[int], damping: float, bits: int):
    """For each rank r, L_r (out, in) minimising ||(E - L) S||_F with S = (M + damping)^(1/2), its
    factors rounded to ``bits``."""
    features = second_moment.shape[0]
    damped = second_moment.double() + damping * second_moment.diagonal().mean().double() * torch.eye(features, dtype=torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh(damped)
    eigenvalues = eigenvalues.clamp_min(eigenvalues.max() * 1e-10)
    root = (eigenvectors * eigenvalues.sqrt()) @ eigenvectors.t()
    inverse_root = (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.t()
    u, sigma, vt = torch.linalg.svd(error.double() @ root, full_matrices=False)
    corrections = {}
    for rank in ranks:
        if rank == 0:
            corrections[rank] = torch.zeros_like(error)
            continue
        half = sigma[:rank].sqrt()
        left = (u[:, :rank] * half).float()  # (out, r)
        right = ((half[:, None] * vt[:rank]) @ inverse_root).float()  # (r, in)
        corrections[rank] = quantize_factor(left, bits) @ quantize_factor(right.t().contiguous(), bits).t()
    return corrections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the fp32 source model directory")
    parser.add_argument("--tap", required=True, help="a two-tier (4/8) checkpoint converted from it")
    parser.add_argument("--ranks", default="0,8,16")
    parser.add_argument("--factor-bits", type=int, default=8)
    parser.add_argument("--damping", type=float, default=0.01, help="fraction of the mean diagonal added to x^T x")
    parser.add_argument("--calib", default=None, help="calibration source (default: the checkpoint's own)")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--seed", type=int, default=1, help="window seed (the converter's default is 0)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--text", default="c4,wikitext", help="held-out texts, comma list")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--budget-bits", type=float, default=4.6)
    parser.add_argument("--routings", default="tier4,budget")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    started = time.perf_counter()
    ranks = [int(r) for r in args.ranks.split(",") if r]

    setup = plane_swap_setup(args)
    tap, calib, model, tokenizer, bos = setup.tap, setup.calib, setup.model, setup.tokenizer, setup.bos
    windows, modules, sites = setup.windows, setup.modules, setup.sites
    moments = input_second_moments(model, sites, windows, args.batch_size)

    stored = {name: list(m._prepared) for name, m in modules.items()}
    variants: dict[int, dict[str, list[torch.Tensor]]] = {r: {} for r in ranks}
    total_weights = 0
    factor_bits = dict.fromkeys(ranks, 0)
    tick = time.perf_counter()
    for site in tqdm(sites, desc="corrections"):
        policy = tap.table.linear[site.name]
        weight = site.module.weight.data.float()
        weight = weight if site.layout == "linear" else weight.t()
        rotated = rotate_weight(weight, policy.input_rotation)
        base, residual = stored[site.name][0].float(), stored[site.name][1].float()
        error = rotated - base
        moment = rotate_second_moment(moments[site.name], policy.input_rotation)
        corrections = low_rank_corrections(error, moment, ranks, args.damping, args.factor_bits)
        out_features, in_features = error.shape
        total_weights += out_features * in_features
        for rank, correction in corrections.items():
            variants[rank][site.name] = [base + correction, residual - correction]
            # factors plus one float16 scale per factor row
            if rank:
                factor_bits[rank] += rank * (out_features + in_features) * args.factor_bits + (out_features + rank) * 16
    fit_seconds = time.perf_counter() - tick

    print(f"# bench_low_rank: {args.tap} vs {args.model}; {args.samples} windows of {calib} (seed {args.seed}); "
          f"damping {args.damping}; {args.factor_bits}-bit factors; held-out {args.text}, {args.windows} windows x 512")
    print(f"# fit seconds {fit_seconds:.0f}; correction bits per weight: "
          + ", ".join(f"rank {r} {factor_bits[r] / total_weights:.3f}" for r in ranks))
    print(f"# {environment()}")
    print(f"{'text':9s} {'rank':>4s} {'routing':12s} {'avg bits':>8s} {'share>base':>10s} {'ppl ratio':>9s} {'mean KL':>9s}")
    base_tier = tap.table.tiers[0]
    for text in args.text.split(","):
        evaluation = eval_windows(tokenizer, heldout_text(text), 512, args.windows, bos)
        references, fp32_ppl = fp32_references(model, evaluation)
        for rank in ranks:
            extra_bits = factor_bits[rank] / total_weights
            for name, module in modules.items():
                module._prepared = list(variants[rank][name])
            for routing in args.routings.split(","):
                if routing == "tier4":
                    tap.set_routing("fixed", tier=base_tier)
                    label = f"tier {base_tier}"
                else:
                    label = f"budget {args.budget_bits}"
                    try:
                        tap.set_routing("budget", bits=args.budget_bits - extra_bits)
                    except tap_runtime.InvalidConfigError:
                        print(f"{text:9s} {rank:4d} {label:12s} the correction alone reads more than the budget", flush=True)
                        continue
                quality = tap_quality(tap, evaluation, references)
                print(f"{text:9s} {rank:4d} {label:12s} {quality['avg_bits'] + extra_bits:8.3f} {quality['share_above_base']:10.3f} "
                      f"{quality['ppl'] / fp32_ppl:9.4f} {quality['kl']:9.5f}", flush=True)
        tap.set_routing()
    for name, module in modules.items():
        module._prepared = list(stored[name])
    print(f"# {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
