from pathlib import Path

import pytest
import torch

from supsup_lite import config


def test_device_default_and_override(monkeypatch):
    monkeypatch.delenv("SUPSUP_DEVICE", raising=False)
    assert config.device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("SUPSUP_DEVICE", "cpu")
    assert config.device() == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu0", "tpu", "banana"])
def test_device_rejects_unknown_names(monkeypatch, bad):
    monkeypatch.setenv("SUPSUP_DEVICE", bad)
    with pytest.raises(ValueError, match="SUPSUP_DEVICE"):
        config.device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SUPSUP_DEVICE", "cuda")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        config.device()


PRESETS = {"smoke": {"tasks": 2}, "tutorial": {"tasks": 20}, "paper": {"tasks": 250}}


def test_pick_scale_reads_env_and_prints(monkeypatch, capsys):
    monkeypatch.delenv("SUPSUP_SCALE", raising=False)
    cfg = config.pick_scale(PRESETS)
    assert cfg.tasks == 20 and cfg.scale == "tutorial"
    assert "scale: tutorial (tasks=20)" in capsys.readouterr().out
    monkeypatch.setenv("SUPSUP_SCALE", "paper")
    assert config.pick_scale(PRESETS, verbose=False)["tasks"] == 250


def test_pick_scale_errors(monkeypatch):
    monkeypatch.setenv("SUPSUP_SCALE", "huge")
    with pytest.raises(ValueError, match="smoke, tutorial, paper"):
        config.pick_scale(PRESETS)
    monkeypatch.setenv("SUPSUP_SCALE", "smoke")
    with pytest.raises(ValueError, match="missing"):
        config.pick_scale({"smoke": {}, "tutorial": {}})
    cfg = config.pick_scale(PRESETS, verbose=False)
    with pytest.raises(AttributeError, match="no setting 'batches'"):
        _ = cfg.batches


def test_figures_dir_is_temporary_at_smoke_scale(monkeypatch):
    monkeypatch.setenv("SUPSUP_SCALE", "smoke")
    assert config.figures_dir() != config.project_root() / "figures"
    monkeypatch.setenv("SUPSUP_SCALE", "tutorial")
    assert config.figures_dir() == config.project_root() / "figures"


def test_data_root_relative_to_project(monkeypatch, tmp_path):
    monkeypatch.setenv("SUPSUP_DATA", "some/data")
    assert config.data_root() == (config.project_root() / "some/data").resolve()
    monkeypatch.setenv("SUPSUP_DATA", str(tmp_path))
    assert config.data_root() == Path(tmp_path)


def test_derive_seed_gives_independent_streams_per_run_task_and_purpose():
    from supsup_lite.config import SEED_PURPOSES, derive_seed

    seeds = {derive_seed(run, task, purpose) for run in range(4) for task in range(50) for purpose in SEED_PURPOSES}
    assert len(seeds) == 4 * 50 * len(SEED_PURPOSES)           # no collisions, unlike seed + task
    assert derive_seed(1, 0, "scores") != derive_seed(0, 1, "scores")
    assert derive_seed(3, 7, "batches") == derive_seed(3, 7, "batches")
    assert all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="purpose must be one of"):
        derive_seed(0, 0, "init")
    with pytest.raises(ValueError, match="task must be a non-negative int"):
        derive_seed(0, 1.5, "scores")
