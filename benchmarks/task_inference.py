"""One One-Shot task inference (a batch of 128 images) on LeNet 300-100 with 500 outputs, for T masks:
ours vs the authors' float-stack path, in the same run.

ours:      supsup_lite.core.inference.one_shot over the bit-packed MaskBank (superposition by popcount, α-gradient by
           a byte table; no float copy of the masks).
reference: the authors' path (PAPER.md §2.4): all T masks cached once as a float32 stack (T, P) per layer, then
           W ⊙ Σ_t α_t M_t with autograd through the stack. Building the stack is not timed (the authors cache it
           once per evaluation) but its bytes are counted; it is skipped where it would not fit the memory budget.

Time: median of ``--repeats`` calls after one warm-up. Peak: the growth of the process's peak resident memory
during the timed calls (Linux /proc; CUDA: torch's peak allocation), i.e. the extra memory one inference needs.

Usage: python benchmarks/task_inference.py [--tasks 10,100,250,1000,2500] [--repeats 5] [--budget-gb 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from supsup_lite.config import device as pick_device
from supsup_lite.core.inference import entropy, one_shot
from supsup_lite.core.masks import MaskBank
from supsup_lite.core.models import frozen_random_model, maskable_parameters, masked_forward

OUTPUTS = 500
BATCH = 128


def random_bank(model: torch.nn.Module, tasks: int, seed: int = 0) -> MaskBank:
    """A bank of ``tasks`` random masks (density ½), written straight into the packed storage (fast to build)."""
    bank = MaskBank.for_model(model)
    g = torch.Generator().manual_seed(seed)
    params = maskable_parameters(model)
    first = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in params.items()}
    bank.append(first)
    for _ in range(tasks - 1):  # grow the storage with copies, then overwrite the rows with random bytes
        bank.append(first)
    for name in bank.names:
        rows = bank.packed(name)
        rows.copy_(torch.randint(0, 256, rows.shape, generator=g, dtype=torch.uint8))
        last_bits = bank.numels[name] % 8
        if last_bits:  # keep the padding bits of the last byte zero, as pack_bits writes them
            rows[:, -1] &= (1 << last_bits) - 1
    return bank


def reference_stack(bank: MaskBank, dev: torch.device) -> dict[str, torch.Tensor]:
    """The authors' cache: every mask unpacked to float32, stacked (T, P) per layer."""
    from supsup_lite.core.bits import unpack_bits

    return {name: unpack_bits(bank.packed(name), numel, torch.float32).to(dev) for name, numel in bank.numels.items()}


def reference_one_shot(model: torch.nn.Module, stack: dict[str, torch.Tensor], x: torch.Tensor) -> int:
    """The authors' One-Shot: α = 1/T leaf, W ⊙ (α · stack).sum(0), entropy, autograd, argmin."""
    params = maskable_parameters(model)
    tasks = next(iter(stack.values())).shape[0]
    alphas = torch.full((tasks, 1), 1.0 / tasks, device=x.device, requires_grad=True)
    weights = {name: params[name] * (alphas * masks).sum(0).view_as(params[name]) for name, masks in stack.items()}
    value = entropy(masked_forward(model, weights, x)).mean()
    (grad,) = torch.autograd.grad(value, alphas)
    return int(grad.argmin())


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _rss_kib(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def reset_peak(dev: torch.device) -> None:
    """Start a fresh peak-memory window."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
        except OSError:
            pass


def peak_extra_bytes(dev: torch.device, baseline: int) -> int | None:
    """Peak memory above ``baseline`` since :func:`reset_peak`."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) - baseline
    peak = _rss_kib("VmHWM")
    return None if peak is None else max(0, peak * 1024 - baseline)


def baseline_bytes(dev: torch.device) -> int:
    if dev.type == "cuda":
        return torch.cuda.memory_allocated(dev)
    return (_rss_kib("VmRSS") or 0) * 1024


def measure(call: Callable[[], int], dev: torch.device, repeats: int) -> tuple[float, int | None, int]:
    """Median seconds of ``call``, the peak extra bytes during the timed calls, and its answer."""
    answer = call()  # warm-up
    sync(dev)
    base = baseline_bytes(dev)
    reset_peak(dev)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        answer = call()
        sync(dev)
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak_extra_bytes(dev, base), answer


def run(tasks_list: list[int], repeats: int, budget_gb: float, dev: torch.device) -> dict:
    model = frozen_random_model("lenet_300_100", OUTPUTS, seed=0, device=dev)
    x = torch.randn(BATCH, 784, generator=torch.Generator().manual_seed(1)).to(dev)
    rows = []
    for tasks in tasks_list:
        bank = random_bank(model, tasks)
        ours_s, ours_peak, ours_task = measure(lambda: one_shot(model, bank, x), dev, repeats)
        stack_bytes = 4 * tasks * sum(bank.numels.values())
        row = {"T": tasks, "ours_s": ours_s, "ours_mask_bytes": bank.nbytes, "ours_peak_extra_bytes": ours_peak,
               "reference_s": None, "reference_mask_bytes": None, "reference_peak_extra_bytes": None,
               "reference_skipped": None, "same_task": None}
        if stack_bytes <= budget_gb * 2**30:
            stack = reference_stack(bank, dev)
            ref_s, ref_peak, ref_task = measure(lambda: reference_one_shot(model, stack, x), dev, repeats)
            row.update(reference_s=ref_s, reference_mask_bytes=stack_bytes, reference_peak_extra_bytes=ref_peak,
                       same_task=ref_task == ours_task)
            del stack
        else:
            row["reference_skipped"] = (f"the float stack needs {stack_bytes / 2**30:.2f} GiB, over the "
                                        f"--budget-gb {budget_gb:g} GiB")
        rows.append(row)
        del bank
    return {"benchmark": "task_inference", "model": f"lenet_300_100 ({OUTPUTS} outputs)", "batch": BATCH,
            "device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "repeats": repeats, "rows": rows}


def mb(value: int | None) -> str:
    return "—" if value is None else f"{value / 1e6:8.1f}"


def ms(value: float | None) -> str:
    return "—" if value is None else f"{1e3 * value:9.1f}"


def print_table(result: dict) -> None:
    print(f"One-Shot inference, batch {result['batch']}, {result['model']}, {result['device']}, "
          f"{result['threads']} thread(s), median of {result['repeats']}")
    print(f"{'T':>5} | {'ours ms':>9} {'masks MB':>8} {'peak+ MB':>8} | {'ref ms':>9} {'masks MB':>8} "
          f"{'peak+ MB':>8} | speed-up  same task")
    for r in result["rows"]:
        speedup = "—" if r["reference_s"] is None else f"{r['reference_s'] / r['ours_s']:7.1f}x"
        same = "—" if r["same_task"] is None else str(r["same_task"])
        print(f"{r['T']:>5} | {ms(r['ours_s'])} {mb(r['ours_mask_bytes'])} {mb(r['ours_peak_extra_bytes'])} | "
              f"{ms(r['reference_s'])} {mb(r['reference_mask_bytes'])} {mb(r['reference_peak_extra_bytes'])} | "
              f"{speedup:>8}  {same}")
    for r in result["rows"]:
        if r["reference_skipped"]:
            print(f"reference skipped at T={r['T']}: {r['reference_skipped']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="10,100,250,1000,2500", help="comma-separated numbers of masks T")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-gb", type=float, default=2.0, help="largest float stack the reference may build")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    result = run([int(t) for t in args.tasks.split(",")], args.repeats, args.budget_gb, pick_device())
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
