import pytest
import torch

from tap_convert.quantize import quantize_tiers
from tap_runtime.format import LinearPolicy, PlaneSpec, plane_tensor_suffix
from tap_runtime.kernels import CpuPackedKernel, ReferenceKernel
from tap_runtime.kernels.native import native_kernels
from tap_runtime.kernels.vnni import CpuVnniKernel
from tap_runtime.layers import TapLinear
from tap_runtime.planes import dequantize_linear, dequantize_planes
from tap_runtime.rotation import rotate_weight
from tap_runtime.router import ALL_TOKENS, LayerRouting


def _linear(kernel, tiers=(4, 8), bias=True):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator) * 0.05
    specs = tuple(PlaneSpec(4, 32, i > 0) for i in range(len(tiers)))
    planes = quantize_tiers(weight, specs)
    policy = LinearPolicy("layer", 64, 48, bias, 0, tiers, specs)
    module = TapLinear(policy)
    for index, plane in enumerate(planes):
        for field_name, tensor in plane.stored_tensors().items():
            getattr(module, plane_tensor_suffix(index, field_name)).data = tensor
    bias_tensor = torch.randn(48, generator=generator) if bias else None
    if bias:
        module.bias.data = bias_tensor
    module.prepare(kernel)
    module.routing = LayerRouting(0)
    return module, planes, bias_tensor


def _native_linear(kernel, out_features, in_features, min_tier=4):
    """A tiers-4/8 linear at group size 64 (the native kernels' layout), prepared on kernel."""
    specs = (PlaneSpec(4, 64, False), PlaneSpec(4, 64, False))
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) * 0.05
    planes = quantize_tiers(weight, specs)
    module = TapLinear(LinearPolicy("layer", in_features, out_features, False, 0, (4, 8), specs, min_tier=min_tier))
    for index, plane in enumerate(planes):
        for field_name, tensor in plane.stored_tensors().items():
            getattr(module, plane_tensor_suffix(index, field_name)).data = tensor
    module.prepare(kernel)
    return module, planes


@pytest.mark.parametrize("kernel", [ReferenceKernel(), CpuPackedKernel()], ids=lambda k: k.name)
def test_routed_tokens_get_the_residual_plane_and_others_do_not(kernel):
    module, planes, bias = _linear(kernel)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    module.routing.plane_indices = [torch.tensor([1, 7])]  # flat token indices
    out = module(x).reshape(10, 48)
    flat = x.reshape(10, 64)
    base = flat @ dequantize_planes(planes, 1).t() + bias
    top = flat @ dequantize_planes(planes, 2).t() + bias
    tolerance = 2e-2 if kernel.name == "cpu-packed" else 1e-5
    routed = torch.zeros(10, dtype=torch.bool)
    routed[[1, 7]] = True
    assert torch.allclose(out[routed], top[routed], atol=tolerance, rtol=tolerance)
    assert torch.allclose(out[~routed], base[~routed], atol=tolerance, rtol=tolerance)


def test_all_and_none_markers():
    module, planes, _ = _linear(ReferenceKernel(), bias=False)
    x = torch.randn(1, 3, 64)
    module.routing.plane_indices = [ALL_TOKENS]
    assert torch.allclose(module(x)[0], x[0] @ dequantize_planes(planes, 2).t(), atol=1e-5)
    module.routing.plane_indices = [None]
    assert torch.allclose(module(x)[0], x[0] @ dequantize_planes(planes, 1).t(), atol=1e-5)


@pytest.mark.skipif(native_kernels() is None, reason="TAP's native CPU kernels are unavailable here")
@pytest.mark.parametrize("always_planes", [1, 2])  # top tier by routing, and by the layer's min_tier
def test_many_tokens_reading_every_plane_take_one_summed_product(monkeypatch, always_planes):
    """A pass where every token reads planes 0..k multiplies once by their sum, not once per
    plane; routed subsets still take the residual product for their rows only."""
    kernel = CpuVnniKernel(dense_min_tokens=16)
    generator = torch.Generator().manual_seed(1)
    module, planes = _native_linear(kernel, 64, 128, min_tier=8 if always_planes == 2 else 4)
    module.routing = LayerRouting(0, [ALL_TOKENS] if always_planes == 1 else [])
    calls = {"summed": 0, "plane": 0}
    summed, single = kernel.matmul_plane_sum, kernel.matmul_plane
    monkeypatch.setattr(kernel, "matmul_plane_sum", lambda *a: calls.__setitem__("summed", calls["summed"] + 1) or summed(*a))
    monkeypatch.setattr(kernel, "matmul_plane", lambda *a: calls.__setitem__("plane", calls["plane"] + 1) or single(*a))
    x = torch.randn(40, 128, generator=generator)
    top = x @ dequantize_planes(planes, 2).t()
    assert float((module(x) - top).norm() / top.norm()) < 1e-2
    assert calls == {"summed": 1, "plane": 0}
    if always_planes == 1:
        module.routing.plane_indices = [torch.arange(0, 40, 3)]
        out = module(x)
        routed = torch.zeros(40, dtype=torch.bool)
        routed[::3] = True
        base = x @ dequantize_planes(planes, 1).t()
        assert float((out[routed] - top[routed]).norm() / top[routed].norm()) < 1e-2
        assert float((out[~routed] - base[~routed]).norm() / base[~routed].norm()) < 1e-2


class _CountingNative:
    """The native module with its lane-kernel calls counted."""

    def __init__(self, native):
        self._native, self.lane_calls = native, 0

    def __getattr__(self, name):
        return getattr(self._native, name)

    def matmul_w4_many(self, *args):
        self.lane_calls += 1
        return self._native.matmul_w4_many(*args)

    def __dir__(self):
        return dir(self._native)

    @property
    def matmul_w4_rows_add(self):
        rows_add = getattr(self._native, "matmul_w4_rows_add")

        def call(*args):
            self.lane_calls += 1
            return rows_add(*args)

        return call


@pytest.mark.skipif(native_kernels() is None, reason="TAP's native CPU kernels are unavailable here")
@pytest.mark.parametrize("lane_residuals", [True, False])
def test_routed_rows_of_a_many_token_call_take_the_lane_kernel(lane_residuals):
    """Prefill: the routed rows' residual product goes through the 8-bit lane kernel (unless
    switched off); decode keeps the one-token kernel's 15-bit activations. (The base product
    keeps its 15-bit path here, so that only the residual's lane calls are counted.)"""
    kernel = CpuVnniKernel(lane_residuals=lane_residuals, lane_base=False)
    lanes = 1 if lane_residuals and kernel.has_lane_kernel else 0
    kernel.native = _CountingNative(kernel.native)
    module, planes = _native_linear(kernel, 40, 128)
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(1))
    routed = torch.zeros(40, dtype=torch.bool)
    routed[::3] = True
    module.routing = LayerRouting(0, [routed.nonzero().flatten()])
    out = module(x)
    top, base = x @ dequantize_planes(planes, 2).t(), x @ dequantize_planes(planes, 1).t()
    assert float((out[routed] - top[routed]).norm() / top[routed].norm()) < 1e-2
    assert float((out[~routed] - base[~routed]).norm() / base[~routed].norm()) < 1e-2
    assert kernel.native.lane_calls == lanes
    module.routing = LayerRouting(0, [torch.tensor([0])])
    one = module(x[:1])
    assert float((one - top[:1]).norm() / top[:1].norm()) < 1e-3  # 15-bit activations
    assert kernel.native.lane_calls == lanes


@pytest.mark.skipif(native_kernels() is None, reason="TAP's native CPU kernels are unavailable here")
@pytest.mark.parametrize("routed", [[0, 5, 6, 39], [38, 2, 17], list(range(40))], ids=["sorted", "unsorted", "every"])
def test_routed_residuals_added_in_place_give_the_gather_and_scatter_bits(monkeypatch, routed):
    """Prefill, either build: the routed rows' residual products read x's rows where they are and
    add into the base product's rows (matmul_routed_add). The output is bitwise what gathering
    the rows, multiplying and index_add_ gave."""
    kernel = CpuVnniKernel()
    module, _ = _native_linear(kernel, 44, 192)  # 44 rows: a partial group of 8
    x = torch.randn(40, 192, generator=torch.Generator().manual_seed(2))
    module.routing = LayerRouting(0, [torch.tensor(routed)])
    calls = []
    routed_add = kernel.matmul_routed_add
    monkeypatch.setattr(kernel, "matmul_routed_add", lambda *a: calls.append(routed_add(*a)) or calls[-1])
    in_place = module(x)
    assert calls == [True]
    monkeypatch.setattr(kernel, "matmul_routed_add", lambda *a: False)
    assert torch.equal(in_place, module(x))


@pytest.mark.skipif(native_kernels() is None, reason="TAP's native CPU kernels are unavailable here")
def test_eight_bit_base_activations_take_the_lane_kernel_in_prefill_and_narrow_blocks_in_decode():
    """base_activation_bits=8: a many-token call's base product is the lane kernel's (8-bit per
    block of 64, bitwise its output), routed rows add their residual as before; a few-token call
    whose tokens read the base plane alone takes the one-token kernel's 8-bit mode, and a routed
    token's base product keeps 15 bits."""
    kernel = CpuVnniKernel()
    kernel.set_base_activation_bits(8)
    kernel.native = _CountingNative(kernel.native)
    module, planes = _native_linear(kernel, 40, 128)
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(1))
    base_plane = module._prepared[0]
    lane = kernel.native._native.matmul_w4_many(
        x, base_plane.weight, base_plane.scales, base_plane.zeros, base_plane.group_size, base_plane.first_row, 40
    )
    module.routing = LayerRouting(0, [None])
    out = module(x)
    assert torch.equal(out, lane)
    assert kernel.native.lane_calls == 1
    base = x @ dequantize_planes(planes, 1).t()
    error = float((out - base).norm() / base.norm())
    assert 1e-4 < error < 2e-2  # 8-bit activations: coarser than 15 bits, still close
    routed = torch.zeros(40, dtype=torch.bool)
    routed[::3] = True
    module.routing = LayerRouting(0, [routed.nonzero().flatten()])
    out = module(x)
    top = x @ dequantize_planes(planes, 2).t()
    assert torch.equal(out[~routed], lane[~routed])
    assert float((out[routed] - top[routed]).norm() / top[routed].norm()) < 2e-2
    assert kernel.native.lane_calls == 3  # base and residual
    module.routing = LayerRouting(0, [None])
    narrow = module(x[:1])
    native = kernel.native._native
    assert torch.equal(narrow, native.matmul_w4(
        x[:1].contiguous(), base_plane.weight, base_plane.scales, base_plane.zeros, base_plane.group_size, float("inf"), 0, 40
    ))
    module.routing = LayerRouting(0, [torch.tensor([0])])
    routed_one = module(x[:1])
    assert float((routed_one - top[:1]).norm() / top[:1].norm()) < 1e-3  # 15 bits for a routed token
    assert kernel.native.lane_calls == 3
    kernel.set_base_activation_bits(15)
    assert (kernel.lane_base, kernel.base_wide_above) == (False, 0.0)
    with pytest.raises(ValueError, match="one of"):
        kernel.set_base_activation_bits(4)


@pytest.mark.skipif(native_kernels() is None, reason="TAP's native CPU kernels are unavailable here")
@pytest.mark.parametrize("lane_base", [False, True], ids=["15-bit-dense-base", "8-bit-lane-base"])
def test_a_bfloat16_caller_gets_the_routed_rows_apart_in_float32(lane_base):
    """products() (the dense MLP's gate and up) keeps a 15-bit base product in the dense type
    (bfloat16 where the CPU multiplies it natively) with routed tokens and hands their rows over
    apart: base + residual, in float32. The 8-bit lane base product (the default) is float32,
    and the routed residuals are added into it in place."""
    kernel = CpuVnniKernel(dense_min_tokens=16, lane_base=lane_base)
    module, planes = _native_linear(kernel, 32, 128)
    x = torch.randn(24, 128, generator=torch.Generator().manual_seed(1))
    module.routing = LayerRouting(0, [None])
    base_only, none = module.products(x)
    float_base = kernel.many_token_input_dtype() == torch.float32  # lanes, or a float32 dense GEMM
    assert base_only.dtype == (torch.float32 if float_base else kernel.dense_dtype) and none is None
    routed = torch.tensor([2, 9, 10])
    module.routing = LayerRouting(0, [routed])
    got, rows = module.products(x)
    top = x @ dequantize_planes(planes, 2).t()
    if float_base:
        # Nothing to keep apart: the residual is added in place, in float32.
        assert rows is None and got.dtype == torch.float32
        assert float((got[routed] - top[routed]).norm() / top[routed].norm()) < 1e-2  # the residual's 8-bit lanes
        unrouted = torch.ones(24, dtype=torch.bool)
        unrouted[routed] = False
        assert torch.equal(got[unrouted], base_only[unrouted])
        return
    assert torch.equal(got, base_only) and torch.equal(rows.indices, routed)
    residual = kernel.matmul_routed(x[routed], module._prepared[1], 24)
    assert rows.rows.dtype == torch.float32 and torch.equal(rows.rows, base_only[routed].float() + residual)
    assert float((rows.rows - top[routed]).norm() / top[routed].norm()) < 1e-2
    merged = rows.into(got)
    assert merged.dtype == torch.float32 and torch.equal(merged[routed], rows.rows)
    assert torch.equal(merged[3], base_only[3].float())


def test_prepare_releases_the_portable_planes():
    module, _, _ = _linear(CpuPackedKernel())
    names = {name for name, _ in module.named_parameters()}
    assert names == {"bias"}


def test_unprepared_module_says_how_to_load():
    policy = LinearPolicy("layer", 64, 48, False, 0, (4, 8), (PlaneSpec(4, 32, False), PlaneSpec(4, 32, True)))
    with pytest.raises(RuntimeError, match="tap_runtime.load"):
        TapLinear(policy)(torch.randn(1, 64))


@pytest.mark.parametrize(
    "kernel",
    [ReferenceKernel(), CpuPackedKernel()] + ([CpuVnniKernel()] if native_kernels() is not None else []),
    ids=lambda k: k.name,
)
def test_a_rotated_linear_multiplies_its_own_input(kernel):
    """Planes that store W H (input_rotation 64) give x W^T: the module rotates x itself."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(64, 128, generator=generator) * 0.05
    weight[:, 5] *= 20  # an outlier column, the case the rotation is for
    specs = (PlaneSpec(4, 64, False), PlaneSpec(4, 64, False))
    policy = LinearPolicy("layer", 128, 64, False, 0, (4, 8), specs, input_rotation=64)
    planes = quantize_tiers(rotate_weight(weight, 64), specs)
    module = TapLinear(policy)
    for index, plane in enumerate(planes):
        for field_name, tensor in plane.stored_tensors().items():
            getattr(module, plane_tensor_suffix(index, field_name)).data = tensor
    module.prepare(kernel)
    module.routing = LayerRouting(0, [torch.tensor([0, 3])])
    x = torch.randn(1, 6, 128, generator=generator)
    out = module(x)[0]
    base, top = x[0] @ dequantize_linear(planes, policy, 1).t(), x[0] @ dequantize_linear(planes, policy, 2).t()
    tolerance = 1e-5 if kernel.name == "reference" else 2e-2
    torch.testing.assert_close(out[[0, 3]], top[[0, 3]], atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(out[[1, 2, 4, 5]], base[[1, 2, 4, 5]], atol=tolerance, rtol=tolerance)
    # ... and it is the original weight, up to the rounding of its planes.
    assert float((top - x[0] @ weight.t()).norm() / (x[0] @ weight.t()).norm()) < 5e-3


def test_sibling_linears_rotate_their_shared_input_once(monkeypatch):
    """q, k and v called with one tensor rotate it once between them; another tensor, even
    with equal values, is rotated afresh, and every output equals the unshared module's."""
    from torch import nn

    from tap_runtime import layers

    generator = torch.Generator().manual_seed(3)
    specs = (PlaneSpec(4, 64, False), PlaneSpec(4, 64, True))
    parent = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj"):
        weight = torch.randn(32, 128, generator=generator) * 0.05
        policy = LinearPolicy(name, 128, 32, False, 0, (4, 8), specs, input_rotation=64)
        module = TapLinear(policy)
        for index, plane in enumerate(quantize_tiers(rotate_weight(weight, 64), specs)):
            for field_name, tensor in plane.stored_tensors().items():
                getattr(module, plane_tensor_suffix(index, field_name)).data = tensor
        module.prepare(ReferenceKernel())
        module.routing = LayerRouting(0, [torch.tensor([1])])
        setattr(parent, name, module)
    x = torch.randn(1, 4, 128, generator=generator)
    alone = [getattr(parent, name)(x) for name in ("q_proj", "k_proj", "v_proj")]

    assert layers.share_input_rotations(parent) == 1
    calls = []
    original = layers.rotate_input
    monkeypatch.setattr(layers, "rotate_input", lambda t, block: calls.append(block) or original(t, block))
    shared = [getattr(parent, name)(x) for name in ("q_proj", "k_proj", "v_proj")]
    assert calls == [64]
    for a, b in zip(alone, shared):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # The hold ends with the last sibling: a new call rotates again, and a copy is not the same input.
    parent.q_proj(x)
    parent.k_proj(x.clone())
    assert calls == [64, 64, 64]
    # The copy's rotation replaced x's, so v rotates x again and still gets its own output.
    torch.testing.assert_close(parent.v_proj(x), alone[2], atol=0, rtol=0)
    assert calls == [64, 64, 64, 64]


def test_siblings_with_different_rotations_do_not_share():
    from torch import nn

    from tap_runtime import layers

    specs = (PlaneSpec(4, 64, False), PlaneSpec(4, 64, True))
    parent = nn.Module()
    parent.gate_proj = TapLinear(LinearPolicy("gate_proj", 128, 32, False, 0, (4, 8), specs, input_rotation=64))
    parent.up_proj = TapLinear(LinearPolicy("up_proj", 128, 32, False, 0, (4, 8), specs, input_rotation=0))
    assert layers.share_input_rotations(parent) == 0
    assert parent.gate_proj.shared_rotation is None and parent.up_proj.shared_rotation is None
