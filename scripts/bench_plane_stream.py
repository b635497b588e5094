"""How fast TAP's one-token plane kernel streams weights from memory, against from cache.

bench_kernels.py repeats one plane, which stays in the L3 cache; in decode the planes come from
DRAM. This script times one-token products over a ring of random planes larger than the cache
(default 10 of Qwen2.5-1.5B's gate+up shape, 138 MB), and over one plane repeated, with 15-bit and
8-bit activations, in one process. The gap between the two rates is what the memory side costs.
The ring is also timed copied onto 4 KiB pages and onto transparent huge pages (2 MiB,
tap_runtime.pages.huge_page_copy), alternating the two --sweeps times, since the runtime keeps
its planes on huge pages. For scale, the last line is a plain read of 2 GB by torch's int64 sum
on the same threads: about what this machine's memory gives two cores.

    python scripts/bench_plane_stream.py [--rows 17920 --inputs 1536 --planes 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_common import environment, set_threads
from tap_runtime.kernels.vnni import ALL_NARROW, ALL_WIDE, CpuVnniKernel, tile_group_params, tile_plane_codes
from tap_runtime.pages import huge_page_copy, set_huge_pages


def _random_plane(kernel: CpuVnniKernel, rows: int, inputs: int, generator: torch.Generator):
    codes = torch.randint(0, 16, (rows, inputs), dtype=torch.uint8, generator=generator)
    scales = (torch.rand(rows, inputs // 64, generator=generator) * 0.01).half()
    zeros = torch.full((rows, inputs // 64), 8.0).half()
    return tile_plane_codes(codes, kernel.tile), tile_group_params(scales, kernel.tile, 64), tile_group_params(zeros, kernel.tile, 64)


def _sweep_rate(kernel, planes, x, rows, wide_above) -> float:
    """GB/s of weight bytes over one pass through ``planes``."""
    start = time.perf_counter()
    for weight, scales, zeros in planes:
        kernel.native.matmul_w4(x, weight, scales, zeros, 64, wide_above, 0, rows)
    return len(planes) * rows * x.shape[1] / 2 / (time.perf_counter() - start) / 1e9


def _rate(kernel, planes, x, rows, wide_above, sweeps: int) -> float:
    """Median GB/s of weight bytes over ``sweeps`` passes through ``planes`` (after a warm-up)."""
    _sweep_rate(kernel, planes, x, rows, wide_above)
    return statistics.median(_sweep_rate(kernel, planes, x, rows, wide_above) for _ in range(sweeps))


def _plain_read_rate(sweeps: int) -> float:
    """Median GB/s of torch's int64 sum over 2 GB (a read-only stream, no kernel arithmetic)."""
    data = torch.ones(2_000_000_000 // 8, dtype=torch.int64)
    data.sum()
    rates = []
    for _ in range(sweeps):
        start = time.perf_counter()
        data.sum()
        rates.append(2.0 / (time.perf_counter() - start))
    return statistics.median(rates)


def _copied(ring: list, huge: bool) -> list:
    """The ring copied into fresh memory, on huge pages or not (fresh either way, so the two
    differ only in page size)."""
    set_huge_pages(huge)
    try:
        return [tuple(huge_page_copy(t) if huge else t.clone() for t in plane) for plane in ring]
    finally:
        set_huge_pages(True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=17920)
    parser.add_argument("--inputs", type=int, default=1536)
    parser.add_argument("--planes", type=int, default=10)
    parser.add_argument("--sweeps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    kernel = CpuVnniKernel()
    generator = torch.Generator().manual_seed(0)
    ring = [_random_plane(kernel, args.rows, args.inputs, generator) for _ in range(args.planes)]
    x = torch.randn(1, args.inputs, generator=generator)
    megabytes = args.planes * args.rows * args.inputs / 2 / 1e6
    print(f"# bench_plane_stream: {args.planes} planes of {args.rows} x {args.inputs} 4-bit weights ({megabytes:.0f} MB); {environment()}")
    print("| activations | from memory (ring) GB/s | from cache (one plane repeated) GB/s |")
    print("|---|---|---|")
    for label, wide_above in (("15 bits", ALL_WIDE), ("8 bits", ALL_NARROW)):
        streamed = _rate(kernel, ring, x, args.rows, wide_above, args.sweeps)
        cached = _rate(kernel, ring[:1] * args.planes, x, args.rows, wide_above, args.sweeps)
        print(f"| {label} | {streamed:.1f} | {cached:.1f} |")
    small, huge = _copied(ring, False), _copied(ring, True)
    del ring
    rates = {"4 KiB pages": [], "2 MiB pages": []}
    for _ in range(args.sweeps * 3):
        rates["4 KiB pages"].append(_sweep_rate(kernel, small, x, args.rows, ALL_WIDE))
        rates["2 MiB pages"].append(_sweep_rate(kernel, huge, x, args.rows, ALL_WIDE))
    wins = sum(b > a for a, b in zip(rates["4 KiB pages"], rates["2 MiB pages"]))
    print(f"\nFrom memory, 15 bits, {args.sweeps * 3} alternated sweeps: "
          + ", ".join(f"{label} median {statistics.median(r):.1f} GB/s" for label, r in rates.items())
          + f"; 2 MiB pages faster in {wins}/{args.sweeps * 3}")
    del small, huge
    print(f"Plain read (torch int64 sum over 2 GB): median {_plain_read_rate(args.sweeps):.1f} GB/s")


if __name__ == "__main__":
    main()
