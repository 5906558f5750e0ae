import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tuner.cli import app

runner = CliRunner()


def test_kernels_lists_the_suite():
    result = runner.invoke(app, ["kernels"])
    assert result.exit_code == 0
    assert "gemm:4096,4096,4096" in result.output and "attention:8,32,1,4096,128" in result.output
    assert "[causal]" in result.output


@pytest.mark.parametrize("args", [["space", "gemm:4096,4096"], ["space", "nope:1"],
                                  ["space", "softmax:64,64", "--target", "b9000"]])
def test_user_mistakes_exit_nonzero_with_one_line(args):
    proc = subprocess.run([sys.executable, "-m", "tuner.cli", *args], capture_output=True, text=True)
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
