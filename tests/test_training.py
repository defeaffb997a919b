import pytest
import torch

from supsup_lite.core.masks import apply_masks
from supsup_lite.core.models import build_model, frozen_random_model, maskable_parameters
from supsup_lite.core.training import evaluate, train_dense, train_supermask


def test_supermask_training_learns_and_never_changes_weights(permuted):
    model = frozen_random_model("lenet_300_100", seed=0, device="cpu")
    before = {n: p.clone() for n, p in maskable_parameters(model).items()}
    x, y = permuted.test_set(0)
    chance = evaluate(model, None, x, y)
    masks, history = train_supermask(model, permuted, 0, num_batches=120, seed=0, progress=False)
    assert all(torch.equal(before[n], p) for n, p in maskable_parameters(model).items())
    assert all(m.dtype == torch.bool and m.shape == before[n].shape for n, m in masks.items())
    accuracy = evaluate(model, apply_masks(model, masks), x, y)
    assert chance < 0.2 and accuracy > 0.75
    assert len(history.loss) == 120 and history.loss[-1] < history.loss[0]


def test_training_is_deterministic_given_the_seed(permuted):
    model = frozen_random_model("lenet_300_100", seed=0, device="cpu")
    a, _ = train_supermask(model, permuted, 1, num_batches=15, seed=5, progress=False)
    b, _ = train_supermask(model, permuted, 1, num_batches=15, seed=5, progress=False)
    c, _ = train_supermask(model, permuted, 1, num_batches=15, seed=6, progress=False)
    assert all(torch.equal(a[n], b[n]) for n in a) and any(not torch.equal(a[n], c[n]) for n in a)


def test_topk_rule_keeps_the_requested_density(permuted):
    model = frozen_random_model("lenet_300_100", seed=0, device="cpu")
    masks, _ = train_supermask(model, permuted, 0, num_batches=5, keep_frac=0.3, progress=False)
    for mask in masks.values():
        assert mask.sum().item() == mask.numel() - int(0.7 * mask.numel())


def test_unfrozen_base_is_refused(permuted):
    with pytest.raises(ValueError, match="frozen"):
        train_supermask(build_model("lenet_300_100"), permuted, 0, num_batches=1, progress=False)


def test_dense_training_changes_weights_and_learns(permuted):
    torch.manual_seed(0)
    model = build_model("lenet_300_100")
    before = model[1].weight.detach().clone()
    train_dense(model, permuted, 0, num_batches=60, lr=1e-3, progress=False)
    x, y = permuted.test_set(0)
    assert not torch.equal(before, model[1].weight) and evaluate(model, None, x, y) > 0.8


def test_evaluate_checks_sizes():
    model = frozen_random_model("lenet_300_100", device="cpu")
    with pytest.raises(ValueError, match="as many labels"):
        evaluate(model, None, torch.zeros(3, 784), torch.zeros(2, dtype=torch.long))
