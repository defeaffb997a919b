"""SplitCIFAR100 and its GG loop, on tiny CIFAR-100 files this test writes in CIFAR's own on-disk format.

The files go through torchvision's real ``CIFAR100`` loader; only the MD5 sums it checks are pointed at them.
"""
from __future__ import annotations

import hashlib
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.datasets import CIFAR100

import supsup_lite.data.cifar as cifar
from supsup_lite.data.cifar import (CIFAR_MEAN, CIFAR_STD, SplitCIFAR100, cifar100_available,
                                    cifar100_skip_message, crop_flip, crop_flip_params)
from supsup_lite.data import DataNotFoundError
from supsup_lite.scenarios.gg_cifar import (evaluate_gg_task, run_split_cifar100, task_weights, topk_masks,
                                            train_gg_task)
from supsup_lite.scenarios.resnet import batchnorm_stats, er_densities, frozen_gem_resnet18

TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 2


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_fake_cifar100(root: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write cifar-100-python/{train,test,meta} with random images; return {split: (data (N, 3072), labels)}.

    Images of class c have a per-class mean colour (so a network can learn them) plus noise; the labels are
    shuffled so that selection by class is really tested.
    """
    rng = np.random.RandomState(seed)
    folder = root / CIFAR100.base_folder
    folder.mkdir(parents=True)
    colours = rng.randint(40, 216, size=(100, 3))
    written = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        labels = rng.permutation(np.repeat(np.arange(100), per_class))
        noise = rng.randint(-40, 41, size=(labels.size, 3, 1024))
        data = np.clip(colours[labels][:, :, None] + noise, 0, 255).astype(np.uint8).reshape(labels.size, 3072)
        entry = {"filenames": [f"{split}_{i}.png" for i in range(labels.size)], "batch_label": f"fake {split}",
                 "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(), "data": data}
        (folder / split).write_bytes(pickle.dumps(entry, protocol=2))
        written[split] = (data, labels.tolist())
    meta = {"fine_label_names": [f"class_{c:02d}" for c in range(100)],
            "coarse_label_names": [f"super_{c:02d}" for c in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    """SUPSUP_DATA → a folder with fake CIFAR-100; torchvision's checksums → those of the fake files."""
    root = tmp_path_factory.mktemp("cifar_data")
    written = write_fake_cifar100(root)
    folder = root / CIFAR100.base_folder
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUPSUP_DATA", str(root))
        mp.setattr(CIFAR100, "train_list", [["train", md5(folder / "train")]])
        mp.setattr(CIFAR100, "test_list", [["test", md5(folder / "test")]])
        mp.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5(folder / "meta")})
        cifar._read_cifar100.cache_clear()
        yield root, written
    cifar._read_cifar100.cache_clear()


def reference_task(data: np.ndarray, labels: list[int], classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' ``partition_datasetv4`` + ToTensor + Normalize, one PIL image at a time."""
    xs, ys = [], []
    for row, label in zip(data, labels):
        if label in classes:
            image = Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0))
            xs.append(TF.normalize(TF.to_tensor(image), CIFAR_MEAN, CIFAR_STD))
            ys.append(classes.index(label))
    return torch.stack(xs), torch.tensor(ys)


def test_class_split_is_the_authors_seeded_permutation(fake_cifar):
    for seed in (0, 3):
        np.random.seed(seed)  # the authors' RandSplitCIFAR100 uses the global NumPy seed
        perm = np.random.permutation(100)
        stream = SplitCIFAR100(num_tasks=20, seed=seed, device="cpu")
        assert [stream.classes(t) for t in range(20)] == [perm[5 * t:5 * t + 5].tolist() for t in range(20)]
    assert SplitCIFAR100(seed=0, device="cpu").classes(0) != SplitCIFAR100(seed=1, device="cpu").classes(0)
    assert sorted(sum((stream.classes(t) for t in range(20)), [])) == list(range(100))
    assert stream.class_names(2) == [f"class_{c:02d}" for c in stream.classes(2)]


@pytest.mark.parametrize("task", [0, 7, 19])
def test_test_and_train_sets_match_the_reference_partition(fake_cifar, task):
    _, written = fake_cifar
    stream = SplitCIFAR100(num_tasks=20, seed=1, device="cpu")
    for split, got in (("test", stream.test_set(task)), ("train", stream.train_set(task))):
        x_ref, y_ref = reference_task(*written[split], stream.classes(task))
        x, y = got
        assert x.dtype == torch.float32 and x.shape == (5 * (TEST_PER_CLASS if split == "test" else TRAIN_PER_CLASS),
                                                        3, 32, 32)
        assert torch.equal(y, y_ref) and sorted(set(y.tolist())) == [0, 1, 2, 3, 4]
        torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-6)
    assert stream.num_train(task) == 5 * TRAIN_PER_CLASS


def test_train_batches_cover_the_task_once_per_epoch_and_are_seeded(fake_cifar):
    stream = SplitCIFAR100(num_tasks=4, seed=0, device="cpu")
    batches = list(stream.train_batches(2, batch_size=8, seed=5, augment=False))
    assert [b[0].shape[0] for b in batches] == [8, 8, 4]  # 20 images, last partial batch kept
    x = torch.cat([b[0] for b in batches])
    x_ref, _ = stream.train_set(2)
    order = [int(torch.nonzero((x_ref == xi).flatten(1).all(1))[0]) for xi in x]
    assert sorted(order) == list(range(20))
    again = list(stream.train_batches(2, batch_size=8, seed=5))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, stream.train_batches(2, batch_size=8, seed=5)))
    other = next(iter(stream.train_batches(2, batch_size=8, seed=6)))
    assert not torch.equal(other[0], again[0][0])
    assert next(iter(stream.train_batches(2, batch_size=8, num_batches=5)))[0].shape == (8, 3, 32, 32)


def test_crop_flip_matches_torchvision_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=g)
    top, left, flip = crop_flip_params(12, g)
    assert top.min() >= 0 and top.max() <= 8 and left.min() >= 0 and left.max() <= 8
    out = crop_flip(x, top, left, flip, fill=torch.zeros(3, dtype=torch.uint8))
    assert out.shape == x.shape and out.dtype == torch.uint8
    for b in range(12):
        ref = TF.crop(TF.pad(x[b], [4]), int(top[b]), int(left[b]), 32, 32)
        ref = TF.hflip(ref) if flip[b] else ref
        assert torch.equal(out[b], ref), b
    edge = crop_flip(x[:1], torch.tensor([0]), torch.tensor([8]), torch.tensor([True]), fill=torch.zeros(3))
    assert torch.all(edge[0, :, :4] == 0) and torch.all(edge[0, :, :, :4] == 0)  # top pad rows; right pad, flipped


def test_augmented_batch_equals_torchvision_pipeline_on_pil_images(fake_cifar):
    """RandomCrop(32, 4) + HFlip + ToTensor + Normalize on PIL images, with the offsets our generator drew."""
    stream = SplitCIFAR100(num_tasks=2, seed=0, device="cpu")
    plain = next(iter(stream.train_batches(1, batch_size=10, seed=3, augment=False)))
    augmented = next(iter(stream.train_batches(1, batch_size=10, seed=3)))
    g = torch.Generator().manual_seed(3)
    top, left, flip = crop_flip_params(10, g)
    raw = (plain[0] * torch.tensor(CIFAR_STD).view(1, 3, 1, 1) + torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) * 255
    raw = raw.round().clamp(0, 255).to(torch.uint8)
    for b in range(10):
        image = TF.to_pil_image(raw[b])
        image = TF.crop(TF.pad(image, [4]), int(top[b]), int(left[b]), 32, 32)
        image = TF.hflip(image) if flip[b] else image
        ref = TF.normalize(TF.to_tensor(image), CIFAR_MEAN, CIFAR_STD)
        torch.testing.assert_close(augmented[0][b], ref, rtol=0, atol=1e-5)
    assert torch.equal(augmented[1], plain[1])
    assert 0.2 < flip.float().mean() < 0.8


def test_stream_rejects_bad_tasks(fake_cifar):
    with pytest.raises(ValueError, match="1..20 tasks"):
        SplitCIFAR100(num_tasks=21, device="cpu")
    stream = SplitCIFAR100(num_tasks=3, device="cpu")
    with pytest.raises(IndexError, match="tasks 0..2"):
        stream.test_set(3)


def test_availability_and_clear_error_when_missing(fake_cifar, tmp_path, monkeypatch):
    root, _ = fake_cifar
    assert cifar100_available(root)
    assert not cifar100_available(tmp_path)
    assert "SUPSUP_DATA" in cifar100_skip_message(tmp_path) and str(tmp_path) in cifar100_skip_message(tmp_path)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    monkeypatch.setenv("SUPSUP_DATA", str(tmp_path))
    with pytest.raises(DataNotFoundError, match="SUPSUP_DATA") as err:
        SplitCIFAR100(device="cpu")
    assert "CIFAR-100" in str(err.value) and str(tmp_path) in str(err.value)


# --- the GG loop ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_tasks(fake_cifar):
    """A width-4 GEM ResNet-18 and a 2-task stream of the fake data."""
    return frozen_gem_resnet18(num_outputs=5, width=4, seed=0, device="cpu"), SplitCIFAR100(2, seed=0, device="cpu")


def task0_logits(model, stream, masks, stats) -> torch.Tensor:
    x, _ = stream.test_set(0)
    return torch.func.functional_call(model, task_weights(model, masks, stats), (x,))


def one_gg_task(model, stream, task, stats, densities, *, epochs, batch_size, **settings):
    """``train_gg_task`` on ``epochs`` epochs of ``stream``'s task, batches and scores seeded with the task."""
    per_epoch = -(-stream.num_train(task) // batch_size)
    return train_gg_task(model, stream.train_batches(task, batch_size, epochs * per_epoch, task), bn_stats=stats,
                         densities=densities, num_batches=epochs * per_epoch, batches_per_epoch=per_epoch, seed=task,
                         progress=False, **settings)


@pytest.mark.parametrize("shared", [False, True])
def test_later_task_leaves_earlier_task_bit_identical_only_with_per_task_batchnorm(two_tasks, shared):
    model, stream = two_tasks
    densities = er_densities(model, budget=4)
    stats0 = batchnorm_stats(model)
    masks0 = one_gg_task(model, stream, 0, stats0, densities, epochs=1, batch_size=10).masks[0]
    before = task0_logits(model, stream, masks0, stats0)
    stats1 = stats0 if shared else batchnorm_stats(model)
    masks1 = one_gg_task(model, stream, 1, stats1, densities, epochs=1, batch_size=10).masks[0]
    after = task0_logits(model, stream, masks0, stats0)
    assert not model.training
    assert any(not torch.equal(masks0[n], masks1[n]) for n in masks0)
    if shared:
        assert not torch.allclose(after, before, atol=1e-3)  # task 0 is now normalised with task 1's statistics
    else:
        assert torch.equal(after, before)


def test_topk_masks_gradient_is_sign_of_score_times_mask_gradient():
    """The straight-through estimator acts on |s| (authors' GetSubnet on scores.abs()): ∂L/∂s = sign(s)·∂L/∂M."""
    g = torch.Generator().manual_seed(0)
    scores = {"w": torch.randn(6, 5, generator=g).requires_grad_(True)}
    upstream = torch.randn(6, 5, generator=g)
    mask = topk_masks(scores, {"w": 0.4})["w"]
    assert int(mask.sum()) == 30 - int(0.6 * 30)
    assert torch.equal(mask.bool(), scores["w"].abs() >= scores["w"].abs().flatten().sort().values[18])
    (mask * upstream).sum().backward()
    torch.testing.assert_close(scores["w"].grad, torch.sign(scores["w"].detach()) * upstream)


def test_train_gg_task_learns_and_keeps_er_density(two_tasks):
    """Real training on the fake data (class = mean colour): far above chance (0.2) with the task's mask + BN."""
    model, stream = two_tasks
    densities = er_densities(model, budget=32)
    stats = batchnorm_stats(model)
    result = one_gg_task(model, stream, 0, stats, densities, epochs=20, batch_size=20, lr=1e-2)
    masks, history = result.masks[0], result.history[0]
    assert len(history.loss) == 20 and history.loss[-1] < 0.5 * history.loss[0]
    for name, mask in masks.items():
        assert mask.dtype == torch.bool
        assert int(mask.sum()) == mask.numel() - int((1 - densities[name]) * mask.numel()), name
    assert int(stats["bn1.num_batches_tracked"]) == 20
    assert evaluate_gg_task(model, stream, 0, masks, stats) >= 0.6


def test_run_split_cifar100_records_the_accuracy_matrix(fake_cifar):
    result = run_split_cifar100(num_tasks=2, epochs=1, budget=4, batch_size=20, width=4, device="cpu",
                                progress=False)
    assert result.accuracy.shape == (2, 2) and np.isnan(result.accuracy[0, 1])
    assert result.accuracy[1, 0] == result.accuracy[0, 0]  # per-task BN: task 0 unchanged by task 1
    assert np.array_equal(result.accuracy_after_training, np.diag(result.accuracy))
    assert len(result.bank) == 2 and result.bank.arch == "gem_resnet18"
    assert result.bn_stats[0] is not result.bn_stats[1]
    assert 0 < result.kept_weights < result.total_weights
    shared = run_split_cifar100(num_tasks=2, epochs=1, budget=4, batch_size=20, width=4, device="cpu",
                                shared_batchnorm=True, progress=False)
    assert shared.bn_stats[0] is shared.bn_stats[1]
