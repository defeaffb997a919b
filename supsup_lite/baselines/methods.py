"""The baselines as methods of the one continual-learning harness (``scenarios.continual.run_continual``).

Fine-tuning plus a penalty (Online EWC, SI), BatchE, PSP, separate heads (the trunk trained on the first task
only, never, or on every task: the paper's lower bound), and :class:`SupSupGNu`, SupSup without task ids on the
same harness, inferring each test batch's task.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Iterable, Literal

import torch
from torch import nn

from ..config import derive_seed
from ..core.inference import Objective, entropy
from ..core.masks import MaskBank
from ..core.models import maskable_parameters, masked_forward
from ..core.storage import SEED_BYTES, dense_bytes
from ..core.training import evaluate, fit, predict
from ..data.mnist import TaskStream
from ..data.unshared import UnsharedLabels
from ..scenarios.continual import ContinualMethod, FineTuning, SupSupGG
from ..scenarios.protocols import infer_batches, predict_batches
from .context import (
    RankOne,
    batche_forward,
    batche_weights,
    parameter_bytes,
    psp_contexts,
    psp_forward,
    psp_weights,
    rank_one_factors,
)
from .regularisers import (
    OnlineEWC,
    Params,
    PenalisedOptimizer,
    SynapticIntelligence,
    fisher_diagonal,
)


# --- the baselines as methods of the continual-learning harness ----------------------------------------------
def initialised_model(model: nn.Module, init: Callable[[torch.Tensor], torch.Tensor], seed: int) -> nn.Module:
    """A trainable copy of ``model`` whose Linear weights are re-drawn by ``init`` (e.g. ``nn.init.xavier_normal_``)
    under ``seed`` (the global RNG is left untouched)."""
    copied = copy.deepcopy(model).requires_grad_(True)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for weight in maskable_parameters(copied).values():
            init(weight)
    return copied


def _need_task(method: str, task: int | None, learned: Iterable[int]) -> int:
    if task is None:
        raise ValueError(f"{method} keeps per-task parameters and needs the task id (scenario GG)")
    if task not in learned:
        raise KeyError(f"{method} has not learned task {task}; learned tasks: {sorted(learned)}")
    return task


class _Trained(ContinualMethod):
    """Shared plumbing: a stream, training settings, and one ``fit`` call per task, its batches seeded with
    ``derive_seed(seed, task, "batches")``."""

    def __init__(self, stream: TaskStream, num_batches: int | None, batch_size: int, seed: int,
                 progress: bool) -> None:
        super().__init__(stream)
        self.num_batches, self.batch_size, self.seed, self.progress = num_batches, batch_size, seed, progress

    def _fit(self, task: int, forward: Callable[[torch.Tensor], torch.Tensor],
             optimizer: torch.optim.Optimizer | PenalisedOptimizer) -> None:
        batches = self.stream.train_batches(task, self.batch_size, self.num_batches,
                                            derive_seed(self.seed, task, "batches"))
        fit(forward, optimizer, batches, progress=self.progress, description=f"{self.name}, task {task}")


class PenalisedFineTuning(FineTuning):
    """Fine-tuning plus a quadratic penalty (EWC, SI): ``continual.FineTuning`` whose optimiser adds ∇ penalty
    before each step (:class:`PenalisedOptimizer`). ``predict`` ignores the task id (one head); run it on
    :class:`UnsharedLabels` for scenario GNu. Subclasses define :meth:`penalty` and :meth:`end_task`.
    """

    after_step: Callable[[Params, Params, Params], None] | None = None

    def penalty(self, params: Params) -> torch.Tensor:
        """The quadratic penalty added to the task loss."""
        raise NotImplementedError

    def end_task(self, task: int) -> None:
        """Called after training task ``task`` (consolidation)."""
        raise NotImplementedError

    def optimizer(self) -> PenalisedOptimizer:  # noqa: D102
        return PenalisedOptimizer(super().optimizer(), self.params, self.penalty, self.after_step)


class OnlineEWCMethod(PenalisedFineTuning):
    """Online EWC: after each task, the Fisher diagonal on ``fisher_samples`` of its training images (the
    model's predicted labels) joins the running F̃ ← γ F̃ + F; later tasks pay (λ/2) Σ F̃ (θ − θ*)²."""

    name = "Online EWC"

    def __init__(self, model: nn.Module, stream: TaskStream, *, lam: float, gamma: float = 1.0,
                 fisher_samples: int = 1000, **training) -> None:
        super().__init__(model, stream, **training)
        if fisher_samples < 1:
            raise ValueError(f"fisher_samples must be ≥ 1, got {fisher_samples}")
        self.ewc, self.fisher_samples = OnlineEWC(lam, gamma), fisher_samples

    def penalty(self, params: Params) -> torch.Tensor:  # noqa: D102
        return self.ewc.penalty(params)

    def end_task(self, task: int) -> None:  # noqa: D102
        x, _ = next(iter(self.stream.train_batches(task, self.fisher_samples, 1,
                                                   derive_seed(self.seed, task, "penalty"))))
        self.ewc.consolidate(self.params, fisher_diagonal(self.model, x))

    def storage_bytes(self) -> int:
        """The network plus F̃ and θ* (three fp32 copies, whatever the number of tasks)."""
        return 3 * dense_bytes(self.model)


class SIMethod(PenalisedFineTuning):
    """Synaptic Intelligence: the path integral of the task loss during each task sets the importance Ω;
    later tasks pay c Σ Ω (θ − θ*)²."""

    name = "SI"

    def __init__(self, model: nn.Module, stream: TaskStream, *, c: float, xi: float = 0.1, **training) -> None:
        super().__init__(model, stream, **training)
        self.si = SynapticIntelligence(c, xi)
        self.after_step = self.si.accumulate

    def begin_task(self, task: int) -> None:  # noqa: D102
        self.si.begin_task(self.params)

    def penalty(self, params: Params) -> torch.Tensor:  # noqa: D102
        return self.si.penalty(params)

    def end_task(self, task: int) -> None:  # noqa: D102
        self.si.consolidate(self.params)

    def storage_bytes(self) -> int:
        """The network plus Ω and θ* (three fp32 copies; ω and θ before a step are scratch during training)."""
        return 3 * dense_bytes(self.model)


class BatchE(_Trained):
    """BatchE in scenario GG: task 0 trains W (Kaiming normal init) with its factors s₀, t₀ at ``first_lr``;
    every later task trains only its own ±1-initialised s, t with W frozen, at ``lr`` (Adam, as the authors)."""

    name = "BatchE (GG)"

    def __init__(self, model: nn.Module, stream: TaskStream, num_batches: int | None = 1000, batch_size: int = 128,
                 first_lr: float = 1e-4, lr: float = 1e-2, seed: int = 0, progress: bool = False) -> None:
        super().__init__(stream, num_batches, batch_size, seed, progress)
        self.model = initialised_model(model, nn.init.kaiming_normal_, seed)
        self.first_lr, self.lr = first_lr, lr
        self.factors: dict[int, RankOne] = {}

    def learn(self, task: int) -> None:  # noqa: D102
        task = self.stream.check_task(task)
        factors = rank_one_factors(self.model, torch.Generator().manual_seed(derive_seed(self.seed, task, "factors")))
        trained = [v for pair in factors.values() for v in pair]
        first = not self.factors
        self.model.requires_grad_(first)
        if first:
            trained += list(maskable_parameters(self.model).values())
        optimizer = torch.optim.Adam(trained, lr=self.first_lr if first else self.lr)
        self._fit(task, lambda x: batche_forward(self.model, factors, x), optimizer)
        self.model.requires_grad_(False)
        self.factors[task] = {n: (s.detach(), t.detach()) for n, (s, t) in factors.items()}

    def predict(self, x: torch.Tensor, task: int | None) -> torch.Tensor:  # noqa: D102
        task = _need_task(self.name, task, self.factors)
        return predict(self.model, batche_weights(self.model, self.factors[task]), x)

    def storage_bytes(self) -> int:
        """W once plus Σ_layers (out + in) fp32 factors per task."""
        return dense_bytes(self.model) + sum(parameter_bytes(pair) for f in self.factors.values()
                                             for pair in f.values())


class PSP(_Trained):
    """PSP in scenario GG: shared W (Xavier normal init) trained on every task with RMSprop(lr), each task
    seen through its own fixed random orthogonal contexts (seeded by the task, so only a seed is stored)."""

    name = "PSP (GG)"

    def __init__(self, model: nn.Module, stream: TaskStream, num_batches: int | None = 1000, batch_size: int = 128,
                 lr: float = 1e-4, seed: int = 0, progress: bool = False) -> None:
        super().__init__(stream, num_batches, batch_size, seed, progress)
        self.model, self.lr = initialised_model(model, nn.init.xavier_normal_, seed), lr
        self.learned: list[int] = []

    def contexts(self, task: int) -> Params:
        """Task ``task``'s contexts, regenerated from its seed."""
        return psp_contexts(self.model, torch.Generator().manual_seed(derive_seed(self.seed, task, "contexts")))

    def learn(self, task: int) -> None:  # noqa: D102
        task = self.stream.check_task(task)
        contexts, weights = self.contexts(task), list(maskable_parameters(self.model).values())
        self._fit(task, lambda x: psp_forward(self.model, contexts, x), torch.optim.RMSprop(weights, lr=self.lr))
        self.learned.append(task)

    def predict(self, x: torch.Tensor, task: int | None) -> torch.Tensor:  # noqa: D102
        task = _need_task(self.name, task, self.learned)
        return predict(self.model, psp_weights(self.model, self.contexts(task)), x)

    def storage_bytes(self) -> int:
        """W once plus one seed per task (the contexts are regenerated; storing them would take 4·Σ in² each)."""
        return dense_bytes(self.model) + SEED_BYTES * len(self.learned)


TrunkTraining = Literal["first", "never", "always"]


class SeparateHeads(_Trained):
    """A shared trunk and one output layer (head) per task, used with the task id (scenario GG).

    ``train_trunk``: "first" trains the trunk with head 0 on task 0 at ``trunk_lr`` and only heads after, at
    ``head_lr`` (the paper's Separate Heads); "never" trains heads only on the initial trunk (Separate Heads
    Rand W); "always" trains trunk and head on every task at ``trunk_lr`` (the paper's lower bound: old heads
    read a trunk that has moved on). Adam, as the authors. A new head starts from ``model``'s head.
    """

    def __init__(self, model: nn.Module, stream: TaskStream, train_trunk: TrunkTraining = "first",
                 num_batches: int | None = 1000, batch_size: int = 128, trunk_lr: float = 1e-3,
                 head_lr: float = 1e-2, seed: int = 0, progress: bool = False) -> None:
        super().__init__(stream, num_batches, batch_size, seed, progress)
        if train_trunk not in ("first", "never", "always"):
            raise ValueError(f"train_trunk must be 'first', 'never' or 'always', got {train_trunk!r}")
        self.train_trunk, self.trunk_lr, self.head_lr = train_trunk, trunk_lr, head_lr
        self.name = {"first": "separate heads", "never": "separate heads, random trunk",
                     "always": "lower bound"}[train_trunk]
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.head_name = list(maskable_parameters(self.model))[-1]
        self.heads: dict[int, torch.Tensor] = {}

    def _forward(self, head: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: masked_forward(self.model, {self.head_name: head}, x)

    def learn(self, task: int) -> None:  # noqa: D102
        task = self.stream.check_task(task)
        head = maskable_parameters(self.model)[self.head_name].detach().clone().requires_grad_(True)
        trunk = [p for n, p in self.model.named_parameters() if n != self.head_name]
        train_trunk = self.train_trunk == "always" or (self.train_trunk == "first" and not self.heads)
        for p in trunk:
            p.requires_grad_(train_trunk)
        trained = [head] + (trunk if train_trunk else [])
        optimizer = torch.optim.Adam(trained, lr=self.trunk_lr if train_trunk else self.head_lr)
        self._fit(task, self._forward(head), optimizer)
        self.model.requires_grad_(False)
        self.heads[task] = head.detach()

    def predict(self, x: torch.Tensor, task: int | None) -> torch.Tensor:  # noqa: D102
        task = _need_task(self.name, task, self.heads)
        return predict(self.model, {self.head_name: self.heads[task]}, x)

    def storage_bytes(self) -> int:
        """The trunk once plus one head per task."""
        trunk = [p for n, p in self.model.named_parameters() if n != self.head_name]
        return dense_bytes(trunk) + parameter_bytes(self.heads.values())


# --- the upper bound: a dense network per task, trained to convergence ----------------------------------------
class ConvergedUpperBound(ContinualMethod):
    """One dense network per task, each trained on its own until its held-out accuracy stops improving: the GG
    upper bound (it bounds only if it beats every method on every task; check that where it is used).

    Task t gets a fresh copy of ``model`` with PyTorch's default Linear init drawn under
    ``derive_seed(seed, t, "weights")``. ``holdout`` of its training images (chosen under
    ``derive_seed(seed, t, "evaluation")``) are set aside; ``epoch_size`` of the others (None: all of them) are
    its training set. Each epoch walks that set once in a fresh order (``derive_seed(seed, t, "batches")``
    starts the order generator) in batches of ``batch_size`` with Adam(``lr``), then measures the held-out
    accuracy. Training stops when that accuracy has not improved for ``patience`` epochs, or after
    ``max_epochs``; the network keeps the weights of its best epoch. ``stopped[t]`` = (best epoch, epochs run).
    """

    name = "upper bound"

    def __init__(self, model: nn.Module, stream: TaskStream, *, lr: float = 1e-3, batch_size: int = 128,
                 holdout: int = 5000, epoch_size: int | None = None, patience: int = 2, max_epochs: int = 20,
                 seed: int = 0, progress: bool = False) -> None:
        super().__init__(stream)
        for what, value in (("holdout", holdout), ("patience", patience), ("max_epochs", max_epochs),
                            ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{what} must be ≥ 1, got {value}")
        if epoch_size is not None and epoch_size < 1:
            raise ValueError(f"epoch_size must be ≥ 1 or None (every image not held out), got {epoch_size}")
        self.initial = copy.deepcopy(model).requires_grad_(False)
        self.lr, self.batch_size, self.holdout, self.epoch_size = lr, batch_size, holdout, epoch_size
        self.patience, self.max_epochs, self.seed, self.progress = patience, max_epochs, seed, progress
        self.models: dict[int, nn.Module] = {}
        self.stopped: dict[int, tuple[int, int]] = {}

    def learn(self, task: int) -> None:  # noqa: D102
        task = self.stream.check_task(task)
        x, y = self.stream.train_set(task)
        if self.holdout >= y.shape[0]:
            raise ValueError(f"holdout={self.holdout} leaves no training images: task {task} has {y.shape[0]}")
        order = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(
            derive_seed(self.seed, task, "evaluation"))).to(y.device)
        held, rest = order[:self.holdout], order[self.holdout:]
        rest = rest if self.epoch_size is None else rest[:self.epoch_size]
        x_held, y_held, x_train, y_train = x[held], y[held], x[rest], y[rest]
        del x, y
        model = initialised_model(self.initial, _default_linear_init, derive_seed(self.seed, task, "weights"))
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        shuffle = torch.Generator().manual_seed(derive_seed(self.seed, task, "batches"))
        best, best_epoch, best_state, epoch = -1.0, 0, None, 0
        while epoch < self.max_epochs and epoch - best_epoch < self.patience:
            epoch += 1
            perm = torch.randperm(y_train.shape[0], generator=shuffle).to(y_train.device)
            batches = [(x_train[i], y_train[i]) for i in perm.split(self.batch_size)]
            fit(model, optimizer, batches, progress=self.progress, description=f"{self.name}, task {task}")
            accuracy = evaluate(model, None, x_held, y_held)
            if accuracy > best:
                best, best_epoch, best_state = accuracy, epoch, copy.deepcopy(model.state_dict())
        model.load_state_dict(best_state)
        self.models[task] = model.requires_grad_(False).eval()
        self.stopped[task] = (best_epoch, epoch)

    def predict(self, x: torch.Tensor, task: int | None) -> torch.Tensor:  # noqa: D102
        task = _need_task(self.name, task, self.models)
        return predict(self.models[task], None, x)

    def storage_bytes(self) -> int:
        """One fp32 model per task learned."""
        return sum(dense_bytes(m) for m in self.models.values())


def _default_linear_init(weight: torch.Tensor) -> torch.Tensor:
    """PyTorch's default ``nn.Linear`` weight init, kaiming_uniform_(a=√5)."""
    return nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


# --- SupSup without task ids, on the same harness ---------------------------------------------------------------
TaskSearch = Literal["one_shot", "binary"]


class SupSupGNu(SupSupGG):
    """SupSup without the task id at test: masks learned as in GG (on the base stream's labels 0..C−1).

    ``predict(x, None)`` cuts x into batches of ``test_batch`` images (in order); each batch's task t̂ is
    inferred from its first ``infer_from`` images by ``search`` ("one_shot": argmin_t ∂objective/∂α_t at
    α = 1/T, Eq. 4; "binary": halve the candidates ⌈log₂ T⌉ times) over the tasks learned so far, and the
    batch is classified with mask t̂ over the first C outputs, ŷ. On an :class:`UnsharedLabels` stream
    (scenario GNu, van de Ven & Tolias' class-incremental learning) the prediction is C·t̂ + ŷ, so a wrongly
    inferred batch scores 0 — the paper's GNu protocol (one image per batch of 128 for PermutedMNIST; the whole
    batch with binary search for RotatedMNIST). On a plain stream (labels shared: scenario GNs, their
    domain-incremental learning) it is ŷ, right whenever mask t̂ gets the digit right. ``masks`` (optional):
    masks already learned on ``model`` (row t = task t, e.g. ``other.bank`` of a run in the other scenario);
    ``learn(t)`` then takes row t instead of training. Extra keyword arguments go to ``SupSupGG``.
    """

    name = "SupSup (GNu)"

    def __init__(self, model: nn.Module, stream: TaskStream, search: TaskSearch = "one_shot",
                 objective: Objective = entropy, infer_from: int = 1, test_batch: int = 128,
                 masks: MaskBank | None = None, **settings) -> None:
        if not isinstance(stream, TaskStream):
            raise TypeError(f"stream must be a TaskStream (UnsharedLabels(stream) for GNu, the stream itself for "
                            f"GNs); got {type(stream).__name__}")
        if search not in ("one_shot", "binary"):
            raise ValueError(f"search must be 'one_shot' or 'binary', got {search!r}")
        if not 1 <= infer_from <= test_batch:
            raise ValueError(f"infer_from must lie in 1..test_batch={test_batch}, got {infer_from}")
        self.unshared = isinstance(stream, UnsharedLabels)
        base = stream.base if self.unshared else stream
        super().__init__(model, base, **settings)  # masks learn the base labels 0..C−1
        self.name = "SupSup (GNu)" if self.unshared else "SupSup (GNs)"
        self.classes = base.num_classes
        self.search, self.objective = search, objective
        self.infer_from, self.test_batch = infer_from, test_batch
        if masks is not None:
            masks.check_compatible(model)
            if len(masks) > base.num_tasks:
                raise ValueError(f"masks holds {len(masks)} tasks' masks but the stream has {base.num_tasks} tasks")
            self._ahead = {task: masks.get(task) for task in range(len(masks))}

    def infer_batches(self, x: torch.Tensor) -> list[int]:
        """The inferred task of every batch of ``test_batch`` consecutive images of x (N, ...), each from its first
        ``infer_from`` images, by ``search`` over the tasks learned so far (``protocols.infer_batches``)."""
        rows = infer_batches(self.model, self.bank, x, batch_size=self.test_batch, infer_from=self.infer_from,
                             search=self.search, objective=self.objective)
        task_of_row = {row: task for task, row in self.rows.items()}
        return [task_of_row[row] for row in rows.tolist()]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task: int | None) -> torch.Tensor:  # noqa: D102
        if task is not None:
            raise ValueError("SupSup (GNu) infers the task itself; call predict(x, None)")
        tasks = torch.tensor(self.infer_batches(x), dtype=torch.long)
        labels = predict_batches(self.model, self.bank, x, torch.tensor([self.rows[t] for t in tasks.tolist()]),
                                 batch_size=self.test_batch, classes=self.classes)
        if not self.unshared:
            return labels
        # C·t̂ + ŷ equals the label C·t + y only when t̂ = t: the harness's accuracy is protocols.gnu_score
        return self.classes * tasks.to(x.device).repeat_interleave(self.test_batch)[: x.shape[0]] + labels
