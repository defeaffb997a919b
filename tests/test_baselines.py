"""The baselines: core rules (EWC and SI penalties and importances, BatchE and PSP forwards) on toy models,
then every method on the harness with real PermutedMNIST batches (few, so the file runs in seconds)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from supsup_lite.baselines.methods import PSP, BatchE, OnlineEWCMethod, SeparateHeads, SIMethod, SupSupGNu
from supsup_lite.baselines.regularisers import (OnlineEWC, PenalisedOptimizer, SynapticIntelligence,
                                                fisher_diagonal, quadratic_penalty, snapshot, trainable_parameters)
from supsup_lite.data.unshared import UnsharedLabels
from supsup_lite.baselines.context import (batche_forward, batche_weights, psp_contexts, psp_forward, psp_weights,
                                           random_orthogonal, rank_one_factors)
from supsup_lite.scenarios.continual import FineTuning, SupSupGG, dense_model, run_continual, task_accuracy
from supsup_lite.core.inference import binary_search, one_shot
from supsup_lite.core.models import frozen_random_model, maskable_parameters, masked_forward
from supsup_lite.core.storage import SEED_BYTES, dense_bytes


def small_mlp(seed: int = 0, outputs: int = 4, bias: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5, bias=bias), nn.ReLU(), nn.Linear(5, outputs, bias=bias))


def random_like(params, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) for n, p in params.items()}


# --- Online EWC ----------------------------------------------------------------------------------------------
def test_ewc_penalty_is_zero_at_the_anchor_and_grows_quadratically():
    params = snapshot(trainable_parameters(small_mlp()))
    fisher = {n: v.abs() for n, v in random_like(params, 1).items()}
    ewc = OnlineEWC(lam=3.0)
    assert ewc.penalty(params).item() == 0.0                    # nothing consolidated yet
    ewc.consolidate(params, fisher)
    assert ewc.penalty(params).item() == 0.0                    # at the anchor θ*
    step = random_like(params, 2)
    at = {c: ewc.penalty({n: params[n] + c * step[n] for n in params}).item() for c in (1.0, 2.0, -3.0)}
    assert at[1.0] > 0
    assert at[2.0] == pytest.approx(4 * at[1.0], rel=1e-5) and at[-3.0] == pytest.approx(9 * at[1.0], rel=1e-5)
    expected = 0.5 * 3.0 * sum((fisher[n] * step[n] ** 2).sum() for n in params)
    assert at[1.0] == pytest.approx(expected.item(), rel=1e-5)


def test_ewc_penalty_gradient_is_lambda_fisher_times_displacement():
    params = snapshot(trainable_parameters(small_mlp()))
    fisher = {n: v.abs() for n, v in random_like(params, 3).items()}
    ewc = OnlineEWC(lam=0.7)
    ewc.consolidate(params, fisher)
    moved = {n: (p + d).requires_grad_(True) for (n, p), d in zip(params.items(), random_like(params, 4).values())}
    grads = torch.autograd.grad(ewc.penalty(moved), list(moved.values()))
    for (n, theta), g in zip(moved.items(), grads):
        torch.testing.assert_close(g, 0.7 * fisher[n] * (theta.detach() - params[n]))


def test_online_ewc_decays_the_old_fisher_and_moves_the_anchor():
    params = snapshot(trainable_parameters(small_mlp()))
    f1 = {n: v.abs() for n, v in random_like(params, 5).items()}
    f2 = {n: v.abs() for n, v in random_like(params, 6).items()}
    later = {n: p + 1 for n, p in params.items()}
    ewc = OnlineEWC(lam=1.0, gamma=0.25)
    ewc.consolidate(params, f1)
    ewc.consolidate(later, f2)
    for n in params:
        torch.testing.assert_close(ewc.fisher[n], 0.25 * f1[n] + f2[n])
        torch.testing.assert_close(ewc.anchor[n], later[n])
    assert ewc.penalty(later).item() == 0.0


@pytest.mark.parametrize("labels, outputs", [("predicted", None), ("empirical", None), ("predicted", 3)])
def test_fisher_diagonal_matches_a_per_example_loop(labels, outputs):
    model = small_mlp(seed=1, bias=True)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(13, 6, generator=g), torch.randint(0, 3, (13,), generator=g)
    fast = fisher_diagonal(model, x, y, labels=labels, outputs=outputs, chunk=4)
    params = trainable_parameters(model)
    naive = {n: torch.zeros_like(p) for n, p in params.items()}
    for xi, yi in zip(x, y):                                    # plain reference: one backward per example
        logits = model(xi[None])[:, :outputs]
        label = logits.argmax(1) if labels == "predicted" else yi[None]
        model.zero_grad()
        F.nll_loss(torch.log_softmax(logits, 1), label).backward()
        for n, p in params.items():
            naive[n] += p.grad ** 2 / x.shape[0]
    assert set(fast) == set(naive) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    for n in naive:
        torch.testing.assert_close(fast[n], naive[n])
    if outputs is not None:                                     # unseen classes get no Fisher
        assert fast["3.weight"][outputs:].abs().max() == 0


def test_fisher_and_ewc_reject_bad_input():
    model = small_mlp()
    with pytest.raises(ValueError, match="one label per input"):
        fisher_diagonal(model, torch.randn(3, 6), labels="empirical")
    with pytest.raises(ValueError, match="'predicted' or 'empirical'"):
        fisher_diagonal(model, torch.randn(3, 6), labels="true")
    with pytest.raises(ValueError, match="λ"):
        OnlineEWC(lam=-1.0)
    with pytest.raises(ValueError, match="γ"):
        OnlineEWC(lam=1.0, gamma=1.5)
    with pytest.raises(KeyError, match="anchor"):
        quadratic_penalty({"a": torch.ones(1)}, {"b": torch.ones(1)}, {"a": torch.ones(1)})


# --- SI ------------------------------------------------------------------------------------------------------
def test_si_path_integral_matches_the_hand_computed_sum_on_a_quadratic():
    """L(θ) = ½ Σ a_i θ_i², plain SGD with step η: θ_{k+1} = r θ_k with r = 1 − η a, so g_k = a θ_k and
    ω = Σ_k −g_k (θ_{k+1} − θ_k) = η a² θ_0² (1 − r^{2K}) / (1 − r²), which tends to L(θ_0) − L(θ_K) as η → 0."""
    a = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    theta0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    eta, steps = 0.01, 200
    theta = theta0.clone().requires_grad_(True)
    si = SynapticIntelligence(c=1.0, xi=0.1)
    params = {"theta": theta}
    si.begin_task(params)
    optimizer = PenalisedOptimizer(torch.optim.SGD([theta], lr=eta), params, si.penalty, si.accumulate)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * (a * theta ** 2).sum()).backward()
        optimizer.step()
    r = 1 - eta * a
    omega = eta * a ** 2 * theta0 ** 2 * (1 - r ** (2 * steps)) / (1 - r ** 2)
    torch.testing.assert_close(si.path["theta"], omega)
    loss_drop = 0.5 * a * (theta0 ** 2 - theta.detach() ** 2)
    torch.testing.assert_close(si.path["theta"], loss_drop, rtol=0.03, atol=0)  # the path integral, to O(η)
    si.consolidate(params)
    delta = theta.detach() - theta0
    torch.testing.assert_close(si.omega["theta"], omega / (delta ** 2 + 0.1))
    torch.testing.assert_close(si.anchor["theta"], theta.detach())
    assert si.penalty(params).item() == 0.0


def test_si_accumulates_the_task_gradient_not_the_penalty_gradient():
    theta = torch.tensor([1.0, 3.0], requires_grad=True)
    params = {"theta": theta}
    si = SynapticIntelligence(c=10.0)
    si.begin_task(params)
    si.consolidate({"theta": torch.tensor([0.0, 0.0])})          # Ω > 0 only where ω ≠ 0: make one by hand
    si.omega = {"theta": torch.tensor([1.0, 1.0])}
    si.begin_task(params)
    seen = []
    optimizer = PenalisedOptimizer(torch.optim.SGD([theta], lr=0.1), params, si.penalty,
                                   lambda g, b, a: (seen.append(g["theta"].clone()), si.accumulate(g, b, a)))
    optimizer.zero_grad()
    (2.0 * theta.sum()).backward()                              # task gradient: 2 everywhere
    before = theta.detach().clone()
    optimizer.step()
    torch.testing.assert_close(seen[0], torch.tensor([2.0, 2.0]))
    # the step itself used task + penalty gradient: 2 + 2·c·Ω·(θ − θ*) with θ* = 0
    torch.testing.assert_close(theta.detach(), before - 0.1 * (2.0 + 20.0 * before))
    torch.testing.assert_close(si.path["theta"], -2.0 * (theta.detach() - before))


def test_si_rejects_misuse():
    with pytest.raises(ValueError, match="ξ"):
        SynapticIntelligence(c=1.0, xi=0.0)
    with pytest.raises(RuntimeError, match="begin_task"):
        SynapticIntelligence(c=1.0).consolidate({"a": torch.ones(1)})


# --- BatchE --------------------------------------------------------------------------------------------------
def test_batche_forward_matches_a_plain_reference():
    model = small_mlp(seed=2)
    factors = rank_one_factors(model, torch.Generator().manual_seed(0))
    assert all(set(s.unique().tolist()) <= {-1.0, 1.0} and set(t.unique().tolist()) <= {-1.0, 1.0}
               for s, t in factors.values())
    x = torch.randn(7, 6)
    h = x                                                       # reference: y = s ⊙ (W (x ⊙ t)), layer by layer
    for i, name in ((1, "1.weight"), (3, "3.weight")):
        s, t = factors[name]
        h = s * ((h * t) @ model[i].weight.T)
        h = torch.relu(h) if i == 1 else h
    torch.testing.assert_close(batche_forward(model, factors, x), h)
    torch.testing.assert_close(masked_forward(model, batche_weights(model, factors), x), h)


def test_batche_gradients_reach_only_the_factors_when_w_is_frozen():
    model = small_mlp(seed=3).requires_grad_(False)
    factors = rank_one_factors(model, torch.Generator().manual_seed(1))
    batche_forward(model, factors, torch.randn(5, 6)).sum().backward()
    assert all(s.grad is not None and t.grad is not None for s, t in factors.values())
    assert all(p.grad is None for p in model.parameters())
    again = rank_one_factors(model, torch.Generator().manual_seed(1))
    assert all(torch.equal(factors[n][0], again[n][0]) and torch.equal(factors[n][1], again[n][1]) for n in again)


# --- PSP -----------------------------------------------------------------------------------------------------
def test_psp_contexts_are_orthogonal_seeded_and_distinct():
    model = small_mlp(seed=4)
    contexts = psp_contexts(model, torch.Generator().manual_seed(0))
    assert {n: tuple(c.shape) for n, c in contexts.items()} == {"1.weight": (6, 6), "3.weight": (5, 5)}
    for c in contexts.values():
        torch.testing.assert_close(c @ c.T, torch.eye(c.shape[0]), atol=1e-5, rtol=0)
    same = psp_contexts(model, torch.Generator().manual_seed(0))
    other = psp_contexts(model, torch.Generator().manual_seed(1))
    assert all(torch.equal(contexts[n], same[n]) and not torch.allclose(contexts[n], other[n]) for n in contexts)


def test_random_orthogonal_is_haar_not_biased_to_the_identity():
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([random_orthogonal(3, g, torch.float64) for _ in range(2000)])
    # Haar: every entry has mean 0 and variance 1/n; an unsigned QR would bias the diagonal positive
    assert samples.mean(0).abs().max() < 0.05
    torch.testing.assert_close(samples.var(0), torch.full((3, 3), 1 / 3, dtype=torch.float64), atol=0.03, rtol=0)


def test_psp_forward_matches_a_plain_reference():
    model = small_mlp(seed=5)
    contexts = psp_contexts(model, torch.Generator().manual_seed(2))
    x = torch.randn(9, 6)
    h = torch.relu(model[1].weight @ contexts["1.weight"] @ x.T)   # reference: y = W (C x), column vectors
    h = (model[3].weight @ contexts["3.weight"] @ h).T
    torch.testing.assert_close(psp_forward(model, contexts, x), h)
    torch.testing.assert_close(masked_forward(model, psp_weights(model, contexts), x), h)
    assert psp_forward(model, contexts, x).shape == (9, 4) and not math.isnan(h.sum().item())


def test_layerwise_baselines_refuse_non_sequential_models():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 2, bias=False)

        def forward(self, x):
            return self.fc(x)

    model = Wrapped()
    with pytest.raises(TypeError, match="nn.Sequential"):
        psp_forward(model, psp_contexts(model, torch.Generator().manual_seed(0)), torch.randn(2, 6))


# --- the methods on the harness ------------------------------------------------------------------------------
def test_unshared_labels_shift_each_task_and_keep_the_inputs(permuted):
    unshared = UnsharedLabels(permuted)
    assert unshared.num_classes == 50 and unshared.classes_per_task == 10 and unshared.num_tasks == 5
    x, y = unshared.test_set(3)
    bx, by = permuted.test_set(3)
    assert torch.equal(x, bx) and torch.equal(y, by + 30)
    (tx, ty), (btx, bty) = next(iter(unshared.train_batches(2, 16, 1, seed=4))), next(iter(permuted.train_batches(2, 16, 1, seed=4)))
    assert torch.equal(tx, btx) and torch.equal(ty, bty + 20)
    with pytest.raises(TypeError, match="already unshared"):
        UnsharedLabels(unshared)


def test_ewc_and_si_without_a_penalty_are_fine_tuning_step_for_step(permuted):
    unshared = UnsharedLabels(permuted)
    settings = dict(num_batches=8, batch_size=32, lr=1e-3, seed=3)
    reference = FineTuning(dense_model("lenet_300_100", 50), unshared, **settings)
    methods = [OnlineEWCMethod(dense_model("lenet_300_100", 50), unshared, lam=0.0, fisher_samples=16, **settings),
               SIMethod(dense_model("lenet_300_100", 50), unshared, c=0.0, **settings)]
    for task in (0, 1):
        for method in [reference, *methods]:
            method.learn(task)
    for method in methods:
        for (name, p), q in zip(method.model.named_parameters(), reference.model.parameters()):
            assert torch.equal(p, q), f"{method.name} differs from fine-tuning in {name}"


def test_ewc_holds_important_weights_near_the_anchor(permuted):
    settings = dict(num_batches=15, batch_size=64, lr=1e-3, seed=0)
    ewc = OnlineEWCMethod(dense_model("lenet_300_100"), permuted, lam=1e4, fisher_samples=64, **settings)
    free = OnlineEWCMethod(dense_model("lenet_300_100"), permuted, lam=0.0, fisher_samples=64, **settings)
    for method in (ewc, free):
        method.learn(0)
    fisher, anchor = ewc.ewc.fisher, ewc.ewc.anchor
    assert all(torch.equal(anchor[n], free.ewc.anchor[n]) for n in anchor)   # same task-0 network
    for method in (ewc, free):
        method.learn(1)
    drift = {m.name + str(m.ewc.lam): quadratic_penalty(m.params, anchor, fisher).item() for m in (ewc, free)}
    assert drift["Online EWC10000.0"] < 0.2 * drift["Online EWC0.0"]
    assert ewc.storage_bytes() == 3 * dense_bytes(ewc.model)


def test_si_importance_is_mostly_positive_after_a_task(permuted):
    si = SIMethod(dense_model("lenet_300_100"), permuted, c=1.0, num_batches=15, batch_size=64, lr=1e-3)
    si.learn(0)
    omega = torch.cat([o.flatten() for o in si.si.omega.values()])
    assert omega.sum() > 0 and (omega > 0).float().mean() > 0.5    # the task loss went down along the path
    assert all(torch.equal(si.si.anchor[n], p) for n, p in si.params.items())
    assert si.penalty(si.params).item() == 0.0


def test_batche_freezes_w_after_the_first_task_and_never_forgets(permuted):
    batche = BatchE(dense_model("lenet_300_100"), permuted, num_batches=60, batch_size=64, first_lr=1e-3, lr=1e-2)
    batche.learn(0)
    x0, _ = permuted.test_set(0)
    before, weights = batche.predict(x0[:500], 0), snapshot(maskable_parameters(batche.model))
    batche.learn(1)
    assert torch.equal(batche.predict(x0[:500], 0), before)
    assert all(torch.equal(weights[n], p) for n, p in maskable_parameters(batche.model).items())
    assert task_accuracy(batche, permuted, 1, test_size=1000) > 0.3    # rank-one factors alone learn (chance: 0.1)
    per_task = sum(4 * (w.shape[0] + w.shape[1]) for w in weights.values())
    assert batche.storage_bytes() == dense_bytes(batche.model) + 2 * per_task
    with pytest.raises(ValueError, match="task id"):
        batche.predict(x0[:5], None)
    with pytest.raises(KeyError, match="not learned task 4"):
        batche.predict(x0[:5], 4)


def test_psp_trains_one_w_through_regenerated_contexts(permuted):
    psp = PSP(dense_model("lenet_300_100"), permuted, num_batches=30, batch_size=64, lr=1e-3)
    result = run_continual(psp, permuted, num_tasks=2, test_size=1000, progress=False)
    assert result.accuracy[1, 1] > 0.7 and result.accuracy[1, 0] > 0.5
    assert all(torch.equal(a, b) for a, b in zip(psp.contexts(1).values(), psp.contexts(1).values()))
    assert psp.storage_bytes() == dense_bytes(psp.model) + 2 * SEED_BYTES


@pytest.mark.parametrize("train_trunk", ["first", "never", "always"])
def test_separate_heads_train_the_trunk_as_asked(permuted, train_trunk):
    model = dense_model("lenet_300_100")
    heads = SeparateHeads(model, permuted, train_trunk, num_batches=10, batch_size=64)
    x0, _ = permuted.test_set(0)
    trunk = lambda: [p.detach().clone() for n, p in heads.model.named_parameters() if n != heads.head_name]  # noqa
    initial = trunk()
    heads.learn(0)
    after_first, before = trunk(), heads.predict(x0[:300], 0)
    heads.learn(1)
    same = lambda a, b: all(torch.equal(p, q) for p, q in zip(a, b))  # noqa
    assert same(initial, after_first) == (train_trunk == "never")
    assert same(after_first, trunk()) == (train_trunk != "always")
    assert torch.equal(heads.predict(x0[:300], 0), before) == (train_trunk != "always")
    assert set(heads.heads) == {0, 1} and heads.heads[0].shape == (10, 100)
    assert heads.name == {"first": "separate heads", "never": "separate heads, random trunk",
                          "always": "lower bound"}[train_trunk]


def test_supsup_gnu_infers_the_task_and_a_wrong_task_scores_zero(permuted):
    unshared = UnsharedLabels(permuted)
    supsup = SupSupGNu(frozen_random_model("lenet_300_100", 10, device="cpu"), unshared, num_batches=80)
    result = run_continual(supsup, unshared, num_tasks=3, task_ids=False, test_size=256, progress=False)
    gg = [(SupSupGG.predict(supsup, x[:256], t) == y[:256]).float().mean().item()  # the task given
          for t, (x, y) in enumerate(map(permuted.test_set, range(3)))]
    np.testing.assert_allclose(result.final, gg)                   # every batch's task inferred right
    x, y = unshared.test_set(2)
    assert (supsup.predict(x[:256], None) // 10 == 2).float().mean() > 0.9
    batches = [x[s:s + 128] for s in range(0, 300, 128)]           # 128, 128 and a short last batch of 44
    assert supsup.infer_batches(x[:300]) == [one_shot(supsup.model, supsup.bank, b[:1]) for b in batches]
    supsup.search, supsup.infer_from = "binary", 128               # the whole batch, the short one too
    assert supsup.infer_batches(x[:300]) == [binary_search(supsup.model, supsup.bank, b) for b in batches]
    supsup.infer_batches = lambda images: [0] * -(-images.shape[0] // 128)   # force the wrong task
    assert task_accuracy(supsup, unshared, 2, task_ids=False, test_size=256) == 0.0
    with pytest.raises(ValueError, match="infers the task"):
        supsup.predict(x[:5], 2)
    with pytest.raises(TypeError, match="UnsharedLabels"):
        SupSupGNu(supsup.model, [permuted])
