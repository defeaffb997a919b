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

Recall updates a state s by s_i ← sign(Σ_{j ≠ i} w_ij s_j), keeping s_i on a tie (|field| ≤ ``tie_tolerance``).
The self-coupling w_ii is left out of the field: on ±1 states it only adds the constant −½ tr W to the
energy, and leaving it out makes every asynchronous flip lower E for any symmetric W (the simplified
Storkey rule can make w_ii negative, and then the textbook field Σ_j w_ij s_j could raise E).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal, Sequence

import torch
from tqdm.auto import tqdm

from ..config import resolve_device

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
def _check_zero_diagonal(W: torch.Tensor) -> None:
    if bool(W.diagonal().any()):
        raise ValueError("the textbook Storkey rule needs a zero diagonal (w_ii = 0); "
                         "start from zeros or from a matrix built by this rule or the Hebbian rule")


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
    _check_zero_diagonal(W)
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


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run a loop of many tiny CPU ops on one thread: thread start-up costs more than the ops, and on a busy
    machine each multi-threaded op waits for a free core (50x slower measured on 2 shared cores)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_symmetric(W: torch.Tensor) -> None:
    gap = (W - W.t()).abs().max().item()
    if gap > 1e-5 * max(W.abs().max().item(), 1e-30):
        raise ValueError(f"Hopfield weights must be symmetric (the rules keep them so); max |W − Wᵀ| = {gap:.3g}")


def _store_block(W: torch.Tensor, X: torch.Tensor, rule: str) -> torch.Tensor:
    """Add the patterns X (k, d) to the symmetric W (d, d) in order, in O(k) matrix products instead of k passes.

    Every rule has the form W_p = a·W_{p−1} + R_p, R_p = (1/d)(x (x − h)ᵀ − h xᵀ − diag(g)) with h = W_{p−1} x:
    Hebbian a = 1, h = 0, g = 1; simplified Storkey a = 1, g = 1; textbook Storkey (symmetric W, w_ii = 0)
    a = 1 + 2/d and g = 1 − 2 x∘h, the diagonal of x(x − h)ᵀ − h xᵀ, so w_ii stays 0. Hence
    W_p = a^p W_0 + Σ_{q<p} a^{p−1−q} R_q: each field h_p = a^p (W_0 x_p) + Σ_{q<p} a^{p−1−q} R_q x_p costs
    O(p·d) given W_0 X, and the block ends with one (d, 2k) @ (2k, d) product. Equal to applying
    ``RULES[rule]`` pattern by pattern (tests check it).
    """
    k, d = X.shape
    a = 1.0 + 2.0 / d if rule == "storkey" else 1.0
    uses_field = rule != "hebbian"
    H = torch.zeros_like(X)
    G = torch.ones_like(X)
    if uses_field:
        W0X = X @ W.t()                                          # row p: W_0 x_p
        powers = a ** torch.arange(k, dtype=X.dtype, device=X.device)
        with _one_cpu_thread(X.device):
            for p in range(k):
                x = X[p]
                h = powers[p] * W0X[p]
                if p:
                    w = powers[:p].flip(0) / d                   # a^{p−1−q} / d for q = 0..p−1
                    Xq, Hq = X[:p], H[:p]
                    h = h + (w * ((Xq - Hq) @ x)) @ Xq - (w * (Xq @ x)) @ Hq - x * (w @ G[:p])
                H[p] = h
                if rule == "storkey":
                    G[p] = 1 - 2 * x * h
    v = (a ** torch.arange(k - 1, -1, -1, dtype=X.dtype, device=X.device)).unsqueeze(1)   # a^{k−1−q}
    left = torch.cat([X.t(), -H.t()], dim=1)                     # (d, 2k)
    right = torch.cat([v * (X - H), v * X], dim=0)               # (2k, d)
    W_new = torch.addmm(W, left, right, beta=a ** k, alpha=1.0 / d)
    if rule == "storkey":
        return W_new.fill_diagonal_(0.0)                          # exactly what Σ a^{k−1−q} g_q / d removes
    W_new.diagonal().sub_((v * G).sum(0) / d)
    return W_new


def store(patterns: torch.Tensor, rule: Rule = "hebbian", W: torch.Tensor | None = None,
          block_size: int = 128) -> torch.Tensor:
    """Store bipolar patterns (P, d) in order with ``rule``, starting from a symmetric ``W`` (default zeros).

    Returns W (d, d), equal to applying ``RULES[rule]`` once per pattern (up to rounding) but computed in
    blocks of ``block_size`` patterns with matrix products (see ``_store_block``). Storkey rules depend on
    the order of the patterns; the Hebbian rule does not.
    """
    if patterns.dim() != 2:
        raise ValueError(f"patterns must be (P, d), got shape {tuple(patterns.shape)}")
    check_bipolar(patterns, "patterns")
    _rule(rule)
    d = patterns.shape[1]
    if W is None:
        dtype = patterns.dtype if patterns.is_floating_point() else torch.float32
        W = torch.zeros(d, d, dtype=dtype, device=patterns.device)
    check_weights(W, d)
    _check_symmetric(W)
    if rule == "storkey":
        _check_zero_diagonal(W)
    patterns = patterns.to(W.dtype)
    for start in range(0, patterns.shape[0], block_size):
        W = _store_block(W, patterns[start:start + block_size], rule)
    return W


# ------------------------------------------------------------------------------------------- energy, field
def energy(W: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Hopfield energy E(s) = −½ sᵀ W s. W: (d, d); s: (d,) or (B, d) → () or (B,). Differentiable."""
    check_weights(W, s.shape[-1])
    return -0.5 * ((s @ W) * s).sum(-1)


def without_self_coupling(W: torch.Tensor) -> torch.Tensor:
    """W with its diagonal set to zero (a copy), the matrix the recall field uses."""
    return W.clone().fill_diagonal_(0.0)


def tie_tolerance(W0: torch.Tensor) -> float:
    """Fields with |h| ≤ this count as ties (state kept): 1e-5 of the largest possible |h|, max_i Σ_j |W0_ij|.

    Ties are real for the Hebbian rule (its weights are multiples of 1/d), and float rounding must not
    decide them; 1e-5 is far below the 1/d steps of Hebbian fields and far above float32 rounding.
    """
    return 1e-5 * float(W0.abs().sum(1).max())


def _sign_keep(field: torch.Tensor, s: torch.Tensor, tol: float) -> torch.Tensor:
    """sign(field), keeping the current state ``s`` where |field| ≤ tol."""
    return torch.where(field > tol, 1.0, torch.where(field < -tol, -1.0, s))


# ------------------------------------------------------------------------------------------------- recall
def async_update(W0: torch.Tensor, s: torch.Tensor, i: int, tol: float = 0.0) -> torch.Tensor:
    """One asynchronous update of neuron i, in place: s_i ← sign(Σ_j W0_ij s_j) for a zero-diagonal W0.

    W0: (d, d) with zero diagonal (``without_self_coupling``); s: (B, d) float ±1; fields with |h| ≤ tol
    keep the state (``tie_tolerance``). Returns a (B,) bool tensor of the rows whose neuron i flipped.
    """
    new = _sign_keep(s @ W0[i], s[:, i], tol)
    flipped = new != s[:, i]
    s[:, i] = new
    return flipped


def sync_update(W0: torch.Tensor, s: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
    """One synchronous update of all neurons: s ← sign(s W0ᵀ), ties (|h| ≤ tol) kept.

    W0: (d, d) zero diagonal, s: (B, d) → (B, d).
    """
    return _sign_keep(s @ W0.t(), s, tol)


def _check_recall_args(W: torch.Tensor, s: torch.Tensor, mode: str, max_sweeps: int) -> None:
    check_bipolar(s, "probes")
    check_weights(W, s.shape[1])
    if mode not in ("async", "sync"):
        raise ValueError(f"recall mode must be 'async' or 'sync', got {mode!r}")
    if max_sweeps < 1:
        raise ValueError(f"max_sweeps must be ≥ 1, got {max_sweeps}")


def _recall_async(W0: torch.Tensor, s: torch.Tensor, max_sweeps: int,
                  generator: torch.Generator | None, tol: float) -> int:
    """Asynchronous sweeps in random order, in place on s (B, d), jumping from flip to flip.

    Same result as ``for sweep: for i in randperm(d): async_update(W0, s, i, tol)`` until a sweep changes
    nothing, but each probe skips straight to the next neuron of the sweep order whose field disagrees
    with its state (neurons in between would not change), so the cost is O(B·d) per flip instead of per
    neuron. The local fields F = s W0ᵀ (B, d) are kept up to date after each flip. Draws one permutation
    per sweep from ``generator``, like the plain loop. Returns the number of sweeps the plain loop runs.
    """
    B, d = s.shape
    dev = s.device
    positions = torch.arange(d, device=dev)
    W0t = W0.t().contiguous()                                          # row i: column i of W0
    F = s @ W0t
    perms: list[torch.Tensor] = []
    sweep = torch.ones(B, dtype=torch.long, device=dev)                # 1-based sweep each probe is in
    pos = torch.full((B,), -1, dtype=torch.long, device=dev)           # last position done in that sweep
    last_change = torch.zeros(B, dtype=torch.long, device=dev)         # last sweep with a flip
    active = torch.ones(B, dtype=torch.bool, device=dev)
    # dense updates only (where / gather / scatter): indexed writes are slow on a busy multi-threaded CPU
    while bool(active.any()):
        if len(perms) < int(sweep.max()):
            perms.append(torch.randperm(d, generator=generator).to(dev))
            stacked = torch.stack(perms)
        order = stacked.index_select(0, sweep - 1)                     # (B, d) sweep order of each probe
        unstable = (F * s < -tol).gather(1, order) & (positions > pos.unsqueeze(1))   # field opposes state
        has_next = unstable.any(1) & active
        nxt = unstable.to(torch.int8).argmax(1)
        i = order.gather(1, nxt.unsqueeze(1))                          # (B, 1) neuron to flip
        step = torch.where(has_next.unsqueeze(1), -2 * s.gather(1, i), 0.0)   # s_new − s_old, or 0
        s.scatter_add_(1, i, step)
        F.add_(step * W0t.index_select(0, i.squeeze(1)))               # F_bj += W0_ji (s_new − s_old)
        pos = torch.where(has_next, nxt, pos)
        last_change = torch.where(has_next, sweep, last_change)
        done = active & ~has_next                                      # reached the end of their sweep
        finished = done & ((last_change < sweep) | (sweep == max_sweeps))
        active = active & ~finished
        moving = done & ~finished
        sweep = torch.where(moving, sweep + 1, sweep)
        pos = torch.where(moving, -1, pos)
    sweeps = min(max_sweeps, int(last_change.max()) + 1)
    for _ in range(len(perms), sweeps):                                # the plain loop's last, idle sweeps
        torch.randperm(d, generator=generator)
    return sweeps


def recall(
    W: torch.Tensor,
    probes: torch.Tensor,
    mode: Mode = "async",
    max_sweeps: int = 50,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """Run the network from each probe until no neuron changes (or ``max_sweeps`` sweeps).

    W: (d, d); probes: (B, d) or (d,) bipolar. The field leaves out w_ii and |h| ≤ ``tie_tolerance`` keeps
    the state. ``mode="async"`` updates neurons one at a time, in a fresh random order each sweep drawn from
    ``generator`` and shared by the B probes; ``"sync"`` updates all neurons at once per sweep (it can end in
    a 2-cycle; then it stops at ``max_sweeps``). Returns (states like probes, number of sweeps until a sweep
    changed nothing).
    """
    single = probes.dim() == 1
    s = probes.reshape(1, -1).to(W.dtype).clone() if single else probes.to(W.dtype).clone()
    _check_recall_args(W, s, mode, max_sweeps)
    W0 = without_self_coupling(W)
    tol = tie_tolerance(W0)
    if mode == "async":
        with _one_cpu_thread(s.device):
            sweeps = _recall_async(W0, s, max_sweeps, generator, tol)
    else:
        for sweeps in range(1, max_sweeps + 1):
            new = sync_update(W0, s, tol)
            changed = bool((new != s).any())
            s = new
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
    device: torch.device | str | None = None,
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
    patterns = random_patterns(counts[-1], d, gen).to(resolve_device(device))
    W = torch.zeros(d, d, device=device)
    out: dict[str, list[float]] = {"num_patterns": [], "load": [], "bit_error": [], "exact": []}
    stored = 0
    for P in tqdm(counts, desc=f"{rule} d={d}", disable=not progress, leave=False):
        W = store(patterns[stored:P], rule, W)
        stored = P
        pick = torch.randperm(P, generator=gen)[:num_probes].to(device)
        states, _ = recall(W, patterns[pick], mode=mode, max_sweeps=max_sweeps, generator=gen)
        wrong = (states != patterns[pick]).float().mean(1)
        out["num_patterns"].append(P)
        out["load"].append(P / d)
        out["bit_error"].append(wrong.mean().item())
        out["exact"].append((wrong == 0).float().mean().item())
    return out


# ------------------------------------------------------------------------------------------ basin experiment
def flip_bits(patterns: torch.Tensor, num_flips: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """A copy of ``patterns`` (B, d) bipolar with exactly ``num_flips`` entries of each row negated.

    Each row flips its own random set of positions: the first ``num_flips`` of argsort(u), u ~ U(0, 1)^(B, d)
    drawn from ``generator``.
    """
    check_bipolar(patterns, "patterns")
    if patterns.dim() != 2 or not 0 <= num_flips <= patterns.shape[1]:
        raise ValueError(f"need patterns of shape (B, d) and 0 ≤ num_flips ≤ d; got shape {tuple(patterns.shape)}"
                         f" and num_flips={num_flips}")
    where = torch.rand(patterns.shape, generator=generator).argsort(1)[:, :num_flips].to(patterns.device)
    return patterns.scatter(1, where, -patterns.gather(1, where))


def basin_curve(
    d: int,
    num_patterns: int,
    flip_fractions: Sequence[float],
    *,
    rule: Rule = "hebbian",
    num_probes: int = 64,
    mode: Mode = "async",
    max_sweeps: int = 30,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, list[float]]:
    """Recall started *away* from a stored pattern: the basin of attraction beside the stability of
    :func:`capacity_curve` (which starts at the pattern, flip fraction 0).

    Stores ``num_patterns`` random patterns x (load P/d) with ``rule``; for each fraction f in
    ``flip_fractions`` picks up to ``num_probes`` stored patterns, flips k = round(f·d) bits of each
    (:func:`flip_bits`) and runs :func:`recall` from there. Random numbers, all from one generator seeded with
    ``seed``: the patterns, then per f the probe subset (randperm), the flips, the sweep orders.
    Returns lists aligned with ``flip_fractions``: ``flip_fraction`` (k/d), ``exact`` (fraction of probes that
    end exactly on their own pattern x), ``bit_error`` (mean fraction of bits that differ from x at the end)
    and ``mirror`` (fraction that end exactly on −x, also a fixed point of E(s) = −½ sᵀWs).
    """
    fractions = [float(f) for f in flip_fractions]
    if not fractions or any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(f"flip_fractions must be fractions in [0, 1], got {list(flip_fractions)}")
    if num_patterns < 1 or num_probes < 1:
        raise ValueError(f"num_patterns and num_probes must be ≥ 1, got {num_patterns} and {num_probes}")
    gen = torch.Generator().manual_seed(seed)
    dev = resolve_device(device)
    patterns = random_patterns(num_patterns, d, gen).to(dev)
    W = store(patterns, rule, torch.zeros(d, d, device=dev))
    out: dict[str, list[float]] = {"flip_fraction": [], "exact": [], "bit_error": [], "mirror": []}
    for f in fractions:
        targets = patterns[torch.randperm(num_patterns, generator=gen)[:num_probes].to(dev)]
        k = round(f * d)
        states, _ = recall(W, flip_bits(targets, k, generator=gen), mode=mode, max_sweeps=max_sweeps, generator=gen)
        out["flip_fraction"].append(k / d)
        out["exact"].append((states == targets).all(1).float().mean().item())
        out["bit_error"].append((states != targets).float().mean().item())
        out["mirror"].append((states == -targets).all(1).float().mean().item())
    return out
