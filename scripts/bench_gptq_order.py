"""GPTQ's column order, layer by layer: output error of activation order against column order.

For every linear of the chosen decoder layers: calibration Hessians from --windows windows of the
calibration text (never the evaluation text), the layer's base-plane scheme chosen as the
converter chooses it, then tiers 4 and 8 fitted by GPTQ in each order. Printed: the relative
output error tr(E H E^T) / tr(W H W^T) per tier and order, and the sums' ratio.

    python scripts/bench_gptq_order.py --model models/gemma3 --layers 3,12
"""

from __future__ import annotations

import argparse

from bench_common import add_layer_hessian_arguments, environment, layer_hessians
from tap_convert.convert import _plane_specs, choose_group_size
from tap_convert.gptq import GPTQ_ORDERS, gptq_tiers
from tap_convert.policy import relative_output_error
from tap_convert.schemes import choose_scheme, scheme_errors
from tap_runtime.modeling import linear_weight
from tap_runtime.planes import dequantize_planes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_hessian_arguments(parser)
    args = parser.parse_args()
    sites, stats = layer_hessians(args)
    layers = {site.layer_index for site in sites}
    print(f"# bench_gptq_order: {args.model}, layers {sorted(layers)}, {args.windows} {args.calib} calibration windows")
    print(f"# {environment()}")
    print(f"{'linear':42s} {'tier 4 column':>13s} {'tier 4 activ.':>13s} {'tier 8 column':>13s} {'tier 8 activ.':>13s}")
    totals = {(tier, order): 0.0 for tier in (4, 8) for order in GPTQ_ORDERS}
    for site in sites:
        weight, hessian = linear_weight(site), stats[site.name].hessian
        group_size = choose_group_size(site.in_features, args.group_size)
        errors = scheme_errors(weight, group_size, hessian, stats[site.name].mean_square)
        scheme, _ = choose_scheme(errors, "auto")
        specs = _plane_specs((4, 8), group_size, base_symmetric=scheme == "symmetric")
        row = {}
        for order in GPTQ_ORDERS:
            planes = gptq_tiers(weight, specs, hessian, order)
            for count, tier in enumerate((4, 8), start=1):
                row[tier, order] = relative_output_error(weight, dequantize_planes(planes, count), hessian)
                totals[tier, order] += row[tier, order]
        print(f"{site.name:42s} {row[4, 'column']:13.3e} {row[4, 'activation']:13.3e} {row[8, 'column']:13.3e} {row[8, 'activation']:13.3e}")
    print(f"{'sum':42s} {totals[4, 'column']:13.3e} {totals[4, 'activation']:13.3e} {totals[8, 'column']:13.3e} {totals[8, 'activation']:13.3e}")
    print(f"activation / column: tier 4 {totals[4, 'activation'] / totals[4, 'column']:.3f}, "
          f"tier 8 {totals[8, 'activation'] / totals[8, 'column']:.3f}")


if __name__ == "__main__":
    main()
