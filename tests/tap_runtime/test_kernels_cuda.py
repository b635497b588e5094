"""The CUDA kernel against the reference kernel; runs only where a CUDA device (sm80+) exists."""

import pytest
import torch

from tap_convert.quantize import quantize_rows, quantize_tiers
from tap_runtime.errors import InvalidConfigError
from tap_runtime.format import PlaneSpec
from tap_runtime.kernels import ReferenceKernel, select_kernel
from tap_runtime.kernels.cuda import CudaPackedKernel, cuda_kernels_available, inner_k_tiles, tinygemm_bytes

needs_cuda = pytest.mark.skipif(not cuda_kernels_available(), reason="needs a CUDA device of compute capability >= 8.0")


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_tinygemm_bytes_put_the_even_column_in_the_high_nibble():
    codes = torch.tensor([[1, 2, 15, 0]])
    assert tinygemm_bytes(codes).tolist() == [[0x12, 0xF0]]


def test_inner_k_tiles_takes_the_largest_that_divides():
    assert inner_k_tiles(4096) == 8
    assert inner_k_tiles(576) == 4  # SmolLM2: 576 = 9 x 64
    assert inner_k_tiles(96) == 2
    with pytest.raises(ValueError, match="in_features % 32"):
        inner_k_tiles(40)


def test_cuda_kernel_refused_without_cuda():
    if cuda_kernels_available():
        assert select_kernel("cuda-packed", "cuda").name == "cuda-packed"
    else:
        with pytest.raises(InvalidConfigError, match="cuda-packed"):
            select_kernel("cuda-packed", "cuda")


@needs_cuda
@pytest.mark.parametrize("tokens", [1, 7, 64], ids=lambda t: f"m{t}")
@pytest.mark.parametrize("shape", [(64, 128), (40, 192), (1536, 576)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [32, 64])
def test_cuda_int4_matches_reference(shape, symmetric, tokens, group_size):
    out_features, in_features = shape
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) * 0.05
    (plane,) = quantize_tiers(weight, (PlaneSpec(4, group_size, symmetric),))
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(1)).cuda()
    reference = ReferenceKernel("cuda")
    expected = reference.matmul_plane(x, reference.prepare_plane(plane))
    kernel = CudaPackedKernel("cuda")
    got = kernel.matmul_plane(x, kernel.prepare_plane(plane))
    assert got.device.type == "cuda" and got.shape == expected.shape and got.dtype == torch.bfloat16
    assert _relative_error(got, expected) < 1e-2


@needs_cuda
def test_cuda_int8_rows_match_reference():
    weight = torch.randn(1000, 576, generator=torch.Generator().manual_seed(2))
    rows = quantize_rows(weight)
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(3)).cuda()
    reference = ReferenceKernel("cuda")
    kernel = CudaPackedKernel("cuda")
    assert _relative_error(kernel.matmul_rows(x, kernel.prepare_rows(rows)), reference.matmul_rows(x, reference.prepare_rows(rows))) < 1e-2


@needs_cuda
def test_cuda_dense_prefill_path_matches_reference():
    weight = torch.randn(1536, 576, generator=torch.Generator().manual_seed(0)) * 0.05
    (plane,) = quantize_tiers(weight, (PlaneSpec(4, 64, False),))
    x = torch.randn(256, 576, generator=torch.Generator().manual_seed(1)).cuda()
    reference = ReferenceKernel("cuda")
    expected = reference.matmul_plane(x, reference.prepare_plane(plane))
    kernel = CudaPackedKernel("cuda", dense_min_tokens=64)
    prepared = kernel.prepare_plane(plane)
    assert _relative_error(kernel.matmul_plane(x, prepared), expected) < 1e-2
    assert _relative_error(kernel.matmul_plane(x[:3], prepared), expected[:3]) < 1e-2
