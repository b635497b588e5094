"""Refitting group scales after GPTQ, layer by layer: output error with 0, 1, 2 ... refit rounds.

GPTQ (act-order, static groups) fixes every group's scale and zero before compensation moves
the weights; a refit round solves each row's least-squares scales and zeros for the codes GPTQ
chose (under the layer-input Hessian, rounded to the stored one-byte grids) and runs GPTQ again
with them, keeping per row whichever was better. For every linear of --layers this script fits
tiers 4 and 8 as the converter does (block-64 Hadamard rotation, the scheme it would choose) on
half of --windows x 2 calibration windows, once per entry of --rounds, and measures the
relative output error tr(E H E^T) / tr(W H W^T) under the fit's own Hessian, under the other
half of the calibration text (held out) and under --other calibration text. No evaluation text
is used. Printed: sums over the linears and ratios to the first setting.

    python scripts/bench_gptq_refit.py --model models/gemma3 --layers 3,12 --windows 16 --rounds 0,1,2
"""

from __future__ import annotations

import argparse
import time

from bench_common import HESSIAN_MEASURES as MEASURES, add_layer_hessian_arguments, fit_held_out_and_other_hessians, print_tier_error_table
from tap_convert.convert import _plane_specs, choose_group_size
from tap_convert.gptq import gptq_tiers
from tap_convert.policy import relative_output_error
from tap_convert.schemes import choose_scheme, scheme_errors
from tap_runtime.modeling import linear_weight
from tap_runtime.planes import dequantize_planes
from tap_runtime.rotation import rotate_mean_square, rotate_second_moment, rotate_weight, rotation_block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_hessian_arguments(parser)
    parser.add_argument("--other", default="c4", help="calibration text of another domain (wikitext / c4)")
    parser.add_argument("--rounds", default="0,1,2",
                        help="settings to compare, the first is the baseline: refit rounds, optionally followed by "
                             "d and coordinate-descent sweeps over the codes (2d1: two refits, then one sweep)")
    args = parser.parse_args()
    settings = args.rounds.split(",")
    sites, fit, measured_by_site = fit_held_out_and_other_hessians(args, "bench_gptq_refit")
    totals = {(r, tier, m): 0.0 for r in settings for tier in (4, 8) for m in MEASURES}
    seconds = dict.fromkeys(settings, 0.0)
    for site in sites:
        weight = linear_weight(site).float()
        block = rotation_block(site.in_features)
        rotated = rotate_weight(weight, block)
        hessian = rotate_second_moment(fit[site.name].hessian, block)
        group_size = choose_group_size(site.in_features, args.group_size)
        mean_square = rotate_mean_square(fit[site.name].mean_square, block)
        scheme, _ = choose_scheme(scheme_errors(rotated, group_size, hessian, mean_square), "auto")
        specs = _plane_specs((4, 8), group_size, base_symmetric=scheme == "symmetric")
        for rounds in settings:
            tick = time.perf_counter()
            refits, _, sweeps = rounds.partition("d")
            planes = gptq_tiers(rotated, specs, hessian, refit_rounds=int(refits), descent_sweeps=int(sweeps or 0))
            seconds[rounds] += time.perf_counter() - tick
            for count, tier in enumerate((4, 8), start=1):
                approximation = rotate_weight(dequantize_planes(planes, count), block)  # back to W's basis
                for measure, under in measured_by_site[site.name].items():
                    totals[rounds, tier, measure] += relative_output_error(weight, approximation, under)
        print(f"  {site.name} done", flush=True)
    print_tier_error_table("rounds", settings, totals)
    print("fit seconds: " + ", ".join(f"{r} rounds {seconds[r]:.1f}" for r in settings))


if __name__ == "__main__":
    main()
