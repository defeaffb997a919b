"""Task inference from the gradient of an output objective with respect to the mixing coefficients α.

With p(α) = f(x, W ⊙ Σ_t α_t M_t) (Eq. 2), the task is the mask whose weight, when increased, lowers the
objective most: one-shot takes argmin_t ∂H/∂α_t at α = 1/T (Eq. 4); binary search halves the candidates at
the median gradient ⌈log₂ T⌉ times.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .masks import MaskBank
from .models import masked_forward
from .superpose import check_alphas, superposed_weights

Objective = Callable[[torch.Tensor], torch.Tensor]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Output entropy H = −Σ_j p_j log p_j with p = softmax(logits). logits: (B, s) → (B,)."""
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(1)


def superfluous_logsumexp(logits: torch.Tensor, real_neurons: int = 10) -> torch.Tensor:
    """Objective G = logsumexp(z) over all s outputs, with the gradient of the ℓ real-class logits blocked.

    logits: (B, s) → (B,). ∂G/∂z_j = softmax_j(z) for the superfluous j ≥ ℓ, and 0 for j < ℓ.
    """
    if not 0 < real_neurons < logits.shape[1]:
        raise ValueError(f"G needs superfluous outputs: real_neurons={real_neurons} must lie in "
                         f"[1, {logits.shape[1] - 1}] for {logits.shape[1]} outputs")
    z = torch.cat([logits[:, :real_neurons].detach(), logits[:, real_neurons:]], dim=1)
    return torch.logsumexp(z, dim=1)


def uniform_alphas(bank: MaskBank, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """α = 1/k on the k candidate tasks (all tasks by default), 0 elsewhere: (T,) float on the bank's device."""
    alphas = torch.zeros(len(bank), device=bank.device)
    if candidates is None:
        alphas.fill_(1.0 / len(bank))
    else:
        alphas[candidates] = 1.0 / candidates.numel()
    return alphas


def alpha_gradient(model: nn.Module, bank: MaskBank, x: torch.Tensor, alphas: torch.Tensor | None = None,
                   objective: Objective = entropy) -> tuple[torch.Tensor, torch.Tensor]:
    """Objective and its gradient in α: (mean_b objective(f(x_b, W ⊙ Σ α_t M_t)), ∂/∂α (T,)).

    x: (B, ...) one image (B = 1) or a batch; alphas: (T,), default 1/T.
    """
    alphas = uniform_alphas(bank) if alphas is None else alphas
    check_alphas(bank, alphas)
    alphas = alphas.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        value = objective(masked_forward(model, superposed_weights(model, bank, alphas), x)).mean()
        (grad,) = torch.autograd.grad(value, alphas)
    return value.detach(), grad


def one_shot(model: nn.Module, bank: MaskBank, x: torch.Tensor, objective: Objective = entropy) -> int:
    """One-Shot inference: argmin_t ∂objective/∂α_t at α = 1/T, over the learned tasks only (Eq. 4)."""
    _, grad = alpha_gradient(model, bank, x, objective=objective)
    return int(grad.argmin())


def binary_search_step(grad: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Keep the ⌈k/2⌉ candidates with the smallest gradient (ties broken by task index).

    grad: (T,), candidates: (k,) int64 → (⌈k/2⌉,) int64. Equals the authors' "grad ≤ median" rule when the
    gradients are distinct, and always makes progress (their rule loops forever on ties).
    """
    order = torch.sort(grad[candidates], stable=True).indices
    return candidates[order[: (candidates.numel() + 1) // 2]].sort().values


def binary_search(model: nn.Module, bank: MaskBank, x: torch.Tensor, objective: Objective = entropy) -> int:
    """Binary inference: halve the candidate tasks at the median α-gradient until one is left (⌈log₂ T⌉ steps)."""
    candidates = torch.arange(len(bank), device=bank.device)
    while candidates.numel() > 1:
        _, grad = alpha_gradient(model, bank, x, uniform_alphas(bank, candidates), objective)
        candidates = binary_search_step(grad, candidates)
    return int(candidates[0])
