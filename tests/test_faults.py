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
from supsup_lite.core import inference, training
from supsup_lite.core.masks import MaskBank, MaskBankError, apply_masks, final_masks
from supsup_lite.core.models import frozen_random_model
from supsup_lite.data import DataNotFoundError, PermutedMNIST, RotatedMNIST, SplitMNIST
from supsup_lite.data import mnist as mnist_module
from supsup_lite.scenarios import protocols


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
    (dict(num_batches=0), ValueError, "num_batches must be ≥ 1 or None, got 0"),
    (dict(num_batches=-3), ValueError, "num_batches must be ≥ 1 or None, got -3"),
])
def test_batch_settings(stream, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        next(stream.train_batches(0, **kwargs))


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


# --- bad images at every inference and evaluation entry -------------------------------------------------------
def _bank_of(model: torch.nn.Module, tasks: int) -> MaskBank:
    bank = MaskBank.for_model(model)
    generator = torch.Generator().manual_seed(0)
    for _ in range(tasks):
        bank.append({n: torch.rand(p.shape, generator=generator) < 0.5 for n, p in model.named_parameters()})
    return bank


INFERENCE = {
    "alpha_gradient": lambda m, b, x: inference.alpha_gradient(m, b, x),
    "one_shot": lambda m, b, x: inference.one_shot(m, b, x),
    "binary_search": lambda m, b, x: inference.binary_search(m, b, x),
    "alpha_gradient_each": lambda m, b, x: inference.alpha_gradient_each(m, b, x),
    "one_shot_each": lambda m, b, x: inference.one_shot_each(m, b, x),
    "binary_search_each": lambda m, b, x: inference.binary_search_each(m, b, x),
    "infer_tasks": lambda m, b, x: protocols.infer_tasks(m, b, x, search="binary"),
    "predict": lambda m, b, x: training.predict(m, None, x),
    "evaluate": lambda m, b, x: training.evaluate(m, None, x, torch.zeros(len(x), dtype=torch.long)),
}


def _one_nan_pixel() -> torch.Tensor:
    x = torch.zeros(3, 784)
    x[1, 400] = float("nan")
    return x


BAD_IMAGES = {
    "783 features": (lambda: torch.zeros(2, 783), ValueError, r"must be a batch \(B, 784\) with B ≥ 1.*\(2, 783\)"),
    "unbatched 28x28": (lambda: torch.zeros(28, 28), ValueError, r"got shape \(28, 28\); one image is x\[None\]"),
    "empty batch": (lambda: torch.zeros(0, 784), ValueError, r"B ≥ 1.*got shape \(0, 784\)"),
    "uint8": (lambda: torch.zeros(2, 784, dtype=torch.uint8), TypeError, r"dtype torch.uint8.*normalise raw MNIST"),
    "float64": (lambda: torch.zeros(2, 784, dtype=torch.float64), TypeError, r"convert with x.to\(torch.float32\)"),
    "all NaN": (lambda: torch.full((2, 784), float("nan")), ValueError, r"NaN or infinite values \(images \[0, 1\]\)"),
    "one NaN pixel": (_one_nan_pixel, ValueError, r"NaN or infinite values \(images \[1\]\).*torch.nan_to_num"),
    "an inf pixel": (lambda: torch.zeros(2, 784).index_fill_(1, torch.tensor([3]), float("inf")), ValueError,
                     "NaN or infinite"),
    "a list": (lambda: [[0.0] * 784], TypeError, "x must be a torch.Tensor batch"),
}


@pytest.mark.parametrize("bad", BAD_IMAGES)
@pytest.mark.parametrize("function", INFERENCE)
def test_bad_images_are_refused_at_every_entry(lenet, function, bad):
    make, error, fragment = BAD_IMAGES[bad]
    with pytest.raises(error, match=fragment):
        INFERENCE[function](lenet, _bank_of(lenet, 2), make())


@pytest.mark.parametrize("function", [f for f in INFERENCE if f not in ("predict", "evaluate")])
def test_an_empty_bank_says_so(lenet, function):
    with pytest.raises(ValueError, match=r"^the bank is empty: train at least one task first"):
        INFERENCE[function](lenet, MaskBank.for_model(lenet), torch.zeros(2, 784))


@pytest.mark.parametrize("function", [f for f in INFERENCE if f not in ("predict", "evaluate")])
@pytest.mark.parametrize("other", [("lenet_300_100", 100, 0), ("fc_1024_1024", 10, 0)], ids=["s=100", "fc"])
def test_every_inference_path_refuses_a_bank_of_another_network(lenet, function, other):
    model = frozen_random_model(other[0], other[1], seed=other[2], device="cpu")
    with pytest.raises(MaskBankError, match="masks only work on their own random network"):
        INFERENCE[function](model, _bank_of(lenet, 2), torch.zeros(2, 784))


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(num_tasks=2.5), TypeError, "num_tasks must be an int, got 2.5"),
    (dict(num_tasks=True), TypeError, "num_tasks must be an int, got True"),
    (dict(num_tasks=0), ValueError, "num_tasks must be ≥ 1, got 0"),
    (dict(num_tasks=3), ValueError, "num_tasks must be ≤ 2, got 3"),
    (dict(group_size=0), ValueError, "group_size must be ≥ 1, got 0"),
    (dict(group_size=1.0), TypeError, "group_size must be an int"),
    (dict(group_size=3), ValueError, "group_size must divide the 4 images, got 3"),
])
def test_bad_inference_counts(lenet, kwargs, error, fragment):
    bank = _bank_of(lenet, 2)
    for function in (inference.one_shot_each, inference.binary_search_each):
        with pytest.raises(error, match=fragment):
            function(lenet, bank, torch.zeros(4, 784), **kwargs)


def test_a_5_output_model_on_10_class_labels(stream):
    model = frozen_random_model("lenet_300_100", 5, seed=0, device="cpu")
    x, y = stream.test_set(0)
    with pytest.raises(ValueError, match=r"classes 0\.\.9, but the model has 5 outputs"):
        training.evaluate(model, None, x[:100], y[:100])
    with pytest.raises(ValueError, match=r"classes 0\.\.9, but the model has 5 outputs"):
        protocols.gg_accuracy(model, _bank_of(model, 1), stream, tasks=[0])
    with pytest.raises(TypeError, match="y must be an int64 tensor"):
        training.evaluate(model, None, x[:4], y[:4].float())


# --- bad training settings ------------------------------------------------------------------------------------
@pytest.mark.parametrize("lr, error, fragment", [
    (0, ValueError, "lr must be > 0, got 0"),
    (-1e-3, ValueError, "lr must be > 0, got -0.001"),
    (float("inf"), ValueError, "lr must be a finite number, got inf"),
    (float("nan"), ValueError, "lr must be a finite number, got nan"),
    ("1e-4", TypeError, "lr must be a number, got '1e-4'"),
])
def test_learning_rates_that_would_not_train(lenet, stream, lr, error, fragment):
    dense = frozen_random_model("lenet_300_100", 10, seed=0, device="cpu")
    calls = (lambda: training.train_supermask(lenet, stream.train_batches(0, 8, 1), seed=0, lr=lr, progress=False),
             lambda: training.train_bank(lenet, stream, num_tasks=1, num_batches=1, lr=lr, progress=False),
             lambda: training.train_dense(dense, stream.train_batches(0, 8, 1), lr=lr, progress=False))
    for call in calls:
        with pytest.raises(error, match=fragment):
            call()
    if isinstance(lr, float) or lr == 0:
        optimizer = torch.optim.SGD(dense.parameters(), lr=1.0)
        optimizer.param_groups[0]["lr"] = lr
        with pytest.raises(error, match=fragment):
            training.fit(dense, optimizer, stream.train_batches(0, 8, 1), progress=False)


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(num_batches=0), ValueError, "num_batches must be ≥ 1 or None, got 0"),
    (dict(num_batches=-2), ValueError, "num_batches must be ≥ 1 or None, got -2"),
    (dict(num_batches=2.5), TypeError, "num_batches must be an int, got 2.5"),
    (dict(num_tasks=True), TypeError, "num_tasks must be an int, got True"),
    (dict(num_tasks=4), ValueError, r"num_tasks must lie in 1\.\.3"),
    (dict(k=1.5), TypeError, "k \\(tasks trained at once\\) must be an int"),
    (dict(batch_size=0), ValueError, "batch_size must be ≥ 1, got 0"),
    (dict(seed=0.5), TypeError, "seed must be an int"),
])
def test_bad_bank_training_counts(lenet, stream, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        training.train_bank(lenet, stream, **{"num_tasks": 1, "num_batches": 1, **kwargs}, progress=False)


def test_no_batch_means_no_training(lenet):
    with pytest.raises(ValueError, match=r"the batches of task\(s\) \[0\] gave no batch, so nothing was trained"):
        training.train_supermask(lenet, [], seed=0, progress=False)
    dense = frozen_random_model("lenet_300_100", 10, seed=0, device="cpu")
    with pytest.raises(ValueError, match="gave no batch"):
        training.train_dense(dense, iter(()), progress=False)


@pytest.mark.parametrize("keep_frac", [None, 0.5], ids=["threshold", "top-k"])
def test_nan_scores_are_refused_by_both_mask_rules(lenet, keep_frac):
    scores = {n: torch.randn(p.shape) for n, p in lenet.named_parameters()}
    scores["3.weight"][7, 7] = float("nan")
    with pytest.raises(ValueError, match=r"scores\['3.weight'\] holds 1 NaN of 30000 values: training diverged"):
        final_masks(scores, keep_frac=keep_frac)


def test_bank_save_refuses_a_folder(lenet, tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory; give a file path inside it"):
        MaskBank.for_model(lenet).save(tmp_path)
