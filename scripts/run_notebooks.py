"""Execute notebooks in place, one progress line each, and keep their metadata clean.

Usage: python scripts/run_notebooks.py notebooks/01_supermasks.ipynb [...]
The scale comes from SUPSUP_SCALE (``make run`` sets tutorial). Each kernel starts in the notebook's folder.
Widget state, progress-bar widgets (dead without a live kernel) and per-cell timing metadata are stripped
so that diffs stay small and GitHub shows no frozen "0%" bars.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


TQDM_TEXT = re.compile(r"\d+%\|.*\|.*\[")


def is_dead_progress_bar(output: nbformat.NotebookNode) -> bool:
    """A tqdm.auto bar saved from a headless run: a widget view without state, shown as '  0%|  | 0/20 [...'."""
    data = output.get("data", {})
    return WIDGET_VIEW in data and bool(TQDM_TEXT.search("".join(data.get("text/plain", ""))))


def clean(nb: nbformat.NotebookNode) -> None:
    """Drop widget state, dead progress bars and execution timing; pin the kernelspec to python3."""
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = KERNELSPEC
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not is_dead_progress_bar(o)]


def run(path: Path, timeout: int) -> float:
    """Execute ``path`` in place; return the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=False,
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    finally:
        clean(nb)
        nbformat.write(nb, path)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell (default 3600)")
    args = parser.parse_args()
    scale = os.environ.get("SUPSUP_SCALE", "tutorial")
    os.environ.pop("MPLBACKEND", None)  # a non-inline backend would leave the saved notebooks without figures
    for i, path in enumerate(args.notebooks, 1):
        print(f"[{i}/{len(args.notebooks)}] {path.name} at {scale} scale ...", end=" ", flush=True)
        try:
            seconds = run(path, args.timeout)
        except CellExecutionError as err:
            print("FAILED")
            print(err, file=sys.stderr)
            return 1
        print(f"done in {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
