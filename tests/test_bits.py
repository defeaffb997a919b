import pytest
import torch

from supsup_lite.core.bits import pack_bits, packed_size, unpack_bits


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 784 * 300, 1001])
def test_round_trip_is_exact(numel, device):
    g = torch.Generator().manual_seed(numel)
    mask = (torch.rand(3, numel, generator=g) < 0.5).to(device)
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (3, packed_size(numel)) and packed.device == mask.device
    assert torch.equal(unpack_bits(packed, numel), mask)


def test_bit_order_is_least_significant_first():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert pack_bits(mask).tolist() == [1, 2]
    assert pack_bits(torch.tensor([0, 0, 0, 0, 0, 0, 0, 1])).tolist() == [128]


def test_unpack_rejects_wrong_sizes_and_types():
    with pytest.raises(ValueError, match="expected 2 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 10)
    with pytest.raises(TypeError, match="uint8"):
        unpack_bits(torch.zeros(2, dtype=torch.int32), 10)
