"""One harness for continual learning: learn tasks in order, measure every task after each one.

A method is any object with

* ``name: str``                                  (a label for tables and plots),
* ``learn(task: int) -> None``                   (train on task ``task``; called once per task, in order),
* ``predict(x: Tensor, task: int | None) -> Tensor``  (labels (N,) for inputs x (N, ...); ``task`` is the task
  id in scenario GG and ``None`` when the harness withholds it — a method that needs it must raise),
* optionally ``storage_bytes() -> int | None``   (what the method keeps for all tasks learned so far).

Subclass :class:`ContinualMethod` to get the optional parts. :func:`run_continual` runs a method over a
:class:`~supsup_lite.data.TaskStream` and returns a :class:`ContinualResult` whose ``accuracy[i, j]`` is the
test accuracy of task j right after task i was learned (NaN for j > i and for rows not evaluated).

Methods here: :class:`SupSupGG` (one supermask per task, the task id given), :class:`FineTuning` (one dense
network trained task after task: it forgets), :class:`UpperBound` (a dense network per task) and
:class:`FineTuningFromSnapshots` (fine-tuning's matrix read off an upper-bound run, without training twice).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import derive_seed
from ..core.masks import MaskBank, Masks, apply_masks
from ..core.models import build_model
from ..core.storage import SEED_BYTES, dense_bytes
from ..core.training import fit, predict, train_dense, train_supermasks
from ..data.mnist import Batch, TaskStream


@runtime_checkable
class Method(Protocol):
    """What :func:`run_continual` needs from a continual-learning method."""

    name: str

    def learn(self, task: int) -> None: ...  # noqa: D102

    def predict(self, x: torch.Tensor, task: int | None) -> torch.Tensor: ...  # noqa: D102


class ContinualMethod:
    """Base class for methods: holds the stream; subclasses implement ``learn`` and ``predict``."""

    name = "method"

    def __init__(self, stream: TaskStream) -> None:
        self.stream = stream

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.stream!r})"

    def learn(self, task: int) -> None:
        """Train on task ``task``."""
        raise NotImplementedError

    def predict(self, x: torch.Tensor, task: int | None) -> torch.Tensor:
        """Predicted labels (N,) for x (N, ...); ``task`` is None when the task id is withheld."""
        raise NotImplementedError

    def storage_bytes(self) -> int | None:
        """Bytes the method keeps for every task learned so far (None: not reported)."""
        return None


@dataclass
class ContinualResult:
    """What :func:`run_continual` measured.

    accuracy: (T, T), accuracy[i, j] = test accuracy of task j after learning tasks 0..i (NaN if j > i or row i
    was not evaluated). learn_seconds: (T,) wall time of each ``learn``. storage: (T,) bytes after each task
    (NaN when the method does not report it).
    """

    name: str
    accuracy: np.ndarray
    learn_seconds: np.ndarray
    storage: np.ndarray
    task_ids: bool = True

    @property
    def num_tasks(self) -> int:
        """T, the tasks learned."""
        return self.accuracy.shape[0]

    @property
    def evaluated_rows(self) -> list[int]:
        """Rows i where the tasks 0..i were measured."""
        return [i for i in range(self.num_tasks) if not np.isnan(self.accuracy[i, 0])]

    @property
    def average(self) -> np.ndarray:
        """(T,) mean accuracy over the tasks learned so far, mean_{j ≤ i} accuracy[i, j] (NaN if not evaluated)."""
        lower = np.where(np.tril(np.ones_like(self.accuracy, dtype=bool)), self.accuracy, np.nan)
        out = np.full(self.num_tasks, np.nan)
        rows = self.evaluated_rows
        out[rows] = np.nanmean(lower[rows], axis=1)
        return out

    @property
    def final(self) -> np.ndarray:
        """(T,) accuracy of every task after the last one was learned (the last row)."""
        return self.accuracy[-1].copy()

    @property
    def just_learned(self) -> np.ndarray:
        """(T,) accuracy of each task right after it was learned (the diagonal)."""
        return np.diag(self.accuracy).copy()

    @property
    def forgetting(self) -> np.ndarray:
        """(T,) for task j: best accuracy it ever had minus its final accuracy (0 = nothing forgotten)."""
        return np.nanmax(np.where(np.tril(np.ones_like(self.accuracy, dtype=bool)), self.accuracy, np.nan),
                         axis=0) - self.final


SUBSETS = ("first", "spread")


def evaluation_set(stream: TaskStream, task: int, test_size: int | None = None, subset: str = "first") -> Batch:
    """Task ``task``'s test set, or a fixed subset of ``test_size`` of its examples.

    ``subset="first"`` takes the first examples; ``"spread"`` takes examples spread evenly over the test set
    (indices round(linspace(0, N−1, test_size))). Prefer ``"spread"`` for numbers you report: torchvision's
    MNIST test set is ordered, and its first 5,000 images are markedly harder than its last 5,000 (a LeNet
    supermask: 89 % against 94 %), so the first examples underestimate the accuracy by 2–3 points.
    Returns (x (n, ...), y (n,)) with n = min(test_size, N) (all N when ``test_size`` is None).
    """
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    if test_size is not None and test_size < 1:
        raise ValueError(f"test_size must be ≥ 1 or None (the whole test set), got {test_size}")
    x, y = stream.test_set(task)
    if test_size is None or test_size >= y.shape[0]:
        return x, y
    if subset == "first":
        return x[:test_size], y[:test_size]
    idx = torch.linspace(0, y.shape[0] - 1, test_size, device=y.device).round().long()
    return x[idx], y[idx]


def accuracy_on(method: Method, x: torch.Tensor, y: torch.Tensor, task: int | None) -> float:
    """Accuracy of ``method.predict(x, task)`` against labels y (N,)."""
    predicted = method.predict(x, task)
    if predicted.shape != y.shape:
        raise ValueError(f"{method.name}.predict returned shape {tuple(predicted.shape)} for {y.shape[0]} inputs; "
                         f"expected labels ({y.shape[0]},)")
    return (predicted == y).float().mean().item()


def task_accuracy(method: Method, stream: TaskStream, task: int, task_ids: bool = True,
                  test_size: int | None = None, subset: str = "first") -> float:
    """Accuracy of ``method`` on task ``task``'s :func:`evaluation_set` (the task id withheld if not ``task_ids``)."""
    return accuracy_on(method, *evaluation_set(stream, task, test_size, subset), task if task_ids else None)


def run_continual(method: Method, stream: TaskStream, num_tasks: int | None = None, task_ids: bool = True,
                  test_size: int | None = None, rows: Iterable[int] | None = None,
                  subset: str = "first", test_sets: dict[tuple, Batch] | None = None,
                  progress: bool = True) -> ContinualResult:
    """Learn tasks 0..T−1 in order with ``method``; after task i (for i in ``rows``, default all) measure
    tasks 0..i on their test sets. Returns the accuracy matrix row by row (see :class:`ContinualResult`).

    ``task_ids=False`` withholds the task at test time (``predict(x, None)``). ``test_size`` measures each task
    on that many of its test examples, the first ones or (``subset="spread"``) ones spread evenly over the
    test set (cheaper rows; None: the whole set; see :func:`evaluation_set`). With a
    ``test_size``, each task's evaluation set is built once per run and kept (test_size inputs per task); pass
    one dict as ``test_sets`` to share them between runs on the same stream (whole test sets are kept only
    when such a dict is given).
    """
    if not isinstance(method, Method):
        raise TypeError(f"{type(method).__name__} is not a continual method: it needs name, learn(task) and "
                        f"predict(x, task)")
    num_tasks = stream.num_tasks if num_tasks is None else num_tasks
    if not 1 <= num_tasks <= stream.num_tasks:
        raise ValueError(f"num_tasks must lie in 1..{stream.num_tasks} (the stream's tasks), got {num_tasks}")
    rows = set(range(num_tasks)) if rows is None else {int(r) for r in rows}
    bad = sorted(r for r in rows if not 0 <= r < num_tasks)
    if bad:
        raise ValueError(f"rows {bad} are outside 0..{num_tasks - 1}")
    keep = test_sets is not None or test_size is not None
    test_sets = {} if test_sets is None else test_sets

    def measure(j: int) -> float:
        key = (j, test_size, subset)
        if key not in test_sets:
            if not keep:
                return accuracy_on(method, *evaluation_set(stream, j, test_size, subset), j if task_ids else None)
            test_sets[key] = evaluation_set(stream, j, test_size, subset)
        return accuracy_on(method, *test_sets[key], j if task_ids else None)

    accuracy = np.full((num_tasks, num_tasks), np.nan)
    seconds, storage = np.zeros(num_tasks), np.full(num_tasks, np.nan)
    bar = tqdm(range(num_tasks), disable=not progress, desc=method.name, unit="task")
    for i in bar:
        start = time.perf_counter()
        method.learn(i)
        seconds[i] = time.perf_counter() - start
        stored = method.storage_bytes() if hasattr(method, "storage_bytes") else None
        storage[i] = np.nan if stored is None else stored
        if i in rows:
            accuracy[i, :i + 1] = [measure(j) for j in range(i + 1)]
            bar.set_postfix(average=f"{np.mean(accuracy[i, :i + 1]):.3f}")
    return ContinualResult(method.name, accuracy, seconds, storage, task_ids)


# --- methods -------------------------------------------------------------------------------------------------

def dense_model(arch: str, num_outputs: int = 10, seed: int = 0, device: torch.device | str | None = None) -> nn.Module:
    """A trainable network with PyTorch's default init drawn under ``seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch, num_outputs)
    return model.to(device) if device is not None else model


class SupSupGG(ContinualMethod):
    """SupSup in scenario GG: task t learns its own supermask on the frozen ``model``; predict uses mask t.

    Masks never change once learned, so nothing is forgotten. Training follows ``train_supermask``, task t's
    scores and batches seeded with ``derive_seed(seed, t, "scores")`` and ``derive_seed(seed, t, "batches")``.
    With ``k > 1``, ``learn(t)`` trains the masks of tasks t..t+k−1 at once and
    keeps the later ones until they are asked for: the same masks (each depends only on its own task's
    data), ``k`` times fewer passes, but future tasks' data is read early.
    """

    name = "SupSup (GG)"

    def __init__(self, model: nn.Module, stream: TaskStream, *, num_batches: int | None = 1000, batch_size: int = 128,
                 lr: float = 1e-4, keep_frac: float | None = None, seed: int = 0, k: int = 1,
                 progress: bool = False) -> None:
        super().__init__(stream)
        if k < 1:
            raise ValueError(f"k (tasks trained at once) must be ≥ 1, got {k}")
        self.model, self.k, self.progress = model, k, progress
        self.settings = dict(lr=lr, keep_frac=keep_frac)
        self.num_batches, self.batch_size, self.seed = num_batches, batch_size, seed
        self.bank = MaskBank.for_model(model, stream=stream)
        self.rows: dict[int, int] = {}  # task → row of the bank
        self._ahead: dict[int, Masks] = {}

    def learn(self, task: int) -> None:  # noqa: D102
        task = self.stream.check_task(task)
        if task in self.rows:
            raise ValueError(f"task {task} was already learned; GG masks are learned once")
        if task not in self._ahead:
            chunk = [t for t in range(task, min(task + self.k, self.stream.num_tasks))
                     if t not in self.rows and t not in self._ahead]
            batches = [self.stream.train_batches(t, self.batch_size, self.num_batches,
                                                 derive_seed(self.seed, t, "batches")) for t in chunk]
            result = train_supermasks(self.model, batches, seeds=[derive_seed(self.seed, t, "scores") for t in chunk],
                                      progress=self.progress, **self.settings)
            self._ahead.update(zip(chunk, result.masks))
        self.rows[task] = self.bank.append(self._ahead.pop(task))

    def masked_weights(self, task: int) -> dict[str, torch.Tensor]:
        """W ⊙ M_task for every masked parameter."""
        if task not in self.rows:
            raise KeyError(f"task {task} has no mask yet; learned tasks: {sorted(self.rows)}")
        return apply_masks(self.model, self.bank.get(self.rows[task]))

    def predict(self, x: torch.Tensor, task: int | None) -> torch.Tensor:  # noqa: D102
        if task is None:
            raise ValueError("SupSup in scenario GG needs the task id; without it, infer the task (notebook 03)")
        return predict(self.model, self.masked_weights(task), x)

    def storage_bytes(self) -> int:
        """The bank (⌈P/8⌉ bytes per parameter per task) plus the base network's seed."""
        return self.bank.nbytes + SEED_BYTES


OPTIMIZERS = {  # name → (parameters, lr) → optimiser; Adam fused (one kernel per step, same update)
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr, fused=True),
}


class FineTuning(ContinualMethod):
    """One dense network trained on every task in turn with ``optimizer`` ("rmsprop", the paper's recipe, or
    "adam", van de Ven & Tolias') at ``lr``: the naive baseline that forgets.

    The one fine-tuning of the package: the regularised baselines (Online EWC, SI in ``supsup_lite.baselines``)
    are this class with a penalty wrapped around its optimiser (:meth:`optimizer`) and consolidation in the
    :meth:`begin_task` / :meth:`end_task` hooks. Task t's batches are seeded with ``derive_seed(seed, t, "batches")``.
    """

    name = "fine-tuning"

    def __init__(self, model: nn.Module, stream: TaskStream, *, num_batches: int | None = 1000, batch_size: int = 128,
                 lr: float = 1e-4, optimizer: str = "rmsprop", seed: int = 0, progress: bool = False) -> None:
        super().__init__(stream)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        self.optimizer_name = optimizer
        self.model = copy.deepcopy(model).requires_grad_(True)
        self.params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        self.num_batches, self.batch_size, self.lr, self.progress = num_batches, batch_size, lr, progress
        self.seed = seed

    def optimizer(self) -> torch.optim.Optimizer:
        """The optimiser of one task: a fresh RMSprop(lr) or Adam(lr) over every parameter."""
        return OPTIMIZERS[self.optimizer_name](list(self.params.values()), self.lr)

    def begin_task(self, task: int) -> None:
        """Called before training task ``task`` (a hook for subclasses)."""

    def end_task(self, task: int) -> None:
        """Called after training task ``task`` (a hook for subclasses: consolidation)."""

    def learn(self, task: int) -> None:  # noqa: D102
        task = self.stream.check_task(task)
        self.begin_task(task)
        self.model.train()
        batches = self.stream.train_batches(task, self.batch_size, self.num_batches,
                                            derive_seed(self.seed, task, "batches"))
        fit(self.model, self.optimizer(), batches, progress=self.progress, description=f"{self.name}, task {task}")
        self.model.eval()
        self.end_task(task)

    def predict(self, x: torch.Tensor, task: int | None) -> torch.Tensor:  # noqa: D102
        return predict(self.model, None, x)

    def storage_bytes(self) -> int:
        """One fp32 model, whatever the number of tasks."""
        return dense_bytes(self.model)


class UpperBound(ContinualMethod):
    """A dense network per task (needs the task id). As in the paper, the network for task i starts from the
    one of task i−1 (``from_previous=True``: its trunk has seen tasks 0..i); ``False`` starts each from ``model``.
    """

    name = "upper bound"

    def __init__(self, model: nn.Module, stream: TaskStream, num_batches: int | None = 1000, batch_size: int = 128,
                 lr: float = 1e-4, seed: int = 0, from_previous: bool = True, progress: bool = False) -> None:
        super().__init__(stream)
        self.initial = copy.deepcopy(model)
        self.num_batches, self.batch_size, self.lr, self.progress = num_batches, batch_size, lr, progress
        self.seed, self.from_previous = seed, from_previous
        self.models: dict[int, nn.Module] = {}
        self._last: nn.Module | None = None

    def learn(self, task: int) -> None:  # noqa: D102
        start = self._last if self.from_previous and self._last is not None else self.initial
        model = copy.deepcopy(start)
        train_dense(model, self.stream.train_batches(task, self.batch_size, self.num_batches,
                                                     derive_seed(self.seed, task, "batches")),
                    lr=self.lr, progress=self.progress, description=f"{self.name}, task {task}")
        self.models[task] = self._last = model

    def predict(self, x: torch.Tensor, task: int | None) -> torch.Tensor:  # noqa: D102
        if task is None:
            raise ValueError("the upper bound keeps one network per task and needs the task id")
        if task not in self.models:
            raise KeyError(f"task {task} has no network yet; learned tasks: {sorted(self.models)}")
        return predict(self.models[task], None, x)

    def storage_bytes(self) -> int:
        """One fp32 model per task learned."""
        return sum(dense_bytes(m) for m in self.models.values())


class FineTuningFromSnapshots(ContinualMethod):
    """Fine-tuning read off a finished :class:`UpperBound` run (``from_previous=True``), without training again.

    Both start from the same network and see the same batches, so after task i the fine-tuned network *is* the
    upper bound's network i, bit for bit (tested): ``learn(i)`` switches to that snapshot. Run the upper bound
    through the harness first; ``learn_seconds`` are then ~0.
    """

    name = "fine-tuning"

    def __init__(self, upper: UpperBound) -> None:
        if not upper.from_previous:
            raise ValueError("snapshots equal fine-tuning only when each network starts from the previous one "
                             "(UpperBound(from_previous=True))")
        super().__init__(upper.stream)
        self.upper = upper
        self.model: nn.Module | None = None

    def learn(self, task: int) -> None:  # noqa: D102
        if task not in self.upper.models:
            raise ValueError(f"the upper bound has not learned task {task} yet; run it through the harness first")
        self.model = self.upper.models[task]

    def predict(self, x: torch.Tensor, task: int | None) -> torch.Tensor:  # noqa: D102
        if self.model is None:
            raise ValueError("no task learned yet")
        return predict(self.model, None, x)

    def storage_bytes(self) -> int:
        """One fp32 model, whatever the number of tasks."""
        return dense_bytes(self.model)
