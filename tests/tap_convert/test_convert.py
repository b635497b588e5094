import importlib
import json
import re
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from tap_convert import ConvertOptions, convert
from tap_convert.convert import choose_group_size
from tap_runtime.checkpoint import file_sha256
from tap_runtime.errors import CalibrationDataError, InvalidConfigError, UnsupportedArchitectureError
from tap_runtime.format import (
    FORMAT_VERSION,
    ROUTER_TENSORS_FILE,
    ROUTER_TOKEN_LOG_FREQUENCY_CODES,
    ROUTER_TOKEN_LOG_FREQUENCY_PALETTE,
    ROUTING_FILE,
    RoutingTable,
    embedding_tensor_name,
    plane_tensor_name,
)

from ..conftest import FAST_CONVERT


def test_routing_table_records_policy_router_provenance_and_checksums(converted_factory):
    directory = converted_factory("llama")
    table = RoutingTable.from_json(directory / ROUTING_FILE)
    assert table.tiers == (4, 8) and table.high_precision_share == 0.1
    assert len(table.linear) == 2 * 7  # q, k, v, o, gate, up, down in each of two layers
    policy = table.linear["model.layers.1.mlp.down_proj"]
    assert policy.layer_index == 1 and [p.symmetric for p in policy.planes] == [False, True]
    assert table.embeddings["lm_head"].tied_to == "model.embed_tokens"
    # A fresh model's norms are ones: float16 holds them exactly, so that is how they are kept.
    assert "model.norm.weight" in table.kept and table.kept["model.norm.weight"].tier == 16
    # The default target (kl_impact) adds the sensitivity probe to the runtime signals.
    assert table.router.signals == ("hidden_norm", "position", "token_frequency", "error_estimate", "sensitivity")
    # Format 4: each layer's sketch is q/k/v's next planes, derived at load, not stored.
    assert table.router.error_sketch_sites == tuple(
        tuple(f"model.layers.{i}.self_attn.{n}_proj" for n in "qkv") for i in range(2)
    )
    with safe_open(str(directory / ROUTER_TENSORS_FILE), framework="pt") as handle:
        assert set(handle.keys()) == {
            ROUTER_TOKEN_LOG_FREQUENCY_CODES, ROUTER_TOKEN_LOG_FREQUENCY_PALETTE, "sensitivity_probe.0", "sensitivity_probe.1",
        }
    assert set(table.router.fit["single_signal_auc"]) == {
        "hidden_norm", "attention_received", "position", "token_frequency", "predictive_entropy", "error_estimate",
        "sensitivity", "loss_gradient",
    }
    assert len(table.router.thresholds) == 2
    assert table.calibration.seed == 0 and table.calibration.seconds > 0
    for shard in table.shards:
        assert file_sha256(directory / shard.file_name) == shard.sha256
    config = json.loads((directory / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "tap"


def test_gpt2_conv1d_layers_are_quantized_with_their_layout(converted_factory):
    table = RoutingTable.from_json(converted_factory("gpt2") / ROUTING_FILE)
    c_attn = table.linear["transformer.h.0.attn.c_attn"]
    assert c_attn.weight_layout == "conv1d" and (c_attn.in_features, c_attn.out_features) == (64, 192)
    assert c_attn.bias


def test_key_and_value_projections_weight_the_first_token(converted_factory, tiny_model_factory, calibration_text_file, tmp_path):
    table = RoutingTable.from_json(converted_factory("llama") / ROUTING_FILE)
    assert table.calibration.extra["sink_weight"] == 64  # the calibration window length
    for kind in ("k_proj", "v_proj"):
        assert "first token weighted x64" in table.linear[f"model.layers.0.self_attn.{kind}"].reason
    for kind in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        assert "first token" not in table.linear[f"model.layers.0.{kind}"].reason
    gpt2 = RoutingTable.from_json(converted_factory("gpt2") / ROUTING_FILE)
    assert "first token weighted" in gpt2.linear["transformer.h.0.attn.c_attn"].reason
    # Switched off (the ablation), nothing is weighted and the key planes differ.
    options = ConvertOptions(calib=str(calibration_text_file), sink_weighting=False, **FAST_CONVERT)
    off = convert(str(tiny_model_factory("llama")), tmp_path / "off", options)
    assert off.calibration.extra["sink_weight"] is None
    assert not any("first token" in p.reason for p in off.linear.values())


def test_layers_too_wide_for_pass_one_get_gptq_from_layer_by_layer_hessians(
    converted_factory, tiny_model_factory, calibration_text_file, tmp_path, monkeypatch
):
    """With the width limit at 64, the down projections (128 inputs) have only a diagonal after
    pass 1; with --gptq-wide-layers (the default) their Hessians, gathered a layer at a time, give
    the very planes of a run whose pass 1 held them all, at the same damping."""
    convert_module = importlib.import_module("tap_convert.convert")  # the package exports a function of that name

    default_dir = converted_factory("llama")
    default = RoutingTable.from_json(default_dir / ROUTING_FILE)
    monkeypatch.setattr(convert_module, "MAX_HESSIAN_FEATURES", 64)
    options = ConvertOptions(calib=str(calibration_text_file), tiers=(4, 8), group_size=32, **FAST_CONVERT)
    assert options.gptq_wide_layers is True and options.gptq_wide_damping == 1.0
    # Off: the wide layers are rounded to nearest.
    plain = convert(str(tiny_model_factory("llama")), tmp_path / "plain", replace(options, gptq_wide_layers=False))
    assert plain.calibration.extra["gptq_wide_layers"] is False
    assert plain.calibration.extra["gptq_wide_damping"] is None
    assert {n: p.method for n, p in plain.linear.items()} == {n: "rtn" if n.endswith("down_proj") else "gptq" for n in plain.linear}
    # On, at the other layers' damping: the planes of the run that held every Hessian in pass 1.
    wide = convert(str(tiny_model_factory("llama")), tmp_path / "wide", replace(options, gptq_wide_damping=None))
    assert wide.calibration.extra["gptq_wide_layers"] is True
    assert list(wide.linear) == list(default.linear)
    assert all(policy.method == "gptq" for policy in wide.linear.values())
    for name, policy in wide.linear.items():
        assert ("Hessian gathered layer by layer (128 > 64 inputs)" in policy.reason) == name.endswith("down_proj"), name
    assert [shard.file_name for shard in wide.shards] == [shard.file_name for shard in default.shards]
    for shard in default.shards:
        with safe_open(str(default_dir / shard.file_name), "pt") as before, safe_open(
            str(tmp_path / "wide" / shard.file_name), "pt"
        ) as after:
            assert sorted(after.keys()) == sorted(before.keys())
            for name in before.keys():
                assert torch.equal(before.get_tensor(name), after.get_tensor(name)), name
    # The default wide damping (1.0) changes their planes, and only theirs.
    damped = convert(str(tiny_model_factory("llama")), tmp_path / "damped", options)
    assert damped.calibration.extra["gptq_wide_damping"] == 1.0 and wide.calibration.extra["gptq_wide_damping"] is None
    with safe_open(str(tmp_path / "wide" / wide.shards[0].file_name), "pt") as light, safe_open(
        str(tmp_path / "damped" / damped.shards[0].file_name), "pt"
    ) as heavy:
        for name in wide.linear:
            codes = plane_tensor_name(name, 0, "qweight")
            assert torch.equal(light.get_tensor(codes), heavy.get_tensor(codes)) != name.endswith("down_proj"), name
    with pytest.raises(InvalidConfigError, match=r"--gptq-wide-damping must be in \(0, 100\]"):
        ConvertOptions(gptq_wide_damping=0.0).validate()


def test_gptq_order_is_recorded_and_validated(converted_factory, tiny_model_factory, calibration_text_file, tmp_path):
    default = RoutingTable.from_json(converted_factory("llama") / ROUTING_FILE)
    assert default.calibration.extra["gptq_order"] == "activation"
    options = ConvertOptions(calib=str(calibration_text_file), gptq_order="column", **FAST_CONVERT)
    column = convert(str(tiny_model_factory("llama")), tmp_path / "column", options)
    assert column.calibration.extra["gptq_order"] == "column"
    with pytest.raises(InvalidConfigError, match=r"--gptq-order 'random' is unknown; expected one of \['activation', 'column'\]"):
        ConvertOptions(gptq_order="random").validate()


def test_gptq_damping_is_recorded_used_and_validated(converted_factory, tiny_model_factory, calibration_text_file, tmp_path):
    from tap_convert.gptq import DAMPING, ROW_DAMPING

    default_dir = converted_factory("llama")
    default = RoutingTable.from_json(default_dir / ROUTING_FILE)
    assert (default.calibration.extra["gptq_damping"], default.calibration.extra["head_damping"]) == (DAMPING, ROW_DAMPING)
    options = ConvertOptions(calib=str(calibration_text_file), gptq_damping=1.0, head_damping=3.0, **FAST_CONVERT)
    heavy = convert(str(tiny_model_factory("llama")), tmp_path / "heavy", options)
    assert (heavy.calibration.extra["gptq_damping"], heavy.calibration.extra["head_damping"]) == (1.0, 3.0)
    plane_codes = plane_tensor_name(next(iter(heavy.linear)), 0, "qweight")
    head_codes = embedding_tensor_name(next(name for name, p in heavy.embeddings.items() if p.method == "gptq"), "qweight")
    with safe_open(str(default_dir / default.shards[0].file_name), "pt") as light_file, safe_open(
        str(tmp_path / "heavy" / heavy.shards[0].file_name), "pt"
    ) as heavy_file:
        for codes in (plane_codes, head_codes):
            assert not torch.equal(light_file.get_tensor(codes), heavy_file.get_tensor(codes)), codes
    for flag in ("gptq_damping", "head_damping"):
        for bad in (0.0, -0.5):
            with pytest.raises(InvalidConfigError, match=rf"--{flag.replace('_', '-')} must be in \(0, 100\]"):
                ConvertOptions(**{flag: bad}).validate()


def test_gptq_refit_and_descent_are_recorded_used_and_validated(converted_factory, tiny_model_factory, calibration_text_file, tmp_path):
    default_dir = converted_factory("llama")
    default = RoutingTable.from_json(default_dir / ROUTING_FILE)
    defaults = ConvertOptions()
    assert default.calibration.extra["gptq_refit_rounds"] == defaults.gptq_refit_rounds
    assert default.calibration.extra["gptq_descent_sweeps"] == defaults.gptq_descent_sweeps
    rounds, sweeps = defaults.gptq_refit_rounds + 1, defaults.gptq_descent_sweeps + 1
    options = ConvertOptions(calib=str(calibration_text_file), gptq_refit_rounds=rounds, gptq_descent_sweeps=sweeps, **FAST_CONVERT)
    refitted = convert(str(tiny_model_factory("llama")), tmp_path / "refit", options)
    assert (refitted.calibration.extra["gptq_refit_rounds"], refitted.calibration.extra["gptq_descent_sweeps"]) == (rounds, sweeps)
    card = (tmp_path / "refit" / "README.md").read_text()
    assert "group scales refitted to its codes" in card and "of coordinate descent over the codes" in card
    scales = plane_tensor_name(next(iter(refitted.linear)), 0, "scales")
    with safe_open(str(default_dir / default.shards[0].file_name), "pt") as default_file, safe_open(
        str(tmp_path / "refit" / refitted.shards[0].file_name), "pt"
    ) as refit_file:
        assert not torch.equal(default_file.get_tensor(scales), refit_file.get_tensor(scales))
    for flag in ("gptq_refit_rounds", "gptq_descent_sweeps"):
        for bad in (-1, 9):
            with pytest.raises(InvalidConfigError, match=rf"--{flag.replace('_', '-')} must be between 0 and 8"):
                ConvertOptions(**{flag: bad}).validate()


def _stored_weight(directory, table, name: str, count: int) -> torch.Tensor:
    """The weight (out, in) a token reading ``count`` planes of linear ``name`` multiplies its input by."""
    from tap_runtime.planes import Plane, dequantize_linear

    policy = table.linear[name]
    shard = next(s for s in table.shards if s.file_name)  # tiny models fit one shard
    with safe_open(str(directory / shard.file_name), "pt") as handle:
        planes = [
            Plane.from_stored(spec, {f: handle.get_tensor(plane_tensor_name(name, i, f)) for f in spec.fields})
            for i, spec in enumerate(policy.planes)
        ]
    return dequantize_linear(planes, policy, count)


def test_input_rotation_is_recorded_used_and_can_be_turned_off(converted_factory, tiny_model_factory, calibration_text_file, tmp_path):
    """By default every linear stores W H (its input's block Hadamard rotation); rotation="none"
    stores W. Both give the source weights back, to their planes' rounding."""
    import tap_runtime
    from tap_runtime.rotation import rotation_block

    source_dir = tiny_model_factory("llama")
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    weights = {n: m.weight.detach() for n, m in source.named_modules() if isinstance(m, torch.nn.Linear)}
    rotated_dir = converted_factory("llama")
    rotated = RoutingTable.from_json(rotated_dir / ROUTING_FILE)
    assert rotated.calibration.extra["rotation"] == "hadamard"
    assert all(p.input_rotation == rotation_block(p.in_features) > 0 for p in rotated.linear.values())
    plain = convert(str(source_dir), tmp_path / "plain", ConvertOptions(calib=str(calibration_text_file), rotation="none", **FAST_CONVERT))
    assert plain.calibration.extra["rotation"] == "none" and all(p.input_rotation == 0 for p in plain.linear.values())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        for directory, table in ((rotated_dir, rotated), (tmp_path / "plain", plain)):
            for count, bound in ((1, 0.2), (2, 0.02)):
                stored = _stored_weight(directory, table, name, count)
                error = float((stored - weights[name]).norm() / weights[name].norm())
                assert error < bound, (name, table.calibration.extra["rotation"], count, error)
        with safe_open(str(rotated_dir / rotated.shards[0].file_name), "pt") as a, safe_open(
            str(tmp_path / "plain" / plain.shards[0].file_name), "pt"
        ) as b:
            assert not torch.equal(a.get_tensor(plane_tensor_name(name, 0, "qweight")), b.get_tensor(plane_tensor_name(name, 0, "qweight")))
    ids = torch.tensor([[1, 5, 9, 2, 7, 11, 3]])
    with torch.no_grad():
        reference = source(ids).logits
        for directory in (rotated_dir, tmp_path / "plain"):
            tap = tap_runtime.load(directory)
            tap.set_routing("fixed", tier=8)
            logits = tap(ids).logits
            assert float((logits - reference).norm() / reference.norm()) < 0.05, directory
    with pytest.raises(InvalidConfigError, match="--rotation 'givens' is unknown"):
        ConvertOptions(rotation="givens").validate()


def test_scale_storage_is_recorded_validated_and_read_back(converted_factory, tiny_model_factory, calibration_text_file, tmp_path):
    """Format 3 stores group scales as uint8 codes with one float32 reference per plane; float16
    scales stay available (``scale_bits=16``) and load to the same kind of model."""
    import tap_runtime

    directory = converted_factory("llama")
    table = RoutingTable.from_json(directory / ROUTING_FILE)
    assert {spec.scale_bits for p in table.linear.values() for spec in p.planes} == {8}
    name = "model.layers.0.mlp.up_proj"
    with safe_open(str(directory / table.shards[0].file_name), "pt") as shard:
        assert shard.get_tensor(f"{name}.weight_scales").dtype == torch.uint8
        assert shard.get_tensor(f"{name}.residual1_scales").dtype == torch.uint8
        assert shard.get_tensor(f"{name}.weight_scale_reference").dtype == torch.float32
    options = ConvertOptions(calib=str(calibration_text_file), scale_bits=16, **FAST_CONVERT)
    wide = convert(str(tiny_model_factory("llama")), tmp_path / "wide", options)
    assert {spec.scale_bits for p in wide.linear.values() for spec in p.planes} == {16}
    with safe_open(str(tmp_path / "wide" / wide.shards[0].file_name), "pt") as shard:
        assert shard.get_tensor(f"{name}.weight_scales").dtype == torch.float16
        assert f"{name}.weight_scale_reference" not in shard.keys()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    narrow, wide_tap = tap_runtime.load(directory), tap_runtime.load(tmp_path / "wide")
    # Every token on tier 8, where both planes together hold the weight: the two routers may route
    # a token differently, and GPTQ picks other base codes on another scale grid.
    narrow.set_routing("fixed", tier=8)
    wide_tap.set_routing("fixed", tier=8)
    with torch.no_grad():
        narrow_logits, wide_logits = narrow(ids).logits, wide_tap(ids).logits
    # Same model, scales within 1.1% of each other: the outputs agree closely, but not exactly.
    assert torch.allclose(narrow_logits, wide_logits, atol=0.05 * wide_logits.abs().max())
    assert not torch.equal(narrow_logits, wide_logits)
    with pytest.raises(InvalidConfigError, match=r"--scale-bits 4 is unknown; expected one of \[8, 16\]"):
        ConvertOptions(scale_bits=4).validate()


def test_fitted_levels_put_one_table_on_asymmetric_base_planes(converted_factory, tiny_model_factory, calibration_text_file, tmp_path):
    """``base_levels="fitted"`` (format 7, the default): every asymmetric base plane's codes stand
    for one level table fitted to the model's weights; residual planes stay even. ``"even"``
    writes format 6's planes, and the reference and native kernels read both checkpoints alike."""
    import tap_runtime

    directory = converted_factory("llama", group_size=64)
    table = RoutingTable.from_json(directory / ROUTING_FILE)
    assert table.calibration.extra["base_levels"] == "fitted"
    assert "; codes: a fitted table of 16 levels in 14 of 28 planes (" in (directory / "README.md").read_text()
    bases = [p.planes[0] for p in table.linear.values()]
    tables = {spec.levels for spec in bases if not spec.symmetric}
    assert len(tables) == 1 and None not in tables
    assert all(spec.levels is None for spec in bases if spec.symmetric)
    assert all(spec.levels is None for p in table.linear.values() for spec in p.planes[1:])
    even_directory = tmp_path / "even"
    even = convert(
        str(tiny_model_factory("llama")), even_directory,
        ConvertOptions(calib=str(calibration_text_file), group_size=64, base_levels="even", **FAST_CONVERT),
    )
    assert even.calibration.extra["base_levels"] == "even"
    assert all(spec.levels is None for p in even.linear.values() for spec in p.planes)
    assert even.calibration.extra["timings"]["levels_seconds"] >= 0
    ids = torch.tensor([[1, 5, 9, 2, 7, 11, 3, 8]])
    for path in (directory, even_directory):
        native, reference = tap_runtime.load(path), tap_runtime.load(path, kernel="reference")
        for tap in (native, reference):
            tap.set_routing("fixed", tier=4)
        with torch.no_grad():
            expected = reference(ids).logits
            assert float((native(ids).logits - expected).norm() / expected.norm()) < 2e-2, path
    with pytest.raises(InvalidConfigError, match=r"--base-levels 'nf4' is unknown; expected one of \['fitted', 'even'\]"):
        ConvertOptions(base_levels="nf4").validate()


def test_group_size_falls_back_to_a_divisor():
    assert choose_group_size(576, 128) == 64
    assert choose_group_size(640, 128) == 128
    assert choose_group_size(96, 64) == 32
    assert choose_group_size(100, 64) is None


def test_unsupported_architecture_fails_before_loading_weights(tmp_path, calibration_text_file):
    config = AutoConfig.for_model("opt", vocab_size=320, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                  num_attention_heads=2, word_embed_proj_dim=32)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "opt"))
    with pytest.raises(UnsupportedArchitectureError, match=r"opt/config.json: model_type 'opt' is not supported; expected one of"):
        convert(str(tmp_path / "opt"), tmp_path / "out", ConvertOptions(calib=str(calibration_text_file), **FAST_CONVERT))
    assert not (tmp_path / "out").exists()


def test_too_little_calibration_text(tiny_model_factory, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words of text here")
    with pytest.raises(CalibrationDataError, match=r"short.txt.*too little text; expected at least 512 tokens for 8 windows of 64"):
        convert(str(tiny_model_factory("llama")), tmp_path / "out", ConvertOptions(calib=str(short), **FAST_CONVERT))
    assert not (tmp_path / "out").exists()


def test_conversion_is_deterministic(tiny_model_factory, calibration_text_file, tmp_path):
    options = ConvertOptions(calib=str(calibration_text_file), group_size=32, **FAST_CONVERT)
    first = convert(str(tiny_model_factory("qwen2")), tmp_path / "a", options)
    second = convert(str(tiny_model_factory("qwen2")), tmp_path / "b", options)
    assert [s.sha256 for s in first.shards] == [s.sha256 for s in second.shards]
    assert first.router.thresholds == second.router.thresholds


def test_model_card_front_matter_and_figures(converted_factory):
    card = (converted_factory("llama") / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: text-generation" in card and "  - tap\n" in card
    assert "base_model:" not in card  # converted from a local directory, not a Hub repo
    assert "| hidden_norm | " in card and "tier-8" in card
    assert "by gptq; GPTQ in activation order; group scales as 8-bit log codes under a float32 reference per plane; " in card
    assert re.search(r"; codes: a fitted table of 16 levels in \d+ of 28 planes \([\d. ]+ code steps\), evenly spaced codes "
                     r"elsewhere; input rotation: 14 of 14 linears, Hadamard blocks of 64\)", card)
    assert "tensors kept unquantized: 5 in float16 (float16 only where exact)." in card  # 2 x 2 layer norms + the final one


def test_target_bits_promotes_layers_and_the_runtime_honours_it(tiny_model_factory, calibration_text_file, tmp_path):
    import tap_runtime
    from tap_runtime.layers import TapLinear

    options = ConvertOptions(calib=str(calibration_text_file), group_size=32, target_bits=6.0, **FAST_CONVERT)
    table = convert(str(tiny_model_factory("llama")), tmp_path / "ckpt", options)
    promoted = [p for p in table.linear.values() if p.min_tier == 8]
    assert promoted and all("promoted to tier 8" in p.reason for p in promoted)
    assert table.calibration.extra["expected_avg_weight_bits"] <= 6.0
    assert all(set(p.sensitivity) == {"4", "8"} and p.sensitivity["8"] < p.sensitivity["4"] for p in table.linear.values())
    tap = tap_runtime.load(tmp_path / "ckpt")
    tap.set_routing("fixed", tier=4)
    module = dict(tap.model.named_modules())[promoted[0].name]
    assert isinstance(module, TapLinear) and module.policy.always_planes == 2
    x = torch.randn(3, module.in_features)
    tap.set_routing("fixed", tier=8)
    dense = module(x)
    tap.set_routing("fixed", tier=4)
    tap.router.route_layer(module.policy.layer_index, x.unsqueeze(0))
    assert torch.allclose(module(x), dense)  # promoted: tier 8 even when routed to the base


def test_outlier_embedding_columns_get_column_scales(tiny_model_factory, calibration_text_file, tmp_path):
    import shutil

    import tap_runtime
    from safetensors import safe_open

    shutil.copytree(tiny_model_factory("llama"), tmp_path / "source")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "source"))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :2] *= 40.0  # a few columns set every row's int8 range
    model.save_pretrained(str(tmp_path / "source"))
    embedding = model.model.embed_tokens.weight.detach().clone()

    def converted(name: str, column_scales: bool):
        options = ConvertOptions(calib=str(calibration_text_file), group_size=32, column_scales=column_scales, **FAST_CONVERT)
        table = convert(str(tmp_path / "source"), tmp_path / name, options)
        return table, tap_runtime.load(tmp_path / name)

    table, tap = converted("scaled", True)
    policy = table.embeddings["model.embed_tokens"]
    assert policy.column_scale_exponent > 0
    assert table.embeddings["lm_head"].column_scale_exponent == policy.column_scale_exponent  # tied: same rows
    assert table.format_version == FORMAT_VERSION
    with safe_open(str(tmp_path / "scaled" / table.shards[0].file_name), "pt") as shard:
        assert shard.get_tensor("model.embed_tokens.weight_column_scales").shape == (embedding.shape[1],)

    plain_table, plain = converted("plain", False)
    assert plain_table.embeddings["model.embed_tokens"].column_scale_exponent == 0.0
    ids = torch.arange(embedding.shape[0])

    def lookup_error(loaded) -> float:
        with torch.no_grad():
            return float((loaded.model.get_input_embeddings()(ids) - embedding).pow(2).sum() / embedding.pow(2).sum())

    assert lookup_error(tap) < lookup_error(plain) / 4
    # The head folds the same column scales into its input: it computes x . dequantized rows.
    head = tap.model.get_output_embeddings()
    x = torch.randn(3, embedding.shape[1])
    from tap_runtime.planes import dequantize_rows

    with torch.no_grad():
        expected = x @ dequantize_rows(head.rows()).t()
        assert torch.allclose(head(x), expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max()))


def test_kept_tensors_are_float16_only_where_that_is_exact():
    from tap_convert.convert import kept_tensor_storage

    bfloat16_norm = (torch.randn(64) + 1).to(torch.bfloat16).to(torch.float32)
    assert kept_tensor_storage(bfloat16_norm).dtype == torch.float16
    assert torch.equal(kept_tensor_storage(bfloat16_norm).to(torch.float32), bfloat16_norm)
    full = torch.tensor([1.0, 1.0 + 2.0**-20])  # beyond float16's 11 significant bits
    assert kept_tensor_storage(full).dtype == torch.float32
    assert kept_tensor_storage(torch.tensor([70000.0])).dtype == torch.float32  # beyond float16's range


def test_the_default_kl_impact_target_stores_a_sensitivity_probe_the_runtime_reads(converted_factory, tmp_path):
    import shutil
    from dataclasses import replace

    from safetensors.torch import save_file

    import tap_runtime
    from tap_runtime.checkpoint import read_router_tensors
    from tap_runtime.errors import CorruptCheckpointError
    from tap_runtime.format import ROUTER_TOKEN_LOG_FREQUENCY, SAFETENSORS_METADATA, sensitivity_probe_name

    directory = converted_factory("llama")
    table = RoutingTable.from_json(directory / ROUTING_FILE)
    assert table.format_version == FORMAT_VERSION >= 6  # format 6 added the probe
    assert table.router.signals == ("hidden_norm", "position", "token_frequency", "error_estimate", "sensitivity")
    assert table.router.fit["target_name"] == "kl_impact" and "sensitivity_probe" in table.router.fit
    assert "sensitivity" in table.router.fit["single_signal_auc"]
    tensors = read_router_tensors(directory)
    hidden = AutoConfig.from_pretrained(directory).hidden_size
    for layer in range(2):
        probe = tensors[sensitivity_probe_name(layer)]
        assert probe.shape == (hidden,) and probe.dtype == torch.float16 and probe.abs().sum() > 0
    tap = tap_runtime.load(directory)
    assert tap.router.sensitivity_probes is not None
    tap.router.reset_counts()
    tap.generate("The river flows past", max_new_tokens=6)
    assert tap.router.counts.sum() > 0

    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    tensors[sensitivity_probe_name(1)] = tensors[sensitivity_probe_name(1)][:-1].contiguous()
    stored = {k: v for k, v in tensors.items() if k != ROUTER_TOKEN_LOG_FREQUENCY}  # the file keeps the codes
    save_file(stored, str(broken / ROUTER_TENSORS_FILE), metadata=SAFETENSORS_METADATA)
    shards = tuple(
        replace(s, sha256=file_sha256(broken / s.file_name), num_bytes=(broken / s.file_name).stat().st_size)
        for s in table.shards
    )
    (broken / ROUTING_FILE).write_text(replace(table, shards=shards).to_json())
    with pytest.raises(CorruptCheckpointError, match=r"tap_router.safetensors: tensor 'sensitivity_probe.1' is \(\d+,\)"):
        tap_runtime.load(broken)



def test_the_layer_error_target_keeps_the_four_signal_router(converted_factory):
    """--router-target layer_error: pass 2 at full precision, no probe stored or read."""
    import tap_runtime
    from tap_runtime.checkpoint import read_router_tensors

    directory = converted_factory("llama", router_target="layer_error")
    table = RoutingTable.from_json(directory / ROUTING_FILE)
    assert table.router.signals == ("hidden_norm", "position", "token_frequency", "error_estimate")
    assert table.router.fit["target_name"] == "layer_error" and "sensitivity_probe" not in table.router.fit
    assert not any(name.startswith("sensitivity_probe") for name in read_router_tensors(directory))
    tap = tap_runtime.load(directory)
    assert tap.router.sensitivity_probes is None
    assert tap.generate("The river flows past", max_new_tokens=4).metrics.new_tokens == 4
