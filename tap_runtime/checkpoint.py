"""Find a TAP checkpoint (local directory or Hub repo), read its manifest and verify its files.

Only JSON and safetensors are read; nothing from the checkpoint is imported or evaluated.
Every check names the file at fault and what to do about it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import (
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    RoutingTableMismatchError,
)
from .format import (
    CONFIG_FILE,
    INDEX_FILE,
    QUANT_METHOD,
    ROUTER_TENSORS_FILE,
    ROUTER_TOKEN_LOG_FREQUENCY,
    ROUTING_FILE,
    RoutingTable,
    check_format_version,
    decode_token_log_frequency,
)

__all__ = [
    "Checkpoint",
    "resolve_checkpoint",
    "read_checkpoint",
    "file_sha256",
    "verify_files",
    "read_router_tensors",
]

_HASH_BLOCK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory whose manifest has been read and whose files were verified."""

    directory: Path
    config: dict[str, Any]
    table: RoutingTable

    @property
    def total_bytes(self) -> int:
        return sum(shard.num_bytes for shard in self.table.shards)


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """A local directory as is; anything else is treated as a Hub repo id and downloaded.

    The Hub download honours ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and the cache like every
    huggingface_hub call.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointNotFoundError(
            f"{text}: no such checkpoint directory; expected a directory written by tap-convert or a Hub repo "
            f"id 'org/name'. Check the path."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id=text, revision=revision, cache_dir=cache_dir))
    except RepositoryNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"{text}: Hub repo not found (or not visible with the current token); expected an existing TAP "
            f"checkpoint repo. Check the name and HF_TOKEN."
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"{text}: no such local directory, and as a Hub repo id it is not in the local cache while the Hub "
            f"cannot be reached (HF_HUB_OFFLINE or no network); expected a checkpoint directory or a cached "
            f"or reachable repo. Check the path, or download the repo once online."
        ) from exc
    except HfHubHTTPError as exc:
        raise CheckpointNotFoundError(f"{text}: Hub download failed ({exc}). Retry, or check HF_ENDPOINT/HF_TOKEN.") from exc


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"{path}: file missing; expected it in every TAP checkpoint. The directory is incomplete; "
            f"convert the model again."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({exc}). The file is corrupt; convert again.") from exc


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def verify_files(directory: Path, table: RoutingTable) -> None:
    """Check that every file the routing table lists exists, has its size and its sha256."""
    for shard in table.shards:
        path = directory / shard.file_name
        if not path.is_file():
            raise CheckpointNotFoundError(
                f"{path}: file missing; the routing table lists it with sha256 {shard.sha256[:12]}…. "
                f"Download or copy the checkpoint again."
            )
        size = path.stat().st_size
        if size != shard.num_bytes:
            raise CorruptCheckpointError(
                f"{path}: size is wrong; expected {shard.num_bytes} bytes, got {size}. The file is truncated "
                f"or replaced; download or copy it again."
            )
        digest = file_sha256(path)
        if digest != shard.sha256:
            raise ChecksumMismatchError(
                f"{path}: sha256 mismatch; expected {shard.sha256}, got {digest}. The file is corrupt or from "
                f"another conversion; download or copy it again."
            )


def _check_index(directory: Path, table: RoutingTable) -> None:
    index = _read_json(directory / INDEX_FILE)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(f"{directory / INDEX_FILE}: missing 'weight_map'; convert again.")
    listed = {shard.file_name for shard in table.shards}
    indexed = set(weight_map.values())
    if not indexed <= listed:
        raise RoutingTableMismatchError(
            f"{directory / INDEX_FILE}: names shards {sorted(indexed - listed)} that {ROUTING_FILE} does not "
            f"list; expected the same files. The two files come from different conversions."
        )


def read_checkpoint(directory: str | os.PathLike, verify: bool = True) -> Checkpoint:
    """Read config.json and the routing table, check they agree, and verify every file's sha256."""
    directory = Path(directory)
    config = _read_json(directory / CONFIG_FILE)
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quant, dict) or quant.get("quant_method") != QUANT_METHOD:
        raise RoutingTableMismatchError(
            f"{directory / CONFIG_FILE}: quantization_config.quant_method is "
            f"{None if not isinstance(quant, dict) else quant.get('quant_method')!r}; expected {QUANT_METHOD!r}. "
            f"This is not a TAP checkpoint; convert it with tap-convert first."
        )
    check_format_version(quant.get("format_version"), directory / CONFIG_FILE)
    routing_path = directory / ROUTING_FILE
    if not routing_path.is_file():
        raise CheckpointNotFoundError(
            f"{routing_path}: file missing; expected the routing table in every TAP checkpoint. "
            f"The directory is incomplete; convert the model again."
        )
    table = RoutingTable.from_json(routing_path)
    text_config = config.get("text_config", config)
    model_type = text_config.get("model_type", config.get("model_type"))
    if table.model_type != model_type:
        raise RoutingTableMismatchError(
            f"{directory / ROUTING_FILE}: routing table is for model_type {table.model_type!r}; expected "
            f"{model_type!r} from {CONFIG_FILE}. The files come from different models; convert again."
        )
    _check_index(directory, table)
    if verify:
        verify_files(directory, table)
    return Checkpoint(directory=directory, config=config, table=table)


def read_router_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The router's tensors (the float32 token log-frequency table, up to format 3 the error
    sketches, from format 6 the sensitivity probes), read without executing anything."""
    path = Path(directory) / ROUTER_TENSORS_FILE
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: file missing; expected the router tensors. Convert again.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError for bad headers
        raise CorruptCheckpointError(f"{path}: unreadable safetensors file ({exc}); convert again.") from exc
    # Format 4 stores the table as palette codes; hand every caller the float32 table.
    tensors[ROUTER_TOKEN_LOG_FREQUENCY] = decode_token_log_frequency(tensors, path)
    return tensors
