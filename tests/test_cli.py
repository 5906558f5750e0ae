import subprocess
import sys

import pytest
from typer.testing import CliRunner

from etune.tuner.cli import app

runner = CliRunner()


def test_kernels_lists_the_suite():
    result = runner.invoke(app, ["kernels"])
    assert result.exit_code == 0
    assert "gemm:4096,4096,4096" in result.output and "attention:8,32,1,4096,128" in result.output
    assert "[causal]" in result.output


@pytest.mark.parametrize("args", [["space", "gemm:4096,4096"], ["space", "nope:1"],
                                  ["space", "softmax:64,64", "--target", "b9000"],
                                  ["tune", "softmax:64,64", "--objective", "speed", "--backend", "sim"],
                                  ["tune", "softmax:64,64", "--objective", "latency", "--max-slowdown", "0.1"],
                                  ["tune", "softmax:64,64", "--backend", "tpu"],
                                  ["tune", "softmax:64,64", "--strategy", "annealing", "--backend", "sim"],
                                  ["report", "--db", "/nonexistent/etune.db"]])
def test_user_mistakes_exit_nonzero_with_one_line(args):
    proc = subprocess.run([sys.executable, "-m", "etune.tuner.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_space_command_builds_and_reports(tmp_path):
    result = runner.invoke(app, ["space", "softmax:256,256", "--samples", "3", "--jobs", "2",
                                 "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "softmax:256,256" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[2:3] == ["3/3"] and cells[4:6] == ["3/3", "100%"], cells


def test_tune_then_report_on_sim(tmp_path):
    import json

    db = tmp_path / "cli.db"
    result = runner.invoke(app, ["tune", "softmax:256,256", "--backend", "sim", "--no-build", "--trials", "6",
                                 "--batch", "3", "--objective", "energy", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("backend: sim")
    result = runner.invoke(app, ["report", "--db", str(db), "--format", "json"])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.output)["workloads"]
    assert entry["workload"] == "softmax:256,256" and entry["backend"] == "sim"
    assert set(entry["best"]) == {"energy@0.05"} and entry["best"]["energy@0.05"]["energy_measured"]
    assert entry["counts"]["latency_measurements"] == 6
    assert 1 <= entry["counts"]["energy_measurements"] <= 3
    table = runner.invoke(app, ["report", "--db", str(db)])
    assert table.exit_code == 0 and "model outputs, not hardware" in " ".join(table.output.split())


def test_tune_and_report_take_the_objective_spellings_export_takes(tmp_path):
    import json

    db = tmp_path / "o.db"
    tune = ["tune", "softmax:256,256", "--backend", "sim", "--no-build", "--trials", "2", "--batch", "2",
            "--db", str(db)]
    result = runner.invoke(app, tune + ["--objective", "energy@0.1"])
    assert result.exit_code == 0, result.output
    # --max-slowdown is another spelling of the same objective: the same run resumes.
    result = runner.invoke(app, tune + ["--objective", "energy", "--max-slowdown", "0.1"])
    assert result.exit_code == 0 and "run 1" in result.output, result.output
    result = runner.invoke(app, tune + ["--objective", "energy@0.1", "--max-slowdown", "0.2"])
    assert result.exit_code == 2 and "contradicts" in result.output
    result = runner.invoke(app, ["report", "--db", str(db), "--objective", "Energy@0.10", "--format", "json"])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.output)["workloads"]
    assert list(entry["best"]) == ["energy@0.1"] and [r["objective"] for r in entry["runs"]] == ["energy@0.1"]
