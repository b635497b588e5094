"""How fast could the AVX2 8-bit lane kernel run on this CPU? Its inner loop alone, per core.

The lane kernel (tap_runtime/kernels/csrc/tap_cpu_int4.cpp, lanes16_tokens) spends its time in
one pattern: a broadcast of 4 activation bytes, two ``vpmaddubsw`` and two int16 adds per token
and 4 inputs. ``scripts/lane_loop_ceiling.cpp`` runs that pattern alone, with its data in L1
and nothing else, so its rate bounds what any tuning of the kernel's epilogue, unpacking or
threading could reach. This script builds it with g++ for ``--march`` (default znver3, the AVX2
build) and runs one copy per core at once, as the kernel's threads would run. Compare the total
with the kernel's own rate on real shapes: ``python scripts/bench_kernels.py --sections routed
--routed-tokens 512`` (built for AVX2 with ``TAP_NATIVE_MARCH=znver3``).

    python scripts/bench_lane_loop_ceiling.py --copies 2
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

from bench_common import environment

SOURCE = Path(__file__).with_name("lane_loop_ceiling.cpp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--march", default="znver3", help="g++ -march (znver3 or haswell: AVX2 without AVX-512)")
    parser.add_argument("--copies", type=int, default=2, help="copies run at once (one per core the kernel uses)")
    parser.add_argument("--iterations", type=int, default=20_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        binary = Path(scratch) / "lane_loop_ceiling"
        subprocess.run(["g++", "-O3", f"-march={args.march}", str(SOURCE), "-o", str(binary)], check=True)
        runs = [subprocess.Popen([str(binary), str(args.iterations)], stdout=subprocess.PIPE, text=True) for _ in range(args.copies)]
        outputs = [run.communicate()[0] for run in runs]
    if any(run.returncode for run in runs):
        raise SystemExit(f"{SOURCE.name}: a copy failed: {outputs}")
    rates = [float(re.match(r"([\d.]+) GMAC/s", out).group(1)) for out in outputs]
    print(f"# bench_lane_loop_ceiling; -march={args.march}; {environment()}")
    print("per copy, GMAC/s: " + ", ".join(f"{r:.1f}" for r in rates))
    print(f"total, {args.copies} copies at once: {sum(rates):.1f} GMAC/s")


if __name__ == "__main__":
    main()
