"""Quantization schemes for the base plane, measured per layer and chosen automatically.

``asymmetric`` (scale + zero per group), ``symmetric`` (scale only, zero implied) and
``logarithmic`` (sign and power-of-two magnitudes: 0 and +-s*2^-k, k = 0..6, per group; suits
heavy-tailed weights). Each is fitted by round-to-nearest with the importance-weighted clip
search and scored by the relative layer-output error on the calibration inputs. Automatic
choice takes the lowest error among the schemes a packed kernel can run (asymmetric,
symmetric); the logarithmic error is measured and recorded so its merit is on file, but no
packed kernel multiplies power-of-two codes, so it is never chosen for execution.
``dynamic`` scales (computed per vector at run time) are for what only exists at run time: the
lean decode loop's int8 KV cache uses them (:mod:`tap_runtime.kv_cache`); activations stay in
the compute dtype (the packed kernels take bfloat16 activations).
"""

from __future__ import annotations

import torch

from tap_runtime.format import PlaneSpec
from tap_runtime.planes import dequantize_plane

from .policy import output_energy, relative_output_error
from .quantize import quantize_plane

__all__ = ["SCHEMES", "RUNNABLE_SCHEMES", "SCHEME_CHOICES", "log_quantize", "scheme_errors", "choose_scheme"]

SCHEMES = ("asymmetric", "symmetric", "logarithmic")
RUNNABLE_SCHEMES = ("asymmetric", "symmetric")
SCHEME_CHOICES = ("auto",) + RUNNABLE_SCHEMES
_LOG_EXPONENTS = 7  # 0, and +-2^-k for k = 0..6: 15 of the 16 codes


def log_quantize(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Round each weight to the nearest of 0, +-s*2^-k (k < 7), s = the group's max |w|; dequantized."""
    out_features, in_features = weight.shape
    groups = weight.to(torch.float32).reshape(out_features, in_features // group_size, group_size)
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    magnitudes = scale * torch.pow(2.0, -torch.arange(_LOG_EXPONENTS, dtype=torch.float32))  # (out, g, 7)
    levels = torch.cat([torch.zeros_like(scale), magnitudes], dim=-1)  # (out, g, 8)
    nearest = (groups.abs().unsqueeze(-1) - levels.unsqueeze(-2)).abs().argmin(dim=-1)
    values = torch.gather(levels, -1, nearest)
    return (torch.sign(groups) * values).reshape(out_features, in_features)


def scheme_errors(
    weight: torch.Tensor, group_size: int, second_moment: torch.Tensor, importance: torch.Tensor, energy: float | None = None,
    levels: tuple[int, ...] | None = None,
) -> dict[str, float]:
    """Relative output error of a 4-bit base plane under each scheme (round to nearest);
    ``energy``: the weight's tr(W H W^T) if already known; ``levels``: the asymmetric plane's
    level table (the symmetric one is always even, as the converter stores it)."""
    if energy is None:
        energy = output_energy(weight, second_moment)
    errors = {}
    for scheme in RUNNABLE_SCHEMES:
        symmetric = scheme == "symmetric"
        plane = quantize_plane(weight, PlaneSpec(4, group_size, symmetric, levels=None if symmetric else levels), importance=importance)
        errors[scheme] = relative_output_error(weight, dequantize_plane(plane), second_moment, energy)
    errors["logarithmic"] = relative_output_error(weight, log_quantize(weight, group_size), second_moment, energy)
    return errors


def choose_scheme(errors: dict[str, float], requested: str = "auto") -> tuple[str, str]:
    """(scheme, reason): the requested one, or the runnable scheme with the lowest error."""
    if requested != "auto":
        return requested, f"{requested} requested"
    best = min(RUNNABLE_SCHEMES, key=lambda s: errors[s])
    ranked = ", ".join(f"{s} {errors[s]:.4g}" for s in SCHEMES)
    return best, f"lowest base-tier output error among runnable schemes ({ranked})"
