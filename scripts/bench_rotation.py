"""The input rotation, layer by layer: GPTQ's output error with and without a block Hadamard.

For every linear of the chosen decoder layers this script fits tiers 4 and 8 on half of
--windows x 2 calibration windows, once on W itself and once on W H for each Hadamard block
size in --blocks (H block-diagonal, tap_runtime.rotation; the Hessian rotated with it), then
measures the relative output error tr(E H E^T) / tr(W H W^T) of the weights brought back to
the input's own basis under three Hessians: the fit's own windows, the other half of the same
calibration text (held out), and --other calibration text (another domain). Neither is
evaluation text. Printed: the sums over the layers per block size (0: no rotation) and their
ratios to no rotation. A block written with a trailing ``s`` (``64s``) first flips the input
channels' signs at random (W diag(s) H, the randomised Hadamard of QuaRot); the runtime's
rotation has no signs, so that setting only measures whether they would pay.

    python scripts/bench_rotation.py --model models/gemma3 --layers 3,12 --windows 16 --blocks 0,32,64,128
    python scripts/bench_rotation.py --model models/gemma3 --layers 3,12 --windows 16 --blocks 0,64,64s
"""

from __future__ import annotations

import argparse

import torch

from bench_common import HESSIAN_MEASURES as MEASURES, add_layer_hessian_arguments, fit_held_out_and_other_hessians, print_tier_error_table
from tap_convert.convert import _plane_specs, choose_group_size
from tap_convert.gptq import gptq_tiers
from tap_convert.policy import relative_output_error
from tap_convert.schemes import choose_scheme, scheme_errors
from tap_runtime.modeling import linear_weight
from tap_runtime.planes import dequantize_planes
from tap_runtime.rotation import rotate_mean_square, rotate_second_moment, rotate_weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_hessian_arguments(parser)
    parser.add_argument("--other", default="c4", help="calibration text of another domain (wikitext / c4)")
    parser.add_argument("--blocks", default="0,32,64,128",
                        help="Hadamard block sizes; 0 is no rotation and comes first; a trailing 's' (64s) "
                             "flips the input channels' signs at random before the block (randomised Hadamard)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random signs")
    args = parser.parse_args()
    blocks = args.blocks.split(",")
    if blocks[0] != "0":
        parser.error("--blocks must start with 0 (no rotation), the baseline of the ratios")
    sites, fit, measured_by_site = fit_held_out_and_other_hessians(args, "bench_rotation")
    totals = {(b, tier, m): 0.0 for b in blocks for tier in (4, 8) for m in MEASURES}
    generator = torch.Generator().manual_seed(args.seed)
    for site in sites:
        weight, hessian = linear_weight(site).float(), fit[site.name].hessian
        group_size = choose_group_size(site.in_features, args.group_size)
        measured = measured_by_site[site.name]
        signs = torch.randint(0, 2, (site.in_features,), generator=generator).float() * 2 - 1
        for setting in blocks:
            block, signed = int(setting.rstrip("s")), setting.endswith("s")
            if block and site.in_features % block:
                raise SystemExit(f"{site.name}: width {site.in_features} is not a multiple of block {block}")
            flip = signs if signed else torch.ones_like(signs)
            # W diag(s) H with the Hessian diag(s) S diag(s) H-rotated: the same output error.
            rotated = rotate_weight(weight * flip, block)
            rotated_hessian = rotate_second_moment(hessian * flip[:, None] * flip[None, :], block)
            mean_square = rotate_mean_square(fit[site.name].mean_square, block)
            scheme, _ = choose_scheme(scheme_errors(rotated, group_size, rotated_hessian, mean_square), "auto")
            specs = _plane_specs((4, 8), group_size, base_symmetric=scheme == "symmetric")
            planes = gptq_tiers(rotated, specs, rotated_hessian)
            for count, tier in enumerate((4, 8), start=1):
                approximation = rotate_weight(dequantize_planes(planes, count), block) * flip  # back to W's basis
                for measure, under in measured.items():
                    totals[setting, tier, measure] += relative_output_error(weight, approximation, under)
        print(f"  {site.name} done", flush=True)
    print_tier_error_table("block", blocks, totals, lambda b: b if b != "0" else "none")

if __name__ == "__main__":
    main()
