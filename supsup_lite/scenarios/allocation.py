"""Scenario NNs: learn a stream of batches with no task ids and no announced task boundaries (paper §3.4 and
§4.3; the authors' `trainers/nns.py`).

The learner only ever sees training batches (x, y). Every ``check_every`` batches (the paper: 100) it asks the
masks it already has whether they know the data. With n masks superposed at α = 1/n (Eq. 2),

    ν = softmax(−∂H/∂α) ∈ Δⁿ,        a new task  ⇔  n · max_t ν_t < 1 + ε        (paper: ε = 2⁻³)

(ν is uniform, n·max ν = 1, when no mask lowers the entropy more than the others). On a new task it allocates
a fresh mask, otherwise it trains the mask with the largest ν; either way that mask alone is trained (RMSprop on
its scores) until the next check. The mask being trained takes part in every check with its current binary
mask: the bank the check superposes is built from the current scores of all masks.

Small n. For n = 1 the rule is void (ν = (1), n·max ν = 1 < 1 + ε: every check would allocate), and for a
few masks it is noisy. The authors pad the superposition to n = max(#masks, 5) slots with the untrained
initial masks of the next slots. We keep that padding, explicitly: while fewer than ``min_slots`` masks exist,
the initial (untrained) masks of the next slots join the superposition as *references*. A reference is never
trained, never stored in the bank, never chosen: if a reference wins the argmax, the data looks more like a
random mask than like any learned one, so it is a new task (the authors' code would train that untrained slot
without counting it, in `trainers/nns.py`).

Budget. At most ``budget`` masks are allocated. A check that asks for a new mask when the budget is spent
trains nothing until the next check (the authors' behaviour, the "final dip" of their Fig. 4): old masks are
never overwritten by data they were not chosen for. The log marks such checks ``mask=None``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import chain, islice
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import derive_seed
from ..core.inference import alpha_gradient
from ..core.masks import MaskBank, Masks, init_scores
from ..core.models import maskable_parameters, masked_forward
from ..core.training import fit, masked_weights
from ..data.mnist import Batch, TaskStream
from .protocols import (ProtocolResult, correct_per_batch, gnu_score, infer_tasks, padded, predict_batches,
                        shuffled_test_set)

EPSILON = 2.0 ** -3
LabelledBatch = tuple[int, torch.Tensor, torch.Tensor]


def novelty_score(grad: torch.Tensor) -> float:
    """n · max_t ν_t with ν = softmax(−grad). grad: (n,) = ∂H/∂α → a float in [1, n] (1: no mask stands out)."""
    if grad.dim() != 1 or grad.numel() == 0:
        raise ValueError(f"grad must be a non-empty vector (n,), got shape {tuple(grad.shape)}")
    return grad.numel() * torch.softmax(-grad.double(), dim=0).max().item()


def is_new_task(grad: torch.Tensor, epsilon: float = EPSILON) -> bool:
    """The paper's allocation rule: n · max softmax(−∂H/∂α) < 1 + ε. grad: (n,)."""
    return novelty_score(grad) < 1.0 + epsilon


@dataclass(frozen=True)
class Check:
    """One allocation decision, taken on the first batch of a segment of ``check_every`` batches.

    ``data_task`` is the hidden task of that batch: logged for evaluation, never seen by the decision.
    ``masks`` masks existed before the decision; the superposition had ``slots`` = masks + references.
    ``winner`` is the slot of max ν (≥ ``masks``: a reference; None at the very first check), ``score`` is
    n·max ν with n = ``slots`` (nan at the very first check). ``mask`` is the mask trained until the next
    check (None: a new task with the budget spent, nothing trained); ``allocated``: it was new.
    """

    batch: int
    data_task: int
    masks: int
    slots: int
    winner: int | None
    score: float
    mask: int | None
    allocated: bool

    def wants_new(self, epsilon: float) -> bool:
        """Whether this check would have asked for a new mask under ``epsilon`` (same masks, same batch)."""
        return self.winner is None or self.winner >= self.masks or self.score < 1.0 + epsilon


class NNsLearner:
    """Supermasks for a stream without task identity: detect new tasks from ∂H/∂α and allocate masks.

    State: the real-valued scores of every allocated mask and each mask's RMSprop state (as in the authors'
    code: O(n·P) floats for n masks of P weights), so a mask chosen again resumes where it stopped.
    Mask t's scores start from ``init_scores`` with seed ``derive_seed(seed, t, "scores")``; with one mask per
    task, a stream whose i-th task draws its batches with ``derive_seed(seed, i, "batches")`` (as
    :func:`task_sequence_batches` does) therefore reproduces ``train_supermask`` bit for bit.
    """

    def __init__(self, model: nn.Module, *, budget: int, epsilon: float = EPSILON, check_every: int = 100,
                 min_slots: int = 5, lr: float = 1e-4, seed: int = 0) -> None:
        if budget < 1:
            raise ValueError(f"budget is the most masks the learner may allocate and must be ≥ 1, got {budget}")
        if check_every < 1:
            raise ValueError(f"check_every is a number of batches and must be ≥ 1, got {check_every}")
        if min_slots < 2:
            raise ValueError(f"min_slots must be ≥ 2 (with one slot n·max ν = 1 always), got {min_slots}")
        if not math.isfinite(epsilon) or epsilon < 0:
            raise ValueError(f"epsilon must be a finite number ≥ 0 (n·max ν ≥ 1 always), got {epsilon}")
        self.params = maskable_parameters(model)
        if any(p.requires_grad for p in self.params.values()):
            raise ValueError("the base network must be frozen (requires_grad=False); call signed_constant_ first")
        self.model = model
        self._bank = MaskBank.for_model(model)  # the binary masks of all allocated masks; fails early on a bad model
        self._stale: set[int] = set()           # masks trained since their row in ``_bank`` was written
        self.budget, self.epsilon, self.check_every = budget, epsilon, check_every
        self.min_slots, self.lr, self.seed = min_slots, lr, seed
        self.scores: list[Masks] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.live: int | None = None
        self.batches_seen = 0
        self.log: list[Check] = []

    def __len__(self) -> int:
        return len(self.scores)

    def __repr__(self) -> str:
        return (f"NNsLearner(masks={len(self)}/{self.budget}, live={self.live}, epsilon={self.epsilon}, "
                f"check_every={self.check_every}, batches_seen={self.batches_seen})")

    # --- masks -----------------------------------------------------------------------------------
    def initial_scores(self, slot: int) -> Masks:
        """The scores mask ``slot`` starts from: ``init_scores`` seeded with ``derive_seed(seed, slot, "scores")``."""
        return init_scores(self.model, torch.Generator().manual_seed(derive_seed(self.seed, slot, "scores")))

    def bank(self, references: int = 0) -> MaskBank:
        """The current binary masks 1[s ≥ 0] of all masks in allocation order (the live one included),
        followed by the initial masks of the next ``references`` slots.

        Without references this is the learner's own bank, kept up to date row by row (only masks trained since
        the last call are re-packed); treat it as read-only. With references it is a fresh copy.
        """
        for slot in sorted(self._stale):
            self._bank.replace(slot, {name: s.detach() >= 0 for name, s in self.scores[slot].items()})
        self._stale.clear()
        if not references:
            return self._bank
        bank = MaskBank.for_model(self.model)
        for slot in range(len(self)):
            bank.append(self._bank.get(slot, torch.bool))
        for j in range(references):
            bank.append({name: s.detach() >= 0 for name, s in self.initial_scores(len(self) + j).items()})
        return bank

    def allocate(self) -> int:
        """Start a fresh mask (scores from ``initial_scores``, its own RMSprop); returns its index."""
        if len(self) >= self.budget:
            raise RuntimeError(f"the mask budget of {self.budget} is spent")
        scores = self.initial_scores(len(self))
        self.scores.append(scores)
        self.optimizers.append(torch.optim.RMSprop(scores.values(), lr=self.lr))
        self._bank.append({name: s.detach() >= 0 for name, s in scores.items()})
        return len(self) - 1

    def restore(self, scores: Masks, optimizer_state: dict) -> int:
        """Allocate the next mask with saved ``scores`` and RMSprop state (resuming a saved learner); its index."""
        slot = self.allocate()
        with torch.no_grad():
            for name, value in scores.items():
                self.scores[slot][name].copy_(value)
        self.optimizers[slot].load_state_dict(optimizer_state)
        self._stale.add(slot)
        return slot

    # --- the decision ----------------------------------------------------------------------------
    def detection_gradient(self, x: torch.Tensor) -> torch.Tensor:
        """∂H/∂α at α = 1/n over the masks plus max(0, min_slots − #masks) references. x: (B, ...) → (n,)."""
        if not self.scores:
            raise ValueError("no mask exists yet: the first check always allocates")
        references = max(0, self.min_slots - len(self))
        _, grad = alpha_gradient(self.model, self.bank(references), x)
        return grad

    def check(self, x: torch.Tensor, data_task: int = -1) -> Check:
        """Decide which mask trains on the batch x (B, ...) and the batches up to the next check, allocating
        one if the data is new; sets ``live`` and returns the decision. ``data_task`` only goes into the log."""
        masks = len(self)
        winner, score, slots = None, math.nan, 0
        if masks:
            grad = self.detection_gradient(x)
            winner, score, slots = int(grad.argmin()), novelty_score(grad), grad.numel()
        decision = Check(self.batches_seen, int(data_task), masks, slots, winner, score, mask=winner, allocated=False)
        if decision.wants_new(self.epsilon):
            allocated = masks < self.budget
            decision = replace(decision, mask=self.allocate() if allocated else None, allocated=allocated)
        self.live = decision.mask
        return decision

    # --- training --------------------------------------------------------------------------------
    def _train(self, batches: Iterator[Batch]) -> int:
        """Train the live mask on ``batches`` (or skip them when none is live); returns how many there were."""
        if self.live is None:
            return sum(1 for _ in batches)
        scores = self.scores[self.live]
        self._stale.add(self.live)
        history = fit(lambda x: masked_forward(self.model, masked_weights(self.model, scores), x),
                      self.optimizers[self.live], batches, progress=False)
        return len(history.loss)

    def learn(self, labelled_batches: Iterable[LabelledBatch], total: int | None = None,
              progress: bool = True) -> list[Check]:
        """Consume a stream of (hidden task, x (B, 784), y (B,)); returns the checks made during this call.

        The hidden task only goes into the log. Checks fall on every ``check_every``-th batch of the whole
        stream, so a stream may be fed in several calls (e.g. to evaluate in between).
        """
        stream = iter(labelled_batches)
        first_check = len(self.log)
        with tqdm(total=total, disable=not progress, desc="NNs stream", leave=False) as bar:
            while (head := next(stream, None)) is not None:
                task, x, y = head
                if self.batches_seen % self.check_every == 0:
                    self.log.append(self.check(x, task))
                segment = self.check_every - self.batches_seen % self.check_every
                rest = ((xb, yb) for _, xb, yb in islice(stream, segment - 1))
                done = self._train(chain([(x, y)], rest))
                self.batches_seen += done
                bar.update(done)
        return self.log[first_check:]


def task_sequence_batches(stream: TaskStream, tasks: Iterable[int], batches_per_task: int,
                          batch_size: int = 128, seed: int = 0) -> Iterator[LabelledBatch]:
    """The NNs training stream: the i-th entry of ``tasks`` contributes ``batches_per_task`` batches drawn with
    seed ``derive_seed(seed, i, "batches")`` (so a task seen twice gets fresh batches), each yielded as (task, x, y)."""
    for i, task in enumerate(tasks):
        for x, y in stream.train_batches(task, batch_size, batches_per_task, derive_seed(seed, i, "batches")):
            yield task, x, y


def learn_tasks(learner: NNsLearner, stream: TaskStream, tasks: Sequence[int], batches_per_task: int,
                batch_size: int = 128, seed: int = 0, snapshots: Iterable[int] = (),
                progress: bool = True) -> dict[int, MaskBank]:
    """Feed ``learner`` the stream of ``tasks`` (see :func:`task_sequence_batches`), one task after another.

    The learner is told nothing at the boundaries; we only pause there to take ``learner.bank()`` after the
    i-th task for every i in ``snapshots`` (1-based). Returns {i: bank after i tasks}.
    """
    wanted = set(snapshots)
    outside = sorted(i for i in wanted if not 1 <= i <= len(tasks))
    if outside or batches_per_task < 1:
        raise ValueError(f"snapshots must lie in 1..{len(tasks)} (tasks in the stream) and batches_per_task ≥ 1; "
                         f"got snapshots outside: {outside}, batches_per_task={batches_per_task}")
    batches = task_sequence_batches(stream, tasks, batches_per_task, batch_size, seed)
    banks = {}
    for i in tqdm(range(1, len(tasks) + 1), disable=not progress, desc="NNs stream (tasks)"):
        learner.learn(islice(batches, batches_per_task), progress=False)
        if i in wanted:
            banks[i] = learner.bank().clone()
    return banks


def allocation_counts(log: Sequence[Check], num_tasks: int, num_masks: int) -> torch.Tensor:
    """How many checks of each data task trained each mask: (num_tasks, num_masks) int64."""
    counts = torch.zeros(num_tasks, num_masks, dtype=torch.int64)
    for check in log:
        if check.mask is not None:
            counts[check.data_task, check.mask] += 1
    return counts


def nns_accuracy(model: nn.Module, bank: MaskBank, stream: TaskStream, *, tasks: Iterable[int],
                 batch_size: int = 128, seed: int | None = 0, batches: int | None = None) -> ProtocolResult:
    """The paper's Scenario NNs evaluation: One-Shot (H) with shared labels.

    As in :func:`supsup_lite.scenarios.protocols.gnu_accuracy`, each data task's test set (in the order of
    ``protocols.test_order``) is cut into batches of ``batch_size``, each batch's mask is inferred from its first
    image and the batch is classified with that mask; but a mask index that is not the task's own is not penalised
    (labels are shared, and in NNs the learner never knew which mask "belongs" to a task): :func:`gnu_score` with
    ``true_tasks=None``. Accuracy per task = correct / test size.
    ``tasks`` are data tasks of ``stream`` (there may be more or fewer than masks). ``batches``: score only the
    first that many batches of each shuffled test set (a seeded random sample of batches · batch_size images;
    the denominator is then the images scored). ``scored`` holds the correct count of every batch.
    """
    tasks = [stream.check_task(t) for t in tasks]
    if not tasks or batch_size < 1 or (batches is not None and batches < 1):
        raise ValueError(f"need at least one task, batch_size ≥ 1 and batches ≥ 1 (or None: all), got tasks={tasks}, "
                         f"batch_size={batch_size}, batches={batches}")
    images = None if batches is None else batches * batch_size
    tests = [(x[:images], y[:images]) for x, y in (shuffled_test_set(stream, t, seed) for t in tasks)]
    firsts = [x[::batch_size] for x, _ in tests]
    chosen = infer_tasks(model, bank, torch.cat(firsts)).cpu().split([f.shape[0] for f in firsts])
    correct = [correct_per_batch(predict_batches(model, bank, x, masks, batch_size=batch_size) == y,
                                 batch_size=batch_size) for (x, y), masks in zip(tests, chosen)]
    per_task = gnu_score(padded(chosen, fill=-1), padded(correct), sizes=[y.shape[0] for _, y in tests],
                         true_tasks=None).tolist()
    return ProtocolResult(tasks, per_task, [m.tolist() for m in chosen], scored=[c.tolist() for c in correct])
