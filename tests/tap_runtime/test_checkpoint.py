"""Every bad-input path of loading raises our error, naming the file and what is wrong."""

import json
import shutil

import pytest

import tap_runtime
from tap_runtime.checkpoint import read_checkpoint
from tap_runtime.errors import (
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    FormatVersionError,
    RoutingTableMismatchError,
)


@pytest.fixture
def checkpoint_copy(converted_factory, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(converted_factory("llama"), target)
    return target


def _shard(directory):
    return next(directory.glob("model-*.safetensors"))


def test_a_good_checkpoint_verifies(checkpoint_copy):
    checkpoint = read_checkpoint(checkpoint_copy)
    assert checkpoint.table.model_type == "llama" and checkpoint.total_bytes > 0


def test_missing_directory():
    with pytest.raises(CheckpointNotFoundError, match=r"\./nowhere: no such checkpoint directory"):
        tap_runtime.load("./nowhere")


def test_missing_shard(checkpoint_copy):
    shard = _shard(checkpoint_copy)
    shard.unlink()
    with pytest.raises(CheckpointNotFoundError, match=rf"{shard.name}: file missing; the routing table lists it"):
        tap_runtime.load(checkpoint_copy)


def test_missing_routing_table(checkpoint_copy):
    (checkpoint_copy / "tap_routing.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"tap_routing.json: file missing"):
        tap_runtime.load(checkpoint_copy)


def test_corrupted_shard_fails_its_sha256(checkpoint_copy):
    shard = _shard(checkpoint_copy)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=rf"{shard.name}: sha256 mismatch; expected [0-9a-f]{{64}}, got"):
        tap_runtime.load(checkpoint_copy)


def test_truncated_shard(checkpoint_copy):
    shard = _shard(checkpoint_copy)
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CorruptCheckpointError, match=rf"{shard.name}: size is wrong; expected \d+ bytes, got 1000"):
        tap_runtime.load(checkpoint_copy)


def test_wrong_format_version(checkpoint_copy):
    config_path = checkpoint_copy / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["format_version"] = 8
    config_path.write_text(json.dumps(config))
    with pytest.raises(FormatVersionError, match=r"config.json: TAP format version 8 is not supported; expected one of \[1, 2, 3, 4, 5, 6, 7\]"):
        tap_runtime.load(checkpoint_copy)


def test_not_a_tap_checkpoint(tiny_model_factory):
    with pytest.raises(RoutingTableMismatchError, match=r"quantization_config.quant_method is None; expected 'tap'"):
        tap_runtime.load(tiny_model_factory("llama"))


def test_routing_table_from_another_model(checkpoint_copy, converted_factory):
    shutil.copy(converted_factory("qwen2") / "tap_routing.json", checkpoint_copy / "tap_routing.json")
    with pytest.raises(RoutingTableMismatchError, match=r"routing table is for model_type 'qwen2'; expected 'llama'"):
        tap_runtime.load(checkpoint_copy)


def test_routing_table_with_other_shapes(checkpoint_copy, converted_factory, tmp_path):
    table = json.loads((checkpoint_copy / "tap_routing.json").read_text())
    name = next(iter(table["linear"]))
    table["linear"][name]["in_features"] *= 2
    (checkpoint_copy / "tap_routing.json").write_text(json.dumps(table))
    with pytest.raises(RoutingTableMismatchError, match=rf"module {name} expected \(in, out\)"):
        tap_runtime.load(checkpoint_copy, verify=False)


def test_unknown_kernel(checkpoint_copy):
    with pytest.raises(tap_runtime.InvalidConfigError, match="kernel 'gpu' is unknown"):
        tap_runtime.load(checkpoint_copy, kernel="gpu")


def test_uncached_repo_id_offline_says_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointNotFoundError, match=r"some-org/some-model: no such local directory, and as a Hub repo id"):
        tap_runtime.load("some-org/some-model")
