"""Task inference: batched per-image gradients against the one-backward-per-image loop, binary search on ties,
and inference on really trained PermutedMNIST masks (the shared ``trained_bank`` fixture)."""
import pytest
import torch
from torch import nn

import supsup_lite.core.superpose as sp
from supsup_lite.core.inference import (alpha_gradient, alpha_gradient_each, binary_search, binary_search_each,
                                        binary_search_step, entropy, gradient_on_rows, is_fully_connected, one_shot,
                                        one_shot_each, superfluous_logsumexp, uniform_alphas)
from supsup_lite.core.masks import MaskBank
from supsup_lite.core.models import frozen_random_model, maskable_parameters, masked_forward
from supsup_lite.core.superpose import dense_max_tasks, superposed_mask_reference

DENSE_MAX_TASKS = dense_max_tasks(torch.device("cpu"))


def random_bank(tasks: int, outputs: int = 20, seed: int = 0, same_masks: bool = False, device: str = "cpu"):
    model = frozen_random_model("lenet_300_100", outputs, seed=0, device=device)
    bank = MaskBank.for_model(model)
    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in maskable_parameters(model).items()}
    for _ in range(tasks):
        bank.append(masks)
        if not same_masks:
            masks = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in maskable_parameters(model).items()}
    return model, bank


def g_objective(logits: torch.Tensor) -> torch.Tensor:
    return superfluous_logsumexp(logits, real_neurons=10)


@pytest.mark.parametrize("objective", [entropy, g_objective])
@pytest.mark.parametrize("group_size", [1, 3])
def test_batched_gradients_equal_the_loop(objective, group_size):
    model, bank = random_bank(6)
    x = torch.randn(9, 784, generator=torch.Generator().manual_seed(1))
    batched = alpha_gradient_each(model, bank, x, objective=objective, group_size=group_size)
    loop = torch.stack([alpha_gradient(model, bank, x[i:i + group_size], objective=objective)[1]
                        for i in range(0, 9, group_size)])
    torch.testing.assert_close(batched, loop, rtol=1e-4, atol=1e-6)


def test_batched_gradients_over_the_first_tasks_only():
    model, bank = random_bank(6)
    x = torch.randn(4, 784, generator=torch.Generator().manual_seed(2))
    batched = alpha_gradient_each(model, bank, x, num_tasks=4)
    alphas = uniform_alphas(bank, torch.arange(4))
    loop = torch.stack([alpha_gradient(model, bank, x[i:i + 1], alphas=alphas)[1][:4] for i in range(4)])
    torch.testing.assert_close(batched, loop, rtol=1e-4, atol=1e-6)
    assert one_shot_each(model, bank, x, num_tasks=4).tolist() == [one_shot(model, bank, x[i:i + 1], num_tasks=4)
                                                                    for i in range(4)]


def test_binary_search_ends_on_ties_and_single_images():
    x = torch.randn(1, 784, generator=torch.Generator().manual_seed(3))
    model, bank = random_bank(7, same_masks=True)  # every gradient ties (up to rounding)
    assert 0 <= binary_search(model, bank, x) < 7
    model, bank = random_bank(1)
    assert binary_search(model, bank, x) == 0 and one_shot(model, bank, x) == 0
    model, bank = random_bank(5)
    assert 0 <= binary_search(model, bank, x) < 5
    assert 0 <= binary_search(model, bank, x, num_tasks=3) < 3


def test_bad_inputs_raise_clear_errors():
    model, bank = random_bank(2)
    with pytest.raises(ValueError, match="B ≥ 1"):
        one_shot(model, bank, torch.zeros(0, 784))
    with pytest.raises(ValueError, match="num_tasks"):
        one_shot(model, bank, torch.zeros(1, 784), num_tasks=3)
    with pytest.raises(ValueError, match="divide"):
        alpha_gradient_each(model, bank, torch.zeros(5, 784), group_size=2)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.Flatten(), nn.Linear(2 * 26 * 26, 10, bias=False))
    assert not is_fully_connected(conv) and is_fully_connected(model)


def test_one_shot_on_trained_masks(trained_bank, permuted):
    model, bank = trained_bank
    xs = [permuted.test_set(t)[0][:8] for t in range(len(bank))]
    x = torch.cat(xs)
    each = one_shot_each(model, bank, x)
    assert each.tolist() == [one_shot(model, bank, x[i:i + 1]) for i in range(x.shape[0])]
    truth = torch.arange(len(bank)).repeat_interleave(8)
    assert (each == truth).float().mean() >= 0.7  # single images: 4 masks trained for 150 batches
    assert one_shot_each(model, bank, x, group_size=8).tolist() == list(range(len(bank)))  # batches of 8


@pytest.mark.parametrize("group_size", [1, 2])
def test_batched_binary_search_equals_the_loop(group_size):
    model, bank = random_bank(9, seed=4)
    x = torch.randn(6, 784, generator=torch.Generator().manual_seed(5))
    batched = binary_search_each(model, bank, x, group_size=group_size, num_tasks=7)
    loop = [binary_search(model, bank, x[i:i + group_size], num_tasks=7) for i in range(0, 6, group_size)]
    assert batched.tolist() == loop


def test_gradients_over_any_candidate_set():
    model, bank = random_bank(6)
    x = torch.randn(3, 784, generator=torch.Generator().manual_seed(6))
    candidates = torch.tensor([1, 4, 5])
    batched = alpha_gradient_each(model, bank, x, candidates=candidates)
    loop = torch.stack([alpha_gradient(model, bank, x[i:i + 1], alphas=uniform_alphas(bank, candidates))[1][candidates]
                        for i in range(3)])
    torch.testing.assert_close(batched, loop, rtol=1e-4, atol=1e-6)


def reference_gradient(model, bank, x, alphas, objective=entropy):
    """The plain reference: autograd through W ⊙ (α · float stack of the T masks)."""
    alphas = alphas.clone().requires_grad_(True)
    params = maskable_parameters(model)
    weights = {n: params[n] * superposed_mask_reference(bank.packed(n), bank.numels[n], alphas).view_as(params[n])
               for n in bank.names}
    value = objective(masked_forward(model, weights, x)).mean()
    (grad,) = torch.autograd.grad(value, alphas)
    return value.detach(), grad


def take_path(path: str, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """'dense': every bank is unpacked to floats; 'kernel': the default threshold, below the banks used here."""
    if path == "dense":
        monkeypatch.setattr(sp, "DENSE_MAX_TASKS", {"cpu": 10**9, "cuda": 10**9})
    else:
        assert dense_max_tasks(torch.device(device)) < 30


@pytest.mark.parametrize("tasks, path", [(3, "dense"), (30, "kernel")], ids=["dense path", "kernel path"])
@pytest.mark.parametrize("objective", [entropy, g_objective])
def test_alpha_gradient_equals_autograd_through_the_float_stack(tasks, path, objective, device, monkeypatch):
    take_path(path, device, monkeypatch)  # 30 masks: counts + masked adds (CPU) or byte tables (CUDA)
    model, bank = random_bank(tasks, seed=7, device=device)
    model = model.double()  # float64 throughout: the kernels must match the reference to float64 rounding
    x = torch.randn(16, 784, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(device)
    g = torch.Generator().manual_seed(9)
    for alphas in (uniform_alphas(bank), torch.rand(tasks, generator=g).to(device),
                   uniform_alphas(bank, torch.arange(1, tasks, device=device))):
        alphas = alphas.double()
        value, grad = alpha_gradient(model, bank, x, alphas=alphas, objective=objective)
        ref_value, ref_grad = reference_gradient(model, bank, x, alphas, objective)
        torch.testing.assert_close(value, ref_value)
        torch.testing.assert_close(grad, ref_grad)
        rows = torch.tensor([tasks - 1, 0, 2], device=device)
        _, on_rows = gradient_on_rows(model, bank, x, alphas, rows=rows, objective=objective)
        torch.testing.assert_close(on_rows, grad[rows])


@pytest.mark.parametrize("tasks, path", [(3, "dense"), (40, "kernel")], ids=["dense path", "kernel path"])
def test_one_shot_and_binary_search_equal_the_float_stack_search(tasks, path, device, monkeypatch):
    take_path(path, device, monkeypatch)
    model, bank = random_bank(tasks, seed=10, device=device)
    x = torch.randn(8, 784, generator=torch.Generator().manual_seed(11)).to(device)
    assert one_shot(model, bank, x) == int(reference_gradient(model, bank, x, uniform_alphas(bank))[1].argmin())
    candidates = torch.arange(tasks, device=device)
    while candidates.numel() > 1:
        candidates = binary_search_step(reference_gradient(model, bank, x, uniform_alphas(bank, candidates))[1],
                                        candidates)
    assert binary_search(model, bank, x) == int(candidates[0])


def test_one_shot_sees_tasks_appended_after_a_cached_call():
    model, bank = random_bank(DENSE_MAX_TASKS + 3, seed=12)
    model = model.double()
    x = torch.randn(8, 784, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    one_shot(model, bank, x)  # caches the count of all tasks
    g = torch.Generator().manual_seed(14)
    bank.append({n: torch.rand(p.shape, generator=g) < 0.5 for n, p in maskable_parameters(model).items()})
    alphas = uniform_alphas(bank).double()
    torch.testing.assert_close(alpha_gradient(model, bank, x, alphas=alphas)[1],
                               reference_gradient(model, bank, x, alphas)[1])
