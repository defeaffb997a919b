"""Reproducible, resumable PermutedMNIST experiments at the paper's scale: GNu (§4.2, Fig. 3, 4) and NNs (§4.3).

CLI (notebook 04 calls the same :func:`gnu_permuted_mnist`)::

    python -m supsup_lite presets                                    # list the presets
    python -m supsup_lite preset lenet-250 --out runs/lenet-250      # one paper experiment, summary in results/
    python -m supsup_lite gnu_permuted_mnist --tasks 250 --model lenet_300_100 --outputs 100 \
        --objective H,G --batches 1000 --out runs/lenet250           # any GNu setting

The presets are named after the authors' scripts ``experiments/GNu/MNISTPerm/{LeNet-250,FC-250,LeNet-2500}`` and
``experiments/NNs/supsup.py`` in RAIVNLab/supsup (see :data:`PRESETS`). A run keeps its masks, state and full
results in its run folder (``--out``, resumed when it exists: finished tasks are not retrained, finished
checkpoints not re-evaluated, wall and CPU time are summed over the sessions); ``preset`` also writes the summary
``results/<preset>.json`` (and ``.csv``: one row per checkpoint).

**Run folders are trusted conservatively.** Every file in one (``results.json``, ``bank.pt``, ``gg_batches.pt``,
``learner.pt`` and ``learner/``) carries a format version and checksums and is written atomically
(``core.files``); a damaged one is refused by name. Resuming checks the files against each other and against the
settings: a missing or older file, counts that disagree, fewer tasks than trained, or other settings stop the run
with a ``RunFolderError`` that says what disagrees and how to continue, and nothing is written. The one
disagreement a kill can cause — a save interrupted between its files, leaving the bank or learner at most
``save_every`` tasks ahead of ``results.json`` — is resumed. ``--overwrite`` (``overwrite=True``) removes the run
files and starts over.

**GNu.** Masks are trained K = ``save_every`` tasks at once (``training.train_bank``); after every K tasks the bank
(``bank.pt``, bit-packed) and ``results.json`` are saved. At each checkpoint T (the authors' ``eval_ckpts``) the
evaluation is the paper's GNu protocol (:func:`protocols.gnu_score`): each task's test set, in a fixed shuffle
per task, is cut into batches of 128; One-Shot infers each batch's task from its first image over the T masks
learned so far (Eq. 4, the first images of ``TASKS_PER_PASS`` tasks in one batched pass); a correctly inferred
batch is classified with its own mask, a wrongly inferred one scores 0. The per-batch counts of a task's own mask
do not change with T, so they are measured once per task (``gg_batches.pt``; their sum is the GG accuracy).

**Sampled evaluation.** For large T (``sample_tasks``, ``sample_batches``) a checkpoint evaluates a seeded
uniform sample of ``sample_tasks`` of the T learned tasks and, of each, the first ``sample_batches`` batches of
its shuffled test set (a uniform sample of its images). The samples are nested: one seeded permutation of all
tasks, of which checkpoint T takes the first ``sample_tasks`` below T. Each sampled estimate comes with a 95 %
interval: Wilson's score interval for task-inference accuracy (one trial per inferred first image), and a
seeded percentile bootstrap (:data:`BOOTSTRAP_RESAMPLES` resamples) for GG accuracy: two-stage (tasks, then
batches within each) when tasks were sampled, else the sampled batches within each task; for GNu accuracy the
envelope of its own bootstrap and GG × P(inferred right) (:func:`gnu_interval`), so that inference failures too
rare to appear in the sample still widen the interval.

**NNs.** :class:`supsup_lite.scenarios.allocation.NNsLearner` on the stream of ``tasks`` PermutedMNIST tasks one
after another, ``batches`` per task, without task ids; its whole state (scores and RMSprop state of every mask,
the allocation log) is saved every ``save_every`` tasks in ``learner.pt``. Checkpoint T scores the masks of that
moment with :func:`~supsup_lite.scenarios.allocation.nns_accuracy` (shared labels) on data tasks 0..T−1.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import validation
from ..config import derive_seed, project_root
from ..config import device as default_device
from ..core.inference import Objective, alpha_gradient_each, entropy, superfluous_logsumexp
from ..core.files import DamagedFileError, load_json, load_tensors, save_json, save_tensors
from ..core.masks import MaskBank
from ..core.models import ARCHITECTURES, frozen_random_model
from ..core.training import predict, train_bank
from ..data.mnist import PermutedMNIST, load_mnist
from .allocation import EPSILON, Check, NNsLearner, nns_accuracy, task_sequence_batches
from .protocols import correct_per_batch, gnu_score, infer_tasks, shuffled_test_set, task_weights, test_order

OBJECTIVES: dict[str, Objective] = {"H": entropy, "G": superfluous_logsumexp}
MODEL_ALIASES = {"lenet": "lenet_300_100", "fc1024": "fc_1024_1024"}
TASKS_PER_PASS = 50        # tasks whose first test images go through one batched One-Shot pass (≈ 4000 images)
REAL_CLASSES = 10          # PermutedMNIST labels: outputs beyond these are the superfluous neurons of G
BOOTSTRAP_RESAMPLES = 2000
Z_95 = 1.959963984540054   # the standard normal's 97.5 % quantile
Z_975 = 2.241402727604947  # its 98.75 % quantile: two 97.5 % intervals, combined by Bonferroni, cover ≥ 95 %
# Settings a resumed run must share with the saved one (they decide the masks or the evaluation).
FIXED_SETTINGS = ("model", "outputs", "batches", "batch_size", "lr", "seed", "data_seed", "save_every",
                  "test_batch_size", "eval_seed", "sample_tasks", "sample_batches")
NNS_FIXED_SETTINGS = FIXED_SETTINGS + ("tasks", "budget", "epsilon", "check_every", "min_slots")
# The files of a run folder (``--overwrite`` removes exactly these), and their formats.
RUN_FILES = ("results.json", "bank.pt", "gg_batches.pt", "learner.pt", "learner")
RESULTS_FORMAT, GG_FORMAT, LEARNER_FORMAT, SLOT_FORMAT = (
    "supsup-lite-results", "supsup-lite-gg-batches", "supsup-lite-nns-learner", "supsup-lite-nns-slot")
RESULTS_VERSION = GG_VERSION = LEARNER_VERSION = 1


class RunFolderError(ValueError):
    """The files of a run folder disagree with each other or with the settings asked for."""


def load_results(out: str | Path) -> dict[str, Any]:
    """The results dict a run saved in ``out/results.json`` (format, version and checksum checked)."""
    return load_json(Path(out) / "results.json", kind=RESULTS_FORMAT, version=RESULTS_VERSION, what="results file")


def paper_eval_ckpts(tasks: int) -> tuple[int, ...]:
    """The authors' ``eval_ckpts`` plus the end: 10 and every fifth of the run (250 → 10, 50, 100, …, 250)."""
    return tuple(sorted({min(10, tasks)} | {max(1, round(tasks * k / 5)) for k in range(1, 6)}))


@dataclass(frozen=True)
class RunSettings:
    """The settings every PermutedMNIST run of the CLI shares (GNu and NNs).

    tasks: number of permutations learned; model: ``lenet_300_100`` | ``fc_1024_1024`` (aliases ``lenet``,
    ``fc1024``); outputs: s, the output size; batches, batch_size, lr: RMSprop training per task; seed: base network
    seed and run seed of the masks (task t's scores and batches: ``derive_seed(seed, t, …)``); data_seed:
    PermutedMNIST task t uses ``RandomState(data_seed + t)`` (the paper's scripts: 1); test_batch_size, eval_seed:
    the evaluation batches (task t's test images in the order ``protocols.test_order``); checkpoints: task counts
    at which to evaluate (default :func:`paper_eval_ckpts`); save_every: tasks between saves (GNu: K, tasks trained
    at once); sample_tasks, sample_batches: evaluate a seeded sample of that many tasks / first test batches per
    task at each checkpoint (None: all, the paper's protocol).
    """

    tasks: int = 250
    model: str = "lenet_300_100"
    outputs: int = 100
    batches: int = 1000
    batch_size: int = 128
    lr: float = 1e-4
    seed: int = 0
    data_seed: int = 1
    test_batch_size: int = 128
    eval_seed: int = 0
    checkpoints: tuple[int, ...] | None = None
    save_every: int = 10
    sample_tasks: int | None = None
    sample_batches: int | None = None

    def __post_init__(self) -> None:
        set_ = lambda key, value: object.__setattr__(self, key, value)  # noqa: E731 (frozen dataclass)
        set_("model", MODEL_ALIASES.get(self.model, self.model))
        set_("checkpoints", tuple(sorted(set(self.checkpoints or paper_eval_ckpts(self.tasks)) | {self.tasks})))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending setting and what is expected."""
        if self.model not in ARCHITECTURES:
            raise ValueError(f"unknown model {self.model!r}; choose one of {sorted(ARCHITECTURES)} "
                             f"(or the aliases {sorted(MODEL_ALIASES)})")
        for key in ("tasks", "batches", "batch_size", "test_batch_size", "save_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        for key in ("sample_tasks", "sample_batches"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be ≥ 1, or None to evaluate all; got {getattr(self, key)}")
        if self.outputs < REAL_CLASSES:
            raise ValueError(f"outputs must be ≥ {REAL_CLASSES} (the digit classes), got {self.outputs}")
        if not 1 <= self.checkpoints[0] <= self.checkpoints[-1] <= self.tasks:
            raise ValueError(f"checkpoints must lie in 1..tasks={self.tasks}, got {self.checkpoints}")


@dataclass(frozen=True)
class GNuConfig(RunSettings):
    """One GNu PermutedMNIST run (see :class:`RunSettings`). Defaults: the authors' LeNet-250 scripts (1000 batches
    of 128, RMSprop 1e-4). objectives: any of ``H`` (entropy) and ``G`` (superfluous logsumexp, needs s > 10),
    evaluated on the same bank."""

    objectives: tuple[str, ...] = ("H", "G")

    def __post_init__(self) -> None:
        object.__setattr__(self, "objectives", tuple(self.objectives))
        super().__post_init__()

    def validate(self) -> None:  # noqa: D102
        super().validate()
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown or not self.objectives:
            raise ValueError(f"objectives must be a non-empty subset of {sorted(OBJECTIVES)}, got {self.objectives}")
        if "G" in self.objectives and self.outputs <= REAL_CLASSES:
            raise ValueError(f"objective G needs superfluous outputs: outputs must be > {REAL_CLASSES}, "
                             f"got {self.outputs} (use objective H)")


@dataclass(frozen=True)
class NNsConfig(RunSettings):
    """One Scenario NNs PermutedMNIST run (see :class:`RunSettings`). Defaults: the authors'
    ``experiments/NNs/supsup.py`` (§4.3).

    tasks data tasks are streamed one after another, ``batches`` batches of ``batch_size`` each (the i-th task's
    batches seeded with ``derive_seed(seed, i, "batches")``); the learner checks for a new task every
    ``check_every`` batches (n·max softmax(−∂H/∂α) < 1 + ``epsilon``, padded to ``min_slots`` slots) and allocates
    at most ``budget`` masks; save_every: tasks between saves of the learner state.
    """

    tasks: int = 2500
    outputs: int = 500
    save_every: int = 50
    budget: int = 2500
    epsilon: float = EPSILON
    check_every: int = 100
    min_slots: int = 5

    def validate(self) -> None:  # noqa: D102
        super().validate()
        if self.budget < 1 or self.check_every < 1 or not math.isfinite(self.epsilon) or self.epsilon < 0:
            raise ValueError(f"budget and check_every must be ≥ 1 and epsilon a finite number ≥ 0; got "
                             f"budget={self.budget}, check_every={self.check_every}, epsilon={self.epsilon}")


@dataclass(frozen=True)
class Preset:
    """A named experiment: its settings, what it reproduces, and how it differs from the paper."""

    name: str
    config: GNuConfig | NNsConfig
    reproduces: str
    differs: str


_LAPTOP_2500 = "laptop budget: {batches} batches per task instead of 1000; " \
               "checkpoints evaluated on a seeded sample of {tasks} tasks × {images} test images, with 95 % intervals"
PRESETS: dict[str, Preset] = {preset.name: preset for preset in (
    Preset("lenet-250", GNuConfig(tasks=250, model="lenet_300_100", outputs=100),
           "experiments/GNu/MNISTPerm/LeNet-250/supsup_{h,g}: Fig. 3 (left)", "none (the paper's setting)"),
    Preset("fc-250", GNuConfig(tasks=250, model="fc_1024_1024", outputs=500),
           "experiments/GNu/MNISTPerm/FC-250/supsup_{h,g}: Fig. 3 (right), 94.91 % after 250 tasks (§4.2)",
           "none (the paper's setting)"),
    Preset("lenet-2500", GNuConfig(tasks=2500, model="lenet_300_100", outputs=500, save_every=50),
           "experiments/GNu/MNISTPerm/LeNet-2500/supsup_{h,g}: Fig. 4 (GNu), 2500 tasks", "none (for a GPU)"),
    Preset("lenet-2500-laptop", GNuConfig(tasks=2500, model="lenet_300_100", outputs=500, batches=200,
                                          save_every=50, sample_tasks=200, sample_batches=10),
           "experiments/GNu/MNISTPerm/LeNet-2500/supsup_{h,g}: Fig. 4 (GNu), 2500 tasks",
           _LAPTOP_2500.format(batches=200, tasks=200, images=1280)),
    Preset("nns-2500-laptop", NNsConfig(tasks=2500, budget=2500, batches=100, save_every=100, sample_tasks=100,
                                        sample_batches=10),
           "experiments/NNs/supsup.py: Fig. 4 (NNs), 2500 tasks, budget 2500 masks",
           "laptop budget: 100 batches per task instead of 1000, so one allocation check per task instead of ten; "
           "checkpoints evaluated on a seeded sample of 100 tasks × 1280 test images, with 95 % intervals"),
)}


def gg_batch_correct(model: nn.Module, bank: MaskBank, stream: PermutedMNIST, task: int, batch_size: int,
                     seed: int) -> torch.Tensor:
    """Images that task ``task``'s own mask classifies right in each of its test batches: (⌈N/batch_size⌉,) float.

    The batches are those of ``protocols.gnu_accuracy`` (test set in the order of ``protocols.test_order``).
    """
    x, y = shuffled_test_set(stream, task, seed)
    return correct_per_batch(predict(model, task_weights(model, bank, task), x) == y, batch_size=batch_size)


def first_test_images(stream: PermutedMNIST, task: int, batch_size: int, seed: int) -> torch.Tensor:
    """The first image of every test batch of ``protocols.shuffled_test_set(stream, task, seed)``, i.e. the images
    One-Shot sees: (⌈N/batch_size⌉, 784). Indexes before transforming, so the test set is never materialised."""
    images, _ = load_mnist(False, "cpu")
    order = test_order(images.shape[0], task, seed)
    return stream.transform(task, images[order[::batch_size]].to(stream.device))


def first_image_picks(model: nn.Module, bank: MaskBank, stream: PermutedMNIST, *, tasks: Sequence[int],
                      objective: str, num_tasks: int, batch_size: int = 128, seed: int = 0,
                      batches: int | None = None, progress: bool = False) -> torch.Tensor:
    """One-Shot's task (Eq. 4, argmin_t ∂objective/∂α_t at α = 1/T over the first T = ``num_tasks`` masks) for the first
    image of each of the first ``batches`` test batches (all by default) of every task in ``tasks``: (len(tasks),
    batches) int64 on the CPU. The batches are those of :func:`first_test_images`; the first images of
    ``TASKS_PER_PASS`` tasks go through one batched pass. ``objective``: a key of :data:`OBJECTIVES`."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    tasks, inferred = list(tasks), []
    for start in tqdm(range(0, len(tasks), TASKS_PER_PASS), disable=not progress, leave=False,
                      desc=f"One-Shot {objective} over {num_tasks} masks"):
        firsts = torch.cat([first_test_images(stream, t, batch_size, seed)[:batches]
                            for t in tasks[start:start + TASKS_PER_PASS]])
        inferred.append(infer_tasks(model, bank, firsts, objective=OBJECTIVES[objective], num_tasks=num_tasks).cpu())
    return torch.cat(inferred).view(len(tasks), -1)


# --- sampled evaluation ------------------------------------------------------------------------------------
def sampled_tasks(total: int, learned: int, sample: int | None, *, seed: int) -> list[int]:
    """The tasks a checkpoint after ``learned`` tasks evaluates: all of 0..learned−1 (``sample`` None or ≥ learned),
    else the first ``sample`` tasks below ``learned`` of one seeded permutation of 0..total−1 (sorted).

    The elements below ``learned`` of a uniform permutation of 0..total−1 are a uniform permutation of
    0..learned−1, so each checkpoint's sample is uniform and later checkpoints reuse earlier tasks.
    """
    if sample is None or sample >= learned:
        return list(range(learned))
    order = torch.randperm(total, generator=torch.Generator().manual_seed(derive_seed(seed, 0, "evaluation")))
    return sorted(order[order < learned][:sample].tolist())


def wilson_interval(successes: int, trials: int, *, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion (95 % by default): (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²))
    / (1 + z²/n)."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 ≤ successes ≤ trials and trials ≥ 1, got {successes} of {trials}")
    p, n = successes / trials, trials
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def bootstrap_interval(values: torch.Tensor, *, resample: Literal["tasks", "batches"], seed: int,
                       resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of mean_i mean_b values[i, b]. values: (tasks, batches), e.g. the per-batch
    accuracies of the sampled batches, or (tasks, 1) per-task accuracies.

    ``resample="tasks"`` is a two-stage bootstrap: rows (tasks) with replacement, then the columns (batches) of
    each drawn row with replacement — the sampled tasks are a sample of the learned ones, and each task's batches a
    sample of its test set; ``"batches"`` keeps every row and draws its columns with replacement (all tasks
    evaluated, a sample of each one's batches). Seeded: the same values and seed give the same interval.
    """
    if values.dim() != 2 or values.numel() == 0:
        raise ValueError(f"values must be a non-empty (tasks, batches) table, got shape {tuple(values.shape)}")
    gen = torch.Generator().manual_seed(seed)
    values = values.double().cpu()
    rows, cols = values.shape
    if resample == "tasks":
        drawn = values[torch.randint(rows, (resamples, rows), generator=gen)]  # (resamples, rows, cols)
        picks = torch.randint(cols, (resamples, rows, cols), generator=gen)
        means = drawn.gather(2, picks).mean((1, 2))
    elif resample == "batches":
        picks = torch.randint(cols, (resamples, rows, cols), generator=gen)
        means = values.expand(resamples, rows, cols).gather(2, picks).mean((1, 2))
    else:
        raise ValueError(f"resample must be 'tasks' or 'batches', got {resample!r}")
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def gnu_interval(bootstrap: tuple[float, float], gg: tuple[float, float],
                 inference: tuple[float, float]) -> tuple[float, float]:
    """95 % interval of a sampled GNu accuracy: the envelope of its own bootstrap interval and GG × P(inferred
    right), each factor's interval at 97.5 % (Bonferroni).

    GNu ≈ GG · P(right task) when a batch's accuracy does not depend on whether its task was inferred right. A
    sample with no inference failure gives a bootstrap interval that cannot see failures at all; the product with
    the task-inference interval keeps the rare failures a larger sample would find inside the interval.
    """
    return min(bootstrap[0], gg[0] * inference[0]), max(bootstrap[1], gg[1] * inference[1])


def sample_summary(learned: int, tasks: Sequence[int], batches: int, batch_size: int, *,
                   inference: bool) -> dict[str, Any]:
    """What a sampled checkpoint evaluated (``tasks`` of the ``learned``, ``batches`` test batches of each) and how
    its 95 % intervals are computed; ``inference``: whether a task-inference accuracy (Wilson) is reported."""
    resampled = ("resampling the sampled tasks, then the batches within each" if len(tasks) < learned
                 else "resampling batches within each task")
    wilson = "Wilson score interval for task inference (one trial per inferred first image); " if inference else ""
    return {"tasks": len(tasks), "of_tasks": learned, "batches_per_task": batches,
            "images_per_task": batches * batch_size, "inferred_images": len(tasks) * batches,
            "interval": f"95 %: {wilson}percentile bootstrap ({BOOTSTRAP_RESAMPLES} resamples, seeded) for "
                        f"accuracies, {resampled}" + ("; GNu: the envelope of its bootstrap and GG × P(inferred "
                                                      "right) at 97.5 % each" if inference else "")}


# --- machine and code ----------------------------------------------------------------------------------------
def hardware() -> dict[str, Any]:
    """Where the run happens: device, processor, torch threads, versions."""
    dev = default_device()
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (MB) and, on CUDA, peak GPU memory allocated by torch."""
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if default_device().type == "cuda":
        peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def git_commit() -> str | None:
    """The checkout's commit (``+dirty`` when tracked files differ from it), or None outside a git checkout."""
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=project_root(), capture_output=True,  # noqa: E731
                                           text=True, timeout=10, check=True).stdout.strip()
        return run("rev-parse", "HEAD") + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def model_and_stream(config: RunSettings, *,
                     device: torch.device | str | None = None) -> tuple[nn.Module, PermutedMNIST]:
    """The frozen random network (``config.model``, s = ``config.outputs``, seed ``config.seed``) and the PermutedMNIST
    stream (``config.tasks`` tasks, data seed ``config.data_seed``) of a run with ``config``, on ``device`` (default
    ``config.device()``): what every run of the CLI trains and evaluates on, so a saved ``bank.pt`` fits them."""
    device = default_device() if device is None else torch.device(device)
    return (frozen_random_model(config.model, config.outputs, config.seed, device),
            PermutedMNIST(config.tasks, seed=config.data_seed, device=device))


class _Session:
    """Shared plumbing of a resumable run: wall and CPU clocks summed over sessions, atomic JSON, hardware log."""

    results: dict[str, Any]
    out: Path | None

    def _start(self, config: RunSettings, out: str | Path | None, progress: bool, overwrite: bool) -> None:
        """Start the clocks, open the run folder, and build the frozen model and the task stream of ``config``."""
        self._clock, self._cpu_clock = time.perf_counter(), time.process_time()
        self.config, self.progress = config, progress
        self._open_folder(out, overwrite)
        self.device = default_device()
        self.model, self.stream = model_and_stream(config, device=self.device)

    def _open_results(self, experiment: str, fixed: Sequence[str]) -> None:
        """Fresh results, or the saved ones of the run folder (checked against the ``fixed`` settings) and the
        session's files resumed (``_resume``); counts this session."""
        self.results = _new_results(experiment, self.config)
        saved = self._load_saved(fixed, self.config)
        if saved is not None:
            self._resume(saved)
        self.results["sessions"] += 1

    def _resume(self, saved: dict[str, Any]) -> None:
        """Load this kind of run's own files and check them against the saved results (each run defines it)."""
        raise NotImplementedError

    def _tick(self) -> None:
        now, cpu_now = time.perf_counter(), time.process_time()
        self.results["wall_seconds"] += now - self._clock
        self.results["cpu_seconds"] += cpu_now - self._cpu_clock
        self._clock, self._cpu_clock = now, cpu_now

    def _now(self) -> dict[str, float]:
        return {"wall_seconds": self.results["wall_seconds"] + time.perf_counter() - self._clock,
                "cpu_seconds": self.results["cpu_seconds"] + time.process_time() - self._cpu_clock}

    def _open_folder(self, out: str | Path | None, overwrite: bool) -> None:
        """Check the run folder ``out`` (a writable folder; created when missing) and, with ``overwrite``, remove the
        run files a previous run left there (only those: :data:`RUN_FILES`)."""
        self.out = None if out is None else validation.output_folder("out", out)
        if self.out is not None and overwrite:
            for name in RUN_FILES:
                path = self.out / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)

    def _found(self, *names: str) -> list[str]:
        return [name for name in names if self.out is not None and (self.out / name).exists()]

    def _refuse(self, problem: str, fix: str = "restore the missing or older file from a copy") -> RunFolderError:
        """The error for a run folder whose files disagree: what disagrees, and how to continue."""
        return RunFolderError(f"{self.out}: {problem}. Nothing was changed; to continue, {fix}, use another --out, "
                              f"or pass --overwrite (overwrite=True) to start this run over (its files are replaced)")

    def _load_saved(self, fixed: Sequence[str], config: Any) -> dict[str, Any] | None:
        """The saved ``results.json`` of the run folder (None for a new run), checked against the settings."""
        if self.out is None:
            return None
        if not (self.out / "results.json").exists():
            others = self._found(*RUN_FILES)
            if others:
                raise self._refuse(f"the folder holds {', '.join(others)} but no results.json, so nothing says "
                                   f"which run they belong to or what was evaluated")
            return None
        try:
            saved = load_results(self.out)
        except DamagedFileError as err:
            raise DamagedFileError(f"{err}; restore results.json from a copy, or pass --overwrite "
                                   f"(overwrite=True) to start the run over") from err
        if saved.get("experiment") != self.results["experiment"]:
            raise RunFolderError(f"{self.out} holds a {saved.get('experiment')} run, not {self.results['experiment']}; "
                                 f"use another --out")
        differ = {k: (saved["config"].get(k), getattr(config, k)) for k in fixed
                  if saved["config"].get(k) != getattr(config, k)}
        if differ:
            raise RunFolderError(f"{self.out} holds a run with other settings (saved, asked): {differ}; use another "
                                 f"--out, or pass --overwrite (overwrite=True) to start over with these settings")
        trained = int(saved["tasks_trained"])
        if config.tasks < trained:
            raise self._refuse(f"the run has trained {trained} tasks but tasks={config.tasks} was asked, and saving "
                               f"would drop the masks and numbers of the tasks beyond", f"ask for tasks ≥ {trained}")
        for key in ("train_seconds", "eval_seconds", "wall_seconds", "cpu_seconds", "train_seconds_at",
                    "checkpoints", "sessions"):
            self.results[key] = saved.get(key, self.results[key])
        self.results["hardware_history"] = saved.get("hardware_history", []) + [saved["hardware"]]
        return saved

    def _write_json(self) -> None:
        if self.out is not None:
            save_json(self.out / "results.json", self.results, kind=RESULTS_FORMAT, version=RESULTS_VERSION)

    def result(self, tasks: int, objective: str) -> dict[str, Any] | None:
        """The saved result of checkpoint ``tasks`` with ``objective``, or None."""
        return next((r for r in self.results["checkpoints"]
                     if r["tasks"] == tasks and r["objective"] == objective), None)

    def _add_record(self, record: dict[str, Any]) -> None:
        self.results["checkpoints"].append(record)
        self.results["checkpoints"].sort(key=lambda r: (r["objective"], r["tasks"]))


def _new_results(experiment: str, config: Any) -> dict[str, Any]:
    return {"experiment": experiment, "config": json.loads(json.dumps(asdict(config))), "hardware": hardware(),
            "git_commit": git_commit(), "sessions": 0, "tasks_trained": 0, "train_seconds": 0.0,
            "eval_seconds": 0.0, "wall_seconds": 0.0, "cpu_seconds": 0.0, "train_seconds_at": {},
            "checkpoints": [], "complete": False}


def _accuracy_record(*, per_batch: torch.Tensor, per_task: torch.Tensor, sampled: bool, by: str,
                     batches_sampled: bool, seed: int, level: float = 0.95) -> tuple[float, list[float] | None]:
    """Mean accuracy over the evaluated tasks and, when sampled, its bootstrap interval: over the per-batch table
    when batches were sampled (all full batches), else over the exact per-task values."""
    value = per_task.mean().item()
    if not sampled:
        return value, None
    table = per_batch if batches_sampled else per_task[:, None]
    return value, list(bootstrap_interval(table, resample=by, seed=seed, level=level))


class GNuRun(_Session):
    """The state of one GNu run: frozen model, task stream, mask bank, results (JSON-ready).

    With ``out`` set, everything is saved there and an existing run in ``out`` is resumed.
    """

    def __init__(self, config: GNuConfig, out: str | Path | None = None, progress: bool = True, *,
                 overwrite: bool = False) -> None:
        self._start(config, out, progress, overwrite)
        self.bank = MaskBank.for_model(self.model, stream=self.stream)
        self._bank_saved = self.bank.version  # the bank's version in bank.pt: unchanged banks are not rewritten
        self.num_test = self.stream.test_set(0)[1].shape[0]
        self.num_batches = -(-self.num_test // config.test_batch_size)
        # per-batch counts of each task's own mask (NaN: not measured yet)
        self.gg_batches = torch.full((config.tasks, self.num_batches), math.nan, device=self.device)
        self._open_results("gnu_permuted_mnist", FIXED_SETTINGS)

    # --- files ------------------------------------------------------------------------------------
    def _resume(self, saved: dict[str, Any]) -> None:
        """Load ``bank.pt`` and ``gg_batches.pt`` and check them against ``results.json`` (saved). A kill between the
        writes of one save may leave the bank and the GG counts up to ``save_every`` tasks ahead of the results;
        anything else that disagrees stops the run (:meth:`_refuse`)."""
        trained, c = int(saved["tasks_trained"]), self.config
        if not (self.out / "bank.pt").exists():
            if trained or self._found("gg_batches.pt"):
                raise self._refuse(f"results.json records {trained} trained tasks but bank.pt, their masks, is missing")
            return
        bank = MaskBank.load(self.out / "bank.pt", device=self.device)
        bank.check_compatible(self.model)
        bank.check_stream(self.stream)
        if not trained <= len(bank) <= min(trained + c.save_every, c.tasks):
            raise self._refuse(f"bank.pt holds {len(bank)} tasks but results.json records {trained} trained (a save "
                               f"interrupted between the two leaves the bank at most save_every={c.save_every} "
                               f"ahead, within tasks={c.tasks})")
        self.bank, self._bank_saved = bank, bank.version
        self.results["tasks_trained"] = len(bank)
        if not len(bank):
            return
        if not (self.out / "gg_batches.pt").exists():
            raise self._refuse(f"bank.pt holds {len(bank)} tasks but gg_batches.pt, their per-batch GG counts, is "
                               f"missing")
        meta, tensors = load_tensors(self.out / "gg_batches.pt", kind=GG_FORMAT, version=GG_VERSION,
                                     what="per-batch GG file")
        counts = tensors.get("gg_batches")
        expected = {"test_batch_size": c.test_batch_size, "eval_seed": c.eval_seed}
        if ({k: meta.get(k) for k in expected} != expected or counts is None or counts.dim() != 2
                or counts.shape[1] != self.num_batches or not trained <= counts.shape[0] <= len(bank)):
            raise self._refuse(f"gg_batches.pt holds {tuple(getattr(counts, 'shape', ()))} counts for "
                               f"{ {k: meta.get(k) for k in expected} }, but the run needs ({trained}..{len(bank)}, "
                               f"{self.num_batches}) for {expected}")
        recorded = saved.get("gg_per_task") or []
        if len(recorded) < trained:
            raise self._refuse(f"results.json lists GG accuracies of {len(recorded)} tasks but {trained} are trained")
        accuracy = (counts.sum(1) / self.num_test).tolist()
        differ = [t for t, value in enumerate(recorded[:counts.shape[0]])
                  if value is not None and not abs(accuracy[t] - value) <= 0.5 / self.num_test]  # half an image
        if differ:
            raise self._refuse(f"gg_batches.pt and results.json disagree on the GG accuracy of tasks {differ[:5]}"
                               f"{' …' if len(differ) > 5 else ''}")
        self.gg_batches[:counts.shape[0]] = counts.to(self.device)

    def save(self) -> None:
        """Write ``bank.pt`` (when it changed), ``gg_batches.pt`` and ``results.json``, in that order, each atomically
        and with a checksum, when ``out`` is set."""
        self._tick()
        gg = (self.gg_batches[:len(self.bank)].sum(1) / self.num_test).tolist()
        self.results["gg_per_task"] = [None if math.isnan(v) else v for v in gg]  # None: not measured (sampled)
        self.results["complete"] = all(self.result(t, o) is not None
                                       for t in self.config.checkpoints for o in self.config.objectives)
        if self.out is None:
            return
        if len(self.bank):
            if self.bank.version != self._bank_saved:
                self.bank.save(self.out / "bank.pt")
                self._bank_saved = self.bank.version
            save_tensors(self.out / "gg_batches.pt", kind=GG_FORMAT, version=GG_VERSION,
                         metadata={"test_batch_size": self.config.test_batch_size, "eval_seed": self.config.eval_seed},
                         tensors={"gg_batches": self.gg_batches[:len(self.bank)]})
        self._write_json()

    # --- training -----------------------------------------------------------------------------------
    def chunk_ends(self, tasks: int) -> list[int]:
        """Where training stops to save on the way to ``tasks``: multiples of ``save_every`` and checkpoints."""
        stops = set(range(self.config.save_every, tasks, self.config.save_every)) | set(self.config.checkpoints)
        return sorted(stop for stop in stops | {tasks} if len(self.bank) < stop <= tasks)

    def train_until(self, tasks: int, bar: tqdm | None = None) -> None:
        """Train tasks len(bank)..tasks−1, ``save_every`` at a time, saving after each chunk."""
        c = self.config
        for stop in self.chunk_ends(tasks):
            start, began = len(self.bank), time.perf_counter()
            train_bank(self.model, self.stream, num_tasks=stop, k=stop - start, num_batches=c.batches,
                       batch_size=c.batch_size, lr=c.lr, seed=c.seed, bank=self.bank, progress=False)
            self.results["train_seconds"] += time.perf_counter() - began
            self.results["train_seconds_at"][str(stop)] = self.results["train_seconds"]
            self.results["tasks_trained"] = len(self.bank)
            if c.sample_tasks is None:  # every task is evaluated: measure its GG counts while it is new
                self.measure_gg(range(start, stop))
            self.save()
            if bar is not None:
                bar.update(stop - start)

    def measure_gg(self, tasks: Sequence[int]) -> None:
        """Per-batch GG counts (``gg_batches``) of those of ``tasks`` that have none yet."""
        c = self.config
        for t in tasks:
            if bool(self.gg_batches[t].isnan().any()):
                self.gg_batches[t] = gg_batch_correct(self.model, self.bank, self.stream, t, c.test_batch_size,
                                                      c.eval_seed)

    # --- evaluation ---------------------------------------------------------------------------------
    def evaluation_plan(self, tasks: int) -> tuple[list[int], int]:
        """The tasks checkpoint ``tasks`` evaluates and how many test batches of each (see :func:`sampled_tasks`)."""
        c = self.config
        chosen = sampled_tasks(c.tasks, tasks, c.sample_tasks, seed=c.eval_seed)
        return chosen, min(c.sample_batches or self.num_batches, self.num_batches)

    def inferred_tasks(self, tasks: int, objective: str, evaluated: Sequence[int] | None = None,
                       batches: int | None = None) -> torch.Tensor:
        """One-Shot's task for the first ``batches`` test batches (all by default) of each ``evaluated`` task (default
        0..T−1) over the first T = ``tasks`` masks: :func:`first_image_picks` with the run's evaluation settings."""
        c = self.config
        return first_image_picks(self.model, self.bank, self.stream,
                                 tasks=list(range(tasks)) if evaluated is None else evaluated, objective=objective,
                                 num_tasks=tasks, batch_size=c.test_batch_size, seed=c.eval_seed,
                                 batches=self.num_batches if batches is None else batches, progress=self.progress)

    def evaluate(self, tasks: int, objective: str) -> dict[str, Any]:
        """The GNu protocol at checkpoint ``tasks`` with ``objective`` (:func:`protocols.gnu_score`: a wrongly
        inferred batch scores 0), on every task or on the seeded sample of :meth:`evaluation_plan`."""
        began, c = time.perf_counter(), self.config
        evaluated, batches = self.evaluation_plan(tasks)
        sampled = len(evaluated) < tasks or batches < self.num_batches
        self.measure_gg(evaluated)
        inferred = self.inferred_tasks(tasks, objective, evaluated, batches)
        own = self.gg_batches[evaluated][:, :batches].cpu()
        sizes = own.new_full((len(evaluated),), float(self.num_test if batches == self.num_batches
                                                      else batches * c.test_batch_size))
        gnu = gnu_score(inferred, own, sizes=sizes, true_tasks=evaluated)
        gg = own.double().sum(1) / sizes.double()
        right = inferred == torch.tensor(evaluated)[:, None]
        by = "tasks" if len(evaluated) < tasks else "batches"
        seed = derive_seed(c.eval_seed, tasks, "evaluation")
        scored = own * right / c.test_batch_size   # per-batch accuracy (all full batches when batches are sampled)
        settings = dict(sampled=sampled, by=by, batches_sampled=batches < self.num_batches, seed=seed)
        gnu_value, gnu_ci = _accuracy_record(per_batch=scored, per_task=gnu, **settings)
        gg_value, gg_ci = _accuracy_record(per_batch=own / c.test_batch_size, per_task=gg, **settings)
        if sampled:
            _, gg_ci_975 = _accuracy_record(per_batch=own / c.test_batch_size, per_task=gg, level=0.975, **settings)
            gnu_ci = list(gnu_interval(gnu_ci, gg_ci_975, wilson_interval(int(right.sum()), right.numel(), z=Z_975)))
        seconds = time.perf_counter() - began
        self.results["eval_seconds"] += seconds
        record = {"tasks": tasks, "objective": objective, "gnu_accuracy": gnu_value,
                  "task_inference_accuracy": right.double().mean().item(), "gg_accuracy": gg_value,
                  "eval_seconds": seconds, "train_seconds": self.results["train_seconds_at"].get(str(tasks)),
                  **self._now(), "bank_bytes": tasks * self.bank.bytes_per_task, **peak_memory(),
                  "per_task_gnu_accuracy": [round(v, 5) for v in gnu.tolist()],
                  "per_task_inference_accuracy": [round(v, 5) for v in right.double().mean(1).tolist()]}
        if sampled:
            record |= {"evaluated_tasks": evaluated,
                       "sample": sample_summary(tasks, evaluated, batches, c.test_batch_size, inference=True),
                       "ci95": {"gnu_accuracy": gnu_ci, "gg_accuracy": gg_ci,
                                "task_inference_accuracy": list(wilson_interval(int(right.sum()), right.numel()))}}
        self._add_record(record)
        self.save()
        return record


def objective_disagreements(model: nn.Module, bank: MaskBank, stream: PermutedMNIST, *, tasks: Sequence[int],
                            num_tasks: int | None = None, batch_size: int = 128, seed: int = 0,
                            objectives: tuple[str, str] = ("H", "G")) -> list[dict[str, int]]:
    """The first test images (those One-Shot sees in the GNu evaluation) of ``tasks`` on which exactly one of the
    two ``objectives`` infers the true task, searching the first ``num_tasks`` masks (default: all in the bank).

    The picks are those of a run's evaluation at checkpoint ``num_tasks`` (:func:`first_image_picks`; a run's
    ``test_batch_size`` and ``eval_seed`` are ``batch_size`` and ``seed``). Returns one row per such image,
    ``{"task", "batch", a: a's pick, b: b's pick}`` for objectives (a, b), in task then batch order: a row whose
    ``a`` pick equals its task is an image a gets right and b wrong.
    """
    num_tasks = len(bank) if num_tasks is None else validation.integer("num_tasks", num_tasks, minimum=1,
                                                                       maximum=len(bank))
    tasks = [validation.integer("tasks[i]", t, minimum=0, maximum=num_tasks - 1) for t in tasks]
    if not tasks or len(set(objectives)) != 2 or not set(objectives) <= set(OBJECTIVES):
        raise ValueError(f"need a non-empty tasks list and two different objectives of {sorted(OBJECTIVES)}; got "
                         f"tasks={tasks}, objectives={objectives}")
    a, b = objectives
    picks = {o: first_image_picks(model, bank, stream, tasks=tasks, objective=o, num_tasks=num_tasks,
                                  batch_size=batch_size, seed=seed) for o in objectives}
    truth = torch.tensor(tasks)[:, None]
    differ = (picks[a] == truth) != (picks[b] == truth)
    return [{"task": tasks[i], "batch": j, a: int(picks[a][i, j]), b: int(picks[b][i, j])}
            for i, j in differ.nonzero().tolist()]


def first_image_gradient(model: nn.Module, bank: MaskBank, stream: PermutedMNIST, *, task: int, batch: int,
                         objective: str, num_tasks: int | None = None, batch_size: int = 128,
                         seed: int = 0) -> torch.Tensor:
    """∂objective/∂α at α = 1/T over the first T = ``num_tasks`` masks (default all) for the first image of test batch
    ``batch`` of task ``task`` (the image One-Shot sees there, :func:`first_test_images`): (T,) on the bank's
    device; its argmin is that image's pick in :func:`first_image_picks`."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    firsts = first_test_images(stream, validation.integer("task", task, minimum=0, maximum=stream.num_tasks - 1),
                               batch_size, seed)
    image = firsts[validation.integer("batch", batch, minimum=0, maximum=firsts.shape[0] - 1)][None]
    return alpha_gradient_each(model, bank, image, objective=OBJECTIVES[objective], num_tasks=num_tasks)[0]


def report_line(record: dict[str, Any]) -> str:
    """One line per checkpoint for the console."""
    ci = record.get("ci95") or {}
    interval = lambda key: (f" [{100 * ci[key][0]:.2f}, {100 * ci[key][1]:.2f}]" if ci.get(key) else "")  # noqa: E731
    main = "gnu_accuracy" if "gnu_accuracy" in record else "nns_accuracy"
    line = f"{record['tasks']:>5} tasks, {record['objective']}: {main.split('_')[0].upper()} " \
           f"{100 * record[main]:.2f} %{interval(main)}"
    if "task_inference_accuracy" in record:
        line += (f", task inference {100 * record['task_inference_accuracy']:.2f} %"
                 f"{interval('task_inference_accuracy')}, "
                 f"GG {100 * record['gg_accuracy']:.2f} %{interval('gg_accuracy')}")
    return line + f" (eval {record['eval_seconds']:.1f} s, wall {record['wall_seconds']:.0f} s)"


def _overall_bar(config: Any, done: int, progress: bool, what: str) -> tqdm:
    return tqdm(total=config.tasks, initial=done, disable=not progress, unit="task", desc=what, smoothing=0.1)


def gnu_permuted_mnist(config: GNuConfig, out: str | Path | None = None, progress: bool = True, *,
                       overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume, when ``out`` holds a saved run) GNu PermutedMNIST; return the results dict.

    For each checkpoint T in order: train up to T tasks (K = ``save_every`` at a time, saving as it goes), then
    evaluate every objective not yet evaluated at T. The dict is what ``out/results.json`` holds: ``config``,
    ``hardware``, ``git_commit``, ``train_seconds``, ``eval_seconds``, ``wall_seconds``, ``cpu_seconds`` (CPU time
    of this process, all threads; both summed over resumed sessions) and ``checkpoints``: one record per
    (T, objective) with ``gnu_accuracy``, ``task_inference_accuracy``, ``gg_accuracy``, per-task lists, timings,
    ``bank_bytes``, peak memory and, when sampled, ``evaluated_tasks``, ``sample`` and ``ci95``.

    A resumed folder must agree with itself and with ``config`` (else ``RunFolderError`` or ``DamagedFileError``
    says what disagrees, and nothing is written); ``overwrite=True`` removes its run files and starts over.
    """
    run = GNuRun(config, out, progress, overwrite=overwrite)
    run.save()
    with _overall_bar(config, len(run.bank), progress, "GNu PermutedMNIST") as bar:
        for tasks in config.checkpoints:
            run.train_until(tasks, bar)
            for objective in config.objectives:
                if run.result(tasks, objective) is None:
                    record = run.evaluate(tasks, objective)
                    if progress:
                        tqdm.write(report_line(record))
    run.save()
    return run.results


# --- Scenario NNs ------------------------------------------------------------------------------------------
def _slot_files_content(scores: dict[str, torch.Tensor], optimizer_state: dict) -> dict[str, Any]:
    """One mask's scores and RMSprop state as the metadata and tensors of a checked file (``files.save_tensors``):
    tensors ``scores/<name>`` and ``state/<param index>/<key>``, metadata the parameter groups and score names."""
    tensors = {f"scores/{name}": s.detach() for name, s in scores.items()}
    for index, entry in optimizer_state["state"].items():
        tensors |= {f"state/{index}/{key}": value for key, value in entry.items()}
    return {"metadata": {"param_groups": optimizer_state["param_groups"], "scores": list(scores)},
            "tensors": tensors}


def _slot_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of :func:`_slot_files_content`: (scores, optimizer state dict)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    return ({name: tensors[f"scores/{name}"] for name in meta["scores"]},
            {"state": state, "param_groups": meta["param_groups"]})


class NNsRun(_Session):
    """The state of one NNs run: frozen model, stream, :class:`NNsLearner` (saved in ``learner.pt``), results."""

    def __init__(self, config: NNsConfig, out: str | Path | None = None, progress: bool = True, *,
                 overwrite: bool = False) -> None:
        self._start(config, out, progress, overwrite)
        self.learner = NNsLearner(self.model, budget=config.budget, epsilon=config.epsilon,
                                  check_every=config.check_every, min_slots=config.min_slots, lr=config.lr,
                                  seed=config.seed)
        self.tasks_seen = 0
        self._slot_files: list[str] = []
        self._saved: tuple[int, int | None, int, int] = (0, None, 0, 0)  # log entries, live, batches, saves
        self._open_results("nns_permuted_mnist", NNS_FIXED_SETTINGS)

    def _resume(self, saved: dict[str, Any]) -> None:
        """Load ``learner.pt`` and its slot files and check them against ``results.json`` (saved): the learner may be
        up to ``save_every`` tasks ahead (a kill between the two writes), never behind."""
        trained, c = int(saved["tasks_trained"]), self.config
        if not (self.out / "learner.pt").exists():
            if trained or self._found("learner"):
                raise self._refuse(f"results.json records {trained} tasks learned but learner.pt, the learner's "
                                   f"state, is missing")
            return
        meta, _ = load_tensors(self.out / "learner.pt", kind=LEARNER_FORMAT, version=LEARNER_VERSION,
                               what="NNs learner state")
        if not trained <= meta["tasks_seen"] <= min(trained + c.save_every, c.tasks):
            raise self._refuse(f"learner.pt has seen {meta['tasks_seen']} tasks but results.json records {trained} "
                               f"(a save interrupted between the two leaves the learner at most "
                               f"save_every={c.save_every} ahead)")
        for file in meta["slot_files"]:
            path = self.out / "learner" / file
            if not path.exists():
                raise self._refuse(f"learner.pt lists the mask state {path.name}, which is missing from learner/")
            slot, tensors = load_tensors(path, kind=SLOT_FORMAT, version=LEARNER_VERSION, what="NNs mask state")
            self.learner.restore(*_slot_state(slot, tensors))
        self.learner.live, self.learner.batches_seen = meta["live"], meta["batches_seen"]
        self.learner.log = [Check(**check) for check in meta["log"]]
        self.tasks_seen = self.results["tasks_trained"] = meta["tasks_seen"]
        self._slot_files = list(meta["slot_files"])
        self._saved = (len(self.learner.log), self.learner.live, self.learner.batches_seen, meta["saves"])

    def save(self) -> None:
        """Write the learner state and ``results.json``. Each mask's scores and RMSprop state live in their own
        file ``learner/slot_<i>_<save number>.pt``, rewritten only when the mask trained since the last save; then
        ``learner.pt`` (the list of slot files, the log, the stream position) is replaced atomically, so a kill
        at any moment leaves the previous consistent state. Every file carries a format version and checksums."""
        self._tick()
        learner = self.learner
        self.results["masks"] = len(learner)
        self.results["complete"] = all(self.result(t, "H") is not None for t in self.config.checkpoints)
        if self.out is None:
            return
        (self.out / "learner").mkdir(parents=True, exist_ok=True)
        logged, live, seen, saves = self._saved
        dirty = set(range(len(self._slot_files), len(learner)))  # new masks, and those trained since the last save
        if learner.batches_seen != seen:
            dirty |= {check.mask for check in learner.log[logged:] if check.mask is not None} | ({live} - {None})
        files, stale = list(self._slot_files) + [None] * (len(learner) - len(self._slot_files)), []
        for slot in sorted(dirty):
            name = f"slot_{slot:05d}_{saves + 1}.pt"
            save_tensors(self.out / "learner" / name, kind=SLOT_FORMAT, version=LEARNER_VERSION,
                         **_slot_files_content(learner.scores[slot], learner.optimizers[slot].state_dict()))
            stale.append(files[slot])
            files[slot] = name
        meta = {"slot_files": files, "live": learner.live, "batches_seen": learner.batches_seen,
                "log": [asdict(check) for check in learner.log], "tasks_seen": self.tasks_seen, "saves": saves + 1}
        save_tensors(self.out / "learner.pt", kind=LEARNER_FORMAT, version=LEARNER_VERSION, metadata=meta, tensors={})
        for name in stale:
            if name is not None and name not in files:
                (self.out / "learner" / name).unlink(missing_ok=True)
        self._slot_files, self._saved = files, (len(learner.log), learner.live, learner.batches_seen, saves + 1)
        self._write_json()

    def learn_until(self, tasks: int, bar: tqdm | None = None) -> None:
        """Stream data tasks tasks_seen..tasks−1 to the learner, saving every ``save_every`` tasks."""
        c = self.config
        while self.tasks_seen < tasks:
            stop = min(tasks, (self.tasks_seen // c.save_every + 1) * c.save_every)
            began, start = time.perf_counter(), self.tasks_seen
            batches = task_sequence_batches(self.stream, range(start, stop), c.batches, c.batch_size, c.seed + start)
            self.learner.learn(batches, progress=False)
            self.tasks_seen = self.results["tasks_trained"] = stop
            self.results["train_seconds"] += time.perf_counter() - began
            self.results["train_seconds_at"][str(stop)] = self.results["train_seconds"]
            self.save()
            if bar is not None:
                bar.update(stop - start)

    def evaluate(self, tasks: int) -> dict[str, Any]:
        """NNs accuracy (shared labels, One-Shot H) of the current masks on data tasks 0..T−1, or on a sample."""
        began, c = time.perf_counter(), self.config
        evaluated = sampled_tasks(c.tasks, tasks, c.sample_tasks, seed=c.eval_seed)
        num_batches = -(-self.stream.test_set(0)[1].shape[0] // c.test_batch_size)
        batches = min(c.sample_batches or num_batches, num_batches)
        sampled = len(evaluated) < tasks or batches < num_batches
        result = nns_accuracy(self.model, self.learner.bank(), self.stream, tasks=evaluated,
                              batch_size=c.test_batch_size, seed=c.eval_seed,
                              batches=batches if batches < num_batches else None)
        per_task = torch.tensor(result.per_task, dtype=torch.float64)
        per_batch = torch.tensor([row[:batches] for row in result.scored]) / c.test_batch_size
        by = "tasks" if len(evaluated) < tasks else "batches"
        value, ci = _accuracy_record(per_batch=per_batch, per_task=per_task, sampled=sampled, by=by,
                                     batches_sampled=batches < num_batches,
                                     seed=derive_seed(c.eval_seed, tasks, "evaluation"))
        log = self.learner.log
        seconds = time.perf_counter() - began
        self.results["eval_seconds"] += seconds
        record = {"tasks": tasks, "objective": "H", "nns_accuracy": value, "masks": len(self.learner),
                  "checks": len(log), "allocations": sum(check.allocated for check in log),
                  "skipped_checks": sum(check.mask is None for check in log),
                  "eval_seconds": seconds, "train_seconds": self.results["train_seconds_at"].get(str(tasks)),
                  **self._now(), **peak_memory(), "per_task_nns_accuracy": [round(v, 5) for v in per_task.tolist()]}
        if sampled:
            record |= {"evaluated_tasks": evaluated,
                       "sample": sample_summary(tasks, evaluated, batches, c.test_batch_size, inference=False),
                       "ci95": {"nns_accuracy": ci}}
        self._add_record(record)
        self.save()
        return record


def nns_permuted_mnist(config: NNsConfig, out: str | Path | None = None, progress: bool = True, *,
                       overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) Scenario NNs on PermutedMNIST; return the results dict (``out/results.json``): as
    :func:`gnu_permuted_mnist` (resume checks and ``overwrite`` too), with per-checkpoint records of
    ``nns_accuracy`` (shared labels), masks allocated, checks made and checks skipped for want of budget."""
    run = NNsRun(config, out, progress, overwrite=overwrite)
    run.save()
    with _overall_bar(config, run.tasks_seen, progress, "NNs PermutedMNIST") as bar:
        for tasks in config.checkpoints:
            if run.tasks_seen > tasks:
                continue  # resumed past this checkpoint: it was evaluated before the save
            run.learn_until(tasks, bar)
            if run.result(tasks, "H") is None:
                record = run.evaluate(tasks)
                if progress:
                    tqdm.write(report_line(record))
    run.save()
    return run.results

# --- presets and results/ -----------------------------------------------------------------------------------
SUMMARY_COLUMNS = ("tasks", "objective", "gnu_accuracy", "gnu_ci95_low", "gnu_ci95_high", "task_inference_accuracy",
                   "task_inference_ci95_low", "task_inference_ci95_high", "gg_accuracy", "gg_ci95_low", "gg_ci95_high",
                   "nns_accuracy", "nns_ci95_low", "nns_ci95_high", "masks", "evaluated_tasks", "images_per_task",
                   "train_seconds", "eval_seconds", "wall_seconds", "cpu_seconds")


def run_experiment(config: GNuConfig | NNsConfig, out: str | Path | None = None,
                   progress: bool = True, *, overwrite: bool = False) -> dict[str, Any]:
    """Run or resume ``config`` (:func:`gnu_permuted_mnist` or :func:`nns_permuted_mnist`)."""
    runner = gnu_permuted_mnist if isinstance(config, GNuConfig) else nns_permuted_mnist
    return runner(config, out, progress, overwrite=overwrite)


def summary(preset: Preset, results: dict[str, Any], *, command: str) -> dict[str, Any]:
    """The committed summary of a run: settings, provenance, times and every checkpoint without per-task lists."""
    records = [{k: v for k, v in r.items() if not k.startswith("per_task") and k != "evaluated_tasks"}
               for r in results["checkpoints"]]
    keep = ("experiment", "config", "git_commit", "hardware", "hardware_history", "sessions", "tasks_trained",
            "masks", "train_seconds", "eval_seconds", "wall_seconds", "cpu_seconds", "complete")
    return {"preset": preset.name, "reproduces": preset.reproduces, "differs_from_paper": preset.differs,
            "command": command, **{k: results[k] for k in keep if k in results}, "checkpoints": records}


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per checkpoint record (the CSV of ``results/``): accuracies, intervals, sample, times."""
    rows = []
    for r in results["checkpoints"]:
        row = {k: r.get(k) for k in SUMMARY_COLUMNS}
        for key, prefix in (("gnu_accuracy", "gnu"), ("task_inference_accuracy", "task_inference"),
                            ("gg_accuracy", "gg"), ("nns_accuracy", "nns")):
            low, high = ((r.get("ci95") or {}).get(key) or (None, None))
            row[f"{prefix}_ci95_low"], row[f"{prefix}_ci95_high"] = low, high
        sample = r.get("sample")
        row["evaluated_tasks"] = sample["tasks"] if sample else r["tasks"]
        row["images_per_task"] = sample["images_per_task"] if sample else None
        rows.append(row)
    return rows


def write_summary(preset: Preset, results: dict[str, Any], *, command: str, folder: str | Path) -> Path:
    """Write ``<folder>/<preset>.json`` (:func:`summary`) and ``<folder>/<preset>.csv`` (:func:`summary_rows`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{preset.name}.json"
    path.write_text(json.dumps(summary(preset, results, command=command), indent=1) + "\n")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary_rows(results))
    (folder / f"{preset.name}.csv").write_text(text.getvalue())
    return path


def run_preset(name: str, *, out: str | Path | None = None, results_dir: str | Path | None = None,
               progress: bool = True, command: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run or resume preset ``name`` in ``out`` (default ``runs/<name>``) and write its summary to ``results_dir``
    (default ``<project>/results``). ``overwrite``: start the run over (see :func:`gnu_permuted_mnist`). Returns the
    full results dict."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    out = Path(out) if out is not None else Path("runs") / name
    results = run_experiment(preset.config, out, progress, overwrite=overwrite)
    command = command or f"python -m supsup_lite preset {name} --out {out}"
    write_summary(preset, results, command=command,
                  folder=results_dir if results_dir is not None else project_root() / "results")
    return results


def command_line(config: GNuConfig, out: str | Path | None = None) -> str:
    """The CLI command that runs ``config`` (settings that differ from the defaults, plus ``--out``)."""
    defaults, words = GNuConfig(tasks=config.tasks), ["python -m supsup_lite gnu_permuted_mnist"]
    for f in fields(GNuConfig):
        value = getattr(config, f.name)
        if f.name == "tasks" or value != getattr(defaults, f.name):
            flag = {"objectives": "objective", "checkpoints": "ckpts"}.get(f.name, f.name).replace("_", "-")
            words.append(f"--{flag} {','.join(map(str, value)) if isinstance(value, tuple) else value}")
    return " ".join(words + ([f"--out {out}"] if out is not None else []))


def _tuple_of(kind: type, text: str) -> tuple:
    return tuple(kind(part) for part in text.replace(",", " ").split())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m supsup_lite", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="experiment", required=True)
    commands.add_parser("presets", help="list the presets and their settings")
    preset = commands.add_parser("preset", help="run or resume one preset; summary to results/<preset>.json")
    preset.add_argument("name", help=", ".join(PRESETS))
    preset.add_argument("--out", type=Path, default=None, help="run folder (default runs/<preset>; resumed)")
    preset.add_argument("--results", type=Path, default=None, help="summary folder (default <project>/results)")
    gnu = commands.add_parser("gnu_permuted_mnist", help="GNu PermutedMNIST: train masks, One-Shot evaluation")
    defaults = GNuConfig()
    gnu.add_argument("--tasks", type=int, default=defaults.tasks)
    gnu.add_argument("--model", default=defaults.model, help=f"{sorted(ARCHITECTURES)} or {sorted(MODEL_ALIASES)}")
    gnu.add_argument("--outputs", type=int, default=defaults.outputs, help="output size s (G needs s > 10)")
    gnu.add_argument("--objective", type=lambda s: _tuple_of(str, s), default=defaults.objectives,
                     dest="objectives", help="H, G or H,G (both on the same bank)")
    gnu.add_argument("--batches", type=int, default=defaults.batches, help="training batches per task")
    gnu.add_argument("--batch-size", type=int, default=defaults.batch_size)
    gnu.add_argument("--lr", type=float, default=defaults.lr)
    gnu.add_argument("--seed", type=int, default=defaults.seed)
    gnu.add_argument("--data-seed", type=int, default=defaults.data_seed)
    gnu.add_argument("--eval-seed", type=int, default=defaults.eval_seed)
    gnu.add_argument("--ckpts", type=lambda s: _tuple_of(int, s), default=None, dest="checkpoints",
                     help="task counts to evaluate at (default: the paper's eval_ckpts)")
    gnu.add_argument("--save-every", type=int, default=defaults.save_every,
                     help="K: tasks trained at once and between saves")
    gnu.add_argument("--sample-tasks", type=int, default=None, help="evaluate a seeded sample of this many tasks")
    gnu.add_argument("--sample-batches", type=int, default=None, help="evaluate this many test batches per task")
    gnu.add_argument("--out", type=Path, default=None, help="run folder (resumed when it exists; see --overwrite)")
    for command in (preset, gnu):
        command.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        command.add_argument("--no-progress", action="store_true")
        command.add_argument("--overwrite", action="store_true",
                             help="start over in --out, replacing its saved run (default: resume it, and stop if its "
                                  "files disagree)")
    return parser.parse_args(argv)


def describe_presets() -> str:
    """One paragraph per preset: name, what it reproduces, settings, how it differs from the paper."""
    lines = []
    for preset in PRESETS.values():
        settings = ", ".join(f"{k}={v}" for k, v in asdict(preset.config).items())
        lines.append(f"{preset.name}: {preset.reproduces}\n  {type(preset.config).__name__}({settings})\n"
                     f"  differs from the paper: {preset.differs}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.experiment == "presets":
        print(describe_presets())
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if args.experiment == "preset":
            results = run_preset(args.name, out=args.out, results_dir=args.results, progress=not args.no_progress,
                                 command=shlex.join(["python", "-m", "supsup_lite", *argv]), overwrite=args.overwrite)
        else:
            settings = {f.name: getattr(args, f.name) for f in fields(GNuConfig) if hasattr(args, f.name)}
            results = gnu_permuted_mnist(GNuConfig(**settings), args.out, progress=not args.no_progress,
                                         overwrite=args.overwrite)
    except (ValueError, OSError) as err:  # bad settings, an unusable --out, a run folder that disagrees or is damaged
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in results.items() if k != "checkpoints"}
                     | {"checkpoints": [{k: v for k, v in r.items() if not k.startswith("per_task")
                                         and k != "evaluated_tasks"} for r in results["checkpoints"]]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
