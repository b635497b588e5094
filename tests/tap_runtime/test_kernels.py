import pytest
import torch

from tap_convert.quantize import quantize_rows, quantize_tiers
from tap_runtime.errors import InvalidConfigError
from tap_runtime.format import PlaneSpec
from tap_runtime.planes import RowQuantized
from tap_runtime.kernels import CpuPackedKernel, ReferenceKernel, select_kernel
from tap_runtime.kernels.native import native_kernels
from tap_runtime.kernels.cpu import aligned, cpu_int4_layout_known, cpu_kernels_available, unpack_cpu_int4pack

pytestmark = pytest.mark.skipif(not cpu_kernels_available(), reason="torch lacks packed CPU kernels")


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("tokens", [1, 7, 64], ids=lambda t: f"m{t}")
@pytest.mark.parametrize("shape", [(64, 128), (40, 96), (576, 576)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_packed_int4_matches_reference(shape, symmetric, tokens):
    out_features, in_features = shape
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) * 0.05
    (plane,) = quantize_tiers(weight, (PlaneSpec(4, 32, symmetric),))
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(1))
    expected = ReferenceKernel().matmul_plane(x, ReferenceKernel().prepare_plane(plane))
    kernel = CpuPackedKernel()
    got = kernel.matmul_plane(x, kernel.prepare_plane(plane))
    assert got.shape == expected.shape and got.dtype == torch.bfloat16  # widened by the caller when planes add
    # bfloat16 activations and scales: about 3 significant digits.
    assert _relative_error(got, expected) < 1e-2


@pytest.mark.parametrize("shape", [(320, 64), (1000, 576)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_packed_int8_rows_match_reference(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    rows = quantize_rows(weight)
    x = torch.randn(5, shape[1], generator=torch.Generator().manual_seed(3))
    expected = ReferenceKernel().matmul_rows(x, ReferenceKernel().prepare_rows(rows))
    kernel = CpuPackedKernel()
    assert _relative_error(kernel.matmul_rows(x, kernel.prepare_rows(rows)), expected) < 1e-2


def test_int8_kernel_refuses_widths_it_cannot_compute():
    rows = quantize_rows(torch.randn(16, 40))
    with pytest.raises(ValueError, match="in_features % 16"):
        CpuPackedKernel().prepare_rows(rows)


def test_aligned_copies_only_misaligned_tensors():
    base = torch.zeros(1024, dtype=torch.int8)
    assert aligned(base) is base
    shifted = base[8:72]
    assert shifted.data_ptr() % 64 != 0
    copy = aligned(shifted)
    assert copy.data_ptr() % 64 == 0 and torch.equal(copy, shifted)


def test_select_kernel(device):
    assert select_kernel("reference", device).name == "reference"
    if device.type == "cpu":
        native = native_kernels()
        build = native.instruction_set() if native is not None else ""
        expected = {"avx512-vnni": "cpu-vnni", "avx2": "cpu-avx2"}.get(build, "cpu-packed")
        assert select_kernel("auto", device).name == expected
        assert select_kernel("cpu-packed", device).name == "cpu-packed"
        # A native kernel asked for by name is that build or a clear error, never the other build.
        for name in ("cpu-vnni", "cpu-avx2"):
            if name == expected:
                assert select_kernel(name, device).name == name
            else:
                with pytest.raises(InvalidConfigError, match=f"kernel '{name}' is not available"):
                    select_kernel(name, device)
    with pytest.raises(InvalidConfigError, match="kernel 'fast' is unknown"):
        select_kernel("fast", device)


def test_cpu_int4_layout_is_the_one_we_unpack():
    if not cpu_int4_layout_known():
        # A layout TAP cannot read (a CPU with neither AVX-512 nor AVX2): the dense prefill path,
        # which unpacks planes, must be off, and the unpacker must refuse rather than misread.
        assert CpuPackedKernel().dense_min_tokens is None
        with pytest.raises(RuntimeError, match="not one TAP can unpack"):
            unpack_cpu_int4pack(torch.zeros(64, 32, dtype=torch.uint8), 64)
        pytest.skip("torch's packed int4 layout on this CPU is none TAP reads; checked that it is not used")
    codes = torch.randint(0, 16, (192, 96), generator=torch.Generator().manual_seed(4), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    assert torch.equal(unpack_cpu_int4pack(packed, 96).to(torch.int32), codes)


def pack_like_torch(codes: torch.Tensor, block_rows: int) -> torch.Tensor:
    """The packer's layout written out by hand: per block, per column, low nibble row d, high d + half."""
    rows, cols = codes.shape
    half = block_rows // 2
    packed = torch.empty(rows * cols // 2, dtype=torch.uint8)
    position = 0
    for block in range(0, rows, block_rows):
        for column in range(cols):
            for d in range(half):
                packed[position] = int(codes[block + d, column]) | (int(codes[block + d + half, column]) << 4)
                position += 1
    return packed.view(rows, cols // 2)


@pytest.mark.parametrize("block_rows", [64, 32], ids=["avx512-layout", "avx2-layout"])
def test_unpack_reads_both_known_int4_layouts(block_rows):
    """CI and development machines differ in vector units; the unpacker must read either layout."""
    codes = torch.randint(0, 16, (128, 8), generator=torch.Generator().manual_seed(5), dtype=torch.int32)
    packed = pack_like_torch(codes, block_rows)
    assert torch.equal(unpack_cpu_int4pack(packed, 8, block_rows).to(torch.int32), codes)


@pytest.mark.parametrize("dense_dtype", [torch.bfloat16, torch.float32], ids=["bf16-dense", "f32-dense"])
@pytest.mark.parametrize("shape", [(40, 96), (576, 576)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dense_prefill_path_matches_reference(shape, dense_dtype):
    """From dense_min_tokens on, the plane is unpacked from the packed layout and multiplied densely."""
    out_features, in_features = shape
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) * 0.05
    (plane,) = quantize_tiers(weight, (PlaneSpec(4, 32, False),))
    x = torch.randn(300, in_features, generator=torch.Generator().manual_seed(1))
    expected = ReferenceKernel().matmul_plane(x, ReferenceKernel().prepare_plane(plane))
    kernel = CpuPackedKernel(dense_min_tokens=256, dense_dtype=dense_dtype)
    prepared = kernel.prepare_plane(plane)
    dense = kernel.matmul_plane(x, prepared)
    assert dense.dtype == dense_dtype
    # float32 dense: only the kernel's bfloat16 group scales differ from the reference.
    assert _relative_error(dense, expected) < (1e-2 if dense_dtype == torch.bfloat16 else 5e-3)
    assert _relative_error(kernel.matmul_plane(x[:5], prepared), expected[:5]) < 1e-2  # int4 path
    assert kernel.dequantize_plane(prepared).dtype == dense_dtype


def test_dense_type_follows_the_cpu(monkeypatch):
    """bfloat16 only where the CPU multiplies it in hardware; float32 on AVX2 (7x faster there)."""
    import tap_runtime.kernels.cpu as cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: "flags : fpu avx2 fma avx512f avx512_bf16")
    assert cpu.cpu_bfloat16_gemm_native() and CpuPackedKernel().dense_dtype == torch.bfloat16
    monkeypatch.setattr(cpu, "cpu_flags", lambda: "flags : fpu avx2 fma")
    assert not cpu.cpu_bfloat16_gemm_native() and CpuPackedKernel().dense_dtype == torch.float32
    with pytest.raises(ValueError, match="dense_dtype"):
        CpuPackedKernel(dense_dtype=torch.float16)


@pytest.mark.skipif(not cpu_kernels_available(), reason="torch lacks its packed CPU ops here")
def test_head_refines_the_largest_logits_in_float32():
    """torch's int8 kernel rounds logits to bfloat16; a greedy step must still tell close tokens apart."""
    generator = torch.Generator().manual_seed(6)
    qweight = torch.randint(-127, 128, (320, 64), generator=generator, dtype=torch.int8)
    # Row 7 is row 3 with one code one step higher: their logits differ by one code step only,
    # which bfloat16 cannot resolve at this magnitude.
    qweight[3] = torch.full((64,), 100, dtype=torch.int8)
    qweight[7] = qweight[3]
    qweight[7, 0] += 1
    scales = torch.full((320,), 0.01)
    x = torch.full((2, 64), 1.0)
    x[1, 0] = -1.0  # the second token prefers row 3
    rows = RowQuantized(qweight, scales)
    exact = x @ (qweight.to(torch.float32) * scales.unsqueeze(-1)).t()
    kernel = CpuPackedKernel()
    refined = kernel.matmul_rows(x, kernel.prepare_rows(rows))
    assert refined.dtype == torch.float32
    assert refined.argmax(dim=-1).tolist() == exact.argmax(dim=-1).tolist() == [7, 3]
    top = exact.topk(4, dim=-1).indices
    torch.testing.assert_close(refined.gather(-1, top), exact.gather(-1, top), rtol=1e-6, atol=1e-6)
    rounded = CpuPackedKernel(refine_top=0).matmul_rows(x, kernel.prepare_rows(rows))
    assert rounded.dtype == torch.bfloat16 and rounded[0, 3] == rounded[0, 7]  # the tie refining breaks


def test_head_many_tokens_in_float32_where_the_cpu_lacks_bfloat16():
    """Prefill-sized head calls on a float32-dense kernel: exact float32 logits, sliced rows."""
    import tap_runtime.kernels.cpu as cpu

    generator = torch.Generator().manual_seed(7)
    qweight = torch.randint(-127, 128, (cpu.HEAD_DENSE_ROWS + 96, 64), generator=generator, dtype=torch.int8)
    scales = torch.rand(qweight.shape[0], generator=generator) * 0.01 + 1e-3
    x = torch.randn(cpu.HEAD_DENSE_MIN_TOKENS, 64, generator=generator)
    exact = x @ (qweight.to(torch.float32) * scales.unsqueeze(-1)).t()
    kernel = CpuPackedKernel(dense_dtype=torch.float32)
    out = kernel.matmul_rows(x, kernel.prepare_rows(RowQuantized(qweight, scales)))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-4)
    # The bfloat16-dense kernel keeps torch's int8 kernel, whose logits are rounded.
    rounded = CpuPackedKernel(dense_dtype=torch.bfloat16).matmul_rows(x, kernel.prepare_rows(RowQuantized(qweight, scales)))
    assert rounded.dtype == torch.bfloat16
