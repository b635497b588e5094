"""offload_to_cpu: device maps from a budget, accelerate's prefix rule, hooks that swap planes in.

The hook mechanism is device-generic, so the CPU tests run it with host and "device" both the
CPU; the tests marked needs_cuda check the real thing (planes in pinned memory, copied per call).
"""

from __future__ import annotations

import pytest
import torch

import tap_runtime
from tap_runtime.errors import InvalidConfigError
from tap_runtime.kernels.cuda import cuda_kernels_available
from tap_runtime.layers import TapLinear
from tap_runtime.offload import HostPlane, attach_offload_hooks, offloaded_linears, plan_device_map, plane_bytes, to_host

needs_cuda = pytest.mark.skipif(not cuda_kernels_available(), reason="offloading needs a CUDA device of compute capability >= 8.0")

PROMPT = "The river flows past the old mill and"


def _table(converted_factory):
    return tap_runtime.load(converted_factory("llama")).table


def _layer_bytes(table, index):
    return sum(plane_bytes(p) for p in table.linear.values() if p.layer_index == index)


def test_plan_fills_the_gpu_in_layer_order(converted_factory):
    table = _table(converted_factory)
    layers = table.num_layers
    assert layers >= 2
    everything = plan_device_map(table, 10**12)
    assert everything[""] == 0 and all(everything[f"model.layers.{i}"] == 0 for i in range(layers))
    assert offloaded_linears(table, everything) == set()

    one_layer = plan_device_map(table, _layer_bytes(table, 0))
    assert one_layer["model.layers.0"] == 0
    assert all(one_layer[f"model.layers.{i}"] == "cpu" for i in range(1, layers))
    hosted = offloaded_linears(table, one_layer)
    assert hosted == {name for name, p in table.linear.items() if p.layer_index not in (None, 0)}

    nothing = plan_device_map(table, 0)
    assert all(nothing[f"model.layers.{i}"] == "cpu" for i in range(layers))
    with pytest.raises(InvalidConfigError, match=">= 0 bytes"):
        plan_device_map(table, -1)


def test_device_maps_follow_accelerates_longest_prefix_rule(converted_factory):
    table = _table(converted_factory)
    device_map = {"": 0, "model.layers": "cpu", "model.layers.0": 0, "model.layers.1.mlp.down_proj": 0}
    hosted = offloaded_linears(table, device_map)
    assert not any(name.startswith("model.layers.0.") for name in hosted)
    assert "model.layers.1.mlp.down_proj" not in hosted
    assert "model.layers.1.self_attn.q_proj" in hosted
    # "model.layers.1" must not capture "model.layers.10": prefixes end on module boundaries.
    assert offloaded_linears(table, {"": 0, "model.layers.1": "cpu"}) == {n for n in table.linear if n.startswith("model.layers.1.")}
    with pytest.raises(InvalidConfigError, match="'disk'"):
        offloaded_linears(table, {"": 0, "model.layers.1": "disk"})
    with pytest.raises(InvalidConfigError, match="places no device"):
        offloaded_linears(table, {"model.layers.0": 0})


def test_offloading_needs_a_gpu(converted_factory):
    with pytest.raises(InvalidConfigError, match="is not a GPU"):
        tap_runtime.load(converted_factory("llama"), offload_to_cpu=True)
    with pytest.raises(InvalidConfigError, match="is not a GPU"):
        tap_runtime.load(converted_factory("llama"), device_map={"": "cpu"})


@pytest.mark.parametrize("decode", ["fast", "eager"])
def test_hooks_swap_planes_in_per_call_and_change_no_token(converted_factory, decode):
    expected = tap_runtime.load(converted_factory("llama")).generate(PROMPT, max_new_tokens=12, decode=decode).token_ids
    tap = tap_runtime.load(converted_factory("llama"))  # hooks go on before the first generate, as load() does
    hosted = [m for name, m in tap.model.named_modules() if isinstance(m, TapLinear) and name.startswith("model.layers.1.")]
    for module in hosted:
        module._prepared = to_host(module._prepared)
    attach_offload_hooks(hosted, torch.device("cpu"))
    calls = []
    for module in hosted:
        hook = module._hf_hook
        original = hook.pre_forward

        def counted(mod, *args, _original=original, **kwargs):
            calls.append(mod)
            result = _original(mod, *args, **kwargs)
            assert mod._prepared is not hook.host_planes or hook.host_planes == []
            return result

        hook.pre_forward = counted
    result = tap.generate(PROMPT, max_new_tokens=12, decode=decode)
    assert result.token_ids == expected
    assert len(calls) >= len(hosted) * 12  # every offloaded linear ran through its hook for every token
    for module in hosted:
        assert module._prepared is module._hf_hook.host_planes  # the device copy is dropped after each call


def test_residual_planes_cross_only_when_tokens_are_routed_there(converted_factory, monkeypatch):
    tap = tap_runtime.load(converted_factory("llama"))
    hosted = [m for name, m in tap.model.named_modules() if isinstance(m, TapLinear) and name.startswith("model.layers.0.")]
    for module in hosted:
        module._prepared = to_host(module._prepared)
    attach_offload_hooks(hosted, torch.device("cpu"))
    copies = []
    original = HostPlane.resolve
    monkeypatch.setattr(HostPlane, "resolve", lambda self: copies.append(self) or original(self))
    tap.set_routing("fixed", tier=4)
    tap.generate(PROMPT, max_new_tokens=4)
    assert copies == []  # base tier only: no residual byte moves
    tap.set_routing("fixed", tier=8)
    tap.generate(PROMPT, max_new_tokens=4)
    assert len(copies) >= len(hosted) * 4
    assert all(plane.copy is None for m in hosted for plane in m._hf_hook.residual)  # dropped after each call


@needs_cuda
def test_offloaded_model_on_the_gpu_gives_the_same_tokens_with_less_gpu_memory(converted_factory):
    path = converted_factory("llama")
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    resident = tap_runtime.load(path, device="cuda")
    resident_bytes = torch.cuda.memory_allocated() - before
    expected = resident.generate(PROMPT, max_new_tokens=12).token_ids
    del resident
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    tap = tap_runtime.load(path, device="cuda", offload_to_cpu=True, max_gpu_memory_mb=0)
    offloaded_bytes = torch.cuda.memory_allocated() - before
    summary = tap.model.tap_offload
    assert summary.gpu_plane_bytes == 0 and summary.host_plane_bytes > 0
    for name in summary.offloaded:
        module = tap.model.get_submodule(name)
        packed = module._prepared[0].packed
        assert packed.device.type == "cpu" and packed.is_pinned()
    # The planes left the GPU (the resident model also keeps a copy of the codes for prefill).
    assert offloaded_bytes + summary.host_plane_bytes <= resident_bytes
    assert tap.generate(PROMPT, max_new_tokens=12).token_ids == expected
    assert tap.generate(PROMPT, max_new_tokens=12, decode="eager").token_ids == expected


@needs_cuda
def test_a_hand_written_device_map_on_the_gpu(converted_factory):
    path = converted_factory("llama")
    tap = tap_runtime.load(path, device="cuda", device_map={"": 0, "model.layers.1": "cpu"})
    assert tap.model.tap_offload.offloaded and all(n.startswith("model.layers.1.") for n in tap.model.tap_offload.offloaded)
    assert len(tap.generate(PROMPT, max_new_tokens=4).token_ids) == 4
    with pytest.raises(InvalidConfigError, match="one GPU"):
        tap_runtime.load(path, device="cuda", device_map={"": 0, "model.layers.1": 1})
