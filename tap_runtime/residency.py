"""Memory-efficient mode: residual planes stay on disk until routing needs them.

With every token on the base tier a TAP model needs only its base planes in memory; the
residual planes are read only for the tokens the router sends higher. In this mode a residual
plane is remembered as (shard file, tensor names) and read from its safetensors shard (only
its own bytes) and packed into the kernel's layout the first time a routed token needs it.
Packed residual planes live in one least-recently-used cache with a byte budget shared by the
whole model, so resident memory is bounded by base planes + budget whatever the routing does;
a plane evicted and needed again is read and packed again (slower, never wrong). Nothing keeps
the shard mapped between reads, so its pages do not count towards the process's memory.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from .format import PlaneSpec
from .planes import Plane

__all__ = ["ResidualPlaneCache", "LazyPlane", "prepared_nbytes", "shard_of_every_tensor"]


def prepared_nbytes(prepared: Any) -> int:
    """Bytes held by a kernel's prepared plane (every tensor field of its dataclass)."""
    fields = getattr(prepared, "__dict__", {})
    return sum(value.numel() * value.element_size() for value in fields.values() if isinstance(value, torch.Tensor))


class ResidualPlaneCache:
    """Packed residual planes, least recently used first out, within ``max_bytes``."""

    def __init__(self, kernel: Any, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.kernel = kernel
        self.max_bytes = int(max_bytes)
        self.resident_bytes = 0
        self.packs = 0  # how many times a plane was packed (first use or after eviction)
        self.hits = 0
        self._entries: OrderedDict[int, tuple[Any, int]] = OrderedDict()

    def get(self, lazy: "LazyPlane") -> Any:
        key = id(lazy)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]
        prepared = self.kernel.prepare_plane(lazy.read())
        self.packs += 1
        size = prepared_nbytes(prepared)
        while self._entries and self.resident_bytes + size > self.max_bytes:
            _, (_, evicted_size) = self._entries.popitem(last=False)
            self.resident_bytes -= evicted_size
        if size <= self.max_bytes:
            self._entries[key] = (prepared, size)
            self.resident_bytes += size
        return prepared  # larger than the whole budget: used once, not kept

    def clear(self) -> None:
        self._entries.clear()
        self.resident_bytes = 0


class LazyPlane:
    """A residual plane left in its shard: where its tensors are, read when a token needs it."""

    __slots__ = ("spec", "shard", "tensor_names", "cache", "__weakref__")

    def __init__(self, spec: PlaneSpec, shard: Path, tensor_names: dict[str, str], cache: ResidualPlaneCache):
        self.spec = spec
        self.shard = Path(shard)
        self.tensor_names = tensor_names  # plane field -> tensor name in the shard
        self.cache = cache

    def read(self) -> Plane:
        """The plane's tensors, read from the shard (only their bytes) into memory of their own."""
        from safetensors import safe_open

        with safe_open(str(self.shard), framework="pt") as handle:
            fields = {name: handle.get_tensor(key).clone() for name, key in self.tensor_names.items()}
        return Plane.from_stored(self.spec, fields)

    def resolve(self) -> Any:
        return self.cache.get(self)


def shard_of_every_tensor(directory: Path, shard_files: list[str]) -> dict[str, Path]:
    """Tensor name -> the shard holding it (reads only the safetensors headers)."""
    from safetensors import safe_open

    located: dict[str, Path] = {}
    for file_name in shard_files:
        path = Path(directory) / file_name
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                located[key] = path
    return located
