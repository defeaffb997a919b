"""The one benchmark method every script in ``benchmarks/`` uses.

* :func:`measure` times a callable: ``warmup`` untimed calls, then ``repeats`` timed calls (≥ 5 by default),
  each ended by a CUDA synchronisation when the device is CUDA. Every path a script compares (ours, reference,
  floor) goes through it, so all are warmed up and timed alike; one-time setup (data, bank building) is done by
  the caller before it.
* :class:`Timing` keeps every sample; tables and JSON report the median with min–max.
* :func:`environment` records what the numbers depend on (device, threads, torch, CPU model, GPU name).
* :func:`report` prints one table, or with ``as_json`` one JSON object whose timing keys start with ``ours_``,
  ``reference_`` or ``floor_``, beside the ratios, the script's extra fields and ``environment``.
* :func:`common_arguments` adds ``--json``, ``--repeats`` and ``--threads`` to a script's parser;
  :func:`apply_threads` applies ``--threads``.

Scripts run as ``python benchmarks/<script>.py`` import this module as ``harness`` (their folder is on the path).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

TIMING_PREFIXES = ("ours_", "reference_", "floor_")


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated calls: median, min and max of ``samples`` (one entry per timed call)."""

    median: float
    min: float
    max: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: list[float] | tuple[float, ...]) -> "Timing":
        """The timing of these samples (seconds, at least one)."""
        if not samples:
            raise ValueError("a Timing needs at least one sample; got none")
        return cls(statistics.median(samples), min(samples), max(samples), tuple(samples))


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued kernels when ``device`` is CUDA (no-op on CPU or None)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1,
            device: torch.device | str | None = None) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed calls, each ended by a CUDA sync.

    ``device``: where ``fn`` runs (CUDA: synchronise before starting the clock and after each call).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1 timed calls, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be ≥ 0 untimed calls, got {warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return Timing.of(samples)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """What the timings depend on: device, torch threads, torch version, CPU model, GPU name (None without)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    gpu = torch.cuda.get_device_name(dev if dev.type == "cuda" else None) if torch.cuda.is_available() else None
    return {"device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": cpu_model(), "gpu": gpu}


def report(title: str, timings: dict[str, Timing], *, ratios: dict[str, float], extra: dict[str, Any],
           as_json: bool, device: torch.device | str | None = None) -> str:
    """Print (and return) a table of ``timings`` with ``ratios`` and ``extra``, or one JSON object.

    Timing names start with ``ours_``, ``reference_`` or ``floor_``; in JSON each maps to
    ``{"median", "min", "max", "samples"}`` in seconds, beside the ratios, ``extra``, ``title`` and ``environment``.
    """
    bad = [name for name in timings if not name.startswith(TIMING_PREFIXES)]
    if bad:
        raise ValueError(f"timing names must start with one of {TIMING_PREFIXES}; got {bad}")
    names = [*timings, *ratios, *extra, "title", "environment"]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"timings, ratios and extra fields must have distinct names; {clash} repeat")
    env = environment(device)
    if as_json:
        text = json.dumps({"title": title, **{n: asdict(t) for n, t in timings.items()}, **ratios, **extra,
                           "environment": env})
    else:
        width = max([len(n) for n in [*timings, *ratios, *extra]] + [4])
        lines = [title, ", ".join(f"{k} {v}" for k, v in env.items()),
                 f"{'path':<{width}}  {'median ms':>10}  {'min ms':>10}  {'max ms':>10}  repeats"]
        lines += [f"{n:<{width}}  {1e3 * t.median:10.2f}  {1e3 * t.min:10.2f}  {1e3 * t.max:10.2f}  {len(t.samples)}"
                  for n, t in timings.items()]
        lines += [f"{n:<{width}}  {v:10.2f}x" for n, v in ratios.items()]
        lines += [f"{n:<{width}}  {v}" for n, v in extra.items()]
        text = "\n".join(lines)
    print(text)
    return text


def common_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--json``, ``--repeats`` (default 5) and ``--threads`` (default: torch's choice) to ``parser``."""
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per path (median, min–max)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU threads from ``--threads`` when given."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be ≥ 1, got {args.threads}")
        torch.set_num_threads(args.threads)
