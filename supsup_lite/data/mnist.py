"""MNIST task streams held as tensors on the device: PermutedMNIST, RotatedMNIST, SplitMNIST.

MNIST is read once through torchvision into a float tensor, normalised with (0.1307, 0.3081) and flattened to
(N, 784). A task's input transform (a pixel permutation, a rotation) is applied to whole batches on the device,
and batches are drawn by indexing with a seeded ``torch.Generator``: no per-sample PIL work in training loops.
Task definitions follow the authors' code (RAIVNLab/supsup, `data/mnist.py`: `MNISTPerm`, `RotatingMNIST`).
"""
from __future__ import annotations

import hashlib
import math
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .. import validation
from ..config import data_root, resolve_device

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGE_SIDE = 28
NUM_PIXELS = IMAGE_SIDE * IMAGE_SIDE

Batch = tuple[torch.Tensor, torch.Tensor]


class DataNotFoundError(RuntimeError):
    """A dataset is neither under ``SUPSUP_DATA`` nor downloadable."""


class DataDamagedError(RuntimeError):
    """A dataset's files are there but not the published bytes (truncated, edited, or another version)."""


# md5 of the four uncompressed IDX files as published (the .gz archives' contents), checked before every first read
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


def not_found_message(dataset: str, root: object, err: Exception) -> str:
    """The one error text for a missing dataset: where we looked and how to fix it."""
    return (f"{dataset} is not under {root} and could not be downloaded ({type(err).__name__}: {err}). "
            f"Point SUPSUP_DATA at a folder holding it in torchvision's layout "
            f"(e.g. SUPSUP_DATA=/path/to/data holding MNIST/raw/) or run once with internet access to download "
            f"it there.")


def verify_mnist_files(root: str | Path, train: bool) -> None:
    """Raise ``DataDamagedError`` unless the split's two IDX files under ``root/MNIST/raw`` have the published md5."""
    prefix = "train" if train else "t10k"
    for name, expected in MNIST_MD5.items():
        if not name.startswith(prefix):
            continue
        path = Path(root) / "MNIST" / "raw" / name
        digest = hashlib.md5(path.read_bytes()).hexdigest()
        if digest != expected:
            raise DataDamagedError(f"MNIST file {path} is damaged: md5 {digest}, the published file has "
                                   f"{expected}. "
                                   f"Delete it and download MNIST again (or restore it from a good copy); "
                                   f"reading it would give wrong images or labels silently")


@lru_cache(maxsize=4)
def _read_mnist(root: str, train: bool) -> Batch:
    from torchvision.datasets import MNIST

    prefix = "train" if train else "t10k"
    if all((Path(root) / "MNIST" / "raw" / name).exists() for name in MNIST_MD5 if name.startswith(prefix)):
        verify_mnist_files(root, train)  # files there: damaged ones are named, never reported as missing
    try:
        dataset = MNIST(root, train=train, download=True)
    except Exception as err:  # torchvision raises RuntimeError/URLError/OSError when offline
        raise DataNotFoundError(not_found_message("MNIST", root, err)) from err
    images = (dataset.data.reshape(-1, NUM_PIXELS).float() / 255.0 - MNIST_MEAN) / MNIST_STD
    return images, dataset.targets.long()


def load_mnist(train: bool, device: torch.device | str | None = None) -> Batch:
    """MNIST split as (images (N, 784) float32, normalised; labels (N,) int64) on ``device``."""
    images, labels = _read_mnist(str(data_root()), train)
    dev = resolve_device(device)
    return images.to(dev), labels.to(dev)


@lru_cache(maxsize=64)
def rotation_source_index(side: int, degrees: float) -> torch.Tensor:
    """For each output pixel of a ``degrees`` counter-clockwise rotation, the flat input pixel it copies.

    Returns (side²,) int64 on the CPU; −1 marks output pixels that come from outside the image. This is PIL's
    ``Image.rotate`` without expand (nearest neighbour, the authors' RotatingMNIST) done in PIL's own
    arithmetic, so it matches bit for bit at every angle, ties included. The inverse map of output pixel
    (x, y) about the centre c = side/2 is x_in = cos·x + sin·y + t_x, y_in = −sin·x + cos·y + t_y with
    θ = −degrees and cos, sin rounded to 15 decimals; the source pixel is ⌊·⌋ of the map at the pixel centre
    (x + ½, y + ½), evaluated in 16.16 fixed point (libImaging's ``affine_fixed``). A float grid_sample
    breaks the exact ties on the diagonals of a 45° turn differently.
    """
    theta = -math.radians(degrees % 360.0)
    cos, sin = round(math.cos(theta), 15), round(math.sin(theta), 15)
    centre = side / 2
    shift_x = cos * -centre + sin * -centre + centre  # PIL's order of operations, so the doubles agree
    shift_y = -sin * -centre + cos * -centre + centre

    def fixed(value: float) -> int:
        return math.floor(value * 65536.0 + 0.5)

    xx0, yy0 = fixed(shift_x + cos * 0.5 + sin * 0.5), fixed(shift_y + -sin * 0.5 + cos * 0.5)
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    x_in = torch.div(xx0 + x * fixed(cos) + y * fixed(sin), 65536, rounding_mode="floor")
    y_in = torch.div(yy0 + x * fixed(-sin) + y * fixed(cos), 65536, rounding_mode="floor")
    inside = (x_in >= 0) & (x_in < side) & (y_in >= 0) & (y_in < side)
    return torch.where(inside, y_in * side + x_in, -1).view(-1)


def rotate_images(x: torch.Tensor, degrees: float, fill: float = 0.0) -> torch.Tensor:
    """Rotate flattened square images counter-clockwise by ``degrees`` about the centre, nearest neighbour.

    x: (B, side²) → (B, side²). Pixels that come from outside the image get ``fill``. One gather with a
    cached index (:func:`rotation_source_index`).
    """
    side = math.isqrt(x.shape[-1])
    if side * side != x.shape[-1]:
        raise ValueError(f"rotate_images expects flattened square images, got {x.shape[-1]} pixels")
    index = rotation_source_index(side, float(degrees)).to(x.device)
    rotated = x.index_select(-1, index.clamp(min=0))
    return torch.where(index >= 0, rotated, torch.full_like(rotated, fill))


class TaskStream:
    """A sequence of MNIST tasks sharing one copy of the data on the device.

    Subclasses define ``transform`` (the task's input change) and, where a task uses a subset of the images,
    ``_task_indices``. ``num_classes`` is the number of output labels a model needs.
    """

    name = "mnist"
    num_classes = 10

    def __init__(self, num_tasks: int, device: torch.device | str | None = None) -> None:
        self.num_tasks = validation.integer("num_tasks", num_tasks, minimum=1)
        self.device = resolve_device(device)
        self._train = self._load(train=True)
        self._test = self._load(train=False)

    def _load(self, train: bool) -> Batch:
        """The split's (images, labels) on ``self.device``; MNIST here, other datasets override this."""
        return load_mnist(train, self.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_tasks={self.num_tasks}, device={self.device})"

    def fingerprint(self) -> dict:
        """What defines this stream's tasks (kind and task parameters; not the task count): a bank records it."""
        return {"stream": self.name}

    def check_task(self, task: int) -> int:
        """Return ``task`` if it is a valid task index, else raise a clear ``TypeError`` / ``IndexError``."""
        task = validation.integer("task", task)
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} is out of range: {self.name} has tasks 0..{self.num_tasks - 1}")
        return int(task)

    def transform(self, task: int, x: torch.Tensor) -> torch.Tensor:
        """Task ``task``'s input transform on a normalised batch. x: (B, 784) → (B, 784)."""
        return x

    def _task_indices(self, task: int, train: bool) -> torch.Tensor | None:
        """Indices of the images task ``task`` uses, or None for all of them."""
        return None

    def _split(self, task: int, train: bool) -> Batch:
        images, labels = self._train if train else self._test
        idx = self._task_indices(self.check_task(task), train)
        return (images, labels) if idx is None else (images[idx], labels[idx])

    def test_set(self, task: int) -> Batch:
        """Task ``task``'s whole test split: (x (N, 784), y (N,)) on the device."""
        x, y = self._split(task, train=False)
        return self.transform(task, x), y

    def train_set(self, task: int) -> Batch:
        """Task ``task``'s whole training split, transformed (materialises up to 188 MB)."""
        x, y = self._split(task, train=True)
        return self.transform(task, x), y

    def num_train(self, task: int) -> int:
        """Number of training images of task ``task``."""
        return self._split(task, train=True)[1].shape[0]

    def train_batches(self, task: int, batch_size: int = 128, num_batches: int | None = None,
                      seed: int = 0) -> "Batches":
        """Shuffled training batches of task ``task``: (x (B, 784), y (B,)) on the device, ``len`` of them.

        Walks whole epochs, each a fresh permutation from ``torch.Generator().manual_seed(seed)``, keeping an
        epoch's last partial batch (as a ``DataLoader`` with ``drop_last=False``). Stops after ``num_batches``
        batches, or after one epoch when ``num_batches`` is None. Every pass over the result replays the same
        batches.
        """
        batch_size = validation.integer("batch_size", batch_size, minimum=1)
        num_batches = validation.optional_integer("num_batches", num_batches, minimum=1)
        subset = self._task_indices(self.check_task(task), train=True)
        n = self._train[1].shape[0] if subset is None else subset.shape[0]
        total = math.ceil(n / batch_size) if num_batches is None else num_batches
        return Batches(lambda: self._batches(task, batch_size, total, seed, subset), total)

    def _batches(self, task: int, batch_size: int, total: int, seed: int,
                 subset: torch.Tensor | None) -> Iterator[Batch]:
        images, labels = self._train
        n = labels.shape[0] if subset is None else subset.shape[0]
        generator = torch.Generator().manual_seed(seed)
        done = 0
        while done < total:
            order = torch.randperm(n, generator=generator).to(self.device)
            if subset is not None:
                order = subset[order]
            for start in range(0, n, batch_size):
                if done == total:
                    return
                idx = order[start:start + batch_size]
                yield self.transform(task, images[idx]), labels[idx]
                done += 1


class Batches:
    """A finite, re-iterable sequence of training batches whose length is known (progress bars show an ETA).

    ``make()`` starts one pass; every pass replays the same batches (its seeded generators restart).
    """

    def __init__(self, make: Callable[[], Iterator[Batch]], length: int) -> None:
        self._make, self._length = make, length

    def __iter__(self) -> Iterator[Batch]:
        return self._make()

    def __len__(self) -> int:
        return self._length

    def map(self, fn: Callable[[Batch], Batch]) -> "Batches":
        """The same batches, each passed through ``fn``."""
        return Batches(lambda: (fn(batch) for batch in self._make()), self._length)


class PermutedMNIST(TaskStream):
    """Task t permutes the pixels with ``numpy.random.RandomState(seed + t).permutation(784)``.

    The permutation is applied after normalisation, as ``x[:, perm]`` (output pixel i = input pixel perm[i]).
    Task 0 is permuted too. The paper's scripts use seed 1.
    """

    name = "PermutedMNIST"

    def __init__(self, num_tasks: int, seed: int = 1, device: torch.device | str | None = None) -> None:
        super().__init__(num_tasks, device)
        self.seed = validation.integer("seed", seed, minimum=0)
        self._perms: dict[int, torch.Tensor] = {}

    def fingerprint(self) -> dict:  # noqa: D102
        return {"stream": self.name, "seed": int(self.seed)}

    def permutation(self, task: int) -> torch.Tensor:
        """The pixel permutation of task ``task``: (784,) int64 on the device."""
        task = self.check_task(task)
        if task not in self._perms:
            perm = np.random.RandomState(self.seed + task).permutation(NUM_PIXELS)
            self._perms[task] = torch.from_numpy(perm).to(self.device)
        return self._perms[task]

    def transform(self, task: int, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.permutation(task))


class RotatedMNIST(TaskStream):
    """Task t rotates every image counter-clockwise by ``degrees · t`` (36 tasks of 10° by default)."""

    name = "RotatedMNIST"

    def __init__(self, num_tasks: int = 36, degrees: float = 10.0,
                 device: torch.device | str | None = None) -> None:
        super().__init__(num_tasks, device)
        self.degrees = validation.real_number("degrees", degrees)

    def fingerprint(self) -> dict:  # noqa: D102
        return {"stream": self.name, "degrees": float(self.degrees)}

    def angle(self, task: int) -> float:
        """Rotation of task ``task`` in degrees."""
        return self.degrees * self.check_task(task)

    def transform(self, task: int, x: torch.Tensor) -> torch.Tensor:
        background = -MNIST_MEAN / MNIST_STD  # a black pixel after normalisation
        return rotate_images(x, self.angle(task), fill=background)


class SplitMNIST(TaskStream):
    """Task t holds the digits {2t, 2t+1}; labels keep their original values, so models need 10 outputs."""

    name = "SplitMNIST"

    def __init__(self, num_tasks: int = 5, device: torch.device | str | None = None) -> None:
        if validation.integer("num_tasks", num_tasks) > 5:
            raise ValueError(f"SplitMNIST has at most 5 tasks of two digits, got num_tasks={num_tasks}")
        super().__init__(num_tasks, device)
        self._indices = {
            train: [torch.nonzero((labels // 2) == t).squeeze(1) for t in range(num_tasks)]
            for train, (_, labels) in ((True, self._train), (False, self._test))
        }

    def digits(self, task: int) -> tuple[int, int]:
        """The two digits of task ``task``."""
        task = self.check_task(task)
        return 2 * task, 2 * task + 1

    def _task_indices(self, task: int, train: bool) -> torch.Tensor:
        return self._indices[train][task]


STREAMS = {"permuted": PermutedMNIST, "rotated": RotatedMNIST, "split": SplitMNIST}
