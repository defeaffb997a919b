"""Mask training on PermutedMNIST, LeNet 300-100: ours against the plain recipe and the dense compute floor.

ours:      ``train_supermask`` (the hand-written MLP step: fused straight-through, in-place RMSprop, no allocations).
reference: the plain recipe — autograd through ``masked_forward`` with the straight-through mask, and
           ``torch.optim.RMSprop`` on the scores — on the same batches; it learns the same mask bit for bit.
floor:     the same network's dense forward + backward + plain SGD step on the same batches, no masks.
All three read the same batches, built once in memory before timing (one epoch = 469 batches of 128).

Usage: python benchmarks/train_throughput.py [--batches 469] [--outputs 10] [--repeats 5] [--threads N] [--json]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import harness
from supsup_lite.config import device as pick_device
from supsup_lite.core.masks import apply_masks, final_masks, init_scores, supermask_weight
from supsup_lite.core.models import frozen_random_model, maskable_parameters, masked_forward
from supsup_lite.core.training import evaluate, train_supermask
from supsup_lite.data import PermutedMNIST


def reference_masks(model: torch.nn.Module, batches: list, seed: int) -> dict:
    """The plain recipe: autograd + straight-through + ``torch.optim.RMSprop`` on the scores."""
    params = maskable_parameters(model)
    scores = init_scores(model, torch.Generator().manual_seed(seed))
    optimizer = torch.optim.RMSprop(scores.values(), lr=1e-4)
    for x, y in batches:
        loss = F.cross_entropy(masked_forward(model, {n: supermask_weight(params[n], s) for n, s in scores.items()},
                                              x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return final_masks(scores)


def dense_floor(model: torch.nn.Module, batches: list, lr: float = 1e-2) -> None:
    """Dense forward + backward + SGD step of the same network on the same batches (weights copied, no masks)."""
    weights = {n: p.detach().clone().requires_grad_(True) for n, p in maskable_parameters(model).items()}
    for x, y in batches:
        loss = F.cross_entropy(masked_forward(model, weights, x), y)
        grads = torch.autograd.grad(loss, list(weights.values()))
        with torch.no_grad():
            torch._foreach_add_(list(weights.values()), grads, alpha=-lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=469, help="training steps per timed call (469 = one epoch)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--outputs", type=int, default=10, help="output neurons s")
    args = harness.common_arguments(parser).parse_args()
    harness.apply_threads(args)
    dev = pick_device()
    stream = PermutedMNIST(num_tasks=1, device=dev)
    batches = list(stream.train_batches(0, args.batch_size, args.batches, 0))  # setup: outside every timing
    model = frozen_random_model("lenet_300_100", args.outputs, seed=0, device=dev)
    found = {}

    def ours() -> None:
        found["ours"] = train_supermask(model, batches, seed=0, progress=False).masks[0]

    def reference() -> None:
        found["reference"] = reference_masks(model, batches, seed=0)

    timings = {"ours_train": harness.measure(ours, repeats=args.repeats, device=dev),
               "reference_train": harness.measure(reference, repeats=args.repeats, device=dev),
               "floor_train": harness.measure(lambda: dense_floor(model, batches), repeats=args.repeats, device=dev)}
    x, y = stream.test_set(0)
    floor = timings["floor_train"].median
    harness.report(f"Mask training, LeNet 300-100 (s={args.outputs}), {args.batches} batches of {args.batch_size}",
                   timings, ratios={"ours_over_floor": timings["ours_train"].median / floor,
                                    "reference_over_floor": timings["reference_train"].median / floor,
                                    "reference_over_ours": timings["reference_train"].median / timings["ours_train"].median},
                   extra={"batches": args.batches,
                          "accuracy": round(evaluate(model, apply_masks(model, found["ours"]), x, y), 4),
                          "same_masks_as_reference": all(torch.equal(found["ours"][n], found["reference"][n])
                                                         for n in found["ours"])},
                   as_json=args.json, device=dev)


if __name__ == "__main__":
    main()
