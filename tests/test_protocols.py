"""Evaluation protocols on really trained masks, each against a plain loop that follows the paper's text."""
import pytest
import torch

from supsup_lite.core.inference import one_shot
from supsup_lite.core.masks import apply_masks
from supsup_lite.scenarios.protocols import (correct_per_batch, gg_accuracy, gns_accuracy, gnu_accuracy, gnu_score,
                                             infer_batches, infer_tasks, predict_batches, shuffled_test_set,
                                             task_inference_accuracy)
from supsup_lite.core.training import evaluate, predict


def test_gnu_matches_the_papers_loop(trained_bank, permuted):
    model, bank = trained_bank
    result = gnu_accuracy(model, bank, permuted, tasks=[0, 3], batch_size=500, seed=5)
    for task, accuracy, inferred in zip(result.tasks, result.per_task, result.inferred):
        x, y = shuffled_test_set(permuted, task, 5)
        correct, chosen = 0, []
        for start in range(0, y.shape[0], 500):
            xb, yb = x[start:start + 500], y[start:start + 500]
            guess = one_shot(model, bank, xb[:1])
            chosen.append(guess)
            if guess == task:  # a wrongly inferred batch scores 0
                correct += (predict(model, apply_masks(model, bank.get(guess)), xb) == yb).sum().item()
        assert inferred == chosen
        assert accuracy == pytest.approx(correct / y.shape[0])


def test_gnu_from_whole_batches_equals_gg(trained_bank, permuted):
    model, bank = trained_bank
    result = gnu_accuracy(model, bank, permuted, tasks=[0, 2], batch_size=1000, infer_from="batch")
    assert result.inference_accuracy == 1.0
    assert result.per_task == pytest.approx(gg_accuracy(model, bank, permuted, tasks=[0, 2]), abs=1e-6)


def test_gns_classifies_with_the_inferred_mask(trained_bank, permuted):
    model, bank = trained_bank
    result = gns_accuracy(model, bank, permuted, infer_images=16)
    assert [i[0] for i in result.inferred] == result.tasks
    x, y = permuted.test_set(1)
    assert result.per_task[1] == pytest.approx(evaluate(model, apply_masks(model, bank.get(1)), x, y))


def test_task_inference_accuracy_binary_and_one_shot(trained_bank, permuted):
    model, bank = trained_bank
    one = task_inference_accuracy(model, bank, permuted, samples_per_task=2, group_size=32)
    binary = task_inference_accuracy(model, bank, permuted, samples_per_task=2, group_size=32, search="binary")
    assert one.inference_accuracy == 1.0 and binary.inference_accuracy == 1.0
    assert binary.per_task == [1.0] * len(bank)


def test_bad_arguments(trained_bank, permuted):
    model, bank = trained_bank
    with pytest.raises(ValueError, match="search must be one of"):
        infer_tasks(model, bank, torch.zeros(2, 784), search="bisect")
    with pytest.raises(ValueError, match="infer_from"):
        gnu_accuracy(model, bank, permuted, infer_from="last")
    with pytest.raises(ValueError, match="tasks"):
        gnu_accuracy(model, bank, permuted, tasks=[7])


def test_gnu_reports_gg_from_the_same_pass(trained_bank, permuted):
    model, bank = trained_bank
    result = gnu_accuracy(model, bank, permuted, tasks=[1], batch_size=2000)
    assert result.given == pytest.approx(gg_accuracy(model, bank, permuted, tasks=[1]), abs=1e-6)
    assert result.per_task[0] <= result.given[0]


def test_gnu_score_matches_a_plain_loop_with_and_without_the_penalty():
    gen = torch.Generator().manual_seed(0)
    inferred = torch.randint(0, 4, (3, 6), generator=gen)
    correct = torch.randint(0, 9, (3, 6), generator=gen).float()
    correct[2, 5] = 0  # task 2's test set is one batch shorter (padding)
    sizes, true_tasks = [48, 48, 40], [0, 2, 3]
    penalised = gnu_score(inferred, correct, sizes=sizes, true_tasks=true_tasks)
    shared = gnu_score(inferred, correct, sizes=sizes, true_tasks=None)
    for i in range(3):
        right = sum(correct[i, b].item() for b in range(6) if inferred[i, b] == true_tasks[i])
        assert penalised[i].item() == pytest.approx(right / sizes[i], abs=1e-12)
        assert shared[i].item() == pytest.approx(correct[i].sum().item() / sizes[i], abs=1e-12)
    assert penalised.dtype == torch.float64 and penalised.device.type == "cpu"


@pytest.mark.parametrize("kwargs, message", [
    (dict(inferred=torch.zeros(2, 3, dtype=torch.long), correct=torch.zeros(2, 4), sizes=[1, 1], true_tasks=None),
     "both be"),
    (dict(inferred=torch.zeros(2, 3, dtype=torch.long), correct=torch.zeros(2, 3), sizes=[1, 0], true_tasks=None),
     "sizes"),
    (dict(inferred=torch.zeros(2, 3, dtype=torch.long), correct=torch.zeros(2, 3), sizes=[1, 1], true_tasks=[0]),
     "true_tasks"),
])
def test_gnu_score_rejects_mismatched_shapes(kwargs, message):
    inferred, correct = kwargs.pop("inferred"), kwargs.pop("correct")
    with pytest.raises(ValueError, match=message):
        gnu_score(inferred, correct, **kwargs)


def test_batch_helpers_match_plain_loops(trained_bank, permuted):
    model, bank = trained_bank
    x, y = shuffled_test_set(permuted, 1, 0)
    x, y = x[:300], y[:300]  # batches of 128, 128 and 44
    rows = infer_batches(model, bank, x, batch_size=128, infer_from=1)
    assert rows.tolist() == [one_shot(model, bank, x[s:s + 1]) for s in (0, 128, 256)]
    forced = torch.tensor([1, 2, 1])
    labels = predict_batches(model, bank, x, forced, batch_size=128)
    for b, start in enumerate((0, 128, 256)):
        expected = predict(model, apply_masks(model, bank.get(int(forced[b]))), x[start:start + 128])
        assert torch.equal(labels[start:start + 128], expected)
    counts = correct_per_batch(labels == y, batch_size=128)
    assert counts.tolist() == [(labels[s:s + 128] == y[s:s + 128]).sum().item() for s in (0, 128, 256)]
    with pytest.raises(ValueError, match="one row per batch"):
        predict_batches(model, bank, x, forced[:2], batch_size=128)
