"""HopSupSup: the neuron-masked BNNet, mask training, Hopfield storage, and recovery on real SplitMNIST masks."""
import math

import pytest
import torch
import torch.nn.functional as F

from supsup_lite.data import SplitMNIST
from supsup_lite.scenarios.hopfield import energy, store, to_bipolar
from supsup_lite.scenarios.hopsupsup import (BNNet, HopfieldMaskMemory, all_ones, evaluate_neuron_masks,
                                             frozen_bnnet, hamming, recover_and_score, recover_masks,
                                             split_batches, train_neuron_masks)
from supsup_lite.core.inference import entropy


def plain_bnnet(model: BNNet, x: torch.Tensor, masks) -> torch.Tensor:
    """The forward written out: z → (z − mean)/√(biased var + 1e-5) → ⊙ m → z·sigmoid(z), twice; then the head."""
    for layer, m in zip(model.hidden, masks):
        z = x @ layer.weight.t()
        z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
        z = z * m
        x = z * torch.sigmoid(z)
    return x @ model.head.weight.t()


def test_forward_matches_plain_formula_and_masks_gate_neurons():
    model = frozen_bnnet(width=32, seed=1, device="cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 784, generator=gen)
    masks = [(torch.rand(32, generator=gen) < 0.5).float() for _ in range(2)]
    out = model(x, masks)
    torch.testing.assert_close(out, plain_bnnet(model, x, masks))
    # a neuron switched off in layer 1 cannot influence the output through its outgoing weights; one left on does
    off, on = int(torch.nonzero(masks[0] == 0)[0]), int(torch.nonzero(masks[0] == 1)[0])
    with torch.no_grad():
        model.hidden[1].weight[:, off] += 100.0
    torch.testing.assert_close(model(x, masks), out)
    with torch.no_grad():
        model.hidden[1].weight[:, on] += 100.0
    assert not torch.allclose(model(x, masks), out)


def test_frozen_bnnet_is_signed_constant_and_seeded():
    a, b = frozen_bnnet(64, seed=3, device="cpu"), frozen_bnnet(64, seed=3, device="cpu")
    for (name, w), w_b in zip(a.named_parameters(), b.parameters()):
        c = math.sqrt(2.0 / w.shape[1])
        assert not w.requires_grad
        assert torch.equal(w.abs(), torch.full_like(w, c)), name
        assert torch.equal(w, w_b)
    assert not torch.equal(a.head.weight, frozen_bnnet(64, seed=4, device="cpu").head.weight)


def test_forward_errors():
    model = frozen_bnnet(8, device="cpu")
    with pytest.raises(ValueError, match="one neuron mask per hidden layer"):
        model(torch.zeros(4, 784), [torch.ones(8)])
    with pytest.raises(ValueError, match="at least 2 images"):
        model(torch.zeros(1, 784), all_ones(model))
    with pytest.raises(ValueError, match="batch_size"):
        split_batches(torch.zeros(5, 3), 1)


def test_split_batches_merges_a_single_leftover_row():
    sizes = [b.shape[0] for b in split_batches(torch.zeros(129, 2), 64)]
    assert sizes == [64, 65]
    assert [b.shape[0] for b in split_batches(torch.zeros(130, 2), 64)] == [64, 64, 2]


class OneTask:
    """A fixed stream of two batches, enough for ``train_neuron_masks``."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def train_batches(self, task, batch_size, num_batches, seed):
        return iter([(self.x, self.y)] * num_batches)

    def num_train(self, task):
        return self.x.shape[0]


def test_first_sgd_step_on_zero_scores_is_the_straight_through_gradient():
    """Scores start at 0 (mask all ones); step 1 of SGD(lr) moves them by −lr·∂L/∂m at m = 1."""
    model = frozen_bnnet(16, seed=0, device="cpu")
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 784, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    ones = [m.requires_grad_() for m in all_ones(model)]
    grads = torch.autograd.grad(F.cross_entropy(model(x, ones), y), ones)
    masks, history = train_neuron_masks(model, OneTask(x, y), 0, num_batches=1, lr=0.1, progress=False)
    for mask, g in zip(masks, grads):
        assert torch.equal(mask, -0.1 * g >= 0)        # new score = −lr·g (momentum and decay act from step 2)
    assert len(history.loss) == 1


def test_memory_stores_bipolar_masks_with_the_rule_and_keeps_the_mean():
    gen = torch.Generator().manual_seed(2)
    tasks = [[torch.rand(d, generator=gen) < 0.5 for d in (12, 20)] for _ in range(3)]
    memory = HopfieldMaskMemory([12, 20], rule="storkey", device="cpu")
    assert [memory.store(m) for m in tasks] == [0, 1, 2]
    for layer in range(2):
        X = torch.stack([to_bipolar(t[layer]) for t in tasks])
        torch.testing.assert_close(memory.weights[layer], store(X, "storkey"))
        torch.testing.assert_close(memory.mean_pattern()[layer], X.mean(0))
    x = [to_bipolar(m) for m in tasks[1]]
    torch.testing.assert_close(memory.energy(x), energy(memory.weights[0], x[0]) + energy(memory.weights[1], x[1]))
    assert memory.nbytes == 4 * (12 * 12 + 12 + 20 * 20 + 20)
    with pytest.raises(ValueError, match="shapes"):
        memory.store([torch.ones(12)])
    with pytest.raises(ValueError, match="empty"):
        HopfieldMaskMemory([4], device="cpu").mean_pattern()


def test_one_recovery_step_follows_the_schedule():
    """With T = 1 the loss is γ·E only: s ← s₀ − lr·(γ·∂E/∂s + wd·s₀), ∂E/∂s = −2 W x (STE, x = 2m − 1)."""
    model = frozen_bnnet(24, seed=0, device="cpu")
    gen = torch.Generator().manual_seed(3)
    memory = HopfieldMaskMemory(model.mask_sizes, device="cpu")
    for _ in range(3):
        memory.store([torch.rand(24, generator=gen) < 0.5 for _ in range(2)])
    x = torch.randn(8, 784, generator=gen)
    result = recover_masks(model, memory, [x], gamma=1e-2, lr=3.0, weight_decay=1e-3)
    for s, s0, W in zip(result.scores, memory.mean_pattern(), memory.weights):
        xb = 2 * (s0 >= 0).float() - 1
        torch.testing.assert_close(s, s0 - 3.0 * (1e-2 * (-(W + W.t()) @ xb) + 1e-3 * s0))
    assert len(result.energy) == 2 and len(result.entropy) == 1 and result.hamming == []


def test_entropy_phase_alone_is_the_first_step():
    """With T = 2 the first step minimises ½·H + ½·γ·E: the entropy trace is H of the starting mask."""
    model = frozen_bnnet(24, seed=0, device="cpu")
    memory = HopfieldMaskMemory(model.mask_sizes, device="cpu")
    memory.store([torch.ones(24, dtype=torch.bool)] * 2)
    x = torch.randn(8, 784, generator=torch.Generator().manual_seed(4))
    result = recover_masks(model, memory, [x, x])
    start = [(p >= 0).float() for p in memory.mean_pattern()]
    assert result.entropy[0] == pytest.approx(float(entropy(model(x, start)).mean()), rel=1e-6)


@pytest.fixture(scope="module")
def trained():
    """Three SplitMNIST tasks' neuron masks on the paper's BNNet, 10 batches each (seconds on a CPU).

    Recovery needs the paper's width: lr 500 and γ = 1.5e-3 are tuned for d = 2048 (at d = 256 the entropy
    steps swamp the energy steps and no mask is recovered).
    """
    torch.manual_seed(0)
    stream = SplitMNIST(num_tasks=3, device="cpu")
    model = frozen_bnnet(width=WIDTH, seed=0, device="cpu")
    masks = [train_neuron_masks(model, stream, t, num_batches=BATCHES, progress=False)[0] for t in range(3)]
    memory = HopfieldMaskMemory(model.mask_sizes, device="cpu")
    for m in masks:
        memory.store(m)
    return stream, model, masks, memory


WIDTH, BATCHES, TASK = 2048, 10, 1


def test_recovery_finds_the_trained_mask_of_a_real_task(trained):
    stream, model, masks, memory = trained
    assert min(hamming(masks[i], masks[j]) for i in range(3) for j in range(i)) > 50   # distinct masks
    x, y = stream.test_set(TASK)
    out = recover_and_score(model, memory, x[:1920], y[:1920], target=masks[TASK])
    hams = out["recovery"].hamming
    assert hams[0] > 0 and hams[-1] == 0
    assert out["accuracy"] == out["gg_accuracy"] > 0.9
    assert [hamming(out["recovery"].masks, m) == 0 for m in masks] == [t == TASK for t in range(3)]


def test_held_out_protocol_scores_only_unseen_images(trained):
    stream, model, masks, memory = trained
    x, y = stream.test_set(TASK)
    out = recover_and_score(model, memory, x, y, protocol="held_out", adapt_fraction=0.25, target=masks[TASK])
    assert out["adapt_images"] + out["scored_images"] == x.shape[0]
    assert out["adapt_images"] == round(0.25 * x.shape[0])
    assert len(out["recovery"].hamming) == len(split_batches(torch.zeros(out["adapt_images"]), 64)) + 1
    assert 0 <= out["accuracy"] <= 1
    with pytest.raises(ValueError, match="protocol"):
        recover_and_score(model, memory, x, y, protocol="peeking")


def test_evaluate_counts_every_image():
    model = frozen_bnnet(16, device="cpu")
    x = torch.randn(131, 784, generator=torch.Generator().manual_seed(5))
    y = model(x[:64], all_ones(model)).argmax(1)
    y = torch.cat([y, torch.full((67,), -1)])           # the last 67 labels can never be right
    assert evaluate_neuron_masks(model, all_ones(model), x, y) == pytest.approx(64 / 131)
