"""The pieces notebook 07 adds on top of the baselines: class-incremental labelling, SupSup with shared labels
and re-used masks, BatchE in superposition with One-Shot inference (against plain references), the converged
upper bound's stopping rule, seeds and Student-t intervals, and single-image GNu scoring."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import supsup_lite.baselines.methods as methods
from supsup_lite.baselines.context import (batche_alpha_gradient, batche_forward, batche_one_shot, stacked_factors,
                                           superposed_batche_forward)
from supsup_lite.baselines.methods import ConvergedUpperBound, OnlineEWCMethod, SIMethod, SupSupGNu
from supsup_lite.baselines.study import (first_tasks, permuted_tasks, run_seeds, single_image_gnu, student_t_quantile,
                                         t_interval)
from supsup_lite.core.inference import entropy
from supsup_lite.core.models import frozen_random_model, maskable_parameters, masked_forward
from supsup_lite.data.unshared import UnsharedLabels
from supsup_lite.scenarios.continual import ContinualMethod, FineTuning, dense_model, run_continual


# --- class-incremental labelling ---------------------------------------------------------------------------------
class _Spy(ContinualMethod):
    """Records what reaches the method: the labels it trains on and the task argument at test."""

    name = "spy"

    def __init__(self, stream, inner):
        super().__init__(stream)
        self.inner, self.trained_labels, self.test_tasks = inner, {}, []

    def learn(self, task):
        self.trained_labels[task] = torch.cat([y for _, y in self.stream.train_batches(task, 64, 3, 0)]).unique()
        self.inner.learn(task)

    def predict(self, x, task):
        self.test_tasks.append(task)
        return self.inner.predict(x, task)


@pytest.mark.parametrize("method", [FineTuning, OnlineEWCMethod, SIMethod])
def test_class_incremental_labels_head_and_no_task_id_at_test(permuted, method):
    tasks = 3
    unshared = UnsharedLabels(permuted)
    settings = dict(lam=5.0, fisher_samples=16) if method is OnlineEWCMethod else dict(c=0.1) \
        if method is SIMethod else {}
    inner = method(dense_model("lenet_300_100", unshared.num_classes), unshared, num_batches=3, lr=1e-4,
                   optimizer="adam", **settings)
    spy = _Spy(unshared, inner)
    result = run_continual(spy, unshared, num_tasks=tasks, task_ids=False, test_size=32, progress=False)
    assert unshared.num_classes == 10 * permuted.num_tasks                        # one head, 10·T outputs
    assert inner.model[-1].out_features == 10 * permuted.num_tasks
    for t in range(tasks):                                                        # task t's digit d is 10t + d
        assert spy.trained_labels[t].tolist() == [10 * t + d for d in range(10)]
        x, y = unshared.test_set(t)
        assert torch.equal(y, permuted.test_set(t)[1] + 10 * t) and torch.equal(x, permuted.test_set(t)[0])
    assert spy.test_tasks == [None] * (tasks * (tasks + 1) // 2)                  # no task id reached the method
    assert result.accuracy.shape == (tasks, tasks) and not result.task_ids


def test_fine_tuning_optimizer_is_named_and_checked(permuted):
    model = dense_model("lenet_300_100")
    assert isinstance(FineTuning(model, permuted, optimizer="adam").optimizer(), torch.optim.Adam)
    assert isinstance(FineTuning(model, permuted).optimizer(), torch.optim.RMSprop)
    with pytest.raises(ValueError, match="optimizer must be one of .*'sgd'"):
        FineTuning(model, permuted, optimizer="sgd")


# --- SupSup with shared labels (GNs) and re-used masks ----------------------------------------------------------
def test_supsup_gns_reuses_the_gnu_masks_and_scores_digits(permuted):
    unshared = UnsharedLabels(permuted)
    gnu = SupSupGNu(frozen_random_model("lenet_300_100", 10, device="cpu"), unshared, num_batches=40)
    gnu_result = run_continual(gnu, unshared, num_tasks=2, task_ids=False, test_size=256, progress=False)
    gns = SupSupGNu(gnu.model, permuted, masks=gnu.bank, num_batches=1)   # 1 batch would train other masks
    gns_result = run_continual(gns, permuted, num_tasks=2, task_ids=False, test_size=256, progress=False)
    assert gnu.name == "SupSup (GNu)" and gns.name == "SupSup (GNs)"
    for t in range(2):
        assert all(torch.equal(a, b) for a, b in zip(gns.bank.get(t).values(), gnu.bank.get(t).values()))
    x, y = permuted.test_set(1)
    labels = gns.predict(x[:256], None)
    assert labels.max() < 10 and torch.equal(gnu.predict(x[:256], None) % 10, labels)
    assert np.all(gns_result.final >= gnu_result.final)                  # a wrong task can still get the digit
    with pytest.raises(ValueError, match="masks holds 3 tasks' masks but the stream has 2"):
        gnu.bank.append(gnu.bank.get(0))
        SupSupGNu(gnu.model, permuted_tasks(2, 0), masks=gnu.bank)


# --- BatchE in superposition -----------------------------------------------------------------------------------
def _batche_tasks(tasks=4, dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 4, bias=False)).to(dtype)
    factors = []
    for t in range(tasks):   # real-valued factors (as after training), not only the ±1 init
        g = torch.Generator().manual_seed(t)
        factors.append({n: (torch.randn(w.shape[0], generator=g, dtype=dtype),
                            torch.randn(w.shape[1], generator=g, dtype=dtype))
                        for n, w in maskable_parameters(model).items()})
    return model.requires_grad_(False), factors


def test_superposed_batche_forward_equals_the_hand_built_weights():
    model, factors = _batche_tasks()
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(9))
    alphas = torch.softmax(torch.randn(4, generator=torch.Generator().manual_seed(3)), 0)
    by_hand = {n: w * sum(a * torch.outer(f[n][0], f[n][1]) for a, f in zip(alphas, factors))
               for n, w in maskable_parameters(model).items()}                # W ⊙ Σ_i α_i s_i t_iᵀ
    expected = masked_forward(model, by_hand, x)
    torch.testing.assert_close(superposed_batche_forward(model, factors, alphas, x), expected)
    per_image = torch.softmax(torch.randn(7, 4, generator=torch.Generator().manual_seed(4)), 1)
    rows = superposed_batche_forward(model, factors, per_image, x)
    for b in range(7):                                                   # (B, T): row b is image b's own α
        weights = {n: w * sum(a * torch.outer(f[n][0], f[n][1]) for a, f in zip(per_image[b], factors))
                   for n, w in maskable_parameters(model).items()}
        torch.testing.assert_close(rows[b], masked_forward(model, weights, x[b:b + 1])[0])
    for t in range(4):                                                   # one-hot α: task t's own BatchE forward
        torch.testing.assert_close(superposed_batche_forward(model, factors, torch.eye(4)[t], x),
                                   batche_forward(model, factors[t], x))
    with pytest.raises(ValueError, match=r"alphas must have shape \(4,\) or \(7, 4\).*got \(3,\)"):
        superposed_batche_forward(model, factors, alphas[:3], x)
    with pytest.raises(KeyError, match=r"factors\[1\] covers layers"):
        stacked_factors([factors[0], {"1.weight": factors[1]["1.weight"]}])


def test_batche_alpha_gradient_against_finite_differences_and_one_shot_is_its_argmin():
    model, factors = _batche_tasks(dtype=torch.float64)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gradient = batche_alpha_gradient(model, factors, x)
    uniform, eps = torch.full((4,), 0.25, dtype=torch.float64), 1e-6
    for b in range(5):
        for i in range(4):
            step = torch.zeros(4, dtype=torch.float64)
            step[i] = eps
            plus = entropy(superposed_batche_forward(model, factors, uniform + step, x[b:b + 1]))
            minus = entropy(superposed_batche_forward(model, factors, uniform - step, x[b:b + 1]))
            assert gradient[b, i].item() == pytest.approx(((plus - minus) / (2 * eps)).item(), rel=1e-6, abs=1e-9)
    assert torch.equal(batche_one_shot(model, factors, x), gradient.argmin(1))
    logits = torch.zeros(5, 4, dtype=torch.float64, requires_grad=True)  # α = softmax(z): the same argmax at z = 0
    entropy(superposed_batche_forward(model, factors, torch.softmax(logits, 1), x)).sum().backward()
    assert torch.equal(logits.grad.argmin(1), gradient.argmin(1))


# --- the converged upper bound -------------------------------------------------------------------------------------
def test_upper_bound_stops_after_patience_epochs_without_improvement_and_keeps_the_best(permuted, monkeypatch):
    scripted, states = iter([0.5, 0.7, 0.6, 0.65, 0.9]), []

    def fake_evaluate(model, weights, x, y):
        states.append(copy.deepcopy(model.state_dict()))
        assert x.shape[0] == 100 == y.shape[0]                             # the held-out slice
        return next(scripted)

    monkeypatch.setattr(methods, "evaluate", fake_evaluate)
    upper = ConvergedUpperBound(dense_model("lenet_300_100"), permuted, holdout=100, epoch_size=256, patience=2,
                                max_epochs=10, seed=3)
    upper.learn(1)
    assert upper.stopped[1] == (2, 4)                  # best at epoch 2; epochs 3 and 4 did not improve: stop
    assert all(torch.equal(p, states[1][n]) for n, p in upper.models[1].state_dict().items())
    with pytest.raises(ValueError, match="needs the task id"):
        upper.predict(permuted.test_set(1)[0][:4], None)
    with pytest.raises(ValueError, match="holdout must be ≥ 1, got 0"):
        ConvergedUpperBound(dense_model("lenet_300_100"), permuted, holdout=0)


def test_upper_bound_really_trains_and_is_seeded(permuted):
    def learned(seed):
        upper = ConvergedUpperBound(dense_model("lenet_300_100"), permuted, holdout=500, epoch_size=2000,
                                    max_epochs=2, seed=seed)
        upper.learn(0)
        return upper
    a, b, c = learned(0), learned(0), learned(1)
    assert all(torch.equal(p, b.models[0].state_dict()[n]) for n, p in a.models[0].state_dict().items())
    assert not torch.equal(a.models[0][1].weight, c.models[0][1].weight)
    x, y = permuted.test_set(0)
    assert (a.predict(x[:1000], 0) == y[:1000]).float().mean() > 0.8         # 32 steps of Adam 1e-3


# --- seeds and intervals ----------------------------------------------------------------------------------------
def test_t_quantile_and_interval_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 30):
        assert student_t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-6)
    values = [0.91, 0.935, 0.92]
    mean, half = t_interval(values)
    low, high = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values)) and half == pytest.approx((high - low) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 values, got 1"):
        t_interval([0.5])
    with pytest.raises(ValueError, match=r"probability must lie in \(0.5, 1\), got 0.2"):
        student_t_quantile(0.2, 3)


def test_run_seeds_changes_tasks_init_and_batches_per_seed():
    a, b, a_again = permuted_tasks(2, 0), permuted_tasks(2, 1), permuted_tasks(3, 0)
    cut = first_tasks(a_again, 2)
    assert cut.num_tasks == 2 and a_again.num_tasks == 3 and torch.equal(cut.test_set(1)[0], a.test_set(1)[0])
    with pytest.raises(ValueError, match=r"num_tasks must lie in 1..3 \(the stream's tasks\), got 4"):
        first_tasks(a_again, 4)
    assert torch.equal(a.permutation(1), a_again.permutation(1))
    assert not torch.equal(a.permutation(1), b.permutation(1))
    streams = {0: a, 1: b}
    runs = run_seeds(lambda stream, seed: FineTuning(dense_model("lenet_300_100", seed=seed), stream, num_batches=5,
                                                     seed=seed),
                     streams.get, [0, 1], task_ids=False, test_size=64, keep=lambda m: m.model[1].weight.clone())
    assert runs.name == "fine-tuning" and runs.seeds == [0, 1] and not runs.task_ids
    assert runs.final().shape == (2, 2) and runs.average().shape == (2,)
    assert not torch.equal(*runs.kept)
    assert runs.interval() == t_interval(runs.average())
    assert runs.storage_per_task() == 0


def test_single_image_gnu_counts_a_wrong_task_as_wrong(permuted):
    def infer(x):              # task 1 for the first half of every sample, task 0 for the rest
        return torch.tensor([1] * (x.shape[0] // 2) + [0] * (x.shape[0] - x.shape[0] // 2))

    def classify(x, task):     # a perfect classifier: look the images up
        xs, ys = permuted.test_set(task)
        return torch.stack([ys[(xs == image).all(1)][0] for image in x])
    result = single_image_gnu(permuted, infer=infer, classify=classify, tasks=[0, 1], samples_per_task=10)
    assert result.per_task == [0.5, 0.5] and result.inference_accuracy == 0.5
    again = single_image_gnu(permuted, infer=infer, classify=classify, tasks=[0, 1], samples_per_task=10)
    assert again.inferred == result.inferred                             # the same images every time
