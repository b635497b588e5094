"""Quantize weights into nested 4-bit planes (one per tier) and 8-bit rows (embeddings).

Each plane is group-wise round-to-nearest with a per-group clipping search: the clip ratio that
minimises the group's squared error, weighted per input channel by how strongly calibration
activations use it (the mean square of that channel, as llama.cpp's importance matrix does).
The residual plane of tier 8 quantizes what the base plane left, ``W - dequant(base)``.
The inverse lives in ``tap_runtime.planes`` so both sides share one definition.
"""

from __future__ import annotations

import torch

from tap_runtime.format import SCALE_CODE_STEPS_PER_OCTAVE, PlaneSpec
from tap_runtime.packing import pack_int4
from tap_runtime.planes import Plane, RowQuantized, dequantize_plane

__all__ = ["CLIP_RATIOS", "GRID_CLIP_RATIOS", "clip_ratios", "scale_reference_for", "quantize_plane", "quantize_tiers", "quantize_rows", "sqnr_db"]

# Candidate clipping ratios of the group range; 1.0 is plain min/max round-to-nearest.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
# With log-coded scales: one ratio per code step, down to 2**(-1/2) = 0.707, so the search
# visits 17 consecutive stored scales below the unclipped one instead of 7 rounded ones. On
# gemma-3's layers 3 and 12 (GPTQ, act-order) this finer search lowers the summed output error
# by 1.4% at tier 4 and 3.6% at tier 8; 8-bit codes on the coarse ratios match float16 scales.
GRID_CLIP_RATIOS = tuple(2.0 ** (-k / SCALE_CODE_STEPS_PER_OCTAVE) for k in range(SCALE_CODE_STEPS_PER_OCTAVE // 2 + 1))


def clip_ratios(spec: PlaneSpec) -> tuple[float, ...]:
    """The clip ratios searched for ``spec``'s planes (float16 scales keep format 2's seven)."""
    return GRID_CLIP_RATIOS if spec.scale_bits == 8 else CLIP_RATIOS
_MIN_SCALE = 1e-10


def _codes_for(groups: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: PlaneSpec) -> torch.Tensor:
    """The nearest code of each weight (float32): to an integer, or to the plane's level table."""
    return spec.round_codes(groups / scales + zeros)


def _unclipped_scales(groups: torch.Tensor, spec: PlaneSpec) -> torch.Tensor:
    """Each group's scale at clip ratio 1 (the largest any ratio gives). groups: (..., group_size)."""
    if spec.symmetric:
        return groups.abs().amax(dim=-1, keepdim=True) / (2 ** (spec.bits - 1) - 1)
    return (groups.amax(dim=-1, keepdim=True) - groups.amin(dim=-1, keepdim=True)) / (2**spec.bits - 1)


def scale_reference_for(weight: torch.Tensor, spec: PlaneSpec) -> torch.Tensor | None:
    """The plane's scale reference (see PlaneSpec.scale_bits): the largest unclipped group scale
    of ``weight`` (out, in); None where scales are stored as float16."""
    groups = weight.detach().to(torch.float32).reshape(weight.shape[0], -1, spec.group_size)
    return spec.scale_reference(_unclipped_scales(groups, spec).max())


def _candidate(
    groups: torch.Tensor, ratio: float, spec: PlaneSpec, reference: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros (rounded as stored) for one clip ratio. Shapes (out, groups, 1).

    ``reference``: the plane's scale reference when ``spec.scale_bits`` is 8.
    """
    max_code = 2**spec.bits - 1
    if spec.symmetric:
        mid = 2 ** (spec.bits - 1)
        absmax = groups.abs().amax(dim=-1, keepdim=True) * ratio
        scales = (absmax / (mid - 1)).clamp_min(_MIN_SCALE)
        zeros = torch.full_like(scales, float(mid))
        scales = spec.round_scales(scales, reference).clamp_min(_MIN_SCALE)
        return scales, zeros
    low = groups.amin(dim=-1, keepdim=True)
    high = groups.amax(dim=-1, keepdim=True)
    # Shrink the range about its centre: the clipped range still covers the bulk of the group.
    centre = (high + low) / 2
    half = (high - low) / 2 * ratio
    if spec.scale_bits == 16:
        scales = (2 * half / max_code).clamp_min(_MIN_SCALE)
        zeros = -(centre - half) / scales
        # Round to the stored precision before choosing codes, so the codes fit what is stored.
        scales = spec.round_scales(scales, reference).clamp_min(_MIN_SCALE)
    else:
        # A log-coded scale may move by up to 1.1%: keep the code range centred on the group's.
        scales = spec.round_scales((2 * half / max_code).clamp_min(_MIN_SCALE), reference).clamp_min(_MIN_SCALE)
        zeros = max_code / 2 - centre / scales
    return scales, spec.round_zeros(zeros)


def quantize_plane(weight: torch.Tensor, spec: PlaneSpec, importance: torch.Tensor | None = None) -> Plane:
    """Quantize a (out_features, in_features) weight into one plane.

    Args:
        weight: float tensor (out_features, in_features); in_features % group_size == 0.
        spec: bits (4), group_size, symmetric.
        importance: optional (in_features,) non-negative per-input-channel weights for the error.
    Returns:
        a :class:`Plane` whose dequantization is the chosen approximation.
    Example:
        >>> plane = quantize_plane(torch.randn(16, 64), PlaneSpec(4, 32, False))
        >>> plane.qweight.shape
        torch.Size([16, 32])
    """
    if spec.bits != 4:
        raise ValueError(f"only 4-bit planes are packed; got bits={spec.bits}")
    out_features, in_features = weight.shape
    if in_features % spec.group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={spec.group_size}")
    num_groups = in_features // spec.group_size
    # (out, groups, group_size)
    groups = weight.detach().to(torch.float32).reshape(out_features, num_groups, spec.group_size)
    if importance is None:
        channel_weight = torch.ones(1, num_groups, spec.group_size)
    else:
        channel_weight = importance.to(torch.float32).clamp_min(0).reshape(1, num_groups, spec.group_size)
        # Keep every channel in play: a channel unseen in calibration may still see tokens later.
        channel_weight = channel_weight + channel_weight.mean() * 1e-3 + 1e-12
    reference = scale_reference_for(weight, spec)
    best_err = None
    best_scales = best_zeros = None
    for ratio in clip_ratios(spec):
        scales, zeros = _candidate(groups, ratio, spec, reference)
        codes = _codes_for(groups, scales, zeros, spec)
        err = (((spec.dequantize_codes(codes) - zeros) * scales - groups) ** 2 * channel_weight).sum(dim=-1, keepdim=True)
        if best_err is None:
            best_err, best_scales, best_zeros = err, scales, zeros
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scales = torch.where(better, scales, best_scales)
            best_zeros = torch.where(better, zeros, best_zeros)
    codes = _codes_for(groups, best_scales, best_zeros, spec).to(torch.uint8)
    return Plane(
        spec=spec,
        qweight=pack_int4(codes.reshape(out_features, in_features)),
        scales=best_scales.squeeze(-1).to(torch.float16).contiguous(),
        zeros=None if spec.symmetric else best_zeros.squeeze(-1).to(torch.float16).contiguous(),
        scale_reference=reference,
    )


def quantize_tiers(
    weight: torch.Tensor, specs: tuple[PlaneSpec, ...] | list[PlaneSpec], importance: torch.Tensor | None = None
) -> list[Plane]:
    """Nested planes: plane k quantizes what planes 0..k-1 left of ``weight``.

    Returns one plane per spec; the sum of the first k dequantized planes is tier k's weight.
    """
    weight = weight.detach().to(torch.float32)
    remainder = weight
    planes: list[Plane] = []
    for spec in specs:
        plane = quantize_plane(remainder, spec, importance)
        planes.append(plane)
        remainder = remainder - dequantize_plane(plane)
    return planes


def quantize_rows(weight: torch.Tensor, bits: int = 8) -> RowQuantized:
    """Symmetric per-row quantization for embeddings and output heads (rows = tokens).

    One scale per row lets a tied head use torch's per-output-channel int8 matmul directly.
    """
    if bits != 8:
        raise ValueError(f"only 8-bit rows are supported; got bits={bits}")
    weight = weight.detach().to(torch.float32)
    scales = (weight.abs().amax(dim=1) / 127.0).clamp_min(_MIN_SCALE).to(torch.float16)
    scales_f32 = scales.to(torch.float32).clamp_min(_MIN_SCALE)
    codes = torch.clamp(torch.round(weight / scales_f32.unsqueeze(1)), -127, 127).to(torch.int8)
    return RowQuantized(qweight=codes.contiguous(), scales=scales.contiguous())


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's quality measure)."""
    reference = reference.to(torch.float64)
    noise = (reference - approximation.to(torch.float64)).pow(2).sum()
    signal = reference.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
