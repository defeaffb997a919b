"""The paper's baselines, each reduced to its core rule (PAPER.md §1, §2.10).

* **Online EWC** (Schwarz et al. 2018): a quadratic penalty (λ/2) Σ_i F̃_i (θ_i − θ*_i)² around the weights θ*
  after the last task, with the running Fisher diagonal F̃ ← γ F̃ + F_task.
* **SI** (Zenke et al. 2017): the same quadratic form c Σ_i Ω_i (θ_i − θ*_i)², with an importance Ω from the
  path integral ω_i = Σ_steps −g_i Δθ_i of the task loss, normalised as Ω_i += ω_i / (Δ_i² + ξ).
* **BatchE** (Wen et al. 2020): shared W, rank-one per-task factors: each layer computes y = s ⊙ (W (x ⊙ t)).
* **PSP** (Cheung et al. 2019): shared W, fixed random orthogonal per-task contexts: y = W (C x).
* **Separate heads**: a shared trunk and one output layer per task; the trunk is trained on the first task only
  (``train_trunk="first"``), never (``"never"``, random trunk) or on every task (``"always"``: the paper's lower
  bound, "shared trunk trained continually, separate heads").

The regularisers plug into ``training.fit`` through :class:`PenalisedOptimizer`, a thin wrapper that adds the
penalty's gradient before each step (``fit`` itself stays a plain cross-entropy loop). Each baseline is a
method of the one continual-learning harness, ``supsup_lite.continual.run_continual``; naive fine-tuning and
the upper bound live there. :class:`UnsharedLabels` turns a task stream into the scenario without shared labels
(GNu, "class-incremental"): task t's digit y becomes class C·t + y, so a method that gets the digit right but
the task wrong scores zero; :class:`SupSupGNu` is SupSup on that scenario, inferring each test batch's task.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .continual import ContinualMethod, SupSupGG
from .data import Batch, TaskStream
from .inference import Objective, entropy
from .models import maskable_parameters, masked_forward
from .multitask import task_seed
from .protocols import infer_tasks
from .storage import SEED_BYTES, dense_bytes
from .training import fit, predict

Params = dict[str, torch.Tensor]
Linear = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]
FisherLabels = Literal["predicted", "empirical"]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of ``model`` that require grad, by qualified name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def snapshot(params: Params) -> Params:
    """Detached copies of ``params`` (the anchor θ* of a quadratic penalty, or θ before a step)."""
    return {name: p.detach().clone() for name, p in params.items()}


def _check_same_names(params: Params, reference: Params, what: str) -> None:
    if set(params) != set(reference):
        raise KeyError(f"{what} covers parameters {sorted(reference)}, but got {sorted(params)}")


# --- the quadratic penalty shared by EWC and SI ------------------------------------------------------------
def quadratic_penalty(params: Params, anchor: Params, importance: Params) -> torch.Tensor:
    """Σ_i Ω_i (θ_i − θ*_i)² over every parameter tensor: a scalar, differentiable in ``params``."""
    _check_same_names(params, anchor, "the anchor")
    _check_same_names(params, importance, "the importance")
    return sum(((params[n] - anchor[n]) ** 2 * importance[n]).sum() for n in params)


# --- Online EWC ----------------------------------------------------------------------------------------------
def fisher_diagonal(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                    labels: FisherLabels = "predicted", outputs: int | None = None,
                    chunk: int = 64) -> Params:
    """Diagonal Fisher F_i = 1/N Σ_n (∂ log p(ỹ_n | x_n; θ) / ∂θ_i)² over ``model``'s trainable parameters.

    x: (N, ...); ỹ_n is the model's own prediction argmax_c p(c | x_n) (``labels="predicted"``, as in van de Ven
    & Tolias, whose Table 5 the paper quotes) or the true label y_n (``"empirical"``, needs ``y`` (N,)).
    ``outputs``: only the first ``outputs`` logits form the softmax (the classes seen so far in a
    class-incremental model). Per-example gradients come from ``torch.func.vmap`` in chunks of ``chunk``.
    """
    if labels not in ("predicted", "empirical"):
        raise ValueError(f"labels must be 'predicted' or 'empirical', got {labels!r}")
    if labels == "empirical" and (y is None or y.shape[0] != x.shape[0]):
        raise ValueError(f"empirical Fisher needs one label per input: {x.shape[0]} inputs, "
                         f"{None if y is None else y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("the Fisher needs at least one input")
    params = snapshot(trainable_parameters(model))
    if not params:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")

    def log_likelihood(p: Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (xi.unsqueeze(0),))[:, :outputs]
        return -F.cross_entropy(logits, yi.unsqueeze(0))

    per_example = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    for start in range(0, x.shape[0], chunk):
        xs = x[start:start + chunk]
        if labels == "predicted":
            with torch.no_grad():
                ys = functional_call(model, params, (xs,))[:, :outputs].argmax(1)
        else:
            ys = y[start:start + chunk]
        for name, g in per_example(params, xs, ys).items():
            fisher[name] += (g ** 2).sum(0)
    return {name: f / x.shape[0] for name, f in fisher.items()}


class OnlineEWC:
    """Online EWC's penalty (λ/2) Σ_i F̃_i (θ_i − θ*_i)² with F̃ ← γ F̃ + F after each task, θ* ← θ.

    ``gamma=1`` sums the Fisher of every task; ``gamma<1`` lets old tasks fade. Before the first
    :meth:`consolidate` the penalty is zero.
    """

    def __init__(self, lam: float, gamma: float = 1.0) -> None:
        if lam < 0:
            raise ValueError(f"the EWC strength λ must be ≥ 0, got {lam}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"the online decay γ must lie in [0, 1], got {gamma}")
        self.lam, self.gamma = float(lam), float(gamma)
        self.fisher: Params | None = None
        self.anchor: Params | None = None

    def consolidate(self, params: Params, fisher: Params) -> None:
        """End of a task: F̃ ← γ F̃ + ``fisher`` and θ* ← ``params``."""
        _check_same_names(fisher, params, "the parameters")
        if self.fisher is None:
            self.fisher = {n: f.detach().clone() for n, f in fisher.items()}
        else:
            _check_same_names(fisher, self.fisher, "the running Fisher")
            self.fisher = {n: self.gamma * self.fisher[n] + fisher[n].detach() for n in fisher}
        self.anchor = snapshot(params)

    def penalty(self, params: Params) -> torch.Tensor:
        """(λ/2) Σ_i F̃_i (θ_i − θ*_i)²; a zero scalar before the first consolidation."""
        if self.fisher is None:
            return torch.zeros((), device=next(iter(params.values())).device)
        return 0.5 * self.lam * quadratic_penalty(params, self.anchor, self.fisher)


# --- Synaptic Intelligence -----------------------------------------------------------------------------------
class SynapticIntelligence:
    """SI's importance from the path integral of the task loss, and its penalty c Σ_i Ω_i (θ_i − θ*_i)².

    During a task, after every optimiser step: ω_i += −g_i (θ_i^after − θ_i^before), g the gradient of the
    task loss (not of the penalty) at θ^before. At the end: Ω_i += ω_i / (Δ_i² + ξ), Δ = θ_end − θ_start,
    then θ* ← θ_end and ω ← 0.
    """

    def __init__(self, c: float, xi: float = 0.1) -> None:
        if c < 0:
            raise ValueError(f"the SI strength c must be ≥ 0, got {c}")
        if xi <= 0:
            raise ValueError(f"the damping ξ must be > 0 (it bounds Ω when a weight does not move), got {xi}")
        self.c, self.xi = float(c), float(xi)
        self.omega: Params | None = None       # Ω, the consolidated importance
        self.anchor: Params | None = None      # θ*, also the start θ of the current task
        self.path: Params = {}                 # ω, the running path integral of the current task

    def begin_task(self, params: Params) -> None:
        """Start a task at ``params``: ω ← 0 (θ* is the start point; on the first task it is set here)."""
        if self.anchor is None:
            self.anchor = snapshot(params)
        _check_same_names(params, self.anchor, "the anchor")
        self.path = {n: torch.zeros_like(p) for n, p in self.anchor.items()}

    def accumulate(self, task_grads: Params, before: Params, after: Params) -> None:
        """One step of the path integral: ω_i += −g_i (θ_i^after − θ_i^before)."""
        if not self.path:
            raise RuntimeError("call begin_task before accumulating SI's path integral")
        for n in self.path:
            self.path[n] -= task_grads[n] * (after[n] - before[n])

    def consolidate(self, params: Params) -> None:
        """End of a task: Ω_i += ω_i / ((θ_i − θ*_i)² + ξ), then θ* ← θ."""
        if not self.path:
            raise RuntimeError("call begin_task before consolidating")
        end = snapshot(params)
        added = {n: self.path[n] / ((end[n] - self.anchor[n]) ** 2 + self.xi) for n in self.path}
        self.omega = added if self.omega is None else {n: self.omega[n] + added[n] for n in added}
        self.anchor, self.path = end, {}

    def penalty(self, params: Params) -> torch.Tensor:
        """c Σ_i Ω_i (θ_i − θ*_i)²; a zero scalar before the first consolidation."""
        if self.omega is None:
            return torch.zeros((), device=next(iter(params.values())).device)
        return self.c * quadratic_penalty(params, self.anchor, self.omega)


class PenalisedOptimizer:
    """Wraps an optimiser for ``training.fit``: each ``step`` adds ∇ penalty(θ) to the task-loss gradient first.

    ``after_step(task_grads, before, after)`` (optional) sees the task-loss gradient, and θ before and after the
    step, which is all SI's path integral needs. ``fit`` calls only ``zero_grad`` and ``step``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Params,
                 penalty: Callable[[Params], torch.Tensor] | None = None,
                 after_step: Callable[[Params, Params, Params], None] | None = None) -> None:
        self.optimizer, self.params = optimizer, params
        self.penalty, self.after_step = penalty, after_step

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        """Task gradient → (+ penalty gradient) → optimiser step → ``after_step``."""
        task_grads = before = None
        if self.after_step is not None:
            task_grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                          for n, p in self.params.items()}
            before = snapshot(self.params)
        if self.penalty is not None:
            value = self.penalty(self.params)
            if value.requires_grad:
                value.backward()
        self.optimizer.step()
        if self.after_step is not None:
            self.after_step(task_grads, before, snapshot(self.params))


# --- layer-wise forward for the per-task-context baselines --------------------------------------------------
def layerwise_forward(model: nn.Module, x: torch.Tensor, linear: Linear) -> torch.Tensor:
    """Run an ``nn.Sequential`` MLP, replacing each ``nn.Linear`` by ``linear(name, W, h)``.

    Other layers (Flatten, ReLU) run as they are. x: (B, ...) → logits (B, s).
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"BatchE and PSP here are written for nn.Sequential MLPs, got {type(model).__name__}")
    h = x
    for name, layer in model.named_children():
        if isinstance(layer, nn.Conv2d):
            raise TypeError(f"layer {name!r} is a Conv2d; BatchE/PSP here support Linear layers only")
        h = linear(f"{name}.weight", layer.weight, h) if isinstance(layer, nn.Linear) else layer(h)
    return h


# --- BatchE --------------------------------------------------------------------------------------------------
RankOne = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _random_signs(n: int, generator: torch.Generator, like: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """(n,) independent ±1 with probability ½ each, dtype and device of ``like``."""
    signs = torch.randint(0, 2, (n,), generator=generator).to(like) * 2 - 1
    return signs.requires_grad_(requires_grad)


def rank_one_factors(model: nn.Module, generator: torch.Generator, requires_grad: bool = True) -> RankOne:
    """BatchE's per-task factors for every Linear weight W (out, in): s (out,) and t (in,), random ±1.

    (The authors' ``rank_one_init``.) Returned as leaf tensors on the model's device.
    """
    factors = {}
    for name, weight in maskable_parameters(model).items():
        if weight.dim() != 2:
            raise TypeError(f"BatchE here supports Linear weights only; {name!r} has shape {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        factors[name] = (_random_signs(out_features, generator, weight, requires_grad),
                         _random_signs(in_features, generator, weight, requires_grad))
    return factors


def batche_forward(model: nn.Module, factors: RankOne, x: torch.Tensor) -> torch.Tensor:
    """BatchE forward: every Linear layer computes y = s ⊙ (W (x ⊙ t)). x: (B, in) → logits (B, s)."""
    def linear(name: str, weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        s, t = factors[name]
        return F.linear(h * t, weight) * s

    return layerwise_forward(model, x, linear)


def batche_weights(model: nn.Module, factors: RankOne) -> Params:
    """The equivalent effective weights W ⊙ (s tᵀ) per layer (for ``masked_forward``; O(out·in) each)."""
    return {name: weight * torch.outer(*factors[name]) for name, weight in maskable_parameters(model).items()}


# --- PSP -----------------------------------------------------------------------------------------------------
def random_orthogonal(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A Haar-random orthogonal (n, n) matrix: Q of the QR of a Gaussian matrix, columns signed by diag(R).

    Same distribution as ``scipy.stats.ortho_group`` (the authors' contexts); computed in float64.
    """
    if n < 1:
        raise ValueError(f"an orthogonal context needs n ≥ 1, got {n}")
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def psp_contexts(model: nn.Module, generator: torch.Generator) -> Params:
    """One task's PSP contexts: a fixed random orthogonal C (in, in) per Linear layer, on the model's device."""
    contexts = {}
    for name, weight in maskable_parameters(model).items():
        if weight.dim() != 2:
            raise TypeError(f"PSP here supports Linear weights only; {name!r} has shape {tuple(weight.shape)}")
        contexts[name] = random_orthogonal(weight.shape[1], generator, weight.dtype).to(weight.device)
    return contexts


def psp_forward(model: nn.Module, contexts: Params, x: torch.Tensor) -> torch.Tensor:
    """PSP forward: every Linear layer computes y = W (C x), i.e. h ↦ (h Cᵀ) Wᵀ. x: (B, in) → logits (B, s)."""
    def linear(name: str, weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h @ contexts[name].T, weight)

    return layerwise_forward(model, x, linear)


def psp_weights(model: nn.Module, contexts: Params) -> Params:
    """The equivalent effective weights W C per layer (for ``masked_forward``, e.g. to evaluate many batches)."""
    return {name: weight @ contexts[name] for name, weight in maskable_parameters(model).items()}


def parameter_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes to store ``tensors`` as they are (numel · element size)."""
    return sum(t.numel() * t.element_size() for t in tensors)


# --- scenario without shared labels --------------------------------------------------------------------------
class UnsharedLabels(TaskStream):
    """A view of ``base`` in which task t's label y becomes C·t + y (C = ``base.num_classes``): C·T classes.

    The inputs and their order are the base stream's (no data is copied). With the task withheld at test time
    this is scenario GNu (van de Ven & Tolias' "class-incremental" learning): predicting the right digit
    with the wrong task counts as wrong.
    """

    def __init__(self, base: TaskStream) -> None:  # the data stays in ``base``: no TaskStream.__init__
        if isinstance(base, UnsharedLabels):
            raise TypeError("the stream's labels are already unshared")
        self.base = base
        self.name = f"{base.name}, labels not shared"
        self.num_tasks, self.device = base.num_tasks, base.device
        self.classes_per_task = base.num_classes
        self.num_classes = base.num_classes * base.num_tasks

    def __repr__(self) -> str:
        return f"UnsharedLabels({self.base!r})"

    def check_task(self, task: int) -> int:  # noqa: D102
        return self.base.check_task(task)

    def transform(self, task: int, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.base.transform(task, x)

    def shift(self, task: int, y: torch.Tensor) -> torch.Tensor:
        """Task ``task``'s labels y (N,) → C·task + y."""
        return y + self.classes_per_task * self.check_task(task)

    def test_set(self, task: int) -> Batch:  # noqa: D102
        x, y = self.base.test_set(task)
        return x, self.shift(task, y)

    def train_set(self, task: int) -> Batch:  # noqa: D102
        x, y = self.base.train_set(task)
        return x, self.shift(task, y)

    def num_train(self, task: int) -> int:  # noqa: D102
        return self.base.num_train(task)

    def train_batches(self, task: int, batch_size: int = 128, num_batches: int | None = None,
                      seed: int = 0) -> Iterator[Batch]:  # noqa: D102
        for x, y in self.base.train_batches(task, batch_size, num_batches, seed):
            yield x, self.shift(task, y)


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
    """Shared plumbing: a stream, training settings, and one ``fit`` call per task with seed ``task_seed``."""

    def __init__(self, stream: TaskStream, num_batches: int | None, batch_size: int, seed: int,
                 progress: bool) -> None:
        super().__init__(stream)
        self.num_batches, self.batch_size, self.seed, self.progress = num_batches, batch_size, seed, progress

    def _fit(self, task: int, forward: Callable[[torch.Tensor], torch.Tensor], parameters: list[torch.Tensor],
             optimizer: torch.optim.Optimizer | PenalisedOptimizer) -> None:
        batches = self.stream.train_batches(task, self.batch_size, self.num_batches, task_seed(task, self.seed))
        total = self.num_batches if self.num_batches is not None else -(-self.stream.num_train(task) // self.batch_size)
        fit(forward, parameters, optimizer, batches, total, self.progress, f"{self.name}, task {task}")


class PenalisedFineTuning(_Trained):
    """Fine-tuning (one network, every task in turn, RMSprop(lr)) plus a quadratic penalty: EWC and SI.

    With a zero penalty this is ``continual.FineTuning`` step for step. ``predict`` ignores the task id (one
    head); run it on :class:`UnsharedLabels` for scenario GNu.
    """

    def __init__(self, model: nn.Module, stream: TaskStream, num_batches: int | None = 1000, batch_size: int = 128,
                 lr: float = 1e-4, seed: int = 0, progress: bool = False) -> None:
        super().__init__(stream, num_batches, batch_size, seed, progress)
        self.model, self.lr = copy.deepcopy(model).requires_grad_(True), lr
        self.params = trainable_parameters(self.model)

    def begin_task(self, task: int) -> None:
        """Called before training task ``task``."""

    def penalty(self, params: Params) -> torch.Tensor:
        """The quadratic penalty added to the task loss."""
        raise NotImplementedError

    after_step: Callable[[Params, Params, Params], None] | None = None

    def end_task(self, task: int) -> None:
        """Called after training task ``task`` (consolidation)."""
        raise NotImplementedError

    def learn(self, task: int) -> None:  # noqa: D102
        task = self.stream.check_task(task)
        self.begin_task(task)
        self.model.train()
        optimizer = PenalisedOptimizer(torch.optim.RMSprop(self.params.values(), lr=self.lr), self.params,
                                       self.penalty, self.after_step)
        self._fit(task, self.model, list(self.params.values()), optimizer)
        self.model.eval()
        self.end_task(task)

    def predict(self, x: torch.Tensor, task: int | None) -> torch.Tensor:  # noqa: D102
        return predict(self.model, None, x)


class OnlineEWCMethod(PenalisedFineTuning):
    """Online EWC: after each task, the Fisher diagonal on ``fisher_samples`` of its training images (the
    model's predicted labels) joins the running F̃ ← γ F̃ + F; later tasks pay (λ/2) Σ F̃ (θ − θ*)²."""

    name = "Online EWC"

    def __init__(self, model: nn.Module, stream: TaskStream, lam: float, gamma: float = 1.0,
                 fisher_samples: int = 1000, **training) -> None:
        super().__init__(model, stream, **training)
        if fisher_samples < 1:
            raise ValueError(f"fisher_samples must be ≥ 1, got {fisher_samples}")
        self.ewc, self.fisher_samples = OnlineEWC(lam, gamma), fisher_samples

    def penalty(self, params: Params) -> torch.Tensor:  # noqa: D102
        return self.ewc.penalty(params)

    def end_task(self, task: int) -> None:  # noqa: D102
        seed = task_seed(task, self.seed) + 1
        x, _ = next(self.stream.train_batches(task, self.fisher_samples, 1, seed))
        self.ewc.consolidate(self.params, fisher_diagonal(self.model, x))

    def storage_bytes(self) -> int:
        """The network plus F̃ and θ* (three fp32 copies, whatever the number of tasks)."""
        return 3 * dense_bytes(self.model)


class SIMethod(PenalisedFineTuning):
    """Synaptic Intelligence: the path integral of the task loss during each task sets the importance Ω;
    later tasks pay c Σ Ω (θ − θ*)²."""

    name = "SI"

    def __init__(self, model: nn.Module, stream: TaskStream, c: float, xi: float = 0.1, **training) -> None:
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
        factors = rank_one_factors(self.model, torch.Generator().manual_seed(task_seed(task, self.seed)))
        trained = [v for pair in factors.values() for v in pair]
        first = not self.factors
        self.model.requires_grad_(first)
        if first:
            trained += list(maskable_parameters(self.model).values())
        optimizer = torch.optim.Adam(trained, lr=self.first_lr if first else self.lr)
        self._fit(task, lambda x: batche_forward(self.model, factors, x), trained, optimizer)
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
        return psp_contexts(self.model, torch.Generator().manual_seed(task_seed(task, self.seed)))

    def learn(self, task: int) -> None:  # noqa: D102
        task = self.stream.check_task(task)
        contexts, weights = self.contexts(task), list(maskable_parameters(self.model).values())
        self._fit(task, lambda x: psp_forward(self.model, contexts, x), weights,
                  torch.optim.RMSprop(weights, lr=self.lr))
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
        self._fit(task, self._forward(head), trained, optimizer)
        self.model.requires_grad_(False)
        self.heads[task] = head.detach()

    def predict(self, x: torch.Tensor, task: int | None) -> torch.Tensor:  # noqa: D102
        task = _need_task(self.name, task, self.heads)
        return predict(self.model, {self.head_name: self.heads[task]}, x)

    def storage_bytes(self) -> int:
        """The trunk once plus one head per task."""
        trunk = [p for n, p in self.model.named_parameters() if n != self.head_name]
        return dense_bytes(trunk) + parameter_bytes(self.heads.values())


# --- SupSup without task ids, on the same harness ---------------------------------------------------------------
TaskSearch = Literal["one_shot", "binary"]


class SupSupGNu(SupSupGG):
    """SupSup in scenario GNu: masks learned as in GG (on the base stream's labels 0..C−1), task withheld at test.

    ``predict(x, None)`` cuts x into batches of ``test_batch`` images (in order); each batch's task t̂ is
    inferred from its first ``infer_from`` images by ``search`` ("one_shot": argmin_t ∂objective/∂α_t at
    α = 1/T, Eq. 4; "binary": halve the candidates ⌈log₂ T⌉ times) over the tasks learned so far, and the
    batch is classified with mask t̂ over the first C outputs: the prediction is C·t̂ + ŷ, the label space
    of ``stream`` (an :class:`UnsharedLabels`). A wrongly inferred batch therefore scores 0 — the paper's
    GNu protocol (one image per batch of 128 for PermutedMNIST; the whole batch with binary search for
    RotatedMNIST). Extra keyword arguments go to ``SupSupGG``.
    """

    name = "SupSup (GNu)"

    def __init__(self, model: nn.Module, stream: UnsharedLabels, search: TaskSearch = "one_shot",
                 objective: Objective = entropy, infer_from: int = 1, test_batch: int = 128, **settings) -> None:
        if not isinstance(stream, UnsharedLabels):
            raise TypeError(f"SupSup (GNu) predicts task and label, so it runs on UnsharedLabels(stream); "
                            f"got {type(stream).__name__}")
        if search not in ("one_shot", "binary"):
            raise ValueError(f"search must be 'one_shot' or 'binary', got {search!r}")
        if not 1 <= infer_from <= test_batch:
            raise ValueError(f"infer_from must lie in 1..test_batch={test_batch}, got {infer_from}")
        super().__init__(model, stream.base, **settings)  # masks learn the base labels 0..C−1
        self.unshared, self.classes = stream, stream.classes_per_task
        self.search, self.objective = search, objective
        self.infer_from, self.test_batch = infer_from, test_batch

    def infer_batches(self, x: torch.Tensor) -> list[int]:
        """The inferred task of every batch of ``test_batch`` consecutive images of x (N, ...), each from its first
        ``infer_from`` images, by ``search`` over the tasks learned so far (batched by ``protocols.infer_tasks``)."""
        starts = range(0, x.shape[0], self.test_batch)
        groups = [x[s:s + self.infer_from] for s in starts]
        full = [g for g in groups if g.shape[0] == self.infer_from]
        rows = []
        if full:
            rows += infer_tasks(self.model, self.bank, torch.cat(full), self.infer_from, self.search,
                                self.objective).tolist()
        if len(full) < len(groups):   # a last batch shorter than infer_from: all of it
            last = groups[-1]
            rows += infer_tasks(self.model, self.bank, last, last.shape[0], self.search, self.objective).tolist()
        task_of_row = {row: task for task, row in self.rows.items()}
        return [task_of_row[row] for row in rows]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task: int | None) -> torch.Tensor:  # noqa: D102
        if task is not None:
            raise ValueError("SupSup (GNu) infers the task itself; call predict(x, None)")
        labels = []
        for start, inferred in zip(range(0, x.shape[0], self.test_batch), self.infer_batches(x)):
            logits = masked_forward(self.model, self.masked_weights(inferred), x[start:start + self.test_batch])
            labels.append(self.classes * inferred + logits[:, : self.classes].argmax(1))
        return torch.cat(labels)
