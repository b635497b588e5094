"""Fit the base plane's table of 16 non-uniform levels (PlaneSpec.levels) to a model's weights.

Evenly spaced codes suit evenly spread values; rotated weights are bell-shaped within a group,
so even spacing spends codes on the tails. Lloyd's algorithm places 16 levels where the
group-normalised weights (w / scale + zero at the unclipped range, in code steps) are dense,
minimising their squared rounding error; the table is then rounded to the stored eighths.
On gemma-3-270m this took 10-16% off the mean KL at the base tier and at 4.6 bits against the
even grid, with the same GPTQ and clip search (scripts/bench_lut_grid.py, README "Non-uniform
4-bit levels"). Only weights are read: no calibration text is involved.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from tap_runtime.format import LEVEL_STEPS_PER_CODE, PlaneSpec

from .quantize import _candidate, scale_reference_for

__all__ = ["LEVEL_CHOICES", "normalised_values", "lloyd_levels", "stored_levels", "fit_levels"]

# --base-levels: "fitted" (a table per model, from its weights) or "even" (codes 0..15, format 6's planes).
LEVEL_CHOICES = ("fitted", "even")
_SAMPLES = 400_000
_ITERATIONS = 40


def normalised_values(weight: torch.Tensor, spec: PlaneSpec, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random weights of (out, in) ``weight`` in code steps of their group's unclipped
    asymmetric range, clamped to [0, 15]: what the levels must cover."""
    weight = weight.detach().to(torch.float32)
    groups = weight.reshape(weight.shape[0], -1, spec.group_size)
    scales, zeros = _candidate(groups, 1.0, spec, scale_reference_for(weight, spec))
    values = (groups / scales + zeros).clamp(0, 2**spec.bits - 1).reshape(-1)
    if values.numel() > count:
        values = values[torch.randint(values.numel(), (count,), generator=generator)]
    return values


def lloyd_levels(values: torch.Tensor, count: int = 16, iterations: int = _ITERATIONS) -> torch.Tensor:
    """(count,) float32 levels minimising the squared distance of ``values`` to the nearest
    level, from the even grid 0..count-1 (a level no value is nearest stays where it is)."""
    levels = torch.arange(count, dtype=torch.float32)
    values = values.to(torch.float32)
    for _ in range(iterations):
        nearest = torch.bucketize(values, (levels[1:] + levels[:-1]) / 2)
        sums = torch.zeros(count).index_add_(0, nearest, values)
        members = torch.bincount(nearest, minlength=count).to(torch.float32)
        levels = torch.where(members > 0, sums / members.clamp_min(1), levels)
    return levels


def stored_levels(levels: torch.Tensor, bits: int = 4) -> tuple[int, ...]:
    """Float levels (code steps) -> the stored table: eighths, clamped to [0, 15 x 8] and made
    strictly increasing (a level that rounds onto its neighbour moves one eighth up, or the
    neighbours down at the top)."""
    top = (2**bits - 1) * LEVEL_STEPS_PER_CODE
    steps = [int(v) for v in torch.round(levels * LEVEL_STEPS_PER_CODE).clamp(0, top).tolist()]
    for i in range(1, len(steps)):
        steps[i] = max(steps[i], steps[i - 1] + 1)
    for i in range(len(steps) - 1, -1, -1):
        steps[i] = min(steps[i], top - (len(steps) - 1 - i))
        if i + 1 < len(steps):
            steps[i] = min(steps[i], steps[i + 1] - 1)
    return tuple(steps)


def fit_levels(
    weights: Iterable[tuple[torch.Tensor, int]], weight_count: int, bits: int = 4, samples: int = _SAMPLES, seed: int = 0
) -> tuple[int, ...]:
    """The stored level table for a model: Lloyd on samples of every (rotated weight, group
    size) pair given (``weight_count`` of them, read one at a time so no two need be in memory
    at once), the same number from each so large layers do not drown small ones."""
    if weight_count < 1:
        raise ValueError("fit_levels needs at least one weight")
    generator = torch.Generator().manual_seed(seed)
    per_weight = max(samples // weight_count, 1)
    values = torch.cat([
        normalised_values(weight, PlaneSpec(bits, group_size, False), per_weight, generator) for weight, group_size in weights
    ])
    return stored_levels(lloyd_levels(values, 2**bits), bits)
