"""SupSup-Transfer, per-layer top-k fractions, and GG with BatchNorm on a small conv net (notebook 02)."""
import math

import pytest
import torch

from supsup_lite.config import derive_seed
from supsup_lite.core.masks import init_scores, topk_keep
from supsup_lite.core.models import frozen_random_model
from supsup_lite.core.training import train_bank, train_supermask, train_supermasks, transfer_scores
from supsup_lite.scenarios.gg_cifar import run_gg_batchnorm
from supsup_lite.scenarios.resnet import er_densities, frozen_small_convnet

SETTINGS = dict(num_batches=6, batch_size=32, seed=3)


@pytest.fixture(scope="module")
def lenet():
    return frozen_random_model("lenet_300_100", 10, seed=0, device="cpu")


def task_batches(stream, task):
    return stream.train_batches(task, SETTINGS["batch_size"], SETTINGS["num_batches"],
                                derive_seed(SETTINGS["seed"], task, "batches"))


def test_transfer_starts_each_task_from_the_mean_of_the_earlier_final_scores(lenet, permuted, monkeypatch):
    # Plain chain: task 0 from its seeded draw, task t from (1/t) Σ_{j<t} final s_j (float64 sum, in task order).
    finals, expected_masks, expected_starts = [], [], []
    for t in range(3):
        start = None
        if finals:
            start = {n: (sum(f[n].double() for f in finals) / len(finals)).float() for n in finals[0]}
        expected_starts.append(start)
        result = train_supermask(lenet, task_batches(permuted, t), seed=derive_seed(SETTINGS["seed"], t, "scores"),
                                 start_scores=start, keep_scores=True, progress=False)
        finals.append(result.scores[0])
        expected_masks.append(result.masks[0])

    import supsup_lite.core.training as training
    seen = []
    real = training.train_supermasks

    def spy(*args, **kwargs):
        seen.append(kwargs["start_scores"][0])
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_supermasks", spy)
    bank = train_bank(lenet, permuted, num_tasks=3, k=1, transfer=True, progress=False, **SETTINGS)
    assert seen[0] is None
    for t in (1, 2):
        for name, s in expected_starts[t].items():
            assert torch.equal(seen[t][name], s), f"task {t} {name}: the start is not the mean, bit for bit"
    for t in range(3):
        for name, mask in expected_masks[t].items():
            assert torch.equal(bank.get(t, torch.bool)[name], mask)
    # The transferred start differs from a scratch draw, and so do the masks.
    scratch = train_bank(lenet, permuted, num_tasks=3, k=1, progress=False, **SETTINGS)
    assert torch.equal(scratch.packed("1.weight")[0], bank.packed("1.weight")[0])
    assert not torch.equal(scratch.packed("1.weight")[2], bank.packed("1.weight")[2])


def test_transfer_scores_is_the_elementwise_mean():
    a = {"w": torch.tensor([1.0, -2.0, 0.5])}
    b = {"w": torch.tensor([3.0, 2.0, 0.25])}
    assert transfer_scores([a, b])["w"].tolist() == [2.0, 0.0, 0.375]
    assert transfer_scores([a])["w"].tolist() == a["w"].tolist()
    with pytest.raises(ValueError, match="at least one earlier task"):
        transfer_scores([])


def test_start_scores_equal_to_the_seeded_draw_change_nothing(lenet, permuted):
    seeded = train_supermask(lenet, task_batches(permuted, 0), seed=11, progress=False)
    given = init_scores(lenet, torch.Generator().manual_seed(11))
    started = train_supermask(lenet, task_batches(permuted, 0), seed=999, start_scores=given, progress=False)
    assert all(torch.equal(seeded.masks[0][n], started.masks[0][n]) for n in given)
    assert seeded.scores == []  # final scores only when asked for


def test_transfer_and_start_scores_refuse_bad_arguments(lenet, permuted):
    with pytest.raises(ValueError, match="pass k=1, got k=2"):
        train_bank(lenet, permuted, num_tasks=2, k=2, transfer=True, progress=False, **SETTINGS)
    first = train_bank(lenet, permuted, num_tasks=1, k=1, progress=False, **SETTINGS)
    with pytest.raises(ValueError, match="cannot resume a bank that holds 1 task"):
        train_bank(lenet, permuted, num_tasks=2, k=1, bank=first, transfer=True, progress=False, **SETTINGS)
    batches = [task_batches(permuted, 0)]
    with pytest.raises(ValueError, match="one entry per task"):
        train_supermasks(lenet, batches, seeds=[0], start_scores=[None, None], progress=False)
    scores = init_scores(lenet, torch.Generator().manual_seed(0))
    bad = {**{n: s.detach() for n, s in scores.items()}, "1.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"start_scores\[0\]\['1.weight'\] must be finite torch.float32 \(300, 784\)"):
        train_supermasks(lenet, batches, seeds=[0], start_scores=[bad], progress=False)
    nan = {n: s.detach().clone() for n, s in scores.items()}
    nan["5.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="with NaN or inf"):
        train_supermasks(lenet, batches, seeds=[0], start_scores=[nan], progress=False)


def test_per_layer_keep_fractions_train_masks_of_those_densities(lenet, permuted):
    densities = er_densities(lenet, 8)
    result = train_supermask(lenet, task_batches(permuted, 0), seed=0, keep_frac=densities, progress=False)
    for name, mask in result.masks[0].items():
        assert int(mask.sum()) == mask.numel() - int((1 - densities[name]) * mask.numel())
    with pytest.raises(ValueError, match=r"lacks \['5.weight'\]"):
        train_supermask(lenet, task_batches(permuted, 0), seed=0, keep_frac={"1.weight": 0.1, "3.weight": 0.1},
                        progress=False)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\], got 1.5 for '3.weight'"):
        train_supermask(lenet, task_batches(permuted, 0), seed=0,
                        keep_frac={"1.weight": 0.1, "3.weight": 1.5, "5.weight": 0.5}, progress=False)


def test_topk_keep_drops_exactly_d_entries_with_ties():
    magnitude = torch.tensor([2.0, 1.0, 1.0, 3.0, 1.0, 0.5, 1.0, 4.0])
    mask = topk_keep(magnitude, 0.5)  # drop d = 4: 0.5, then the first three of the four 1.0s
    assert mask.tolist() == [1, 0, 0, 1, 0, 0, 1, 1]
    reference = torch.ones(8)
    reference[torch.sort(magnitude, stable=True).indices[:4]] = 0
    assert torch.equal(mask, reference)


def test_shared_batchnorm_loses_early_tasks_and_per_task_batchnorm_keeps_them(split_mnist):
    model = frozen_small_convnet(10, width=4, seed=0, device="cpu")
    densities = dict.fromkeys(er_densities(model, 1), 0.5)
    runs = {shared: run_gg_batchnorm(model, split_mnist, num_tasks=2, densities=densities, num_batches=40,
                                     batch_size=64, shared_batchnorm=shared, progress=False)
            for shared in (False, True)}
    per_task, shared = runs[False].accuracy, runs[True].accuracy
    assert per_task[1, 0] == per_task[0, 0]  # per-task statistics: task 0 is untouched by task 1
    assert shared[0, 0] == per_task[0, 0]    # same first task either way
    assert shared[1, 0] < per_task[1, 0] - 0.1, shared  # shared statistics: task 0 drifts
    with pytest.raises(ValueError, match="exactly one of epochs and num_batches"):
        run_gg_batchnorm(model, split_mnist, num_tasks=1, densities=densities, progress=False)


def test_small_convnet_takes_flat_mnist_images():
    model = frozen_small_convnet(10, width=4, seed=0, device="cpu")
    assert model(torch.zeros(3, 784)).shape == (3, 10)
    assert not any(p.requires_grad for p in model.parameters())
    shapes = [tuple(p.shape) for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    assert shapes == [(4, 1, 3, 3), (8, 4, 3, 3), (16, 8, 3, 3), (10, 16)]
    assert torch.equal(model[1].weight.abs(), torch.full((4, 1, 3, 3), math.sqrt(2 / 9)))  # signed constant


@pytest.fixture(scope="module")
def split_mnist():
    from supsup_lite.data import SplitMNIST
    return SplitMNIST(2, device="cpu")


def test_flat_images_are_accepted_where_the_net_unflattens_them():
    from supsup_lite import validation

    model = frozen_small_convnet(10, width=4, seed=0, device="cpu")
    x = torch.zeros(3, 784)
    assert validation.images(model, x) is x
    with pytest.raises(ValueError, match=r"x must be a batch \(B, 1, H, W\) with B ≥ 1, got shape \(3, 785\)"):
        validation.images(model, torch.zeros(3, 785))
