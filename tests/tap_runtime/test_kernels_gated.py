"""The flag-reading residual kernel (Triton; without a GPU, run by Triton's CPU interpreter)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Before Triton is first imported: its language library is built for the interpreter then.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tap_convert.quantize import quantize_tiers
from tap_runtime.format import PlaneSpec
from tap_runtime.kernels import ReferenceKernel
from tap_runtime.planes import Plane

triton = pytest.importorskip("triton", reason="Triton is optional (CUDA builds of torch ship it)")


@pytest.fixture
def interpreter() -> torch.device:
    """Where the kernel runs: the GPU when there is one, else Triton's interpreter on the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter was not switched on before Triton was imported")
    return torch.device("cpu")


@pytest.fixture
def cpu_interpreter():
    """CPU tensors through Triton's interpreter (on a GPU machine the CUDA tests cover the step)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is on only where there is no GPU")


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("shape,group", [((40, 96), 32), ((64, 128), 64), ((70, 256), 128)], ids=["40x96g32", "64x128g64", "70x256g128"])
def test_adds_the_plane_product_only_where_the_flag_is_set(interpreter, shape, group, symmetric):
    from tap_runtime.kernels.gated import gated_kernel_available, gated_plane_add

    device = interpreter
    assert gated_kernel_available(device)
    out_features, in_features = shape
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) * 0.05
    _, residual = quantize_tiers(weight, (PlaneSpec(4, group, False), PlaneSpec(4, group, symmetric)))
    x = torch.randn(1, in_features, generator=torch.Generator().manual_seed(1))
    expected = ReferenceKernel().matmul_plane(x, ReferenceKernel().prepare_plane(residual))
    start = torch.randn(1, out_features, generator=torch.Generator().manual_seed(2))
    on_device = Plane(residual.spec, *(None if t is None else t.to(device) for t in (residual.qweight, residual.scales, residual.zeros)))
    out = start.clone().to(device)
    gated_plane_add(torch.tensor(0, dtype=torch.int32, device=device), x.to(device), on_device, out)
    assert torch.equal(out.cpu(), start)  # unset flag: nothing read, nothing written
    gated_plane_add(torch.tensor(1, dtype=torch.int32, device=device), x.to(device), on_device, out)
    torch.testing.assert_close(out.cpu(), start + expected, rtol=1e-5, atol=1e-5)


def test_refuses_outputs_it_cannot_update_in_place(cpu_interpreter):
    from tap_runtime.kernels.gated import gated_plane_add

    (plane,) = quantize_tiers(torch.randn(32, 64), (PlaneSpec(4, 32, False),))
    flag = torch.tensor(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="float32"):
        gated_plane_add(flag, torch.randn(1, 64), plane, torch.zeros(1, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="one token"):
        gated_plane_add(flag, torch.randn(2, 64), plane, torch.zeros(1, 32))


def test_unavailable_without_a_gpu_or_the_interpreter(monkeypatch):
    from tap_runtime.kernels.gated import gated_kernel_available

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not gated_kernel_available("cpu")


@pytest.mark.parametrize("routing", [("budget", None), ("fixed", 8)], ids=["budget", "fixed8"])
def test_graph_step_with_the_gated_kernel_decodes_as_the_lean_loop(cpu_interpreter, converted_factory, routing):
    """The decode step with every residual plane behind the flag-reading kernel: the lean loop's
    tokens and per-layer tier counts (float32 sums in another order, so thresholds agree to 1e-9)."""
    import tap_runtime
    from tap_runtime.decode import FastDecoder
    from tap_runtime.graph_decode import GraphDecoder

    tap = tap_runtime.load(converted_factory("llama"), kernel="cpu-packed", keep_portable=True)
    tap.set_routing(routing[0], tier=routing[1])
    ids = tap.encode("The river flows past the old mill and")
    results = []
    for decoder in (FastDecoder(tap.model), GraphDecoder(tap.model, capture=False, residual="gated")):
        tap.router.begin_sequence()
        tap.router.reset_counts()
        tokens = decoder.generate(ids, 16, eos_token_id=[]).token_ids
        results.append((tokens, tap.router.counts.clone(), torch.tensor(tap.router._budget_rows)))
    assert decoder.branch_mode == "gated"
    (tokens, counts, rows), (got_tokens, got_counts, got_rows) = results
    assert got_tokens == tokens
    assert torch.equal(got_counts, counts) and counts[:, 1:].sum() > 0
    if routing[0] == "budget":
        torch.testing.assert_close(got_rows, rows, rtol=1e-4, atol=1e-6)  # quantiles of scores: see test_graph_decode


def test_gated_step_needs_the_portable_planes(cpu_interpreter, converted_factory):
    import tap_runtime
    from tap_runtime.errors import InvalidConfigError
    from tap_runtime.graph_decode import GraphDecoder

    tap = tap_runtime.load(converted_factory("llama"), kernel="cpu-packed")
    tap.set_routing("fixed", tier=8)
    with pytest.raises(InvalidConfigError, match="keep_portable"):
        GraphDecoder(tap.model, capture=False, residual="gated").generate(tap.encode("The river"), 3, eos_token_id=[])
