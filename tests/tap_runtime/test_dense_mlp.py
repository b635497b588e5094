"""Many-token passes through gated MLPs (SiLU, GELU tanh) without float32 round trips (tap_runtime.dense_mlp)."""

import pytest
import torch

import tap_runtime
from tap_runtime.decode import FastDecoder
from tap_runtime.dense_mlp import dense_mlp_forward
from tap_runtime.kernels.native import native_kernels

pytestmark = pytest.mark.skipif(native_kernels() is None, reason="TAP's native CPU kernels are unavailable here")


def _mlps(tap):
    return [m for m in tap.model.modules() if getattr(m, "tap_dense_mlp", None) is not None]


@pytest.mark.parametrize("routing", [("fixed", 4), ("fixed", 8), ("budget", None)])
@pytest.mark.parametrize("group_size", [32, 64], ids=["g32-torch-planes", "g64-vnni-planes"])
def test_dense_mlp_gives_the_module_paths_output(converted_factory, routing, group_size):
    tap = tap_runtime.load(converted_factory("llama", group_size=group_size))
    tap.kernel.vnni_dense_min_tokens = 16  # the dense path from 16 tokens (the AVX2 build's default is higher)
    # 15-bit base products as on VNNI: the AVX2 default's 8-bit ones would let the two paths'
    # last-bit differences flip activation codes, a gap of its own that is not under test here.
    tap.kernel.lane_base = False
    mlps = _mlps(tap)
    assert len(mlps) == tap.table.num_layers and all(m.tap_dense_mlp for m in mlps)
    tap.set_routing(routing[0], tier=routing[1])
    ids = torch.randint(3, 320, (1, 40), generator=torch.Generator().manual_seed(0))
    original = mlps[0].forward
    with torch.inference_mode():
        x = torch.randn(1, 40, mlps[0].gate_proj.in_features, generator=torch.Generator().manual_seed(1))
        tap.router.route_layer(0, x)
        dense = dense_mlp_forward(mlps[0], x)
        mlps[0].tap_dense_mlp = False
        module = mlps[0](x)
        mlps[0].tap_dense_mlp = True
        assert dense is not None and dense.dtype == torch.float32 and dense.shape == module.shape
        torch.testing.assert_close(dense, module, rtol=1e-2, atol=1e-2 * float(module.abs().max()))
        routed = mlps[0].gate_proj.routing.indices_for_plane(1)
        if group_size == 64 and routing[0] == "budget":
            # Routed rows keep float32 gate and up on both paths: they agree as closely as the
            # base rows do (SiLU's last bits may flip a bfloat16 rounding of the down input; over
            # five inputs the gap ranged 0.8-1.9e-3 unrotated and 0.9-2.0e-3 rotated).
            assert routed is not None and 0 < routed.numel() < 40
            scale = float(module.abs().max())
            routed_gap = float((dense[0, routed] - module[0, routed]).abs().max()) / scale
            assert routed_gap < 3e-3, routed_gap
        assert dense_mlp_forward(mlps[0], x[:, :5]) is None  # few tokens: the module path (one-token kernels)
        on = tap.model(ids).logits
        for m in mlps:
            m.tap_dense_mlp = False
        off = tap.model(ids).logits
    torch.testing.assert_close(on, off, rtol=1e-2, atol=1e-2 * float(off.abs().max()))
    assert original is mlps[0].forward


@pytest.mark.parametrize("routing", [("fixed", 4), ("budget", None)])
def test_gemmas_gelu_tanh_mlp_takes_the_native_pass_and_gives_the_module_paths_output(converted_factory, routing):
    """Gemma's MLPs gate with GELU's tanh form: they take the native pass too (the activation
    computed in the same pass as SiLU's), and give the module path's output and logits."""
    tap = tap_runtime.load(converted_factory("gemma3_text", group_size=64))
    tap.kernel.vnni_dense_min_tokens = 16
    tap.kernel.lane_base = False  # 15-bit base products: see the Llama test above
    mlps = _mlps(tap)
    assert len(mlps) == tap.table.num_layers and all(m.tap_gate_activation == "gelu_tanh" for m in mlps)
    tap.set_routing(routing[0], tier=routing[1])
    ids = torch.randint(3, 320, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        x = torch.randn(1, 40, mlps[0].gate_proj.in_features, generator=torch.Generator().manual_seed(6))
        tap.router.route_layer(0, x)
        dense = dense_mlp_forward(mlps[0], x)
        mlps[0].tap_dense_mlp = False
        module = mlps[0](x)
        mlps[0].tap_dense_mlp = True
        assert dense is not None and dense.shape == module.shape
        torch.testing.assert_close(dense, module, rtol=1e-2, atol=1e-2 * float(module.abs().max()))
        on = tap.model(ids).logits
        for m in mlps:
            m.tap_dense_mlp = False
        off = tap.model(ids).logits
    torch.testing.assert_close(on, off, rtol=1e-2, atol=1e-2 * float(off.abs().max()))


def test_lean_loop_prefill_takes_the_dense_mlp(converted_factory, monkeypatch):
    tap = tap_runtime.load(converted_factory("llama", group_size=64))
    ids = torch.randint(3, 320, (1, 40), generator=torch.Generator().manual_seed(2))
    calls = []
    import tap_runtime.decode as decode

    original = decode.dense_mlp_forward
    monkeypatch.setattr(decode, "dense_mlp_forward", lambda *a: calls.append(1) or original(*a))
    decoder = FastDecoder(tap.model)
    decoder._allocate(ids.shape[1], torch.float32, ids.device)
    with torch.inference_mode():
        lean = decoder.forward(ids, 0)
        eager = tap.model(ids, logits_to_keep=1).logits.reshape(-1)
    assert len(calls) == tap.table.num_layers
    torch.testing.assert_close(lean, eager, rtol=1e-4, atol=1e-4)


def test_torchs_kernels_keep_the_module_path(converted_factory):
    tap = tap_runtime.load(converted_factory("llama", group_size=64), kernel="cpu-packed")
    assert not _mlps(tap)


def test_the_down_projection_gets_its_input_in_the_dtype_its_kernel_reads(converted_factory, monkeypatch):
    tap = tap_runtime.load(converted_factory("llama", group_size=64))
    tap.kernel.vnni_dense_min_tokens = 16
    mlp = _mlps(tap)[0]
    seen = []
    original = mlp.down_proj.products
    monkeypatch.setattr(mlp.down_proj, "products", lambda x, **kw: seen.append(x.dtype) or original(x, **kw))
    x = torch.randn(1, 40, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        tap.router.route_layer(0, x)
        for lanes in (True, False):
            tap.kernel.lane_base = tap.kernel.wide_lanes = lanes
            assert dense_mlp_forward(mlp, x) is not None
            # The lanes read float32; the dense GEMM its own dtype (bfloat16 where the CPU has it).
            assert seen[-1] == tap.kernel.many_token_input_dtype()
            assert seen[-1] == (torch.float32 if lanes else tap.kernel.dense_dtype)
