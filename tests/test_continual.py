"""The continual-learning harness and its first methods: SupSup GG never forgets, fine-tuning does."""
import numpy as np
import pytest
import torch

from supsup_lite.scenarios.continual import (ContinualMethod, FineTuning, FineTuningFromSnapshots, SupSupGG,
                                             UpperBound, dense_model, evaluation_set, run_continual, task_accuracy)
from supsup_lite.core.models import frozen_random_model, masked_forward, maskable_parameters
from supsup_lite.core.storage import SEED_BYTES


class Scripted(ContinualMethod):
    """Answers right for the two most recent tasks and says 0 for older ones (a method that forgets)."""

    name = "scripted"

    def __init__(self, stream):
        super().__init__(stream)
        self.learned, self.asked = [], []

    def learn(self, task):
        self.learned.append(task)

    def predict(self, x, task):
        self.asked.append(task)
        labels = evaluation_set(self.stream, task if task is not None else self.learned[-1], x.shape[0], "spread")[1]
        return labels if task is None or task >= self.learned[-1] - 1 else torch.zeros_like(labels)


def test_accuracy_matrix_is_filled_row_by_row(permuted):
    result = run_continual(Scripted(permuted), permuted, num_tasks=4, test_size=500, subset="spread", progress=False)
    zeros = [(evaluation_set(permuted, j, 500, "spread")[1] == 0).float().mean().item() for j in range(4)]
    expected = np.full((4, 4), np.nan)
    for i in range(4):
        for j in range(i + 1):
            expected[i, j] = 1.0 if j >= i - 1 else zeros[j]
    np.testing.assert_array_equal(result.accuracy, expected)
    np.testing.assert_allclose(result.average, [np.nanmean(expected[i]) for i in range(4)])
    np.testing.assert_array_equal(result.just_learned, np.ones(4))
    np.testing.assert_allclose(result.forgetting, [1 - zeros[0], 1 - zeros[1], 0, 0])
    assert result.evaluated_rows == [0, 1, 2, 3] and result.num_tasks == 4
    assert np.isnan(result.storage).all() and (result.learn_seconds >= 0).all()


def test_only_the_requested_rows_are_measured_and_task_ids_can_be_withheld(permuted):
    method = Scripted(permuted)
    result = run_continual(method, permuted, num_tasks=3, task_ids=False, test_size=100, subset="spread", rows=[2],
                           progress=False)
    assert result.evaluated_rows == [2] and np.isnan(result.accuracy[:2]).all()
    assert method.asked == [None, None, None] and not result.task_ids
    assert np.isnan(result.average[:2]).all() and not np.isnan(result.average[2])


def test_harness_refuses_bad_methods_and_rows(permuted):
    with pytest.raises(TypeError, match="needs name, learn"):
        run_continual(object(), permuted)
    with pytest.raises(ValueError, match=r"rows \[7\]"):
        run_continual(Scripted(permuted), permuted, num_tasks=2, rows=[7])
    with pytest.raises(ValueError, match="num_tasks"):
        run_continual(Scripted(permuted), permuted, num_tasks=9)

    class Wrong(Scripted):
        def predict(self, x, task):
            return torch.zeros(3, dtype=torch.long)

    with pytest.raises(ValueError, match="expected labels"):
        run_continual(Wrong(permuted), permuted, num_tasks=1, progress=False)


def test_gg_predictions_of_task_0_are_bit_identical_after_training_later_tasks(permuted):
    model = frozen_random_model("lenet_300_100", 10, seed=0, device="cpu")
    weights_before = {n: p.clone() for n, p in maskable_parameters(model).items()}
    method = SupSupGG(model, permuted, num_batches=60, batch_size=64)
    x, y = permuted.test_set(0)
    method.learn(0)
    logits = masked_forward(model, method.masked_weights(0), x)
    predictions = method.predict(x, 0)
    assert (predictions == y).float().mean() > 0.6  # a real trained mask, not chance
    for task in (1, 2):
        method.learn(task)
    assert torch.equal(method.predict(x, 0), predictions)
    assert torch.equal(masked_forward(model, method.masked_weights(0), x), logits)
    assert all(torch.equal(weights_before[n], p) for n, p in maskable_parameters(model).items())
    assert method.storage_bytes() == 3 * method.bank.bytes_per_task + SEED_BYTES


def test_gg_accuracy_matrix_has_constant_columns(permuted):
    model = frozen_random_model("lenet_300_100", 10, seed=0, device="cpu")
    result = run_continual(SupSupGG(model, permuted, num_batches=20, batch_size=64, k=3), permuted, num_tasks=3,
                           test_size=1000, progress=False)
    for j in range(3):
        assert len(set(result.accuracy[j:, j].tolist())) == 1  # task j never changes after it is learned
    assert (result.forgetting == 0).all()


def test_training_masks_ahead_gives_the_same_bank(permuted):
    model = frozen_random_model("lenet_300_100", 10, seed=0, device="cpu")
    one, ahead = (SupSupGG(model, permuted, num_batches=5, batch_size=64, k=k) for k in (1, 3))
    for task in range(4):
        one.learn(task)
        ahead.learn(task)
    assert all(torch.equal(one.bank.packed(n), ahead.bank.packed(n)) for n in one.bank.names)
    with pytest.raises(ValueError, match="already learned"):
        one.learn(2)
    with pytest.raises(ValueError, match="needs the task id"):
        one.predict(permuted.test_set(0)[0][:5], None)
    with pytest.raises(KeyError, match="no mask yet"):
        SupSupGG(model, permuted).predict(permuted.test_set(0)[0][:5], 0)


def test_fine_tuning_forgets_and_the_upper_bound_keeps_one_model_per_task(permuted):
    start = dense_model("lenet_300_100", 10, seed=0)
    fine, upper = FineTuning(start, permuted, num_batches=40), UpperBound(start, permuted, num_batches=40)
    x = permuted.test_set(0)[0][:2000]
    fine.learn(0)
    upper.learn(0)
    torch.testing.assert_close(fine.predict(x, 0), upper.predict(x, 0))  # same start, same batches
    before = upper.predict(x, 0)
    fine.learn(1)
    upper.learn(1)
    assert torch.equal(upper.predict(x, 0), before)
    assert not torch.equal(fine.predict(x, 0), before)  # the shared network moved on to task 1
    assert upper.storage_bytes() == 2 * fine.storage_bytes() == 2 * 4 * sum(p.numel() for p in start.parameters())
    assert torch.equal(dense_model("lenet_300_100", 10, seed=0)[1].weight, start[1].weight)  # caller's copy untouched


def test_dense_model_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = dense_model("lenet_300_100", 10, seed=4)
    assert torch.equal(torch.rand(3), expected)
    b = dense_model("lenet_300_100", 10, seed=4)
    c = dense_model("lenet_300_100", 10, seed=5)
    assert torch.equal(a[1].weight, b[1].weight) and not torch.equal(a[1].weight, c[1].weight)


def test_evaluation_sets_spread_over_the_test_set_and_are_shared(permuted):
    x, y = permuted.test_set(1)
    x5, y5 = evaluation_set(permuted, 1, 5, "spread")
    spread = [0, 2500, 5000, 7499, 9999]  # round(linspace(0, 9999, 5))
    assert torch.equal(x5, x[spread]) and torch.equal(y5, y[spread])
    assert torch.equal(evaluation_set(permuted, 1, 5)[1], y[:5])  # the default: the first examples
    assert evaluation_set(permuted, 1, None)[1].shape == evaluation_set(permuted, 1, 10**6, "spread")[1].shape == y.shape
    with pytest.raises(ValueError, match="test_size"):
        evaluation_set(permuted, 1, 0)
    with pytest.raises(ValueError, match="subset"):
        evaluation_set(permuted, 1, 5, "random")
    method = Scripted(permuted)
    method.learn(0)
    assert task_accuracy(method, permuted, 0, test_size=10, subset="spread") == 1.0

    calls = []

    class Counting(type(permuted)):
        def test_set(self, task):
            calls.append(task)
            return super().test_set(task)

    counting = Counting.__new__(Counting)
    counting.__dict__.update(permuted.__dict__)
    shared = {}
    for _ in range(2):
        run_continual(Scripted(permuted), counting, num_tasks=3, test_size=50, subset="spread", test_sets=shared,
                      progress=False)
    assert sorted(calls) == [0, 1, 2] and set(shared) == {(t, 50, "spread") for t in range(3)}  # once for both runs


def test_fine_tuning_read_off_the_upper_bound_is_fine_tuning(permuted):
    start = dense_model("lenet_300_100", 10, seed=1)
    fine, upper = FineTuning(start, permuted, num_batches=15), UpperBound(start, permuted, num_batches=15)
    direct = run_continual(fine, permuted, num_tasks=3, test_size=500, progress=False)
    run_continual(upper, permuted, num_tasks=3, test_size=500, progress=False)
    replayed = run_continual(FineTuningFromSnapshots(upper), permuted, num_tasks=3, test_size=500, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(fine.model.parameters(), upper.models[2].parameters()))
    np.testing.assert_array_equal(direct.accuracy, replayed.accuracy)
    assert replayed.name == direct.name and replayed.storage[-1] == direct.storage[-1]
    with pytest.raises(ValueError, match="from_previous"):
        FineTuningFromSnapshots(UpperBound(start, permuted, from_previous=False))
    with pytest.raises(ValueError, match="has not learned task 3"):
        FineTuningFromSnapshots(upper).learn(3)
