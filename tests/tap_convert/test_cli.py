"""The tap-convert command end to end on a tiny model, with the bundled calibration text."""

import json

import pytest

import tap_runtime
from tap_convert import ConvertOptions
from tap_convert.cli import build_parser, main
from tap_runtime.format import ROUTING_FILE


def test_convert_with_bundled_wikitext_then_load_and_generate(tiny_model_factory, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "tiny-tap"
    code = main([str(tiny_model_factory("llama")), "--calib", "wikitext", "--out", str(out), "--num-samples", "6",
                 "--seq-len", "64", "--router-samples", "4", "--group-size", "32", "--no-progress"])
    assert code == 0
    assert f"wrote {out}" in capsys.readouterr().out
    table = json.loads((out / ROUTING_FILE).read_text())
    assert table["calibration"]["source"].startswith("bundled:wikitext2_calibration.txt.gz")
    assert table["calibration"]["num_samples"] == 6 and table["calibration"]["seq_len"] == 64
    result = tap_runtime.load(out).generate("Hello", max_new_tokens=4)
    assert len(result.token_ids) <= 4


def test_existing_output_is_a_clean_error(tiny_model_factory, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert main([str(tiny_model_factory("llama")), "--out", str(out)]) == 1
    assert "already exists; expected a new directory. Pass --overwrite" in capsys.readouterr().err


def test_unsupported_tiers_are_a_clean_error(tiny_model_factory, tmp_path, capsys):
    assert main([str(tiny_model_factory("llama")), "--out", str(tmp_path / "x"), "--tiers", "4,16"]) == 1
    assert "--tiers 4,16 is not supported; expected one of ['4,8', '4,8,16']" in capsys.readouterr().err


def test_parser_defaults_are_the_documented_ones():
    args = build_parser().parse_args(["model", "--out", "o"])
    assert (args.calib, args.tiers, args.num_samples, args.seq_len, args.high_precision_share) == (
        "wikitext", (4, 8), 128, 512, 0.1
    )
    assert not args.no_sink_weighting
    assert build_parser().parse_args(["model", "--out", "o", "--no-sink-weighting"]).no_sink_weighting
    assert not args.no_column_scales
    assert build_parser().parse_args(["model", "--out", "o", "--no-column-scales"]).no_column_scales
    assert args.gptq_order == "activation"
    assert build_parser().parse_args(["model", "--out", "o", "--gptq-order", "column"]).gptq_order == "column"
    assert args.gptq_damping == ConvertOptions().gptq_damping
    assert build_parser().parse_args(["model", "--out", "o", "--gptq-damping", "0.1"]).gptq_damping == 0.1
    assert args.gptq_refit_rounds == ConvertOptions().gptq_refit_rounds
    assert build_parser().parse_args(["model", "--out", "o", "--gptq-refit-rounds", "2"]).gptq_refit_rounds == 2
    assert args.gptq_descent_sweeps == ConvertOptions().gptq_descent_sweeps
    assert build_parser().parse_args(["model", "--out", "o", "--gptq-descent-sweeps", "3"]).gptq_descent_sweeps == 3
    assert args.gptq_wide_layers is ConvertOptions().gptq_wide_layers is True
    assert build_parser().parse_args(["model", "--out", "o", "--no-gptq-wide-layers"]).gptq_wide_layers is False
    assert args.gptq_wide_damping == ConvertOptions().gptq_wide_damping == 1.0
    assert build_parser().parse_args(["model", "--out", "o", "--gptq-wide-damping", "0.1"]).gptq_wide_damping == 0.1
    assert args.head_damping == ConvertOptions().head_damping
    assert build_parser().parse_args(["model", "--out", "o", "--head-damping", "0.3"]).head_damping == 0.3
    assert args.rotation == "hadamard"
    assert build_parser().parse_args(["model", "--out", "o", "--rotation", "none"]).rotation == "none"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["model", "--out", "o", "--rotation", "random"])
    assert args.scale_bits == 8
    assert build_parser().parse_args(["model", "--out", "o", "--scale-bits", "16"]).scale_bits == 16
    assert args.base_levels == "fitted"
    assert build_parser().parse_args(["model", "--out", "o", "--base-levels", "even"]).base_levels == "even"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["model", "--out", "o", "--tiers", "four"])


def test_inspect_reports_and_verifies(converted_factory, capsys):
    from tap_convert.cli import main

    directory = converted_factory("llama")
    assert main(["inspect", str(directory)]) == 0
    report = capsys.readouterr().out
    assert "all files verified" in report and "tiers [4, 8]" in report
    assert "model.layers.1.mlp.down_proj" in report and "signal loss_gradient" in report
    assert "calibration:" in report and "GPTQ column order: activation" in report
    assert "group scales: 8-bit log codes under a float32 reference per plane" in report
    assert "input rotation (hadamard): 14 of 14 linears, Hadamard blocks of 64" in report and " H64 " in report
    # A fresh model's norms are ones, exact in float16.
    assert "kept unquantized (norms, biases, ...): " in report and " in float16" in report
    assert "base-plane scheme with the lowest measured error" in report and "down_proj" in report


def test_inspect_flags_a_corrupt_shard(converted_factory, tmp_path, capsys):
    import shutil

    from tap_convert.cli import main

    copy = tmp_path / "ckpt"
    shutil.copytree(converted_factory("llama"), copy)
    shard = next(copy.glob("model-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["inspect", str(copy)]) == 2
    out = capsys.readouterr().out
    assert "sha256 mismatch" in out and "SOME FILES FAILED VERIFICATION" in out


def test_inspect_plot_draws_the_precision_map(converted_factory, tmp_path):
    pytest.importorskip("matplotlib")
    from tap_convert.cli import main

    out = tmp_path / "map.png"
    assert main(["inspect", str(converted_factory("qwen2")), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_measure_quality_writes_the_card_section(tiny_model_factory, calibration_text_file, tmp_path, capsys):
    from tap_convert.cli import main

    out = tmp_path / "ckpt"
    argv = [str(tiny_model_factory("llama")), "--calib", "c4", "--out", str(out), "--num-samples", "4", "--seq-len", "64",
            "--router-samples", "2", "--group-size", "32", "--no-progress", "--measure-quality"]
    assert main(argv) == 0
    card = (out / "README.md").read_text()
    assert "## Measured quality" in card and "bundled wikitext sample" in card and "| learned routing |" in card
    assert "tap-convert " in card and "KL" in capsys.readouterr().out


def test_quality_is_measured_on_the_bundled_corpus_the_calibration_left_out():
    """--measure-quality reads the other bundled corpus; a mix that read both has none left,
    and says so rather than measuring on calibration text."""
    from tap_convert.measure import _other_corpus
    from tap_runtime.errors import InvalidConfigError

    assert _other_corpus("wikitext") == "c4" and _other_corpus("c4") == "wikitext"
    assert _other_corpus("wikitext+notes.txt") == "c4"
    with pytest.raises(InvalidConfigError, match="every bundled corpus"):
        _other_corpus("wikitext+c4")
