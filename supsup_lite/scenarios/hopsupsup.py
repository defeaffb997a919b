"""HopSupSup [P §3.5]: one binary mask per hidden *neuron* per task, stored in Hopfield networks and
recovered at test time without the task id.

The network is the authors' BNNet (``models/small.py``): 784 → 2048 → 2048 → 10, frozen signed-constant weights,
no biases; after each hidden layer a BatchNorm without affine parameters that always uses the batch's
statistics, then the task's neuron mask m ∈ {0, 1}^d, then Swish. (The authors pass m as the BN weight;
BN(z)·m followed by Swish is the same thing, and since Swish(0) = 0 it equals masking the layer's output.)

Masks are data, as in the rest of the package: ``BNNet.forward(x, masks)`` takes one (d,) mask per hidden
layer. Each layer's masks live in its own Hopfield network (``supsup_lite.hopfield``) as x = 2m − 1, and a
mask is recovered by gradient descent on a real score vector s (mask 1[s ≥ 0], straight-through gradient):
one SGD step per unlabeled test batch t = 1..T on

    L_t = (1 − t/T) · H(f(x_t; m)) + γ · (t/T) · Σ_layers −½ (2m − 1)ᵀ W (2m − 1),

starting from the mean of the stored patterns (γ = 1.5e-3, lr 500, momentum 0.9, weight decay 1e-4).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import derive_seed, resolve_device
from ..core.inference import entropy
from ..core.masks import threshold_supermask
from ..core.models import signed_constant_
from ..core.training import TrainHistory, fit
from ..data.mnist import TaskStream
from .hopfield import Rule, energy, store, to_bipolar

NeuronMasks = list[torch.Tensor]  # one (d_l,) tensor per hidden layer


# -------------------------------------------------------------------------------------------------- network
class BNNet(nn.Module):
    """784 → width → width → outputs; hidden layer: Linear (no bias) → BN (non-affine, batch stats) → ⊙ m → Swish."""

    def __init__(self, width: int = 2048, num_inputs: int = 784, num_outputs: int = 10) -> None:
        super().__init__()
        if width < 1 or num_inputs < 1 or num_outputs < 1:
            raise ValueError(f"sizes must be ≥ 1, got width={width}, num_inputs={num_inputs}, "
                             f"num_outputs={num_outputs}")
        self.hidden = nn.ModuleList([nn.Linear(num_inputs, width, bias=False), nn.Linear(width, width, bias=False)])
        self.head = nn.Linear(width, num_outputs, bias=False)

    @property
    def mask_sizes(self) -> list[int]:
        """Neurons per masked layer, [d_1, d_2]."""
        return [layer.out_features for layer in self.hidden]

    def check_masks(self, masks: Sequence[torch.Tensor]) -> None:
        """Raise ValueError unless ``masks`` holds one (d_l,) tensor per hidden layer."""
        shapes = [tuple(m.shape) for m in masks]
        if shapes != [(d,) for d in self.mask_sizes]:
            raise ValueError(f"need one neuron mask per hidden layer with shapes {[(d,) for d in self.mask_sizes]}, "
                             f"got {shapes}")

    def forward(self, x: torch.Tensor, masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """x: (B, 784), B ≥ 2 (batch statistics); masks: one (d_l,) float tensor per hidden layer → logits (B, 10)."""
        self.check_masks(masks)
        if x.shape[0] < 2:
            raise ValueError(f"BNNet normalises with batch statistics and needs at least 2 images, got {x.shape[0]}")
        for layer, mask in zip(self.hidden, masks):
            x = F.silu(F.batch_norm(layer(x), None, None, training=True) * mask)
        return self.head(x)


def frozen_bnnet(width: int = 2048, seed: int = 0, device: torch.device | str | None = None) -> BNNet:
    """A BNNet with signed-constant weights ±√(2/fan_in) drawn from ``torch.Generator().manual_seed(seed)``, frozen."""
    model = BNNet(width)
    signed_constant_(model, torch.Generator().manual_seed(seed))
    model.arch, model.base_seed = "bnnet", seed
    return model.to(resolve_device(device))


def all_ones(model: BNNet) -> NeuronMasks:
    """The mask that keeps every neuron (what zero-initialised scores give)."""
    device = model.head.weight.device
    return [torch.ones(d, device=device) for d in model.mask_sizes]


# ------------------------------------------------------------------------------------------------- training
def train_neuron_masks(model: BNNet, stream: TaskStream, task: int, num_batches: int | None = None,
                       batch_size: int = 128, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4,
                       seed: int = 0, progress: bool = True) -> tuple[NeuronMasks, TrainHistory]:
    """Learn task ``task``'s neuron masks with its id (the authors' recipe: scores start at 0, i.e. all neurons on).

    SGD(lr, momentum, weight_decay) on the scores s_l (d_l,) with m_l = 1[s_l ≥ 0] and a straight-through
    gradient, cross-entropy over the 10 outputs, ``num_batches`` batches (None: one epoch, the paper's).
    Batches are seeded with ``derive_seed(seed, task, "batches")``. Returns the masks (bool (d_l,) per layer)
    and the per-batch history.
    """
    device = model.head.weight.device
    scores = [torch.zeros(d, device=device, requires_grad=True) for d in model.mask_sizes]
    optimizer = torch.optim.SGD(scores, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x, [threshold_supermask(s) for s in scores])

    batches = stream.train_batches(task, batch_size, num_batches, derive_seed(seed, task, "batches"))
    history = fit(forward, optimizer, batches, progress=progress, description=f"neuron masks of task {task}")
    return [s.detach() >= 0 for s in scores], history


@torch.no_grad()
def evaluate_neuron_masks(model: BNNet, masks: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                          batch_size: int = 64) -> float:
    """Accuracy of ``model`` with ``masks`` on (x (N, 784), y (N,)), in batches of ``batch_size`` taken in order.

    BN uses each batch's statistics, so the batch size is part of the protocol (the authors test with 64);
    a last batch of one image is merged into the one before it.
    """
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"need as many labels as images and at least 2 images: {x.shape[0]} images, "
                         f"{y.shape[0]} labels")
    masks = [m.float() for m in masks]
    correct = sum(int((model(xb, masks).argmax(1) == yb).sum())
                  for xb, yb in zip(split_batches(x, batch_size), split_batches(y, batch_size)))
    return correct / x.shape[0]


def split_batches(x: torch.Tensor, batch_size: int = 64) -> list[torch.Tensor]:
    """``x`` cut into consecutive batches of ``batch_size``; a last batch of one row joins the previous one."""
    if batch_size < 2:
        raise ValueError(f"batch_size must be ≥ 2 (batch statistics), got {batch_size}")
    parts = list(x.split(batch_size))
    if len(parts) > 1 and parts[-1].shape[0] == 1:
        parts[-2:] = [torch.cat(parts[-2:])]
    return parts


# ---------------------------------------------------------------------------------------------------- memory
class HopfieldMaskMemory:
    """One Hopfield network per masked layer, W_l (d_l, d_l), plus the running mean of the stored patterns.

    ``store`` adds one task's masks as x_l = 2m_l − 1 with ``rule`` (default: the authors' simplified Storkey
    rule). The mean pattern (d_l,) is where recovery starts (the authors average the stored masks; a running
    mean keeps the memory's size independent of the number of tasks).
    """

    def __init__(self, sizes: Sequence[int], rule: Rule = "simplified_storkey",
                 device: torch.device | str | None = None) -> None:
        self.rule = rule
        self.device = resolve_device(device)
        self.weights = [torch.zeros(d, d, device=self.device) for d in sizes]
        self.pattern_sum = [torch.zeros(d, device=self.device) for d in sizes]
        self.num_stored = 0

    @property
    def sizes(self) -> list[int]:
        return [W.shape[0] for W in self.weights]

    def store(self, masks: Sequence[torch.Tensor]) -> int:
        """Add one task's neuron masks ({0, 1} or bool, (d_l,) per layer); returns the task's index."""
        if [tuple(m.shape) for m in masks] != [(d,) for d in self.sizes]:
            raise ValueError(f"need one mask per layer with shapes {[(d,) for d in self.sizes]}, "
                             f"got {[tuple(m.shape) for m in masks]}")
        for layer, mask in enumerate(masks):
            x = to_bipolar(mask.to(self.device))
            self.weights[layer] = store(x.unsqueeze(0), self.rule, self.weights[layer])
            self.pattern_sum[layer] += x
        self.num_stored += 1
        return self.num_stored - 1

    def mean_pattern(self) -> list[torch.Tensor]:
        """Mean of the stored bipolar patterns per layer (d_l,), entries in [−1, 1]."""
        if self.num_stored == 0:
            raise ValueError("the memory is empty: store at least one task's masks first")
        return [p / self.num_stored for p in self.pattern_sum]

    def energy(self, patterns: Sequence[torch.Tensor]) -> torch.Tensor:
        """Σ_l −½ x_lᵀ W_l x_l for one (d_l,) pattern per layer (differentiable) → scalar."""
        return sum(energy(W, x) for W, x in zip(self.weights, patterns))

    @property
    def nbytes(self) -> int:
        """Bytes held: the float32 Hopfield matrices and mean patterns (constant in the number of tasks)."""
        return sum(W.numel() * W.element_size() + p.numel() * p.element_size()
                   for W, p in zip(self.weights, self.pattern_sum))


def hamming(masks: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> int:
    """Number of neurons whose mask bit differs, summed over layers."""
    return sum(int(((m > 0) != (t > 0)).sum()) for m, t in zip(masks, target))


# --------------------------------------------------------------------------------------------------- recovery
@dataclass
class Recovery:
    """Result of ``recover_masks``: the final masks and per-step traces (index 0 = the starting point)."""

    masks: NeuronMasks                                   # bool (d_l,) per layer
    scores: list[torch.Tensor]                           # the final real scores (d_l,) per layer
    hamming: list[int] = field(default_factory=list)     # to ``target``, empty when none was given
    entropy: list[float] = field(default_factory=list)   # mean output entropy on each step's batch
    energy: list[float] = field(default_factory=list)    # Hopfield energy Σ_l −½ sᵀWs of the current mask


def recover_masks(model: BNNet, memory: HopfieldMaskMemory, batches: Sequence[torch.Tensor],
                  gamma: float = 1.5e-3, lr: float = 500.0, momentum: float = 0.9, weight_decay: float = 1e-4,
                  target: Sequence[torch.Tensor] | None = None) -> Recovery:
    """Recover a stored mask from unlabeled batches, one SGD step per batch (the authors' ``hopfield_recovery``).

    Scores s_l start at the mean stored pattern; at step t = 1..T = len(batches), with m_l = 1[s_l ≥ 0]
    (straight-through), minimise (1 − t/T)·mean H(f(x_t; m)) + γ·(t/T)·Σ_l −½ (2m_l − 1)ᵀ W_l (2m_l − 1).
    ``target`` (the true masks) is used only to log the Hamming distance. Returns the final masks (bool).
    """
    if len(batches) == 0:
        raise ValueError("recovery needs at least one batch")
    scores = [p.clone().requires_grad_(True) for p in memory.mean_pattern()]
    optimizer = torch.optim.SGD(scores, lr=lr, momentum=momentum, weight_decay=weight_decay)
    result = Recovery(masks=[], scores=[])
    T = len(batches)

    def log(masks: Sequence[torch.Tensor], H: float | None, E: float) -> None:
        if target is not None:
            result.hamming.append(hamming(masks, target))
        if H is not None:
            result.entropy.append(H)
        result.energy.append(E)

    with torch.no_grad():
        start = [(s >= 0).float() for s in scores]
        log(start, None, float(memory.energy([2 * m - 1 for m in start])))
    for t, x in enumerate(batches, start=1):
        masks = [threshold_supermask(s) for s in scores]
        H = entropy(model(x, masks)).mean()
        E = memory.energy([2 * m - 1 for m in masks])
        loss = (1 - t / T) * H + gamma * (t / T) * E
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            new = [(s >= 0).float() for s in scores]
            log(new, float(H), float(memory.energy([2 * m - 1 for m in new])))
    result.scores = [s.detach() for s in scores]
    result.masks = [s >= 0 for s in result.scores]
    return result


PROTOCOLS = ("transductive", "held_out")


def recover_and_score(model: BNNet, memory: HopfieldMaskMemory, x: torch.Tensor, y: torch.Tensor,
                      protocol: str = "transductive", adapt_fraction: float = 0.5, batch_size: int = 64,
                      seed: int = 0, target: Sequence[torch.Tensor] | None = None, **recovery_kwargs) -> dict:
    """Recover a task's masks from its unlabeled images and score them (labels are used only to score).

    The images are shuffled with ``seed`` (the authors' test loader shuffles) and cut into batches of
    ``batch_size``. ``"transductive"`` (the authors' protocol): adapt on all the batches, then score the same
    images. ``"held_out"``: adapt on the first ``adapt_fraction`` of the shuffled images, score the rest.
    Returns dict(recovery, accuracy, gg_accuracy (with ``target``, on the same scored images; else None),
    adapt_images, scored_images).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    if protocol == "held_out" and not 0 < adapt_fraction < 1:
        raise ValueError(f"adapt_fraction must be in (0, 1), got {adapt_fraction}")
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed)).to(x.device)
    x, y = x[order], y[order]
    cut = x.shape[0] if protocol == "transductive" else int(round(adapt_fraction * x.shape[0]))
    adapt_x = x[:cut]
    score_x, score_y = (x, y) if protocol == "transductive" else (x[cut:], y[cut:])
    recovery = recover_masks(model, memory, split_batches(adapt_x, batch_size), target=target, **recovery_kwargs)
    accuracy = evaluate_neuron_masks(model, recovery.masks, score_x, score_y, batch_size)
    gg = None if target is None else evaluate_neuron_masks(model, target, score_x, score_y, batch_size)
    return {"recovery": recovery, "accuracy": accuracy, "gg_accuracy": gg,
            "adapt_images": adapt_x.shape[0], "scored_images": score_x.shape[0]}
