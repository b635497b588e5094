"""Write a TAP checkpoint atomically: everything goes to a temp directory, then one rename.

An interrupted or failed conversion (Ctrl-C, full disk, an exception) leaves no partial
checkpoint behind and never touches an existing one unless ``overwrite`` was asked for. Steps
must come in order (add tensors, then finish), as gguf's writer enforces with its state.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import shutil
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from tap_runtime.checkpoint import file_sha256
from tap_runtime.errors import CheckpointExistsError
from tap_runtime.format import (
    CONFIG_FILE,
    INDEX_FILE,
    MODEL_CARD_FILE,
    ROUTER_TENSORS_FILE,
    ROUTING_FILE,
    SAFETENSORS_METADATA,
    RoutingTable,
    ShardInfo,
    shard_file_name,
)

__all__ = ["WriterState", "CheckpointWriter", "plan_shards", "DEFAULT_MAX_SHARD_BYTES"]

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
_DISK_MARGIN = 1.05


class WriterState(enum.Enum):
    EMPTY = "empty"
    TENSORS = "tensors"
    FINISHED = "finished"


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most ``max_shard_bytes`` (one tensor may exceed it)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = _tensor_bytes(tensor)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


class CheckpointWriter:
    """Collects tensors and metadata, then writes the whole checkpoint directory at once.

    Example:
        >>> writer = CheckpointWriter(Path("out"))         # doctest: +SKIP
        >>> writer.add_tensor("model.norm.weight", w)      # doctest: +SKIP
        >>> writer.finish(config, table, router_tensors, save_tokenizer, card)  # doctest: +SKIP
    """

    def __init__(self, out_dir: Path, overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self.state = WriterState.EMPTY
        self._tensors: dict[str, torch.Tensor] = {}
        self.check_destination()

    def check_destination(self) -> None:
        """Fail before any work if the output exists and may not be replaced."""
        if self.out_dir.exists() and not self.overwrite:
            raise CheckpointExistsError(
                f"{self.out_dir}: already exists; expected a new directory. Pass --overwrite to replace it or "
                f"choose another --out."
            )
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise CheckpointExistsError(f"{self.out_dir}: exists and is not a directory; choose another --out.")

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        if self.state is WriterState.FINISHED:
            raise RuntimeError("add_tensor after finish(): a checkpoint is written once")
        if name in self._tensors:
            raise ValueError(f"tensor {name} added twice")
        self._tensors[name] = tensor.detach().contiguous().cpu()
        self.state = WriterState.TENSORS

    @property
    def tensor_bytes(self) -> int:
        return sum(_tensor_bytes(t) for t in self._tensors.values())

    def _check_disk_space(self, parent: Path, extra_bytes: int) -> None:
        needed = int((self.tensor_bytes + extra_bytes) * _DISK_MARGIN)
        free = shutil.disk_usage(parent).free
        if free < needed:
            raise OSError(
                errno.ENOSPC,
                f"{parent}: not enough free space; expected at least {needed} bytes for the checkpoint, got "
                f"{free} free. Free some space or choose another --out.",
            )

    def finish(
        self,
        config: dict[str, Any],
        table: RoutingTable,
        router_tensors: dict[str, torch.Tensor],
        save_extra_files: Callable[[Path], None],
        model_card: Callable[[RoutingTable, int], str],
    ) -> RoutingTable:
        """Write shards, index, router tensors, routing table (with sha256s), config, extras, card.

        Returns the routing table as written (with its shard list filled in).
        """
        if self.state is not WriterState.TENSORS:
            raise RuntimeError(f"finish() in state {self.state.value}: add tensors first, and finish once")
        self.check_destination()
        parent = self.out_dir.parent if str(self.out_dir.parent) else Path(".")
        parent.mkdir(parents=True, exist_ok=True)
        self._check_disk_space(parent, sum(_tensor_bytes(t) for t in router_tensors.values()))
        temp = parent / f".{self.out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        temp.mkdir()
        try:
            shards = self._write_shards(temp)
            save_file(router_tensors, str(temp / ROUTER_TENSORS_FILE), metadata=SAFETENSORS_METADATA)
            shards.append(_shard_info(temp, ROUTER_TENSORS_FILE))
            table = replace(table, shards=tuple(shards))
            (temp / ROUTING_FILE).write_text(table.to_json(), encoding="utf-8")
            (temp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            save_extra_files(temp)
            total = sum(s.num_bytes for s in shards)
            (temp / MODEL_CARD_FILE).write_text(model_card(table, total), encoding="utf-8")
            self._publish(temp)
        except BaseException as exc:  # Ctrl-C and disk-full included: never leave half a checkpoint
            shutil.rmtree(temp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise OSError(
                    errno.ENOSPC,
                    f"{self.out_dir}: no space left on device while writing; the partial output was removed "
                    f"and nothing existing was changed. Free some space and run again.",
                ) from exc
            raise
        self.state = WriterState.FINISHED
        self._tensors = {}
        return table

    def _write_shards(self, temp: Path) -> list[ShardInfo]:
        plan = plan_shards(self._tensors, self.max_shard_bytes)
        weight_map: dict[str, str] = {}
        infos = []
        for index, names in enumerate(plan, start=1):
            file_name = shard_file_name(index, len(plan))
            save_file({n: self._tensors[n] for n in names}, str(temp / file_name), metadata=SAFETENSORS_METADATA)
            weight_map.update({n: file_name for n in names})
            infos.append(_shard_info(temp, file_name))
        index_json = {"metadata": {"total_size": self.tensor_bytes}, "weight_map": weight_map}
        (temp / INDEX_FILE).write_text(json.dumps(index_json, indent=2) + "\n", encoding="utf-8")
        return infos

    def _publish(self, temp: Path) -> None:
        """Swap the finished temp directory into place; an old checkpoint is removed only after."""
        for path in temp.iterdir():
            # safetensors creates files 0600; a checkpoint is meant to be shared and uploaded.
            path.chmod(0o644)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        temp.chmod(0o755)
        if self.out_dir.exists():
            backup = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out_dir, backup)
            try:
                os.replace(temp, self.out_dir)
            except BaseException:
                os.replace(backup, self.out_dir)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(temp, self.out_dir)


def _shard_info(directory: Path, file_name: str) -> ShardInfo:
    path = directory / file_name
    return ShardInfo(file_name=file_name, sha256=file_sha256(path), num_bytes=path.stat().st_size)
