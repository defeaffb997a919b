"""Packaging: the kernels need none of the notebook extras, the version has one source, and every declared
dependency has its tested version in constraints.txt."""
from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import supsup_lite

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_ONLY = ["matplotlib", "seaborn", "pandas", "ipywidgets", "IPython", "jupyterlab", "scipy"]

WITHOUT_EXTRAS = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {NOTEBOOK_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not a core dependency)")
sys.meta_path.insert(0, Block())

import torch
import supsup_lite
from supsup_lite import MaskBank, frozen_random_model, maskable_parameters, one_shot

model = frozen_random_model("lenet_300_100", 10, seed=0, device="cpu")
bank = MaskBank.for_model(model)
generator = torch.Generator().manual_seed(0)
for _ in range(3):
    bank.append({{name: torch.rand(w.shape, generator=generator) < 0.5
                 for name, w in maskable_parameters(model).items()}})
task = one_shot(model, bank, torch.randn(1, 784, generator=generator))
assert 0 <= task < 3, task
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({NOTEBOOK_ONLY!r}))
assert not loaded, loaded
print("one-shot task", task)
"""


def test_kernels_import_and_infer_without_the_notebook_extras():
    """`import supsup_lite` and One-Shot inference with matplotlib, ipywidgets, pandas... made unimportable."""
    result = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "one-shot task" in result.stdout


def requirement_name(requirement: str) -> str:
    """PEP 503 normalised project name of a requirement string."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def test_every_declared_dependency_is_pinned_in_constraints():
    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {requirement_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {requirement_name(r) for r in extra}
    declared.discard("supsup-lite")
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", line), f"not an exact pin: {line!r}"
            name = requirement_name(line)
            assert name not in pins, f"{name} pinned twice"
            pins[name] = line
    assert "supsup-lite" not in pins, "constraints.txt must not pin the project itself"
    assert declared - pins.keys() == set(), "declared in pyproject.toml but not pinned in constraints.txt"


def test_one_version_source():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "supsup_lite.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", supsup_lite.__version__)
    assert metadata.version("supsup-lite") == supsup_lite.__version__
