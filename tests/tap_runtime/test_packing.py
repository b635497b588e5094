import pytest
import torch

from tap_runtime.packing import pack_int4, unpack_int4


@pytest.mark.parametrize("shape", [(1, 2), (3, 64), (128, 576), (17, 30)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_pack_unpack_round_trip_is_exact(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], shape[1] // 2)
    assert torch.equal(unpack_int4(packed), codes)


def test_low_nibble_holds_the_even_column():
    assert pack_int4(torch.tensor([[1, 2]])).tolist() == [[0x21]]


def test_every_code_value_survives():
    codes = torch.arange(16, dtype=torch.uint8).repeat(4, 2)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


def test_odd_columns_are_rejected():
    with pytest.raises(ValueError, match="even number of columns"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


def test_out_of_range_codes_are_rejected():
    with pytest.raises(ValueError, match=r"codes in \[0, 15\]"):
        pack_int4(torch.tensor([[0, 16]]))


def test_unpack_needs_uint8():
    with pytest.raises(ValueError, match="2-D uint8"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int8))
