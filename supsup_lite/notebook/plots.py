"""Shared figure helpers: one look for every notebook, and ``save_figure`` into ``figures_dir()``."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns

from ..config import figures_dir


def use_style() -> None:
    """The series' plotting style (seaborn whitegrid, readable fonts, PNG-friendly DPI)."""
    sns.set_theme(style="whitegrid", context="notebook")
    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 120, "savefig.bbox": "tight"})


def save_figure(fig: plt.Figure, name: str) -> Path:
    """Write ``fig`` as ``<figures_dir()>/<name>.png`` and return the path.

    ``name`` is the notebook-prefixed stem, e.g. ``"01_accuracy_curves"``.
    """
    if not name or "/" in name or name.endswith(".png"):
        raise ValueError(f"figure name must be a bare stem like '01_accuracy_curves', got {name!r}")
    path = figures_dir() / f"{name}.png"
    fig.savefig(path)
    return path
