"""Hub round trip against a local Hub-compatible server: push, download into an empty cache, load.

The real huggingface_hub client runs in a subprocess whose HF_ENDPOINT points at the server,
so every request it makes (create, preupload, LFS batch and PUT, NDJSON commit, repo info,
tree, resolve) goes through the same code as against huggingface.co.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hub_server import TOKEN, LocalHub

CLIENT = r"""
import json, sys, time
mode, directory, repo_id = sys.argv[1:4]
if mode.startswith("no-wait"):
    time.sleep = lambda seconds: None  # retries without their back-off waits
import torch
import tap_runtime
from tap_convert import push_to_hub
from tap_runtime.errors import TapError
result = {}
try:
    if mode != "load-only":
        result["commit_url"] = push_to_hub(directory, repo_id)
    remote = tap_runtime.load(repo_id)
    local = tap_runtime.load(directory)
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        result["max_abs_diff"] = float((remote(ids).logits - local(ids).logits).abs().max())
    result["snapshot"] = str(remote.checkpoint.directory)
except TapError as exc:
    result["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(result))
"""


def _run_client(hub: LocalHub, tmp_path: Path, mode: str, directory: Path, repo_id: str, token: str = TOKEN) -> dict:
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_TOKEN": token,
        "HF_HOME": str(tmp_path / "hf-home"),  # an empty cache
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    done = subprocess.run([sys.executable, "-c", CLIENT, mode, str(directory), repo_id], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture
def checkpoint(converted_factory) -> Path:
    return converted_factory("llama")


def test_push_then_load_from_an_empty_cache_gives_the_same_logits(tmp_path, checkpoint):
    before = _digests(checkpoint)
    with LocalHub(tmp_path / "hub") as hub:
        result = _run_client(hub, tmp_path, "push", checkpoint, "tap-org/tiny-llama")
        requests = list(hub.state.requests)
        stored = hub.state.repos["tap-org/tiny-llama"].files
    assert "error" not in result, result
    assert result["max_abs_diff"] == 0.0
    assert result["snapshot"].startswith(str(tmp_path / "hf-home"))
    assert any(r.endswith(".git/info/lfs/objects/batch") for r in requests)  # shards went the LFS way
    assert any(r.startswith("PUT /lfs-upload/") for r in requests)
    assert any("/commit/main" in r for r in requests)
    assert set(stored) == set(before)
    assert all(info["lfs"] == name.endswith(".safetensors") for name, info in stored.items())
    assert _digests(checkpoint) == before


def test_bad_token_is_a_clear_error_and_the_checkpoint_is_untouched(tmp_path, checkpoint):
    before = _digests(checkpoint)
    with LocalHub(tmp_path / "hub") as hub:
        result = _run_client(hub, tmp_path, "push", checkpoint, "tap-org/tiny-llama", token="hf_wrong")
    assert "HubError" in result["error"] and "(401)" in result["error"] and "token" in result["error"]
    assert "local checkpoint is unchanged" in result["error"]
    assert _digests(checkpoint) == before


def test_loading_a_missing_repo_names_it(tmp_path, checkpoint):
    with LocalHub(tmp_path / "hub") as hub:
        result = _run_client(hub, tmp_path, "load-only", checkpoint, "tap-org/does-not-exist")
    assert "CheckpointNotFoundError" in result["error"] and "tap-org/does-not-exist" in result["error"]


def test_a_dropped_upload_is_retried_and_a_persistent_one_fails_cleanly(tmp_path, checkpoint):
    before = _digests(checkpoint)
    with LocalHub(tmp_path / "hub") as hub:
        hub.state.drop_uploads = 1  # the first LFS PUT loses its connection half way
        recovered = _run_client(hub, tmp_path, "no-wait", checkpoint, "tap-org/retried")
    with LocalHub(tmp_path / "hub2") as hub:  # a fresh store: the shards must be uploaded again
        hub.state.drop_uploads = 10**6  # every attempt is dropped
        failed = _run_client(hub, tmp_path / "again", "no-wait", checkpoint, "tap-org/dropped")
        assert not hub.state.repos["tap-org/dropped"].files  # no commit happened
    assert "error" not in recovered and recovered["max_abs_diff"] == 0.0
    assert "HubError" in failed["error"] and "local checkpoint is unchanged" in failed["error"]
    assert _digests(checkpoint) == before


def test_model_card_yaml_and_measured_quality_section(tmp_path, tiny_model_factory, calibration_text_file):
    from tap_convert import ConvertOptions, convert
    from tap_convert.hub import write_measured_quality
    from tap_runtime.checkpoint import read_checkpoint

    out = tmp_path / "ckpt"
    options = ConvertOptions(calib=str(calibration_text_file), group_size=32, num_samples=4, seq_len=64,
                             router_samples=2, progress=False, base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    convert(str(tiny_model_factory("llama")), out, options)
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    for line in ("base_model: HuggingFaceTB/SmolLM2-135M-Instruct", "base_model_relation: quantized",
                 "library_name: transformers", "pipeline_tag: text-generation", "- tap", "- tier-4", "- tier-8"):
        assert line in front
    for _ in range(2):  # a second write replaces the first
        write_measured_quality(out, "| fp32 | 1.0000 | 0.0000 | 1.000 | - | 32.00 |", "python scripts/bench_quality.py ...", "test machine", "held-out text")
    card = (out / "README.md").read_text()
    assert card.count("## Measured quality") == 1 and "python scripts/bench_quality.py" in card
    read_checkpoint(out, verify=True)  # the card is not checksummed: the checkpoint still verifies
