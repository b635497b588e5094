import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tap_runtime.errors import CorruptCheckpointError, FormatVersionError
from tap_runtime.format import (
    FORMAT_VERSION,
    ROUTER_TOKEN_LOG_FREQUENCY_CODES,
    ROUTER_TOKEN_LOG_FREQUENCY_PALETTE,
    CalibrationInfo,
    EmbeddingPolicy,
    KeptTensor,
    LinearPolicy,
    PlaneSpec,
    RouterSpec,
    RoutingTable,
    ShardInfo,
    decode_token_log_frequency,
    embedding_tensor_name,
    encode_token_log_frequency,
    plane_tensor_name,
    quantization_config_dict,
)

GOLDEN = Path(__file__).parent / "golden" / "routing_table.json"
GOLDEN_V1 = Path(__file__).parent / "golden" / "routing_table_v1.json"
GOLDEN_V2 = Path(__file__).parent / "golden" / "routing_table_v2.json"
GOLDEN_V3 = Path(__file__).parent / "golden" / "routing_table_v3.json"
GOLDEN_V4 = Path(__file__).parent / "golden" / "routing_table_v4.json"
GOLDEN_V5 = Path(__file__).parent / "golden" / "routing_table_v5.json"
GOLDEN_V6 = Path(__file__).parent / "golden" / "routing_table_v6.json"
SAMPLE_LEVELS = (2, 12, 21, 29, 36, 43, 50, 57, 63, 70, 76, 83, 91, 98, 107, 118)


def sample_table(levels: tuple[int, ...] | None = SAMPLE_LEVELS, format_version: int = FORMAT_VERSION) -> RoutingTable:
    """The golden table; formats 1-6 had no level tables (levels=None)."""
    base, residual = PlaneSpec(4, 64, False, levels=levels), PlaneSpec(4, 64, True)
    return RoutingTable(
        format_version=format_version,
        model_type="llama",
        architecture="LlamaForCausalLM",
        num_layers=1,
        tiers=(4, 8),
        high_precision_share=0.1,
        linear={
            "model.layers.0.mlp.up_proj": LinearPolicy(
                "model.layers.0.mlp.up_proj", 64, 128, False, 0, (4, 8), (base, residual), input_rotation=64
            )
        },
        embeddings={
            "model.embed_tokens": EmbeddingPolicy("model.embed_tokens", 320, 64),
            "lm_head": EmbeddingPolicy("lm_head", 320, 64, role="head", tied_to="model.embed_tokens"),
        },
        kept={"model.norm.weight": KeptTensor("model.norm.weight", 32, "norm")},
        router=RouterSpec(
            signals=("hidden_norm", "position", "token_frequency"),
            normalisation={
                "hidden_norm": {"transform": "log_rms", "layer_mean": [0.0], "layer_std": [1.0]},
                "position": {"transform": "log1p", "mean": 3.0, "std": 1.0},
                "token_frequency": {"transform": "log_unigram_probability", "mean": -7.0, "std": 2.0},
            },
            weights={"hidden_norm": 0.5, "position": -0.25, "token_frequency": -0.125},
            bias=-2.0,
            thresholds=((1.5,),),
            tier_shares={"8": 0.1},
            fit={"holdout": {"auc": 0.6}},
            excluded_signals={"attention_received": "needs later tokens"},
            error_sketch_sites=(("model.layers.0.mlp.up_proj",),),
        ),
        calibration=CalibrationInfo("wikitext", "bundled", 8, 64, 0, 5000, 4, 1.5, {"fp16_bytes": 100}),
        shards=(ShardInfo("model-00001-of-00001.safetensors", "ab" * 32, 1234),),
        producer="test",
    )


def test_manifest_matches_golden_json():
    # The golden file pins the on-disk format: any change to it must be a deliberate format change.
    assert json.loads(sample_table().to_json()) == json.loads(GOLDEN.read_text())


def test_version_1_tables_still_read():
    # Version 1 had no column scales and stored float16 zero points: its embeddings read back
    # with exponent 0 (none), its planes with 16-bit zeros.
    table = RoutingTable.from_json(GOLDEN_V1)
    expected = sample_table(levels=None)
    linear = {
        n: replace(p, input_rotation=0, planes=tuple(replace(spec, zero_bits=16, scale_bits=16) for spec in p.planes))
        for n, p in expected.linear.items()
    }
    assert table == replace(expected, format_version=1, linear=linear, router=replace(expected.router, error_sketch_sites=()))
    assert not any(e.column_scaled for e in table.embeddings.values())


def test_version_2_tables_still_read_with_float16_scales():
    table = RoutingTable.from_json(GOLDEN_V2)
    expected = sample_table(levels=None)
    linear = {
        n: replace(p, input_rotation=0, planes=tuple(replace(spec, scale_bits=16) for spec in p.planes))
        for n, p in expected.linear.items()
    }
    assert table == replace(expected, format_version=2, linear=linear, router=replace(expected.router, error_sketch_sites=()))
    assert all(spec.fields[-1] != "scale_reference" for p in table.linear.values() for spec in p.planes)


def _unrotated(table: RoutingTable) -> dict:
    return {n: replace(p, input_rotation=0) for n, p in table.linear.items()}


def test_version_3_tables_still_read_with_stored_sketches():
    # Format 3 stored the error sketches as tensors: its router names no sketch sites.
    table = RoutingTable.from_json(GOLDEN_V3)
    expected = sample_table(levels=None)
    assert table == replace(
        expected, format_version=3, linear=_unrotated(expected), router=replace(expected.router, error_sketch_sites=())
    )


def test_version_4_tables_still_read_unrotated():
    # Up to format 4 no linear rotated its input.
    table = RoutingTable.from_json(GOLDEN_V4)
    expected = sample_table(levels=None)
    assert table == replace(expected, format_version=4, linear=_unrotated(expected))
    assert all(p.input_rotation == 0 for p in table.linear.values())


def test_version_5_tables_still_read():
    # Format 6 only added the sensitivity signal; a version-5 table is read as it was written.
    table = RoutingTable.from_json(GOLDEN_V5)
    assert table == replace(sample_table(levels=None), format_version=5)


def test_version_6_tables_still_read_with_even_codes():
    # Format 7 only added level tables; a version-6 table's planes read back with none (even codes).
    table = RoutingTable.from_json(GOLDEN_V6)
    assert table == sample_table(levels=None, format_version=6)
    assert all(spec.levels is None for p in table.linear.values() for spec in p.planes)


def test_even_planes_write_no_levels_key():
    data = json.loads(sample_table(levels=None).to_json())
    assert all("levels" not in spec for p in data["linear"].values() for spec in p["planes"])
    data = json.loads(sample_table().to_json())
    assert [spec.get("levels") for spec in data["linear"]["model.layers.0.mlp.up_proj"]["planes"]] == [list(SAMPLE_LEVELS), None]


@pytest.mark.parametrize(
    "levels",
    [[1, 2, 3], list(range(0, 160, 10)), [0] * 16, list(range(16, 0, -1)), [float(v) for v in range(16)], "even", list(range(110, 126))],
    ids=["too-few", "too-high", "not-increasing", "decreasing", "floats", "string", "past-120"],
)
def test_a_bad_level_table_is_named(tmp_path, levels):
    data = json.loads(sample_table().to_json())
    data["linear"]["model.layers.0.mlp.up_proj"]["planes"][0]["levels"] = levels
    path = tmp_path / "tap_routing.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CorruptCheckpointError, match=r"linear\.model\.layers\.0\.mlp\.up_proj\.planes\[0\]\.levels' is .*16 strictly increasing integers in \[0, 120\]") as caught:
        RoutingTable.from_json(path)
    assert str(path) in str(caught.value)


def test_a_router_signal_the_runtime_cannot_compute_is_refused(tmp_path):
    data = json.loads(sample_table().to_json())
    data["router"]["signals"].append("attention_received")
    path = tmp_path / "tap_routing.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CorruptCheckpointError, match="attention_received") as caught:
        RoutingTable.from_json(path)
    assert str(path) in str(caught.value)


def test_the_sensitivity_signal_in_a_table_older_than_format_6_is_refused(tmp_path):
    data = json.loads(sample_table().to_json())
    data["format_version"] = 5
    data["router"]["signals"].append("sensitivity")
    path = tmp_path / "tap_routing.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CorruptCheckpointError, match="sensitivity signal, which format 6 introduced") as caught:
        RoutingTable.from_json(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("rotation", [48, 128, -64, 1.5, True])
def test_input_rotation_must_be_a_power_of_two_dividing_the_width(tmp_path, rotation):
    data = json.loads(sample_table().to_json())
    data["linear"]["model.layers.0.mlp.up_proj"]["input_rotation"] = rotation
    path = tmp_path / "tap_routing.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CorruptCheckpointError, match="input_rotation") as caught:
        RoutingTable.from_json(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "sites, complaint",
    [((("model.layers.0.mlp.gate_proj",),), "linears ['model.layers.0.mlp.gate_proj']"), ((), None), ((("model.layers.0.mlp.up_proj",), ()), "lists 2 layers")],
)
def test_error_sketch_sites_must_be_the_tables_own_linears(tmp_path, sites, complaint):
    table = sample_table()
    path = tmp_path / "tap_routing.json"
    path.write_text(replace(table, router=replace(table.router, error_sketch_sites=sites)).to_json())
    if complaint is None:
        assert RoutingTable.from_json(path).router.error_sketch_sites == ()
        return
    with pytest.raises(CorruptCheckpointError, match=re.escape(complaint)) as caught:
        RoutingTable.from_json(path)
    assert str(path) in str(caught.value)


def test_token_log_frequency_palette_is_exact_for_count_logs():
    counts = torch.tensor([0, 0, 3, 1, 1200, 3, 0, 7], dtype=torch.float64)
    table = torch.log((counts + 1) / (counts.sum() + counts.numel())).to(torch.float32)
    stored = encode_token_log_frequency(table)
    assert stored[ROUTER_TOKEN_LOG_FREQUENCY_CODES].dtype == torch.uint8
    assert stored[ROUTER_TOKEN_LOG_FREQUENCY_PALETTE].numel() == 5  # distinct counts 0, 1, 3, 7, 1200
    assert torch.equal(decode_token_log_frequency(stored, "router.safetensors"), table)


def test_token_log_frequency_palette_rounds_to_nearest_beyond_256_values():
    table = torch.linspace(-20.0, -2.0, 5000) + 0.001 * torch.sin(torch.arange(5000.0))
    decoded = decode_token_log_frequency(encode_token_log_frequency(table), "router.safetensors")
    step = 18.0 / 255
    assert (decoded - table).abs().max() <= step / 2 + 1e-4


def test_token_log_frequency_codes_out_of_palette_are_refused():
    stored = encode_token_log_frequency(torch.tensor([-3.0, -5.0, -5.0]))
    stored[ROUTER_TOKEN_LOG_FREQUENCY_CODES][0] = 9
    with pytest.raises(CorruptCheckpointError, match="router.safetensors.*does not index"):
        decode_token_log_frequency(stored, "router.safetensors")


def test_column_scaled_embedding_stores_its_scales():
    plain = EmbeddingPolicy("model.embed_tokens", 320, 64)
    scaled = replace(plain, column_scale_exponent=0.5)
    assert plain.fields == ("qweight", "scales")
    assert scaled.fields == ("qweight", "scales", "column_scales")
    # One float32 per column, spread over the rows.
    assert scaled.stored_bits_per_weight() - plain.stored_bits_per_weight() == pytest.approx(32 / 320)
    assert embedding_tensor_name("model.embed_tokens", "column_scales") == "model.embed_tokens.weight_column_scales"


def test_zero_points_are_stored_as_uint8_eighths():
    spec = PlaneSpec(4, 64, False)
    zeros = torch.tensor([[-9.0, -8.0, 0.03, 7.5, 7.4375, 15.0, 23.875, 30.0]])
    rounded = spec.round_zeros(zeros)
    assert rounded.tolist() == [[-8.0, -8.0, 0.0, 7.5, 7.5, 15.0, 23.875, 23.875]]  # eighths, clamped
    stored = spec.encode_zeros(rounded)
    assert stored.dtype == torch.uint8
    assert torch.equal(spec.decode_zeros(stored).to(torch.float32), rounded)
    legacy = PlaneSpec(4, 64, False, zero_bits=16, scale_bits=16)
    assert legacy.encode_zeros(zeros).dtype == torch.float16
    # A byte per zero instead of two: 4 + (8 + 8) / 64 bits per weight (format 3's scales are a
    # byte too), 4 + (16 + 16) / 64 for format 1.
    assert spec.stored_bits_per_weight() == 4 + 16 / 64 and legacy.stored_bits_per_weight() == 4 + 32 / 64


def test_scales_are_stored_as_uint8_log_codes_under_a_reference():
    spec = PlaneSpec(4, 64, True)
    assert spec.fields == ("qweight", "scales", "scale_reference") and spec.scale_dtype == torch.uint8
    reference = spec.scale_reference(0.02)
    assert reference.dtype == torch.float32 and reference.shape == (1,)
    wanted = torch.tensor([[0.02, 0.0199, 0.01, 0.0001, 0.00005, 0.5]])
    rounded = spec.round_scales(wanted, reference)
    # Steps of 2**(1/32): every scale within 1.1% of the one asked for, down to reference / 250;
    # below that the smallest code, above the reference the largest.
    relative = (rounded[0, :4] / wanted[0, :4] - 1).abs()
    assert relative.max() <= 2 ** (1 / 64) - 1 + 1e-3
    assert rounded[0, 4] == pytest.approx(0.02 * 2 ** (-255 / 32), rel=1e-3)
    assert rounded[0, 5] == pytest.approx(0.02, rel=1e-3)
    stored = spec.encode_scales(rounded.to(torch.float16), reference)
    assert stored.dtype == torch.uint8 and stored[0, 0] == 0 and stored[0, 2] == 32  # half: one octave
    # Decoding gives back exactly the float16 values the codes were chosen against.
    assert torch.equal(spec.decode_scales(stored, reference), rounded.to(torch.float16))
    # Where float16 runs out of digits (subnormals), codes still round-trip to the same value.
    tiny = PlaneSpec(4, 64, True).scale_reference(1e-5)
    grid = spec.scale_grid(tiny)
    assert torch.equal(spec.decode_scales(spec.encode_scales(grid, tiny), tiny), grid)
    legacy = PlaneSpec(4, 64, True, scale_bits=16)
    assert legacy.scale_reference(0.02) is None and legacy.fields == ("qweight", "scales")
    assert legacy.encode_scales(wanted, None).dtype == torch.float16


def test_unknown_scale_bits_are_refused(tmp_path):
    data = json.loads(sample_table().to_json())
    data["linear"]["model.layers.0.mlp.up_proj"]["planes"][0]["scale_bits"] = 4
    path = tmp_path / "tap_routing.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CorruptCheckpointError, match="scale_bits' is 4; expected 8 or 16"):
        RoutingTable.from_json(path)


def test_round_trip(tmp_path):
    path = tmp_path / "tap_routing.json"
    path.write_text(sample_table().to_json())
    assert RoutingTable.from_json(path) == sample_table()


def test_wrong_format_version_names_file_and_supported_versions(tmp_path):
    data = json.loads(sample_table().to_json())
    data["format_version"] = 99
    path = tmp_path / "tap_routing.json"
    path.write_text(json.dumps(data))
    with pytest.raises(FormatVersionError, match=r"tap_routing.json: TAP format version 99 is not supported; expected one of \[1, 2, 3, 4, 5, 6, 7\]"):
        RoutingTable.from_json(path)


def test_missing_key_is_named(tmp_path):
    data = json.loads(sample_table().to_json())
    del data["router"]["thresholds"]
    path = tmp_path / "tap_routing.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CorruptCheckpointError, match="missing key 'router.thresholds'"):
        RoutingTable.from_json(path)


def test_truncated_json_is_corrupt(tmp_path):
    path = tmp_path / "tap_routing.json"
    path.write_text(sample_table().to_json()[:100])
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        RoutingTable.from_json(path)


def test_threshold_rows_must_match_layers(tmp_path):
    table = replace(sample_table(), num_layers=2)
    path = tmp_path / "tap_routing.json"
    path.write_text(table.to_json())
    with pytest.raises(CorruptCheckpointError, match="thresholds for 1 layers; expected 2"):
        RoutingTable.from_json(path)


def test_tensor_names():
    assert plane_tensor_name("m.q", 0, "qweight") == "m.q.weight"
    assert plane_tensor_name("m.q", 0, "scales") == "m.q.weight_scales"
    assert plane_tensor_name("m.q", 1, "qweight") == "m.q.residual1"
    assert plane_tensor_name("m.q", 2, "zeros") == "m.q.residual2_zeros"
    assert embedding_tensor_name("e", "scales") == "e.weight_scales"
    with pytest.raises(ValueError, match="unknown plane field"):
        plane_tensor_name("m", 0, "bias")


def test_bits_account_for_scales_and_zeros():
    policy = sample_table().linear["model.layers.0.mlp.up_proj"]
    assert policy.bits_at_tier(4) == pytest.approx(4.25)  # 4 + (8-bit scale + 8-bit zero) / 64
    assert policy.bits_at_tier(8) == pytest.approx(8.375)  # + 4 + 8-bit scale / 64


def test_quantization_config_entry():
    assert quantization_config_dict((4, 8)) == {
        "quant_method": "tap",
        "format_version": FORMAT_VERSION,
        "tiers": [4, 8],
        "routing_table": "tap_routing.json",
    }


def test_quantile_thresholds_interpolate_the_recorded_percentiles():
    import dataclasses

    router = dataclasses.replace(sample_table().router, score_percentiles=tuple(tuple(float(i) for i in range(101)) for _ in range(2)))
    assert router.thresholds_for_quantiles([0.25, 0.905]) == ((25.0, 90.5), (25.0, 90.5))
    with pytest.raises(Exception, match="convert it again"):
        sample_table().router.thresholds_for_quantiles([0.5])


def test_tables_written_before_row_methods_were_recorded_still_load(tmp_path):
    """The embeddings' ``method`` is an addition: without it a table reads as round-to-nearest."""
    data = json.loads(sample_table().to_json())
    for entry in data["embeddings"].values():
        del entry["method"]
    path = tmp_path / "tap_routing.json"
    path.write_text(json.dumps(data))
    assert all(policy.method == "rtn" for policy in RoutingTable.from_json(path).embeddings.values())
