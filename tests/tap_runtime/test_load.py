"""End to end on tiny random models of every supported family: convert, load, compare, generate."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import tap_runtime
from tap_runtime.layers import TapEmbedding, TapHead, TapLinear

MODEL_TYPES = ["llama", "qwen2", "mistral", "qwen3", "gpt2", "gemma3_text"]


def _ids(seq_len=24, seed=0):
    return torch.randint(3, 320, (2, seq_len), generator=torch.Generator().manual_seed(seed))


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def original_logits(tiny_model_factory):
    cache = {}

    def get(model_type):
        if model_type not in cache:
            model = AutoModelForCausalLM.from_pretrained(str(tiny_model_factory(model_type)), dtype=torch.float32)
            with torch.inference_mode():
                cache[model_type] = model(_ids()).logits
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_packed_kernel_logits_match_the_reference_kernel(converted_factory, model_type):
    directory = converted_factory(model_type)
    packed = tap_runtime.load(directory)
    reference = tap_runtime.load(directory, kernel="reference")
    with torch.inference_mode():
        got, expected = packed(_ids()).logits, reference(_ids()).logits
    assert _relative(got, expected) < 2e-2
    # Same routing decisions on both paths (the router sees the same hidden states up to rounding).
    assert packed.router.counts.sum() == reference.router.counts.sum()


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_device_packed_kernel_matches_the_cpu_reference(converted_factory, model_type, device):
    """On every device present (CUDA too, where lent), the packed path agrees with the CPU reference."""
    directory = converted_factory(model_type)
    on_device = tap_runtime.load(directory, device=device)
    reference = tap_runtime.load(directory, kernel="reference")
    assert next(on_device.model.parameters()).device.type == device.type
    for tier in on_device.table.tiers:
        on_device.set_routing("fixed", tier=tier)
        reference.set_routing("fixed", tier=tier)
        with torch.inference_mode():
            got = on_device(_ids().to(device)).logits.float().cpu()
            expected = reference(_ids()).logits
        assert _relative(got, expected) < 2e-2, tier
    on_device.set_routing("learned")
    out = on_device.generate(input_ids=_ids()[:1, :8], max_new_tokens=4)
    assert len(out.token_ids) == 4 and sum(out.metrics.tier_token_layer_counts.values()) > 0


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_modules_are_swapped_and_no_float_weights_remain(converted_factory, model_type):
    tap = tap_runtime.load(converted_factory(model_type))
    model = tap.model
    assert {id(m.kernel) for m in model.modules() if isinstance(m, TapLinear)} == {id(tap.kernel)}  # one kernel, exposed
    kinds = {type(m) for m in model.modules()}
    assert {TapLinear, TapEmbedding, TapHead} <= kinds
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    floats = {n: p.numel() for n, p in model.named_parameters() if p.is_floating_point() and not n.endswith("_scales")}
    assert max(floats.values()) <= 256  # besides scales, only norms and biases stay in floating point


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_top_tier_is_close_to_fp32_and_closer_than_the_base_tier(converted_factory, original_logits, model_type):
    tap = tap_runtime.load(converted_factory(model_type))
    errors = {}
    with torch.inference_mode():
        for tier in (4, 8):
            tap.set_routing("fixed", tier=tier)
            errors[tier] = _relative(tap(_ids()).logits, original_logits(model_type))
    assert errors[8] < 0.05
    assert errors[8] < errors[4]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("mode", ["fixed", "learned"])
def test_kv_cache_decoding_matches_a_full_forward(converted_factory, model_type, mode):
    """Each cached decode step gives the logits a full, uncached forward over the same tokens gives.

    Tokens are compared through logits, not argmax: on random tiny models near-ties make greedy
    choices flip under bfloat16 rounding differences between batch shapes.
    """
    tap = tap_runtime.load(converted_factory(model_type))
    tap.set_routing(mode, tier=8 if mode == "fixed" else None)
    prompt = _ids(seq_len=8)[:1]
    with torch.inference_mode():
        out = tap.model.generate(
            prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        stepwise = torch.cat(out.logits)  # (20, vocab): step i predicts token 8 + i
        full = tap(out.sequences[:, :-1]).logits[0, 7:]
    assert out.sequences.shape[1] == 28
    assert _relative(stepwise, full) < 3e-2


def test_sampling_is_seeded_and_reports_metrics(converted_factory):
    tap = tap_runtime.load(converted_factory("llama"))
    prompt = _ids(seq_len=8)[:1]
    torch.manual_seed(0)
    first = tap.generate(input_ids=prompt, max_new_tokens=10, min_new_tokens=10, do_sample=True, temperature=0.9)
    torch.manual_seed(0)
    second = tap.generate(input_ids=prompt, max_new_tokens=10, min_new_tokens=10, do_sample=True, temperature=0.9)
    assert first.token_ids == second.token_ids
    metrics = first.metrics
    layers = tap.table.num_layers
    # Every processed token (8 prompt + 9 decode steps) got one tier decision per layer.
    assert sum(metrics.tier_token_layer_counts.values()) == (8 + 9) * layers
    assert sum(metrics.tokens_per_tier.values()) == pytest.approx(17)
    assert sum(metrics.tier_share.values()) == pytest.approx(1.0)
    bits = tap.table.linear[next(iter(tap.table.linear))]
    assert bits.bits_at_tier(4) <= metrics.avg_weight_bits_per_token <= bits.bits_at_tier(8)
    assert metrics.new_tokens == 10 and metrics.prompt_tokens == 8
    assert metrics.wall_seconds >= metrics.decode_seconds > 0
    assert metrics.decode_tokens_per_second > 0 and metrics.prefill_tokens_per_second > 0
    assert metrics.peak_rss_bytes > 0 and metrics.peak_rss_method in ("VmHWM", "sampled")
    assert metrics.checkpoint_bytes == tap.checkpoint.total_bytes


def test_text_prompt_round_trip(converted_factory):
    tap = tap_runtime.load(converted_factory("qwen2"))
    out = tap.generate("The capital of France is", max_new_tokens=5)
    assert isinstance(out.text, str) and 0 < len(out.token_ids) <= 5


def test_three_tier_checkpoint_loads_and_orders_its_tiers(converted_factory, original_logits):
    tap = tap_runtime.load(converted_factory("llama", tiers=(4, 8, 16)))
    assert tap.table.tiers == (4, 8, 16)
    errors = {}
    with torch.inference_mode():
        for tier in (4, 8, 16):
            tap.set_routing("fixed", tier=tier)
            errors[tier] = _relative(tap(_ids()).logits, original_logits("llama"))
    assert errors[16] <= errors[8] < errors[4]


def test_plain_transformers_refuses_a_tap_checkpoint_without_tap(converted_factory):
    directory = converted_factory("llama")
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(directory)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "ignore_mismatched_sizes" in result.stderr  # transformers' own size-mismatch refusal


def test_transformers_loads_a_tap_checkpoint_after_import(converted_factory):
    directory = converted_factory("llama")
    model = AutoModelForCausalLM.from_pretrained(str(directory))
    assert hasattr(model, "tap_router")
    assert any(isinstance(m, TapLinear) for m in model.modules())
    with torch.inference_mode():
        direct = model(_ids()).logits
        via_load = tap_runtime.load(directory)(_ids()).logits
    assert torch.allclose(direct, via_load)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_residual_stream_runs_in_the_requested_dtype(converted_factory, dtype):
    # model.dtype reports the first floating parameter, a float16 scale; it must not leak in
    # (a float16 residual stream overflows on Gemma's large activations).
    tap = tap_runtime.load(converted_factory("gemma3_text"), dtype=dtype)
    with torch.inference_mode():
        out = tap(_ids(), output_hidden_states=True)
    assert {h.dtype for h in out.hidden_states} == {dtype}
    assert out.logits.dtype == dtype and torch.isfinite(out.logits).all()


def test_format_1_checkpoint_with_float16_zeros_still_loads(tiny_model_factory, calibration_text_file, tmp_path):
    """Checkpoints written before format 2 (float16 zero points, no column scales) load unchanged."""
    import json
    import shutil
    from dataclasses import replace

    from safetensors.torch import load_file, save_file

    from tap_convert import ConvertOptions, convert
    from tap_runtime.checkpoint import file_sha256
    from tap_runtime.format import ROUTING_FILE, SAFETENSORS_METADATA

    from ..conftest import FAST_CONVERT

    source = tmp_path / "v2"
    options = ConvertOptions(
        calib=str(calibration_text_file), group_size=32, column_scales=False, router_target="layer_error", **FAST_CONVERT
    )
    table = convert(str(tiny_model_factory("llama")), source, options)
    legacy = tmp_path / "v1"
    shutil.copytree(source, legacy)
    shards = []
    for shard in table.shards:
        tensors = load_file(str(legacy / shard.file_name))
        for name, tensor in tensors.items():
            if name.endswith("_zeros"):
                assert tensor.dtype == torch.uint8  # format 2 stores eighths
                tensors[name] = (tensor.to(torch.float32) / 8 - 8).to(torch.float16)
        save_file(tensors, str(legacy / shard.file_name), metadata=SAFETENSORS_METADATA)
        path = legacy / shard.file_name
        shards.append(replace(shard, sha256=file_sha256(path), num_bytes=path.stat().st_size))
    linear = {
        name: replace(policy, planes=tuple(replace(spec, zero_bits=16) for spec in policy.planes))
        for name, policy in table.linear.items()
    }
    (legacy / ROUTING_FILE).write_text(replace(table, format_version=1, linear=linear, shards=tuple(shards)).to_json())
    config = json.loads((legacy / "config.json").read_text())
    config["quantization_config"]["format_version"] = 1
    (legacy / "config.json").write_text(json.dumps(config))

    ids = _ids()
    current, old = tap_runtime.load(source), tap_runtime.load(legacy)
    assert old.table.format_version == 1
    with torch.no_grad():
        assert torch.equal(old(ids).logits, current(ids).logits)


def test_format_2_checkpoint_with_float16_scales_still_loads(tiny_model_factory, calibration_text_file, tmp_path):
    """Format 2 stored float16 group scales and no reference; its tables say nothing of scale_bits."""
    import json
    import shutil

    from tap_convert import ConvertOptions, convert
    from tap_runtime.format import ROUTING_FILE

    from ..conftest import FAST_CONVERT

    source = tmp_path / "wide"
    options = ConvertOptions(calib=str(calibration_text_file), group_size=32, scale_bits=16, router_target="layer_error", **FAST_CONVERT)
    convert(str(tiny_model_factory("llama")), source, options)
    legacy = tmp_path / "v2"
    shutil.copytree(source, legacy)
    data = json.loads((legacy / ROUTING_FILE).read_text())
    data["format_version"] = 2
    for policy in data["linear"].values():
        for spec in policy["planes"]:
            del spec["scale_bits"]
    (legacy / ROUTING_FILE).write_text(json.dumps(data, indent=2))
    config = json.loads((legacy / "config.json").read_text())
    config["quantization_config"]["format_version"] = 2
    (legacy / "config.json").write_text(json.dumps(config))

    ids = _ids()
    current, old = tap_runtime.load(source), tap_runtime.load(legacy)
    assert old.table.format_version == 2
    assert {spec.scale_bits for p in old.table.linear.values() for spec in p.planes} == {16}
    with torch.no_grad():
        assert torch.equal(old(ids).logits, current(ids).logits)


def test_runtime_derives_the_sketches_the_router_was_fitted_on(tiny_model_factory, calibration_text_file, tmp_path, monkeypatch):
    """Format 4 stores no sketches: the runtime's, from the stored planes, must be the converter's own."""
    import sys

    from tap_convert import ConvertOptions, convert

    from ..conftest import FAST_CONVERT

    convert_module = sys.modules["tap_convert.convert"]
    fitted = []
    original = convert_module.error_sketches
    monkeypatch.setattr(convert_module, "error_sketches", lambda *a, **k: fitted.extend(original(*a, **k)) or list(fitted))
    directory = tmp_path / "tap"
    convert(str(tiny_model_factory("llama")), directory, ConvertOptions(calib=str(calibration_text_file), **FAST_CONVERT))
    tap = tap_runtime.load(directory)
    assert len(fitted) == len(tap.router.error_sketches) == 2
    for converter_side, runtime_side in zip(fitted, tap.router.error_sketches):
        assert converter_side.abs().sum() > 0
        torch.testing.assert_close(runtime_side, converter_side, rtol=1e-5, atol=1e-7)


def test_format_3_checkpoint_with_stored_sketches_still_loads(tiny_model_factory, calibration_text_file, tmp_path):
    """Format 3 stored float16 error sketches and a float32 token log-frequency table."""
    import json
    import shutil
    from dataclasses import replace

    from safetensors.torch import save_file

    from tap_convert import ConvertOptions, convert
    from tap_runtime.checkpoint import file_sha256, read_router_tensors
    from tap_runtime.format import ROUTER_TENSORS_FILE, ROUTER_TOKEN_LOG_FREQUENCY, ROUTING_FILE, SAFETENSORS_METADATA, error_sketch_name

    from ..conftest import FAST_CONVERT

    source = tmp_path / "v4"
    options = ConvertOptions(calib=str(calibration_text_file), router_target="layer_error", **FAST_CONVERT)  # no probe before format 6
    table = convert(str(tiny_model_factory("llama")), source, options)
    current = tap_runtime.load(source)
    legacy = tmp_path / "v3"
    shutil.copytree(source, legacy)
    stored = [s.to(torch.float16) for s in current.router.error_sketches]
    frequency = read_router_tensors(source)[ROUTER_TOKEN_LOG_FREQUENCY]
    save_file(
        {ROUTER_TOKEN_LOG_FREQUENCY: frequency, **{error_sketch_name(i): s for i, s in enumerate(stored)}},
        str(legacy / ROUTER_TENSORS_FILE),
        metadata=SAFETENSORS_METADATA,
    )
    shards = tuple(
        replace(shard, sha256=file_sha256(legacy / shard.file_name), num_bytes=(legacy / shard.file_name).stat().st_size)
        for shard in table.shards
    )
    old_table = replace(table, format_version=3, router=replace(table.router, error_sketch_sites=()), shards=shards)
    (legacy / ROUTING_FILE).write_text(old_table.to_json())
    config = json.loads((legacy / "config.json").read_text())
    config["quantization_config"]["format_version"] = 3
    (legacy / "config.json").write_text(json.dumps(config))

    old = tap_runtime.load(legacy)
    assert old.table.format_version == 3 and not old.table.router.error_sketch_sites
    for kept, sketch in zip(stored, old.router.error_sketches):
        assert torch.equal(sketch, kept)
    assert torch.equal(old.router.token_log_frequency, current.router.token_log_frequency)
    ids = _ids()
    for tap in (old, current):
        tap.set_routing("fixed", tier=8)
    with torch.no_grad():
        assert torch.equal(old(ids).logits, current(ids).logits)


def test_scale_codes_decode_the_same_whatever_the_load_dtype(converted_factory):
    """The float32 scale reference must reach the decoder as stored, also when transformers
    loads the model in bfloat16 (a bfloat16 reference would move every scale by up to 0.4%)."""
    directory = converted_factory("llama")
    planes = {}
    for dtype in (torch.float32, torch.bfloat16):
        tap = tap_runtime.load(directory, dtype=dtype, keep_portable=True)
        module = tap.model.get_submodule("model.layers.0.mlp.up_proj")
        planes[dtype] = module.planes()
    for wide, narrow in zip(planes[torch.float32], planes[torch.bfloat16]):
        assert wide.scale_reference.dtype == narrow.scale_reference.dtype == torch.float32
        assert torch.equal(wide.scale_reference, narrow.scale_reference)
        assert torch.equal(wide.scales, narrow.scales)


@pytest.mark.parametrize("keep", [False, True], ids=["default", "asked"])
def test_load_keeps_freed_heap_for_activations_only_when_asked(converted_factory, monkeypatch, keep):
    import sys

    load_module = sys.modules["tap_runtime.load"]  # the package re-exports the function under this name
    calls = []
    monkeypatch.setattr(load_module, "keep_freed_heap", lambda: calls.append(True) or True)
    tap_runtime.load(converted_factory("llama"), **({"keep_freed_memory": True} if keep else {}))
    assert calls == ([True] if keep else [])


def test_base_activation_bits_are_set_on_every_kernel_or_refused(converted_factory):
    """load(base_activation_bits=8 or 15) reaches every linear's native kernel and changes the
    logits only slightly; the default is 8 bits in a prefill's base products and 15 in decode, on
    either build; 8 on a kernel without the choice, or another width, is refused by name, and 15
    there changes nothing."""
    from tap_runtime.errors import InvalidConfigError
    from tap_runtime.kernels.native import native_kernels

    directory = converted_factory("llama")
    with pytest.raises(InvalidConfigError, match="base_activation_bits must be None .* or one of"):
        tap_runtime.load(directory, base_activation_bits=4)
    with pytest.raises(InvalidConfigError, match="needs TAP's native kernel.*ReferenceKernel"):
        tap_runtime.load(directory, kernel="reference", base_activation_bits=8)
    reference = tap_runtime.load(directory, kernel="reference", base_activation_bits=15)
    with torch.inference_mode():
        assert torch.equal(reference(_ids()).logits, tap_runtime.load(directory, kernel="reference")(_ids()).logits)
    if native_kernels() is None:
        pytest.skip("TAP's native CPU kernels are unavailable here")
    loaded = {bits: tap_runtime.load(directory, base_activation_bits=bits) for bits in (8, 15, None)}

    def kernels(bits):
        return {id(m.kernel): m.kernel for m in loaded[bits].model.modules() if isinstance(m, TapLinear)}.values()

    assert kernels(8) and all(k.lane_base and k.base_wide_above == float("inf") for k in kernels(8))
    assert all(not k.lane_base and k.base_wide_above == 0.0 for k in kernels(15))
    assert all(k.lane_base and k.base_wide_above == 0.0 for k in kernels(None))
    with torch.inference_mode():
        logits = {bits: model(_ids()).logits for bits, model in loaded.items()}
    assert _relative(logits[8], logits[15]) < 2e-2 and _relative(logits[None], logits[15]) < 2e-2


def _mapped_file_of(tensor: torch.Tensor) -> str | None:
    """The file whose mapping holds ``tensor``'s first byte (from /proc/self/maps), or None."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(v, 16) for v in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])  # untied and tied heads
def test_output_rows_are_held_once_and_embedding_rows_stay_mapped(converted_factory, model_type):
    """The head's rows live only in the kernel's copy, and the embedding's int8 rows stay a view
    of the shard, so only the rows of tokens seen become resident; outputs do not change."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/maps")
    directory = converted_factory(model_type)
    lean = tap_runtime.load(directory)
    kept = tap_runtime.load(directory, keep_portable=True)
    head, embedding = lean.model.get_output_embeddings(), lean.model.get_input_embeddings()
    shard = str(directory / lean.table.shards[0].file_name)
    assert _mapped_file_of(embedding.weight) == shard
    if model_type == "qwen2":
        assert not hasattr(head, "weight")  # untied: released once the kernel had its copy
        with pytest.raises(RuntimeError, match="keep_portable=True"):
            head.rows()
        assert hasattr(kept.model.get_output_embeddings(), "weight")
    else:
        assert head.weight is embedding.weight  # tied: the head reads the embedding's rows
    with torch.inference_mode():
        assert torch.equal(lean(_ids()).logits, kept(_ids()).logits)
