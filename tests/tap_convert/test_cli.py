"""The tap-convert command end to end on a tiny model, with the bundled calibration text."""

import json

import pytest

import tap_runtime
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
    with pytest.raises(SystemExit):
        build_parser().parse_args(["model", "--out", "o", "--tiers", "four"])
