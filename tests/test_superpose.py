"""The packed-bank superposition kernel against the plain float-stack reference (values and gradients)."""
import pytest
import torch

import supsup_lite.core.superpose as sp
from supsup_lite.core.bits import pack_bits, unpack_bits
from supsup_lite.core.masks import MaskBank
from supsup_lite.core.models import frozen_random_model, maskable_parameters
from supsup_lite.core.superpose import (mask_counts, masks_dot, superposed_mask, superposed_mask_reference,
                                        superposed_weights, unpack_float)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_packed(tasks: int, numel: int, seed: int, device: str = "cpu", density: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return pack_bits(torch.rand(tasks, numel, generator=g) < density).to(device)


@pytest.fixture(params=["blocks", "dense"])
def small_blocks(request, monkeypatch):
    """Both paths: counting / byte tables with tiny blocks (every block boundary crossed), or dense unpacking."""
    if request.param == "dense":
        monkeypatch.setattr(sp, "DENSE_MAX_TASKS", 10**9)
        return
    monkeypatch.setattr(sp, "ROWS_PER_COUNT", 3)
    monkeypatch.setattr(sp, "COLUMN_BLOCK", 16)
    monkeypatch.setattr(sp, "TABLE_BLOCK", 5)
    monkeypatch.setattr(sp, "GATHER_ROWS", 4)
    monkeypatch.setattr(sp, "DENSE_MAX_TASKS", 0)


ALPHAS = {
    "uniform": lambda t, g: torch.full((t,), 1.0 / t, dtype=torch.float64),
    "random": lambda t, g: torch.rand(t, generator=g, dtype=torch.float64) - 0.3,
    "subset": lambda t, g: (torch.rand(t, generator=g) < 0.5).double() / 3,
    "two_values": lambda t, g: torch.where(torch.rand(t, generator=g) < 0.5, 0.25, 0.75).double(),
    "zero": lambda t, g: torch.zeros(t, dtype=torch.float64),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tasks,numel", [(1, 1), (2, 7), (5, 64), (11, 203), (20, 1001)])
@pytest.mark.parametrize("kind", sorted(ALPHAS))
def test_forward_and_gradient_match_float_stack(device, tasks, numel, kind, small_blocks):
    g = torch.Generator().manual_seed(tasks * 1000 + numel)
    packed = random_packed(tasks, numel, seed=numel, device=device)
    alphas = ALPHAS[kind](tasks, g).to(device)
    upstream = torch.randn(numel, generator=g, dtype=torch.float64).to(device)
    ours_a = alphas.clone().requires_grad_(True)
    ref_a = alphas.clone().requires_grad_(True)
    ours = superposed_mask(packed, numel, ours_a)
    ref = superposed_mask_reference(packed, numel, ref_a)
    torch.testing.assert_close(ours, ref)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(ours_a.grad, ref_a.grad)


def test_float64_gradcheck_small():
    packed = random_packed(6, 29, seed=3)
    alphas = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: superposed_mask(packed, 29, a), (alphas,))


@pytest.mark.parametrize("numel", [1, 8, 63, 65, 1000])
def test_counts_and_dot_products_are_exact(numel, small_blocks):
    packed = random_packed(9, numel, seed=numel, density=0.7)
    masks = unpack_bits(packed, numel, torch.int32)
    assert torch.equal(mask_counts(packed, numel), masks.sum(0))
    rows = torch.tensor([8, 0, 3])
    assert torch.equal(mask_counts(packed, numel, rows), masks[rows].sum(0))
    vector = torch.randn(numel, dtype=torch.float64)
    torch.testing.assert_close(masks_dot(packed, numel, vector), masks.double() @ vector)


def test_unpack_float_equals_unpack_bits():
    packed = random_packed(4, 77, seed=1)
    assert torch.equal(unpack_float(packed, 77), unpack_bits(packed, 77, torch.float32))


def test_default_blocks_over_127_tasks_leave_the_bank_untouched():
    packed = random_packed(130, 4000, seed=2)
    before = packed.clone()
    alphas = torch.full((130,), 1 / 130, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = superposed_mask(packed, 4000, alphas)
    (ours * upstream).sum().backward()
    assert torch.equal(packed, before)
    torch.testing.assert_close(ours, superposed_mask_reference(packed, 4000, alphas.detach()))
    torch.testing.assert_close(alphas.grad, unpack_bits(packed, 4000, torch.float64) @ upstream)


@pytest.fixture(scope="module")
def random_bank():
    model = frozen_random_model("lenet_300_100", 20, seed=0, device="cpu")
    bank = MaskBank.for_model(model)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        bank.append({n: torch.rand(p.shape, generator=g) < 0.5 for n, p in maskable_parameters(model).items()})
    return model, bank


def test_superposed_weights_equal_w_times_reference(random_bank):
    model, bank = random_bank
    alphas = torch.tensor([0.1, 0.0, 0.5, 0.2, 0.2])
    weights = superposed_weights(model, bank, alphas)
    for name, weight in maskable_parameters(model).items():
        ref = superposed_mask_reference(bank.packed(name), bank.numels[name], alphas).view_as(weight)
        torch.testing.assert_close(weights[name], weight * ref)


def test_bad_inputs_raise_clear_errors(random_bank):
    model, bank = random_bank
    with pytest.raises(ValueError, match="shape \\(5,\\)"):
        superposed_weights(model, bank, torch.ones(4))
    with pytest.raises(ValueError, match="floating"):
        superposed_weights(model, bank, torch.ones(5, dtype=torch.long))
    empty = MaskBank.for_model(model)
    with pytest.raises(ValueError, match="empty mask bank"):
        superposed_weights(model, empty, torch.ones(0))
    with pytest.raises(ValueError, match="expected 2"):
        superposed_mask(torch.zeros(3, 5, dtype=torch.uint8), 9, torch.ones(3))
    with pytest.raises(TypeError, match="uint8"):
        superposed_mask(torch.zeros(3, 2), 9, torch.ones(3))
