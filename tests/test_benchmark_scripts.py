"""The benchmark scripts run and print the JSON fields their issues promise (tiny sizes; no timing asserted)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_json(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--json"],
                         check=True, capture_output=True, text=True, cwd=ROOT, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_train_throughput_reports_both_paths():
    result = run_json("train_throughput.py", "--batches", "4", "--repeats", "1")
    assert {"ours_epoch_s", "reference_epoch_s", "accuracy"} <= set(result)
    assert result["ours_epoch_s"] > 0 and result["reference_epoch_s"] > 0 and 0 <= result["accuracy"] <= 1
