"""benchmarks/suite.py on sim with a tiny budget: stops on its time budget, resumes, writes the table."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path, *extra):
    command = [sys.executable, str(REPO / "benchmarks" / "suite.py"), "--backend", "sim", "--no-build",
               "--trials", "6", "--workloads", "softmax-32768x128", "--db", str(tmp_path / "suite.db"),
               "--out", str(tmp_path / "out"), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_suite_stops_on_its_time_budget_and_resumes(tmp_path):
    first = _run(tmp_path, "--time-budget", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "run the same command again" in first.stderr
    second = _run(tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    document = json.loads((tmp_path / "out" / "benchmarks.json").read_text())
    (row,) = document["rows"]
    assert row["backend"] == "sim" and row["spec"] == "softmax:32768,128"
    for label in ("latency", "energy@0.05"):
        assert row[label]["complete"] and row[label]["trials"] == 6
        assert row[label]["energy_j"] > 0 and 0 < row[label]["roofline_fraction"] <= 1
        assert row[label]["tuning_wall_s"] > 0
    assert row["vendor"]["energy"] > 0 and row["vendor"]["kernel"] == "torch.softmax"
    table = (tmp_path / "out" / "benchmarks.md").read_text()
    assert "model outputs, not hardware" in table and "softmax-32768x128" in table
    third = _run(tmp_path)  # nothing left to do: same numbers, no new measurements
    assert json.loads((tmp_path / "out" / "benchmarks.json").read_text())["rows"][0]["latency"]["trials"] == 6
    assert third.returncode == 0
