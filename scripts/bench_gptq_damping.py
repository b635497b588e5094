"""GPTQ's damping, layer by layer: output error on windows the fit did not see.

GPTQ minimises the layer's output error on its calibration windows; the damping (a fraction of
the Hessian's mean diagonal added to it) weighs each weight's own error beside that. Too little
and the planes fit those windows rather than the text: the error measured on the same windows
flatters it. So for every linear of the chosen decoder layers this script fits tiers 4 and 8 on
half of --windows x 2 calibration windows, then measures the relative output error
tr(E H E^T) / tr(W H W^T) under three Hessians: the fit's own windows, the other half of the same
calibration text (held out), and --other calibration text (another domain). Neither is evaluation
text. Printed: the sums over the layers, per damping, and their ratios to the first damping.

    python scripts/bench_gptq_damping.py --model models/gemma3 --layers 3,12 --dampings 0.01,0.03,0.1,0.3
"""

from __future__ import annotations

import argparse

from bench_common import add_layer_hessian_arguments, environment, layer_hessians
from tap_convert.convert import _plane_specs, choose_group_size
from tap_convert.gptq import gptq_tiers
from tap_convert.policy import relative_output_error
from tap_convert.schemes import choose_scheme, scheme_errors
from tap_runtime.modeling import linear_weight
from tap_runtime.planes import dequantize_planes

MEASURES = ("fit", "held out", "other text")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_hessian_arguments(parser)
    parser.add_argument("--other", default="c4", help="calibration text of another domain (wikitext / c4)")
    parser.add_argument("--dampings", default="0.01,0.03,0.1,0.3")
    args = parser.parse_args()
    dampings = [float(d) for d in args.dampings.split(",")]
    sites, fit = layer_hessians(args, split=(0, 2))
    _, held_out = layer_hessians(args, split=(1, 2))
    _, other = layer_hessians(args, args.other)
    print(f"# bench_gptq_damping: {args.model}, layers {args.layers}, fit on {args.windows} {args.calib} windows, "
          f"held out {args.windows} {args.calib} windows, other text {args.windows} {args.other} windows")
    print(f"# {environment()}")
    totals = {(d, tier, m): 0.0 for d in dampings for tier in (4, 8) for m in MEASURES}
    for site in sites:
        weight, hessian = linear_weight(site), fit[site.name].hessian
        group_size = choose_group_size(site.in_features, args.group_size)
        scheme, _ = choose_scheme(scheme_errors(weight, group_size, hessian, fit[site.name].mean_square), "auto")
        specs = _plane_specs((4, 8), group_size, base_symmetric=scheme == "symmetric")
        measured = dict(zip(MEASURES, (hessian, held_out[site.name].hessian, other[site.name].hessian)))
        for damping in dampings:
            planes = gptq_tiers(weight, specs, hessian, damping=damping)
            for count, tier in enumerate((4, 8), start=1):
                approximation = dequantize_planes(planes, count)
                for measure, under in measured.items():
                    totals[damping, tier, measure] += relative_output_error(weight, approximation, under)
        print(f"  {site.name} done", flush=True)
    print()
    header = " ".join(f"{f'tier {t} {m}':>18s}" for t in (4, 8) for m in MEASURES)
    print(f"{'damping':>8s} {header}")
    for damping in dampings:
        print(f"{damping:8g} " + " ".join(f"{totals[damping, t, m]:18.4e}" for t in (4, 8) for m in MEASURES))
    first = dampings[0]
    for damping in dampings[1:]:
        ratios = " ".join(f"{totals[damping, t, m] / totals[first, t, m]:18.3f}" for t in (4, 8) for m in MEASURES)
        print(f"{f'{damping:g}/{first:g}':>8s} {ratios}")


if __name__ == "__main__":
    main()
