"""GPTQ for linears wider than pass 1's Hessian limit, layer by layer: does it hold on unseen text?

``tap-convert --gptq-wide-layers`` fits Qwen2.5-1.5B's down projections (8,960 inputs) with GPTQ
on Hessians gathered a layer at a time, instead of round to nearest with the importance-weighted
clip search. On 32 calibration windows that cut their calibration output error to a third, yet
raised the base tier's held-out KL (README, Qwen section). This script asks why, one linear at
a time, as the converter fits it (rotated weight, the checkpoint's base-level table): for each
setting (round to nearest, then GPTQ at each damping) it fits tiers 4 and 8 on --windows
calibration windows and measures the relative output error tr(E H E^T) / tr(W H W^T) under the
fit's own Hessian, under --windows other windows of the same calibration text (held out), and
under --windows windows of --other calibration text. None of it is evaluation text.

    python scripts/bench_wide_gptq.py --model models/qwen1.5b --tap models/qwen1.5b-tap-lv \
        --calib c4 --other wikitext --layers 3,12 --windows 32 --dampings 0.01,0.1,1
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_common import HESSIAN_MEASURES as MEASURES, add_layer_hessian_arguments, environment, print_tier_error_table, set_threads


def _windows(args, tokenizer, spec, calib: str, count: int, part: int, parts: int) -> torch.Tensor:
    from calibration.data import load_calibration_text, make_windows, tokenize_text
    from tap_convert.convert import _tokenizer_adds_bos

    text = load_calibration_text(calib)
    bos = tokenizer.bos_token_id if (spec.needs_bos or _tokenizer_adds_bos(tokenizer)) else None
    windows = make_windows(tokenize_text(tokenizer, text), count * parts, args.seq_len, 0, bos, source=text.source)
    return windows[part::parts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_hessian_arguments(parser)
    parser.add_argument("--tap", default=None, help="a checkpoint whose base-level table the planes use (else even codes)")
    parser.add_argument("--other", default="wikitext", help="calibration text of another domain (wikitext / c4)")
    parser.add_argument("--suffix", default="down_proj", help="fit only the linears whose name ends so")
    parser.add_argument("--dampings", default="0.01,0.1,1")
    args = parser.parse_args()
    set_threads(args.threads)
    started = time.perf_counter()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibration.capture import collect_layer_moments
    from tap_convert.convert import _plane_specs, choose_group_size
    from tap_convert.gptq import gptq_tiers
    from tap_convert.policy import relative_output_error
    from tap_convert.quantize import quantize_tiers
    from tap_runtime.architectures import get_architecture
    from tap_runtime.format import ROUTING_FILE, RoutingTable
    from tap_runtime.modeling import iter_linear_sites, linear_weight
    from tap_runtime.planes import dequantize_planes
    from tap_runtime.rotation import rotate_mean_square, rotate_second_moment, rotate_weight, rotation_block

    levels = None
    if args.tap:
        table = RoutingTable.from_json(f"{args.tap}/{ROUTING_FILE}")
        levels = next((p.planes[0].levels for p in table.linear.values() if p.planes[0].levels), None)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    spec = get_architecture(config.model_type)
    layers = {int(i) for i in args.layers.split(",")}
    sites = [s for s in iter_linear_sites(model, spec) if s.layer_index in layers and s.name.endswith(args.suffix)]
    if not sites:
        raise SystemExit(f"no linear of layers {args.layers} ends with {args.suffix!r}")
    hessian_sets = {}
    for measure, (calib, part) in zip(MEASURES, ((args.calib, 0), (args.calib, 1), (args.other, 0))):
        windows = _windows(args, tokenizer, spec, calib, args.windows, part, 2 if calib == args.calib else 1)
        moments = collect_layer_moments(model, spec, sites, windows, 4, progress=False, first_position=lambda s: False)
        hessian_sets[measure] = {site.name: (moment.hessian, moment.mean_square) for site, moment in moments}
        print(f"  {measure}: {windows.shape[0]} {calib} windows, {time.perf_counter() - started:.0f}s", flush=True)
    print(f"# bench_wide_gptq: {args.model}, {len(sites)} linears ({args.suffix}) of layers {args.layers}; fit on "
          f"{args.windows} {args.calib} windows ({args.windows * args.seq_len} tokens), held out {args.windows} "
          f"{args.calib} windows, other text {args.windows} {args.other} windows; levels "
          f"{'from ' + args.tap if levels else 'even'}")
    print(f"# {environment()}")

    settings = ["rtn"] + [float(d) for d in args.dampings.split(",")]
    totals = {(s, tier, m): 0.0 for s in settings for tier in (4, 8) for m in MEASURES}
    for site in sites:
        rotation = rotation_block(site.in_features)
        weight = rotate_weight(linear_weight(site), rotation)
        hessian, mean_square = hessian_sets[MEASURES[0]][site.name]
        hessian = rotate_second_moment(hessian, rotation)
        under = {m: rotate_second_moment(hessian_sets[m][site.name][0], rotation) for m in MEASURES}
        specs = _plane_specs((4, 8), choose_group_size(site.in_features, args.group_size), base_levels=levels)
        for setting in settings:
            if setting == "rtn":
                planes = quantize_tiers(weight, specs, importance=rotate_mean_square(mean_square, rotation))
            else:
                planes = gptq_tiers(weight, specs, hessian, damping=setting)
            for count, tier in enumerate((4, 8), start=1):
                approximation = dequantize_planes(planes, count)
                for measure in MEASURES:
                    totals[setting, tier, measure] += relative_output_error(weight, approximation, under[measure])
        print(f"  {site.name} done, {time.perf_counter() - started:.0f}s", flush=True)
    print_tier_error_table("setting", settings, totals, lambda s: s if s == "rtn" else f"d={s:g}")
    print(f"# {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
