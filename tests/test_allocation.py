"""Scenario NNs: the allocation rule by hand, and detection / reuse / budget on really trained masks."""
from __future__ import annotations

import math

import pytest
import torch

from supsup_lite.config import derive_seed

from supsup_lite.scenarios.allocation import (EPSILON, Check, NNsLearner, allocation_counts, is_new_task,
                                              learn_tasks, nns_accuracy, novelty_score, task_sequence_batches)
from supsup_lite.core.inference import one_shot
from supsup_lite.core.masks import MaskBank, apply_masks
from supsup_lite.core.models import frozen_random_model
from supsup_lite.scenarios.protocols import gnu_accuracy, shuffled_test_set
from supsup_lite.core.training import predict, train_supermask

ARCH, OUTPUTS, BATCHES, CHECK_EVERY = "lenet_300_100", 100, 100, 50


# --- the rule itself ---------------------------------------------------------------------------------
def test_novelty_score_matches_hand_computation():
    # g = (−a, 0, 0, 0, 0): ν_max = e^a / (e^a + 4), so 5 ν_max < 1 + ε  ⇔  a < log(4 (1 + ε) / (4 − ε)).
    threshold = math.log(4 * (1 + EPSILON) / (4 - EPSILON))
    for a in (0.0, 0.1, threshold - 1e-3, threshold + 1e-3, 1.0):
        grad = torch.tensor([-a, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
        assert novelty_score(grad) == pytest.approx(5 * math.exp(a) / (math.exp(a) + 4), rel=1e-12)
        assert is_new_task(grad) == (a < threshold)


def test_novelty_score_is_one_for_uniform_or_single_slot_and_ignores_a_shift():
    assert novelty_score(torch.full((7,), 0.3)) == pytest.approx(1.0)
    assert novelty_score(torch.tensor([-5.0])) == pytest.approx(1.0)  # one slot: always "new", hence padding
    grad = torch.tensor([0.2, -0.4, 0.1])
    assert novelty_score(grad + 3.0) == pytest.approx(novelty_score(grad))
    with pytest.raises(ValueError, match="non-empty vector"):
        novelty_score(torch.zeros(0))


def test_check_replays_the_decision_under_another_epsilon():
    known = Check(batch=0, data_task=0, masks=3, slots=5, winner=1, score=1.2, mask=1, allocated=False)
    assert not known.wants_new(0.1) and known.wants_new(0.3)
    reference_wins = Check(batch=0, data_task=0, masks=3, slots=5, winner=4, score=3.0, mask=3, allocated=True)
    assert reference_wins.wants_new(0.0)
    assert Check(0, 0, 0, 0, None, math.nan, 0, True).wants_new(10.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0}, "budget"), ({"check_every": 0}, "check_every"), ({"min_slots": 1}, "min_slots"),
    ({"epsilon": -0.1}, "epsilon"), ({"epsilon": math.inf}, "epsilon"),
])
def test_bad_settings_fail_early(kwargs, message):
    model = frozen_random_model(ARCH, OUTPUTS, seed=0, device="cpu")
    with pytest.raises(ValueError, match=message):
        NNsLearner(model, **{"budget": 3, **kwargs})


def test_unfrozen_model_is_refused():
    model = frozen_random_model(ARCH, OUTPUTS, seed=0, device="cpu").requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        NNsLearner(model, budget=3)


# --- on real training --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(permuted):
    """Stream 0, 1, 0, 2 (100 batches each, a check every 50) with a budget of 2 masks; banks after each task."""
    model = frozen_random_model(ARCH, OUTPUTS, seed=0, device="cpu")
    learner = NNsLearner(model, budget=2, check_every=CHECK_EVERY)
    banks = learn_tasks(learner, permuted, [0, 1, 0, 2], BATCHES, snapshots=[1, 2, 3, 4], progress=False)
    return model, learner, banks


def test_new_permutation_gets_a_new_mask_and_an_old_one_reuses_its_mask(run):
    _, learner, _ = run
    decisions = [(c.data_task, c.mask, c.allocated) for c in learner.log]
    assert decisions[:6] == [(0, 0, True), (0, 0, False), (1, 1, True), (1, 1, False),
                             (0, 0, False), (0, 0, False)]
    assert [c.batch for c in learner.log] == list(range(0, 4 * BATCHES, CHECK_EVERY))
    assert learner.log[2].score < 1 + EPSILON <= learner.log[4].score
    assert allocation_counts(learner.log, 3, 2).tolist() == [[4, 0], [0, 2], [0, 0]]


def test_spent_budget_trains_nothing_and_keeps_old_masks(run):
    _, learner, banks = run
    over = learner.log[6:]
    assert [(c.data_task, c.mask, c.allocated) for c in over] == [(2, None, False)] * 2
    assert all(c.wants_new(learner.epsilon) for c in over) and len(learner) == 2
    for name in banks[3].names:
        assert torch.equal(banks[3].packed(name), banks[4].packed(name))
    with pytest.raises(RuntimeError, match="budget"):
        learner.allocate()


def test_the_learners_bank_is_kept_up_to_date_row_by_row(run):
    model, learner, banks = run
    fresh = MaskBank.for_model(model)
    for scores in learner.scores:
        fresh.append({name: s.detach() >= 0 for name, s in scores.items()})
    bank = learner.bank()
    assert bank is learner.bank()  # no re-packing when nothing trained
    for name in fresh.names:
        assert torch.equal(bank.packed(name), fresh.packed(name))
        assert torch.equal(banks[4].packed(name), fresh.packed(name))  # the snapshot is a copy, equal at the end
    with_references = learner.bank(references=2)
    assert len(with_references) == len(learner) + 2 and with_references is not bank


def test_one_mask_per_task_reproduces_train_supermask_bit_for_bit(run, permuted):
    # Mask 1 was allocated for the stream's 2nd entry (batches and scores derived from seed 0 and index 1)
    # and never trained again.
    model, _, banks = run
    batches = permuted.train_batches(1, 128, BATCHES, derive_seed(0, 1, "batches"))
    expected = train_supermask(model, batches, seed=derive_seed(0, 1, "scores"), progress=False).masks[0]
    got = banks[4].get(1, torch.bool)
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_bank_includes_the_live_mask_and_references_are_initial_masks(run):
    _, learner, _ = run
    bank = learner.bank(references=2)
    assert len(bank) == 4
    live = {name: s.detach() >= 0 for name, s in learner.scores[1].items()}
    assert all(torch.equal(bank.get(1, torch.bool)[n], live[n]) for n in live)
    first_reference = {name: s >= 0 for name, s in learner.initial_scores(2).items()}
    assert all(torch.equal(bank.get(2, torch.bool)[n], first_reference[n]) for n in live)


def test_task_sequence_batches_labels_and_reseeds_each_segment(permuted):
    seen = list(task_sequence_batches(permuted, [3, 3], batches_per_task=2, batch_size=8, seed=5))
    assert [t for t, _, _ in seen] == [3, 3, 3, 3]
    x0, _ = next(iter(permuted.train_batches(3, 8, 1, seed=derive_seed(5, 0, "batches"))))
    x1, _ = next(iter(permuted.train_batches(3, 8, 1, seed=derive_seed(5, 1, "batches"))))
    assert torch.equal(seen[0][1], x0) and torch.equal(seen[2][1], x1)


def test_nns_accuracy_matches_a_plain_shared_label_loop(run, permuted):
    # Bank of 2 masks (tasks 0, 1); data task 2 has no mask of its own: shared labels still score its batches.
    model, _, banks = run
    bank = banks[2]
    result = nns_accuracy(model, bank, permuted, tasks=[1, 2], batch_size=1000, seed=3)
    for task, accuracy, inferred in zip(result.tasks, result.per_task, result.inferred):
        x, y = shuffled_test_set(permuted, task, 3)
        correct, chosen = 0, []
        for start in range(0, y.shape[0], 1000):
            xb, yb = x[start:start + 1000], y[start:start + 1000]
            mask = one_shot(model, bank, xb[:1])
            chosen.append(mask)
            correct += (predict(model, apply_masks(model, bank.get(mask)), xb) == yb).sum().item()
        assert inferred == chosen
        assert accuracy == pytest.approx(correct / y.shape[0])
    assert result.inferred[0] == [1] * 10 and result.per_task[0] > 0.8


def test_nns_accuracy_equals_gnu_when_every_batch_is_inferred_right_and_never_less(run, permuted):
    model, _, banks = run
    nns = nns_accuracy(model, banks[2], permuted, tasks=[0, 1], batch_size=500)
    gnu = gnu_accuracy(model, banks[2], permuted, tasks=[0, 1], batch_size=500)
    assert nns.inferred == gnu.inferred
    for task, inferred, a_nns, a_gnu in zip(nns.tasks, nns.inferred, nns.per_task, gnu.per_task):
        assert a_nns >= a_gnu
        if all(mask == task for mask in inferred):
            assert a_nns == pytest.approx(a_gnu)
    with pytest.raises(IndexError):
        nns_accuracy(model, banks[2], permuted, tasks=[9])


def test_learn_tasks_rejects_snapshots_outside_the_stream(permuted):
    model = frozen_random_model(ARCH, OUTPUTS, seed=0, device="cpu")
    learner = NNsLearner(model, budget=3)
    with pytest.raises(ValueError, match="snapshots"):
        learn_tasks(learner, permuted, [0, 1], 5, snapshots=[3], progress=False)
    assert learner.batches_seen == 0
