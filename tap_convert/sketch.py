"""Low-rank sketches of each layer's base-tier error, for the router's error-estimate signal.

For the linears that read a decoder layer's input norm (q/k/v, GPT-2's c_attn), the squared
output error a token x suffers on the base tier is sum_m ||x E_m^T||^2 = x^T G x with
G = sum_m E_m^T E_m. Keeping G's top eigenpairs gives P = V_r sqrt(L_r) with ||x P||^2 ~ x^T G x,
so the router can estimate, per token and before the layer runs, how much the base tier
would cost it (DP-LLM's error estimator, in its simplest form).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tap_runtime.architectures import ArchitectureSpec
from tap_runtime.modeling import LinearSite, decoder_layers

__all__ = ["SKETCH_RANK", "error_sketches", "input_norm_sites"]

SKETCH_RANK = 32


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


def error_sketches(
    model: nn.Module,
    spec: ArchitectureSpec,
    sites: list[LinearSite],
    stats: dict[str, object],
    base_error: Callable[[LinearSite], torch.Tensor],
    rank: int = SKETCH_RANK,
) -> list[torch.Tensor]:
    """One (hidden_size, rank) float16 sketch per decoder layer; ``base_error(site)`` is W - W_base."""
    layers = decoder_layers(model, spec)
    grouped = input_norm_sites(sites, stats)
    sketches = []
    for layer_index in range(len(layers)):
        group = grouped.get(layer_index, [])
        if not group:
            hidden = model.config.get_text_config().hidden_size
            sketches.append(torch.zeros(hidden, 1, dtype=torch.float16))
            continue
        errors = [base_error(site).to(torch.float64) for site in group]
        gram = sum(error.t() @ error for error in errors)
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
        keep = min(rank, eigenvalues.numel())
        top_values = eigenvalues[-keep:].clamp_min(0)
        # float16 halves the bytes; the estimate only ranks tokens, three digits are plenty.
        sketches.append((eigenvectors[:, -keep:] * top_values.sqrt()).to(torch.float16).contiguous())
    return sketches
