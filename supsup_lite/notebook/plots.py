"""Shared figure helpers: one look for every notebook, and ``save_figure`` into ``figures_dir()``."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
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


def legend_outside(ax: plt.Axes, *, where: str = "right", **kwargs) -> None:
    """The legend of ``ax`` outside it, so it never hides data: ``where="right"`` (top-aligned beside the axes) or
    ``"below"`` (centred under the tick labels and x label as they are now: set them first; pass ``ncol`` for
    columns); ``kwargs`` go to ``ax.legend``. Meant for figures saved with ``bbox_inches="tight"`` (the style)."""
    if where == "right":
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)
    elif where == "below":
        box = ax.get_tightbbox(ax.figure.canvas.get_renderer()).transformed(ax.transAxes.inverted())
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, box.y0 - 0.03), borderaxespad=0.0, **kwargs)
    else:
        raise ValueError(f"where={where!r} must be 'right' or 'below'")


def plot_interval(ax: plt.Axes, x: Sequence[float], value: Sequence[float], low: Sequence[float],
                  high: Sequence[float], *, fmt: str = "o-", **kwargs) -> None:
    """``value`` against ``x`` with error bars from the interval [low, high] (e.g. a Wilson 95 % interval), all
    in the same unit; ``kwargs`` go to ``ax.errorbar`` (label, color, ...)."""
    value, low, high = (np.asarray(v, dtype=float) for v in (value, low, high))
    if np.any(low > value) or np.any(high < value):
        raise ValueError("every interval must contain its value (low ≤ value ≤ high); pass low and high in the "
                         "unit of value (e.g. both in %)")
    ax.errorbar(x, value, yerr=np.stack([value - low, high - value]), fmt=fmt, capsize=3, **kwargs)
