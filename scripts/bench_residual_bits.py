"""Would a narrower residual plane buy more quality per bit? Tier 4 + a 2- or 3-bit residual
("tier 6" / "tier 7") against the stored 4-bit residual (tier 8), at the same average bits.

TAP's routed tokens read the base plane plus one 4-bit residual plane (4.125 stored bits per
weight). A 2-bit residual costs half as much, so at the same average bits the router could send
twice the share of token-layers up, each less exactly. Which wins depends on how the quantization
error is spread over tokens, so this script measures it instead of guessing:

1. one fp32 pass over calibration windows (the checkpoint's own calibration source, fresh
   windows) collects each linear's input Hessian with the converter's own code
   (``collect_input_stats``; keys and values with the first token weighted, as converted);
2. for each residual width, every linear's residual ``W H - base`` is fitted with GPTQ on that
   Hessian in the rotated space the planes live in (``gptq_plane``, the converter's; the base
   plane is the checkpoint's, unchanged). Width 4 is fitted again too, as the control: it should
   land on the stored residual's quality, and the narrower widths are compared with it, not
   with the stored plane, so the comparison does not favour the converter's larger sample;
3. on held-out text: every token on the widened tier, and budget routing at ``--budget-bits``
   true average bits. The runtime counts a residual as 4.125 bits, so the budget's share is
   asked for at the bits that give the same share: base + (budget - base) x 4.125 / width's.

Planes are swapped in as float32 matrices on the reference kernel: this measures quality only
(no narrow-plane kernel exists).

    python scripts/bench_residual_bits.py --model models/gemma3 --tap models/gemma3-tap-hr-mix \
        --widths 4,3,2 --text wikitext,c4 --windows 8
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

from bench_common import environment, eval_windows, fp32_references, heldout_text, plane_swap_setup, set_threads, tap_quality
from calibration.capture import collect_input_stats
from calibration.stats import InputSecondMoment
from tap_convert.gptq import gptq_plane
from tap_runtime.format import PlaneSpec
from tap_runtime.modeling import linear_weight
from tap_runtime.planes import dequantize_plane
from tap_runtime.rotation import rotate_second_moment, rotate_weight


def _residual_spec(stored: PlaneSpec, bits: int, symmetric: bool | None = None) -> PlaneSpec:
    """The stored residual's layout at ``bits``. Symmetric planes' codes run -2**(bits-1) ..
    2**(bits-1) - 1, so at 2 bits only -1, 0, 1 are used well; asymmetric ones store a zero."""
    return PlaneSpec(bits=bits, group_size=stored.group_size, symmetric=stored.symmetric if symmetric is None else symmetric,
                     zero_bits=stored.zero_bits, scale_bits=stored.scale_bits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the fp32 source model directory")
    parser.add_argument("--tap", required=True, help="a two-tier (4/8) TAP checkpoint converted from it with GPTQ")
    parser.add_argument("--widths", default="4,3,2", help="residual plane widths to fit (4 is the control)")
    parser.add_argument("--calib", default=None, help="calibration source (default: the checkpoint's own)")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows for the Hessians")
    parser.add_argument("--seed", type=int, default=1, help="window seed (the converter's default is 0)")
    parser.add_argument("--text", default="wikitext,c4", help="held-out texts, comma list")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--budget-bits", type=float, default=4.6)
    parser.add_argument("--asymmetric", action="store_true",
                        help="fit the narrower residuals (not the width-4 control) with a zero point per group")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    started = time.perf_counter()

    setup = plane_swap_setup(args)
    tap, extra, calib, model, tokenizer, bos = setup.tap, setup.extra, setup.calib, setup.model, setup.tokenizer, setup.bos
    spec, windows, modules, sites = setup.spec, setup.windows, setup.modules, setup.sites
    stats = collect_input_stats(model, sites, windows, 4, progress=True, hessians=True)
    sink_weight = extra.get("sink_weight")

    widths = [int(w) for w in args.widths.split(",")]
    stored = {name: list(m._prepared) for name, m in modules.items()}
    fitted: dict[int, dict[str, torch.Tensor]] = {w: {} for w in widths}

    def symmetry(width: int) -> bool | None:
        return False if args.asymmetric and width != 4 else None

    for site in tqdm(sites, desc="fitting residual planes"):
        policy = tap.table.linear[site.name]
        site_stats = stats[site.name]
        if not isinstance(site_stats, InputSecondMoment):
            raise SystemExit(f"{site.name}: input too wide for a full Hessian; this script needs GPTQ-sized inputs")
        kv = any(site.name.endswith("." + n) for n in spec.key_value_projections)
        hessian = site_stats.hessian_with_first_weighted(sink_weight) if sink_weight and kv else site_stats.hessian
        rotation = policy.input_rotation
        hessian = rotate_second_moment(hessian, rotation)
        target = rotate_weight(linear_weight(site).to(torch.float32), rotation) - stored[site.name][0]
        for width in widths:
            plane = gptq_plane(target, _residual_spec(policy.planes[1], width, symmetry(width)), hessian,
                               extra.get("gptq_order", "activation"), extra.get("gptq_damping", 0.01))
            fitted[width][site.name] = dequantize_plane(plane, torch.float32)
    del stats

    def residual_bits(width: int) -> float:
        return _residual_spec(next(iter(tap.table.linear.values())).planes[1], width, symmetry(width)).stored_bits_per_weight()

    base_tier, top_tier = tap.table.tiers
    stored_residual = residual_bits(4)
    if any(p.planes[1].stored_bits_per_weight() != stored_residual for p in tap.table.linear.values()):
        raise SystemExit(f"{args.tap}: residual planes of more than one layout; the bits conversion assumes one")

    def measure(texts_windows, references) -> tuple[float, float, float, float]:
        """(perplexity, mean KL, share above the base tier, bits as the runtime counts them)."""
        quality = tap_quality(tap, texts_windows, references)
        return quality["ppl"], quality["kl"], quality["share_above_base"], quality["avg_bits"]

    print(f"# bench_residual_bits: {args.tap} vs {args.model}; Hessians from {args.samples} windows of {calib} "
          f"(seed {args.seed}); held-out {args.text}, {args.windows} windows x 512")
    print(f"# {environment()}")
    print(f"{'text':9s} {'row':44s} {'true bits':>9s} {'share>base':>10s} {'ppl ratio':>9s} {'mean KL':>9s}")
    for text in args.text.split(","):
        evaluation = eval_windows(tokenizer, heldout_text(text), 512, args.windows, bos)
        references, fp32_ppl = fp32_references(model, evaluation)

        def row(label: str, bits: float, result: tuple[float, float, float, float]) -> None:
            ppl, kl, share, _ = result
            print(f"{text:9s} {label:44s} {bits:9.3f} {share:10.3f} {ppl / fp32_ppl:9.4f} {kl:9.5f}", flush=True)

        for name, module in modules.items():
            module._prepared = list(stored[name])
        tap.set_routing("fixed", tier=base_tier)
        result = measure(evaluation, references)
        base_bits = result[3]  # the base planes' bits, averaged over the linears' weights
        row("tier 4 (base plane alone)", base_bits, result)

        def true_bits(reported: float, width_bits: float) -> float:
            """The bits read with a width_bits residual where the runtime counted 4.125-bit ones."""
            return base_bits + (reported - base_bits) * width_bits / stored_residual

        tap.set_routing("fixed", tier=top_tier)
        result = measure(evaluation, references)
        row("stored 4-bit residual, every token", result[3], result)
        tap.set_routing("budget", bits=args.budget_bits)
        result = measure(evaluation, references)
        row("stored 4-bit residual, budget", result[3], result)
        for width in widths:
            for name, module in modules.items():
                module._prepared = [stored[name][0], fitted[width][name]]
            width_bits = residual_bits(width)
            tap.set_routing("fixed", tier=top_tier)
            result = measure(evaluation, references)
            kind = "asymmetric " if symmetry(width) is False else ""
            row(f"refitted {kind}{width}-bit residual, every token", true_bits(result[3], width_bits), result)
            asked = base_bits + (args.budget_bits - base_bits) * stored_residual / width_bits
            tap.set_routing("budget", bits=asked)
            result = measure(evaluation, references)
            row(f"refitted {kind}{width}-bit residual, budget", true_bits(result[3], width_bits), result)
        tap.set_routing()
    print(f"# {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
