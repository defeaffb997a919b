import numpy as np
import pytest
import torch

from supsup_lite.data.mnist import (MNIST_MEAN, MNIST_STD, DataNotFoundError, PermutedMNIST, RotatedMNIST, SplitMNIST,
                              load_mnist, rotate_images)


def test_mnist_is_normalised_and_flat():
    x, y = load_mnist(train=False, device="cpu")
    assert x.shape == (10000, 784) and y.shape == (10000,) and x.dtype == torch.float32
    assert x.min().item() == pytest.approx(-MNIST_MEAN / MNIST_STD, abs=1e-5)
    assert abs(x.mean().item()) < 0.1 and set(y.unique().tolist()) == set(range(10))


def test_missing_data_offline_is_one_clear_error(monkeypatch, tmp_path):
    from torchvision.datasets import MNIST

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(MNIST, "download", offline)
    monkeypatch.setenv("SUPSUP_DATA", str(tmp_path))
    with pytest.raises(DataNotFoundError, match="SUPSUP_DATA") as err:
        load_mnist(train=True, device="cpu")
    assert str(tmp_path) in str(err.value)


def test_permutation_matches_authors_definition(permuted):
    for task in range(3):
        expected = np.random.RandomState(1 + task).permutation(784)
        assert permuted.permutation(task).tolist() == expected.tolist()
    x, y = permuted.test_set(2)
    raw, raw_y = load_mnist(train=False, device="cpu")
    assert torch.equal(x, raw[:, permuted.permutation(2)]) and torch.equal(y, raw_y)


def test_permutations_are_deterministic_and_distinct():
    a, b = PermutedMNIST(3, seed=7, device="cpu"), PermutedMNIST(3, seed=7, device="cpu")
    assert torch.equal(a.permutation(1), b.permutation(1))
    assert not torch.equal(a.permutation(0), a.permutation(1))
    assert not torch.equal(a.permutation(0), PermutedMNIST(3, seed=8, device="cpu").permutation(0))


def test_bad_task_index_names_the_valid_range(permuted):
    with pytest.raises(IndexError, match=r"tasks 0\.\.4"):
        permuted.test_set(5)
    with pytest.raises(IndexError, match=r"tasks 0\.\.4"):
        next(iter(permuted.train_batches(-1)))
    with pytest.raises(TypeError, match="int"):
        permuted.test_set(1.5)


def test_train_batches_walk_epochs_like_a_dataloader(permuted):
    sizes = [y.shape[0] for _, y in permuted.train_batches(0, batch_size=128)]
    assert len(sizes) == 469 and sizes[-1] == 60000 - 468 * 128 and set(sizes[:-1]) == {128}
    two_epochs = list(permuted.train_batches(0, batch_size=20000, num_batches=5))
    assert [y.shape[0] for _, y in two_epochs] == [20000, 20000, 20000, 20000, 20000]
    first_epoch = torch.cat([y for _, y in two_epochs[:3]])
    assert torch.equal(first_epoch.bincount(), load_mnist(True, "cpu")[1].bincount())


def test_train_batches_are_seeded(permuted):
    a = next(iter(permuted.train_batches(1, 64, seed=3)))
    b = next(iter(permuted.train_batches(1, 64, seed=3)))
    c = next(iter(permuted.train_batches(1, 64, seed=4)))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_rotation_by_zero_is_identity_and_by_90_is_rot90():
    x = torch.randn(5, 784)
    assert torch.equal(rotate_images(x, 0.0), x)
    turned = rotate_images(x, 90.0).view(5, 28, 28)
    assert torch.equal(turned, torch.rot90(x.view(5, 28, 28), k=1, dims=(1, 2)))
    assert torch.equal(rotate_images(x, 360.0), x)


def test_rotated_stream_turns_by_ten_degrees_and_fills_black():
    stream = RotatedMNIST(device="cpu")
    assert stream.num_tasks == 36 and stream.angle(9) == 90.0
    x, _ = stream.test_set(9)
    raw, _ = load_mnist(train=False, device="cpu")
    assert torch.equal(x.view(-1, 28, 28), torch.rot90(raw.view(-1, 28, 28), 1, (1, 2)))
    corners = stream.test_set(4)[0].view(-1, 28, 28)[:, 0, 0]  # 40°: the corner comes from outside
    assert torch.allclose(corners, torch.full_like(corners, -MNIST_MEAN / MNIST_STD))


def test_split_mnist_tasks_hold_two_digits_with_original_labels():
    stream = SplitMNIST(device="cpu")
    for task in range(5):
        _, y = stream.test_set(task)
        assert set(y.unique().tolist()) == {2 * task, 2 * task + 1}
        _, yb = next(iter(stream.train_batches(task, 256)))
        assert set(yb.unique().tolist()) <= {2 * task, 2 * task + 1}
    assert sum(stream.num_train(t) for t in range(5)) == 60000
    with pytest.raises(ValueError, match="at most 5"):
        SplitMNIST(num_tasks=6, device="cpu")


@pytest.mark.parametrize("degrees", [10.0, 45.0, 135.0, 170.0, 225.0, 315.0, 350.0, 33.3, -400.0])
def test_rotation_matches_pil_as_the_authors_rotated(degrees):
    from PIL import Image

    raw = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pil = torch.stack([torch.from_numpy(np.array(Image.fromarray(im.numpy()).rotate(degrees))) for im in raw])
    ours = rotate_images(raw.reshape(6, -1).float(), degrees).round().to(torch.uint8).view(6, 28, 28)
    assert torch.equal(ours, pil)
