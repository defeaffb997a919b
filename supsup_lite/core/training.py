"""Training a supermask on a frozen base network (and, for comparison, training the weights), and evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.mnist import Batch, TaskStream
from .masks import Masks, init_scores, supermask_weight, topk_supermask
from .models import maskable_parameters, masked_forward

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TrainHistory:
    """Per-batch training loss and training-batch accuracy."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)


def fit(forward: Forward, parameters: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer,
        batches: Iterable[Batch], num_batches: int | None = None, progress: bool = True,
        description: str = "training") -> TrainHistory:
    """Minimise the cross-entropy of ``forward(x)`` against ``y`` over ``batches``, one step per batch.

    forward: (B, ...) → logits (B, s). Only ``optimizer``'s parameters change. Returns the loss/accuracy per batch.
    """
    losses, correct, sizes = [], [], []
    for x, y in tqdm(batches, total=num_batches, disable=not progress, desc=description, leave=False):
        logits = forward(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        correct.append((logits.detach().argmax(1) == y).sum())
        sizes.append(y.shape[0])
    if not losses:
        return TrainHistory()
    sizes_t = torch.tensor(sizes, dtype=torch.float32)
    return TrainHistory(torch.stack(losses).tolist(), (torch.stack(correct).cpu() / sizes_t).tolist())


def supermask_forward(model: nn.Module, scores: Masks, keep_frac: float | None = None) -> Forward:
    """x (B, ...) → logits (B, s) of the frozen ``model`` under W ⊙ M(scores), straight-through into the scores.

    M = 1[s ≥ 0] (``keep_frac=None``, fused kernel) or the top ``keep_frac`` of |s|.
    """
    params = maskable_parameters(model)

    def masked_weight(name: str) -> torch.Tensor:
        if keep_frac is None:
            return supermask_weight(params[name], scores[name])
        return params[name] * topk_supermask(scores[name], keep_frac)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return masked_forward(model, {name: masked_weight(name) for name in scores}, x)

    return forward


def train_supermask(model: nn.Module, stream: TaskStream, task: int, num_batches: int | None = 1000,
                    batch_size: int = 128, lr: float = 1e-4, seed: int = 0, keep_frac: float | None = None,
                    progress: bool = True) -> tuple[Masks, TrainHistory]:
    """Learn task ``task``'s supermask on the frozen ``model`` (the paper's GNu recipe by default).

    Scores s ~ U(±1/√fan_in) (seeded by ``seed``). The forward uses W ⊙ M with M = 1[s ≥ 0]
    (``keep_frac=None``, GNu) or M = top-``keep_frac`` of |s| (GG, edge-popup), and a straight-through
    gradient. RMSprop(lr) updates this task's scores only, for ``num_batches`` batches of ``batch_size``
    (None: one epoch). Returns the binary masks (bool, shaped like W) and the training history.
    """
    params = maskable_parameters(model)
    if any(p.requires_grad for p in params.values()):
        raise ValueError("the base network must be frozen (requires_grad=False); call signed_constant_ first")
    scores = init_scores(model, torch.Generator().manual_seed(seed))
    optimizer = torch.optim.RMSprop(scores.values(), lr=lr)
    forward = supermask_forward(model, scores, keep_frac)
    batches = stream.train_batches(task, batch_size, num_batches, seed)
    total = num_batches if num_batches is not None else -(-stream.num_train(task) // batch_size)
    history = fit(forward, scores.values(), optimizer, batches, total, progress, f"mask of task {task}")
    with torch.no_grad():
        masks = {n: (s >= 0) if keep_frac is None else topk_supermask(s, keep_frac) > 0 for n, s in scores.items()}
    return masks, history


def train_dense(model: nn.Module, stream: TaskStream, task: int, num_batches: int | None = 1000,
                batch_size: int = 128, lr: float = 1e-4, seed: int = 0, progress: bool = True) -> TrainHistory:
    """Ordinary training of all of ``model``'s weights on task ``task`` with RMSprop(lr), in place."""
    model.requires_grad_(True).train()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=lr)
    batches = stream.train_batches(task, batch_size, num_batches, seed)
    total = num_batches if num_batches is not None else -(-stream.num_train(task) // batch_size)
    history = fit(model, model.parameters(), optimizer, batches, total, progress, f"dense, task {task}")
    model.eval()
    return history


@torch.no_grad()
def predict(model: nn.Module, weights: dict[str, torch.Tensor] | None, x: torch.Tensor,
            batch_size: int = 2048) -> torch.Tensor:
    """Predicted labels (N,) of ``model`` with effective ``weights`` (None: its own) on x (N, ...)."""
    return torch.cat([masked_forward(model, weights, x[i:i + batch_size]).argmax(1)
                      for i in range(0, x.shape[0], batch_size)])


def evaluate(model: nn.Module, weights: dict[str, torch.Tensor] | None, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 2048) -> float:
    """Accuracy in [0, 1] of ``model`` with effective ``weights`` on (x (N, ...), y (N,))."""
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need as many labels as inputs (and at least one): {x.shape[0]} inputs, {y.shape[0]} labels")
    return (predict(model, weights, x, batch_size) == y).float().mean().item()
