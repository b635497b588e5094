import errno
import json
from pathlib import Path

import pytest
import torch

from tap_convert.writer import CheckpointWriter, WriterState, plan_shards
from tap_runtime.errors import CheckpointExistsError
from tap_runtime.format import INDEX_FILE, ROUTER_TENSORS_FILE, ROUTING_FILE

from ..tap_runtime.test_format import sample_table


def _finish(writer: CheckpointWriter, fail_in_extras: BaseException | None = None):
    def extras(directory: Path) -> None:
        (directory / "tokenizer.json").write_text("{}")
        if fail_in_extras is not None:
            raise fail_in_extras

    return writer.finish({"model_type": "llama"}, sample_table(), {"token_log_frequency": torch.zeros(4)}, extras, lambda t, n: f"card {n}")


def _writer(out: Path, **kwargs) -> CheckpointWriter:
    writer = CheckpointWriter(out, **kwargs)
    writer.add_tensor("a.weight", torch.zeros(10, 10, dtype=torch.uint8))
    writer.add_tensor("b.weight", torch.ones(20, dtype=torch.float32))
    return writer


def test_writes_every_file_and_records_sha256(tmp_path):
    out = tmp_path / "ckpt"
    table = _finish(_writer(out))
    names = {p.name for p in out.iterdir()}
    assert {ROUTING_FILE, ROUTER_TENSORS_FILE, INDEX_FILE, "config.json", "README.md", "tokenizer.json"} <= names
    assert [s.file_name for s in table.shards] == ["model-00001-of-00001.safetensors", ROUTER_TENSORS_FILE]
    on_disk = json.loads((out / ROUTING_FILE).read_text())
    assert on_disk["shards"][0]["sha256"] == table.shards[0].sha256
    assert not list(tmp_path.glob(".ckpt.tmp-*"))


def test_existing_output_is_refused_before_any_work(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    with pytest.raises(CheckpointExistsError, match=r"ckpt: already exists; expected a new directory. Pass --overwrite"):
        CheckpointWriter(out)


def test_overwrite_replaces_only_after_success(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        _finish(_writer(out, overwrite=True), fail_in_extras=RuntimeError("boom"))
    assert (out / "old.txt").read_text() == "old"  # untouched by the failed run
    _finish(_writer(out, overwrite=True))
    assert not (out / "old.txt").exists() and (out / ROUTING_FILE).exists()


def test_interrupt_leaves_no_partial_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        _finish(_writer(out), fail_in_extras=KeyboardInterrupt())
    assert list(tmp_path.iterdir()) == []


def test_full_disk_is_reported_and_cleaned(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    with pytest.raises(OSError, match="no space left on device while writing; the partial output was removed"):
        _finish(_writer(out), fail_in_extras=OSError(errno.ENOSPC, "No space left on device"))
    assert list(tmp_path.iterdir()) == []


def test_too_little_free_space_is_refused_up_front(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 5))
    with pytest.raises(OSError, match="not enough free space; expected at least"):
        _finish(_writer(tmp_path / "ckpt"))


def test_steps_must_come_in_order(tmp_path):
    writer = CheckpointWriter(tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="add tensors first"):
        _finish(writer)
    writer = _writer(tmp_path / "ckpt")
    _finish(writer)
    assert writer.state is WriterState.FINISHED
    with pytest.raises(RuntimeError, match="written once"):
        writer.add_tensor("c", torch.zeros(1))


def test_shards_are_planned_in_order_under_the_limit():
    tensors = {f"t{i}": torch.zeros(100, dtype=torch.uint8) for i in range(5)}
    assert plan_shards(tensors, 250) == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert plan_shards({"big": torch.zeros(1000, dtype=torch.uint8)}, 10) == [["big"]]
