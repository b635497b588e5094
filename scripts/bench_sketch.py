"""How good and how cheap format 4's derived error sketches are, layer by layer.

For every decoder layer of a TAP checkpoint: the residual planes its sketch is made of (the
table's router.error_sketch_sites, or q/k/v's for checkpoints that stored sketches), the time
``residual_error_sketch`` takes on them, and the share of the exact top-rank energy of sum R^T R
it keeps (exact: a float64 eigendecomposition). Also the time at a wider layer of random planes
(--width, e.g. 1536 for Qwen2.5-1.5B). Reads only the checkpoint's own files.

    python scripts/bench_sketch.py --tap models/smollm2-tap-v4 --width 1536
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench_common import environment, set_threads
from tap_runtime.checkpoint import read_checkpoint
from tap_runtime.format import plane_tensor_name
from tap_runtime.planes import Plane, dequantize_plane
from tap_runtime.residency import shard_of_every_tensor
from tap_runtime.sketch import SKETCH_RANK, residual_error_sketch


def _sites(table) -> list[list[str]]:
    if table.router.error_sketch_sites:
        return [list(row) for row in table.router.error_sketch_sites]
    rows: list[list[str]] = [[] for _ in range(table.num_layers)]
    for name, policy in table.linear.items():
        if policy.layer_index is not None and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "c_attn"):
            rows[policy.layer_index].append(name)
    return rows


def _timed(residuals, hidden, repeats=5) -> tuple[torch.Tensor, float]:
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        sketch = residual_error_sketch(residuals, hidden)
        times.append(time.perf_counter() - tick)
    return sketch, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tap", required=True, help="a TAP checkpoint directory")
    parser.add_argument("--width", type=int, default=None, help="also time a random layer of this width (q + k/6 + v/6 rows)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    checkpoint = read_checkpoint(args.tap, verify=False)
    table = checkpoint.table
    located = shard_of_every_tensor(Path(args.tap), [shard.file_name for shard in table.shards])
    from safetensors import safe_open

    handles = {}
    print(f"# bench_sketch: {args.tap} (format {table.format_version}), rank {SKETCH_RANK}")
    print(f"# {environment()}")
    print(f"{'layer':>5s} {'linears':>7s} {'ms':>7s} {'energy kept':>12s}")
    kept_shares, times = [], []
    for layer_index, names in enumerate(_sites(table)):
        residuals = []
        for name in names:
            policy = table.linear[name]
            index = policy.always_planes
            if index >= len(policy.planes):
                continue
            spec = policy.planes[index]
            stored = {}
            for field in spec.fields:
                tensor_name = plane_tensor_name(name, index, field)
                shard = located[tensor_name]
                handle = handles.setdefault(shard, safe_open(str(shard), framework="pt"))
                stored[field] = handle.get_tensor(tensor_name)
            residuals.append(dequantize_plane(Plane.from_stored(spec, stored)))
        if not residuals:
            continue
        hidden = residuals[0].shape[1]
        sketch, seconds = _timed(residuals, hidden)
        stacked = torch.cat(residuals).to(torch.float64)
        exact = torch.linalg.eigvalsh(stacked.t() @ stacked)[-sketch.shape[1] :].sum()
        share = float(sketch.to(torch.float64).pow(2).sum() / exact)
        kept_shares.append(share)
        times.append(seconds)
        print(f"{layer_index:5d} {len(residuals):7d} {seconds * 1e3:7.1f} {share:12.4f}", flush=True)
    print(f"layers: {len(times)}; energy kept {min(kept_shares):.4f}-{max(kept_shares):.4f}; "
          f"{statistics.median(times) * 1e3:.1f} ms per layer (median), {sum(times):.2f} s in all")
    if args.width:
        generator = torch.Generator().manual_seed(0)
        spectrum = torch.logspace(0, -2, args.width)
        residuals = [torch.randn(rows, args.width, generator=generator) * spectrum for rows in (args.width, args.width // 6, args.width // 6)]
        _, seconds = _timed(residuals, args.width)
        print(f"random layer of width {args.width}: {seconds * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
