"""Which linears make up each layer's error sketch, and the sketches the router is fitted on.

For the linears that read a decoder layer's input norm (q/k/v, GPT-2's c_attn), the squared
output error a token x suffers on the base tier is about sum_m ||x R_m^T||^2, with R_m the plane
routing would add. :func:`tap_runtime.sketch.residual_error_sketch` turns that into a low-rank
sketch; the checkpoint (format 4) records only the sites, and the runtime derives the same
sketches from the same stored planes.
"""

from __future__ import annotations

import torch

from tap_runtime.format import LinearPolicy
from tap_runtime.modeling import LinearSite
from tap_runtime.planes import Plane
from tap_runtime.sketch import SKETCH_RANK, input_space_residual, residual_error_sketch

__all__ = ["SKETCH_RANK", "error_sketch_sites", "error_sketches", "input_norm_sites"]


def input_norm_sites(sites: list[LinearSite], stats: dict[str, object]) -> dict[int, list[LinearSite]]:
    """Per layer, the sites fed by the layer's first input: those sharing the first site's statistics."""
    grouped: dict[int, list[LinearSite]] = {}
    first: dict[int, object] = {}
    for site in sites:
        if site.layer_index not in first:
            first[site.layer_index] = stats[site.name]
        if stats[site.name] is first[site.layer_index]:
            grouped.setdefault(site.layer_index, []).append(site)
    return grouped


def error_sketch_sites(sites: list[LinearSite], stats: dict[str, object], num_layers: int) -> tuple[tuple[str, ...], ...]:
    """Per decoder layer, the names of the linears its error sketch is made of (RouterSpec.error_sketch_sites)."""
    grouped = input_norm_sites(sites, stats)
    return tuple(tuple(site.name for site in grouped.get(i, [])) for i in range(num_layers))


def error_sketches(
    sketch_sites: tuple[tuple[str, ...], ...],
    planes: dict[str, list[Plane]],
    policies: dict[str, LinearPolicy],
    hidden_size: int,
    rank: int = SKETCH_RANK,
) -> list[torch.Tensor]:
    """One float32 (hidden_size, <= rank) sketch per layer, from each site's next plane above its
    always-read ones: exactly what the runtime derives from the stored planes."""
    sketches = []
    for names in sketch_sites:
        residuals = [
            input_space_residual(planes[n][policies[n].always_planes], policies[n].input_rotation)
            for n in names
            if policies[n].always_planes < len(planes[n])
        ]
        sketches.append(residual_error_sketch(residuals, policies[names[0]].in_features if names else hidden_size, rank))
    return sketches
