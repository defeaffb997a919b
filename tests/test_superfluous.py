import pytest
import torch
import torch.nn.functional as F

from supsup_lite.core.masks import init_scores, supermask_weight
from supsup_lite.core.models import frozen_random_model, maskable_parameters, masked_forward
from supsup_lite.core.training import train_bank
from supsup_lite.data import PermutedMNIST
from supsup_lite.scenarios.protocols import gg_accuracy
from supsup_lite.scenarios.superfluous import gg_by_output_size, gradient_split


def _masks(model, seed):
    return {n: s >= 0 for n, s in init_scores(model, torch.Generator().manual_seed(seed)).items()}


def test_gradient_split_against_autograd_of_the_two_losses_through_the_scores(permuted):
    model = frozen_random_model("lenet_300_100", 40, seed=2)
    x, y = permuted.test_set(1)
    x, y = x[:64], y[:64]
    scores = init_scores(model, torch.Generator().manual_seed(4))
    split = gradient_split(model, {n: s.detach() >= 0 for n, s in scores.items()}, x, y)
    params = maskable_parameters(model)
    logits = masked_forward(model, {n: supermask_weight(params[n], s) for n, s in scores.items()}, x)
    full = torch.autograd.grad(F.cross_entropy(logits, y), list(scores.values()), retain_graph=True)
    real = torch.autograd.grad(F.cross_entropy(logits[:, :10], y), list(scores.values()), retain_graph=True)
    dz_sup = torch.softmax(logits.detach(), 1) / 64
    dz_sup[:, :10] = 0
    sup = torch.autograd.grad(logits, list(scores.values()), grad_outputs=dz_sup)
    for layer, (g, g_real, g_sup) in enumerate(zip(full, real, sup)):
        g, g_real, g_sup = g.double().flatten(), g_real.double().flatten(), g_sup.double().flatten()
        torch.testing.assert_close(split["full"][layer], g.norm(), rtol=1e-5, atol=0)
        torch.testing.assert_close(split["real_only"][layer], g_real.norm(), rtol=1e-5, atol=0)
        torch.testing.assert_close(split["superfluous"][layer], g_sup.norm(), rtol=1e-5, atol=0)
        torch.testing.assert_close(split["alignment"][layer], g @ g_real / (g.norm() * g_real.norm()),
                                   rtol=1e-5, atol=1e-7)
    assert (split["alignment"] < 0.95).all()  # at initialisation the 30 superfluous outputs change the direction
    torch.testing.assert_close(split["mass"], torch.softmax(logits.detach(), 1)[:, 10:].sum(1).double().mean())


def test_a_network_without_superfluous_outputs_or_labels_outside_the_real_classes_is_refused(permuted):
    x, y = permuted.test_set(0)
    narrow = frozen_random_model("lenet_300_100", 10, seed=0)
    with pytest.raises(ValueError, match=r"classes=10 leaves no superfluous output among the model's 10"):
        gradient_split(narrow, _masks(narrow, 0), x[:8], y[:8])
    wide = frozen_random_model("lenet_300_100", 20, seed=0)
    with pytest.raises(ValueError, match=r"y holds label 12, not a real class \(below classes=10\)"):
        gradient_split(wide, _masks(wide, 0), x[:8], torch.full((8,), 12))


def test_gg_by_output_size_counts_what_a_bank_of_the_cli_scores_and_the_real_class_loss_recovers_s_10():
    rows = gg_by_output_size(sizes=(10, 20), budgets=(3, 5), tasks=2)
    assert [(r["s"], r["batches"], r["task"]) for r in rows] == [(s, b, t) for s in (10, 20) for b in (3, 5)
                                                                   for t in (0, 1)]
    stream = PermutedMNIST(2, seed=1, device="cpu")
    model = frozen_random_model("lenet_300_100", 20, seed=0)
    bank = train_bank(model, stream, num_tasks=2, num_batches=5, seed=0, progress=False)
    expected = [round(a * 10000) for a in gg_accuracy(model, bank, stream)]
    assert [r["correct"] for r in rows if r["s"] == 20 and r["batches"] == 5] == expected
    assert all(r["images"] == 10000 for r in rows)
    real_only = gg_by_output_size(sizes=(20,), budgets=(3, 5), tasks=2, classes=10)
    # without the superfluous terms in the loss, s = 20 scores exactly what s = 10 scores (nested networks)
    assert [r["correct"] for r in real_only] == [r["correct"] for r in rows if r["s"] == 10]
    with pytest.raises(ValueError, match=r"sizes=\[\] and budgets=\[3\] must both be non-empty"):
        gg_by_output_size(sizes=(), budgets=(3,), tasks=1)
