"""Reproducible GNu runs on PermutedMNIST: train a bank of supermasks, evaluate with the paper's protocol, resume.

CLI (notebook 04 calls the same :func:`gnu_permuted_mnist`)::

    python -m supsup_lite gnu_permuted_mnist --tasks 250 --model lenet_300_100 --outputs 100 \
        --objective H,G --batches 1000 --out runs/lenet250

Masks are trained K = ``save_every`` tasks at once (``training.train_bank``); after every K tasks the bank
(``bank.pt``, bit-packed) and the results (``results.json``) are saved, and a re-run with the same ``--out``
resumes from them: finished tasks are not retrained and finished checkpoints not re-evaluated.

Evaluation at each checkpoint T (the authors' ``eval_ckpts``) gives exactly ``protocols.gnu_accuracy``, the
paper's GNu protocol (PAPER.md §2.5): every learned task's test set is cut into batches of 128 (a fixed shuffle
per task); One-Shot infers each batch's task from its first image over the T masks learned so far (Eq. 4, all
T·⌈N/128⌉ first images in one batched pass); a correctly inferred batch is classified with its own mask, a
wrongly inferred one scores 0. How many images of each batch a task's own mask gets right does not change with
T, so it is measured once per task, when the task is learned (``gg_batches.pt``; its sum is the GG accuracy);
a checkpoint then costs only the One-Shot pass.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import device as default_device
from ..core.inference import Objective, entropy, superfluous_logsumexp
from ..core.masks import MaskBank
from ..core.models import ARCHITECTURES, frozen_random_model
from ..core.training import predict, train_bank
from ..data.mnist import PermutedMNIST, load_mnist
from .protocols import infer_tasks, shuffled_test_set, task_weights

OBJECTIVES: dict[str, Objective] = {"H": entropy, "G": superfluous_logsumexp}
MODEL_ALIASES = {"lenet": "lenet_300_100", "fc1024": "fc_1024_1024"}
TASKS_PER_PASS = 50        # tasks whose first test images go through one batched One-Shot pass (≈ 4000 images)
REAL_CLASSES = 10          # PermutedMNIST labels: outputs beyond these are the superfluous neurons of G
# Settings a resumed run must share with the saved one (they decide the masks or the evaluation).
FIXED_SETTINGS = ("model", "outputs", "batches", "batch_size", "lr", "seed", "data_seed", "save_every",
                  "test_batch_size", "eval_seed")


def paper_eval_ckpts(tasks: int) -> tuple[int, ...]:
    """The authors' ``eval_ckpts`` plus the end: 10 and every fifth of the run (250 → 10, 50, 100, …, 250)."""
    return tuple(sorted({min(10, tasks)} | {max(1, round(tasks * k / 5)) for k in range(1, 6)}))


@dataclass(frozen=True)
class GNuConfig:
    """One GNu PermutedMNIST run. Defaults: the paper's LeNet 300-100 script (PAPER.md §3.2).

    tasks: number of permutations learned; model: ``lenet_300_100`` | ``fc_1024_1024`` (aliases ``lenet``,
    ``fc1024``); outputs: s, the output size (> 10 for objective G); objectives: any of ``H`` (entropy) and
    ``G`` (superfluous logsumexp), evaluated on the same bank; batches, batch_size, lr: RMSprop training per task;
    seed: base network seed, and task t's masks train with seed + t; data_seed: PermutedMNIST task t uses
    ``RandomState(data_seed + t)`` (the paper's scripts: 1); test_batch_size, eval_seed: the evaluation
    batches (task t's test images in the order ``randperm(generator=eval_seed + t)``); checkpoints: task counts
    at which to evaluate (default :func:`paper_eval_ckpts`); save_every: K, tasks trained at once between saves.
    """

    tasks: int = 250
    model: str = "lenet_300_100"
    outputs: int = 100
    objectives: tuple[str, ...] = ("H", "G")
    batches: int = 1000
    batch_size: int = 128
    lr: float = 1e-4
    seed: int = 0
    data_seed: int = 1
    test_batch_size: int = 128
    eval_seed: int = 0
    checkpoints: tuple[int, ...] | None = None
    save_every: int = 10

    def __post_init__(self) -> None:
        set_ = lambda key, value: object.__setattr__(self, key, value)  # noqa: E731 (frozen dataclass)
        set_("model", MODEL_ALIASES.get(self.model, self.model))
        set_("objectives", tuple(self.objectives))
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
        if self.outputs < REAL_CLASSES:
            raise ValueError(f"outputs must be ≥ {REAL_CLASSES} (the digit classes), got {self.outputs}")
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown or not self.objectives:
            raise ValueError(f"objectives must be a non-empty subset of {sorted(OBJECTIVES)}, got {self.objectives}")
        if "G" in self.objectives and self.outputs <= REAL_CLASSES:
            raise ValueError(f"objective G needs superfluous outputs: outputs must be > {REAL_CLASSES}, "
                             f"got {self.outputs} (use objective H)")
        if not 1 <= self.checkpoints[0] <= self.checkpoints[-1] <= self.tasks:
            raise ValueError(f"checkpoints must lie in 1..tasks={self.tasks}, got {self.checkpoints}")


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


def gg_batch_correct(model: nn.Module, bank: MaskBank, stream: PermutedMNIST, task: int, batch_size: int,
                     seed: int) -> torch.Tensor:
    """Images that task ``task``'s own mask classifies right in each of its test batches: (⌈N/batch_size⌉,) float.

    The batches are those of ``protocols.gnu_accuracy`` (test set shuffled by ``seed + task``).
    """
    x, y = shuffled_test_set(stream, task, seed)
    right = (predict(model, task_weights(model, bank, task), x) == y).float()
    return torch.nn.functional.pad(right, (0, -y.shape[0] % batch_size)).view(-1, batch_size).sum(1)


def first_test_images(stream: PermutedMNIST, task: int, batch_size: int, seed: int) -> torch.Tensor:
    """The first image of every test batch of ``protocols.shuffled_test_set(stream, task, seed)``, i.e. the images
    One-Shot sees: (⌈N/batch_size⌉, 784). Indexes before transforming, so the test set is never materialised."""
    images, _ = load_mnist(False, "cpu")
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed + task))
    return stream.transform(task, images[order[::batch_size]].to(stream.device))


class GNuRun:
    """The state of one run: frozen model, task stream, mask bank, results (JSON-ready).

    With ``out`` set, everything is saved there and an existing run in ``out`` is resumed.
    """

    def __init__(self, config: GNuConfig, out: str | Path | None = None, progress: bool = True) -> None:
        self._clock, self._cpu_clock = time.perf_counter(), time.process_time()
        self.config, self.progress = config, progress
        self.out = Path(out) if out is not None else None
        self.device = default_device()
        self.model = frozen_random_model(config.model, config.outputs, config.seed, self.device)
        self.stream = PermutedMNIST(config.tasks, seed=config.data_seed, device=self.device)
        self.bank = MaskBank.for_model(self.model, config.model, config.seed, config.outputs)
        self.num_test = self.stream.test_set(0)[1].shape[0]
        self.gg_batches = torch.zeros(0, -(-self.num_test // config.test_batch_size), device=self.device)
        self.results: dict[str, Any] = {"experiment": "gnu_permuted_mnist",
                                        "config": json.loads(json.dumps(asdict(config))),
                                        "hardware": hardware(), "tasks_trained": 0, "train_seconds": 0.0,
                                        "eval_seconds": 0.0, "wall_seconds": 0.0, "cpu_seconds": 0.0,
                                        "train_seconds_at": {},
                                        "checkpoints": [], "complete": False}
        if self.out is not None and (self.out / "results.json").exists():
            self._resume()

    # --- files ------------------------------------------------------------------------------------
    def _resume(self) -> None:
        saved = json.loads((self.out / "results.json").read_text())
        differ = {k: (saved["config"].get(k), getattr(self.config, k)) for k in FIXED_SETTINGS
                  if saved["config"].get(k) != getattr(self.config, k)}
        if differ:
            raise ValueError(f"{self.out} holds a run with other settings (saved, asked): {differ}; "
                             f"use another --out, or delete {self.out} to start over")
        for key in ("train_seconds", "eval_seconds", "wall_seconds", "cpu_seconds", "train_seconds_at", "checkpoints"):
            self.results[key] = saved.get(key, self.results[key])
        self.results["hardware_history"] = saved.get("hardware_history", []) + [saved["hardware"]]
        if (self.out / "bank.pt").exists():
            bank = MaskBank.load(self.out / "bank.pt", self.device)
            bank.check_compatible(self.model)
            self.bank = bank
            self.results["tasks_trained"] = len(bank)
        if (self.out / "gg_batches.pt").exists():
            self.gg_batches = torch.load(self.out / "gg_batches.pt", weights_only=True)[:len(self.bank)].to(self.device)

    def save(self) -> None:
        """Write ``bank.pt``, ``gg_batches.pt`` and ``results.json`` (each atomically) when ``out`` is set."""
        now, cpu_now = time.perf_counter(), time.process_time()
        self.results["wall_seconds"] += now - self._clock
        self.results["cpu_seconds"] += cpu_now - self._cpu_clock
        self._clock, self._cpu_clock = now, cpu_now
        self.results["gg_per_task"] = (self.gg_batches.sum(1) / self.num_test).tolist()
        self.results["complete"] = all(self.result(t, o) is not None
                                       for t in self.config.checkpoints for o in self.config.objectives)
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if len(self.bank):
            self.bank.save(self.out / "bank.pt")
            torch.save(self.gg_batches.cpu(), self.out / "gg_batches.pt.tmp")
            (self.out / "gg_batches.pt.tmp").replace(self.out / "gg_batches.pt")
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(self.out / "results.json")

    # --- training -----------------------------------------------------------------------------------
    def chunk_ends(self, tasks: int) -> list[int]:
        """Where training stops to save on the way to ``tasks``: multiples of ``save_every`` and checkpoints."""
        stops = set(range(self.config.save_every, tasks, self.config.save_every)) | set(self.config.checkpoints)
        return sorted(stop for stop in stops | {tasks} if len(self.bank) < stop <= tasks)

    def train_until(self, tasks: int) -> None:
        """Train tasks len(bank)..tasks−1, ``save_every`` at a time, saving after each chunk."""
        c = self.config
        for stop in self.chunk_ends(tasks):
            start, began = len(self.bank), time.perf_counter()
            train_bank(self.model, self.stream, num_tasks=stop, k=stop - start, num_batches=c.batches,
                       batch_size=c.batch_size, lr=c.lr, seed=c.seed, bank=self.bank, progress=self.progress)
            self.results["train_seconds"] += time.perf_counter() - began
            self.results["train_seconds_at"][str(stop)] = self.results["train_seconds"]
            self.results["tasks_trained"] = len(self.bank)
            self.measure_gg()
            self.save()

    def measure_gg(self) -> None:
        """Per-batch GG counts of every task of this run in the bank that has none yet (``gg_batches``)."""
        c, known = self.config, self.gg_batches.shape[0]
        rows = [gg_batch_correct(self.model, self.bank, self.stream, t, c.test_batch_size, c.eval_seed)
                for t in range(known, min(len(self.bank), c.tasks))]
        if rows:
            self.gg_batches = torch.cat([self.gg_batches, torch.stack(rows)])

    # --- evaluation ---------------------------------------------------------------------------------
    def result(self, tasks: int, objective: str) -> dict[str, Any] | None:
        """The saved result of checkpoint ``tasks`` with ``objective``, or None."""
        return next((r for r in self.results["checkpoints"]
                     if r["tasks"] == tasks and r["objective"] == objective), None)

    def inferred_tasks(self, tasks: int, objective: str) -> torch.Tensor:
        """One-Shot's task for every test batch (from its first image) of tasks 0..T−1 over the first T masks:
        (T, ⌈N/128⌉) int64, all first images in one batched pass."""
        c, inferred = self.config, []
        for start in tqdm(range(0, tasks, TASKS_PER_PASS), disable=not self.progress, leave=False,
                          desc=f"One-Shot {objective} over {tasks} masks"):
            firsts = torch.cat([first_test_images(self.stream, t, c.test_batch_size, c.eval_seed)
                                for t in range(start, min(start + TASKS_PER_PASS, tasks))])
            inferred.append(infer_tasks(self.model, self.bank, firsts, objective=OBJECTIVES[objective],
                                        num_tasks=tasks))
        return torch.cat(inferred).view(tasks, -1)

    def evaluate(self, tasks: int, objective: str) -> dict[str, Any]:
        """The GNu protocol at checkpoint ``tasks`` with ``objective``: a wrongly inferred batch scores 0."""
        began = time.perf_counter()
        self.measure_gg()
        right = self.inferred_tasks(tasks, objective) == torch.arange(tasks, device=self.device)[:, None]
        gnu = (self.gg_batches[:tasks] * right).sum(1) / self.num_test
        gg = self.gg_batches[:tasks].sum(1) / self.num_test
        seconds = time.perf_counter() - began
        self.results["eval_seconds"] += seconds
        record = {"tasks": tasks, "objective": objective, "gnu_accuracy": gnu.mean().item(),
                  "task_inference_accuracy": right.float().mean().item(), "gg_accuracy": gg.mean().item(),
                  "eval_seconds": seconds, "train_seconds": self.results["train_seconds_at"].get(str(tasks)),
                  "wall_seconds": self.results["wall_seconds"] + time.perf_counter() - self._clock,
                  "cpu_seconds": self.results["cpu_seconds"] + time.process_time() - self._cpu_clock,
                  "bank_bytes": tasks * self.bank.bytes_per_task, **peak_memory(),
                  "per_task_gnu_accuracy": [round(v, 5) for v in gnu.tolist()],
                  "per_task_inference_accuracy": [round(v, 5) for v in right.float().mean(1).tolist()]}
        self.results["checkpoints"].append(record)
        self.results["checkpoints"].sort(key=lambda r: (r["objective"], r["tasks"]))
        self.save()
        return record


def report_line(record: dict[str, Any]) -> str:
    """One line per checkpoint for the console."""
    return (f"{record['tasks']:>5} tasks, objective {record['objective']}: GNu {100 * record['gnu_accuracy']:.2f} %, "
            f"task inference {100 * record['task_inference_accuracy']:.2f} %, GG {100 * record['gg_accuracy']:.2f} % "
            f"(eval {record['eval_seconds']:.1f} s, wall {record['wall_seconds']:.0f} s)")


def gnu_permuted_mnist(config: GNuConfig, out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume, when ``out`` holds a saved run) GNu PermutedMNIST; return the results dict.

    For each checkpoint T in order: train up to T tasks (K = ``save_every`` at a time, saving as it goes), then
    evaluate every objective not yet evaluated at T. The dict is what ``out/results.json`` holds: ``config``,
    ``hardware``, ``train_seconds``, ``eval_seconds``, ``wall_seconds``, ``cpu_seconds`` (CPU time of this process,
    all threads; both summed over resumed sessions) and
    ``checkpoints``: one record per (T, objective) with ``gnu_accuracy``, ``task_inference_accuracy``,
    ``gg_accuracy``, per-task lists, timings, ``bank_bytes`` and peak memory.
    """
    run = GNuRun(config, out, progress)
    run.save()
    for tasks in config.checkpoints:
        run.train_until(tasks)
        for objective in config.objectives:
            if run.result(tasks, objective) is None:
                record = run.evaluate(tasks, objective)
                if progress:
                    tqdm.write(report_line(record))
    run.save()
    return run.results


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
    gnu.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    gnu.add_argument("--out", type=Path, default=None, help="run folder (resumed when it exists)")
    gnu.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = {f.name: getattr(args, f.name) for f in fields(GNuConfig) if hasattr(args, f.name)}
    try:
        results = gnu_permuted_mnist(GNuConfig(**settings), args.out, progress=not args.no_progress)
    except ValueError as err:  # bad settings, or --out holding another run or a damaged bank
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in results.items() if k != "checkpoints"}
                     | {"checkpoints": [{k: v for k, v in r.items() if not k.startswith("per_task")}
                                        for r in results["checkpoints"]]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
