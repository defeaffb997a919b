"""Task inference on LeNet 300-100 with 500 outputs over T random masks: ours vs the authors' float stack vs the
memory floor, in one run.

ours:      ``one_shot`` and ``binary_search`` (batch of 128) over the bit-packed MaskBank, and
           ``alpha_gradient_each`` (per-image gradients, 512 images, T = 250) — superposition by counts (cached
           per bank version), α-gradient by byte tables straight from the packed bits, no float copy of the masks.
reference: the authors' One-Shot (RAIVNLab/supsup, ``mnist/utils`` ``cache_masks`` + ``oneshot`` in
           ``mnist/main.py``): every mask cached once as a float32 stack (T, P) per layer, W ⊙ Σ_t α_t M_t with
           autograd through the stack. Building the stack is setup (not timed); it is skipped, with the reason
           printed, where the stack exceeds ``--budget-gb``.
floor:     one pass reading every packed byte of the bank (an int64 sum over the bytes): the memory floor any
           task inference over T masks must pay; for the per-image gradients also dense GEMMs with the same
           multiply-adds (N · T · P), their compute floor.
bound:     what limits the α-gradient (``masks_dot``: one masked add of 16 float32 entries per 16-bit mask word) on
           this machine, on CPU: the dot products over the largest bank and the read floor at 1 thread and at all
           threads; the same kernel in one call over a 16-mask bank that stays in L2, its rows read again and again
           to the same number of bytes; and the core clock (a chain of dependent one-cycle integer operations).
           If the kernel reads as many bytes per ns in cache as from memory, memory is not what bounds it;
           ``masked_adds_per_cycle_per_thread`` is its rate in the kernel's own unit, and ``adds_per_ns_*`` the
           rates of a register-only probe: unmasked adds, masked adds with a new mask register each (the kernel's
           pattern) and masked adds sharing one mask register per four — if sharing is much faster, writing the
           mask register is the instruction that bounds the kernel.

All paths are timed by ``harness.measure`` (warm-up, ≥ 5 repeats, median with min–max). ``peak_extra_*`` is the
growth of peak memory during one extra call (Linux /proc VmHWM; CUDA: torch's peak allocation): the extra memory
one inference needs, which must not grow with T.

Usage: python benchmarks/task_inference.py [--tasks 250,1000,2500] [--budget-gb 1.5] [--quick] [--json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import numba
import torch

from harness import Timing, apply_threads, common_arguments, measure, report
from supsup_lite.config import device as pick_device
from supsup_lite.core.bits import pack_bits, unpack_bits
from supsup_lite.core.inference import alpha_gradient_each, binary_search, entropy, one_shot
from supsup_lite.core.masks import MaskBank
from supsup_lite.core.models import frozen_random_model, maskable_parameters, masked_forward
from supsup_lite.core.superpose import masks_dot

OUTPUTS = 500


def random_bank(model: torch.nn.Module, tasks: int, seed: int = 0) -> MaskBank:
    """A bank of ``tasks`` random masks (density ½), written straight into the packed storage (fast to build)."""
    bank = MaskBank.for_model(model)
    g = torch.Generator().manual_seed(seed)
    first = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in maskable_parameters(model).items()}
    for _ in range(tasks):  # grow the storage, then overwrite the rows with random bytes
        bank.append(first)
    for name in bank.names:
        rows = bank.packed(name)
        rows.copy_(torch.randint(0, 256, rows.shape, generator=g, dtype=torch.uint8))
        last_bits = bank.numels[name] % 8
        if last_bits:  # keep the padding bits of the last byte zero, as pack_bits writes them
            rows[:, -1] &= (1 << last_bits) - 1
    bank.version += 1  # the rows changed behind append's back
    return bank


def read_every_byte(bank: MaskBank) -> int:
    """The memory floor: one int64 sum over every packed byte of the bank (8 bytes per lane, tail bytes alone)."""
    total = 0
    for name in bank.names:
        flat = bank.packed(name).reshape(-1)
        whole = flat.numel() // 8 * 8
        total += int(flat[:whole].view(torch.int64).sum()) + int(flat[whole:].sum())
    return total


def reference_stack(bank: MaskBank) -> dict[str, torch.Tensor]:
    """The authors' cache: every mask unpacked to float32, stacked (T, P) per layer."""
    return {name: unpack_bits(bank.packed(name), numel, torch.float32) for name, numel in bank.numels.items()}


def reference_one_shot(model: torch.nn.Module, stack: dict[str, torch.Tensor], x: torch.Tensor) -> int:
    """The authors' One-Shot: α = 1/T leaf, W ⊙ (α · stack).sum(0), entropy, autograd, argmin."""
    params = maskable_parameters(model)
    tasks = next(iter(stack.values())).shape[0]
    alphas = torch.full((tasks, 1), 1.0 / tasks, device=x.device, requires_grad=True)
    weights = {name: params[name] * (alphas * masks).sum(0).view_as(params[name]) for name, masks in stack.items()}
    value = entropy(masked_forward(model, weights, x)).mean()
    (grad,) = torch.autograd.grad(value, alphas)
    return int(grad.argmin())


def same_macs_gemm(model: torch.nn.Module, images: int, tasks: int, dev: torch.device) -> Callable[[], None]:
    """The compute floor of per-image gradients: dense float32 GEMMs with their multiply-adds, N · T · P
    (per layer (N, in) @ (in, c · out) for blocks of c tasks), operands already in memory."""
    g = torch.Generator().manual_seed(2)
    shapes = [p.shape for p in maskable_parameters(model).values()]
    block = max(1, min(tasks, 25))
    left = [torch.randn(images, i, generator=g).to(dev) for _, i in shapes]
    right = [torch.randn(i, block * o, generator=g).to(dev) for o, i in shapes]

    def run() -> None:
        for (out, _), a, b in zip(shapes, left, right):
            for start in range(0, tasks, block):
                a @ b[:, :min(block, tasks - start) * out]
    return run


def _rss_kib(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def peak_extra_bytes(call: Callable[[], object], dev: torch.device) -> int | None:
    """Peak memory above the level before one ``call`` (None where it cannot be read)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        call()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    base = _rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        return None
    call()
    peak = _rss_kib("VmHWM")
    return None if peak is None or base is None else max(0, (peak - base) * 1024)


def dot_every_mask(bank: MaskBank, vectors: dict[str, torch.Tensor]) -> None:
    """⟨M_t, v⟩ for every task and layer: the α-gradient's dot products, one read of every stored byte."""
    for name, numel in bank.numels.items():
        masks_dot(bank.packed(name), numel, vectors[name])


@numba.njit(cache=True)
def _dependent_rounds(steps: int, seed: int) -> int:  # pragma: no cover (numba)
    """``steps`` rounds of a chain the CPU cannot overlap or LLVM fold: a shift, then an add that needs it."""
    x = seed
    for _ in range(steps):
        x = x + (x >> 7)
    return x


def core_clock_ghz(repeats: int) -> float:
    """The core clock in GHz, measured: two dependent one-cycle operations per round of :func:`_dependent_rounds`."""
    steps = 200_000_000
    timing = measure(lambda: _dependent_rounds(steps, 12345), repeats=repeats)
    return 2 * steps / timing.median / 1e9


def _add_chain_probe(mask_every: int):
    """A numba function f(rounds) → float: ``rounds`` × 12 masked adds of a 16-float register into 12 accumulators
    (independent: no latency bound), a new 16-bit mask register for every ``mask_every`` adds (0: unmasked adds).
    Masks come from the loop counter, so no memory is read: the rate is what the core issues."""
    from llvmlite import ir
    from numba.extending import intrinsic

    accumulators = 12

    @intrinsic
    def chain(typingctx, rounds):
        def codegen(context, builder, signature, args):
            f32, i64 = ir.FloatType(), ir.IntType(64)
            vec_t, mask_t = ir.VectorType(f32, 16), ir.VectorType(ir.IntType(1), 16)
            step = ir.Constant(vec_t, [ir.Constant(f32, 1.0 + k / 16) for k in range(16)])
            entry, loop, done = builder.block, builder.append_basic_block("loop"), builder.append_basic_block("done")
            builder.branch(loop)
            builder.position_at_end(loop)
            i = builder.phi(i64)
            acc = [builder.phi(vec_t) for _ in range(accumulators)]
            new, mask = [], None
            for a in range(accumulators):
                if mask_every and a % mask_every == 0:
                    word = builder.trunc(builder.add(i, ir.Constant(i64, a)), ir.IntType(16))
                    mask = builder.bitcast(word, mask_t)
                added = builder.fadd(acc[a], step)
                new.append(builder.select(mask, added, acc[a]) if mask_every else added)
            following = builder.add(i, ir.Constant(i64, 1))
            i.add_incoming(ir.Constant(i64, 0), entry)
            i.add_incoming(following, loop)
            for a in range(accumulators):
                acc[a].add_incoming(ir.Constant(vec_t, None), entry)
                acc[a].add_incoming(new[a], loop)
            builder.cbranch(builder.icmp_signed("<", following, args[0]), loop, done)
            builder.position_at_end(done)
            total = new[0]
            for a in range(1, accumulators):
                total = builder.fadd(total, new[a])
            return builder.extract_element(total, ir.Constant(ir.IntType(32), 0))
        return numba.types.float32(numba.types.int64), codegen

    return numba.njit(lambda rounds: chain(rounds)), accumulators


def mask_register_rates(repeats: int) -> dict[str, float]:
    """Adds of 16 floats per ns on one thread: unmasked, masked with one new mask register per add (the dot
    kernel's pattern), and masked with one mask register per 4 adds. If sharing the mask is much faster than
    a mask per add, writing the mask register, not the add, is what limits the kernel."""
    rates = {}
    for name, every in (("unmasked", 0), ("new_mask_per_add", 1), ("mask_per_4_adds", 4)):
        probe, per_round = _add_chain_probe(every)
        rounds = 10_000_000
        probe(10)
        timing = measure(lambda: probe(rounds), repeats=repeats)
        rates[f"adds_per_ns_{name}"] = round(per_round * rounds / timing.median / 1e9, 3)
    return rates


def dot_bound(model: torch.nn.Module, tasks: int,
              repeats: int) -> tuple[dict[str, Timing], dict[str, float], dict[str, float]]:
    """The α-gradient's dot products and the read floor at 1 thread and at all threads over a bank of ``tasks``
    masks, the same kernel over a 16-mask bank kept in L2 (read again and again in one call, as many bytes),
    and the core clock (CPU only)."""
    g = torch.Generator().manual_seed(3)
    vectors = {name: torch.randn(p.numel(), generator=g) for name, p in maskable_parameters(model).items()}
    big = random_bank(model, tasks)
    numel = 64 * 1024  # 16 masks × 8 KB = 128 KB, vector 256 KB: both stay in L2
    small = pack_bits(torch.rand(16, numel, generator=g) < 0.5)
    again = torch.arange(16).repeat(big.nbytes // small.numel())
    vector = torch.randn(numel, generator=g)
    threads = torch.get_num_threads()
    timings: dict[str, Timing] = {}
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        suffix = f"{count}thread"
        timings[f"ours_dot_T{tasks}_{suffix}"] = measure(lambda: dot_every_mask(big, vectors), repeats=repeats)
        timings[f"ours_dot_in_cache_{suffix}"] = measure(lambda: masks_dot(small, numel, vector, again),
                                                         repeats=repeats)
        timings[f"floor_read_T{tasks}_{suffix}"] = measure(lambda: read_every_byte(big), repeats=repeats)
    torch.set_num_threads(threads)
    one, every = "1thread", f"{threads}thread"
    median = {key: timing.median for key, timing in timings.items()}
    ratios = {f"thread_gain_dot_T{tasks}": median[f"ours_dot_T{tasks}_{one}"] / median[f"ours_dot_T{tasks}_{every}"],
              f"thread_gain_read_T{tasks}": median[f"floor_read_T{tasks}_{one}"]
              / median[f"floor_read_T{tasks}_{every}"],
              f"ours_dot_T{tasks}_over_in_cache_{one}": median[f"ours_dot_T{tasks}_{one}"]
              / median[f"ours_dot_in_cache_{one}"],
              f"ours_dot_T{tasks}_{every}_over_floor": median[f"ours_dot_T{tasks}_{every}"]
              / median[f"floor_read_T{tasks}_{every}"]}
    bytes_per_ns = big.nbytes / median[f"ours_dot_T{tasks}_{one}"] / 1e9
    ghz = core_clock_ghz(repeats)
    rates = {"dot_bytes_per_ns_per_thread": round(bytes_per_ns, 3), "core_clock_ghz": round(ghz, 3),
             "masked_adds_per_cycle_per_thread": round(bytes_per_ns / 2 / ghz, 3),  # 2 bytes per masked add
             **mask_register_rates(repeats)}
    return timings, ratios, rates


def run(args: argparse.Namespace, dev: torch.device) -> tuple[dict[str, Timing], dict[str, float], dict]:
    model = frozen_random_model("lenet_300_100", OUTPUTS, seed=0, device=dev)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 784, generator=g).to(dev)
    timings, ratios, extra = {}, {}, {"batch": args.batch, "model": f"lenet_300_100 ({OUTPUTS} outputs)"}
    for tasks in args.tasks:
        bank = random_bank(model, tasks)
        floor = f"floor_read_T{tasks}"
        timings[floor] = measure(lambda: read_every_byte(bank), repeats=args.repeats, device=dev)
        for name, search in (("one_shot", one_shot), ("binary", binary_search)):
            key = f"ours_{name}_T{tasks}"
            timings[key] = measure(lambda: search(model, bank, x), repeats=args.repeats, device=dev)
            ratios[f"{key}_over_floor"] = timings[key].median / timings[floor].median
            extra[f"peak_extra_bytes_{name}_T{tasks}"] = peak_extra_bytes(lambda: search(model, bank, x), dev)
        extra[f"mask_bytes_T{tasks}"] = bank.nbytes
        stack_bytes = 4 * tasks * sum(bank.numels.values())
        if stack_bytes <= args.budget_gb * 2**30:
            stack = reference_stack(bank)
            key = f"reference_one_shot_T{tasks}"
            timings[key] = measure(lambda: reference_one_shot(model, stack, x), repeats=args.repeats, device=dev)
            ratios[f"{key}_over_ours"] = timings[key].median / timings[f"ours_one_shot_T{tasks}"].median
            extra[f"same_task_T{tasks}"] = reference_one_shot(model, stack, x) == one_shot(model, bank, x)
            del stack
        else:
            reason = (f"the float stack needs {stack_bytes / 2**30:.2f} GiB, over --budget-gb {args.budget_gb:g}")
            extra[f"reference_skipped_T{tasks}"] = reason
            print(f"reference One-Shot skipped at T={tasks}: {reason}", file=sys.stderr)
        del bank
    first, last = args.tasks[0], args.tasks[-1]
    if last > first:  # ≤ 1: time grows no faster than T
        for name in ("one_shot", "binary"):
            growth = timings[f"ours_{name}_T{last}"].median / timings[f"ours_{name}_T{first}"].median
            ratios[f"ours_{name}_growth_over_linear_T{first}_to_T{last}"] = growth / (last / first)
    bank = random_bank(model, args.each_tasks)
    images = torch.randn(args.each_images, 784, generator=g).to(dev)
    key = f"ours_each_{args.each_images}x{args.each_tasks}"
    timings[key] = measure(lambda: alpha_gradient_each(model, bank, images), repeats=args.repeats, device=dev)
    floor = f"floor_read_T{args.each_tasks}_each"
    timings[floor] = measure(lambda: read_every_byte(bank), repeats=args.repeats, device=dev)
    ratios[f"{key}_over_floor"] = timings[key].median / timings[floor].median
    gemm = f"floor_gemm_{args.each_images}x{args.each_tasks}"
    timings[gemm] = measure(same_macs_gemm(model, images.shape[0], args.each_tasks, dev), repeats=args.repeats,
                            device=dev)
    ratios[f"{key}_over_gemm"] = timings[key].median / timings[gemm].median
    if dev.type == "cpu":
        bound_timings, bound_ratios, rate = dot_bound(model, last, args.repeats)
        timings.update(bound_timings)
        ratios.update(bound_ratios)
        extra.update(rate)
    return timings, ratios, extra


def main() -> None:
    parser = common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--tasks", default="250,1000,2500", help="comma-separated numbers of masks T")
    parser.add_argument("--batch", type=int, default=128, help="images per One-Shot / binary search")
    parser.add_argument("--each-images", type=int, default=512, help="images of the per-image gradients")
    parser.add_argument("--each-tasks", type=int, default=250, help="masks T of the per-image gradients")
    parser.add_argument("--budget-gb", type=float, default=1.5, help="largest float stack the reference may build")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (T = 30, 60; 1 repeat): a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.batch, args.each_images, args.each_tasks, args.repeats = "30,60", 16, 32, 30, 1
    args.tasks = [int(t) for t in args.tasks.split(",")]
    apply_threads(args)
    dev = pick_device()
    timings, ratios, extra = run(args, dev)
    report(f"Task inference, LeNet 300-100 ({OUTPUTS} outputs), batch {args.batch}", timings, ratios=ratios,
           extra=extra, as_json=args.json, device=dev)


if __name__ == "__main__":
    main()
