"""Hopfield networks over {−1, +1}^d: storage rules, energy, recall, and the capacity experiment.

HopSupSup [P §3.5] stores each task's binary neuron mask m ∈ {0, 1}^d as the bipolar pattern
x = 2m − 1 ∈ {−1, +1}^d in a symmetric weight matrix W (d, d), and recovers a mask by descending
the energy E(s) = −½ sᵀ W s. This module is the plain Hopfield network; ``hopsupsup.py`` wires it to
a neural network.

Storage rules (each adds one pattern x (d,) to W (d, d)):

- Hebbian:             W ← W + (1/d)(x xᵀ − I)
- Storkey (textbook):  w_ij ← w_ij + (1/d)(x_i x_j − x_i h_ji − h_ij x_j),   i ≠ j,   w_ii = 0,
                       with h_ij = Σ_{k ≠ i, j} w_ik x_k  (the local field at i leaving out i and j)
- simplified Storkey   W ← W + (1/d)(x xᵀ − I − x hᵀ − h xᵀ),   h = W x  (the full local field)
  (the authors' code, ``FastHopMaskBN.cache_masks``; its diagonal is not kept at zero)

Recall updates a state s by s_i ← sign(Σ_{j ≠ i} w_ij s_j), keeping s_i when the field is exactly 0.
The self-coupling w_ii is left out of the field: on ±1 states it only adds the constant −½ tr W to the
energy, and leaving it out makes every asynchronous flip lower E for any symmetric W (the simplified
Storkey rule can make w_ii negative, and then the textbook field Σ_j w_ij s_j could raise E).
"""
from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
from tqdm.auto import tqdm

Rule = Literal["hebbian", "storkey", "simplified_storkey"]
Mode = Literal["async", "sync"]


# ----------------------------------------------------------------------------------------------- checks
def check_bipolar(x: torch.Tensor, name: str = "pattern") -> None:
    """Raise ValueError unless every entry of ``x`` is −1 or +1."""
    bad = (x != 1) & (x != -1)
    if bool(bad.any()):
        value = x[bad].flatten()[0].item()
        raise ValueError(f"{name} must hold only −1 and +1 (bipolar); found {value!r} "
                         f"in {int(bad.sum())} of {x.numel()} entries")


def check_weights(W: torch.Tensor, d: int | None = None) -> None:
    """Raise ValueError unless ``W`` is a square (d, d) matrix (of size ``d`` when given)."""
    if W.dim() != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"Hopfield weights must be a square (d, d) matrix, got shape {tuple(W.shape)}")
    if d is not None and W.shape[0] != d:
        raise ValueError(f"Hopfield weights are {tuple(W.shape)} but the patterns have d={d}")


def to_bipolar(mask: torch.Tensor) -> torch.Tensor:
    """Binary mask {0, 1} (any shape) → bipolar pattern 2m − 1 ∈ {−1, +1} (float32)."""
    mask = mask.float()
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        raise ValueError(f"mask must hold only 0 and 1, found {mask[bad].flatten()[0].item()!r}")
    return 2 * mask - 1


def to_mask(pattern: torch.Tensor) -> torch.Tensor:
    """Bipolar pattern {−1, +1} → binary mask (x + 1)/2 ∈ {0, 1} (float32)."""
    check_bipolar(pattern)
    return (pattern.float() + 1) / 2


# ------------------------------------------------------------------------------------------ storage rules
def hebbian_update(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Hebbian rule, one pattern: W ← W + (1/d)(x xᵀ − I). W: (d, d), x: (d,) → new (d, d)."""
    d = x.numel()
    W_new = torch.addr(W, x, x, alpha=1.0 / d)
    W_new.diagonal().sub_(1.0 / d)
    return W_new


def storkey_update(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Textbook Storkey rule (Storkey 1997), one pattern, for W with zero diagonal.

    w_ij ← w_ij + (1/d)(x_i x_j − x_i h_ji − h_ij x_j) for i ≠ j, with h_ij = Σ_{k≠i,j} w_ik x_k; w_ii = 0.
    Since w_ii = 0, h_ij = h_i − w_ij x_j with h = W x, and x_j² = 1 gives, in matrix form,
    ΔW = (1/d)(x xᵀ − x hᵀ − h xᵀ + W + Wᵀ) off the diagonal. W: (d, d), x: (d,) → new (d, d).
    """
    d = x.numel()
    if bool(W.diagonal().any()):
        raise ValueError("the textbook Storkey rule needs a zero diagonal (w_ii = 0); "
                         "start from zeros or from a matrix built by this rule or the Hebbian rule")
    h = W @ x
    W_new = torch.add(W.t(), W, alpha=d + 1.0).div_(d)          # W + (W + Wᵀ)/d
    W_new.addr_(x, x - h, alpha=1.0 / d).addr_(h, x, alpha=-1.0 / d)
    return W_new.fill_diagonal_(0.0)


def simplified_storkey_update(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The authors' Storkey-type rule: W ← W + (1/d)(x xᵀ − I − x hᵀ − h xᵀ), h = W x (i and j included).

    W: (d, d), x: (d,) → new (d, d). Off the diagonal it is the textbook rule without the (1/d)(W + Wᵀ)
    term; its diagonal drifts by −(2/d) x_i h_i per pattern instead of staying at zero.
    """
    d = x.numel()
    h = W @ x
    W_new = torch.addr(W, x, x - h, alpha=1.0 / d).addr_(h, x, alpha=-1.0 / d)
    W_new.diagonal().sub_(1.0 / d)
    return W_new


RULES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hebbian": hebbian_update,
    "storkey": storkey_update,
    "simplified_storkey": simplified_storkey_update,
}


def _rule(rule: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if rule not in RULES:
        raise ValueError(f"unknown storage rule {rule!r}; choose one of {sorted(RULES)}")
    return RULES[rule]


def store(patterns: torch.Tensor, rule: Rule = "hebbian", W: torch.Tensor | None = None) -> torch.Tensor:
    """Store bipolar patterns (P, d) one after another with ``rule``, starting from ``W`` (default zeros).

    Returns W (d, d). The Hebbian case is the closed form W + (1/d)(XᵀX − P·I); Storkey rules depend on the
    order, so they run pattern by pattern.
    """
    if patterns.dim() != 2:
        raise ValueError(f"patterns must be (P, d), got shape {tuple(patterns.shape)}")
    check_bipolar(patterns, "patterns")
    P, d = patterns.shape
    if W is None:
        dtype = patterns.dtype if patterns.is_floating_point() else torch.float32
        W = torch.zeros(d, d, dtype=dtype, device=patterns.device)
    check_weights(W, d)
    patterns = patterns.to(W.dtype)
    update = _rule(rule)
    if rule == "hebbian":
        return W + (patterns.t() @ patterns - P * torch.eye(d, dtype=W.dtype, device=W.device)) / d
    for x in patterns:
        W = update(W, x)
    return W


# ------------------------------------------------------------------------------------------- energy, field
def energy(W: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Hopfield energy E(s) = −½ sᵀ W s. W: (d, d); s: (d,) or (B, d) → () or (B,). Differentiable."""
    check_weights(W, s.shape[-1])
    return -0.5 * ((s @ W) * s).sum(-1)


def without_self_coupling(W: torch.Tensor) -> torch.Tensor:
    """W with its diagonal set to zero (a copy), the matrix the recall field uses."""
    return W.clone().fill_diagonal_(0.0)


def _sign_keep(field: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """sign(field), keeping the current state ``s`` where the field is exactly zero."""
    return torch.where(field > 0, 1.0, torch.where(field < 0, -1.0, s))


# ------------------------------------------------------------------------------------------------- recall
def async_update(W0: torch.Tensor, s: torch.Tensor, i: int) -> torch.Tensor:
    """One asynchronous update of neuron i, in place: s_i ← sign(Σ_j W0_ij s_j) for a zero-diagonal W0.

    W0: (d, d) with zero diagonal (``without_self_coupling``); s: (B, d) float ±1. Returns a (B,) bool
    tensor of the rows whose neuron i flipped.
    """
    new = _sign_keep(s @ W0[i], s[:, i])
    flipped = new != s[:, i]
    s[:, i] = new
    return flipped


def sync_update(W0: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """One synchronous update of all neurons: s ← sign(s W0ᵀ). W0: (d, d) zero diagonal, s: (B, d) → (B, d)."""
    return _sign_keep(s @ W0.t(), s)


def recall(
    W: torch.Tensor,
    probes: torch.Tensor,
    mode: Mode = "async",
    max_sweeps: int = 50,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """Run the network from each probe until no neuron changes (or ``max_sweeps`` sweeps).

    W: (d, d); probes: (B, d) or (d,) bipolar. ``mode="async"`` updates neurons one at a time in a fresh
    random order each sweep (the order, from ``generator``, is shared by the B probes); ``"sync"`` updates
    all neurons at once per sweep (it can end in a 2-cycle; then it stops at ``max_sweeps``).
    Returns (states like probes, number of sweeps run).
    """
    single = probes.dim() == 1
    s = probes.reshape(1, -1).float().clone() if single else probes.float().clone()
    check_bipolar(s, "probes")
    d = s.shape[1]
    check_weights(W, d)
    if mode not in ("async", "sync"):
        raise ValueError(f"recall mode must be 'async' or 'sync', got {mode!r}")
    if max_sweeps < 1:
        raise ValueError(f"max_sweeps must be ≥ 1, got {max_sweeps}")
    W0 = without_self_coupling(W.float()).to(s.device)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        if mode == "sync":
            new = sync_update(W0, s)
            changed = bool((new != s).any())
            s = new
        else:
            order = torch.randperm(d, generator=generator).tolist()
            changed = False
            for i in order:
                changed |= bool(async_update(W0, s, i).any())
        if not changed:
            break
    return (s[0] if single else s), sweeps


# ------------------------------------------------------------------------------------- capacity experiment
def random_patterns(num: int, d: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``num`` random bipolar patterns (num, d), each entry ±1 with probability ½."""
    return 2 * torch.randint(0, 2, (num, d), generator=generator).float() - 1


def capacity_curve(
    d: int,
    num_patterns: Sequence[int],
    rule: Rule = "hebbian",
    num_probes: int = 64,
    mode: Mode = "async",
    max_sweeps: int = 30,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, list[float]]:
    """Recall error against the number P of stored random patterns.

    Stores random patterns one by one with ``rule``; at each P in ``num_patterns`` it starts the network at
    up to ``num_probes`` of the stored patterns (a random subset) and runs ``recall``. Returns lists
    aligned with the sorted P values: ``num_patterns``, ``load`` (P/d), ``bit_error`` (mean fraction of
    bits that differ from the stored pattern at the fixed point) and ``exact`` (fraction of probes
    recalled with no wrong bit). Classic result: Hebbian bit error stays ≈ 1–2 % up to P ≈ 0.14·d and then
    jumps (Amit, Gutfreund, Sompolinsky 1985).
    """
    counts = sorted(set(int(p) for p in num_patterns))
    if not counts or counts[0] < 1:
        raise ValueError(f"num_patterns must be positive integers, got {list(num_patterns)}")
    gen = torch.Generator().manual_seed(seed)
    patterns = random_patterns(counts[-1], d, gen).to(device)
    update = _rule(rule)
    W = torch.zeros(d, d, device=device)
    out: dict[str, list[float]] = {"num_patterns": [], "load": [], "bit_error": [], "exact": []}
    stored = 0
    for P in tqdm(counts, desc=f"{rule} d={d}", disable=not progress, leave=False):
        for x in patterns[stored:P]:
            W = update(W, x)
        stored = P
        pick = torch.randperm(P, generator=gen)[:num_probes].to(device)
        states, _ = recall(W, patterns[pick], mode=mode, max_sweeps=max_sweeps, generator=gen)
        wrong = (states != patterns[pick]).float().mean(1)
        out["num_patterns"].append(P)
        out["load"].append(P / d)
        out["bit_error"].append(wrong.mean().item())
        out["exact"].append((wrong == 0).float().mean().item())
    return out
