"""Scenario GG on SplitCIFAR100: one top-k supermask and one set of BatchNorm statistics per task.

:func:`run_gg_batchnorm` is the loop for any frozen network with BatchNorm and any task stream (notebook 02 runs
it on a small conv net over MNIST tasks); :func:`run_split_cifar100` is the paper's setting.

The paper's recipe (§4.1; the authors' ``experiments/GG/splitcifar100`` scripts, ``rn18-supsup``): a frozen
signed-constant GEM ResNet-18; for each task, scores s ~ U(±1/√fan_in), mask M = top-k(|s|) per layer with k the
Erdős–Rényi density of the budget, straight-through gradient, Adam(lr 1e-3, weight decay 1e-4) with a cosine
schedule stepped per epoch, 250 epochs of batch 128 with crop+flip augmentation. The task is given at test time
(GG): task t is evaluated with its own mask *and its own BatchNorm statistics*.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import derive_seed
from ..core.masks import MaskBank, Masks, apply_masks, final_masks, init_scores, topk_supermask
from ..core.models import maskable_parameters, masked_forward
from ..core.training import TrainHistory, TrainResult, evaluate, fit
from ..data.cifar import SplitCIFAR100
from ..data.mnist import Batch, TaskStream
from .resnet import (
    GEM_WIDTH,
    Buffers,
    batchnorm_stats,
    er_densities,
    frozen_gem_resnet18,
    kept_weights,
)


def topk_masks(scores: Masks, densities: dict[str, float]) -> Masks:
    """Per-layer top-k supermasks M_l = top-k(|s_l|, d_l). Float {0, 1}, shaped like s.

    As in the authors' ``GetSubnet.apply(scores.abs(), k)`` the straight-through estimator acts on |s|, so
    autograd gives ∂L/∂s = sign(s) · ∂L/∂M: a step grows |s| of every weight the loss wants kept, whatever
    the sign of s. (Passing s itself would push negative scores the wrong way.)
    """
    return {name: topk_supermask(s, densities[name]) for name, s in scores.items()}


def task_weights(model: nn.Module, masks: Masks, bn_stats: Buffers) -> dict[str, torch.Tensor]:
    """What a task's forward swaps into ``model``: masked weights W ⊙ M plus that task's BatchNorm buffers."""
    return {**apply_masks(model, masks), **bn_stats}


def train_gg_task(model: nn.Module, batches: Iterable[Batch], *, bn_stats: Buffers, densities: dict[str, float],
                  num_batches: int, batches_per_epoch: int, seed: int, lr: float = 1e-3, weight_decay: float = 1e-4,
                  progress: bool = True) -> TrainResult:
    """Learn one task's top-k supermask from ``num_batches`` of ``batches``; ``bn_stats`` (the task's BatchNorm
    buffers) are updated in place.

    ``model`` must be frozen. Scores are seeded with ``seed``. Adam(lr, weight_decay) with a cosine schedule
    over ⌈num_batches / batches_per_epoch⌉ epochs, stepped after every ``batches_per_epoch`` batches (the
    authors step it per epoch). Each step runs ``model`` in training mode (BatchNorm normalises with batch
    statistics and folds them into ``bn_stats`` with momentum 0.1). Returns bool masks shaped like W and the
    per-batch history. Passing the same ``bn_stats`` to every task reproduces the authors' shared-BN bug.
    """
    params = maskable_parameters(model)
    if any(p.requires_grad for p in params.values()):
        raise ValueError("the base network must be frozen (requires_grad=False); build it with frozen_gem_resnet18")
    if num_batches < 1 or batches_per_epoch < 1:
        raise ValueError(f"num_batches and batches_per_epoch must be ≥ 1, got {num_batches} and {batches_per_epoch}")
    scores = init_scores(model, torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(scores.values(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=math.ceil(num_batches / batches_per_epoch))

    def forward(x: torch.Tensor) -> torch.Tensor:
        return masked_forward(model, task_weights(model, topk_masks(scores, densities), bn_stats), x)

    def end_of_epoch(i: int) -> None:
        if (i + 1) % batches_per_epoch == 0:
            schedule.step()

    start = time.perf_counter()
    model.train()
    try:
        history = fit(forward, optimizer, itertools.islice(batches, num_batches), progress=progress,
                      description="GG task", after_step=end_of_epoch)
    finally:
        model.eval()
    return TrainResult([final_masks(scores, keep_frac=densities)], [history], time.perf_counter() - start)


def evaluate_gg_task(model: nn.Module, stream: TaskStream, task: int, masks: Masks, bn_stats: Buffers,
                     batch_size: int = 1000) -> float:
    """Test accuracy of task ``task`` with its mask and BatchNorm statistics (model in eval mode)."""
    if model.training:
        raise ValueError("evaluate in eval mode: a training-mode forward would overwrite the BatchNorm statistics")
    x, y = stream.test_set(task)
    return evaluate(model, task_weights(model, masks, bn_stats), x, y, batch_size)


@dataclass
class GGResult:
    """Outcome of a SplitCIFAR100 GG run.

    accuracy[t, j]: test accuracy of task j with its mask and BN statistics after tasks 0..t were learned
    (NaN for j > t). The diagonal is the accuracy right after training (the authors' ``results.csv``), the last
    row the accuracy at the end (their ``adapt_results.csv``).
    """

    accuracy: np.ndarray
    bank: MaskBank
    bn_stats: list[Buffers]
    densities: dict[str, float]
    shared_batchnorm: bool
    histories: list[TrainHistory] = field(repr=False)
    kept_weights: int = 0
    total_weights: int = 0

    @property
    def accuracy_after_training(self) -> np.ndarray:
        """(T,) accuracy of each task measured right after it was trained."""
        return np.diag(self.accuracy).copy()

    @property
    def final_accuracy(self) -> np.ndarray:
        """(T,) accuracy of each task after all tasks were trained."""
        return self.accuracy[-1].copy()

    @property
    def bn_bytes_per_task(self) -> int:
        """Float32 bytes of one task's BatchNorm statistics (running mean and variance)."""
        return sum(4 * t.numel() for n, t in self.bn_stats[0].items() if not n.endswith("num_batches_tracked"))


def run_split_cifar100(num_tasks: int = 20, epochs: int = 250, budget: float = 16, batch_size: int = 128,
                       lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0, width: int = GEM_WIDTH,
                       shared_batchnorm: bool = False, stream: SplitCIFAR100 | None = None,
                       device: torch.device | str | None = None, progress: bool = True) -> GGResult:
    """Scenario GG on SplitCIFAR100 with the paper's GEM ResNet-18 (rn18-supsup: 250 epochs, Adam 1e-3).

    ``seed`` picks the class split (when ``stream`` is None), the base network's signs, and (through
    ``derive_seed(seed, task, purpose)``) each task's score init and batch order, as one seed does in the
    authors' runs (they report seeds 0–4). ``budget`` is the ER budget (paper: 1–32).
    ``shared_batchnorm=True`` gives every task the same BatchNorm buffers, the bug of the authors' first
    releases, to show what it does. After each task every learned task is re-evaluated (``GGResult.accuracy``).
    """
    stream = stream if stream is not None else SplitCIFAR100(num_tasks, seed=seed, device=device)
    if num_tasks > stream.num_tasks:
        raise ValueError(f"num_tasks={num_tasks} but the stream has only {stream.num_tasks} tasks")
    model = frozen_gem_resnet18(stream.num_classes, width, seed=seed, device=stream.device)
    return run_gg_batchnorm(model, stream, num_tasks=num_tasks, densities=er_densities(model, budget), epochs=epochs,
                            batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                            shared_batchnorm=shared_batchnorm, progress=progress)


def run_gg_batchnorm(model: nn.Module, stream: TaskStream, *, num_tasks: int, densities: dict[str, float],
                     epochs: int | None = None, num_batches: int | None = None, batch_size: int = 128,
                     lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0, shared_batchnorm: bool = False,
                     progress: bool = True) -> GGResult:
    """Scenario GG with top-k masks (``densities`` per layer) and BatchNorm statistics on any frozen ``model``
    with non-affine BatchNorm layers: tasks 0..num_tasks−1 of ``stream`` in order, each trained by
    :func:`train_gg_task` for ``epochs`` epochs or ``num_batches`` batches (give exactly one), scores and batches
    seeded with ``derive_seed(seed, task, "scores" / "batches")``. Each task gets fresh BatchNorm buffers, or,
    with ``shared_batchnorm=True``, all tasks share one set (the authors' first releases). After each task every
    learned task is re-evaluated with its mask and its buffers (``GGResult.accuracy``)."""
    if (epochs is None) == (num_batches is None):
        raise ValueError(f"give exactly one of epochs and num_batches per task, got epochs={epochs}, "
                         f"num_batches={num_batches}")
    if not 1 <= num_tasks <= stream.num_tasks:
        raise ValueError(f"num_tasks must lie in 1..{stream.num_tasks} (the stream's tasks), got {num_tasks}")
    bank = MaskBank.for_model(model, stream=stream)
    shared = batchnorm_stats(model)
    bn_stats, histories = [], []
    accuracy = np.full((num_tasks, num_tasks), np.nan)
    for task in tqdm(range(num_tasks), disable=not progress, desc=f"{stream.name} tasks"):
        stats = shared if shared_batchnorm else batchnorm_stats(model)
        per_epoch = math.ceil(stream.num_train(task) / batch_size)
        total = epochs * per_epoch if num_batches is None else num_batches
        batches = stream.train_batches(task, batch_size, total, derive_seed(seed, task, "batches"))
        result = train_gg_task(model, batches, bn_stats=stats, densities=densities, num_batches=total,
                               batches_per_epoch=per_epoch, seed=derive_seed(seed, task, "scores"), lr=lr,
                               weight_decay=weight_decay, progress=progress)
        bank.append(result.masks[0])
        bn_stats.append(stats)
        histories += result.history
        for j in range(task + 1):
            accuracy[task, j] = evaluate_gg_task(model, stream, j, bank.get(j), bn_stats[j])
    total_weights = sum(p.numel() for p in maskable_parameters(model).values())
    return GGResult(accuracy, bank, bn_stats, densities, shared_batchnorm, histories,
                    kept_weights(model, densities), total_weights)
