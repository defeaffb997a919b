"""Run configuration: device, seeds, data and figure folders, and the three scales of the series.

Environment variables:
  SUPSUP_DEVICE  cpu | cuda | cuda:N (default: cuda when available, else cpu)
  SUPSUP_DATA    torchvision data root (default: <project>/data); relative paths start at the project root
  SUPSUP_SCALE   smoke | tutorial | paper (default: tutorial)
"""
from __future__ import annotations

import os
import random
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

SCALES = ("smoke", "tutorial", "paper")
DEFAULT_SCALE = "tutorial"


def project_root() -> Path:
    """The checkout holding ``pyproject.toml`` (editable install), else the current folder."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def device() -> torch.device:
    """CUDA when available, else CPU; ``SUPSUP_DEVICE`` overrides (``cpu``, ``cuda``, ``cuda:N``)."""
    name = os.environ.get("SUPSUP_DEVICE", "").strip()
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return _checked_device(name, "SUPSUP_DEVICE", "unset it")


def resolve_device(requested: torch.device | str | None) -> torch.device:
    """The device a function runs on: ``requested``, or :func:`device` when None. Raises ``ValueError`` for a
    device that is not a CPU or an existing CUDA GPU (every default in the package goes through here)."""
    if requested is None:
        return device()
    return _checked_device(requested, "device", "pass device=None to use the default")


def _checked_device(requested: torch.device | str, what: str, fix: str) -> torch.device:
    try:
        dev = torch.device(requested)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{what}={requested!r} is not a device name; use cpu, cuda or cuda:N") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{what}={requested!r}: only cpu and cuda are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}={requested!r} but torch sees no CUDA GPU; {fix} or use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{what}={requested!r} but only {torch.cuda.device_count()} GPU(s) exist")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU ``torch.Generator`` seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


SEED_PURPOSES = ("scores", "batches", "evaluation", "weights", "factors", "contexts", "penalty", "classes",
                 "tasks")


def derive_seed(run_seed: int, task: int, purpose: str) -> int:
    """The seed of one random choice of a run: independent streams per (run seed, task, purpose).

    ``numpy.random.SeedSequence([run_seed, task, purpose index])`` hashes the three into a 63-bit seed, so run s
    task t never shares a stream with run s+1 task t−1 (as ``seed + task`` would), and a method's score init
    and batch order are independent. purpose: one of ``SEED_PURPOSES``.
    """
    if purpose not in SEED_PURPOSES:
        raise ValueError(f"purpose must be one of {SEED_PURPOSES}, got {purpose!r}")
    for name, value in (("run_seed", run_seed), ("task", task)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    state = np.random.SeedSequence([int(run_seed), int(task), SEED_PURPOSES.index(purpose)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def data_root() -> Path:
    """Dataset root from ``SUPSUP_DATA`` (default ``data/``); relative paths start at the project root."""
    root = Path(os.environ.get("SUPSUP_DATA", "data")).expanduser()
    return root if root.is_absolute() else (project_root() / root).resolve()


def scale_name() -> str:
    """The scale chosen by ``SUPSUP_SCALE`` (default ``tutorial``), validated."""
    name = os.environ.get("SUPSUP_SCALE", DEFAULT_SCALE).strip() or DEFAULT_SCALE
    if name not in SCALES:
        raise ValueError(f"SUPSUP_SCALE={name!r} is not a scale; choose one of {', '.join(SCALES)}")
    return name


@lru_cache(maxsize=None)
def _smoke_figures_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="supsup_figures_"))


def figures_dir() -> Path:
    """``<project>/figures`` at tutorial and paper scale; a temporary folder at smoke scale (CI)."""
    folder = _smoke_figures_dir() if scale_name() == "smoke" else project_root() / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Preset(dict):
    """A scale's settings: a dict whose keys also read as attributes (``cfg.tasks``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"preset has no setting {key!r}; it has {sorted(self)}") from None


def pick_scale(presets: Mapping[str, Mapping[str, Any]], verbose: bool = True) -> Preset:
    """Choose the preset of the current ``SUPSUP_SCALE``; every scale must be given. Prints the choice."""
    missing = [s for s in SCALES if s not in presets]
    unknown = [s for s in presets if s not in SCALES]
    if missing or unknown:
        raise ValueError(f"presets must have exactly the scales {SCALES}; missing {missing}, unknown {unknown}")
    name = scale_name()
    preset = Preset(presets[name], scale=name)
    if verbose:
        settings = ", ".join(f"{k}={v}" for k, v in preset.items() if k != "scale")
        print(f"scale: {name} ({settings})")
    return preset
