"""Regularisation baselines: Online EWC and Synaptic Intelligence, reduced to their core rule.

* **Online EWC** (Schwarz et al. 2018): a quadratic penalty (λ/2) Σ_i F̃_i (θ_i − θ*_i)² around the weights θ*
  after the last task, with the running Fisher diagonal F̃ ← γ F̃ + F_task.
* **SI** (Zenke et al. 2017): the same quadratic form c Σ_i Ω_i (θ_i − θ*_i)², with an importance Ω from the
  path integral ω_i = Σ_steps −g_i Δθ_i of the task loss, normalised as Ω_i += ω_i / (Δ_i² + ξ).

Both plug into the training loop through :class:`PenalisedOptimizer`, a thin wrapper that adds the penalty's
gradient before each step (the loop itself stays a plain cross-entropy loop).
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

Params = dict[str, torch.Tensor]
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
    step, which is all SI's path integral needs. ``fit`` calls only ``zero_grad`` and ``step`` (and reads the
    learning rates in ``param_groups``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Params,
                 penalty: Callable[[Params], torch.Tensor] | None = None,
                 after_step: Callable[[Params, Params, Params], None] | None = None) -> None:
        self.optimizer, self.params = optimizer, params
        self.penalty, self.after_step = penalty, after_step

    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimiser's parameter groups (``fit`` checks their learning rates)."""
        return self.optimizer.param_groups

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


