"""Hopfield network: storage rules against plain loops, fixed points, energy descent, capacity."""
import pytest
import torch

from supsup_lite.scenarios.hopfield import (RULES, async_update, basin_curve, capacity_curve, energy, flip_bits,
                                            random_patterns, recall, simplified_storkey_update, storkey_update,
                                            store, sync_update, tie_tolerance, to_bipolar, to_mask,
                                            without_self_coupling)


def naive_storkey(patterns: torch.Tensor) -> torch.Tensor:
    """Storkey 1997 written entry by entry: h_ij = Σ_{k≠i,j} w_ik x_k, w_ii stays 0."""
    P, d = patterns.shape
    W = [[0.0] * d for _ in range(d)]
    for x in patterns.tolist():
        h = [[sum(W[i][k] * x[k] for k in range(d) if k not in (i, j)) for j in range(d)] for i in range(d)]
        W = [[0.0 if i == j else W[i][j] + (x[i] * x[j] - x[i] * h[j][i] - h[i][j] * x[j]) / d
              for j in range(d)] for i in range(d)]
    return torch.tensor(W, dtype=torch.float64)


def naive_simplified_storkey(patterns: torch.Tensor) -> torch.Tensor:
    """The authors' rule entry by entry: h_i = Σ_k w_ik x_k (i and j included), minus δ_ij."""
    P, d = patterns.shape
    W = [[0.0] * d for _ in range(d)]
    for x in patterns.tolist():
        h = [sum(W[i][k] * x[k] for k in range(d)) for i in range(d)]
        W = [[W[i][j] + (x[i] * x[j] - (i == j) - x[i] * h[j] - h[i] * x[j]) / d for j in range(d)]
             for i in range(d)]
    return torch.tensor(W, dtype=torch.float64)


def naive_hebbian(patterns: torch.Tensor) -> torch.Tensor:
    P, d = patterns.shape
    X = patterns.tolist()
    return torch.tensor([[0.0 if i == j else sum(x[i] * x[j] for x in X) / d for j in range(d)]
                         for i in range(d)], dtype=torch.float64)


@pytest.fixture
def small_patterns() -> torch.Tensor:
    return random_patterns(5, 9, torch.Generator().manual_seed(3)).double()


def apply_rule(patterns: torch.Tensor, rule: str, W: torch.Tensor | None = None) -> torch.Tensor:
    """The plain path: one RULES[rule] update per pattern."""
    d = patterns.shape[1]
    W = torch.zeros(d, d, dtype=patterns.dtype) if W is None else W
    for x in patterns:
        W = RULES[rule](W, x)
    return W


@pytest.mark.parametrize("rule, reference", [("storkey", naive_storkey),
                                             ("simplified_storkey", naive_simplified_storkey),
                                             ("hebbian", naive_hebbian)])
def test_update_rules_match_entrywise_loops(small_patterns, rule, reference):
    torch.testing.assert_close(apply_rule(small_patterns, rule), reference(small_patterns), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_blocked_store_equals_one_update_per_pattern(rule):
    X = random_patterns(70, 24, torch.Generator().manual_seed(7)).double()
    expected = apply_rule(X, rule)
    torch.testing.assert_close(store(X, rule, block_size=16), expected, rtol=1e-10, atol=1e-10)
    W = store(X[:33], rule, block_size=8)                     # continuing from a non-zero W
    torch.testing.assert_close(store(X[33:], rule, W, block_size=13), expected, rtol=1e-10, atol=1e-10)


def test_textbook_and_simplified_storkey_differ():
    """The two Storkey variants are different rules once W is non-zero (second pattern on)."""
    X = random_patterns(2, 16, torch.Generator().manual_seed(0))
    assert not torch.allclose(store(X, "storkey"), store(X, "simplified_storkey"))
    torch.testing.assert_close(store(X[:1], "storkey"), store(X[:1], "simplified_storkey"))


@pytest.mark.parametrize("rule", sorted(RULES))
def test_rules_give_symmetric_weights(rule):
    W = store(random_patterns(20, 64, torch.Generator().manual_seed(1)), rule)
    torch.testing.assert_close(W, W.t())


@pytest.mark.parametrize("rule", sorted(RULES))
def test_stored_patterns_are_fixed_points_below_capacity(rule):
    d, P = 256, 8                       # P well below d / (4 ln d) ≈ 11.5, the exact-recall capacity
    X = random_patterns(P, d, torch.Generator().manual_seed(2))
    W = store(X, rule)
    assert torch.equal(sync_update(without_self_coupling(W), X), X)
    states, sweeps = recall(W, X, mode="async", generator=torch.Generator().manual_seed(0))
    assert torch.equal(states, X) and sweeps == 1


def plain_async_recall(W, probes, max_sweeps, generator):
    """Textbook asynchronous recall: sweep the neurons in a fresh random order until nothing changes."""
    s = probes.clone()
    W0 = without_self_coupling(W)
    tol = tie_tolerance(W0)
    for sweeps in range(1, max_sweeps + 1):
        changed = False
        for i in torch.randperm(W.shape[0], generator=generator).tolist():
            changed |= bool(async_update(W0, s, i, tol).any())
        if not changed:
            break
    return s, sweeps


@pytest.mark.parametrize("rule, d, P, max_sweeps", [("hebbian", 100, 30, 50),      # ties: weights are k/100
                                                    ("hebbian", 64, 5, 50),
                                                    ("storkey", 120, 70, 50),
                                                    ("simplified_storkey", 80, 30, 2)])
def test_async_recall_equals_plain_sweeps(rule, d, P, max_sweeps):
    W = store(random_patterns(P, d, torch.Generator().manual_seed(d + P)).double(), rule)
    probes = random_patterns(12, d, torch.Generator().manual_seed(9)).double()
    g_plain, g_fast = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    expected, sweeps = plain_async_recall(W, probes, max_sweeps, g_plain)
    states, fast_sweeps = recall(W, probes, "async", max_sweeps, g_fast)
    assert torch.equal(states, expected) and fast_sweeps == sweeps and sweeps > 1
    assert torch.equal(torch.randperm(50, generator=g_plain), torch.randperm(50, generator=g_fast))


def test_sync_recall_is_repeated_sync_updates():
    W = store(random_patterns(20, 64, torch.Generator().manual_seed(1)), "hebbian")
    s = random_patterns(4, 64, torch.Generator().manual_seed(2))
    W0 = without_self_coupling(W)
    tol = tie_tolerance(W0)
    expected = sync_update(W0, sync_update(W0, sync_update(W0, s, tol), tol), tol)
    states, sweeps = recall(W, s, "sync", max_sweeps=3)
    assert torch.equal(states, expected) and sweeps == 3


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_recall_cleans_up_a_noisy_probe(mode):
    d = 256
    gen = torch.Generator().manual_seed(4)
    X = random_patterns(6, d, gen)
    W = store(X, "storkey")
    noisy = X.clone()
    flip = torch.rand(X.shape, generator=gen) < 0.1
    noisy[flip] *= -1
    assert flip.any()
    states, _ = recall(W, noisy, mode=mode, generator=gen)
    assert torch.equal(states, X)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_energy_never_increases_under_async_updates(rule):
    d, P = 48, 16                       # far over capacity: many flips happen
    gen = torch.Generator().manual_seed(5)
    W = store(random_patterns(P, d, gen).double(), rule, W=torch.zeros(d, d, dtype=torch.float64))
    s = random_patterns(8, d, gen).double()
    W0 = without_self_coupling(W)
    E = energy(W, s)
    flips = 0
    for _ in range(3):
        for i in torch.randperm(d, generator=gen).tolist():
            flips += int(async_update(W0, s, i, tie_tolerance(W0)).sum())
            E_new = energy(W, s)
            assert (E_new <= E + 1e-12).all(), f"energy rose at neuron {i}: {E.tolist()} → {E_new.tolist()}"
            E = E_new
    assert flips > 0


def test_simplified_storkey_has_negative_self_coupling():
    """Why the recall field leaves out w_ii: the authors' rule makes some w_ii < 0."""
    W = store(random_patterns(16, 48, torch.Generator().manual_seed(5)), "simplified_storkey")
    assert W.diagonal().min() < 0


def test_energy_matches_quadratic_form_and_autograd():
    gen = torch.Generator().manual_seed(6)
    W = store(random_patterns(4, 32, gen), "hebbian")
    s = random_patterns(1, 32, gen)[0].requires_grad_()
    E = energy(W, s)
    torch.testing.assert_close(E, -0.5 * s @ W @ s)
    (grad,) = torch.autograd.grad(E, s)
    torch.testing.assert_close(grad, -(W @ s).detach())


def test_capacity_curve_hebbian_breaks_down_and_storkey_holds_longer():
    d = 200
    counts = [10, 60]                     # loads 0.05 and 0.30
    heb = capacity_curve(d, counts, "hebbian", num_probes=32, progress=False)
    sto = capacity_curve(d, counts, "storkey", num_probes=32, progress=False)
    assert heb["load"] == [0.05, 0.3]
    assert heb["bit_error"][0] < 0.01 and heb["bit_error"][1] > 0.1
    assert sto["bit_error"][1] < heb["bit_error"][1]


def test_bipolar_round_trip_and_errors():
    m = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert torch.equal(to_bipolar(m), torch.tensor([-1.0, 1.0, 1.0, -1.0]))
    assert torch.equal(to_mask(to_bipolar(m)), m)
    with pytest.raises(ValueError, match="only −1 and \\+1"):
        store(torch.tensor([[1.0, 0.0, -1.0]]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        to_bipolar(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="unknown storage rule"):
        store(torch.ones(1, 3), "oja")
    with pytest.raises(ValueError, match="zero diagonal"):
        storkey_update(torch.eye(3), torch.ones(3))
    with pytest.raises(ValueError, match="zero diagonal"):
        store(torch.ones(1, 3), "storkey", torch.eye(3))
    with pytest.raises(ValueError, match="symmetric"):
        store(torch.ones(1, 2), "hebbian", torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="mode"):
        recall(torch.zeros(3, 3), torch.ones(3), mode="parallel")
    with pytest.raises(ValueError, match="square"):
        energy(torch.ones(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="d=4"):
        recall(torch.zeros(3, 3), torch.ones(4))
    assert simplified_storkey_update(torch.zeros(3, 3), torch.ones(3)).shape == (3, 3)


def test_flip_bits_flips_exactly_k_distinct_bits_per_row():
    X = random_patterns(6, 40, torch.Generator().manual_seed(0))
    for k in (0, 1, 13, 40):
        Y = flip_bits(X, k, generator=torch.Generator().manual_seed(k))
        assert torch.equal((Y != X).sum(1), torch.full((6,), k))
        assert torch.equal(Y[Y == X], X[Y == X]) and torch.equal(Y[Y != X], -X[Y != X])
    assert not torch.equal(flip_bits(X, 5, generator=torch.Generator().manual_seed(1))[0] != X[0],
                           flip_bits(X, 5, generator=torch.Generator().manual_seed(1))[1] != X[1])
    with pytest.raises(ValueError, match="num_flips=41"):
        flip_bits(X, 41)
    with pytest.raises(ValueError, match="only −1 and \\+1"):
        flip_bits(torch.zeros(2, 3), 1)


def test_basin_curve_equals_a_plain_loop():
    """Same generator sequence by hand: patterns, then per fraction a probe subset, the flips, recall."""
    d, P, fractions = 96, 12, [0.0, 0.1, 0.45]
    out = basin_curve(d, P, fractions, rule="storkey", num_probes=8, seed=4)
    gen = torch.Generator().manual_seed(4)
    X = random_patterns(P, d, gen)
    W = store(X, "storkey")
    for i, f in enumerate(fractions):
        targets = X[torch.randperm(P, generator=gen)[:8]]
        probes = flip_bits(targets, round(f * d), generator=gen)
        states, _ = plain_async_recall(W, probes, 30, gen)
        assert out["flip_fraction"][i] == round(f * d) / d
        assert out["exact"][i] == (states == targets).all(1).float().mean().item()
        assert out["bit_error"][i] == pytest.approx((states != targets).float().mean().item(), abs=1e-7)
        assert out["mirror"][i] == (states == -targets).all(1).float().mean().item()


def test_basin_shrinks_with_distance_and_storkey_has_the_wider_basin():
    d, fractions = 256, [0.0, 0.2, 0.3, 0.5]
    heb = basin_curve(d, 26, fractions, rule="hebbian", num_probes=32)      # load 0.10
    sto = basin_curve(d, 26, fractions, rule="storkey", num_probes=32)
    assert sto["exact"][:3] == [1.0, 1.0, 1.0]                    # Storkey: back from 30 % flipped bits
    assert heb["exact"][2] < sto["exact"][2]
    assert heb["exact"][3] == sto["exact"][3] == 0.0                # half the bits flipped: no memory of x is left
    with pytest.raises(ValueError, match="flip_fractions must be fractions in \\[0, 1\\], got \\[1.5\\]"):
        basin_curve(d, 4, [1.5])
