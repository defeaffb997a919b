"""Running the baselines over several seeds and summarising them honestly.

* :func:`permuted_tasks`: a PermutedMNIST stream whose permutations belong to one run seed.
* :func:`run_seeds`: one method through the harness (``scenarios.continual.run_continual``) once per seed; each
  seed changes the tasks (permutations), the initialisation and the batch order, all through
  ``config.derive_seed``.
* :func:`t_interval`: mean ± the half-width of a Student-t confidence interval over seeds.
* :func:`single_image_gnu`: task inference and accuracy on single test images, with the task withheld and the
  labels not shared (the paper's Fig. 3 and Fig. 5-right protocol), the same images for every method.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import derive_seed
from ..data.mnist import PermutedMNIST, TaskStream
from ..scenarios.continual import ContinualResult, Method, run_continual
from ..scenarios.protocols import ProtocolResult


def permuted_tasks(num_tasks: int, run_seed: int, *, device: torch.device | str | None = None) -> PermutedMNIST:
    """PermutedMNIST for run ``run_seed``: task t permutes the pixels with ``RandomState(p + t)``,
    p = ``derive_seed(run_seed, 0, "tasks")`` mod 2³¹, so different runs learn different tasks."""
    return PermutedMNIST(num_tasks, seed=derive_seed(run_seed, 0, "tasks") % 2 ** 31, device=device)


def first_tasks(stream: TaskStream, num_tasks: int) -> TaskStream:
    """The same stream cut to its first ``num_tasks`` tasks (the same tasks, sharing the data: nothing is copied),
    e.g. a 10-task class-incremental run on the first tasks of a 50-task sequence."""
    if not 1 <= num_tasks <= stream.num_tasks:
        raise ValueError(f"num_tasks must lie in 1..{stream.num_tasks} (the stream's tasks), got {num_tasks}")
    view = copy.copy(stream)
    view.num_tasks = num_tasks
    return view


# --- confidence intervals over seeds ---------------------------------------------------------------------------
def student_t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom (probability in (0.5, 1)).

    Bisection on F(x) = ½ + ∫₀ˣ f(u) du, f(u) = Γ((ν+1)/2) / (√(νπ) Γ(ν/2)) · (1 + u²/ν)^−(ν+1)/2, the integral by
    the trapezoid rule on 20,001 points (error below 10⁻⁶ in x for the quantiles used here).
    """
    if not 0.5 < probability < 1:
        raise ValueError(f"probability must lie in (0.5, 1), got {probability}")
    if df < 1:
        raise ValueError(f"df must be ≥ 1, got {df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        u = np.linspace(0.0, x, 20_001)
        density = np.exp(log_norm - (df + 1) / 2 * np.log1p(u ** 2 / df))
        return 0.5 + float(np.sum((density[1:] + density[:-1]) / 2) * (u[1] - u[0]))

    low, high = 0.0, 1.0
    while cdf(high) < probability:
        low, high = high, 2 * high
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < probability else (low, middle)
    return (low + high) / 2


def t_interval(values: Iterable[float], *, confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the two-sided Student-t ``confidence`` interval for the mean of ``values`` (n ≥ 2):
    half-width = t_{(1+confidence)/2, n−1} · s / √n, s the sample standard deviation (ddof = 1)."""
    values = np.asarray(list(values), dtype=float)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"an interval over seeds needs at least 2 values, got {values.size}; run more seeds")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    quantile = student_t_quantile((1 + confidence) / 2, values.size - 1)
    return float(values.mean()), float(quantile * values.std(ddof=1) / math.sqrt(values.size))


# --- one method over several seeds -----------------------------------------------------------------------------
@dataclass
class SeedRuns:
    """One method's :class:`ContinualResult` per seed, and whatever ``keep`` took from each trained method."""

    name: str
    seeds: list[int]
    results: list[ContinualResult]
    kept: list[Any] = field(default_factory=list)

    @property
    def task_ids(self) -> bool:
        """Whether the method was told the task at test time."""
        return self.results[0].task_ids

    def average(self, row: int = -1) -> np.ndarray:
        """(S,) each seed's mean accuracy over the tasks learned after task ``row`` (default: the last)."""
        return np.array([result.average[row] for result in self.results])

    def final(self) -> np.ndarray:
        """(S, T) each seed's accuracy of every task after the last one was learned."""
        return np.stack([result.final for result in self.results])

    def interval(self, row: int = -1, *, confidence: float = 0.95) -> tuple[float, float]:
        """(mean, half-width) over seeds of :meth:`average` (``t_interval``)."""
        return t_interval(self.average(row), confidence=confidence)

    def storage_per_task(self) -> float:
        """Bytes added per task, (storage after the last task − after the first) / (T − 1), mean over seeds."""
        return float(np.mean([(r.storage[-1] - r.storage[0]) / max(r.num_tasks - 1, 1) for r in self.results]))


def run_seeds(build: Callable[[TaskStream, int], Method], stream_of: Callable[[int], TaskStream],
              seeds: Sequence[int], *, task_ids: bool, test_size: int | None = None,
              rows: Iterable[int] | None = None, keep: Callable[[Method], Any] | None = None,
              progress: bool = True) -> SeedRuns:
    """``run_continual(build(stream_of(s), s), stream_of(s))`` for every seed s, on ``test_size`` test images
    per task spread over its test set (the same images for every method on that stream).

    ``build(stream, seed)`` makes the method; it should pass ``seed`` on (initialisation, batch order) and
    ``stream_of(seed)`` should change the tasks (:func:`permuted_tasks`). ``keep(method)`` (optional) is stored per
    seed, e.g. the trained factors for a later analysis. ``progress``: a bar over the seeds.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must name at least one seed, got none")
    results, kept, name = [], [], None
    rows = None if rows is None else list(rows)
    for seed in tqdm(seeds, desc="seeds", disable=not progress, leave=False):
        stream = stream_of(seed)
        method = build(stream, seed)
        name = method.name
        results.append(run_continual(method, stream, task_ids=task_ids, test_size=test_size, rows=rows,
                                     subset="spread", progress=False))
        if keep is not None:
            kept.append(keep(method))
    return SeedRuns(name, seeds, results, kept)


# --- single-image task inference with the task withheld ----------------------------------------------------------
def single_image_gnu(stream: TaskStream, *, infer: Callable[[torch.Tensor], torch.Tensor],
                     classify: Callable[[torch.Tensor, int], torch.Tensor], tasks: Sequence[int],
                     samples_per_task: int, seed: int = 0) -> ProtocolResult:
    """Scenario GNu on single images: for each task t, ``samples_per_task`` random test images (chosen under
    ``derive_seed(seed, t, "evaluation")``, so every method sees the same ones); ``infer(x)`` (N, in) → (N,)
    gives each image's task t̂ on its own, ``classify(x, t̂)`` → (N,) its digit with task t̂'s parameters. An
    image counts as right only when t̂ = t and the digit is right. ``per_task``: accuracy; ``inferred``: t̂."""
    if samples_per_task < 1:
        raise ValueError(f"samples_per_task must be ≥ 1, got {samples_per_task}")
    per_task, inferred = [], []
    for t in tasks:
        x, y = stream.test_set(t)
        if samples_per_task > y.shape[0]:
            raise ValueError(f"samples_per_task={samples_per_task} exceeds task {t}'s {y.shape[0]} test images")
        generator = torch.Generator().manual_seed(derive_seed(seed, t, "evaluation"))
        pick = torch.randperm(y.shape[0], generator=generator)[:samples_per_task].to(y.device)
        x, y = x[pick], y[pick]
        guessed = infer(x).to(y.device)
        right = torch.zeros_like(y, dtype=torch.bool)
        found = guessed == t
        if found.any():
            right[found] = classify(x[found], t) == y[found]
        per_task.append(right.float().mean().item())
        inferred.append(guessed.tolist())
    return ProtocolResult(list(tasks), per_task, inferred)
