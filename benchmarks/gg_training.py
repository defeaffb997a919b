"""Tasks per minute when the supermasks of K tasks train at once (PermutedMNIST, LeNet 300-100, GNu setting).

ours:      ``train_masks_at_once`` on K = 1, 10, 50 tasks (one batched forward/backward per batch index).
reference: the naive path, ``train_supermask`` once per task, in the same run.
Each task: ``--batches`` batches of 128 (paper: 1000), RMSprop 1e-4, s = 100 outputs (the paper's LeNet-250).
Also checks that K at once gives task 0 the reference's mask, and reports the bank's bytes per task.

Usage: python benchmarks/gg_training.py [--batches 1000] [--ks 1 10 50] [--threads N] [--quick] [--json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from supsup_lite.config import device as pick_device
from supsup_lite.data import PermutedMNIST
from supsup_lite.core.masks import MaskBank, apply_masks
from supsup_lite.core.models import frozen_random_model
from supsup_lite.core.multitask import train_masks_at_once
from supsup_lite.core.training import evaluate, train_supermask

ARCH = "lenet_300_100"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: torch.device):
    """(result, seconds) of ``fn()``, synchronising the GPU on both sides."""
    sync(dev)
    start = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - start


def mean_accuracy(model, stream, masks_per_task, test_size: int) -> float:
    accs = []
    for task, masks in enumerate(masks_per_task):
        x, y = stream.test_set(task)
        accs.append(evaluate(model, apply_masks(model, masks), x[:test_size], y[:test_size]))
    return sum(accs) / len(accs)


def mismatch(a: dict, b: dict) -> float:
    return sum(int((a[n] != b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1000, help="batches per task (paper: 1000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 10, 50], help="tasks trained at once")
    parser.add_argument("--reference-tasks", type=int, default=1, help="tasks timed on the naive path")
    parser.add_argument("--outputs", type=int, default=100, help="output neurons s (paper's LeNet-250: 100)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--test-size", type=int, default=2000, help="test images per task for the accuracy check")
    parser.add_argument("--quick", action="store_true", help="30 batches per task: a smoke run of the script")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    if args.quick:
        args.batches = 30
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick_device()
    stream = PermutedMNIST(max(max(args.ks), args.reference_tasks), device=dev)
    model = frozen_random_model(ARCH, args.outputs, seed=0, device=dev)
    settings = dict(num_batches=args.batches, batch_size=args.batch_size, progress=False)
    train_masks_at_once(model, stream, [0], num_batches=3, progress=False)  # warm-up (allocator, threads)

    reference_masks, reference_seconds = timed(
        lambda: [train_supermask(model, stream, t, seed=t, **settings)[0] for t in range(args.reference_tasks)], dev)
    rows = [dict(path="reference: train_supermask per task", k=1, tasks=args.reference_tasks,
                 seconds=reference_seconds, accuracy=mean_accuracy(model, stream, reference_masks, args.test_size),
                 task0_mismatch=0.0)]
    for k in args.ks:
        masks, seconds = timed(lambda: train_masks_at_once(model, stream, range(k), **settings), dev)
        rows.append(dict(path="ours: train_masks_at_once", k=k, tasks=k, seconds=seconds,
                         accuracy=mean_accuracy(model, stream, masks, args.test_size),
                         task0_mismatch=mismatch(masks[0], reference_masks[0])))
    base = rows[0]["seconds"] / rows[0]["tasks"]
    for row in rows:
        row["seconds_per_task"] = row["seconds"] / row["tasks"]
        row["tasks_per_minute"] = 60.0 / row["seconds_per_task"]
        row["speedup"] = base / row["seconds_per_task"]
    bank_bytes = MaskBank.for_model(model).bytes_per_task
    result = {
        "benchmark": "gg_training", "device": str(dev), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "batches_per_task": args.batches, "batch_size": args.batch_size, "outputs": args.outputs,
        "seconds_per_task": {str(r["k"]): r["seconds_per_task"] for r in rows[1:]},
        "reference_seconds_per_task": rows[0]["seconds_per_task"],
        "bank_bytes_per_task": bank_bytes, "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"GG mask training, {ARCH} (s={args.outputs}), {args.batches} batches of {args.batch_size} per task, "
          f"device {dev}, {torch.get_num_threads()} thread(s)")
    print(f"{'path':<38}{'K':>4}{'s/task':>10}{'tasks/min':>11}{'speedup':>9}{'acc':>8}{'task-0 bits ≠ ref':>19}")
    for r in rows:
        print(f"{r['path']:<38}{r['k']:>4}{r['seconds_per_task']:>10.2f}{r['tasks_per_minute']:>11.1f}"
              f"{r['speedup']:>8.2f}x{r['accuracy']:>8.3f}{r['task0_mismatch']:>19.2e}")
    print(f"bank: {bank_bytes:,} bytes per task (⌈P/8⌉ per parameter, 1 bit per weight)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
