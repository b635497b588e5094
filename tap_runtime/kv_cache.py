"""The lean decode loop's KV cache: allocated once, written in place; float or int8 with dynamic scales.

``int8`` is the ``dynamic`` scheme applied to the cache: every new key and value vector (one
per position and KV head) is quantized symmetrically with its own absmax scale, computed when
it is written, so no calibration is involved and nothing depends on the text seen before. The
cache then takes (head_dim + 4) bytes per vector instead of 4 * head_dim (float32) or
2 * head_dim (bfloat16): 27% of float32 at head_dim 64. Attention dequantizes the positions it
reads on every step; that costs time growing with the context, so int8 is a memory option
(long contexts, many sequences), not a speed one.
"""

from __future__ import annotations

import torch

__all__ = ["KV_CACHE_KINDS", "StaticKVCache", "Int8KVCache", "make_kv_cache"]

KV_CACHE_KINDS = ("float", "int8")
_INT8_MAX = 127.0


class StaticKVCache:
    """Keys and values per layer in the compute dtype, (1, kv_heads, max_length, head_dim)."""

    kind = "float"

    def __init__(self, num_layers: int, kv_heads: int, max_length: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (1, kv_heads, max_length, head_dim)
        self.max_length = max_length
        self.dtype = dtype
        self.device = device
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def fits(self, max_length: int, dtype: torch.dtype, device: torch.device) -> bool:
        return self.max_length >= max_length and self.dtype == dtype and self.device == device

    def write(self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
        end = start + key.shape[2]
        self.keys[layer][:, :, start:end] = key
        self.values[layer][:, :, start:end] = value

    def read(self, layer: int, first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][:, :, first:end], self.values[layer][:, :, first:end]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class Int8KVCache(StaticKVCache):
    """int8 codes plus one float32 scale per (KV head, position) vector."""

    kind = "int8"

    def __init__(self, num_layers: int, kv_heads: int, max_length: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (1, kv_heads, max_length, head_dim)
        scale_shape = (1, kv_heads, max_length, 1)
        self.max_length = max_length
        self.dtype = dtype
        self.device = device
        self.keys = [torch.empty(shape, dtype=torch.int8, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=torch.int8, device=device) for _ in range(num_layers)]
        self.key_scales = [torch.empty(scale_shape, dtype=torch.float32, device=device) for _ in range(num_layers)]
        self.value_scales = [torch.empty(scale_shape, dtype=torch.float32, device=device) for _ in range(num_layers)]

    @staticmethod
    def _quantize(vectors: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
        vectors = vectors.to(torch.float32)
        scale = vectors.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / _INT8_MAX
        scales.copy_(scale)
        codes.copy_(torch.round(vectors / scale))

    def write(self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
        end = start + key.shape[2]
        self._quantize(key, self.keys[layer][:, :, start:end], self.key_scales[layer][:, :, start:end])
        self._quantize(value, self.values[layer][:, :, start:end], self.value_scales[layer][:, :, start:end])

    def read(self, layer: int, first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.keys[layer][:, :, first:end].to(torch.float32) * self.key_scales[layer][:, :, first:end]
        values = self.values[layer][:, :, first:end].to(torch.float32) * self.value_scales[layer][:, :, first:end]
        return keys.to(self.dtype), values.to(self.dtype)

    @property
    def nbytes(self) -> int:
        tensors = self.keys + self.values + self.key_scales + self.value_scales
        return sum(t.numel() * t.element_size() for t in tensors)


def make_kv_cache(kind: str, num_layers: int, kv_heads: int, max_length: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> StaticKVCache:
    from .errors import InvalidConfigError

    if kind not in KV_CACHE_KINDS:
        raise InvalidConfigError(f"kv_cache={kind!r} is unknown; expected one of {list(KV_CACHE_KINDS)}.")
    cls = Int8KVCache if kind == "int8" else StaticKVCache
    return cls(num_layers, kv_heads, max_length, head_dim, dtype, device)
