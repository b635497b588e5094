"""Shared fixtures: tiny randomly initialised models saved to disk, a tiny tokenizer, devices.

Models are built from transformers configs and saved with ``save_pretrained`` so every test
goes through the real ``from_pretrained`` path. Nothing touches the network.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's CPU interpreter for the Triton kernels' tests (tests/tap_runtime/test_kernels_gated.py,
    # test_kernels_route.py): it must be on before anything imports Triton, which builds its
    # language library for the interpreter or for GPUs at that moment. Inert without Triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB_SIZE = 320
TINY_CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "gemma3_text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=16),
}


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (real models)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request) -> torch.device:
    """Always CPU; CUDA too when present (as optimum-quanto's tests do)."""
    return torch.device(request.param)


def _training_text() -> str:
    from calibration.data import load_calibration_text

    return "\n\n".join(load_calibration_text("c4").documents[:200])


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer with 320 ids, trained on bundled text (seconds, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_training_text()], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(str(path))
    return path


def build_tiny_model(model_type: str, directory: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Save a randomly initialised ``model_type`` model plus the tiny tokenizer to ``directory``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB_SIZE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIGS.get(model_type, {}),
    )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, tiny_tokenizer_dir):
    """Build (once per session) a tiny saved model of a given model_type."""
    cache: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in cache:
            cache[model_type] = build_tiny_model(model_type, tmp_path_factory.mktemp(f"tiny-{model_type}"), tiny_tokenizer_dir)
        return cache[model_type]

    return make


@pytest.fixture(scope="session")
def calibration_text_file(tmp_path_factory) -> Path:
    """A small .txt calibration file (enough for a few windows of 64 tokens)."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(_training_text()[:60_000], encoding="utf-8")
    return path


FAST_CONVERT = dict(num_samples=8, seq_len=64, router_samples=4, batch_size=4, progress=False)


@pytest.fixture(scope="session")
def converted_factory(tmp_path_factory, tiny_model_factory, calibration_text_file):
    """Convert (once per session) a tiny model of a given type, tier set and group size; returns
    its dir. Group size 32 takes torch's CPU kernel; 64 takes TAP's VNNI kernel where it exists."""
    from tap_convert import ConvertOptions, convert

    cache: dict[tuple, Path] = {}

    def make(model_type: str, tiers: tuple[int, ...] = (4, 8), group_size: int = 32, router_target: str | None = None) -> Path:
        key = (model_type, tiers, group_size, router_target)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tap-{model_type}-{'-'.join(map(str, tiers))}-g{group_size}-{router_target}") / "ckpt"
            target = {} if router_target is None else {"router_target": router_target}
            options = ConvertOptions(calib=str(calibration_text_file), tiers=tiers, group_size=group_size, **target, **FAST_CONVERT)
            convert(str(tiny_model_factory(model_type)), out, options)
            cache[key] = out
        return cache[key]

    return make


def decisive_new_tokens(tap, ids: torch.Tensor, limit: int, relative_gap: float = 1e-4) -> int:
    """How many greedy tokens (at most ``limit``) come before the first near-tie of the eager path.

    Tiny random models sometimes put two tokens within float noise of each other (a top-2 logit
    gap of 1e-6); two correct decode paths may then pick differently. Tests that compare paths
    token by token stop before such a step, so they compare decisions, not rounding.
    """
    tap.router.begin_sequence()
    with torch.inference_mode():
        out = tap.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=limit, min_new_tokens=limit, do_sample=False,
            pad_token_id=tap.tokenizer.pad_token_id, output_scores=True, return_dict_in_generate=True,
        )
    for step, scores in enumerate(out.scores):
        top = scores[0].float().topk(2).values
        if float(top[0] - top[1]) <= relative_gap * float(top[0].abs().clamp_min(1e-6)):
            return step
    return limit



# Prompts for tests that compare decode paths token by token, tried in order (see decisive_prompt).
DECISIVE_PROMPTS = (
    "The river flows past the old mill and",
    "Under the bridge the water was cold, and the children",
    "At noon the market opened its doors to",
)


def decisive_prompt(tap, limit: int = 24, minimum: int = 16) -> tuple[torch.Tensor, int]:
    """The first of DECISIVE_PROMPTS whose greedy continuation has at least ``minimum`` decisive
    tokens (up to ``limit``), as (ids, decisive token count). A tiny random model's first token can
    be a near-tie (a top-2 gap within 1e-4 of the logit) in every kernel path, the float32
    reference included; then another prompt gives the comparison something to compare. Fails
    the test if none does."""
    counts = []
    for prompt in DECISIVE_PROMPTS:
        ids = tap.encode(prompt)
        count = decisive_new_tokens(tap, ids, limit)
        if count >= minimum:
            return ids, count
        counts.append(count)
    raise AssertionError(f"no prompt gives {minimum} decisive greedy tokens (got {counts} of {limit})")