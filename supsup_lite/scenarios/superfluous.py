"""What the superfluous outputs do to a mask's training signal (paper §3.6; notebook 04 asks why GG falls with s).

A network with s outputs is trained on the first ℓ (the real classes) with cross-entropy over all s logits, so
with p = softmax(z) the logit gradient of one image splits into a real part and a superfluous part,

    ∂L/∂z = (p − e_y) = r + u,   r_j = (p_j − [j = y]) [j < ℓ],   u_j = p_j [j ≥ ℓ],

and, the network being fixed for a given mask, so does the straight-through score gradient of every layer:
g = ∂L/∂(W ⊙ M) ⊙ W = g_r + g_u (backpropagation is linear in ∂L/∂z). ``g_r`` is the whole gradient of the
loss restricted to the real classes only up to its softmax normaliser: dropping the superfluous terms from the
loss (``train_supermasks(..., classes=ℓ)``) removes ``g_u`` and rescales the real softmax to sum to one.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import validation
from ..config import device as default_device
from ..core.masks import Masks, apply_masks
from ..core.models import frozen_random_model, maskable_parameters, masked_forward, output_size
from ..core.training import train_bank
from ..data import PermutedMNIST
from .protocols import gg_accuracy


def gradient_split(model: nn.Module, masks: Masks, x: torch.Tensor, y: torch.Tensor, *,
                   classes: int = 10) -> dict[str, torch.Tensor]:
    """The score gradient of the mean cross-entropy over all s outputs, split into its real and superfluous parts.

    x (B, ...), y (B,) labels below ``classes``; ``masks``: one task's bool masks (name → shaped like W). Returns
    ``real`` and ``superfluous``: (L,) float64 Frobenius norms ‖g_r‖, ‖g_u‖ per maskable layer (module order),
    ``cosine``: (L,) cos(g_r, g_u) (0 where either is 0), and ``mass``: the mean superfluous probability
    Σ_{j ≥ classes} p_j over the batch (a 0-d tensor), the share of each image's unit of softmax that ``u``
    pushes down. g_r + g_u is the gradient ∂CE/∂s that training applies (the module docstring has the split).
    """
    outputs = output_size(model)
    classes = validation.integer("classes (real outputs, the first of the model's)", classes, minimum=1)
    if classes >= outputs:
        raise ValueError(f"classes={classes} leaves no superfluous output among the model's {outputs}; give "
                         f"1..{outputs - 1}")
    validation.labels(model, y, validation.images(model, x).shape[0])
    if int(y.max()) >= classes:
        raise ValueError(f"y holds label {int(y.max())}, not a real class (below classes={classes}); the "
                         "superfluous outputs never carry a label")
    params = maskable_parameters(model)
    weights = {name: w.detach().clone().requires_grad_(True) for name, w in apply_masks(model, masks).items()}
    logits = masked_forward(model, weights, x)
    dz = (torch.softmax(logits.detach(), dim=1) - F.one_hot(y, outputs).to(logits.dtype)) / y.shape[0]
    real, superfluous = dz.clone(), dz.clone()
    real[:, classes:] = 0
    superfluous[:, :classes] = 0
    names = list(weights)
    g_r = torch.autograd.grad(logits, [weights[n] for n in names], grad_outputs=real, retain_graph=True)
    g_u = torch.autograd.grad(logits, [weights[n] for n in names], grad_outputs=superfluous)
    norms_r, norms_u, cosines = [], [], []
    for name, a, b in zip(names, g_r, g_u):
        a, b = (a * params[name]).double().flatten(), (b * params[name]).double().flatten()
        norm_a, norm_b = a.norm(), b.norm()
        norms_r.append(norm_a)
        norms_u.append(norm_b)
        cosines.append(a @ b / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else norm_a.new_zeros(()))
    mass = torch.softmax(logits.detach().double(), dim=1)[:, classes:].sum(1).mean()
    return {"real": torch.stack(norms_r), "superfluous": torch.stack(norms_u), "cosine": torch.stack(cosines),
            "mass": mass}


def gg_by_output_size(*, sizes: Sequence[int], budgets: Sequence[int], tasks: int, classes: int | None = None,
                      arch: str = "lenet_300_100", seed: int = 0, data_seed: int = 1,
                      progress: bool = False) -> list[dict[str, Any]]:
    """GG accuracy of PermutedMNIST tasks 0..tasks−1 for every output size s in ``sizes`` and every training budget
    (batches of 128 per mask) in ``budgets``: one bank per (s, budget), trained by ``train_bank`` with run seed
    ``seed`` on the network ``frozen_random_model(arch, s, seed)`` and ``PermutedMNIST(seed=data_seed)`` — the
    banks of ``python -m supsup_lite gnu_permuted_mnist --outputs s --batches b`` (its first ``tasks`` tasks).

    ``classes``: train and predict over the first ``classes`` logits only (None: all s, the paper). Returns one
    row per (s, budget, task): ``{"s", "batches", "task", "correct", "images"}`` (test images classified right by
    the task's own mask, and the test-set size), so intervals can be formed over images or tasks.
    """
    validation.integer("tasks", tasks, minimum=1)
    if not sizes or not budgets:
        raise ValueError(f"sizes={list(sizes)} and budgets={list(budgets)} must both be non-empty; give e.g. "
                         "sizes=(10, 500), budgets=(100, 1000)")
    stream = PermutedMNIST(tasks, seed=data_seed, device=default_device())
    rows = []
    for s in sizes:
        for batches in budgets:
            model = frozen_random_model(arch, s, seed, stream.device)
            bank = train_bank(model, stream, num_tasks=tasks, k=tasks, num_batches=batches, classes=classes,
                              seed=seed, progress=progress)
            images = stream.test_set(0)[1].shape[0]
            for task, accuracy in enumerate(gg_accuracy(model, bank, stream, classes=classes)):
                rows.append({"s": s, "batches": batches, "task": task, "correct": round(accuracy * images),
                             "images": images})
    return rows
