"""The benchmark harness and scripts: the method on tiny fake functions, and every script's JSON fields (tiny
sizes; no timing asserted)."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402


def run_json(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--json"],
                         check=True, capture_output=True, text=True, cwd=ROOT, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_measure_warms_up_then_times_every_repeat():
    calls = []
    timing = harness.measure(lambda: calls.append(len(calls)), repeats=6, warmup=2)
    assert len(calls) == 8 and len(timing.samples) == 6
    assert timing.min <= timing.median <= timing.max
    assert timing.min == min(timing.samples) and timing.max == max(timing.samples)


def test_measure_default_is_five_repeats_after_one_warmup():
    calls = []
    timing = harness.measure(lambda: calls.append(1))
    assert len(calls) == 6 and len(timing.samples) == 5


def test_measure_rejects_no_repeats():
    with pytest.raises(ValueError, match="repeats must be ≥ 1"):
        harness.measure(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="warmup must be ≥ 0"):
        harness.measure(lambda: None, warmup=-1)


def test_timing_of_samples_is_median_min_max():
    timing = harness.Timing.of([3.0, 1.0, 2.0, 10.0, 4.0])
    assert (timing.median, timing.min, timing.max) == (3.0, 1.0, 10.0)
    with pytest.raises(ValueError, match="at least one sample"):
        harness.Timing.of([])


def test_environment_names_device_threads_torch_cpu():
    env = harness.environment("cpu")
    assert env["device"] == "cpu" and env["threads"] == torch.get_num_threads()
    assert env["torch"] == torch.__version__ and isinstance(env["cpu"], str) and env["cpu"]
    assert "gpu" in env


def test_report_json_has_prefixed_timings_ratios_and_environment(capsys):
    timings = {"ours_x_s": harness.Timing.of([1.0, 2.0, 3.0]), "floor_x_s": harness.Timing.of([0.5])}
    text = harness.report("t", timings, ratios={"ours_over_floor": 4.0}, extra={"T": 3}, as_json=True)
    result = json.loads(text)
    assert json.loads(capsys.readouterr().out) == result
    assert result["ours_x_s"] == {"median": 2.0, "min": 1.0, "max": 3.0, "samples": [1.0, 2.0, 3.0]}
    assert result["ours_over_floor"] == 4.0 and result["T"] == 3 and result["environment"]["device"] == "cpu"


def test_report_table_lists_every_path_in_ms():
    text = harness.report("title", {"reference_y": harness.Timing.of([0.25])}, ratios={"r": 1.5}, extra={},
                          as_json=False)
    assert text.splitlines()[0] == "title" and "250.00" in text and "1.50x" in text


def test_report_rejects_unprefixed_or_repeated_names():
    with pytest.raises(ValueError, match="must start with one of"):
        harness.report("t", {"mine": harness.Timing.of([1.0])}, ratios={}, extra={}, as_json=True)
    with pytest.raises(ValueError, match=r"\['ours_a'\] repeat"):
        harness.report("t", {"ours_a": harness.Timing.of([1.0])}, ratios={"ours_a": 1.0}, extra={}, as_json=True)


def test_common_arguments():
    parser = harness.common_arguments(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert (args.json, args.repeats, args.threads) == (False, 5, None)
    args = parser.parse_args(["--json", "--repeats", "7", "--threads", "1"])
    assert (args.json, args.repeats, args.threads) == (True, 7, 1)


def test_train_throughput_reports_ours_reference_and_floor():
    result = run_json("train_throughput.py", "--batches", "4", "--repeats", "1")
    for name in ("ours_train", "reference_train", "floor_train"):
        assert result[name]["median"] > 0 and len(result[name]["samples"]) == 1
    assert {"ours_over_floor", "reference_over_floor", "environment"} <= set(result)
    assert result["same_masks_as_reference"] is True and 0 <= result["accuracy"] <= 1


def test_gg_training_reports_every_k_and_checks_the_masks():
    result = run_json("gg_training.py", "--batches", "3", "--ks", "1", "3", "--repeats", "1", "--pool", "2")
    for name in ("ours_k1_per_task", "ours_k3_per_task", "reference_per_task", "floor_per_task"):
        assert result[name]["median"] > 0
    assert {"ours_k1_per_task_over_floor", "ours_k3_per_task_over_floor"} <= set(result)
    assert result["same_masks_at_once_as_alone"] is True and result["ks"] == [1, 3]


def test_task_inference_reports_ours_reference_and_floor():
    result = run_json("task_inference.py", "--quick")
    for tasks in (30, 60):
        for key in (f"ours_one_shot_T{tasks}", f"ours_binary_T{tasks}", f"reference_one_shot_T{tasks}",
                    f"floor_read_T{tasks}"):
            assert result[key]["median"] > 0 and len(result[key]["samples"]) == 1
        assert result[f"same_task_T{tasks}"] is True  # ours and the authors' float-stack One-Shot agree
        assert result[f"ours_one_shot_T{tasks}_over_floor"] > 0
    assert "ours_one_shot_growth_over_linear_T30_to_T60" in result and "ours_each_32x30" in result
    if result["environment"]["device"] == "cpu":  # what bounds the α-gradient: 1 thread vs all, in cache or not
        for key in ("ours_dot_T60_1thread", "ours_dot_in_cache_1thread", "floor_read_T60_1thread"):
            assert result[key]["median"] > 0
        assert {"thread_gain_dot_T60", "thread_gain_read_T60", "ours_dot_T60_over_in_cache_1thread",
                "dot_bytes_per_ns_per_thread", "core_clock_ghz", "masked_adds_per_cycle_per_thread",
                "adds_per_ns_unmasked", "adds_per_ns_new_mask_per_add", "adds_per_ns_mask_per_4_adds"} <= set(result)
        assert result["core_clock_ghz"] > 0.1
    assert result["environment"]["device"] in ("cpu", "cuda")
