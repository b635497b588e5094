"""Command line: ``tap-convert MODEL --calib wikitext --out DIR``. Parsing only; no logic here."""

from __future__ import annotations

import argparse
import logging
import sys

from tap_runtime.errors import TapError
from tap_runtime.format import ROUTER_TARGETS
from tap_runtime.rotation import ROTATIONS

from .convert import SCALE_BITS_CHOICES, ConvertOptions, convert
from .gptq import GPTQ_ORDERS
from .levels import LEVEL_CHOICES
from .push import push_to_hub
from .writer import DEFAULT_MAX_SHARD_BYTES

__all__ = ["build_parser", "main"]


def _tiers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tiers expects comma-separated integers such as 4,8; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    defaults = ConvertOptions()
    parser = argparse.ArgumentParser(
        prog="tap-convert",
        description="Convert a causal LM into a Token-Adaptive Precision checkpoint.",
    )
    parser.add_argument("model", help="local model directory or Hub repo id")
    parser.add_argument("--out", required=True, help="output checkpoint directory (created atomically)")
    parser.add_argument("--calib", default=defaults.calib, help="wikitext, c4, a .txt/.jsonl/.parquet/dataset path, or several joined by + (equal parts, e.g. wikitext+c4)")
    parser.add_argument("--tiers", type=_tiers, default=defaults.tiers, help="4,8 (default) or 4,8,16")
    parser.add_argument("--group-size", type=int, default=defaults.group_size)
    parser.add_argument("--method", choices=["gptq", "rtn"], default=defaults.method,
                        help="gptq: Hessian error compensation (default); rtn: round to nearest with clip search")
    parser.add_argument("--num-samples", type=int, default=defaults.num_samples)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--high-precision-share", type=float, default=defaults.high_precision_share)
    parser.add_argument("--target-bits", type=float, default=None,
                        help="promote the most sensitive layers to a higher tier for every token until the expected "
                             "average weight bits read per token reach this (default: no promotion)")
    parser.add_argument("--router-samples", type=int, default=defaults.router_samples)
    parser.add_argument("--scheme", choices=["auto", "asymmetric", "symmetric"], default=defaults.scheme,
                        help="base-plane scheme: auto (lowest measured error per layer, default) or one for all")
    parser.add_argument("--no-sink-weighting", action="store_true",
                        help="do not weight the first token up in the key/value projections' Hessians (ablation)")
    parser.add_argument("--no-column-scales", action="store_true",
                        help="plain per-row int8 embedding/head rows, without per-column scales (ablation)")
    parser.add_argument("--gptq-order", choices=list(GPTQ_ORDERS), default=defaults.gptq_order,
                        help="GPTQ's column order: activation (strongest input channels first, default) or column")
    parser.add_argument("--gptq-damping", type=float, default=defaults.gptq_damping,
                        help="GPTQ's damping of the planes' Hessians, a fraction of their mean diagonal "
                        f"(default {defaults.gptq_damping})")
    parser.add_argument("--gptq-refit-rounds", type=int, default=defaults.gptq_refit_rounds,
                        help="rounds of refitting group scales and zeros to GPTQ's codes, each followed by "
                        f"another GPTQ pass (default {defaults.gptq_refit_rounds})")
    parser.add_argument("--gptq-descent-sweeps", type=int, default=defaults.gptq_descent_sweeps,
                        help="sweeps of coordinate descent over the planes' codes after GPTQ, against the "
                        f"same output error (default {defaults.gptq_descent_sweeps})")
    parser.add_argument("--head-damping", type=float, default=defaults.head_damping,
                        help="the same for the output head's 8-bit rows, which a tied embedding shares "
                        f"(default {defaults.head_damping})")
    parser.add_argument("--gptq-wide-layers", action=argparse.BooleanOptionalAction, default=defaults.gptq_wide_layers,
                        help="GPTQ also for linears wider than 4,096 inputs, their Hessians gathered one decoder layer "
                        "at a time (default; --no-gptq-wide-layers: round to nearest there, which is faster: Qwen2.5-1.5B "
                        "converted in 48 min instead of 61 here, README)")
    parser.add_argument("--gptq-wide-damping", type=float, default=defaults.gptq_wide_damping,
                        help=f"GPTQ's damping for those wide linears (default {defaults.gptq_wide_damping}: with few "
                        "calibration tokens per input, a light damping fits the calibration text, README)")
    parser.add_argument("--rotation", choices=list(ROTATIONS), default=defaults.rotation,
                        help="hadamard (default): quantize each linear's weight times a block Hadamard rotation of its "
                        "input, which spreads outlier weights over their group; none: the weight itself (ablation)")
    parser.add_argument("--scale-bits", type=int, choices=list(SCALE_BITS_CHOICES), default=defaults.scale_bits,
                        help="group scales as 8-bit log codes (default) or float16, as format 2 stored them")
    parser.add_argument("--base-levels", choices=list(LEVEL_CHOICES), default=defaults.base_levels,
                        help="fitted (default): the asymmetric base plane's 16 codes stand for a table of non-uniform "
                        "levels fitted to the model's rotated weights (format 7); even: codes 0..15 (format 6's planes), "
                        "faster prefill on AVX2-only CPUs")
    parser.add_argument("--router-target", choices=list(ROUTER_TARGETS), default=defaults.router_target,
                        help="what the router learns to predict: kl_impact (default: the first-order change of the KL to "
                        "float32 when a layer runs on the base tier for a token, measured at the base-tier model, with a "
                        "per-layer sensitivity probe on the normed input as a router signal), layer_error (the layer "
                        "output's base-tier error) or loss_impact (its first-order next-token loss change at float32)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", default=None,
                        help="after writing --out, upload it to this Hub repo (created if needed; token from HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="create the --push-to-hub repo private")
    parser.add_argument("--measure-quality", action="store_true",
                        help="measure the checkpoint against the source on the other bundled corpus and put it in the "
                             "model card (done automatically before --push-to-hub)")
    parser.add_argument("--base-model", default=None, metavar="ORG/NAME",
                        help="Hub id of the source model for the card's base_model (when MODEL is a local copy)")
    return parser


def build_inspect_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tap-convert inspect", description="Describe and verify a TAP checkpoint.")
    parser.add_argument("directory", help="a checkpoint directory written by tap-convert")
    parser.add_argument("--plot", default=None, metavar="OUT.png", help="draw the precision map (needs matplotlib)")
    parser.add_argument("--text", default=None, help="sample text file for the token shares (default: bundled C4 sample)")
    return parser


def inspect_main(argv: list[str]) -> int:
    from .inspect import inspect_checkpoint, plot_precision_map

    args = build_inspect_parser().parse_args(argv)
    try:
        report, ok = inspect_checkpoint(args.directory)
        print(report)
        if args.plot:
            if args.text:
                text = open(args.text, encoding="utf-8").read()
            else:
                from calibration.data import load_calibration_text

                text = "\n\n".join(load_calibration_text("c4").documents[:20])
            plot_precision_map(args.directory, args.plot, text)
            print(f"precision map written to {args.plot}")
    except (TapError, OSError) as exc:
        print(f"tap-convert inspect: error: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        print(f"tap-convert inspect: --plot needs matplotlib ({exc}); pip install matplotlib", file=sys.stderr)
        return 1
    return 0 if ok else 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "inspect":
        return inspect_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options = ConvertOptions(
        calib=args.calib,
        tiers=args.tiers,
        group_size=args.group_size,
        method=args.method,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        high_precision_share=args.high_precision_share,
        target_bits=args.target_bits,
        router_samples=args.router_samples,
        router_target=args.router_target,
        scheme=args.scheme,
        sink_weighting=not args.no_sink_weighting,
        column_scales=not args.no_column_scales,
        gptq_order=args.gptq_order,
        gptq_damping=args.gptq_damping,
        gptq_refit_rounds=args.gptq_refit_rounds,
        gptq_descent_sweeps=args.gptq_descent_sweeps,
        gptq_wide_layers=args.gptq_wide_layers,
        gptq_wide_damping=args.gptq_wide_damping,
        head_damping=args.head_damping,
        rotation=args.rotation,
        scale_bits=args.scale_bits,
        base_levels=args.base_levels,
        base_model=args.base_model,
        batch_size=args.batch_size,
        max_shard_bytes=args.max_shard_bytes,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    try:
        table = convert(args.model, args.out, options)
    except (TapError, OSError) as exc:
        print(f"tap-convert: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tap-convert: interrupted; no checkpoint was written", file=sys.stderr)
        return 130
    total = sum(s.num_bytes for s in table.shards)
    print(f"wrote {args.out}: {total:,} bytes, tiers {list(table.tiers)}, {len(table.linear)} quantized linears")
    if args.measure_quality or args.push_to_hub:
        from .hub import write_measured_quality
        from .measure import measure_quality, quality_table_rows

        print("measuring quality against the source model for the model card...")
        rows, text = measure_quality(args.model, args.out)
        command = "tap-convert " + " ".join(argv if argv is not None else sys.argv[1:])
        write_measured_quality(args.out, quality_table_rows(rows), command, "measured at conversion", text)
        for label, row in rows.items():
            print(f"  {label}: ppl ratio {row['ppl_ratio']:.4f}, KL {row['kl']:.4f}, {row['avg_bits']:.2f} bits")
    if args.push_to_hub:
        try:
            url = push_to_hub(args.out, args.push_to_hub, private=args.private)
        except TapError as exc:
            print(f"tap-convert: error: {exc}", file=sys.stderr)
            return 1
        print(f"pushed {args.out} to {args.push_to_hub}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
