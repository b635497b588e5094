"""TAPEngine, the seed's API: config validation, levels -> tiers, quantile thresholds, metrics keys."""

import pytest
import torch

from calibration.data import load_calibration_text
from tap_runtime import PrecisionMode, TAPConfig, TAPEngine
from tap_runtime.errors import InvalidConfigError


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(precision_levels=[4, 8, 16, 32], precision_thresholds=[0.5, 0.75]), "has 2 values for 4 levels; expected 3"),
        (dict(precision_levels=[8, 4]), "ascending distinct"),
        (dict(precision_levels=[4, 6]), "ascending distinct"),
        (dict(precision_levels=[4, 8], precision_thresholds=[1.5]), r"quantiles in \(0, 1\)"),
        (dict(precision_thresholds=[0.5]), "need precision_levels"),
        (dict(precision_mode=PrecisionMode.FIXED), "needs fixed_level"),
        (dict(memory_efficient_mode=True, device="cuda"), "on the CPU"),
        (dict(offload_to_cpu=True), "is not a GPU"),
    ],
)
def test_invalid_configs_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(InvalidConfigError, match=message):
        TAPEngine(TAPConfig(**kwargs))


def test_seed_example_on_a_checkpoint(converted_factory):
    config = TAPConfig(precision_mode=PrecisionMode.ADAPTIVE, precision_levels=[4, 8, 16, 32],
                       precision_thresholds=[0.25, 0.5, 0.75], memory_efficient_mode=False, offload_to_cpu=False)
    engine = TAPEngine(config=config)
    engine.load_model(str(converted_factory("llama")))
    assert engine.level_to_tier == {4: 4, 8: 8, 16: 8, 32: 8}  # a 4/8 checkpoint stores no 16/32
    prompt = load_calibration_text("c4").documents[0][:400]
    text, metrics = engine.generate(prompt=prompt, max_new_tokens=12, min_new_tokens=12)
    assert isinstance(text, str)
    precision, memory, timing = metrics["precision"], metrics["memory"], metrics["timing"]
    # Tier 8 starts at each layer's 25th percentile of the calibration scores...
    expected = engine.model.table.router.thresholds_for_quantiles([0.25])
    assert torch.allclose(engine.model.router.thresholds, torch.tensor(expected))
    assert precision["tier_share"][8] > 0
    # ...and a higher quantile sends fewer tokens up (the shares themselves depend on the text).
    strict = TAPEngine(TAPConfig(precision_levels=[4, 8], precision_thresholds=[0.9]))
    strict.load_model(str(converted_factory("llama")))
    _, strict_metrics = strict.generate(prompt=prompt, max_new_tokens=12, min_new_tokens=12)
    assert strict_metrics["precision"]["tier_share"][8] < precision["tier_share"][8]
    assert 4.5 < precision["avg_weight_bits_per_token"] < 8.75
    assert 0 < precision["energy_saved_pct"] < 50 and precision["energy_method"] == "estimated"
    assert "Horowitz" in precision["energy_source"] and precision["energy_joules"] > 0
    assert precision["energy_joules_method"] in ("estimated", "measured-rapl", "measured-nvml")
    assert memory["checkpoint_bytes"] > 0 and 0 < memory["bytes_vs_fp16"] < 1 and memory["peak_rss_bytes"] > 0
    assert timing["new_tokens"] == 12 and timing["tokens_per_second"] > 0


def test_modes_fixed_and_highest(converted_factory):
    directory = str(converted_factory("qwen2"))
    fixed = TAPEngine(TAPConfig(precision_mode=PrecisionMode.FIXED, fixed_level=4))
    fixed.load_model(directory)
    _, metrics = fixed.generate("Once upon", max_new_tokens=4, min_new_tokens=4)
    assert metrics["precision"]["tier_share"] == {4: 1.0, 8: 0.0}
    assert metrics["precision"]["energy_saved_pct"] > 20
    highest = TAPEngine(TAPConfig(precision_mode=PrecisionMode.HIGHEST))
    highest.load_model(directory)
    _, metrics = highest.generate("Once upon", max_new_tokens=4, min_new_tokens=4)
    assert metrics["precision"]["tier_share"][8] == 1.0 and metrics["precision"]["energy_saved_pct"] == pytest.approx(0.0)


def test_a_plain_model_is_converted_in_memory(tiny_model_factory, calibration_text_file, capsys):
    engine = TAPEngine(TAPConfig(calib=str(calibration_text_file), calib_samples=4, calib_seq_len=64))
    engine.load_model(str(tiny_model_factory("llama")))
    assert engine.converted_in_memory and "converting it in memory" in capsys.readouterr().out
    text, metrics = engine.generate("Hello", max_new_tokens=3, min_new_tokens=3)
    assert metrics["timing"]["new_tokens"] == 3
    assert not engine.model.checkpoint.directory.exists()  # the temporary checkpoint is gone


def test_memory_efficient_mode_reads_residual_planes_on_demand(converted_factory):
    directory = str(converted_factory("llama"))
    plain = TAPEngine(TAPConfig(precision_levels=[4, 8], precision_thresholds=[0.5]))
    plain.load_model(directory)
    lean = TAPEngine(TAPConfig(precision_levels=[4, 8], precision_thresholds=[0.5], memory_efficient_mode=True))
    lean.load_model(directory)
    cache = lean.model.model.tap_residual_cache
    assert cache is not None and cache.resident_bytes == 0  # nothing above the base tier packed yet
    expected, _ = plain.generate("Once upon a time", max_new_tokens=8, min_new_tokens=8)
    text, metrics = lean.generate("Once upon a time", max_new_tokens=8, min_new_tokens=8)
    assert text == expected
    assert metrics["precision"]["tier_share"][8] > 0 and cache.packs > 0


def test_memory_efficient_mode_on_an_in_memory_conversion(tiny_model_factory):
    engine = TAPEngine(TAPConfig(memory_efficient_mode=True, calib_samples=4, calib_seq_len=64, calib="c4",
                                 precision_levels=[4, 8], precision_thresholds=[0.5]))
    engine.load_model(str(tiny_model_factory("qwen2")))
    text, metrics = engine.generate("Once upon a time", max_new_tokens=6, min_new_tokens=6)
    assert metrics["precision"]["tier_share"][8] > 0  # residual planes were read from the kept files
