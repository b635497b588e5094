"""How group scales are stored, layer by layer: float16 against one-byte log codes.

For every linear of the chosen decoder layers: calibration Hessians from --windows windows of the
calibration text (never the evaluation text), the base-plane scheme chosen as the converter
chooses it, then tiers 4 and 8 fitted by GPTQ (activation order) three ways: float16 scales with
format 2's seven clip ratios; one-byte log codes with the same seven ratios rounded to the grid;
one-byte log codes with the clip search walking the grid one code at a time (format 3's
default). Printed: the relative output error tr(E H E^T) / tr(W H W^T) per tier, and the sums'
ratios to float16.

    python scripts/bench_scale_storage.py --model models/gemma3 --layers 3,12
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


def _tiers(weight, hessian, group_size, symmetric, scale_bits, ratios):
    chooser = gptq.clip_ratios
    gptq.clip_ratios = ratios
    try:
        planes = gptq.gptq_tiers(weight, _plane_specs((4, 8), group_size, symmetric, scale_bits), hessian, "activation")
    finally:
        gptq.clip_ratios = chooser
    return [relative_output_error(weight, dequantize_planes(planes, count), hessian) for count in (1, 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_hessian_arguments(parser)
    args = parser.parse_args()
    sites, stats = layer_hessians(args)
    layers = {site.layer_index for site in sites}
    print(f"# bench_scale_storage: {args.model}, layers {sorted(layers)}, {args.windows} {args.calib} calibration windows")
    print(f"# {environment()}")
    print(f"{'linear':42s} " + " ".join(f"{label + ' t' + str(t):>22s}" for label in VARIANTS for t in (4, 8)))
    totals = {label: [0.0, 0.0] for label in VARIANTS}
    for site in sites:
        weight, hessian = linear_weight(site), stats[site.name].hessian
        group_size = choose_group_size(site.in_features, args.group_size)
        scheme, _ = choose_scheme(scheme_errors(weight, group_size, hessian, stats[site.name].mean_square), "auto")
        cells = []
        for label, (scale_bits, ratios) in VARIANTS.items():
            errors = _tiers(weight, hessian, group_size, scheme == "symmetric", scale_bits, ratios)
            totals[label][0] += errors[0]
            totals[label][1] += errors[1]
            cells += [f"{e:22.3e}" for e in errors]
        print(f"{site.name:42s} " + " ".join(cells), flush=True)
    base = totals["float16"]
    for label, (tier4, tier8) in totals.items():
        print(f"{label:18s} sum / float16: tier 4 {tier4 / base[0]:.4f}, tier 8 {tier8 / base[1]:.4f}")


if __name__ == "__main__":
    main()
