"""Per-linear error of the native kernels' 8- and 15-bit activations, on a real window's inputs.

The native kernels quantize activations per block of 64 (scale = peak / 127 or / 16383) and
multiply the integer codes by the 4-bit plane codes c; an asymmetric plane's zero point z enters
as a per-block term s * z * (sum of the block's activations). If that sum is the exact float
sum, the activations' rounding errors are multiplied by c instead of c - z (codes around 7.5
instead of around 0). The kernels now take the quantized activations' sum, so a product is the
dequantized plane times the quantized activations. This script runs one held-out window through
the checkpoint (default routing), keeps the first many-token input of every --every-th linear,
and prints each base product's error relative to the dequantized plane times the float32 input:
the native 15-bit lanes, the native 8-bit lanes, and the exact-sum arithmetic the kernels used
before (reconstructed from the 8-bit lanes' output, since the two differ by exactly
s * z * (exact sum - quantized sum) per block).

    python scripts/bench_activation_error.py --tap models/smollm2-tap
"""

from __future__ import annotations

import argparse
import statistics

import torch

import tap_runtime
from bench_common import environment, eval_windows, heldout_text, set_threads
from tap_runtime.kernels.vnni import BLOCK, CpuVnniKernel, block_quantized_activations, untile_group_params
from tap_runtime.layers import TapLinear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tap", required=True)
    parser.add_argument("--every", type=int, default=15, help="keep every n-th linear's input")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    tap = tap_runtime.load(args.tap)
    kernel = tap.kernel
    if not isinstance(kernel, CpuVnniKernel):
        raise SystemExit(f"{args.tap} loaded on {type(kernel).__name__}: this script measures TAP's native CPU kernels")
    current, kept = [""], {}  # the linear now running; its first many-token input
    for name, module in tap.model.named_modules():
        if isinstance(module, TapLinear):
            module.register_forward_pre_hook(lambda m, _, n=name: current.__setitem__(0, n))
    base_product = kernel.matmul_base

    def keeping(x, prepared, alone):
        if kernel._many(x.shape[0]) and current[0] not in kept:
            kept[current[0]] = (x.clone(), prepared)
        return base_product(x, prepared, alone)

    kernel.matmul_base = keeping
    bos = tap.tokenizer.bos_token_id if tap.table.calibration.extra.get("bos_prepended") else None
    window = eval_windows(tap.tokenizer, heldout_text("wikitext"), 512, 1, bos)
    with torch.inference_mode():
        tap.model(window)
    del kernel.matmul_base
    print(f"# bench_activation_error: {args.tap}; one held-out WikiText window of 512 tokens; {environment()}; kernel {kernel.name}")
    print("| linear | 15-bit lanes | 8-bit lanes | 8-bit, exact-sum zero-point term (before) | before / now |")
    print("|---|---|---|---|---|")
    ratios = []
    with torch.inference_mode():
        for name in list(kept)[:: args.every]:
            x, p = kept[name]
            dense = kernel.dequantize_plane(p).to(torch.float64)  # (out, in)
            reference = x.double() @ dense.t()
            call = (x, p.weight, p.scales, p.zeros, p.group_size, p.first_row, p.out_features)
            wide = kernel.native.matmul_w4_lanes(*call, True).double()
            narrow = kernel.native.matmul_w4_many(*call).double()
            # s * z per row and group, from the kernel's own (tiled) parameters
            scales = _untiled(p.scales, p.group_size, p.out_features, p.first_row)
            zeros = _untiled(p.zeros, p.group_size, p.out_features, p.first_row)
            per_block = (scales * zeros).repeat_interleave(p.group_size // BLOCK, dim=1)  # (rows, blocks)
            shift = (x.double() - block_quantized_activations(x, 127).double()).reshape(x.shape[0], -1, BLOCK).sum(-1) @ per_block.t()
            before = narrow - shift  # the exact sum subtracted s * z * sum(x) instead of s * z * sum(x_q)

            def relative(product):
                return float((product - reference).norm() / reference.norm())

            ratios.append(relative(before) / relative(narrow))
            print(f"| {name} | {relative(wide):.2e} | {relative(narrow):.2e} | {relative(before):.2e} | {ratios[-1]:.2f} |")
    print(f"\nbefore / now, 8-bit: median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}")


def _untiled(params: torch.Tensor, group_size: int, rows: int, first_row: int) -> torch.Tensor:
    """A plane's (rows, groups) scales or zeros in row order, from the kernel's tiled layout."""
    return untile_group_params(params, group_size)[first_row : first_row + rows].double()


if __name__ == "__main__":
    main()
