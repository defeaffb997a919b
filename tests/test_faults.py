"""The project's own fault suite: every wrong input or damaged file either works or stops with a sentence.

Each case asserts the exact exception type and a fragment of its message; cases that touch files also compare
the files byte for byte before and after (nothing lost, nothing half-written). Classes: bad counts and indices,
bad devices, bad masks, a bank meeting the wrong model or stream, damaged data files.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from supsup_lite import config
from supsup_lite.core.masks import MaskBank, MaskBankError, apply_masks
from supsup_lite.core.models import frozen_random_model
from supsup_lite.data import DataNotFoundError, PermutedMNIST, RotatedMNIST, SplitMNIST
from supsup_lite.data import mnist as mnist_module


@pytest.fixture(scope="module")
def lenet() -> torch.nn.Module:
    return frozen_random_model("lenet_300_100", 10, seed=0, device="cpu")


@pytest.fixture(scope="module")
def stream() -> PermutedMNIST:
    return PermutedMNIST(3, seed=1, device="cpu")


# --- counts and indices ------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, error, fragment", [
    (lambda: PermutedMNIST(2.5, device="cpu"), TypeError, "num_tasks must be an int, got 2.5"),
    (lambda: PermutedMNIST(True, device="cpu"), TypeError, "num_tasks must be an int, got True"),
    (lambda: PermutedMNIST(0, device="cpu"), ValueError, "num_tasks must be ≥ 1, got 0"),
    (lambda: PermutedMNIST(3, seed=1.0, device="cpu"), TypeError, "seed must be an int"),
    (lambda: RotatedMNIST(3, degrees="10", device="cpu"), TypeError, "degrees must be a number, got '10'"),
    (lambda: RotatedMNIST(3, degrees=float("nan"), device="cpu"), ValueError, "degrees must be finite"),
    (lambda: SplitMNIST(6, device="cpu"), ValueError, "at most 5 tasks"),
    (lambda: SplitMNIST(2.0, device="cpu"), TypeError, "num_tasks must be an int"),
])
def test_stream_settings(make, error, fragment):
    with pytest.raises(error, match=fragment):
        make()


@pytest.mark.parametrize("task, error, fragment", [
    (1.5, TypeError, "task must be an int, got 1.5"),
    (True, TypeError, "task must be an int, got True"),
    ("1", TypeError, "task must be an int, got '1'"),
    (3, IndexError, r"task 3 is out of range: PermutedMNIST has tasks 0\.\.2"),
    (-1, IndexError, "task -1 is out of range"),
])
def test_task_indices(stream, task, error, fragment):
    with pytest.raises(error, match=fragment):
        stream.test_set(task)


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(batch_size=0), ValueError, "batch_size must be ≥ 1, got 0"),
    (dict(batch_size=12.5), TypeError, "batch_size must be an int"),
    (dict(num_batches=0), ValueError, "num_batches must be ≥ 1, got 0"),
    (dict(num_batches=-3), ValueError, "num_batches must be ≥ 1, got -3"),
])
def test_batch_settings(stream, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        next(iter(stream.train_batches(0, **kwargs)))


def test_bank_task_indices(lenet):
    bank = MaskBank.for_model(lenet)
    with pytest.raises(IndexError, match="the bank is empty"):
        bank.get(0)
    bank.append({n: torch.ones(p.shape, dtype=torch.bool) for n, p in lenet.named_parameters()})
    for bad, error in ((True, TypeError), (0.0, TypeError), (1, IndexError)):
        with pytest.raises(error, match="task"):
            bank.get(bad)


# --- devices --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_explicit_cuda_without_a_gpu():
    with pytest.raises(ValueError, match="device='cuda' but torch sees no CUDA GPU; pass device=None"):
        frozen_random_model("lenet_300_100", 10, device="cuda")
    with pytest.raises(ValueError, match="device='cuda' but torch sees no CUDA GPU"):
        MaskBank.load("does-not-matter.pt", device="cuda")


@pytest.mark.parametrize("bad", ["tpu", "gpu0", 3.5])
def test_unknown_device_names(bad):
    with pytest.raises(ValueError, match="device="):
        config.resolve_device(bad)


# --- masks ----------------------------------------------------------------------------------------------------
def test_masks_never_broadcast(lenet):
    full = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in lenet.named_parameters()}
    with pytest.raises(ValueError, match=r"masks\['1.weight'\] has shape \(1, 784\), but the weight is \(300, 784\)"):
        apply_masks(lenet, {**full, "1.weight": torch.ones(1, 784, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"masks\['5.weight'\] is not binary"):
        apply_masks(lenet, {**full, "5.weight": torch.full((10, 100), 0.5)})
    with pytest.raises(KeyError, match="does not have"):
        apply_masks(lenet, {"head.weight": torch.ones(3)})


# --- a bank meets the wrong model or stream -------------------------------------------------------------------
def test_bank_on_another_random_network(lenet, tmp_path):
    bank = MaskBank.for_model(lenet)
    path = bank.save(tmp_path / "bank.pt")
    before = path.read_bytes()
    for other in (frozen_random_model("lenet_300_100", 10, seed=1, device="cpu"),
                  frozen_random_model("lenet_300_100", 100, seed=0, device="cpu"),
                  frozen_random_model("fc_1024_1024", 10, seed=0, device="cpu")):
        with pytest.raises(MaskBankError, match="masks only work on their own random network"):
            MaskBank.load(path, device="cpu").check_compatible(other)
    assert path.read_bytes() == before


def test_bank_on_another_permutation_stream(lenet, stream):
    bank = MaskBank.for_model(lenet, stream=stream)
    with pytest.raises(MaskBankError, match=r"got \{'stream': 'PermutedMNIST', 'seed': 2\}"):
        bank.check_stream(PermutedMNIST(3, seed=2, device="cpu"))


# --- damaged data files ---------------------------------------------------------------------------------------
@pytest.fixture
def mnist_copy(tmp_path, monkeypatch):
    """A private copy of the MNIST folder (the big training files linked, the test files copied)."""
    raw = config.data_root() / "MNIST" / "raw"
    copy = tmp_path / "data" / "MNIST" / "raw"
    copy.mkdir(parents=True)
    for name in mnist_module.MNIST_MD5:
        if name.startswith("t10k"):
            shutil.copyfile(raw / name, copy / name)
        else:
            (copy / name).symlink_to(raw / name)
    monkeypatch.setenv("SUPSUP_DATA", str(tmp_path / "data"))
    mnist_module._read_mnist.cache_clear()
    yield copy
    mnist_module._read_mnist.cache_clear()


def test_shuffled_labels_behind_a_valid_header_are_refused(mnist_copy):
    path = mnist_copy / "t10k-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    body = torch.tensor(list(data[8:]), dtype=torch.uint8)
    data[8:] = bytes(body[torch.randperm(body.numel(), generator=torch.Generator().manual_seed(0))].tolist())
    path.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in mnist_copy.iterdir() if not p.is_symlink()}
    with pytest.raises(mnist_module.DataDamagedError, match="t10k-labels-idx1-ubyte is damaged: md5"):
        mnist_module.load_mnist(False, "cpu")
    assert {p.name: p.read_bytes() for p in mnist_copy.iterdir() if not p.is_symlink()} == before


def test_truncated_images_are_damaged_not_missing(mnist_copy):
    path = mnist_copy / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-784])
    with pytest.raises((mnist_module.DataDamagedError, DataNotFoundError)) as err:
        mnist_module.load_mnist(False, "cpu")
    assert "damaged" in str(err.value)


def test_missing_files_are_reported_as_missing(mnist_copy):
    (mnist_copy / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataNotFoundError, match="SUPSUP_DATA"):
        mnist_module.load_mnist(False, "cpu")


def test_inference_and_gg_refuse_a_bank_of_another_network(lenet, stream):
    from supsup_lite.core.inference import one_shot
    from supsup_lite.scenarios.protocols import gg_accuracy

    bank = MaskBank.for_model(lenet)
    bank.append({n: torch.ones(p.shape, dtype=torch.bool) for n, p in lenet.named_parameters()})
    other = frozen_random_model("lenet_300_100", 10, seed=3, device="cpu")
    x, _ = stream.test_set(0)
    with pytest.raises(MaskBankError, match="masks only work on their own random network"):
        one_shot(other, bank, x[:1])
    with pytest.raises(MaskBankError, match="masks only work on their own random network"):
        gg_accuracy(other, bank, stream)
