"""Quantized planes as tensors, and their dequantization (the inverse of tap_convert.quantize).

The runtime needs dequantization for the reference kernel and for tests; the converter imports
it from here so that quantize and dequantize stay one definition each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .format import LEVEL_STEPS_PER_CODE, LinearPolicy, PlaneSpec
from .packing import pack_int4, unpack_int4
from .rotation import rotate_weight

__all__ = ["Plane", "RowQuantized", "split_levels", "dequantize_plane", "dequantize_planes", "dequantize_linear", "dequantize_rows"]


@dataclass
class Plane:
    """One 4-bit plane of a weight (out_features, in_features).

    qweight: uint8 (out_features, in_features // 2), packed codes.
    scales:  float16 (out_features, in_features // group_size).
    zeros:   float16 (out_features, in_features // group_size), in code units; None for a
             symmetric plane, whose zero is ``spec.implied_zero``.
    scale_reference: float32 (1,), the reference of 8-bit scale codes; None for float16 scales.
    Scales and zeros are float16 in memory and on disk as ``spec.scale_bits`` and
    ``spec.zero_bits`` say (see :meth:`stored_tensors` and :meth:`from_stored`).
    """

    spec: PlaneSpec
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    scale_reference: torch.Tensor | None = None

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """Field name -> the tensor as the checkpoint stores it (scales and zero points encoded)."""
        stored = {name: getattr(self, name) for name in self.spec.fields}
        stored["scales"] = self.spec.encode_scales(self.scales, self.scale_reference)
        if "zeros" in stored:
            stored["zeros"] = self.spec.encode_zeros(stored["zeros"])
        return stored

    @classmethod
    def from_stored(cls, spec: PlaneSpec, stored: dict[str, torch.Tensor]) -> "Plane":
        """The plane from its stored tensors (field name -> tensor), scales and zeros decoded.

        Float scales are taken back to float16 first: a loader may have cast them to its dtype.
        """
        reference = stored.get("scale_reference")
        if reference is not None:
            reference = reference.to(torch.float32)
        zeros = stored.get("zeros")
        return cls(
            spec,
            stored["qweight"],
            spec.decode_scales(stored["scales"], reference),
            None if zeros is None else spec.decode_zeros(zeros),
            reference,
        )

    def zeros_or_implied(self) -> torch.Tensor:
        """(out_features, groups) zero points, materialising the implied ones."""
        if self.zeros is not None:
            return self.zeros
        return torch.full(self.scales.shape, self.spec.implied_zero, dtype=torch.float16, device=self.scales.device)


@dataclass
class RowQuantized:
    """An 8-bit row-wise matrix (embedding or output head).

    qweight: int8 (rows, cols); scales: float16 (rows,); column_scales: float32 (cols,) or None.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    column_scales: torch.Tensor | None = None


def split_levels(plane: Plane) -> tuple[Plane, Plane]:
    """A plane with a level table as two even planes whose sum is exactly it, for kernels that
    multiply evenly spaced codes only (torch's int4 ops): with level L = 8 h + l (h <= 15, l <= 7),
    (L / 8 - zero) x scale = (h - zero) x scale + (l - 0) x scale / 8. Twice the reads of the
    plane, so the native kernels look the levels up instead."""
    if plane.spec.levels is None:
        raise ValueError("split_levels needs a plane with a level table (PlaneSpec.levels)")
    table = torch.tensor(plane.spec.levels, dtype=torch.uint8, device=plane.qweight.device)
    values = table[unpack_int4(plane.qweight).to(torch.int64)]
    high_spec = PlaneSpec(plane.spec.bits, plane.spec.group_size, plane.spec.symmetric, plane.spec.zero_bits, plane.spec.scale_bits)
    low_spec = PlaneSpec(plane.spec.bits, plane.spec.group_size, False, plane.spec.zero_bits, plane.spec.scale_bits)
    high = Plane(high_spec, pack_int4(values // LEVEL_STEPS_PER_CODE), plane.scales, plane.zeros, plane.scale_reference)
    low = Plane(
        low_spec, pack_int4(values % LEVEL_STEPS_PER_CODE), (plane.scales.to(torch.float32) / LEVEL_STEPS_PER_CODE).to(plane.scales.dtype),
        torch.zeros_like(plane.scales), None,
    )
    return high, low


def dequantize_plane(plane: Plane, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return (q - zero) * scale as a dense (out_features, in_features) tensor (q: each code's
    value, its level where the plane has a level table)."""
    codes = plane.spec.dequantize_codes(unpack_int4(plane.qweight)).to(dtype)
    out_features, in_features = codes.shape
    groups = in_features // plane.spec.group_size
    # (out, groups, group_size) so each group meets its own scale and zero.
    codes = codes.view(out_features, groups, plane.spec.group_size)
    scales = plane.scales.to(dtype).unsqueeze(-1)
    zeros = plane.zeros_or_implied().to(dtype).unsqueeze(-1)
    return ((codes - zeros) * scales).view(out_features, in_features)


def dequantize_planes(planes: list[Plane] | tuple[Plane, ...], count: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sum of the first ``count`` planes: the weight a token sees at the matching tier."""
    weight = dequantize_plane(planes[0], dtype)
    for plane in planes[1:count]:
        weight = weight + dequantize_plane(plane, dtype)
    return weight


def dequantize_linear(planes: list[Plane] | tuple[Plane, ...], policy: LinearPolicy, count: int | None = None) -> torch.Tensor:
    """The float32 weight (out, in) a token reading the first ``count`` planes (default: the
    module's always-read ones) multiplies its own input by: the planes' sum, brought back from
    the rotated input basis where the policy rotates (the planes store W H; H is its own inverse)."""
    weight = dequantize_planes(planes, policy.always_planes if count is None else count)
    return rotate_weight(weight, policy.input_rotation)


def dequantize_rows(matrix: RowQuantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    weight = matrix.qweight.to(dtype) * matrix.scales.to(dtype).unsqueeze(-1)
    if matrix.column_scales is not None:
        weight = weight * matrix.column_scales.to(dtype)
    return weight
