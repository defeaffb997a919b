"""Evaluation protocols on really trained masks, each against a plain loop that follows the paper's text."""
import pytest
import torch

from supsup_lite.core.inference import one_shot
from supsup_lite.core.masks import apply_masks
from supsup_lite.scenarios.protocols import (gg_accuracy, gns_accuracy, gnu_accuracy, infer_tasks,
                                             shuffled_test_set, task_inference_accuracy)
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
    assert result.task_accuracy == 1.0
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
    binary = task_inference_accuracy(model, bank, permuted, samples_per_task=2, group_size=32, method="binary")
    assert one.task_accuracy == 1.0 and binary.task_accuracy == 1.0
    assert binary.per_task == [1.0] * len(bank)


def test_bad_arguments(trained_bank, permuted):
    model, bank = trained_bank
    with pytest.raises(ValueError, match="method"):
        infer_tasks(model, bank, torch.zeros(2, 784), method="bisect")
    with pytest.raises(ValueError, match="infer_from"):
        gnu_accuracy(model, bank, permuted, infer_from="last")
    with pytest.raises(ValueError, match="tasks"):
        gnu_accuracy(model, bank, permuted, tasks=[7])


def test_gnu_reports_gg_from_the_same_pass(trained_bank, permuted):
    model, bank = trained_bank
    result = gnu_accuracy(model, bank, permuted, tasks=[1], batch_size=2000)
    assert result.given == pytest.approx(gg_accuracy(model, bank, permuted, tasks=[1]), abs=1e-6)
    assert result.per_task[0] <= result.given[0]
