"""scripts/run_notebooks.py never loses work: a notebook whose cell fails, times out or kills the kernel stays
byte-identical, the others are still executed and rewritten, and every failure is named at the end."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

RUNNER = Path(__file__).resolve().parents[1] / "scripts" / "run_notebooks.py"


def notebook(path: Path, *sources: str, stale: str = "from an earlier run") -> Path:
    """Write a notebook of code cells, each carrying a stale output and timing metadata, plus widget state."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    for source in sources:
        cell = nbformat.v4.new_code_cell(source, execution_count=7,
                                         outputs=[nbformat.v4.new_output("stream", text=stale)])
        cell.metadata["execution"] = {"iopub.status.busy": "2020-01-01T00:00:00Z"}
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


def run_runner(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_failing_notebooks_stay_byte_identical_and_the_others_are_rewritten(tmp_path):
    raises = notebook(tmp_path / "raises.ipynb", "x = 1", "raise ValueError(f'boom {6 * 7}')", "y = 2")
    sleeps = notebook(tmp_path / "sleeps.ipynb", "import time\ntime.sleep(60)")
    dies = notebook(tmp_path / "dies.ipynb", "import os\nos._exit(3)")
    good = notebook(tmp_path / "good.ipynb",
                    "from tqdm.auto import tqdm\nfor _ in tqdm(range(3)):\n    pass",
                    "import os\nprint('answer', 6 * 7, os.getcwd())")
    before = {p: p.read_bytes() for p in (raises, sleeps, dies)}

    result = run_runner(raises, sleeps, dies, good, "--timeout", "15", cwd=tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path.name} was modified"
    err = result.stderr
    assert 'raises.ipynb: cell 2 of 3 ("raise ValueError(f\'boom {6 * 7}\')") raised an error' in err
    assert "\nValueError: boom 42\n" in err  # the kernel's traceback, without colour codes
    assert "sleeps.ipynb: cell 1 of 1 ('import time') timed out after 15 s" in err
    assert "dies.ipynb: cell 1 of 1 ('import os') the kernel died" in err
    assert "3 of 4 notebooks failed and were left unchanged" in err
    assert result.stdout.count("FAILED (notebook left unchanged)") == 3
    assert "[4/4] good.ipynb" in result.stdout and "done in" in result.stdout

    nb = nbformat.read(good, as_version=4)
    assert "widgets" not in nb.metadata
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert all("execution" not in cell.metadata for cell in nb.cells)
    assert "from an earlier run" not in good.read_text()
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in nb.cells[0].outputs)
    printed = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert f"answer 42 {tmp_path}" in printed  # the kernel ran in the notebook's folder
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left behind"


def test_missing_and_unreadable_notebooks_get_a_message_not_a_traceback(tmp_path):
    missing = tmp_path / "missing.ipynb"
    not_json = tmp_path / "broken.ipynb"
    not_json.write_text('{"cells": [\n  oops\n')
    not_notebook = tmp_path / "list.ipynb"
    not_notebook.write_text("[1, 2]")
    contents = {p: p.read_bytes() for p in (not_json, not_notebook)}

    result = run_runner(missing, not_json, not_notebook, cwd=tmp_path)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"{missing}: no such notebook" in result.stderr
    assert f"{not_json}: not a notebook, the file is not valid JSON (line 2, column 3" in result.stderr
    assert f"{not_notebook}: JSON but not a Jupyter notebook" in result.stderr
    assert "3 of 3 notebooks failed" in result.stderr
    assert not missing.exists()
    for path, content in contents.items():
        assert path.read_bytes() == content


@pytest.mark.parametrize("reason", ["raises", "interrupted"])
def test_write_happens_only_after_success(tmp_path, monkeypatch, reason):
    """In-process: a failure before or during writing leaves the original and no temporary file."""
    spec = importlib.util.spec_from_file_location("run_notebooks", RUNNER)
    run_notebooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_notebooks)
    path = notebook(tmp_path / "nb.ipynb", "1 + 1")
    original = path.read_bytes()
    nb = nbformat.read(path, as_version=4)

    def broken_write(*args, **kwargs):
        raise (OSError("disk full") if reason == "raises" else KeyboardInterrupt())

    monkeypatch.setattr(run_notebooks.nbformat, "write", broken_write)
    with pytest.raises((OSError, KeyboardInterrupt)):
        run_notebooks.write_atomically(nb, path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["nb.ipynb"]


def test_widget_state_is_kept_for_shown_widgets_only(tmp_path):
    """A displayed widget keeps its saved state (with the models it references), so it renders without a kernel;
    progress bars and widgets that no output shows leave no state behind."""
    path = notebook(tmp_path / "widgets.ipynb",
                    "from tqdm.auto import tqdm\nfor _ in tqdm(range(3)):\n    pass",
                    "import ipywidgets as w\nhidden = w.IntSlider(value=3, description='hidden')\n"
                    "box = w.VBox([w.IntSlider(value=7, description='shown'), w.HTML('hello')])\nbox")

    result = run_runner(path, cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    nb = nbformat.read(path, as_version=4)
    assert not nb.cells[0].outputs or not any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
                                              for o in nb.cells[0].outputs)
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    (view,) = [o["data"]["application/vnd.jupyter.widget-view+json"] for o in nb.cells[1].outputs
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert state[view["model_id"]]["model_name"] == "VBoxModel"
    names = sorted(s["model_name"] for s in state.values())
    assert names.count("IntSliderModel") == 1 and "HTMLModel" in names
    assert "FloatProgressModel" not in names and "HBoxModel" not in names  # the tqdm bar's models
    slider = next(s["state"] for s in state.values() if s["model_name"] == "IntSliderModel")
    assert slider["value"] == 7 and slider["description"] == "shown"
    for model in state.values():  # every reference resolves inside the kept state
        for ref in re.findall(r"IPY_MODEL_([0-9a-zA-Z_-]+)", json.dumps(model)):
            assert ref in state, f"{model['model_name']} references a dropped model"
