"""Per-matmul timings of the CPU kernel paths: TAP's native kernels (VNNI or AVX2 build) against
torch's, and the dense-unpack crossover for many-token calls.

For real layer shapes (SmolLM2, gemma-3-270m, Qwen2.5-1.5B) and token counts from decode (1) to
prefill (512): torch's packed int4 kernel, TAP's VNNI kernel, the unpack-to-bfloat16 + dense
GEMM path (bfloat16 where the CPU multiplies it natively, else float32), the 8-row lane kernel
with 15-bit activations (matmul_w4_lanes; many-token calls on AVX2) and a float32 matmul, with
each path's error against the reference kernel. Then the
8-bit output head at one token: torch's int8 op against TAP's. Weight GB/s is plane bytes over
time at one token. Then the routed rows of a many-token call (a residual plane times a prefill's
routed tokens): the lane kernel (8-bit activations, the default; 16 rows per register on VNNI,
8 on AVX2) against unpacking + GEMM and the one-token kernel. Every path alternates in the same process; medians of
--repeats.

    python scripts/bench_kernels.py --threads 2
    python scripts/bench_kernels.py --sections routed --routed-tokens 8,16,51,128,512
"""

from __future__ import annotations

import argparse

import torch

from bench_common import environment, median_ms
from tap_convert.quantize import quantize_rows, quantize_tiers
from tap_runtime.format import PlaneSpec
from tap_runtime.kernels import CpuPackedKernel, CpuVnniKernel, ReferenceKernel
from tap_runtime.kernels.native import native_kernels, native_unavailable_reason

SHAPES = {
    "smollm2 gate+up": (3072, 576),
    "smollm2 down": (576, 1536),
    "gemma gate+up": (4096, 640),
    "qwen1.5b gate+up": (17920, 1536),
    "qwen1.5b down": (1536, 8960),
    "qwen1.5b qkv": (2048, 1536),
}
HEADS = {"smollm2 head": (49152, 576), "gemma head": (262144, 640), "qwen1.5b head": (151936, 1536)}


def _error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected).norm() / expected.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokens", default="1,4,16,32,64,128,512")
    parser.add_argument("--routed-tokens", default="8,16,51,128,512", help="row counts for the routed-rows section")
    parser.add_argument("--sections", default="planes,heads,routed")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    torch.set_num_threads(args.threads)
    if native_kernels() is None:
        raise SystemExit(f"TAP's native kernels are unavailable here: {native_unavailable_reason()}")
    torch_int4, reference = CpuPackedKernel(dense_min_tokens=None), ReferenceKernel()
    vnni, dense = CpuVnniKernel(dense_min_tokens=None), CpuVnniKernel(dense_min_tokens=1, wide_lanes=False)
    print(f"# bench_kernels; {environment()}; native build {vnni.instruction_set} ({vnni.name}), dense type "
          f"{str(dense.dense_dtype).removeprefix('torch.')}; ms per matmul, median of {args.repeats}; 4-bit g64 asymmetric planes")
    if "planes" in sections:
        _planes(args, torch_int4, reference, vnni, dense)
    if "heads" in sections:
        _heads(args, torch_int4, reference, vnni)
    if "routed" in sections:
        _routed(args, reference, vnni)


def _planes(args, torch_int4, reference, vnni, dense) -> None:
    lanes = CpuVnniKernel(dense_min_tokens=1, wide_lanes=True)
    lanes.lane_min_tokens = 1  # every call through the 15-bit lanes, whatever the build's threshold
    print(f"{'shape':17s} {'tokens':>6s} {'torch int4':>10s} {'TAP vnni':>9s} {'dense':>10s} {'lanes15':>8s} {'fp32':>8s} "
          f"{'vnni x torch':>12s} {'GB/s torch':>10s} {'GB/s vnni':>9s} {'err torch':>9s} {'err vnni':>9s} {'err dense':>9s} {'err lanes':>9s}")
    for label, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) * 0.05
        (plane,) = quantize_tiers(weight, (PlaneSpec(4, 64, False),))
        packed, tiled, expected_weight = torch_int4.prepare_plane(plane), vnni.prepare_plane(plane), reference.prepare_plane(plane)
        plane_gb = out_features * in_features / 2 / 1e9
        for tokens in map(int, args.tokens.split(",")):
            x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(1))
            expected = reference.matmul_plane(x, expected_weight)
            times = {
                "torch": median_ms(lambda: torch_int4.matmul_plane(x, packed), args.repeats),
                "vnni": median_ms(lambda: vnni.matmul_plane(x, tiled), args.repeats),
                "dense": median_ms(lambda: dense.matmul_plane(x, tiled), args.repeats),
                "lanes": median_ms(lambda: lanes.matmul_plane(x, tiled), args.repeats),
                "fp32": median_ms(lambda: x @ weight.t(), args.repeats),
            }
            bandwidth = (f"{plane_gb / times['torch'] * 1e3:10.1f} {plane_gb / times['vnni'] * 1e3:9.1f}" if tokens == 1 else f"{'':10s} {'':9s}")
            print(f"{label:17s} {tokens:6d} {times['torch']:10.3f} {times['vnni']:9.3f} {times['dense']:10.3f} {times['lanes']:8.3f} {times['fp32']:8.3f} "
                  f"{times['torch'] / times['vnni']:12.2f} {bandwidth} {_error(torch_int4.matmul_plane(x, packed), expected):9.1e} "
                  f"{_error(vnni.matmul_plane(x, tiled), expected):9.1e} {_error(dense.matmul_plane(x, tiled), expected):9.1e} "
                  f"{_error(lanes.matmul_plane(x, tiled), expected):9.1e}")


def _heads(args, torch_int4, reference, vnni) -> None:
    print(f"\n{'head (int8 rows)':17s} {'tokens':>6s} {'torch int8':>10s} {'TAP vnni':>9s} {'vnni x torch':>12s} {'GB/s torch':>10s} {'GB/s vnni':>9s} {'err torch':>9s} {'err vnni':>9s}")
    for label, (rows_count, in_features) in HEADS.items():
        rows = quantize_rows(torch.randn(rows_count, in_features, generator=torch.Generator().manual_seed(2)))
        packed, tiled = torch_int4.prepare_rows(rows), vnni.prepare_rows(rows)
        x = torch.randn(1, in_features, generator=torch.Generator().manual_seed(3))
        expected = reference.matmul_rows(x, reference.prepare_rows(rows))
        t_torch = median_ms(lambda: torch_int4.matmul_rows(x, packed), max(3, args.repeats // 4))
        t_vnni = median_ms(lambda: vnni.matmul_rows(x, tiled), max(3, args.repeats // 4))
        gb = rows_count * in_features / 1e9
        print(f"{label:17s} {1:6d} {t_torch:10.3f} {t_vnni:9.3f} {t_torch / t_vnni:12.2f} {gb / t_torch * 1e3:10.1f} {gb / t_vnni * 1e3:9.1f} "
              f"{_error(torch_int4.matmul_rows(x, packed), expected):9.1e} {_error(vnni.matmul_rows(x, tiled), expected):9.1e}")


def _routed(args, reference, vnni) -> None:
    """A residual plane times the routed rows of a many-token call, three ways."""
    lanes, unpack = CpuVnniKernel(), CpuVnniKernel(lane_residuals=False, wide_lanes=False, dense_min_tokens=1)
    print(f"\n{'routed rows':17s} {'rows':>6s} {'lanes ms':>9s} {'unpack+GEMM':>11s} {'1-token':>8s} {'lanes x unpack':>14s} "
          f"{'GMAC/s lanes':>12s} {'GMAC/s unpack':>13s} {'err lanes':>9s} {'err unpack':>10s}")
    for label, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) * 0.05
        (plane,) = quantize_tiers(weight, (PlaneSpec(4, 64, False),))
        tiled, expected_weight = vnni.prepare_plane(plane), reference.prepare_plane(plane)
        for rows in map(int, args.routed_tokens.split(",")):
            x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1))
            expected = reference.matmul_plane(x, expected_weight)
            call_tokens = max(rows, 512)  # the rows are a subset of a prefill
            times = {
                "lanes": median_ms(lambda: lanes.matmul_routed(x, tiled, call_tokens), args.repeats),
                "unpack": median_ms(lambda: unpack.matmul_routed(x, tiled, call_tokens), args.repeats),
                "one": median_ms(lambda: vnni.native.matmul_w4(x, tiled.weight, tiled.scales, tiled.zeros, 64, 0.0, 0, out_features),
                                  max(3, args.repeats // 4)),
            }
            macs = rows * out_features * in_features / 1e9
            print(f"{label:17s} {rows:6d} {times['lanes']:9.3f} {times['unpack']:11.3f} {times['one']:8.3f} "
                  f"{times['unpack'] / times['lanes']:14.2f} {macs / times['lanes'] * 1e3:12.0f} {macs / times['unpack'] * 1e3:13.0f} "
                  f"{_error(lanes.matmul_routed(x, tiled, call_tokens), expected):9.1e} {_error(unpack.matmul_routed(x, tiled, call_tokens), expected):10.1e}")


if __name__ == "__main__":
    main()
