"""K masks at once must be K sequential train_supermask runs: same batches, same seeds, same masks."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from supsup_lite.data import SplitMNIST
from supsup_lite.core.masks import init_scores, supermask_weight
from supsup_lite.core.models import build_model, frozen_random_model, masked_forward, signed_constant_
from supsup_lite.core.multitask import (batched_forward, stacked_masked_weights, stacked_scores,
                                        summed_task_losses, train_bank, train_masks_at_once)
from supsup_lite.core.training import train_supermask


@pytest.fixture(scope="module")
def lenet() -> nn.Module:
    return frozen_random_model("lenet_300_100", 10, seed=0, device="cpu")


def mismatched_fraction(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b) and all(a[n].dtype == b[n].dtype == torch.bool for n in a)
    return sum(int((a[n] != b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)


def test_stacked_scores_are_the_per_task_initialisations(lenet):
    stacked = stacked_scores(lenet, [4, 9])
    for k, seed in enumerate([4, 9]):
        single = init_scores(lenet, torch.Generator().manual_seed(seed))
        assert all(torch.equal(stacked[n][k], single[n]) for n in single)
    assert all(s.is_leaf and s.requires_grad for s in stacked.values())


def test_one_batched_step_gives_each_task_its_own_gradient(lenet, permuted):
    seeds, tasks = [0, 1, 2], [0, 3, 1]
    batches = [next(permuted.train_batches(t, 32, 1, s)) for t, s in zip(tasks, seeds)]
    stacked = stacked_scores(lenet, seeds)
    x, y = torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])
    logits = batched_forward(lenet, stacked_masked_weights(lenet, stacked), x)
    summed_task_losses(logits, y, None).backward()
    params = dict(lenet.named_parameters())
    for k, seed in enumerate(seeds):  # reference: one task alone, plain autograd
        scores = init_scores(lenet, torch.Generator().manual_seed(seed))
        weights = {n: supermask_weight(params[n], s) for n, s in scores.items()}
        F.cross_entropy(masked_forward(lenet, weights, batches[k][0]), batches[k][1]).backward()
        for name, s in scores.items():
            torch.testing.assert_close(stacked[name].grad[k], s.grad, rtol=1e-5, atol=1e-7)


def test_masks_at_once_equal_sequential_runs(lenet, permuted):
    tasks, seeds = [0, 2, 4], [3, 1, 4]
    at_once = train_masks_at_once(lenet, permuted, tasks, num_batches=40, batch_size=64, seeds=seeds, progress=False)
    for task, seed, masks in zip(tasks, seeds, at_once):
        sequential, _ = train_supermask(lenet, permuted, task, num_batches=40, batch_size=64, seed=seed,
                                        progress=False)
        assert mismatched_fraction(masks, sequential) <= 1e-4  # float rounding of bmm vs mm; in practice 0


def test_topk_masks_at_once_equal_sequential_runs(lenet, permuted):
    at_once = train_masks_at_once(lenet, permuted, [1, 2], num_batches=6, batch_size=64, keep_frac=0.3,
                                  progress=False)
    for task, masks in zip([1, 2], at_once):
        sequential, _ = train_supermask(lenet, permuted, task, num_batches=6, batch_size=64, seed=task,
                                        keep_frac=0.3, progress=False)
        assert mismatched_fraction(masks, sequential) <= 1e-4
        assert all(m.sum() == m.numel() - int(0.7 * m.numel()) for m in masks.values())


def test_unequal_epochs_are_padded_without_changing_the_result(lenet):
    split = SplitMNIST(2, device="cpu")  # digits 0/1 and 2/3: 12,665 and 12,089 training images
    # batches of 600: 22 and 21 per epoch, both ending in a partial batch, so one stream ends first
    assert [-(-split.num_train(t) // 600) for t in (0, 1)] == [22, 21]
    at_once = train_masks_at_once(lenet, split, [0, 1], num_batches=None, batch_size=600, progress=False)
    for task, masks in enumerate(at_once):
        sequential, _ = train_supermask(lenet, split, task, num_batches=None, batch_size=600, seed=task,
                                        progress=False)
        assert mismatched_fraction(masks, sequential) <= 1e-4


def test_batched_forward_matches_separate_forwards_for_a_conv_net():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10, bias=False))
    signed_constant_(net, torch.Generator().manual_seed(0))
    stacked = stacked_scores(net, [0, 1])
    weights = {n: w.detach() for n, w in stacked_masked_weights(net, stacked).items()}
    x = torch.randn(2, 5, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    together = batched_forward(net, weights, x)
    for k in range(2):
        alone = masked_forward(net, {n: w[k] for n, w in weights.items()}, x[k])
        torch.testing.assert_close(together[k], alone, rtol=1e-5, atol=1e-5)
    single = batched_forward(net, {n: w[1:] for n, w in weights.items()}, x[1:])  # K = 1 takes the plain path
    torch.testing.assert_close(single[0], together[1], rtol=1e-5, atol=1e-5)


def test_bank_does_not_depend_on_k_and_can_resume(lenet, permuted):
    settings = dict(num_batches=8, batch_size=64, arch="lenet_300_100", base_seed=0, progress=False)
    by_two = train_bank(lenet, permuted, 3, k=2, **settings)
    by_three = train_bank(lenet, permuted, 3, k=3, **settings)
    resumed = train_bank(lenet, permuted, 3, k=5, bank=train_bank(lenet, permuted, 1, k=1, **settings), **settings)
    assert len(by_two) == len(by_three) == len(resumed) == 3
    assert (by_two.arch, by_two.base_seed, by_two.num_outputs) == ("lenet_300_100", 0, 10)
    for name in by_two.names:
        assert torch.equal(by_two.packed(name), by_three.packed(name))
        assert torch.equal(by_two.packed(name), resumed.packed(name))


def test_bad_inputs_are_refused_early(lenet, permuted):
    with pytest.raises(ValueError, match="frozen"):
        train_masks_at_once(build_model("lenet_300_100"), permuted, [0], num_batches=1, progress=False)
    with pytest.raises(ValueError, match="one seed per task"):
        train_masks_at_once(lenet, permuted, [0, 1], num_batches=1, seeds=[0], progress=False)
    with pytest.raises(ValueError, match="tasks is empty"):
        train_masks_at_once(lenet, permuted, [], num_batches=1, progress=False)
    with pytest.raises(IndexError, match="out of range"):
        train_masks_at_once(lenet, permuted, [0, 99], num_batches=1, progress=False)
    with pytest.raises(ValueError, match="num_batches"):
        train_masks_at_once(lenet, permuted, [0], num_batches=0, progress=False)
    with pytest.raises(ValueError, match="k .* must be ≥ 1"):
        train_bank(lenet, permuted, 2, k=0)
    with pytest.raises(ValueError, match="num_tasks must lie in 1..5"):
        train_bank(lenet, permuted, 6)
