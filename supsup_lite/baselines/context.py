"""Per-task context baselines over one shared weight matrix per layer.

* **BatchE** (Wen et al. 2020): shared W, rank-one per-task factors: each layer computes y = s ⊙ (W (x ⊙ t)).
* **PSP** (Cheung et al. 2019): shared W, fixed random orthogonal per-task contexts: y = W (C x).
* **BatchE in superposition** (the paper's Fig. 5-right): every task's rank-one factors at once,
  W ⊙ Σ_i α_i s_i t_iᵀ, and One-Shot task inference from the entropy gradient at uniform α.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.inference import Objective, entropy
from ..core.models import maskable_parameters
from .regularisers import Params

Linear = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]


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


# --- BatchE in superposition and its One-Shot task inference -------------------------------------------------
def stacked_factors(factors: Sequence[RankOne]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """T tasks' factors stacked per layer: name → (S (T, out), R (T, in)), row i from task ``factors[i]``."""
    if not factors:
        raise ValueError("superposing BatchE factors needs at least one task's factors, got none")
    names = list(factors[0])
    for i, task in enumerate(factors):
        if list(task) != names:
            raise KeyError(f"factors[{i}] covers layers {list(task)}, factors[0] covers {names}; "
                           "pass factors of one model")
    return {n: (torch.stack([f[n][0] for f in factors]), torch.stack([f[n][1] for f in factors])) for n in names}


def superposed_batche_forward(model: nn.Module, factors: Sequence[RankOne], alphas: torch.Tensor,
                              x: torch.Tensor) -> torch.Tensor:
    """BatchE with the T tasks' rank-one factors in superposition. x: (B, in) → logits (B, s).

    Every Linear layer computes y = (W ⊙ Σ_i α_i s_i t_iᵀ) h = Σ_i α_i s_i ⊙ (W (h ⊙ t_i)), evaluated in the
    second (factored) form, which costs T ordinary products with W and lets every image have its own α:
    ``alphas`` is (T,) (one α for the batch) or (B, T) (row b for image b). At a one-hot α = e_i this is
    :func:`batche_forward` with task i's factors. Differentiable in ``alphas``.
    """
    stacked = stacked_factors(factors)
    tasks = len(factors)
    if alphas.shape not in ((tasks,), (x.shape[0], tasks)):
        raise ValueError(f"alphas must have shape ({tasks},) or ({x.shape[0]}, {tasks}) for {tasks} tasks and "
                         f"{x.shape[0]} images; got {tuple(alphas.shape)}")
    weights = alphas.expand(x.shape[0], tasks).unsqueeze(2)  # (B, T, 1)

    def linear(name: str, weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        s, t = stacked[name]                                   # (T, out), (T, in)
        per_task = F.linear(h.unsqueeze(1) * t, weight) * s   # (B, T, out): s_i ⊙ (W (h ⊙ t_i))
        return (weights * per_task).sum(1)

    return layerwise_forward(model, x, linear)


def batche_alpha_gradient(model: nn.Module, factors: Sequence[RankOne], x: torch.Tensor, *,
                          objective: Objective = entropy) -> torch.Tensor:
    """Each image's gradient of the objective (e.g. the output entropy H) with respect to its own α, at the
    uniform α_i = 1/T: x (B, in) → (B, T). ``objective`` maps logits (B, s) to (B,) per-image values."""
    alphas = torch.full((x.shape[0], len(factors)), 1.0 / len(factors), dtype=x.dtype, device=x.device,
                        requires_grad=True)
    with torch.enable_grad():
        values = objective(superposed_batche_forward(model, factors, alphas, x))
        if values.shape != (x.shape[0],):
            raise ValueError(f"the objective must return one value per image, shape ({x.shape[0]},); "
                             f"got {tuple(values.shape)}")
        (gradient,) = torch.autograd.grad(values.sum(), alphas)
    return gradient


def batche_one_shot(model: nn.Module, factors: Sequence[RankOne], x: torch.Tensor, *,
                    objective: Objective = entropy) -> torch.Tensor:
    """One-Shot task inference for BatchE, image by image: t̂ = argmax_i −∂H/∂α_i at α = 1/T. x (B, in) → (B,).

    With α = softmax(z) the gradient in z at z = 0 is (1/T)(g − mean g), g = ∂H/∂α: the same argmax, so
    inferring in α or in the logits z (as the authors' ``BatchEnsembles`` parametrises it) picks the same task.
    """
    return batche_alpha_gradient(model, factors, x, objective=objective).argmin(1)


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


