"""Shared fixtures: small frozen networks and a few really trained PermutedMNIST masks (session-cached)."""
from __future__ import annotations

import pytest
import torch

from supsup_lite.data import PermutedMNIST
from supsup_lite.core.masks import MaskBank
from supsup_lite.core.models import frozen_random_model
from supsup_lite.core.training import train_supermask


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every available device: the core tests run on the CPU everywhere and on CUDA where a GPU exists."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def permuted() -> PermutedMNIST:
    return PermutedMNIST(num_tasks=5, device="cpu")


@pytest.fixture
def permuted_on(permuted: PermutedMNIST, device: torch.device) -> PermutedMNIST:
    """The session's PermutedMNIST stream, on ``device`` (the CPU one itself on the CPU)."""
    return permuted if device.type == "cpu" else PermutedMNIST(num_tasks=5, device=device)


@pytest.fixture(scope="session")
def trained_bank(permuted: PermutedMNIST) -> tuple[torch.nn.Module, MaskBank]:
    """LeNet 300-100 (s=10) with 4 PermutedMNIST masks, each trained for 150 batches of 128."""
    model = frozen_random_model("lenet_300_100", 10, seed=0, device="cpu")
    bank = MaskBank.for_model(model, stream=permuted)
    for task in range(4):
        result = train_supermask(model, permuted.train_batches(task, 128, 150, task), seed=task, progress=False)
        bank.append(result.masks[0])
    return model, bank
