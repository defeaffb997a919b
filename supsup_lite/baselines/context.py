"""Per-task context baselines over one shared weight matrix per layer.

* **BatchE** (Wen et al. 2020): shared W, rank-one per-task factors: each layer computes y = s ⊙ (W (x ⊙ t)).
* **PSP** (Cheung et al. 2019): shared W, fixed random orthogonal per-task contexts: y = W (C x).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

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


