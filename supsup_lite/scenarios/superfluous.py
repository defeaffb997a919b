"""What the superfluous outputs do to a mask's training signal (paper §3.6; notebook 04 asks why GG falls with s).

A network with s outputs learns ℓ real classes (the first ℓ logits) with the cross-entropy over all s logits.
With p = softmax(z), m = Σ_{j ≥ ℓ} p_j the probability on the superfluous outputs and p̂ = softmax(z_{<ℓ}) the
softmax over the real classes alone (so p_j = (1 − m) p̂_j for j < ℓ), one image's logit gradient is

    ∂L/∂z_j = (1 − m) p̂_j − [j = y]   for j < ℓ,        ∂L/∂z_j = p_j   for j ≥ ℓ,

while the loss over the real classes only (``train_supermasks(..., classes=ℓ)``) has ∂L'/∂z_j = p̂_j − [j = y]
for j < ℓ and 0 beyond. The full loss pushes the superfluous logits down, and it pushes the *wrong real classes*
down only (1 − m) times as hard: while m is large (at initialisation m ≈ 1 − ℓ/s when the logits are alike) it
mostly raises the right class and hardly separates the real classes from each other. For a given mask the
network is fixed, so backpropagation maps these logit gradients linearly onto the straight-through score
gradients g = ∂L/∂(W ⊙ M) ⊙ W of every layer; :func:`gradient_split` compares g with the real-only g'.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import validation
from ..config import device as default_device
from ..core.masks import Masks, apply_masks
from ..core.models import frozen_random_model, maskable_parameters, masked_forward, output_size
from ..core.training import train_bank
from ..data import PermutedMNIST
from .protocols import gg_accuracy


def gradient_split(model: nn.Module, masks: Masks, x: torch.Tensor, y: torch.Tensor, *,
                   classes: int = 10) -> dict[str, torch.Tensor]:
    """The score gradient g of the mean cross-entropy over all s outputs against g' of the loss over the first
    ``classes`` logits only, for one task's ``masks`` (name → bool, shaped like W) on x (B, ...), y (B,).

    Returns, per maskable layer (module order), float64 (L,) tensors: ``full`` ‖g‖, ``superfluous`` ‖g_u‖ (the part
    of g that comes from the superfluous logits, ∂L/∂z_j = p_j for j ≥ ``classes``), ``real_only`` ‖g'‖ and
    ``alignment`` cos(g, g') (1: the superfluous outputs do not change the direction training takes); and
    ``mass``, the mean superfluous probability m = Σ_{j ≥ classes} p_j over the batch (0-d). The module docstring
    derives how g and g' differ. Labels must be real classes (below ``classes``).
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
    names = list(weights)
    logits = masked_forward(model, weights, x)
    p = torch.softmax(logits.detach(), dim=1)
    target = F.one_hot(y, outputs).to(p.dtype)
    full = (p - target) / y.shape[0]
    superfluous = full.clone()
    superfluous[:, :classes] = 0
    real_only = torch.zeros_like(full)
    real_only[:, :classes] = (torch.softmax(logits.detach()[:, :classes], dim=1) - target[:, :classes]) / y.shape[0]

    def score_gradients(dz: torch.Tensor) -> list[torch.Tensor]:
        grads = torch.autograd.grad(logits, [weights[n] for n in names], grad_outputs=dz, retain_graph=True)
        return [(g * params[n]).double().flatten() for g, n in zip(grads, names)]

    g, g_u, g_real = score_gradients(full), score_gradients(superfluous), score_gradients(real_only)
    alignment = [a @ b / (a.norm() * b.norm()) if a.norm() > 0 and b.norm() > 0 else a.new_zeros(())
                 for a, b in zip(g, g_real)]
    return {"full": torch.stack([a.norm() for a in g]), "superfluous": torch.stack([a.norm() for a in g_u]),
            "real_only": torch.stack([a.norm() for a in g_real]), "alignment": torch.stack(alignment),
            "mass": p[:, classes:].sum(1).double().mean()}


def gg_by_output_size(*, sizes: Sequence[int], budgets: Sequence[int], tasks: int, classes: int | None = None,
                      arch: str = "lenet_300_100", seed: int = 0, data_seed: int = 1,
                      progress: bool = True) -> list[dict[str, Any]]:
    """GG accuracy of PermutedMNIST tasks 0..tasks−1 for every output size s in ``sizes`` and every training budget
    (batches of 128 per mask) in ``budgets``: one bank per (s, budget), trained by ``train_bank`` with run seed
    ``seed`` on the network ``frozen_random_model(arch, s, seed)`` and ``PermutedMNIST(seed=data_seed)`` — the
    banks of ``python -m supsup_lite gnu_permuted_mnist --outputs s --batches b`` (its first ``tasks`` tasks).

    ``classes``: train and predict over the first ``classes`` logits only (None: all s, the paper). Returns one
    row per (s, budget, task): ``{"s", "batches", "task", "correct", "images"}`` (test images classified right by
    the task's own mask, and the test-set size), so intervals can be formed over images or tasks. ``progress``: a
    bar over the (s, budget) banks.
    """
    validation.integer("tasks", tasks, minimum=1)
    if not sizes or not budgets:
        raise ValueError(f"sizes={list(sizes)} and budgets={list(budgets)} must both be non-empty; give e.g. "
                         "sizes=(10, 500), budgets=(100, 1000)")
    stream = PermutedMNIST(tasks, seed=data_seed, device=default_device())
    rows = []
    for s, batches in tqdm([(s, b) for s in sizes for b in budgets], desc="banks (s, batches)",
                           disable=not progress, leave=False):
        model = frozen_random_model(arch, s, seed, stream.device)
        bank = train_bank(model, stream, num_tasks=tasks, k=tasks, num_batches=batches, classes=classes,
                          seed=seed, progress=False)
        images = stream.test_set(0)[1].shape[0]
        for task, accuracy in enumerate(gg_accuracy(model, bank, stream, classes=classes)):
            rows.append({"s": s, "batches": batches, "task": task, "correct": round(accuracy * images),
                         "images": images})
    return rows
