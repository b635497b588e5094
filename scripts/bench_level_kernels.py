"""What the level-table lookup (PlaneSpec.levels, format 7) costs each native kernel path.

For real layer shapes, the same random plane is multiplied with and without its table through
every path a base plane takes: the one-token kernel at 1 token (decode; 15-bit activations),
the 8-bit lane kernel at 512 tokens (a prefill's base product), the 15-bit lanes (AVX2's
many-token base product when asked for), the routed rows at 51 tokens, and the dense unpack.
The two variants alternate in one process; medians of --repeats; the ratio is level / even time.
Run it under the AVX2 build too (TAP_NATIVE_MARCH, see README "The AVX2 build on the Zen 4 machine").

    python scripts/bench_level_kernels.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench_common import environment, median_ms
from bench_kernels import SHAPES as KERNEL_SHAPES
from tap_runtime.format import PlaneSpec
from tap_runtime.kernels import CpuVnniKernel
from tap_runtime.kernels.native import native_kernels, native_unavailable_reason
from tap_runtime.kernels.vnni import ALL_WIDE
from tap_runtime.packing import pack_int4
from tap_runtime.planes import Plane

SHAPES = {name: shape for name, shape in KERNEL_SHAPES.items() if name != "qwen1.5b qkv"}  # the MLP shapes
LEVELS = (2, 12, 21, 29, 36, 43, 50, 57, 63, 70, 76, 83, 91, 98, 107, 118)  # gemma-3's fitted table


def _plane(shape, levels) -> Plane:
    generator = torch.Generator().manual_seed(0)
    rows, width = shape
    spec = PlaneSpec(4, 64, False, levels=levels)
    codes = torch.randint(0, 16, shape, generator=generator, dtype=torch.uint8)
    scales = (torch.rand(rows, width // 64, generator=generator) * 0.02 + 1e-3).to(torch.float16)
    zeros = spec.round_zeros(torch.rand(rows, width // 64, generator=generator) * 8 + 4).to(torch.float16)
    return Plane(spec, pack_int4(codes), scales, zeros)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names from: " + ", ".join(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    native = native_kernels()
    if native is None:
        raise SystemExit(f"no native kernels here: {native_unavailable_reason()}")
    print(environment())
    print(f"build: {native.instruction_set()}, {args.threads} threads, medians of {args.repeats}")
    kernel = CpuVnniKernel()
    print(f"{'shape':18s} {'path':26s} {'even ms':>9s} {'levels ms':>10s} {'ratio':>6s}")
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        prepared = {key: kernel.prepare_plane(_plane(shape, levels)) for key, levels in (("even", None), ("levels", LEVELS))}
        width = shape[1]
        generator = torch.Generator().manual_seed(1)
        one, many, routed = (torch.randn(m, width, generator=generator) for m in (1, 512, 51))
        dense_out = torch.empty(shape, dtype=kernel.dense_dtype)

        def paths(p):
            args_ = (p.weight, p.scales, p.zeros, p.group_size)
            return {
                "decode (1 token, 15-bit)": lambda: native.matmul_w4(one, *args_, ALL_WIDE, 0, shape[0], p.levels),
                "prefill lanes (512, 8-bit)": lambda: native.matmul_w4_many(many, *args_, 0, shape[0], p.levels),
                "lanes 15-bit (512)": lambda: native.matmul_w4_lanes(many, *args_, 0, shape[0], True, p.levels),
                "routed rows (51, 8-bit)": lambda: native.matmul_w4_many(routed, *args_, 0, shape[0], p.levels),
                "dense unpack": lambda: native.dequantize_w4(*args_, 0, dense_out, p.levels),
            }

        even_paths, level_paths = paths(prepared["even"]), paths(prepared["levels"])
        for path in even_paths:
            even_times, level_times = [], []
            for _ in range(3):  # alternate, so drift hits both
                even_times.append(median_ms(even_paths[path], args.repeats // 3 or 1))
                level_times.append(median_ms(level_paths[path], args.repeats // 3 or 1))
            even_ms, level_ms = statistics.median(even_times), statistics.median(level_times)
            print(f"{name:18s} {path:26s} {even_ms:9.3f} {level_ms:10.3f} {level_ms / even_ms:6.2f}")


if __name__ == "__main__":
    main()
