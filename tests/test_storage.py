"""Bytes per task: bit-packed as the MaskBank holds it, CSC as scipy stores it, dense fp32 models."""
import numpy as np
import pytest
import scipy.sparse
import torch

from supsup_lite.core.masks import MaskBank
from supsup_lite.core.models import frozen_random_model, maskable_parameters
from supsup_lite.core.storage import (SEED_BYTES, bitpacked_bytes, bytes_per_task, csc_matrix_bytes, dense_bytes,
                                      density, sparse_csc_bytes, total_bytes)


def random_mask(shape, keep, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < keep


def scipy_csc_bytes(mask: torch.Tensor) -> int:
    """Reference: scipy's own CSC arrays of the (out, fan_in) matrix; 16-bit row indices, 16/32-bit pointers."""
    matrix = scipy.sparse.csc_matrix(mask.reshape(mask.shape[0], -1).numpy().astype(np.uint8))
    pointer_bytes = 2 if matrix.nnz < 2**16 else 4
    return 2 * matrix.indices.size + pointer_bytes * matrix.indptr.size


@pytest.mark.parametrize("shape,keep", [((300, 784), 0.01), ((300, 784), 0.5), ((100, 300), 0.3),
                                        ((16, 3, 3, 3), 0.2), ((10, 100), 0.0)])
def test_csc_bytes_match_scipy(shape, keep):
    mask = random_mask(shape, keep)
    assert csc_matrix_bytes(mask) == scipy_csc_bytes(mask)


def test_pointers_widen_past_65535_kept_weights():
    dense_mask = torch.ones(300, 784, dtype=torch.bool)  # 235,200 kept weights
    assert csc_matrix_bytes(dense_mask) == 2 * 235_200 + 4 * 785
    small = torch.ones(100, 300, dtype=torch.bool)  # 30,000 kept weights
    assert csc_matrix_bytes(small) == 2 * 30_000 + 2 * 301


def test_bitpacked_bytes_are_what_the_bank_holds():
    model = frozen_random_model("lenet_300_100", 100, seed=0, device="cpu")
    masks = {n: random_mask(p.shape, 0.5, i) for i, (n, p) in enumerate(maskable_parameters(model).items())}
    bank = MaskBank.for_model(model)
    bank.append(masks)
    assert bitpacked_bytes(masks) == bitpacked_bytes({n: m.shape for n, m in masks.items()}) == bank.nbytes
    assert bitpacked_bytes(masks) == 275_200 // 8  # 784·300 + 300·100 + 100·100 bits (LeNet, s = 100)


def test_sparse_beats_bitpacking_only_below_one_sixteenth_density():
    shape = (300, 784)
    for keep, sparse_wins in ((0.03, True), (0.2, False), (0.5, False)):
        masks = {"w": random_mask(shape, keep)}
        assert (sparse_csc_bytes(masks) < bitpacked_bytes(masks)) is sparse_wins


def test_dense_bytes_and_the_per_task_table():
    model = frozen_random_model("lenet_300_100", 10, seed=0, device="cpu")
    params = 784 * 300 + 300 * 100 + 100 * 10
    assert dense_bytes(model) == dense_bytes(model.parameters()) == 4 * params
    masks = {n: random_mask(p.shape, 0.5, i) for i, (n, p) in enumerate(maskable_parameters(model).items())}
    table = bytes_per_task(model, masks)
    assert table == {"SupSup bit-packed": sum(-(-m.numel() // 8) for m in masks.values()),
                     "SupSup sparse CSC (16-bit)": sum(scipy_csc_bytes(m) for m in masks.values()),
                     "dense fp32 model": 4 * params}
    assert abs(density(masks) - 0.5) < 0.01


def test_totals_and_errors():
    assert total_bytes(100, 20) == SEED_BYTES + 2000
    with pytest.raises(ValueError, match="num_tasks"):
        total_bytes(100, -1)
    with pytest.raises(ValueError, match="≥ 2 dimensions"):
        csc_matrix_bytes(torch.ones(5, dtype=torch.bool))
