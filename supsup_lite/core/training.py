"""Training: one loop for every trainer (supermasks of one task or K at once, dense weights), and evaluation.

Every trainer takes any iterable of batches (x (B, ...), y (B,)) — ``TaskStream.train_batches`` is one —
counts batches, takes its settings as keyword-only arguments, and returns a :class:`TrainResult`. The loop,
:func:`run_steps`, walks K iterables in lockstep and hands one stacked batch (K, B, ...) per step to a *step*;
a step computes the loss, its gradient and the update.

Supermask training (paper §3; the authors' ``main.py`` with ``--er-sparse-init`` off): task k's scores
s_k ~ U(±1/√fan_in), forward with W ⊙ M_k, M_k = 1[s_k ≥ 0] (GNu) or the top-``keep_frac`` of |s_k| (GG,
edge-popup), straight-through gradient ∂L/∂s_k = ∂L/∂(W ⊙ M_k) ⊙ W (times sign(s_k) for top-k), and
RMSprop(lr) on the scores. K tasks share the frozen W; the loss is Σ_k CE_k, so every task gets exactly its
own gradient, and RMSprop is elementwise, so K tasks at once take exactly the steps of K separate runs.
CE_k is a softmax over all s outputs (the paper); ``classes=c`` restricts it to the first c logits, the real
classes, so the s − c superfluous outputs get no gradient (an ablation: notebook 04 uses it to ask why GG
accuracy falls as s grows).
``keep_frac`` may also map each layer to its own fraction (e.g. the Erdős–Rényi budget of
``scenarios.resnet.er_densities``).

SupSup-Transfer (paper §3.2, "a running mean of all supermasks learned so far"; the authors'
``trainers/reinit.py`` with ``--reinit-adapt running_mean``): task t > 0 starts from the elementwise mean of the
real-valued *final scores* of tasks 0..t−1 instead of a random draw, s_t ← (1/t) Σ_{j<t} s_j (the authors then
rescale by ‖mean‖/‖mean‖ = 1, a no-op). ``train_bank(..., transfer=True)`` does this, one task after another;
``train_supermasks(start_scores=...)`` is the hook it uses.

Two steps compute this recipe, with the same masks bit for bit (tested against a plain autograd +
``torch.optim.RMSprop`` loop):

* ``_MLPMaskStep`` for the package's MLPs (Flatten, bias-free Linear and ReLU layers): a hand-written forward
  and backward (no input gradient for the first layer), RMSprop written out in place with the operations
  ``torch.optim.RMSprop`` uses, and every buffer allocated once, flat across layers so each elementwise
  operation is one call. Tasks run in chunks (``chunk``, default: one task at a time on CPU, where the
  state of one task stays in cache, and all K at once on a GPU, where one ``bmm`` over K replaces K launches).
* ``_AutogradMaskStep`` for any other network: ``batched_masked_forward`` with autograd and
  ``torch.optim.RMSprop`` over the stacked scores.
"""
from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import validation
from ..config import derive_seed
from ..data.mnist import Batch, TaskStream
from .masks import MaskBank, Masks, final_masks, init_scores, supermask_weight, topk_keep, topk_supermask
from .models import batched_masked_forward, maskable_parameters, masked_forward, output_size

Forward = Callable[[torch.Tensor], torch.Tensor]
RMSPROP_ALPHA, RMSPROP_EPS = 0.99, 1e-8  # torch.optim.RMSprop's defaults, as the authors use it


@dataclass
class TrainHistory:
    """Per-batch training loss and training-batch accuracy of one task."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)


@dataclass
class TrainResult:
    """What a trainer returns: one dict of bool masks per task (empty for dense training), one history per
    task, the wall-clock seconds of the training (the GPU synchronised), and, when asked for
    (``keep_scores=True``), each task's final real-valued scores (name → float tensor shaped like W)."""

    masks: list[Masks]
    history: list[TrainHistory]
    seconds: float
    scores: list[Masks] = field(default_factory=list)


class Step(Protocol):
    """One training step on K tasks: x (K, B, ...), y (K, B), valid (K, B) float or None (all real)
    → (per-task loss (K,), per-task correct predictions (K,)), both detached."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]: ...


# --- the loop -----------------------------------------------------------------------------------------------
def _lockstep(iterators: list[Iterator[Batch]]) -> Iterator[list[Batch | None]]:
    """One batch from every iterator per step (None for an ended one) until all have ended."""
    while True:
        step = [next(it, None) for it in iterators]
        if all(b is None for b in step):
            return
        yield step


def _stack_batches(batches: list[Batch | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One batch per task as (K, B, ...) inputs, (K, B) labels, and a (K, B) float ``valid`` mask.

    Ended streams (None) and shorter batches are zero-padded and ``valid`` marks the real examples; it is None
    when every batch is full (the common case). K = 1 adds a view, no copy.
    """
    sizes = [0 if b is None else b[1].shape[0] for b in batches]
    size = max(sizes)
    if all(s == size for s in sizes):
        if len(batches) == 1:
            return batches[0][0].unsqueeze(0), batches[0][1].unsqueeze(0), None
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(step: Step, batches_per_task: Sequence[Iterable[Batch]], *, progress: bool = True,
              description: str = "training", after_step: Callable[[int], None] | None = None) -> list[TrainHistory]:
    """THE training loop: one ``step`` per batch index over K iterables in lockstep; one history per iterable.

    A stream that ends early is padded (its ``valid`` rows are 0) and its history stops there.
    ``after_step(i)`` runs after step i (0-based), e.g. to advance a learning-rate schedule.
    """
    iterators = [iter(b) for b in batches_per_task]
    hints = [operator.length_hint(b, -1) for b in batches_per_task]
    total = max(hints) if min(hints) > 0 else None
    losses, correct, sizes = [], [], []
    for i, batches in enumerate(tqdm(_lockstep(iterators), total=total, disable=not progress, desc=description,
                                     leave=False)):
        x, y, valid = _stack_batches(batches)
        loss, right = step(x, y, valid)
        losses.append(loss)
        correct.append(right)
        sizes.append([0 if b is None else b[1].shape[0] for b in batches])
        if after_step is not None:
            after_step(i)
    if not losses:
        return [TrainHistory() for _ in batches_per_task]
    loss_t, correct_t = torch.stack(losses).cpu(), torch.stack(correct).cpu().float()
    sizes_t = torch.tensor(sizes, dtype=torch.float32)
    histories = []
    for k in range(len(batches_per_task)):
        real = sizes_t[:, k] > 0
        histories.append(TrainHistory(loss_t[real, k].tolist(), (correct_t[real, k] / sizes_t[real, k]).tolist()))
    return histories


def task_losses(logits: torch.Tensor, y: torch.Tensor, valid: torch.Tensor | None, *,
                classes: int | None = None) -> torch.Tensor:
    """CE_k, the mean cross-entropy of task k over its real examples (0 for a task without any).

    logits: (K, B, s), y: (K, B), valid: (K, B) or None (all real) → (K,). Σ_k CE_k is the loss of K tasks.
    ``classes=c``: CE over the first c logits only, −z_y + log Σ_{j<c} exp z_j, so ∂CE/∂z_j = 0 for j ≥ c;
    None: over all s.
    """
    if classes is not None:
        logits = logits[..., :classes]
    k, b = y.shape
    ce = F.cross_entropy(logits.reshape(k * b, -1), y.reshape(-1), reduction="none").view(k, b)
    if valid is None:
        return ce.mean(1)
    return (ce * valid).sum(1) / valid.sum(1).clamp(min=1.0)


def task_losses_and_logit_gradient(logits: torch.Tensor, y: torch.Tensor, valid: torch.Tensor | None, *,
                                   classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`task_losses` (K,) and ∂(Σ_k CE_k)/∂logits (K, B, s) without building a graph, bit for bit what
    autograd returns for them (the same kernels on the same operands, in the same order).

    ∂CE_k/∂z_b = w_b (softmax(z_b) − onehot(y_b)), w_b = 1/B (or valid_b / Σ_b valid_b), over the first
    ``classes`` logits (the others get 0): the log-softmax backward of the per-example weights −w_b at the labels.
    """
    k, b = y.shape
    losses = task_losses(logits, y, valid, classes=classes)
    used = logits if classes is None else logits[..., :classes]
    log_probs = torch.log_softmax(used.reshape(k * b, -1), 1)
    if valid is None:  # the per-example weights of the mean in task_losses, as its backward computes them
        weight = torch.ones(k, b, dtype=log_probs.dtype, device=log_probs.device) / b
    else:
        weight = (1.0 / valid.sum(1).clamp(min=1.0)).unsqueeze(1) * valid
    upstream = torch.zeros_like(log_probs).scatter_(1, y.reshape(-1, 1), -weight.reshape(-1, 1))
    grad = torch._log_softmax_backward_data(upstream, log_probs, 1, log_probs.dtype).view(k, b, -1)
    if classes is None:
        return losses, grad
    return losses, torch.nn.functional.pad(grad, (0, logits.shape[-1] - classes))


def _correct(logits: torch.Tensor, y: torch.Tensor, valid: torch.Tensor | None, *,
             classes: int | None = None) -> torch.Tensor:
    """Examples whose argmax over the first ``classes`` logits (None: all) is the label, per task: (K,)."""
    right = ((logits if classes is None else logits[..., :classes]).argmax(-1) == y).float()
    return (right if valid is None else right * valid).sum(-1)


def fit(forward: Forward, optimizer: torch.optim.Optimizer, batches: Iterable[Batch], *, progress: bool = True,
        description: str = "training", after_step: Callable[[int], None] | None = None) -> TrainHistory:
    """Minimise the cross-entropy of ``forward(x)`` (B, ...) → logits (B, s) against y (B,) over ``batches``,
    one ``optimizer`` step per batch, through :func:`run_steps`. Only the optimizer's parameters change. Every
    learning rate of ``optimizer`` must be a finite number > 0 (0, negative, inf or NaN would not train)."""
    for group in optimizer.param_groups:
        validation.positive_number("lr", group["lr"])

    def step(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = forward(x[0])
        loss = F.cross_entropy(logits, y[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach().view(1), _correct(logits.detach(), y[0], None).view(1)

    return run_steps(step, [batches], progress=progress, description=description, after_step=after_step)[0]


# --- masked weights -----------------------------------------------------------------------------------------
def stacked_scores(model: nn.Module, seeds: Sequence[int], *,
                   start: Sequence[Masks | None] | None = None) -> Masks:
    """Scores of K tasks stacked on a new first axis: name → leaf (K, *W.shape), requires_grad.

    Row k is bit for bit ``init_scores(model, torch.Generator().manual_seed(seeds[k]))``, or ``start[k]`` (a copy)
    when ``start`` is given and ``start[k]`` is not None.
    """
    start = [None] * len(seeds) if start is None else start
    per_task = [init_scores(model, torch.Generator().manual_seed(int(seed))) if given is None else given
                for seed, given in zip(seeds, start)]
    return {name: torch.stack([scores[name].detach() for scores in per_task]).requires_grad_(True)
            for name in per_task[0]}


def transfer_scores(final_scores: Sequence[Masks]) -> Masks:
    """SupSup-Transfer's start for the next task: the elementwise mean of earlier tasks' final scores.

    final_scores: t ≥ 1 dicts name → s_j (shaped like W) → name → (1/t) Σ_{j<t} s_j, summed in float64 in task
    order and rounded once to the scores' dtype (paper §3.2; the authors' ``trainers/reinit.py``, ``running_mean``).
    """
    if not final_scores:
        raise ValueError("transfer_scores needs the final scores of at least one earlier task, got none")
    out = {}
    for name, first in final_scores[0].items():
        total = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for scores in final_scores:
            total += scores[name].detach().double()
        out[name] = (total / len(final_scores)).to(first.dtype)
    return out


KeepFrac = float | Mapping[str, float] | None


def layer_fractions(names: Iterable[str], keep_frac: float | Mapping[str, float]) -> dict[str, float]:
    """``keep_frac`` per layer: one float for every layer, or a mapping that must name every layer, each value in
    (0, 1]. Raises ``ValueError`` naming the layer and the value otherwise."""
    names = list(names)
    if isinstance(keep_frac, Mapping):
        missing = [n for n in names if n not in keep_frac]
        if missing:
            raise ValueError(f"keep_frac maps layers to fractions but lacks {missing}; give one fraction for each "
                             f"of {names} (e.g. scenarios.resnet.er_densities(model, budget))")
        fracs = {n: keep_frac[n] for n in names}
    else:
        fracs = dict.fromkeys(names, keep_frac)
    for name, frac in fracs.items():
        if not 0.0 < validation.positive_number(f"keep_frac[{name!r}]", frac) <= 1.0:
            raise ValueError(f"keep_frac is the fraction of weights kept and must lie in (0, 1], got {frac} for "
                             f"{name!r}")
    return fracs


def masked_weights(model: nn.Module, scores: Masks, *, keep_frac: KeepFrac = None) -> dict[str, torch.Tensor]:
    """W ⊙ M(s) with the straight-through gradient into the scores, for one task or K stacked tasks.

    scores: name → s shaped like W (one task) or (K, *W.shape) (K tasks) → the same shapes.
    ``keep_frac=None``: M = 1[s ≥ 0] (fused kernel ``supermask_weight``, W broadcast over K); a float (or a
    float per layer name): M = the top ``keep_frac`` of |s| of each task and layer.
    """
    params = maskable_parameters(model)
    if keep_frac is None:
        return {name: supermask_weight(params[name], s) for name, s in scores.items()}
    fracs = layer_fractions(scores, keep_frac)
    out = {}
    for name, s in scores.items():
        mask = (topk_supermask(s, fracs[name]) if s.dim() == params[name].dim()
                else torch.stack([topk_supermask(s_k, fracs[name]) for s_k in s]))
        out[name] = params[name] * mask
    return out


# --- the two mask-training steps ----------------------------------------------------------------------------
def mlp_weights(model: nn.Module) -> list[torch.Tensor] | None:
    """The weights of ``model`` if it is an MLP the fast step handles — ``nn.Sequential`` of an optional leading
    Flatten, then bias-free Linear layers with a ReLU between consecutive ones — else None."""
    if not isinstance(model, nn.Sequential):
        return None
    layers = list(model)
    if layers and isinstance(layers[0], nn.Flatten):
        layers = layers[1:]
    if not layers or len(layers) % 2 == 0:
        return None
    for i, layer in enumerate(layers):
        expected = nn.Linear if i % 2 == 0 else nn.ReLU
        if type(layer) is not expected or (expected is nn.Linear and layer.bias is not None):
            return None
    return [layer.weight for layer in layers[::2]]


class _AutogradMaskStep:
    """Mask training on any network: autograd through ``batched_masked_forward`` and ``torch.optim.RMSprop``."""

    def __init__(self, model: nn.Module, seeds: Sequence[int], *, lr: float, keep_frac: KeepFrac,
                 classes: int | None, start: Sequence[Masks | None] | None = None) -> None:
        self.model, self.keep_frac, self.classes = model, keep_frac, classes
        self.scores = stacked_scores(model, seeds, start=start)
        self.optimizer = torch.optim.RMSprop(self.scores.values(), lr=lr, alpha=RMSPROP_ALPHA, eps=RMSPROP_EPS)

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = batched_masked_forward(self.model, masked_weights(self.model, self.scores,
                                                                   keep_frac=self.keep_frac), x)
        losses = task_losses(logits, y, valid, classes=self.classes)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.optimizer.step()
        return losses.detach(), _correct(logits.detach(), y, valid, classes=self.classes)

    def task_scores(self, k: int) -> Masks:
        return {name: s[k] for name, s in self.scores.items()}


class _MLPMaskStep:
    """Mask training on an MLP (``mlp_weights``): hand-written forward, backward and RMSprop, no allocations.

    Per layer l (W_l (o, i), E_l = W_l ⊙ M_l, h_0 = x, h_l = relu(h_{l−1} E_lᵀ), logits = h_{L−1} E_Lᵀ):
    backward dz_L = ∂ΣCE/∂logits (:func:`task_losses_and_logit_gradient`), ∂L/∂E_l = dz_lᵀ h_{l−1}, dz_{l−1} =
    relu'(h_{l−1}) ⊙ (dz_l E_l), no dz_0; g = ∂L/∂E ⊙ W (⊙ sign(s) for top-k); RMSprop: v ← αv + (1−α)g²,
    s ← s − lr·g / (√v + ε); then E ← W ⊙ M(s). The matmuls have the shapes and layouts autograd uses and the
    update the operations of ``torch.optim.RMSprop`` (single-tensor path), so the scores match bit for bit.
    All per-task state (s, v, E, ∂L/∂E and a copy of W) lives in flat buffers (layer-major, (K, o, i) views).
    """

    def __init__(self, model: nn.Module, weights: list[torch.Tensor], seeds: Sequence[int], *, lr: float,
                 keep_frac: KeepFrac, classes: int | None, start: Sequence[Masks | None] | None = None) -> None:
        self.names = list(maskable_parameters(model))
        self.lr, self.keep_frac, self.classes, self.k = lr, keep_frac, classes, len(seeds)
        self.fracs = None if keep_frac is None else list(layer_fractions(self.names, keep_frac).values())
        scores = stacked_scores(model, seeds, start=start)
        numels = [self.k * w.numel() for w in weights]
        first = weights[0]
        flat = lambda: torch.empty(sum(numels), dtype=first.dtype, device=first.device)  # noqa: E731
        self.s_flat, self.v_flat, self.e_flat, self.g_flat, self.d_flat, self.w_flat = (flat() for _ in range(6))
        self.v_flat.zero_()
        views = lambda buf: [chunk.view(self.k, *w.shape) for chunk, w in zip(buf.split(numels), weights)]  # noqa: E731
        self.s, self.e, self.g, self.w = views(self.s_flat), views(self.e_flat), views(self.g_flat), views(self.w_flat)
        with torch.no_grad():
            for l, (name, w) in enumerate(zip(self.names, weights)):
                self.s[l].copy_(scores[name])
                self.w[l].copy_(w.expand_as(self.w[l]))
        self.weights = weights
        # one task: 2-d views of its E_l and ∂L/∂E_l, made once (mm instead of bmm, no per-step selects)
        self.e_1 = [e[0] for e in self.e] if self.k == 1 else None
        self.g_1 = [g[0] for g in self.g] if self.k == 1 else None
        self._refresh_masked_weights()

    def _refresh_masked_weights(self) -> None:
        """E = W ⊙ M(s) for every task and layer."""
        if self.keep_frac is None:
            torch.ge(self.s_flat, 0, out=self.d_flat)
            torch.mul(self.w_flat, self.d_flat, out=self.e_flat)
            return
        for s, e, w, frac in zip(self.s, self.e, self.weights, self.fracs):
            for k in range(self.k):
                torch.mul(w, topk_keep(s[k].abs(), frac), out=e[k])

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        single = self.k == 1  # one task: the same products as 2-d mm on (B, ·) views
        h = x.reshape(x.shape[1], -1) if single else x.reshape(self.k, x.shape[1], -1)
        hidden = [h]  # h_0 .. h_{L-1}
        last = len(self.e) - 1
        for l in range(last + 1):
            z = torch.mm(h, self.e_1[l].t()) if single else torch.bmm(h, self.e[l].transpose(1, 2))
            h = z if l == last else z.relu_()
            if l < last:
                hidden.append(h)
        logits = h.unsqueeze(0) if single else h
        losses, dz = task_losses_and_logit_gradient(logits, y, valid, classes=self.classes)
        dz = dz[0] if single else dz
        for l in range(last, -1, -1):
            if single:
                torch.mm(dz.t(), hidden[l], out=self.g_1[l])
            else:
                torch.bmm(dz.transpose(1, 2), hidden[l], out=self.g[l])
            if l > 0:
                dh = torch.mm(dz, self.e_1[l]) if single else torch.bmm(dz, self.e[l])
                dz = torch.ops.aten.threshold_backward(dh, hidden[l], 0)
        g, v, d = self.g_flat, self.v_flat, self.d_flat
        g.mul_(self.w_flat)
        if self.keep_frac is not None:
            g.mul_(torch.sgn(self.s_flat, out=d))
        v.mul_(RMSPROP_ALPHA).addcmul_(g, g, value=1 - RMSPROP_ALPHA)
        torch.sqrt(v, out=d).add_(RMSPROP_EPS)
        self.s_flat.addcdiv_(g, d, value=-self.lr)
        self._refresh_masked_weights()
        return losses, _correct(logits, y, valid, classes=self.classes)

    def task_scores(self, k: int) -> Masks:
        return {name: s[k] for name, s in zip(self.names, self.s)}


# --- trainers -----------------------------------------------------------------------------------------------
def _check_frozen(model: nn.Module) -> dict[str, nn.Parameter]:
    params = maskable_parameters(model)
    if not params:
        raise ValueError("the model has no maskable (Linear/Conv2d) weights")
    if any(p.requires_grad for p in params.values()):
        raise ValueError("the base network must be frozen (requires_grad=False); call signed_constant_ first")
    return params


def _check_trained(histories: Sequence[TrainHistory], first: int = 0) -> None:
    """Refuse a task whose iterable gave no batch: its result would be the untrained start, reported as trained."""
    empty = [first + k for k, history in enumerate(histories[first:]) if not history.loss]
    if empty:
        raise ValueError(f"the batches of task(s) {empty} gave no batch, so nothing was trained; give at least "
                         f"one batch (e.g. num_batches ≥ 1)")


def train_supermasks(model: nn.Module, batches_per_task: Sequence[Iterable[Batch]], *, seeds: Sequence[int],
                     lr: float = 1e-4, keep_frac: KeepFrac = None, chunk: int | None = None,
                     classes: int | None = None, start_scores: Sequence[Masks | None] | None = None,
                     keep_scores: bool = False, progress: bool = True) -> TrainResult:
    """Learn the supermasks of K tasks at once on the frozen ``model``; task k sees ``batches_per_task[k]``.

    Task k's scores start from ``init_scores`` seeded with ``seeds[k]``, or from ``start_scores[k]`` when that is
    given and not None (SupSup-Transfer, :func:`transfer_scores`; shaped like the weights). ``keep_frac``: None
    for M = 1[s ≥ 0], else the kept fraction of |s| (one float, or one per layer name). ``keep_scores=True``
    also returns each task's final real-valued scores (``result.scores``). Each task's masks equal a
    :func:`train_supermask` run on its own batches and seed, bit for bit (with ``chunk`` > 1 on one CPU thread
    only: on several, the batched matmul may split its sums differently from the single one, so the last bits
    of a score, and rarely a mask bit, can differ). ``chunk`` tasks step together (one batched matmul); the
    chunks run one after another. Default: 1 on CPU (one task's state stays in cache),
    all K on a GPU. Iterables of unequal length are padded: an ended task's scores stay put. ``classes=c``: the
    loss and the history's accuracy use only the first c logits (:func:`task_losses`), so the mask rows of the
    other outputs keep their initial 1[s₀ ≥ 0]; None (the paper): all s outputs.
    Memory: about 6 float tensors of (chunk, *W.shape) per layer.

    Returns one dict of bool masks (shaped like W) and one history per task, in order, and the seconds.
    """
    params = _check_frozen(model)
    seeds = [validation.integer(f"seeds[{k}]", s) for k, s in enumerate(seeds)]
    if len(batches_per_task) == 0:
        raise ValueError("batches_per_task is empty: give at least one task's batches")
    if len(seeds) != len(batches_per_task):
        raise ValueError(f"need one seed per task: {len(batches_per_task)} tasks, {len(seeds)} seeds")
    lr = validation.positive_number("lr", lr)
    if keep_frac is not None:
        if not isinstance(keep_frac, Mapping) and not 0.0 < validation.positive_number("keep_frac", keep_frac) <= 1.0:
            raise ValueError(f"keep_frac is the fraction of weights kept and must lie in (0, 1], got {keep_frac}")
        layer_fractions(params, keep_frac)
    start_scores = _check_start_scores(params, start_scores, len(seeds))
    outputs = output_size(model)
    classes = validation.optional_integer(f"classes (logits in the loss, of the model's {outputs})", classes,
                                          minimum=1)
    if classes is not None and classes > outputs:
        raise ValueError(f"classes={classes} exceeds the model's {outputs} outputs; give 1..{outputs}, or None to "
                         f"use all of them")
    device = next(iter(params.values())).device
    chunk = validation.optional_integer("chunk (tasks stepped together)", chunk, minimum=1)
    if chunk is None:
        chunk = len(seeds) if device.type == "cuda" else 1
    weights = mlp_weights(model)
    masks, histories, finals = [], [], []
    _sync(device)
    start = time.perf_counter()
    for first in range(0, len(seeds), chunk):
        part = slice(first, first + chunk)
        step = (_MLPMaskStep(model, weights, seeds[part], lr=lr, keep_frac=keep_frac, classes=classes,
                             start=start_scores[part])
                if weights is not None
                else _AutogradMaskStep(model, seeds[part], lr=lr, keep_frac=keep_frac, classes=classes,
                                       start=start_scores[part]))
        count = len(seeds[part])
        description = f"{count} mask{'s' if count > 1 else ''}" + (f" from task {first}" if len(seeds) > 1 else "")
        histories += run_steps(step, batches_per_task[part], progress=progress, description=description)
        _check_trained(histories, first)
        masks += [final_masks(step.task_scores(k), keep_frac=keep_frac) for k in range(count)]
        if keep_scores:
            finals += [{name: s.detach().clone() for name, s in step.task_scores(k).items()} for k in range(count)]
    _sync(device)
    return TrainResult(masks, histories, time.perf_counter() - start, finals)


def _check_start_scores(params: dict[str, nn.Parameter], start_scores: Sequence[Masks | None] | None,
                        tasks: int) -> list[Masks | None]:
    """``start_scores`` as a list of one entry per task (None: the seeded init), each checked to hold a finite
    float tensor shaped like every maskable weight, on its device."""
    if start_scores is None:
        return [None] * tasks
    if len(start_scores) != tasks:
        raise ValueError(f"start_scores needs one entry per task (None for the seeded init): {tasks} tasks, "
                         f"{len(start_scores)} entries")
    for k, scores in enumerate(start_scores):
        if scores is None:
            continue
        if set(scores) != set(params):
            raise ValueError(f"start_scores[{k}] must hold exactly the maskable weights {list(params)}, got "
                             f"{list(scores)}")
        for name, s in scores.items():
            w = params[name]
            if s.shape != w.shape or s.dtype != w.dtype or s.device != w.device or not bool(torch.isfinite(s).all()):
                raise ValueError(f"start_scores[{k}][{name!r}] must be finite {w.dtype} {tuple(w.shape)} on "
                                 f"{w.device} like the weight, got {s.dtype} {tuple(s.shape)} on {s.device}"
                                 f"{'' if bool(torch.isfinite(s).all()) else ' with NaN or inf'}")
    return list(start_scores)


def train_supermask(model: nn.Module, batches: Iterable[Batch], *, seed: int, lr: float = 1e-4,
                    keep_frac: KeepFrac = None, classes: int | None = None, start_scores: Masks | None = None,
                    keep_scores: bool = False, progress: bool = True) -> TrainResult:
    """Learn one task's supermask on the frozen ``model`` from ``batches`` (the paper's GNu recipe by default:
    M = 1[s ≥ 0], RMSprop 1e-4; e.g. ``stream.train_batches(task, 128, 1000, seed)``). Scores are seeded with
    ``seed`` unless ``start_scores`` is given; ``keep_frac`` switches to the top-k rule (one float, or one per
    layer); ``classes`` restricts the loss to the first logits (see :func:`train_supermasks`); ``keep_scores``
    also returns the final scores. ``result.masks[0]``: bool masks shaped like W."""
    return train_supermasks(model, [batches], seeds=[seed], lr=lr, keep_frac=keep_frac, classes=classes,
                            start_scores=[start_scores], keep_scores=keep_scores, progress=progress)


def train_bank(model: nn.Module, stream: TaskStream, *, num_tasks: int, bank: MaskBank | None = None, k: int = 10,
               num_batches: int | None = 1000, batch_size: int = 128, lr: float = 1e-4,
               keep_frac: KeepFrac = None, classes: int | None = None, transfer: bool = False, seed: int = 0,
               progress: bool = True) -> MaskBank:
    """Fill a ``MaskBank`` with the masks of tasks 0..num_tasks−1, ``k`` tasks per :func:`train_supermasks` call.

    Task t's scores are seeded with ``derive_seed(seed, t, "scores")`` and its batches (``num_batches`` of
    ``batch_size``; None: one epoch) with ``derive_seed(seed, t, "batches")``, so the bank does not depend on
    ``k``. ``classes`` restricts the loss to the first logits (see :func:`train_supermasks`). A new bank is made
    for ``model`` and ``stream`` (both fingerprinted in it) unless ``bank`` is given: then it must fit both, and it
    is filled from task ``len(bank)`` on, which resumes an interrupted run. Returns it.

    ``transfer=True`` is SupSup-Transfer: task t > 0 starts from :func:`transfer_scores` of tasks 0..t−1's final
    scores (task 0 from its seeded draw), so the tasks train one after another (``k`` must be 1), and a bank
    that already holds tasks cannot be resumed (it keeps binary masks, not the scores the mean needs).
    """
    k = validation.integer("k (tasks trained at once)", k, minimum=1)
    if not 1 <= validation.integer("num_tasks", num_tasks) <= stream.num_tasks:
        raise ValueError(f"num_tasks must lie in 1..{stream.num_tasks} (the stream's tasks), got {num_tasks}")
    num_batches = validation.optional_integer("num_batches", num_batches, minimum=1)
    batch_size = validation.integer("batch_size", batch_size, minimum=1)
    seed = validation.integer("seed", seed)
    lr = validation.positive_number("lr", lr)
    if bank is None:
        bank = MaskBank.for_model(model, stream=stream)
    else:
        bank.check_compatible(model)
        bank.check_stream(stream)
    if transfer and k != 1:
        raise ValueError(f"transfer=True trains task t from the final scores of tasks 0..t−1, one task after "
                         f"another: pass k=1, got k={k}")
    if transfer and len(bank):
        raise ValueError(f"transfer=True cannot resume a bank that holds {len(bank)} task(s): the running mean "
                         f"needs their final real-valued scores, which a bank does not keep; train from task 0")
    finals: list[Masks] = []
    todo = list(range(len(bank), num_tasks))
    with tqdm(total=len(todo), disable=not progress, desc="mask bank", unit="task") as bar:
        for first in range(0, len(todo), k):
            tasks = todo[first:first + k]
            batches = [stream.train_batches(t, batch_size, num_batches, derive_seed(seed, t, "batches"))
                       for t in tasks]
            start = [transfer_scores(finals) if transfer and finals else None for _ in tasks]
            result = train_supermasks(model, batches, seeds=[derive_seed(seed, t, "scores") for t in tasks], lr=lr,
                                      keep_frac=keep_frac, classes=classes, start_scores=start,
                                      keep_scores=transfer, progress=progress)
            finals += result.scores
            for task_masks in result.masks:
                bank.append(task_masks)
            bar.update(len(tasks))
    return bank


def train_dense(model: nn.Module, batches: Iterable[Batch], *, lr: float = 1e-4, progress: bool = True,
                description: str = "dense training") -> TrainResult:
    """Ordinary training of all of ``model``'s weights with RMSprop(lr), in place, one step per batch.
    Returns a result without masks (the history of the one task, the seconds)."""
    lr = validation.positive_number("lr", lr)
    model.requires_grad_(True).train()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=lr)
    device = next(model.parameters()).device
    _sync(device)
    start = time.perf_counter()
    try:
        history = fit(model, optimizer, batches, progress=progress, description=description)
    finally:
        model.eval()
    _sync(device)
    _check_trained([history])
    return TrainResult([], [history], time.perf_counter() - start)


# --- evaluation ---------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: nn.Module, weights: dict[str, torch.Tensor] | None, x: torch.Tensor,
            batch_size: int = 2048, *, classes: int | None = None) -> torch.Tensor:
    """Predicted labels (N,) of ``model`` with effective ``weights`` (None: its own) on x (N, ...): a batch of
    finite images the model takes (``validation.images``). The argmax runs over all s logits, or over the first
    ``classes`` (the real classes, e.g. for masks trained with ``classes``)."""
    validation.images(model, x)
    batch_size = validation.integer("batch_size", batch_size, minimum=1)
    outputs = output_size(model)
    if classes is not None and not 1 <= validation.integer("classes", classes) <= outputs:
        raise ValueError(f"classes={classes} must lie in 1..{outputs} (the model's outputs), or be None for all")
    return torch.cat([masked_forward(model, weights, x[i:i + batch_size])[:, :classes].argmax(1)
                      for i in range(0, x.shape[0], batch_size)])


def evaluate(model: nn.Module, weights: dict[str, torch.Tensor] | None, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 2048, *, classes: int | None = None) -> float:
    """Accuracy in [0, 1] of ``model`` with effective ``weights`` on (x (N, ...), y (N,)): x a batch of finite
    images the model takes, y int64 class indices below the model's output size (``validation.labels``);
    ``classes``: the argmax over the first logits only (see :func:`predict`)."""
    validation.labels(model, y, validation.images(model, x).shape[0])
    return (predict(model, weights, x, batch_size, classes=classes) == y).float().mean().item()
