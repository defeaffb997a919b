"""The α explorer's state for the browser test, built identically in the notebook's kernel and in pytest.

LeNet 300-100 (s=10) with 4 PermutedMNIST masks, each trained for 30 batches of 128 on the CPU with one thread:
deterministic, so both processes hold bit-identical models and banks and the test can compute what the
browser must show with the kernel-side functions.
"""
from __future__ import annotations

import torch

from supsup_lite.config import derive_seed
from supsup_lite.core.masks import MaskBank
from supsup_lite.core.models import frozen_random_model
from supsup_lite.core.training import train_supermask
from supsup_lite.data import PermutedMNIST

TASKS = 4
IMAGE_TASK, IMAGE_INDEX = 2, 3  # the test image the explorer starts on


def build() -> tuple[torch.nn.Module, MaskBank, PermutedMNIST]:
    """(frozen model, bank of ``TASKS`` trained masks, the task stream), all on the CPU."""
    torch.set_num_threads(1)
    stream = PermutedMNIST(num_tasks=TASKS, device="cpu")
    model = frozen_random_model("lenet_300_100", 10, seed=0, device="cpu")
    bank = MaskBank.for_model(model)
    for task in range(TASKS):
        result = train_supermask(model, stream.train_batches(task, 128, 30, derive_seed(0, task, "batches")),
                                 seed=derive_seed(0, task, "scores"), progress=False)
        bank.append(result.masks[0])
    return model, bank, stream
