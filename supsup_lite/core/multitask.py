"""Train the supermasks of K tasks in one pass over a shared frozen base network.

Every task t has its own scores s_t and its own batches, but all tasks share the frozen weights W. Stacking
the K score tensors into one (K, *W.shape) tensor turns K small forward passes into one batched pass:

    logits_k = f(x_k, W ⊙ M_k),   M_k = 1[s_k ≥ 0] (or top-k of |s_k|),   k = 1..K

computed by ``torch.func.vmap`` over ``functional_call`` (a batched matmul ``bmm`` over the (K, out, in) stack
of W ⊙ M_k for a linear layer, a grouped convolution for a conv layer). The loss is Σ_k CE_k, so ∂loss/∂s_k is
exactly task k's own gradient; RMSprop is elementwise, so one RMSprop over the stacked scores takes exactly
the steps of K separate optimisers. The masks therefore equal K sequential ``train_supermask`` runs on the
same batches and seeds, up to float rounding in the batched matmuls (tested in ``tests/test_multitask.py``).
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from ..data.mnist import Batch, TaskStream
from .masks import MaskBank, Masks, init_scores, supermask_weight, topk_supermask
from .models import maskable_parameters

StackedScores = dict[str, torch.Tensor]


def task_seed(task: int, seed: int = 0) -> int:
    """The seed task ``task`` trains with (score init and batch order): ``seed + task``."""
    return seed + task


def stacked_scores(model: nn.Module, seeds: Sequence[int]) -> StackedScores:
    """Scores of K tasks stacked on a new first axis: name → leaf (K, *W.shape), requires_grad.

    Row k is bit for bit ``init_scores(model, torch.Generator().manual_seed(seeds[k]))``.
    """
    per_task = [init_scores(model, torch.Generator().manual_seed(seed)) for seed in seeds]
    return {name: torch.stack([scores[name].detach() for scores in per_task]).requires_grad_(True)
            for name in per_task[0]}


def stacked_masked_weights(model: nn.Module, scores: StackedScores,
                           keep_frac: float | None = None) -> dict[str, torch.Tensor]:
    """W ⊙ M_k for every task k: name → (K, *W.shape), straight-through gradient into the scores.

    ``keep_frac=None``: M_k = 1[s_k ≥ 0] (fused kernel, W broadcast over K); a float: M_k = top-``keep_frac``
    of |s_k|, chosen per task.
    """
    params = maskable_parameters(model)
    if keep_frac is None:
        return {name: supermask_weight(params[name], s) for name, s in scores.items()}
    return {name: params[name] * torch.stack([topk_supermask(s_k, keep_frac) for s_k in s])
            for name, s in scores.items()}


def batched_forward(model: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """K forwards in one: logits[k] = model(x[k]) with ``weights[name][k]`` swapped in.

    weights: name → (K, *shape); x: (K, B, ...) → logits (K, B, s). K = 1 skips ``vmap`` (same values, less
    per-call overhead).
    """
    if x.shape[0] == 1:
        return functional_call(model, {name: w[0] for name, w in weights.items()}, (x[0],)).unsqueeze(0)
    return vmap(lambda w, xb: functional_call(model, w, (xb,)))(weights, x)


def _stack_batches(batches: list[Batch | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Stack one batch per task into (K, B, ...) inputs and (K, B) labels.

    Tasks whose stream has ended (None) or whose batch is shorter are zero-padded; the returned (K, B) float
    ``valid`` marks real examples (None when every batch is full, the common case).
    """
    sizes = [0 if b is None else b[1].shape[0] for b in batches]
    size = max(sizes)
    if all(s == size for s in sizes):
        return torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches]), None
    x_like, y_like = next(b for b in batches if b is not None)
    x = x_like.new_zeros((len(batches), size, *x_like.shape[1:]))
    y = y_like.new_zeros((len(batches), size))
    valid = torch.zeros(len(batches), size, device=x.device)
    for k, batch in enumerate(batches):
        if batch is not None:
            x[k, :sizes[k]], y[k, :sizes[k]] = batch
            valid[k, :sizes[k]] = 1.0
    return x, y, valid


def summed_task_losses(logits: torch.Tensor, y: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Σ_k CE_k, CE_k the mean cross-entropy of task k over its real examples (0 for a task without any).

    logits: (K, B, s), y: (K, B), valid: (K, B) or None (all real) → scalar.
    """
    k, b = y.shape
    ce = F.cross_entropy(logits.reshape(k * b, -1), y.reshape(-1), reduction="none").view(k, b)
    if valid is None:
        return ce.mean(1).sum()
    return ((ce * valid).sum(1) / valid.sum(1).clamp(min=1.0)).sum()


def _lockstep(iterators: list[Iterator[Batch]]) -> Iterator[list[Batch | None]]:
    """One batch from every iterator per step (None for an ended one) until all have ended."""
    while True:
        step = [next(it, None) for it in iterators]
        if all(b is None for b in step):
            return
        yield step


def _check_inputs(model: nn.Module, stream: TaskStream, tasks: Sequence[int], seeds: Sequence[int],
                  num_batches: int | None) -> None:
    params = maskable_parameters(model)
    if not params:
        raise ValueError("the model has no maskable (Linear/Conv2d) weights")
    if any(p.requires_grad for p in params.values()):
        raise ValueError("the base network must be frozen (requires_grad=False); call signed_constant_ first")
    if len(tasks) == 0:
        raise ValueError("tasks is empty: give at least one task to train")
    if len(seeds) != len(tasks):
        raise ValueError(f"need one seed per task: {len(tasks)} tasks, {len(seeds)} seeds")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be ≥ 1 or None (one epoch), got {num_batches}")
    model_device = next(iter(params.values())).device
    if torch.device(stream.device) != model_device:
        raise ValueError(f"the stream's data is on {stream.device} but the model is on {model_device}; "
                         f"build both on the same device")
    for task in tasks:
        stream.check_task(task)


def train_masks_at_once(model: nn.Module, stream: TaskStream, tasks: Sequence[int], num_batches: int | None = 1000,
                        batch_size: int = 128, lr: float = 1e-4, seeds: Sequence[int] | None = None,
                        keep_frac: float | None = None, progress: bool = True) -> list[Masks]:
    """Learn the supermasks of ``tasks`` together, one batched step per batch index.

    Same recipe and result as ``[train_supermask(model, stream, t, num_batches, batch_size, lr, seed=s,
    keep_frac=keep_frac)[0] for t, s in zip(tasks, seeds)]`` (``seeds`` default: ``task_seed(t)`` = t): task
    k's scores are initialised from ``seeds[k]`` and see exactly the batches
    ``stream.train_batches(tasks[k], batch_size, num_batches, seeds[k])``. Streams of unequal length (e.g.
    SplitMNIST with ``num_batches=None``) are padded; a finished task gets zero gradient, which leaves its
    RMSprop step at exactly zero. Memory grows with K: about 4 float tensors of (K, *W.shape) per layer.

    Returns one dict of bool masks (shaped like W) per task, in the order of ``tasks``.
    """
    tasks = [int(t) for t in tasks]
    seeds = [task_seed(t) for t in tasks] if seeds is None else [int(s) for s in seeds]
    _check_inputs(model, stream, tasks, seeds, num_batches)
    scores = stacked_scores(model, seeds)
    optimizer = torch.optim.RMSprop(scores.values(), lr=lr)
    iterators = [stream.train_batches(t, batch_size, num_batches, s) for t, s in zip(tasks, seeds)]
    total = num_batches if num_batches is not None else max(math.ceil(stream.num_train(t) / batch_size)
                                                            for t in tasks)
    description = f"{len(tasks)} mask{'s' if len(tasks) > 1 else ''} at once"
    for batches in tqdm(_lockstep(iterators), total=total, disable=not progress, desc=description, leave=False):
        x, y, valid = _stack_batches(batches)
        logits = batched_forward(model, stacked_masked_weights(model, scores, keep_frac), x)
        loss = summed_task_losses(logits, y, valid)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        if keep_frac is None:
            return [{name: s[k] >= 0 for name, s in scores.items()} for k in range(len(tasks))]
        return [{name: topk_supermask(s[k], keep_frac) > 0 for name, s in scores.items()} for k in range(len(tasks))]


def output_size(model: nn.Module) -> int:
    """Outputs of the last maskable layer (the head of every network in this package)."""
    return list(maskable_parameters(model).values())[-1].shape[0]


def train_bank(model: nn.Module, stream: TaskStream, num_tasks: int, k: int = 10, num_batches: int | None = 1000,
               batch_size: int = 128, lr: float = 1e-4, keep_frac: float | None = None, seed: int = 0,
               arch: str = "model", base_seed: int = 0, bank: MaskBank | None = None,
               progress: bool = True) -> MaskBank:
    """Fill a ``MaskBank`` with the masks of tasks 0..num_tasks−1, ``k`` tasks at a time.

    Task t trains with seed ``task_seed(t, seed)``, so the bank does not depend on ``k``. A new bank is
    made for ``model`` (``arch``, ``base_seed`` recorded in it) unless ``bank`` is given: then it is filled
    from task ``len(bank)`` on, which resumes an interrupted run. Returns the bank.
    """
    if k < 1:
        raise ValueError(f"k (tasks trained at once) must be ≥ 1, got {k}")
    if not 1 <= num_tasks <= stream.num_tasks:
        raise ValueError(f"num_tasks must lie in 1..{stream.num_tasks} (the stream's tasks), got {num_tasks}")
    if bank is None:
        bank = MaskBank.for_model(model, stream=stream)
    else:
        bank.check_compatible(model)
        bank.check_stream(stream)
    todo = list(range(len(bank), num_tasks))
    with tqdm(total=len(todo), disable=not progress, desc="mask bank", unit="task") as bar:
        for start in range(0, len(todo), k):
            chunk = todo[start:start + k]
            masks = train_masks_at_once(model, stream, chunk, num_batches, batch_size, lr,
                                        [task_seed(t, seed) for t in chunk], keep_frac, progress)
            for task_masks in masks:
                bank.append(task_masks)
            bar.update(len(chunk))
    return bank
