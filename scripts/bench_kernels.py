"""Per-matmul timings of the CPU kernel paths, to place the int4 / dense-unpack crossover.

For real layer shapes (SmolLM2, gemma-3-270m) and token counts from decode (1) to prefill (512):
torch's packed int4 kernel, the unpack-to-bfloat16 + dense GEMM path, and a float32 matmul,
plus the error of the dense path against the reference kernel. Medians of --repeats.

    python scripts/bench_kernels.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_common import environment
from tap_convert.quantize import quantize_tiers
from tap_runtime.format import PlaneSpec
from tap_runtime.kernels import CpuPackedKernel, ReferenceKernel

SHAPES = {"smollm2 up": (1536, 576), "smollm2 down": (576, 1536), "gemma up": (2048, 640), "smollm2 k": (192, 576)}


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokens", default="1,8,32,64,128,256,512")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense, packed, reference = CpuPackedKernel(dense_min_tokens=1), CpuPackedKernel(dense_min_tokens=None), ReferenceKernel()
    print(f"# bench_kernels; {environment()}; ms per matmul, median of {args.repeats}")
    print(f"{'shape':14s} {'tokens':>6s} {'int4 ms':>8s} {'dense ms':>8s} {'fp32 ms':>8s} {'dense rel err':>13s}")
    for label, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) * 0.05
        (plane,) = quantize_tiers(weight, (PlaneSpec(4, 64, False),))
        prepared, expected_weight = dense.prepare_plane(plane), reference.prepare_plane(plane)
        for tokens in map(int, args.tokens.split(",")):
            x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(1))
            expected = reference.matmul_plane(x, expected_weight)
            error = float((dense.matmul_plane(x, prepared) - expected).norm() / expected.norm())
            print(f"{label:14s} {tokens:6d} {_median_ms(lambda: packed.matmul_plane(x, prepared), args.repeats):8.3f} "
                  f"{_median_ms(lambda: dense.matmul_plane(x, prepared), args.repeats):8.3f} "
                  f"{_median_ms(lambda: x @ weight.t(), args.repeats):8.3f} {error:13.4f}")


if __name__ == "__main__":
    main()
