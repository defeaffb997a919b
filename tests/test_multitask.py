"""K masks at once must be K one-by-one train_supermask runs: same batches, same seeds, same masks, bit for bit."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from supsup_lite.config import derive_seed
from supsup_lite.core.masks import MaskBankError, init_scores, supermask_weight
from supsup_lite.core.models import batched_masked_forward, frozen_random_model, masked_forward, signed_constant_
from supsup_lite.core.training import (masked_weights, stacked_scores, task_losses, train_bank, train_supermask,
                                       train_supermasks)
from supsup_lite.data import PermutedMNIST, SplitMNIST


@pytest.fixture(scope="module")
def lenet() -> nn.Module:
    return frozen_random_model("lenet_300_100", 10, seed=0, device="cpu")


def assert_same_masks(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.bool
        assert torch.equal(a[name], b[name]), f"{name}: {int((a[name] != b[name]).sum())} bits differ"


def test_stacked_scores_are_the_per_task_initialisations(lenet):
    stacked = stacked_scores(lenet, [4, 9])
    for k, seed in enumerate([4, 9]):
        single = init_scores(lenet, torch.Generator().manual_seed(seed))
        assert all(torch.equal(stacked[n][k], single[n]) for n in single)
    assert all(s.is_leaf and s.requires_grad for s in stacked.values())


def test_one_batched_step_gives_each_task_its_own_gradient(lenet, permuted):
    seeds, tasks = [0, 1, 2], [0, 3, 1]
    batches = [next(iter(permuted.train_batches(t, 32, 1, s))) for t, s in zip(tasks, seeds)]
    stacked = stacked_scores(lenet, seeds)
    x, y = torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])
    logits = batched_masked_forward(lenet, masked_weights(lenet, stacked), x)
    task_losses(logits, y, None).sum().backward()
    params = dict(lenet.named_parameters())
    for k, seed in enumerate(seeds):  # reference: one task alone, plain autograd
        scores = init_scores(lenet, torch.Generator().manual_seed(seed))
        weights = {n: supermask_weight(params[n], s) for n, s in scores.items()}
        F.cross_entropy(masked_forward(lenet, weights, batches[k][0]), batches[k][1]).backward()
        for name, s in scores.items():
            torch.testing.assert_close(stacked[name].grad[k], s.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("keep_frac", [None, 0.3])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_masks_at_once_equal_one_by_one_runs(permuted_on, keep_frac, chunk, device):
    lenet = frozen_random_model("lenet_300_100", 10, seed=0, device=device)
    tasks, seeds = [0, 2, 4], [3, 1, 4]
    batches = lambda t, s: permuted_on.train_batches(t, 64, 12, s)  # noqa: E731
    at_once = train_supermasks(lenet, [batches(t, s) for t, s in zip(tasks, seeds)], seeds=seeds,
                               keep_frac=keep_frac, chunk=chunk, progress=False)
    assert len(at_once.masks) == len(at_once.history) == 3
    for task, seed, masks, history in zip(tasks, seeds, at_once.masks, at_once.history):
        alone = train_supermask(lenet, batches(task, seed), seed=seed, keep_frac=keep_frac, progress=False)
        assert_same_masks(masks, alone.masks[0])
        assert history.loss == alone.history[0].loss


def test_unequal_epochs_are_padded_without_changing_the_result(lenet):
    split = SplitMNIST(2, device="cpu")  # digits 0/1 and 2/3: 12,665 and 12,089 training images
    # batches of 600: 22 and 21 per epoch, both ending in a partial batch, so one stream ends first
    assert [-(-split.num_train(t) // 600) for t in (0, 1)] == [22, 21]
    batches = [split.train_batches(t, 600, None, t) for t in (0, 1)]
    at_once = train_supermasks(lenet, batches, seeds=[0, 1], chunk=2, progress=False)
    assert [len(h.loss) for h in at_once.history] == [22, 21]
    for task, masks in enumerate(at_once.masks):
        alone = train_supermask(lenet, split.train_batches(task, 600, None, task), seed=task, progress=False)
        assert_same_masks(masks, alone.masks[0])


def test_batched_masked_forward_matches_separate_forwards_for_a_conv_net():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10, bias=False))
    signed_constant_(net, torch.Generator().manual_seed(0))
    stacked = stacked_scores(net, [0, 1])
    weights = {n: w.detach() for n, w in masked_weights(net, stacked).items()}
    x = torch.randn(2, 5, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    together = batched_masked_forward(net, weights, x)
    for k in range(2):
        alone = masked_forward(net, {n: w[k] for n, w in weights.items()}, x[k])
        torch.testing.assert_close(together[k], alone, rtol=1e-5, atol=1e-5)
    single = batched_masked_forward(net, {n: w[1:] for n, w in weights.items()}, x[1:])  # K = 1: the plain path
    torch.testing.assert_close(single[0], together[1], rtol=1e-5, atol=1e-5)


def test_bank_does_not_depend_on_k_and_can_resume(lenet, permuted):
    settings = dict(num_batches=8, batch_size=64, progress=False)
    by_two = train_bank(lenet, permuted, num_tasks=3, k=2, **settings)
    by_three = train_bank(lenet, permuted, num_tasks=3, k=3, **settings)
    first = train_bank(lenet, permuted, num_tasks=1, k=1, **settings)
    resumed = train_bank(lenet, permuted, num_tasks=3, k=5, bank=first, **settings)
    assert len(by_two) == len(by_three) == len(resumed) == 3
    assert (by_two.arch, by_two.base_seed, by_two.num_outputs) == ("lenet_300_100", 0, 10)
    assert by_two.stream == permuted.fingerprint()
    with pytest.raises(MaskBankError, match="trained on the task stream"):
        train_bank(lenet, PermutedMNIST(3, seed=5, device="cpu"), num_tasks=3, bank=first, **settings)
    for name in by_two.names:
        assert torch.equal(by_two.packed(name), by_three.packed(name))
        assert torch.equal(by_two.packed(name), resumed.packed(name))
    task2 = train_supermask(lenet, permuted.train_batches(2, 64, 8, derive_seed(0, 2, "batches")),
                            seed=derive_seed(0, 2, "scores"), progress=False)
    assert all(torch.equal(by_two.get(2, torch.bool)[n], task2.masks[0][n]) for n in by_two.names)


def test_bad_inputs_are_refused_early(lenet, permuted):
    batches = [permuted.train_batches(0, 64, 1, 0)]
    with pytest.raises(ValueError, match="one seed per task: 1 tasks, 2 seeds"):
        train_supermasks(lenet, batches, seeds=[0, 1], progress=False)
    with pytest.raises(ValueError, match="batches_per_task is empty"):
        train_supermasks(lenet, [], seeds=[], progress=False)
    with pytest.raises(ValueError, match="chunk .* must be ≥ 1"):
        train_supermasks(lenet, batches, seeds=[0], chunk=0, progress=False)
    with pytest.raises(ValueError, match=r"keep_frac .* \(0, 1\], got 1.5"):
        train_supermasks(lenet, batches, seeds=[0], keep_frac=1.5, progress=False)
    with pytest.raises(ValueError, match="lr must be > 0, got 0"):
        train_supermasks(lenet, batches, seeds=[0], lr=0, progress=False)
    with pytest.raises(ValueError, match="num_batches must be ≥ 1 or None"):
        train_bank(lenet, permuted, num_tasks=2, num_batches=0)
    with pytest.raises(ValueError, match="k .* must be ≥ 1"):
        train_bank(lenet, permuted, num_tasks=2, k=0)
    with pytest.raises(ValueError, match="num_tasks must lie in 1..5"):
        train_bank(lenet, permuted, num_tasks=6)
