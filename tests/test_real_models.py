"""Real models from scripts/fetch_models.py: convert and check the format targets (slow).

Run with ``python -m pytest --run-slow tests/test_real_models.py`` after
``python scripts/fetch_models.py smollm2 gemma3``. Speed targets live in scripts/bench_speed.py.
"""

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tap_runtime
from tap_convert import ConvertOptions, convert

MODELS = Path(__file__).resolve().parents[1] / "models"
pytestmark = pytest.mark.slow


def _perplexity(forward, windows) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for window in windows:
            logits = forward(window.unsqueeze(0)).logits[0, :-1].float()
            nll -= torch.log_softmax(logits, -1).gather(-1, window[1:, None]).sum().item()
            count += window.numel() - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_model_converts_to_half_size_and_tier8_keeps_quality(name, tmp_path):
    source = MODELS / name
    if not (source / "config.json").exists():
        pytest.skip(f"{source} missing: python scripts/fetch_models.py {name}")
    table = convert(str(source), tmp_path / "tap", ConvertOptions(num_samples=16, router_samples=8, progress=False))
    size = sum(s.num_bytes for s in table.shards)
    assert size <= 0.52 * table.calibration.extra["fp16_bytes"]  # the target for tiers 4/8
    tap = tap_runtime.load(tmp_path / "tap")
    text = tap.generate("The capital of France is", max_new_tokens=8)
    assert text.metrics.new_tokens > 0
    reference = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    text_ids = tap.tokenizer("\n".join(["The history of the city begins in the Roman era."] * 40), add_special_tokens=False)
    windows = torch.tensor(text_ids["input_ids"][: 2 * 127]).view(2, 127)
    if table.calibration.extra["bos_prepended"]:  # Gemma: every window starts with BOS
        windows = torch.cat([torch.full((2, 1), tap.tokenizer.bos_token_id), windows], dim=1)
    tap.set_routing("fixed", tier=8)
    assert _perplexity(tap, windows) <= 1.01 * _perplexity(reference, windows)
