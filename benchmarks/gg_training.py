"""Per-task time when the supermasks of K tasks train at once (PermutedMNIST, LeNet 300-100, s = 100, GNu setting).

ours:      ``train_supermasks`` on K = 1, 10, 50 tasks (default chunking: one task's state in cache on CPU,
           one ``bmm`` over all K on a GPU).
reference: the plain recipe, one task: autograd + straight-through + ``torch.optim.RMSprop``.
floor:     one task's dense forward + backward + plain SGD step on the same batches, no masks.
Each task: ``--batches`` batches of 128 (paper: 1000), cycled from a pool built in memory before timing (task k
starts at a different batch). Also checks that K at once gives every task the mask it gets alone.

Usage: python benchmarks/gg_training.py [--batches 1000] [--ks 1 10 50] [--repeats 5] [--threads N] [--json]
"""
from __future__ import annotations

import argparse

import torch

import harness
from supsup_lite.config import device as pick_device
from supsup_lite.core.masks import MaskBank
from supsup_lite.core.models import frozen_random_model
from supsup_lite.core.training import train_supermask, train_supermasks
from supsup_lite.data import PermutedMNIST
from train_throughput import dense_floor, reference_masks

ARCH = "lenet_300_100"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1000, help="batches per task (paper: 1000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 10, 50], help="tasks trained at once")
    parser.add_argument("--outputs", type=int, default=100, help="output neurons s (paper's LeNet-250: 100)")
    parser.add_argument("--pool", type=int, default=64, help="distinct batches held in memory and cycled")
    args = harness.common_arguments(parser).parse_args()
    harness.apply_threads(args)
    dev = pick_device()
    stream = PermutedMNIST(1, device=dev)
    pool = list(stream.train_batches(0, args.batch_size, min(args.pool, args.batches), 0))  # setup, untimed
    task_batches = lambda k: [pool[(k + i) % len(pool)] for i in range(args.batches)]  # noqa: E731
    model = frozen_random_model(ARCH, args.outputs, seed=0, device=dev)
    timings, ratios, found = {}, {}, {}
    timings["reference_per_task"] = harness.measure(lambda: reference_masks(model, task_batches(0), 0),
                                                    repeats=args.repeats, device=dev)
    timings["floor_per_task"] = harness.measure(lambda: dense_floor(model, task_batches(0)), repeats=args.repeats,
                                                device=dev)
    for k in args.ks:
        def ours(k: int = k) -> None:
            found[k] = train_supermasks(model, [task_batches(j) for j in range(k)], seeds=range(k), progress=False)
        total = harness.measure(ours, repeats=args.repeats, device=dev)
        timings[f"ours_k{k}_per_task"] = harness.Timing.of([s / k for s in total.samples])
    floor = timings["floor_per_task"].median
    for name, timing in timings.items():
        if name != "floor_per_task":
            ratios[f"{name}_over_floor"] = timing.median / floor
    k_max = max(args.ks)
    checked = [0, k_max - 1]
    alone = {j: train_supermask(model, task_batches(j), seed=j, progress=False).masks[0] for j in checked}
    same = all(torch.equal(found[k_max].masks[j][n], alone[j][n]) for j in checked for n in alone[j])
    harness.report(f"Mask training K tasks at once, {ARCH} (s={args.outputs}), {args.batches} batches of "
                   f"{args.batch_size} per task", timings, ratios=ratios,
                   extra={"batches_per_task": args.batches, "ks": args.ks, "same_masks_at_once_as_alone": same,
                          "bank_bytes_per_task": MaskBank.for_model(model).bytes_per_task},
                   as_json=args.json, device=dev)


if __name__ == "__main__":
    main()
