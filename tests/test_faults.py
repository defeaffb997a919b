"""The project's own fault suite: every wrong input or damaged file either works or stops with a sentence.

Each case asserts the exact exception type and a fragment of its message; cases that touch files also compare
the files byte for byte before and after (nothing lost, nothing half-written). Classes: bad counts and indices,
bad devices, bad masks, a bank meeting the wrong model or stream, damaged data files, bad images at every
inference and evaluation entry, bad training settings (learning rates, counts, no batch, NaN scores), damaged
run files of each kind (truncated, one flipped byte, wrong version), kills during a save, run folders whose files
disagree, and unusable output paths.
"""
from __future__ import annotations

import io
import json
import os
import shutil

import pytest
import torch

from supsup_lite import config
from supsup_lite.core import files, inference, training
from supsup_lite.core.files import DamagedFileError
from supsup_lite.core.masks import MaskBank, MaskBankError, apply_masks, final_masks
from supsup_lite.core.models import frozen_random_model
from supsup_lite.data import DataNotFoundError, PermutedMNIST, RotatedMNIST, SplitMNIST
from supsup_lite.data import mnist as mnist_module
from supsup_lite.scenarios import experiments, protocols


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


# --- run folders: damaged files, kills during a save, files that disagree ---------------------------------------
GNU = dict(tasks=2, outputs=10, objectives=("H",), batches=2, save_every=1, checkpoints=(1, 2))
NNS = dict(tasks=2, budget=2, outputs=10, batches=4, check_every=2, save_every=1, checkpoints=(2,), sample_batches=2)


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path → bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def gnu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gnu")
    return out, experiments.gnu_permuted_mnist(experiments.GNuConfig(**GNU), out, progress=False)


@pytest.fixture(scope="module")
def nns_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nns")
    return out, experiments.nns_permuted_mnist(experiments.NNsConfig(**NNS), out, progress=False)


@pytest.fixture
def gnu_copy(gnu_run, tmp_path):
    shutil.copytree(gnu_run[0], tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def nns_copy(nns_run, tmp_path):
    shutil.copytree(nns_run[0], tmp_path / "run")
    return tmp_path / "run"


def resume_gnu(out, **settings):
    return experiments.gnu_permuted_mnist(experiments.GNuConfig(**{**GNU, **settings}), out, progress=False)


def resume_nns(out):
    return experiments.nns_permuted_mnist(experiments.NNsConfig(**NNS), out, progress=False)


def _flip_tensor_byte(path, tensor: torch.Tensor) -> None:
    """Flip one bit in the middle of ``tensor``'s bytes inside the saved file (torch stores them uncompressed)."""
    data = bytearray(path.read_bytes())
    start = data.find(tensor.contiguous().numpy().tobytes())
    assert start > 0
    data[start + tensor.numel() * tensor.element_size() // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _rewrite_version(path) -> None:
    if path.suffix == ".json":
        state = json.loads(path.read_text())
        path.write_text(json.dumps({**state, "version": 99}))
    else:
        torch.save({**torch.load(path, weights_only=True), "version": 99}, path)


def _damage(folder, name: str, how: str) -> None:
    path = folder / name
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "wrong version":
        _rewrite_version(path)
    elif name == "results.json":  # one flipped byte: a digit of a reported accuracy
        text = path.read_text()
        at = text.index('"gg_accuracy": 0.') + len('"gg_accuracy": 0.')
        path.write_text(text[:at] + ("1" if text[at] != "1" else "2") + text[at + 1:])
    elif name == "gg_batches.pt":
        _flip_tensor_byte(path, torch.load(path, weights_only=True)["tensors"]["gg_batches"])
    elif name == "bank.pt":
        _flip_tensor_byte(path, torch.load(path, weights_only=True)["packed"]["5.weight"])
    else:  # a slot file: one score
        state = torch.load(path, weights_only=True)
        _flip_tensor_byte(path, state["tensors"]["scores/3.weight"])


DAMAGE = {  # (file, how) → (error, message fragment)
    ("results.json", "truncated"): (DamagedFileError, "results.json is not a readable results file"),
    ("results.json", "flipped byte"): (DamagedFileError, "results.json: checksum mismatch; the results file was"),
    ("results.json", "wrong version"): (DamagedFileError, "results.json has format version 99, this code reads 1"),
    ("bank.pt", "truncated"): (MaskBankError, "bank.pt is not a readable mask bank"),
    ("bank.pt", "flipped byte"): (MaskBankError, "bank.pt: checksum mismatch for '5.weight'"),
    ("bank.pt", "wrong version"): (MaskBankError, "bank.pt has format version 99, this code reads 2"),
    ("gg_batches.pt", "truncated"): (DamagedFileError, "gg_batches.pt is not a readable per-batch GG file"),
    ("gg_batches.pt", "flipped byte"): (DamagedFileError, "gg_batches.pt: checksum mismatch for 'gg_batches'"),
    ("gg_batches.pt", "wrong version"): (DamagedFileError, "gg_batches.pt has format version 99, this code reads 1"),
}


@pytest.mark.parametrize("name, how", DAMAGE, ids=[f"{n}-{h}" for n, h in DAMAGE])
def test_damaged_gnu_files_are_refused_and_left_alone(gnu_copy, name, how):
    _damage(gnu_copy, name, how)
    before = snapshot(gnu_copy)
    error, fragment = DAMAGE[name, how]
    with pytest.raises(error, match=fragment):
        resume_gnu(gnu_copy)
    assert snapshot(gnu_copy) == before


@pytest.mark.parametrize("how", ["truncated", "flipped byte", "wrong version"])
@pytest.mark.parametrize("which", ["learner.pt", "slot"])
def test_damaged_nns_files_are_refused_and_left_alone(nns_copy, which, how):
    name = which if which == "learner.pt" else "learner/" + sorted(p.name for p in (nns_copy / "learner").iterdir())[0]
    if which == "learner.pt" and how == "flipped byte":  # no tensor in it: edit one field behind the checksum
        state = torch.load(nns_copy / name, weights_only=True)
        torch.save({**state, "batches_seen": state["batches_seen"] + 1}, nns_copy / name)
    else:
        _damage(nns_copy, name, how)
    before = snapshot(nns_copy)
    what = "NNs learner state" if which == "learner.pt" else "NNs mask state"
    fragment = {"truncated": f"is not a readable {what}", "wrong version": "has format version 99, this code reads 1",
                "flipped byte": "checksum mismatch"}[how]
    with pytest.raises(DamagedFileError, match=fragment):
        resume_nns(nns_copy)
    assert snapshot(nns_copy) == before


def _half_written(real_save):
    def save(obj, file, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise KeyboardInterrupt  # killed in the middle of writing
    return save


@pytest.mark.parametrize("where", ["bank.pt", "gg_batches.pt", "results.json", "rename"])
def test_a_kill_during_a_save_leaves_the_old_files(gnu_copy, monkeypatch, where):
    run = experiments.GNuRun(experiments.GNuConfig(**GNU), gnu_copy, progress=False)
    before = snapshot(gnu_copy)
    if where == "results.json":  # killed after the first bytes of the JSON
        real_write = files.write_atomically

        def partial(file):
            file.write(b'{"format": "supsup-lite-res')
            raise KeyboardInterrupt

        monkeypatch.setattr(files, "write_atomically", lambda path, write: real_write(path, partial))
    elif where == "rename":  # killed with the new file complete, before it replaces the old one
        monkeypatch.setattr(files.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    else:  # killed halfway through torch.save
        real_save = torch.save

        def half_written(obj, file, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise KeyboardInterrupt

        monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(KeyboardInterrupt):
        if where == "bank.pt":
            run.bank.save(gnu_copy / "bank.pt")
        else:
            run.results["sessions"] += 100  # something new to write
            run.save()
    assert snapshot(gnu_copy) == before  # byte for byte, and no temporary file left behind


def test_a_run_killed_between_its_files_resumes_to_the_same_results(gnu_run, tmp_path, monkeypatch):
    """Killed after bank.pt and gg_batches.pt of the second chunk but before its results.json: the resumed run
    accepts the bank one chunk ahead and ends with the uninterrupted run's masks and numbers."""
    reference_out, reference = gnu_run
    real, writes = experiments._Session._write_json, []

    def killed_on_the_fourth_results_write(self):  # 1: start, 2: task 1 trained, 3: T=1 evaluated, 4: task 2
        writes.append(1)
        if len(writes) == 4:
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(experiments._Session, "_write_json", killed_on_the_fourth_results_write)
    with pytest.raises(KeyboardInterrupt):
        resume_gnu(tmp_path)
    monkeypatch.setattr(experiments._Session, "_write_json", real)
    assert experiments.load_results(tmp_path)["tasks_trained"] == 1 and len(MaskBank.load(tmp_path / "bank.pt")) == 2
    resumed = resume_gnu(tmp_path)
    timings = ("seconds", "rss_mb")
    strip = lambda records: [{k: v for k, v in r.items() if not k.endswith(timings)} for r in records]  # noqa: E731
    assert strip(resumed["checkpoints"]) == strip(reference["checkpoints"])
    ours, theirs = MaskBank.load(tmp_path / "bank.pt"), MaskBank.load(reference_out / "bank.pt")
    assert all(torch.equal(ours.packed(n), theirs.packed(n)) for n in theirs.names)


def _older_bank(folder) -> None:
    bank = MaskBank.load(folder / "bank.pt", device="cpu")
    older = MaskBank(bank.network, stream=bank.stream, device="cpu")
    older.append(bank.get(0, torch.bool))
    older.save(folder / "bank.pt")


def _other_gg_counts(folder) -> None:
    meta, tensors = files.load_tensors(folder / "gg_batches.pt", kind=experiments.GG_FORMAT, version=1, what="gg")
    files.save_tensors(folder / "gg_batches.pt", kind=experiments.GG_FORMAT, version=1,
                       metadata={k: v for k, v in meta.items() if k not in ("format", "version")},
                       tensors={"gg_batches": tensors["gg_batches"] - 1})


def _nns_results(folder, nns_folder) -> None:
    shutil.copyfile(nns_folder / "results.json", folder / "results.json")


CONFLICTS = {  # change to the finished GNu run → (error, message fragment)
    "results.json missing": (lambda f, n: (f / "results.json").unlink(), experiments.RunFolderError,
                             "holds bank.pt, gg_batches.pt but no results.json"),
    "gg_batches.pt missing": (lambda f, n: (f / "gg_batches.pt").unlink(), experiments.RunFolderError,
                              "bank.pt holds 2 tasks but gg_batches.pt, their per-batch GG counts, is missing"),
    "bank.pt missing": (lambda f, n: (f / "bank.pt").unlink(), experiments.RunFolderError,
                        "results.json records 2 trained tasks but bank.pt, their masks, is missing"),
    "older bank.pt": (lambda f, n: _older_bank(f), experiments.RunFolderError,
                      "bank.pt holds 1 tasks but results.json records 2 trained"),
    "other GG counts": (lambda f, n: _other_gg_counts(f), experiments.RunFolderError,
                        r"gg_batches.pt and results.json disagree on the GG accuracy of tasks \[0, 1\]"),
    "bank of another stream": (lambda f, n: MaskBank.for_model(
        frozen_random_model("lenet_300_100", 10, seed=0, device="cpu"), stream=PermutedMNIST(2, seed=7)).save(
        f / "bank.pt"), MaskBankError, r"trained on the task stream \{'stream': 'PermutedMNIST', 'seed': 7\}"),
    "another experiment": (_nns_results, experiments.RunFolderError, "holds a nns_permuted_mnist run"),
}


@pytest.mark.parametrize("case", CONFLICTS)
def test_conflicting_gnu_folders_stop_and_keep_their_files(gnu_copy, nns_run, case):
    change, error, fragment = CONFLICTS[case]
    change(gnu_copy, nns_run[0])
    before = snapshot(gnu_copy)
    with pytest.raises(error, match=fragment) as err:
        resume_gnu(gnu_copy)
    if error is experiments.RunFolderError and case != "another experiment":
        assert "Nothing was changed; to continue" in str(err.value) and "--overwrite" in str(err.value)
    assert snapshot(gnu_copy) == before


@pytest.mark.parametrize("settings, fragment", [
    (dict(tasks=1, checkpoints=(1,)), "the run has trained 2 tasks but tasks=1 was asked"),
    (dict(batches=3), r"holds a run with other settings \(saved, asked\): \{'batches': \(2, 3\)\}"),
])
def test_no_resume_with_fewer_tasks_or_other_settings(gnu_copy, settings, fragment):
    before = snapshot(gnu_copy)
    with pytest.raises(experiments.RunFolderError, match=fragment):
        resume_gnu(gnu_copy, **settings)
    assert snapshot(gnu_copy) == before


@pytest.mark.parametrize("case, fragment", [
    ("learner.pt missing", "results.json records 2 tasks learned but learner.pt, the learner's state, is missing"),
    ("slot missing", "which is missing from learner/"),
    ("results.json missing", "holds learner.pt, learner but no results.json"),
])
def test_conflicting_nns_folders_stop_and_keep_their_files(nns_copy, case, fragment):
    if case == "slot missing":
        sorted((nns_copy / "learner").iterdir())[0].unlink()
    else:
        (nns_copy / case.split()[0]).unlink()
    before = snapshot(nns_copy)
    with pytest.raises(experiments.RunFolderError, match=fragment):
        resume_nns(nns_copy)
    assert snapshot(nns_copy) == before


def test_the_cli_stops_on_a_conflict_and_overwrites_only_when_told(gnu_copy, capsys):
    (gnu_copy / "results.json").unlink()
    before = snapshot(gnu_copy)
    argv = ["gnu_permuted_mnist", "--tasks", "1", "--outputs", "10", "--objective", "H", "--batches", "2",
            "--ckpts", "1", "--out", str(gnu_copy), "--no-progress"]
    assert experiments.main(argv) == 2
    assert "but no results.json" in capsys.readouterr().err
    assert snapshot(gnu_copy) == before
    assert experiments.main(argv + ["--overwrite"]) == 0
    assert experiments.load_results(gnu_copy)["tasks_trained"] == 1 and len(MaskBank.load(gnu_copy / "bank.pt")) == 1


def test_the_cli_refuses_an_unusable_out(tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    argv = ["gnu_permuted_mnist", "--tasks", "1", "--outputs", "10", "--objective", "H", "--no-progress"]
    assert experiments.main(argv + ["--out", str(tmp_path / "a-file")]) == 2
    assert "out=" in capsys.readouterr().err and (tmp_path / "a-file").read_text() == "not a folder"
    assert experiments.main(argv + ["--out", str(tmp_path / "a-file" / "run")]) == 2
    assert "cannot create out=" in capsys.readouterr().err
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        experiments.GNuRun(experiments.GNuConfig(**GNU), tmp_path / "a-file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_out_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(PermissionError, match="is not writable"):
        experiments.GNuRun(experiments.GNuConfig(**GNU), locked)
