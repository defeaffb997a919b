"""SplitCIFAR100: 20 tasks of 5 classes from a seeded permutation of the 100 classes (the authors' RandSplitCIFAR100).

CIFAR-100 is read once through torchvision's own loader (``torchvision.datasets.CIFAR100(root, download=True)``,
MD5-checked) into a uint8 tensor (N, 3, 32, 32) on the device. Task t holds the classes
``RandomState(seed).permutation(100)[5t : 5t+5]`` with labels remapped to their position 0–4 in that list.
Batches are normalised with the CIFAR-10 mean/std the authors used, and training batches get the authors'
augmentation (RandomCrop(32, padding=4) then RandomHorizontalFlip) on the whole batch on the device, with
random offsets drawn from a seeded ``torch.Generator``: no per-sample PIL work.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..config import data_root, resolve_device
from .mnist import Batch, Batches, DataNotFoundError, TaskStream, not_found_message

NUM_CIFAR100_CLASSES = 100
IMAGE_SHAPE = (3, 32, 32)
# The authors normalise SplitCIFAR100 with CIFAR-10's statistics (RAIVNLab/supsup, `data/partitioncifar.py`).
CIFAR_MEAN = (0.491, 0.482, 0.447)
CIFAR_STD = (0.247, 0.243, 0.262)
CROP_PADDING = 4


def _cifar100_class():
    from torchvision.datasets import CIFAR100

    return CIFAR100


def cifar100_available(root: str | Path | None = None) -> bool:
    """True when CIFAR-100 can be loaded without internet: the extracted files (or the archive) pass MD5.

    Looks under ``root`` (default ``SUPSUP_DATA``) exactly where torchvision's ``CIFAR100`` looks.
    """
    from torchvision.datasets.utils import check_integrity

    cls = _cifar100_class()
    root = Path(root) if root is not None else data_root()
    files = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
    extracted = all(check_integrity(str(root / cls.base_folder / name), md5) for name, md5 in files)
    return extracted or check_integrity(str(root / cls.filename), cls.tgz_md5)


def cifar100_skip_message(root: str | Path | None = None) -> str:
    """One line for a notebook that skips its SplitCIFAR100 section, saying how to enable it."""
    where = f"{root}" if root is not None else "SUPSUP_DATA"
    return (f"Skipping SplitCIFAR100: CIFAR-100 is not under {where}. To run this section, set SUPSUP_DATA to a "
            f"folder holding torchvision's cifar-100-python/ (or run once with internet access to download it).")


@lru_cache(maxsize=2)
def _read_cifar100(root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """(images uint8 (N, 3, 32, 32), fine labels int64 (N,), class names) on the CPU, read once per split."""
    try:
        dataset = _cifar100_class()(root, train=train, download=True)
    except Exception as err:  # offline: URLError/OSError from the download, RuntimeError on a bad checksum
        raise DataNotFoundError(not_found_message("CIFAR-100", root, err)) from err
    images = torch.from_numpy(np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2)))  # HWC → CHW
    return images, torch.as_tensor(dataset.targets, dtype=torch.int64), tuple(dataset.classes)


def load_cifar100(train: bool, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A CIFAR-100 split as (images uint8 (N, 3, 32, 32), fine labels int64 (N,)) on ``device``."""
    images, labels, _ = _read_cifar100(str(data_root()), train)
    dev = resolve_device(device)
    return images.to(dev), labels.to(dev)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W) → float32 (x/255 − mean) / std per channel (ToTensor + Normalize)."""
    mean = torch.tensor(CIFAR_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def crop_flip_params(batch: int, generator: torch.Generator,
                     padding: int = CROP_PADDING) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random crop offsets and flips for a batch, drawn on the CPU from ``generator``.

    Returns (top (B,), left (B,)) int64 in [0, 2·padding] and flip (B,) bool with P(flip) = ½.
    """
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    return top, left, flip


def crop_flip(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
              fill: torch.Tensor, padding: int = CROP_PADDING) -> torch.Tensor:
    """Pad by ``padding`` with the per-channel ``fill`` (C,), crop H×W at (top, left), then mirror where ``flip``.

    x: (B, C, H, W) → (B, C, H, W). Sample b equals torchvision's ``hflip?(crop(pad(x_b), top_b, left_b, H, W))``.
    One gather: output column j reads padded column left + j, or left + W − 1 − j when flipped.
    """
    b, c, h, w = x.shape
    if not top.shape == left.shape == flip.shape == (b,):
        raise ValueError(f"need one (top, left, flip) per image: batch {b}, "
                         f"got {top.shape}, {left.shape}, {flip.shape}")
    dev = x.device
    padded = fill.to(x).view(1, c, 1, 1).repeat(b, 1, h + 2 * padding, w + 2 * padding)
    padded[:, :, padding:padding + h, padding:padding + w] = x
    top, left, flip = top.to(dev), left.to(dev), flip.to(dev)
    rows = top[:, None] + torch.arange(h, device=dev)                                   # (B, H)
    cols = left[:, None] + torch.where(flip[:, None], torch.arange(w - 1, -1, -1, device=dev),
                                       torch.arange(w, device=dev))                      # (B, W)
    batch_idx = torch.arange(b, device=dev).view(b, 1, 1, 1)
    channel_idx = torch.arange(c, device=dev).view(1, c, 1, 1)
    return padded[batch_idx, channel_idx, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


class SplitCIFAR100(TaskStream):
    """Task t: the 5 classes ``RandomState(seed).permutation(100)[5t : 5t+5]``, labels 0–4 in that order.

    Same interface as the MNIST streams (``train_batches``, ``test_set``, ``train_set``, ``check_task``);
    inputs are normalised images (B, 3, 32, 32) and ``train_batches`` augments by default. The authors' GG
    scripts run seeds 0–4, one split per seed.
    """

    name = "SplitCIFAR100"
    num_classes = 5

    def __init__(self, num_tasks: int = 20, seed: int = 0, device: torch.device | str | None = None) -> None:
        max_tasks = NUM_CIFAR100_CLASSES // self.num_classes
        if not 1 <= num_tasks <= max_tasks:
            raise ValueError(f"SplitCIFAR100 has 1..{max_tasks} tasks of {self.num_classes} classes, got {num_tasks}")
        self.seed = seed
        self.class_order = np.random.RandomState(seed).permutation(NUM_CIFAR100_CLASSES)
        self._class_names = _read_cifar100(str(data_root()), False)[2]
        self._indices: dict[bool, list[torch.Tensor]] = {}
        super().__init__(num_tasks, device)  # reads both splits through _load
        self._fill = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8, device=self.device)).view(3)

    def fingerprint(self) -> dict:  # noqa: D102
        return {"stream": self.name, "seed": int(self.seed)}

    def _load(self, train: bool) -> Batch:
        """CIFAR-100 split as (uint8 images, within-task labels 0–4); records each task's image indices."""
        (images, labels), self._indices[train] = self._split_into_tasks(*load_cifar100(train, self.device))
        return images, labels

    def __repr__(self) -> str:
        return f"SplitCIFAR100(num_tasks={self.num_tasks}, seed={self.seed}, device={self.device})"

    def _split_into_tasks(self, images: torch.Tensor, fine: torch.Tensor) -> tuple[Batch, list[torch.Tensor]]:
        """(images, within-task labels 0–4) and, per task, the indices of its images in dataset order."""
        order = torch.from_numpy(self.class_order)
        slot = torch.empty(NUM_CIFAR100_CLASSES, dtype=torch.int64)
        slot[order] = torch.arange(NUM_CIFAR100_CLASSES)           # slot[c] = position of class c in the order
        slot = slot.to(fine.device)[fine]
        task_of, label = slot // self.num_classes, slot % self.num_classes
        indices = [torch.nonzero(task_of == t).squeeze(1) for t in range(self.num_tasks)]
        return (images, label), indices

    def classes(self, task: int) -> list[int]:
        """The 5 CIFAR-100 fine-class indices of task ``task``; label i of the task is ``classes(task)[i]``."""
        task = self.check_task(task)
        return self.class_order[self.num_classes * task: self.num_classes * (task + 1)].tolist()

    def class_names(self, task: int) -> list[str]:
        """The names of task ``task``'s classes, in label order."""
        return [self._class_names[c] for c in self.classes(task)]

    def _task_indices(self, task: int, train: bool) -> torch.Tensor:
        return self._indices[train][task]

    def transform(self, task: int, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 3, 32, 32) → normalised float32 (B, 3, 32, 32); the same for every task."""
        return normalize(x)

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """RandomCrop(32, padding=4) + RandomHorizontalFlip on a normalised batch (padding = a black pixel)."""
        return crop_flip(x, *crop_flip_params(x.shape[0], generator), fill=self._fill)

    def train_batches(self, task: int, batch_size: int = 128, num_batches: int | None = None,
                      seed: int = 0, augment: bool = True) -> Batches:
        """Shuffled, augmented training batches (x (B, 3, 32, 32), y (B,)) of task ``task``.

        Order as :meth:`TaskStream.train_batches` (whole epochs, last partial batch kept); the augmentation
        draws from a second ``torch.Generator`` seeded with ``seed``.
        """
        plain = super().train_batches(task, batch_size, num_batches, seed)
        if not augment:
            return plain

        def augmented() -> Iterator[Batch]:
            generator = torch.Generator().manual_seed(seed)
            return ((self.augment(x, generator), y) for x, y in plain)

        return Batches(augmented, len(plain))
