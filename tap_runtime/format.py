"""The TAP checkpoint format: file names, tensor names, JSON keys and their dataclasses.

This is the one definition shared by the converter (which writes it) and the runtime (which
reads it). A checkpoint is a directory holding:

- ``config.json``: the model's own config plus ``quantization_config`` (``quant_method: "tap"``)
- ``tap_routing.json``: the routing table, i.e. a :class:`RoutingTable`
- ``model-XXXXX-of-YYYYY.safetensors`` shards and ``model.safetensors.index.json``
- ``tap_router.safetensors``: the router's tensors (token log-frequency table)
- tokenizer files and a ``README.md`` model card

Tiers are nested, never copies: tier 4 reads plane 0 (a 4-bit base), tier 8 reads planes 0-1
(base plus a 4-bit residual of ``W - dequant(base)``), tier 16 reads planes 0-2. Tier 32 marks
tensors kept in full precision (norms, biases). Only JSON and safetensors are ever read.
"""

from __future__ import annotations

import functools

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CorruptCheckpointError, FormatVersionError, InvalidConfigError
from .rotation import is_valid_rotation

__all__ = [
    "FORMAT_VERSION",
    "SUPPORTED_FORMAT_VERSIONS",
    "QUANT_METHOD",
    "CONFIG_FILE",
    "ROUTING_FILE",
    "ROUTER_TENSORS_FILE",
    "INDEX_FILE",
    "MODEL_CARD_FILE",
    "TOKENIZER_FILES",
    "SAFETENSORS_METADATA",
    "BASE_TIER",
    "FULL_PRECISION_TIER",
    "TIER_CHOICES",
    "PLANE_BITS",
    "LEVEL_STEPS_PER_CODE",
    "PLANE_FIELDS",
    "SCALE_CODE_STEPS_PER_OCTAVE",
    "EMBEDDING_FIELDS",
    "EMBEDDING_BITS",
    "ROUTER_TOKEN_LOG_FREQUENCY",
    "error_sketch_name",
    "sensitivity_probe_name",
    "ROUTER_TOKEN_LOG_FREQUENCY_CODES",
    "ROUTER_TOKEN_LOG_FREQUENCY_PALETTE",
    "encode_token_log_frequency",
    "decode_token_log_frequency",
    "ALL_SIGNALS",
    "RUNTIME_SIGNALS",
    "PER_LAYER_SIGNALS",
    "ROUTER_TARGETS",
    "shard_file_name",
    "plane_tensor_suffix",
    "plane_tensor_name",
    "embedding_tensor_suffix",
    "embedding_tensor_name",
    "quantization_config_dict",
    "check_format_version",
    "PlaneSpec",
    "LinearPolicy",
    "EmbeddingPolicy",
    "KeptTensor",
    "RouterSpec",
    "CalibrationInfo",
    "ShardInfo",
    "RoutingTable",
]

# 2: an embedding or head may carry per-column scales (``column_scales``), and zero points are
# uint8 eighths (PlaneSpec.zero_bits); a version-1 runtime would misread both, so it must refuse.
# 3: group scales may be uint8 log codes under a per-plane float32 ``scale_reference``
# (PlaneSpec.scale_bits), which a version-2 runtime would read as float16. Versions 1-2 still load.
# 4: the router's error sketches are derived from the residual planes at load
# (RouterSpec.error_sketch_sites, tap_runtime.sketch) instead of stored, and the token
# log-frequency table is stored as uint8 codes into a palette; a version-3 runtime would find
# neither tensor it expects. Versions 1-3 still load.
# 5: a linear's planes may store W H, its weight times a block Hadamard rotation of its input
# (LinearPolicy.input_rotation, tap_runtime.rotation); a version-4 runtime would multiply
# unrotated inputs by them. Versions 1-4 still load.
# 6: the router may read the ``sensitivity`` signal, one dot product of the layer's normed input
# with a per-layer probe vector stored in the router file (sensitivity_probe_name); a version-5
# runtime would meet a signal it cannot compute. Versions 1-5 still load.
# 7: a plane's 16 codes may stand for a table of non-uniform levels (PlaneSpec.levels, in eighths
# of a code step) instead of 0..15; a version-6 runtime would read them as evenly spaced.
# Versions 1-6 still load.
FORMAT_VERSION = 7
SUPPORTED_FORMAT_VERSIONS = frozenset({1, 2, 3, 4, 5, 6, 7})
QUANT_METHOD = "tap"

CONFIG_FILE = "config.json"
ROUTING_FILE = "tap_routing.json"
ROUTER_TENSORS_FILE = "tap_router.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MODEL_CARD_FILE = "README.md"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
# One key only: safetensors writes its metadata map in hash order, so a second key would make
# identical conversions produce files with different sha256s. The version lives in the JSON.
SAFETENSORS_METADATA = {"format": "pt"}

BASE_TIER = 4
FULL_PRECISION_TIER = 32
TIER_CHOICES = ((4, 8), (4, 8, 16))
PLANE_BITS = 4  # every plane, base or residual, is 4-bit; a tier adds planes
# PlaneSpec.levels are integers in these steps per code step: eighths keep every fitted level
# within 1/16 of a code step of where Lloyd's algorithm put it, and the largest (120) times an
# 8-bit activation still fits the int16 pair sums of AVX2's maddubs (2 x 120 x 128 < 2^15).
LEVEL_STEPS_PER_CODE = 8
EMBEDDING_BITS = 8

# Tensor fields of one plane. qweight: uint8 (out_features, in_features // 2), two 4-bit codes
# per byte, low nibble first. scales: (out_features, in_features // group_size), uint8 log codes
# under scale_reference, float32 (1,) (float16 scales and no reference up to format 2, see
# PlaneSpec.scale_bits); zeros: the same shape, uint8 eighths (float16 in format 1, see
# PlaneSpec.zero_bits); the plane dequantizes as (q - zero) * scale (q: the code's value, PlaneSpec.levels). Symmetric planes store no
# zeros: zero is 2**(bits-1) for every group (see PlaneSpec.fields).
PLANE_FIELDS = ("qweight", "scales", "zeros", "scale_reference")
# Tensor fields of an 8-bit embedding or output head. qweight: int8 (num_embeddings,
# embedding_dim); scales: float16 (num_embeddings,); column_scales: float32 (embedding_dim,),
# only where the policy says ``column_scale_exponent`` != 0. Row v dequantizes as
# q[v] * scale[v] (* column_scales). Column scales even out the columns before per-row rounding:
# a head folds them into its input, an embedding multiplies the looked-up row.
EMBEDDING_FIELDS = ("qweight", "scales", "column_scales")
# The log of the smoothed unigram frequency of each token id in calibration, (vocab_size,).
# Up to format 3: float32 under ROUTER_TOKEN_LOG_FREQUENCY. Format 4: uint8 codes into a
# float32 palette of at most 256 values. The values are logs of integer counts, so a few hundred
# distinct ones cover a vocabulary (167 for SmolLM2's 49,152 ids): the palette is exact then,
# and otherwise the 256 evenly spaced values nearest each (see encode_token_log_frequency).
ROUTER_TOKEN_LOG_FREQUENCY = "token_log_frequency"
ROUTER_TOKEN_LOG_FREQUENCY_CODES = "token_log_frequency_codes"
ROUTER_TOKEN_LOG_FREQUENCY_PALETTE = "token_log_frequency_palette"
_PALETTE_SIZE = 256


def encode_token_log_frequency(log_frequency: torch.Tensor) -> dict[str, torch.Tensor]:
    """The format-4 router tensors for a (vocab_size,) log-frequency table."""
    values = log_frequency.to(torch.float32).reshape(-1)
    palette = torch.unique(values)
    if palette.numel() > _PALETTE_SIZE:
        palette = torch.linspace(float(values.min()), float(values.max()), _PALETTE_SIZE)
    codes = torch.bucketize(values, palette).clamp(max=palette.numel() - 1)
    below = (codes - 1).clamp_min(0)
    # bucketize gives the first palette entry >= value; the one below may be nearer.
    nearer_below = (values - palette[below]).abs() < (palette[codes] - values).abs()
    codes = torch.where(nearer_below, below, codes)
    return {ROUTER_TOKEN_LOG_FREQUENCY_CODES: codes.to(torch.uint8).contiguous(), ROUTER_TOKEN_LOG_FREQUENCY_PALETTE: palette.contiguous()}


def decode_token_log_frequency(tensors: dict[str, torch.Tensor], path: str | Path) -> torch.Tensor:
    """The float32 (vocab_size,) table from either storage (format <= 3 or 4); ``path`` names the file."""
    if ROUTER_TOKEN_LOG_FREQUENCY in tensors:
        return tensors[ROUTER_TOKEN_LOG_FREQUENCY].to(torch.float32)
    if ROUTER_TOKEN_LOG_FREQUENCY_CODES not in tensors or ROUTER_TOKEN_LOG_FREQUENCY_PALETTE not in tensors:
        raise CorruptCheckpointError(
            f"{path}: missing tensor '{ROUTER_TOKEN_LOG_FREQUENCY}' (or '{ROUTER_TOKEN_LOG_FREQUENCY_CODES}' with "
            f"'{ROUTER_TOKEN_LOG_FREQUENCY_PALETTE}'); expected one of them in every TAP router file. Convert again."
        )
    codes, palette = tensors[ROUTER_TOKEN_LOG_FREQUENCY_CODES], tensors[ROUTER_TOKEN_LOG_FREQUENCY_PALETTE]
    if codes.dtype != torch.uint8 or palette.dim() != 1 or codes.numel() and int(codes.max()) >= palette.numel():
        raise CorruptCheckpointError(
            f"{path}: '{ROUTER_TOKEN_LOG_FREQUENCY_CODES}' ({codes.dtype}) does not index "
            f"'{ROUTER_TOKEN_LOG_FREQUENCY_PALETTE}' ({palette.numel()} values); expected uint8 codes below the "
            f"palette's length. The file is corrupt; convert again."
        )
    return palette.to(torch.float32)[codes.long()]


def error_sketch_name(layer_index: int) -> str:
    """float16 (hidden_size, rank) per decoder layer, stored up to format 3 (format 4 derives it,
    see RouterSpec.error_sketch_sites): P with ||x P||^2 ~ sum_m ||x E_m^T||^2 over the base-tier
    errors E_m of the linears that read the layer's input norm (q/k/v, GPT-2's c_attn).
    """
    return f"error_sketch.{layer_index}"


def sensitivity_probe_name(layer_index: int) -> str:
    """float16 (hidden_size,) per decoder layer, format 6: the vector v with sensitivity = norm(h) . v,
    a linear predictor (fitted at calibration) of how much the token's output distribution moves
    when this layer runs on the base tier for it (see RouterSpec)."""
    return f"sensitivity_probe.{layer_index}"

# Per-token importance signals measured during calibration.
ALL_SIGNALS = (
    "hidden_norm",
    "attention_received",
    "position",
    "token_frequency",
    "predictive_entropy",
    "error_estimate",
    "sensitivity",
    "loss_gradient",
)
# The subset a causal runtime can compute before a layer runs: attention received needs tokens
# that come later, predictive entropy needs the logits the forward pass has not produced yet, and
# the loss gradient needs the next token and a backward pass.
RUNTIME_SIGNALS = ("hidden_norm", "position", "token_frequency", "error_estimate", "sensitivity")
# Signals measured per decoder layer (normalised per layer); the others are per token.
PER_LAYER_SIGNALS = ("hidden_norm", "attention_received", "error_estimate", "sensitivity", "loss_gradient")
# What the router is fitted to predict, per layer: the tokens whose base-tier layer-output error
# is largest (L2); whose first-order loss change |dL/dh . e| is largest, with the next-token loss
# at the float32 model (loss_impact); or whose first-order change of the KL to the float32 model
# is largest, taken at the base-tier model with e the change to full precision (kl_impact: what
# routing a token up actually buys, README "How far token routing could go").
ROUTER_TARGETS = ("layer_error", "loss_impact", "kl_impact")


def shard_file_name(index: int, count: int) -> str:
    """Name of shard ``index`` (1-based) out of ``count``, as transformers names them."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def plane_tensor_suffix(plane_index: int, field_name: str) -> str:
    """Suffix of a plane tensor: plane 0 is ``weight*``, residual plane i is ``residual{i}*``.

    Plane 0's codes are stored under ``weight`` on purpose: a loader without TAP then meets a
    uint8 ``weight`` of half the expected width and refuses, instead of loading random weights.
    """
    if field_name not in PLANE_FIELDS:
        raise ValueError(f"unknown plane field {field_name!r}; expected one of {PLANE_FIELDS}")
    stem = "weight" if plane_index == 0 else f"residual{plane_index}"
    return stem if field_name == "qweight" else f"{stem}_{field_name}"


def plane_tensor_name(module_name: str, plane_index: int, field_name: str) -> str:
    return f"{module_name}.{plane_tensor_suffix(plane_index, field_name)}"


def embedding_tensor_suffix(field_name: str) -> str:
    if field_name not in EMBEDDING_FIELDS:
        raise ValueError(f"unknown embedding field {field_name!r}; expected one of {EMBEDDING_FIELDS}")
    return "weight" if field_name == "qweight" else f"weight_{field_name}"


def embedding_tensor_name(module_name: str, field_name: str) -> str:
    return f"{module_name}.{embedding_tensor_suffix(field_name)}"


def quantization_config_dict(tiers: tuple[int, ...]) -> dict[str, Any]:
    """The ``quantization_config`` entry written into ``config.json``."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "tiers": list(tiers),
        "routing_table": ROUTING_FILE,
    }


def check_format_version(version: Any, path: str | Path) -> int:
    """Refuse any version this runtime does not read, saying which ones it does."""
    if not isinstance(version, int) or version not in SUPPORTED_FORMAT_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(SUPPORTED_FORMAT_VERSIONS))
        raise FormatVersionError(
            f"{path}: TAP format version {version!r} is not supported; expected one of "
            f"[{supported}], got {version!r}. Convert the model again with this version of "
            f"tap-convert, or install the tap-engine release that wrote it."
        )
    return version


def _get(data: dict, key: str, kind: type | tuple[type, ...], path: str | Path, where: str) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise CorruptCheckpointError(
            f"{path}: missing key '{where}{key}'; expected it in a TAP routing table. "
            f"The file is incomplete or from another tool; convert the model again."
        )
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise CorruptCheckpointError(
            f"{path}: key '{where}{key}' has the wrong type; expected {names}, got "
            f"{type(value).__name__}. The file is corrupt; convert the model again."
        )
    return value


def _bad_levels(levels: Any, bits: int) -> bool:
    """Whether ``levels`` is not a valid level table for ``bits``-bit codes (PlaneSpec.levels)."""
    top = (2**bits - 1) * LEVEL_STEPS_PER_CODE
    return (
        not isinstance(levels, (list, tuple)) or len(levels) != 2**bits
        or any(not isinstance(v, int) or isinstance(v, bool) for v in levels)
        or any(b <= a for a, b in zip(levels, levels[1:])) or levels[0] < 0 or levels[-1] > top
    )


def _plane_levels(data: dict, path: str | Path, where: str) -> tuple[int, ...] | None:
    """A plane's level table from the routing table (absent or null: even codes, formats 1-6)."""
    levels = data.get("levels")
    if levels is None:
        return None
    if _bad_levels(levels, data.get("bits", PLANE_BITS)):
        raise CorruptCheckpointError(
            f"{path}: '{where}levels' is {levels!r}; expected 16 strictly increasing integers in [0, {15 * LEVEL_STEPS_PER_CODE}] "
            f"(eighths of a code step). The file is corrupt; convert the model again."
        )
    return tuple(levels)


@dataclass(frozen=True)
class PlaneSpec:
    """How one 4-bit plane is quantized: group-wise scales, with or without zero points.

    ``zero_bits`` says how stored zero points are encoded: 8 (format 2 on) is uint8 in eighths of
    a code step, zero = stored / 8 - 8, covering [-8, 23.875]; 16 (format 1) is float16.
    Eighths change a plane's error by under 0.5% against float16 zeros (measured on gemma-3
    and SmolLM2 layers) and halve their bytes; integer zero points would cost 9-30%.

    ``scale_bits`` says how group scales are stored: 8 (format 3) is a uint8 code c per group,
    scale = float16(reference * 2**(-c / 32)), one float32 reference per plane (the largest
    scale the plane can need); 16 (formats 1-2) is float16. Steps of 2**(1/32) keep every scale
    within 1.1% of the one asked for over a 250x range below the reference (groups needing less
    take the smallest code), and the codes are chosen before the weights are rounded, so the
    rounding compensates. Like K-quants' quantized block scales, this halves the bytes of scales.

    ``levels`` (format 7): None for evenly spaced codes (code q stands for q), or 16 strictly
    increasing integers in [0, 120] (code q stands for levels[q] / 8 code steps), so the plane
    dequantizes as (levels[q] / 8 - zero) x scale. Rotated weights are bell-shaped within a
    group, and a table fitted to them (as llama.cpp's IQ4_NL uses a fixed one) spends the 16
    codes where the weights are; the kernels look the levels up with one byte shuffle.
    """

    bits: int
    group_size: int
    symmetric: bool
    zero_bits: int = 8
    scale_bits: int = 8
    levels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.levels is not None:
            if _bad_levels(self.levels, self.bits):
                top = (2**self.bits - 1) * LEVEL_STEPS_PER_CODE
                raise ValueError(f"levels must be {2**self.bits} strictly increasing integers in [0, {top}]; got {self.levels!r}")
            object.__setattr__(self, "levels", tuple(self.levels))

    def code_values(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """(2**bits,) the value each code stands for, in code steps: 0..15, or the level table."""
        if self.levels is None:
            return torch.arange(2**self.bits, dtype=dtype, device=device)
        return torch.tensor(self.levels, dtype=torch.float32, device=device).div_(LEVEL_STEPS_PER_CODE).to(dtype)

    def round_codes(self, values: torch.Tensor) -> torch.Tensor:
        """Values in code steps (w / scale + zero) -> the nearest code, as float32 in [0, 15]."""
        if self.levels is None:
            return torch.clamp(torch.round(values), 0, 2**self.bits - 1)
        table = self.code_values(device=values.device)
        midpoints = (table[1:] + table[:-1]) / 2
        return torch.bucketize(values.to(torch.float32).contiguous(), midpoints).to(torch.float32)

    def dequantize_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (any integer or float dtype) -> the values they stand for, float32 code steps."""
        if self.levels is None:
            return codes.to(torch.float32)
        return self.code_values(device=codes.device)[codes.to(torch.int64)]

    @property
    def fields(self) -> tuple[str, ...]:
        """The tensors stored for this plane: symmetric planes have an implied zero point,
        float16 scales need no reference."""
        names = ["qweight", "scales"]
        if not self.symmetric:
            names.append("zeros")
        if self.scale_bits == 8:
            names.append("scale_reference")
        return tuple(names)

    @property
    def implied_zero(self) -> float:
        return float(2 ** (self.bits - 1))

    @property
    def zero_dtype(self) -> torch.dtype:
        return torch.uint8 if self.zero_bits == 8 else torch.float16

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.uint8 if self.scale_bits == 8 else torch.float16

    def round_zeros(self, zeros: torch.Tensor) -> torch.Tensor:
        """Zero points rounded to what is stored (float32), so codes are chosen against them."""
        if self.zero_bits == 16:
            return zeros.to(torch.float16).to(torch.float32)
        steps = torch.clamp(torch.round((zeros + _ZERO_OFFSET) * _ZERO_STEPS_PER_CODE), 0, 255)
        return steps / _ZERO_STEPS_PER_CODE - _ZERO_OFFSET

    def encode_zeros(self, zeros: torch.Tensor) -> torch.Tensor:
        """Zero points (already on the stored grid) -> the stored tensor."""
        if self.zero_bits == 16:
            return zeros.to(torch.float16)
        steps = torch.round((zeros.to(torch.float32) + _ZERO_OFFSET) * _ZERO_STEPS_PER_CODE)
        return torch.clamp(steps, 0, 255).to(torch.uint8)

    def decode_zeros(self, stored: torch.Tensor) -> torch.Tensor:
        """The stored tensor -> float16 zero points (exact: eighths in [-8, 24) fit float16)."""
        if self.zero_bits == 16:
            return stored.to(torch.float16)
        return (stored.to(torch.float32) / _ZERO_STEPS_PER_CODE - _ZERO_OFFSET).to(torch.float16)

    def scale_reference(self, largest_scale: torch.Tensor | float) -> torch.Tensor | None:
        """The plane's float32 (1,) reference for the largest scale it may need; None for float16 scales."""
        if self.scale_bits == 16:
            return None
        return torch.as_tensor(largest_scale, dtype=torch.float32).reshape(1).clamp_min(_MIN_SCALE_REFERENCE)

    def scale_grid(self, reference: torch.Tensor) -> torch.Tensor:
        """float16 (256,): the scale each code stands for, largest (code 0) first."""
        codes = torch.arange(_SCALE_CODES, dtype=torch.float32)
        return (reference.to(torch.float32).reshape(1) * torch.exp2(-codes / SCALE_CODE_STEPS_PER_OCTAVE)).to(torch.float16)

    def round_scales(self, scales: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        """Scales rounded to what is stored (float32), so codes are chosen against them."""
        if self.scale_bits == 16:
            return scales.to(torch.float16).to(torch.float32)
        return self.decode_scales(self._scale_codes(scales, reference), reference).to(torch.float32)

    def _scale_codes(self, scales: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        ratio = scales.to(torch.float32) / reference.to(torch.float32)
        codes = torch.round(-torch.log2(ratio.clamp_min(1e-30)) * SCALE_CODE_STEPS_PER_OCTAVE)
        return torch.clamp(codes, 0, _SCALE_CODES - 1).to(torch.uint8)

    def encode_scales(self, scales: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        """float16 scales already on the plane's grid -> the stored tensor.

        Looked up in the grid itself (the nearest of its values), so a scale decodes back to
        exactly the float16 value the converter rounded against, even where float16 loses digits.
        """
        if self.scale_bits == 16:
            return scales.to(torch.float16)
        descending = self.scale_grid(reference).to(torch.float32)
        ascending = descending.flip(0)
        values = scales.to(torch.float32).contiguous()
        upper = torch.searchsorted(ascending, values).clamp(max=_SCALE_CODES - 1)
        lower = (upper - 1).clamp_min(0)
        nearer_lower = (values - ascending[lower]).abs() <= (ascending[upper] - values).abs()
        index = torch.where(nearer_lower, lower, upper)
        return (_SCALE_CODES - 1 - index).to(torch.uint8)

    def decode_scales(self, stored: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        """The stored tensor -> float16 scales."""
        if self.scale_bits == 16:
            return stored.to(torch.float16)
        return self.scale_grid(reference)[stored.to(torch.int64)]

    def stored_bits_per_weight(self) -> float:
        """Bits per weight including each group's scale (and zero, if stored)."""
        zero_bits = 0 if self.symmetric else self.zero_bits
        return self.bits + (self.scale_bits + zero_bits) / self.group_size

    @classmethod
    def from_dict(cls, data: dict, path: str | Path, where: str) -> "PlaneSpec":
        zero_bits = data.get("zero_bits", 16)  # absent in format 1, which stored float16 zeros
        if zero_bits not in (8, 16):
            raise CorruptCheckpointError(f"{path}: '{where}zero_bits' is {zero_bits!r}; expected 8 or 16. Convert again.")
        scale_bits = data.get("scale_bits", 16)  # absent up to format 2, which stored float16 scales
        if scale_bits not in (8, 16):
            raise CorruptCheckpointError(f"{path}: '{where}scale_bits' is {scale_bits!r}; expected 8 or 16. Convert again.")
        return cls(
            bits=_get(data, "bits", int, path, where),
            group_size=_get(data, "group_size", int, path, where),
            symmetric=_get(data, "symmetric", bool, path, where),
            zero_bits=zero_bits,
            scale_bits=scale_bits,
            levels=_plane_levels(data, path, where),
        )


_ZERO_STEPS_PER_CODE = 8
_ZERO_OFFSET = 8.0
SCALE_CODE_STEPS_PER_OCTAVE = 32
_SCALE_CODES = 256
_MIN_SCALE_REFERENCE = 1e-30


@dataclass(frozen=True)
class LinearPolicy:
    """One quantized linear module: its shape, the tiers it offers and the plane behind each.

    ``planes[i]`` is added when a token runs at ``tiers[i]`` or above. ``layer_index`` is the
    decoder layer whose router decides the tier (None: always the base tier).
    ``weight_layout`` is ``"linear"`` (out, in) or ``"conv1d"`` (GPT-2's transposed (in, out)).
    ``method`` records how the planes were fitted: ``gptq`` (Hessian error compensation) or
    ``rtn`` (round to nearest with an importance-weighted clip search).
    ``input_rotation`` is the block size of the Walsh-Hadamard rotation H of the input whose
    product with W the planes store (W H; 0: none, the planes store W): the runtime multiplies
    x H by them (tap_runtime.rotation).
    ``min_tier`` is the lowest tier any token runs at in this module (a layer whose base tier
    hurts too much is promoted for every token); ``sensitivity`` maps each tier to the relative
    layer-output error measured on calibration inputs, tr(E H E^T) / tr(W H W^T).
    """

    name: str
    in_features: int
    out_features: int
    bias: bool
    layer_index: int | None
    tiers: tuple[int, ...]
    planes: tuple[PlaneSpec, ...]
    weight_layout: str = "linear"
    method: str = "rtn"
    min_tier: int = 4
    sensitivity: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    # The base plane's scheme and the base-tier output error measured for every scheme (see
    # tap_convert.schemes); empty in checkpoints written before schemes were measured.
    scheme: str = "asymmetric"
    scheme_errors: dict[str, float] = field(default_factory=dict)
    input_rotation: int = 0

    def bits_at_tier(self, tier: int) -> float:
        """Stored bits per weight read when a token routed to ``tier`` passes (min_tier applies)."""
        tier = max(tier, self.min_tier)
        count = sum(1 for t in self.tiers if t <= tier) or 1
        return sum(p.stored_bits_per_weight() for p in self.planes[:count])

    @functools.cached_property
    def always_planes(self) -> int:
        """How many planes every token reads, whatever the router says (cached: the policy is
        frozen, and decode asks several times per layer and token)."""
        return sum(1 for t in self.tiers if t <= self.min_tier)

    @property
    def num_weights(self) -> int:
        return self.in_features * self.out_features

    @classmethod
    def from_dict(cls, name: str, data: dict, path: str | Path) -> "LinearPolicy":
        where = f"linear.{name}."
        planes = tuple(
            PlaneSpec.from_dict(p, path, f"{where}planes[{i}].")
            for i, p in enumerate(_get(data, "planes", list, path, where))
        )
        tiers = tuple(_get(data, "tiers", list, path, where))
        if len(tiers) != len(planes):
            raise CorruptCheckpointError(
                f"{path}: '{where}tiers' and '{where}planes' differ in length; expected one plane "
                f"per tier, got {len(tiers)} tiers and {len(planes)} planes. Convert again."
            )
        layer_index = data.get("layer_index")
        min_tier = data.get("min_tier", tiers[0])
        if min_tier not in tiers:
            raise CorruptCheckpointError(
                f"{path}: '{where}min_tier' is {min_tier!r}; expected one of the module's tiers {list(tiers)}."
            )
        in_features = _get(data, "in_features", int, path, where)
        input_rotation = data.get("input_rotation", 0)
        if not isinstance(input_rotation, int) or not is_valid_rotation(input_rotation, in_features):
            raise CorruptCheckpointError(
                f"{path}: '{where}input_rotation' is {input_rotation!r}; expected 0 or a power of two "
                f"that divides in_features ({in_features}). Convert again."
            )
        return cls(
            name=name,
            in_features=in_features,
            out_features=_get(data, "out_features", int, path, where),
            bias=_get(data, "bias", bool, path, where),
            layer_index=layer_index if isinstance(layer_index, int) else None,
            tiers=tiers,
            planes=planes,
            weight_layout=data.get("weight_layout", "linear"),
            method=data.get("method", "rtn"),
            min_tier=min_tier,
            sensitivity={str(k): float(v) for k, v in data.get("sensitivity", {}).items()},
            reason=data.get("reason", ""),
            scheme=data.get("scheme", "symmetric" if planes[0].symmetric else "asymmetric"),
            scheme_errors={str(k): float(v) for k, v in data.get("scheme_errors", {}).items()},
            input_rotation=input_rotation,
        )


@dataclass(frozen=True)
class EmbeddingPolicy:
    """An 8-bit row-wise matrix: an input embedding (``role="embedding"``) or the output head
    (``role="head"``). A head with ``tied_to`` set reads that embedding's rows, storing none.
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    bits: int = EMBEDDING_BITS
    role: str = "embedding"
    tied_to: str | None = None
    # ``gptq``: rows error-compensated for the head's output on the final hidden states (the
    # head, or the embedding a head is tied to); ``rtn``: round to nearest.
    method: str = "rtn"
    # alpha in column_scales = (column RMS)**alpha, chosen by the converter; 0: no column scales.
    column_scale_exponent: float = 0.0

    @property
    def num_weights(self) -> int:
        return self.num_embeddings * self.embedding_dim

    @property
    def column_scaled(self) -> bool:
        return self.column_scale_exponent != 0.0

    @property
    def fields(self) -> tuple[str, ...]:
        """The tensor fields this matrix stores (a tied head reads its embedding's)."""
        return EMBEDDING_FIELDS if self.column_scaled else EMBEDDING_FIELDS[:2]

    def stored_bits_per_weight(self) -> float:
        column_bits = 32.0 / self.num_embeddings if self.column_scaled else 0.0
        return self.bits + 16.0 / self.embedding_dim + column_bits

    @classmethod
    def from_dict(cls, name: str, data: dict, path: str | Path) -> "EmbeddingPolicy":
        where = f"embeddings.{name}."
        tied = data.get("tied_to")
        role = _get(data, "role", str, path, where)
        if role not in ("embedding", "head"):
            raise CorruptCheckpointError(
                f"{path}: '{where}role' is {role!r}; expected 'embedding' or 'head'. Convert again."
            )
        return cls(
            name=name,
            num_embeddings=_get(data, "num_embeddings", int, path, where),
            embedding_dim=_get(data, "embedding_dim", int, path, where),
            bits=_get(data, "bits", int, path, where),
            role=role,
            tied_to=tied if isinstance(tied, str) else None,
            method=str(data.get("method", "rtn")),  # absent in checkpoints written before it existed
            column_scale_exponent=float(data.get("column_scale_exponent", 0.0)),  # format 2 on
        )


@dataclass(frozen=True)
class KeptTensor:
    """A tensor stored unquantized, at ``tier`` bits, and why."""

    name: str
    tier: int
    reason: str


@dataclass(frozen=True)
class RouterSpec:
    """The token-importance router: a linear score over normalised signals, thresholds per layer.

    score = bias + sum(weights[s] * (transform(s) - mean[s]) / std[s]) over ``signals``.
    Per-layer signals (``hidden_norm``, ``error_estimate``) are normalised per decoder layer
    (``layer_mean``/``layer_std``); the others once. ``error_estimate`` is log ||norm(h) P_l||^2
    with P_l the layer's error sketch (see :func:`error_sketch_name`), a low-rank estimate of
    the base tier's output error for this very token, as DP-LLM's error estimator does.
    ``sensitivity`` (format 6) is norm(h) . v_l with v_l the layer's probe vector (see
    :func:`sensitivity_probe_name`): a ridge fit, on calibration windows, of how much the KL to
    the float32 model moves to first order when the layer runs cheap for the token. A token runs
    at ``tiers[k+1]`` or above in layer l when score >= thresholds[l][k].
    """

    signals: tuple[str, ...]
    normalisation: dict[str, dict[str, Any]]
    weights: dict[str, float]
    bias: float
    thresholds: tuple[tuple[float, ...], ...]
    tier_shares: dict[str, float]
    fit: dict[str, Any] = field(default_factory=dict)
    excluded_signals: dict[str, str] = field(default_factory=dict)
    # Per layer, the score at every percentile 0..100 over the calibration tokens: lets the
    # runtime turn any share (or TAPConfig's importance quantiles) into per-layer thresholds.
    # Empty in checkpoints written before it existed.
    score_percentiles: tuple[tuple[float, ...], ...] = ()
    # Format 4: per decoder layer, the linears whose next plane (the first one above their
    # always-read planes) makes up the layer's error sketch (tap_runtime.sketch). Empty up to
    # format 3, whose sketches are stored tensors (error_sketch_name).
    error_sketch_sites: tuple[tuple[str, ...], ...] = ()

    def thresholds_for_quantiles(self, quantiles: list[float] | tuple[float, ...]) -> tuple[tuple[float, ...], ...]:
        """Per-layer thresholds sending tokens whose score quantile is >= quantiles[k] to tier k+1."""
        if not self.score_percentiles:
            raise InvalidConfigError(
                "this checkpoint's router has no score percentiles (converted before they were recorded); "
                "convert it again to set precision thresholds by quantile."
            )
        grid = [i / 100 for i in range(101)]
        return tuple(tuple(_interpolate(q, grid, row) for q in quantiles) for row in self.score_percentiles)

    @classmethod
    def from_dict(cls, data: dict, path: str | Path) -> "RouterSpec":
        where = "router."
        signals = tuple(_get(data, "signals", list, path, where))
        unknown = [s for s in signals if s not in RUNTIME_SIGNALS]
        if unknown:
            raise CorruptCheckpointError(
                f"{path}: router uses signals {unknown} that the runtime cannot compute; expected "
                f"a subset of {list(RUNTIME_SIGNALS)}. Convert the model again."
            )
        weights = _get(data, "weights", dict, path, where)
        thresholds = tuple(tuple(float(t) for t in row) for row in _get(data, "thresholds", list, path, where))
        return cls(
            signals=signals,
            normalisation=_get(data, "normalisation", dict, path, where),
            weights={k: float(v) for k, v in weights.items()},
            bias=_get(data, "bias", float, path, where),
            thresholds=thresholds,
            tier_shares={str(k): float(v) for k, v in _get(data, "tier_shares", dict, path, where).items()},
            fit=data.get("fit", {}),
            excluded_signals=data.get("excluded_signals", {}),
            score_percentiles=tuple(tuple(float(v) for v in row) for row in data.get("score_percentiles", [])),
            error_sketch_sites=tuple(tuple(str(n) for n in row) for row in data.get("error_sketch_sites", [])),
        )


def _interpolate(x: float, xs: list[float], ys: tuple[float, ...]) -> float:
    """Piecewise-linear y(x) on increasing ``xs``, clamped at the ends."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return ys[-1]


@dataclass(frozen=True)
class CalibrationInfo:
    """Where the calibration statistics came from, so a checkpoint can be reproduced."""

    dataset: str
    source: str
    num_samples: int
    seq_len: int
    seed: int
    num_tokens: int
    router_samples: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, path: str | Path) -> "CalibrationInfo":
        where = "calibration."
        return cls(
            dataset=_get(data, "dataset", str, path, where),
            source=_get(data, "source", str, path, where),
            num_samples=_get(data, "num_samples", int, path, where),
            seq_len=_get(data, "seq_len", int, path, where),
            seed=_get(data, "seed", int, path, where),
            num_tokens=_get(data, "num_tokens", int, path, where),
            router_samples=_get(data, "router_samples", int, path, where),
            seconds=_get(data, "seconds", float, path, where),
            extra=data.get("extra", {}),
        )


@dataclass(frozen=True)
class ShardInfo:
    """A file of the checkpoint with the sha256 the runtime verifies before loading it."""

    file_name: str
    sha256: str
    num_bytes: int


@dataclass(frozen=True)
class RoutingTable:
    """Everything the runtime needs besides the tensors: policy, router, provenance, checksums."""

    format_version: int
    model_type: str
    architecture: str
    num_layers: int
    tiers: tuple[int, ...]
    high_precision_share: float
    linear: dict[str, LinearPolicy]
    embeddings: dict[str, EmbeddingPolicy]
    kept: dict[str, KeptTensor]
    router: RouterSpec
    calibration: CalibrationInfo
    shards: tuple[ShardInfo, ...]
    producer: str = ""

    @property
    def base_tier(self) -> int:
        return self.tiers[0]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # The module name is the dict key; repeating it inside each entry would be typed twice.
        for section in ("linear", "embeddings", "kept"):
            for entry in data[section].values():
                entry.pop("name")
        # Even planes (levels None) write no key, as formats 1-6 did.
        for entry in data["linear"].values():
            for plane in entry["planes"]:
                if plane.get("levels") is None:
                    plane.pop("levels", None)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, path: str | Path) -> "RoutingTable":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptCheckpointError(
                f"{path}: not valid JSON ({exc}); expected a TAP routing table. The file is "
                f"truncated or corrupt; convert the model again."
            ) from exc
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: dict, path: str | Path) -> "RoutingTable":
        if not isinstance(data, dict):
            raise CorruptCheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}.")
        check_format_version(data.get("format_version"), path)
        tiers = tuple(_get(data, "tiers", list, path, ""))
        if tiers not in TIER_CHOICES:
            raise CorruptCheckpointError(
                f"{path}: tiers {list(tiers)} are not a supported set; expected one of "
                f"{[list(t) for t in TIER_CHOICES]}. Convert the model again."
            )
        linear = {n: LinearPolicy.from_dict(n, d, path) for n, d in _get(data, "linear", dict, path, "").items()}
        embeddings = {
            n: EmbeddingPolicy.from_dict(n, d, path) for n, d in _get(data, "embeddings", dict, path, "").items()
        }
        kept = {
            n: KeptTensor(name=n, tier=_get(d, "tier", int, path, f"kept.{n}."), reason=d.get("reason", ""))
            for n, d in _get(data, "kept", dict, path, "").items()
        }
        shards = tuple(
            ShardInfo(
                file_name=_get(s, "file_name", str, path, f"shards[{i}]."),
                sha256=_get(s, "sha256", str, path, f"shards[{i}]."),
                num_bytes=_get(s, "num_bytes", int, path, f"shards[{i}]."),
            )
            for i, s in enumerate(_get(data, "shards", list, path, ""))
        )
        table = cls(
            format_version=data["format_version"],
            model_type=_get(data, "model_type", str, path, ""),
            architecture=_get(data, "architecture", str, path, ""),
            num_layers=_get(data, "num_layers", int, path, ""),
            tiers=tiers,
            high_precision_share=_get(data, "high_precision_share", float, path, ""),
            linear=linear,
            embeddings=embeddings,
            kept=kept,
            router=RouterSpec.from_dict(_get(data, "router", dict, path, ""), path),
            calibration=CalibrationInfo.from_dict(_get(data, "calibration", dict, path, ""), path),
            shards=shards,
            producer=data.get("producer", ""),
        )
        if len(table.router.thresholds) != table.num_layers:
            raise CorruptCheckpointError(
                f"{path}: router has thresholds for {len(table.router.thresholds)} layers; expected "
                f"{table.num_layers} (num_layers). Convert the model again."
            )
        for row in table.router.thresholds:
            if len(row) != len(tiers) - 1 or any(math.isnan(t) for t in row):
                raise CorruptCheckpointError(
                    f"{path}: a router threshold row has {len(row)} entries; expected "
                    f"{len(tiers) - 1} (one per tier above the base), all numbers."
                )
        if "sensitivity" in table.router.signals and table.format_version < 6:
            raise CorruptCheckpointError(
                f"{path}: the router reads the sensitivity signal, which format 6 introduced, but the table says format "
                f"{table.format_version}. The file is corrupt or edited; convert the model again."
            )
        sketch_sites = table.router.error_sketch_sites
        if sketch_sites:
            unknown = [n for row in sketch_sites for n in row if n not in linear]
            if len(sketch_sites) != table.num_layers or unknown:
                raise CorruptCheckpointError(
                    f"{path}: router.error_sketch_sites lists {len(sketch_sites)} layers"
                    + (f" and linears {unknown[:3]} the table does not have" if unknown else "")
                    + f"; expected {table.num_layers} layers of the table's own linears. Convert the model again."
                )
        return table

    def weight_bits_summary(self) -> dict[str, float]:
        """Stored bits per weight of the quantized linears at each tier, and of everything."""
        total_linear = sum(p.num_weights for p in self.linear.values()) or 1
        summary = {
            f"linear_bits_at_tier_{t}": sum(p.bits_at_tier(t) * p.num_weights for p in self.linear.values())
            / total_linear
            for t in self.tiers
        }
        return summary
