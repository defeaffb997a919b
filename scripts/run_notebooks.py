"""Execute notebooks and replace each one only when every cell succeeded; keep their metadata clean.

Usage: python scripts/run_notebooks.py notebooks/01_supermasks.ipynb [...] [--timeout SECONDS]

The scale comes from SUPSUP_SCALE (``make run`` sets tutorial). Each kernel starts in the notebook's folder.
A notebook is executed in memory; only when all its cells ran is the cleaned result written to a temporary file
beside it and moved over the original in one rename, so a failing cell, a cell timeout, a dead kernel or an
interruption leaves the committed notebook byte for byte as it was. The runner then goes on with the next
notebook, names every failure (notebook, cell number, first source line, error) at the end and exits 1.
Progress-bar widgets (dead without a live kernel) and per-cell timing metadata are stripped so that diffs stay
small and GitHub shows no frozen "0%" bars. Widget state is saved (``metadata.widgets``) for exactly the widgets
still shown in an output and the models they reference (children, layouts, styles), so an interactive widget such
as notebook 03's α explorer renders on GitHub and nbviewer in its last state; the state of progress bars and of
any widget no output shows is dropped.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
MODEL_REFERENCE = re.compile(r"IPY_MODEL_([0-9a-zA-Z_-]+)")  # how one widget model's state names another

TQDM_TEXT = re.compile(r"\[\d+:\d\d[<,]")  # "[00:03<00:10, ..." (known total) or "[00:03, ..." (unknown)

ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


class NotebookError(Exception):
    """A notebook could not be read or did not run to the end; the message says which and why."""


def is_dead_progress_bar(output: nbformat.NotebookNode) -> bool:
    """A tqdm.auto bar saved from a headless run: a widget view without state, shown as '  0%|  | 0/20 [00:00<...'
    or, without a known total, as '0it [00:00, ...'."""
    data = output.get("data", {})
    return WIDGET_VIEW in data and bool(TQDM_TEXT.search("".join(data.get("text/plain", ""))))


def shown_widget_models(nb: nbformat.NotebookNode) -> set[str]:
    """Model ids of the widgets that the notebook's outputs display (widget-view outputs)."""
    return {o["data"][WIDGET_VIEW]["model_id"] for cell in nb.cells if cell.cell_type == "code"
            for o in cell.outputs if WIDGET_VIEW in o.get("data", {}) and "model_id" in o["data"][WIDGET_VIEW]}


def referenced_models(state: dict, roots: set[str]) -> set[str]:
    """``roots`` and every model their saved state references, transitively ("IPY_MODEL_<id>" strings)."""
    keep, todo = set(), [r for r in roots if r in state]
    while todo:
        model = todo.pop()
        if model in keep:
            continue
        keep.add(model)
        todo += [m for m in MODEL_REFERENCE.findall(json.dumps(state[model])) if m in state and m not in keep]
    return keep


def clean(nb: nbformat.NotebookNode) -> None:
    """Drop dead progress bars and execution timing, keep the saved widget state only of the widgets still shown
    (and the models they reference; no metadata.widgets when none is shown); pin the kernelspec to python3."""
    nb.metadata["kernelspec"] = KERNELSPEC
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not is_dead_progress_bar(o)]
    saved = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {})
    state = saved.get("state", {})
    keep = referenced_models(state, shown_widget_models(nb))
    if keep:
        saved["state"] = {model: state[model] for model in state if model in keep}
        nb.metadata["widgets"] = {WIDGET_STATE: saved}
    else:
        nb.metadata.pop("widgets", None)


def read_notebook(path: Path) -> nbformat.NotebookNode:
    """Read ``path`` as an nbformat-4 notebook, or raise :class:`NotebookError` saying what is wrong with it."""
    if not path.exists():
        raise NotebookError(f"{path}: no such notebook (check the path; the series lives in notebooks/)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise NotebookError(f"{path}: cannot be read ({err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise NotebookError(f"{path}: not a notebook, the file is not valid JSON (line {err.lineno}, column "
                            f"{err.colno}: {err.msg}); restore it from git or re-save it from Jupyter") from None
    if not isinstance(data, dict) or "cells" not in data or "nbformat" not in data:
        raise NotebookError(f"{path}: JSON but not a Jupyter notebook (expected an object with 'cells' and "
                            f"'nbformat', got {type(data).__name__})")
    try:
        return nbformat.reads(text, as_version=4)
    except Exception as err:  # nbformat raises jsonschema and conversion errors of several types
        raise NotebookError(f"{path}: not a valid nbformat-4 notebook ({err})") from None


class CellTracker:
    """Remembers which cell the kernel is on, so that a failure can name it."""

    def __init__(self) -> None:
        self.index = -1

    def on_cell_start(self, cell: nbformat.NotebookNode, cell_index: int) -> None:
        self.index = cell_index


def execute(nb: nbformat.NotebookNode, *, path: Path, timeout: int) -> None:
    """Run every cell of ``nb`` (in memory) with the kernel in ``path``'s folder; on any failure raise
    :class:`NotebookError` naming the cell (1-based, all cells counted) and the error."""
    tracker = CellTracker()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                            on_cell_start=tracker.on_cell_start,
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as err:
        cell = nb.cells[tracker.index]
        first_line = next((line for line in cell.source.splitlines() if line.strip()), "")
        kind = {CellTimeoutError: f"timed out after {timeout} s (--timeout)",
                DeadKernelError: "the kernel died"}.get(type(err), "raised an error")
        raise NotebookError(f"{path}: cell {tracker.index + 1} of {len(nb.cells)} ({first_line!r}) {kind}\n"
                            f"{ANSI_COLOUR.sub('', str(err))}") from None


def write_atomically(nb: nbformat.NotebookNode, path: Path) -> None:
    """Write ``nb`` to a temporary file beside ``path`` and rename it over ``path`` (same permissions)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".ipynb.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            nbformat.write(nb, handle)
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(path: Path, *, timeout: int) -> float:
    """Execute ``path`` and replace it with the executed, cleaned notebook; return the seconds it took.
    Raises :class:`NotebookError` (``path`` untouched) when it cannot be read or a cell fails."""
    nb = read_notebook(path)
    start = time.perf_counter()
    execute(nb, path=path, timeout=timeout)
    clean(nb)
    write_atomically(nb, path)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell (default 3600)")
    args = parser.parse_args(argv)
    scale = os.environ.get("SUPSUP_SCALE", "tutorial")
    os.environ.pop("MPLBACKEND", None)  # a non-inline backend would leave the saved notebooks without figures
    failures = []
    for i, path in enumerate(args.notebooks, 1):
        print(f"[{i}/{len(args.notebooks)}] {path.name} at {scale} scale ...", end=" ", flush=True)
        try:
            seconds = run(path, timeout=args.timeout)
        except NotebookError as err:
            print("FAILED (notebook left unchanged)", flush=True)
            print(err, file=sys.stderr, flush=True)
            failures.append(str(err).splitlines()[0])
            continue
        print(f"done in {seconds:.0f} s", flush=True)
    if failures:
        print(f"\n{len(failures)} of {len(args.notebooks)} notebooks failed and were left unchanged:",
              file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
