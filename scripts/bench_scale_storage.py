"""How group scales are stored, layer by layer: float16 against one-byte log codes.

For every linear of the chosen decoder layers: calibration Hessians from --windows windows of the
calibration text (never the evaluation text), the base-plane scheme chosen as the converter
chooses it, then tiers 4 and 8 fitted by GPTQ (activation order) three ways: float16 scales with
format 2's seven clip ratios; one-byte log codes with the same seven ratios rounded to the grid;
one-byte log codes with the clip search walking the grid one code at a time (format 3's
default). Printed: the relative output error tr(E H E^T) / tr(W H W^T) per tier, and the sums'
ratios to float16.

The fitting Hessians are also the ones the error is measured under, which flatters whichever
variant fits them most closely. ``--check-calib c4`` measures the same fitted planes under the
Hessians of another calibration text as well (out of sample; still never the evaluation text).

    python scripts/bench_scale_storage.py --model models/gemma3 --layers 3,12 --check-calib c4
"""

from __future__ import annotations

import argparse

from bench_common import add_layer_hessian_arguments, environment, layer_hessians
from tap_convert import gptq
from tap_convert.convert import _plane_specs, choose_group_size
from tap_convert.policy import relative_output_error
from tap_convert.quantize import CLIP_RATIOS, clip_ratios
from tap_convert.schemes import choose_scheme, scheme_errors
from tap_runtime.modeling import linear_weight
from tap_runtime.planes import dequantize_planes

# label -> (scale bits, clip-ratio chooser)
VARIANTS = {
    "float16": (16, clip_ratios),
    "codes, 7 ratios": (8, lambda spec: CLIP_RATIOS),
    "codes, grid walk": (8, clip_ratios),
}


def _tiers(weight, hessian, group_size, symmetric, scale_bits, ratios, check_hessian=None):
    """Tier 4 and tier 8 errors under the fitting Hessian (and under ``check_hessian`` after them)."""
    chooser = gptq.clip_ratios
    gptq.clip_ratios = ratios
    try:
        planes = gptq.gptq_tiers(weight, _plane_specs((4, 8), group_size, symmetric, scale_bits), hessian, "activation")
    finally:
        gptq.clip_ratios = chooser
    hessians = [hessian] if check_hessian is None else [hessian, check_hessian]
    return [relative_output_error(weight, dequantize_planes(planes, count), h) for h in hessians for count in (1, 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_hessian_arguments(parser)
    parser.add_argument("--check-calib", default=None, help="also measure under this calibration text's Hessians (e.g. c4)")
    args = parser.parse_args()
    sites, stats = layer_hessians(args)
    check_stats = layer_hessians(args, args.check_calib)[1] if args.check_calib else None
    layers = {site.layer_index for site in sites}
    under = [f"{args.calib} (fit)"] + ([f"{args.check_calib} (check)"] if args.check_calib else [])
    print(f"# bench_scale_storage: {args.model}, layers {sorted(layers)}, {args.windows} {args.calib} calibration windows"
          + (f"; errors also under {args.windows} {args.check_calib} windows' Hessians" if args.check_calib else ""))
    print(f"# {environment()}")
    columns = [f"{label} t{t}" + (f" {h.split()[0]}" if check_stats else "") for h in under for label in VARIANTS for t in (4, 8)]
    print(f"{'linear':42s} " + " ".join(f"{c:>26s}" for c in columns))
    totals = {(h, label): [0.0, 0.0] for h in under for label in VARIANTS}
    for site in sites:
        weight, hessian = linear_weight(site), stats[site.name].hessian
        check_hessian = check_stats[site.name].hessian if check_stats else None
        group_size = choose_group_size(site.in_features, args.group_size)
        scheme, _ = choose_scheme(scheme_errors(weight, group_size, hessian, stats[site.name].mean_square), "auto")
        cells = {h: [] for h in under}
        for label, (scale_bits, ratios) in VARIANTS.items():
            errors = _tiers(weight, hessian, group_size, scheme == "symmetric", scale_bits, ratios, check_hessian)
            for k, h in enumerate(under):
                totals[(h, label)][0] += errors[2 * k]
                totals[(h, label)][1] += errors[2 * k + 1]
                cells[h] += [f"{e:26.3e}" for e in errors[2 * k : 2 * k + 2]]
        print(f"{site.name:42s} " + " ".join(c for h in under for c in cells[h]), flush=True)
    for h in under:
        base = totals[(h, "float16")]
        print(f"# error under {h} Hessians")
        for label in VARIANTS:
            tier4, tier8 = totals[(h, label)]
            print(f"{label:18s} sum / float16: tier 4 {tier4 / base[0]:.4f}, tier 8 {tier8 / base[1]:.4f}")


if __name__ == "__main__":
    main()
