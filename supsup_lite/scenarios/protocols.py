"""Evaluation protocols of task-agnostic SupSup (paper §3.3, §4.2): GG, GNs, GNu, and task-inference accuracy.

* **GG** — the task is given: classify task t's test set with mask t.
* **GNs** — infer the task once from a few test images, then classify the whole test set with the inferred mask.
* **GNu** (the paper's protocol) — cut each task's (shuffled) test set into batches of 128; infer each batch's task
  from its first image (or from the whole batch); classify the batch with the inferred mask. A wrongly inferred
  batch scores 0 and the denominator is the test-set size.
* **task-inference accuracy** — how often the inferred task is the true one, from one image or a group.

Inference of many images runs batched for fully connected models (:func:`supsup_lite.inference.alpha_gradient_each`,
:func:`~supsup_lite.inference.binary_search_each`), and group by group otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import derive_seed
from ..core.inference import (
    Objective,
    binary_search,
    binary_search_each,
    check_group_size,
    check_inputs,
    entropy,
    first_tasks,
    is_fully_connected,
    one_shot,
    one_shot_each,
)
from ..core.masks import MaskBank, apply_masks
from ..core.models import masked_forward
from ..core.training import evaluate, predict
from ..data.mnist import TaskStream

Search = Literal["one_shot", "binary"]
SEARCHES = ("one_shot", "binary")


@dataclass
class ProtocolResult:
    """Per-task accuracies of one protocol, the tasks they belong to, and what inference chose.

    ``inferred[i]`` holds the inferred task of each inference made for ``tasks[i]`` (one per batch for GNu, one
    for GNs, one per sample for task inference); ``task_accuracy`` is the fraction of those that are right.
    """

    tasks: list[int]
    per_task: list[float]
    inferred: list[list[int]]
    given: list[float] | None = None  # GNu only: each task's accuracy with its own mask (GG), from the same pass
    scored: list[list[float]] | None = None  # GNu and NNs: images counted right per test batch (after the penalty)

    @property
    def accuracy(self) -> float:
        """Mean of the per-task accuracies (the paper's average over tasks)."""
        return sum(self.per_task) / len(self.per_task)

    @property
    def inference_accuracy(self) -> float:
        """Fraction of inferences that chose the true task."""
        right = sum(sum(int(i == t) for i in inferred) for t, inferred in zip(self.tasks, self.inferred))
        return right / sum(len(inferred) for inferred in self.inferred)


def check_search(search: str) -> None:
    """Raise a clear error unless ``search`` is a known task-inference search ("one_shot" or "binary")."""
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")


def infer_tasks(model: nn.Module, bank: MaskBank, x: torch.Tensor, *, group_size: int = 1,
                search: Search = "one_shot", objective: Objective = entropy,
                num_tasks: int | None = None) -> torch.Tensor:
    """The inferred task of every group of ``group_size`` consecutive images: (N, ...) → (N/g,) int64 on the bank's
    device.

    One-Shot on a fully connected model is batched (exact); otherwise each group is inferred on its own.
    """
    check_search(search)
    check_inputs(model, bank, x)
    group_size = check_group_size(group_size, x.shape[0])
    if is_fully_connected(model):
        if search == "binary":
            return binary_search_each(model, bank, x, objective=objective, num_tasks=num_tasks,
                                      group_size=group_size)
        return one_shot_each(model, bank, x, objective=objective, num_tasks=num_tasks, group_size=group_size)
    infer = one_shot if search == "one_shot" else binary_search
    return torch.tensor([infer(model, bank, x[i:i + group_size], objective=objective, num_tasks=num_tasks)
                         for i in range(0, x.shape[0], group_size)], dtype=torch.long, device=bank.device)


def test_order(num_images: int, task: int, seed: int) -> torch.Tensor:
    """The order in which a shuffled loader gives task ``task``'s ``num_images`` test images: a permutation (CPU
    int64) seeded by ``derive_seed(seed, task, "evaluation")``."""
    generator = torch.Generator().manual_seed(derive_seed(seed, task, "evaluation"))
    return torch.randperm(num_images, generator=generator)


def shuffled_test_set(stream: TaskStream, task: int, seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Task ``task``'s test set in the order of :func:`test_order` (None: file order)."""
    x, y = stream.test_set(task)
    if seed is None:
        return x, y
    order = test_order(y.shape[0], task, seed).to(y.device)
    return x[order], y[order]


def task_weights(model: nn.Module, bank: MaskBank, task: int) -> dict[str, torch.Tensor]:
    """Effective weights W ⊙ M_task of one stored task (the bank must belong to ``model``)."""
    bank.check_compatible(model)
    return apply_masks(model, bank.get(task))


def eval_tasks(bank: MaskBank, tasks: Iterable[int] | None, num_tasks: int | None) -> list[int]:
    """The tasks to evaluate (default: all of the first ``num_tasks``), checked against the bank."""
    known = first_tasks(bank, num_tasks).numel()
    tasks = list(range(known)) if tasks is None else [int(t) for t in tasks]
    bad = [t for t in tasks if not 0 <= t < known]
    if bad or not tasks:
        raise ValueError(f"tasks must be a non-empty list within the {known} tasks searched; bad: {bad}")
    return tasks


def gg_accuracy(model: nn.Module, bank: MaskBank, stream: TaskStream, *,
                tasks: Iterable[int] | None = None, classes: int | None = None) -> list[float]:
    """Scenario GG: accuracy of each task's own mask on its test set (task identity given); ``classes``: predict
    by the argmax over the first logits only (:func:`~supsup_lite.core.training.predict`)."""
    return [evaluate(model, task_weights(model, bank, t), *stream.test_set(t), classes=classes)
            for t in eval_tasks(bank, tasks, None)]


def gns_accuracy(model: nn.Module, bank: MaskBank, stream: TaskStream, *, tasks: Iterable[int] | None = None,
                 infer_images: int = 1, search: Search = "one_shot", objective: Objective = entropy,
                 num_tasks: int | None = None, seed: int | None = 0) -> ProtocolResult:
    """Scenario GNs: infer each task once from its first ``infer_images`` (shuffled) test images, then classify
    the whole test set with the inferred mask (a wrong inference is scored with the wrong mask's accuracy)."""
    tasks = eval_tasks(bank, tasks, num_tasks)
    tests = [shuffled_test_set(stream, t, seed) for t in tasks]
    x = torch.cat([xt[:infer_images] for xt, _ in tests])
    inferred = infer_tasks(model, bank, x, group_size=infer_images, search=search, objective=objective,
                           num_tasks=num_tasks).tolist()
    per_task = [evaluate(model, task_weights(model, bank, i), xt, yt) for i, (xt, yt) in zip(inferred, tests)]
    return ProtocolResult(tasks, per_task, [[i] for i in inferred])


def correct_per_batch(right: torch.Tensor, *, batch_size: int) -> torch.Tensor:
    """Images classified right in each batch of ``batch_size`` consecutive images (the last may be shorter).

    right: (N,) bool or 0/1 → (⌈N/batch_size⌉,) float32 on right's device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    right = right.float()
    return torch.nn.functional.pad(right, (0, -right.shape[0] % batch_size)).view(-1, batch_size).sum(1)


def gnu_score(inferred: torch.Tensor, correct: torch.Tensor, *, sizes: torch.Tensor | Sequence[int],
              true_tasks: torch.Tensor | Sequence[int] | None) -> torch.Tensor:
    """Per-task accuracy when each test batch is classified with the mask inferred for it: the one GNu scorer.

    inferred: (T, nb) int, the task (mask) inferred for batch b of evaluated task i; correct: (T, nb), images of
    that batch classified right (0 in padding batches of a shorter test set); sizes: (T,) the test-set sizes
    (the denominators); true_tasks: (T,) the task each row belongs to, or None. Returns (T,) float64 on the CPU:

        acc_i = Σ_b correct[i, b] · 1[inferred[i, b] = true_tasks[i]] / sizes[i]

    With ``true_tasks`` (the paper's GNu, §4.2: "if task is not inferred correctly then accuracy is 0 for the
    batch") ``correct`` counts the task's own mask. With ``true_tasks=None`` every batch counts and ``correct``
    counts the inferred mask (Scenario NNs, shared labels: no mask "belongs" to a task).
    """
    if inferred.dim() != 2 or inferred.shape != correct.shape:
        raise ValueError(f"inferred and correct must both be (T, batches); got {tuple(inferred.shape)} and "
                         f"{tuple(correct.shape)}")
    sizes = torch.as_tensor(sizes, dtype=torch.float64).cpu()
    if sizes.shape != (inferred.shape[0],) or bool((sizes <= 0).any()):
        raise ValueError(f"sizes must hold one positive test-set size per row ({inferred.shape[0]}), got {sizes}")
    counted = correct.detach().double().cpu()
    if true_tasks is not None:
        true_tasks = torch.as_tensor(true_tasks, dtype=torch.long).cpu()
        if true_tasks.shape != sizes.shape:
            raise ValueError(f"true_tasks must hold one task per row ({inferred.shape[0]}), "
                             f"got shape {tuple(true_tasks.shape)}")
        counted = counted * (inferred.cpu() == true_tasks[:, None])
    return counted.sum(1) / sizes


def padded(rows: Sequence[torch.Tensor], *, fill: float = 0) -> torch.Tensor:
    """Stack 1-d tensors of unequal lengths into (len(rows), longest), on the CPU, padding with ``fill``."""
    return torch.nn.utils.rnn.pad_sequence([r.cpu() for r in rows], batch_first=True, padding_value=fill)


def infer_batches(model: nn.Module, bank: MaskBank, x: torch.Tensor, *, batch_size: int,
                  infer_from: int | None = 1, search: Search = "one_shot", objective: Objective = entropy,
                  num_tasks: int | None = None) -> torch.Tensor:
    """The inferred task (bank row) of each batch of ``batch_size`` consecutive images of x (N, ...): (⌈N/B⌉,) CPU
    int64, each from the batch's first ``infer_from`` images (None: the whole batch; a last batch shorter than
    ``infer_from``: all of it). Groups of equal size go through :func:`infer_tasks` together."""
    if batch_size < 1 or (infer_from is not None and not 1 <= infer_from <= batch_size):
        raise ValueError(f"need batch_size ≥ 1 and infer_from in 1..batch_size (or None: the whole batch); "
                         f"got batch_size={batch_size}, infer_from={infer_from}")
    take = batch_size if infer_from is None else infer_from
    groups = [x[start:start + take] for start in range(0, x.shape[0], batch_size)]
    full = [g for g in groups if g.shape[0] == take]
    parts = [infer_tasks(model, bank, torch.cat(full), group_size=take, search=search,
                                     objective=objective, num_tasks=num_tasks).cpu()] if full else []
    if len(full) < len(groups):  # only the last batch can be shorter
        last = groups[-1]
        parts.append(infer_tasks(model, bank, last, group_size=last.shape[0], search=search, objective=objective,
                                 num_tasks=num_tasks).cpu())
    return torch.cat(parts)


@torch.no_grad()
def predict_batches(model: nn.Module, bank: MaskBank, x: torch.Tensor, inferred: torch.Tensor, *,
                    batch_size: int, classes: int | None = None) -> torch.Tensor:
    """Labels (N,) of x (N, ...) when batch b (images b·B .. (b+1)·B − 1) is classified with bank row
    ``inferred[b]`` (⌈N/B⌉,): argmax over the first ``classes`` outputs (None: all). One pass per distinct row."""
    if inferred.shape != (-(-x.shape[0] // batch_size),):
        raise ValueError(f"inferred must hold one row per batch of {batch_size} of the {x.shape[0]} images, "
                         f"i.e. shape ({-(-x.shape[0] // batch_size)},); got {tuple(inferred.shape)}")
    row_of_image = inferred.to(x.device).repeat_interleave(batch_size)[: x.shape[0]]
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for row in inferred.unique().tolist():
        images = row_of_image == row
        logits = masked_forward(model, task_weights(model, bank, row), x[images])
        labels[images] = logits[:, :classes].argmax(1)
    return labels


def gnu_accuracy(model: nn.Module, bank: MaskBank, stream: TaskStream, *, tasks: Iterable[int] | None = None,
                 batch_size: int = 128, infer_from: Literal["first", "batch"] = "first",
                 search: Search = "one_shot", objective: Objective = entropy, num_tasks: int | None = None,
                 seed: int | None = 0, progress: bool = False) -> ProtocolResult:
    """The paper's GNu protocol: per task, test batches of ``batch_size`` (shuffled by :func:`shuffled_test_set`); the
    task of a batch is inferred from its first image (``infer_from="first"``, the paper) or from the whole batch;
    the batch is classified with the inferred mask, and a wrongly inferred batch scores 0 (:func:`gnu_score`).
    Accuracy per task = correct / test-set size. ``num_tasks``: search only the first k masks of the bank (a
    checkpoint). ``given`` holds the GG accuracies (each task's own mask) measured in the same pass."""
    if infer_from not in ("first", "batch"):
        raise ValueError(f"infer_from must be 'first' or 'batch', got {infer_from!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    tasks = eval_tasks(bank, tasks, num_tasks)
    firsts, correct, chosen, sizes = [], [], [], []
    for t in tqdm(tasks, disable=not progress, desc="GNu", leave=False):
        x, y = shuffled_test_set(stream, t, seed)
        # a rightly inferred batch is classified with mask t itself, so one pass with mask t scores every batch
        correct.append(correct_per_batch(predict(model, task_weights(model, bank, t), x) == y, batch_size=batch_size))
        sizes.append(y.shape[0])
        if infer_from == "first":
            firsts.append(x[::batch_size])
        else:
            chosen.append(infer_batches(model, bank, x, batch_size=batch_size, infer_from=None, search=search,
                                        objective=objective, num_tasks=num_tasks))
    if infer_from == "first":  # all first images at once: one pass over the bank
        chosen = infer_tasks(model, bank, torch.cat(firsts), search=search, objective=objective,
                             num_tasks=num_tasks).cpu()
        chosen = list(chosen.split([f.shape[0] for f in firsts]))
    correct_table = padded(correct)
    chosen_table = padded(chosen, fill=-1)
    per_task = gnu_score(chosen_table, correct_table, sizes=sizes, true_tasks=tasks)
    given = correct_table.double().sum(1) / torch.tensor(sizes, dtype=torch.float64)
    scored = correct_table * (chosen_table == torch.tensor(tasks)[:, None])
    return ProtocolResult(tasks, per_task.tolist(), [c.tolist() for c in chosen], given.tolist(),
                          [row[:c.numel()].tolist() for row, c in zip(scored, chosen)])


def task_inference_accuracy(model: nn.Module, bank: MaskBank, stream: TaskStream, *,
                            tasks: Iterable[int] | None = None, samples_per_task: int = 20, group_size: int = 1,
                            search: Search = "one_shot", objective: Objective = entropy,
                            num_tasks: int | None = None, seed: int = 0) -> ProtocolResult:
    """How often inference finds the true task: for each task, ``samples_per_task`` groups of ``group_size``
    distinct random test images (seeded by ``derive_seed(seed, task, "evaluation")``), each inferred on its own.
    ``per_task`` holds the fraction right per task."""
    tasks = eval_tasks(bank, tasks, num_tasks)
    inferred = []
    for t in tasks:
        x, _ = stream.test_set(t)
        needed = samples_per_task * group_size
        if needed > x.shape[0]:
            raise ValueError(f"{samples_per_task} groups of {group_size} images need {needed} test images; "
                             f"task {t} has {x.shape[0]}")
        generator = torch.Generator().manual_seed(derive_seed(seed, t, "evaluation"))
        pick = torch.randperm(x.shape[0], generator=generator)[:needed]
        inferred.append(infer_tasks(model, bank, x[pick.to(x.device)], group_size=group_size, search=search,
                                    objective=objective, num_tasks=num_tasks).tolist())
    per_task = [sum(int(i == t) for i in inf) / len(inf) for t, inf in zip(tasks, inferred)]
    return ProtocolResult(tasks, per_task, inferred)
