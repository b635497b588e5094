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

from bench_common import HESSIAN_MEASURES as MEASURES, add_layer_hessian_arguments, fit_held_out_and_other_hessians, print_tier_error_table
from tap_convert.convert import _plane_specs, choose_group_size
from tap_convert.gptq import gptq_tiers
from tap_convert.policy import relative_output_error
from tap_convert.schemes import choose_scheme, scheme_errors
from tap_runtime.modeling import linear_weight
from tap_runtime.planes import dequantize_planes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_hessian_arguments(parser)
    parser.add_argument("--other", default="c4", help="calibration text of another domain (wikitext / c4)")
    parser.add_argument("--dampings", default="0.01,0.03,0.1,0.3")
    args = parser.parse_args()
    dampings = [float(d) for d in args.dampings.split(",")]
    sites, fit, measured_by_site = fit_held_out_and_other_hessians(args, "bench_gptq_damping")
    totals = {(d, tier, m): 0.0 for d in dampings for tier in (4, 8) for m in MEASURES}
    for site in sites:
        weight, hessian = linear_weight(site), fit[site.name].hessian
        group_size = choose_group_size(site.in_features, args.group_size)
        scheme, _ = choose_scheme(scheme_errors(weight, group_size, hessian, fit[site.name].mean_square), "auto")
        specs = _plane_specs((4, 8), group_size, base_symmetric=scheme == "symmetric")
        measured = measured_by_site[site.name]
        for damping in dampings:
            planes = gptq_tiers(weight, specs, hessian, damping=damping)
            for count, tier in enumerate((4, 8), start=1):
                approximation = dequantize_planes(planes, count)
                for measure, under in measured.items():
                    totals[damping, tier, measure] += relative_output_error(weight, approximation, under)
        print(f"  {site.name} done", flush=True)
    print_tier_error_table("damping", dampings, totals, lambda d: f"{d:g}")

if __name__ == "__main__":
    main()
