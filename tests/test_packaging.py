"""The built wheel installs etune under its own name: a fresh virtualenv with it and another
distribution's top-level ``kernels`` package imports both, and ``etune.tune`` runs there."""
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args, **kwargs):
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def test_the_wheel_installs_under_the_etune_name_beside_another_kernels(tmp_path):
    wheels = tmp_path / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, REPO)  # as pip builds it
    (wheel,) = wheels.glob("etune-*.whl")
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    # etune's dependencies from this environment (a path, not a site directory: its editable etune
    # stays out); the fresh environment's own packages come first.
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "etune-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel)
    # Another distribution's top-level `kernels` (PyPI has one), installed beside etune.
    (site / "kernels").mkdir()
    (site / "kernels" / "__init__.py").write_text('WHO = "another distribution"\n')
    script = textwrap.dedent(f"""
        import etune, kernels
        assert kernels.WHO == "another distribution", kernels.__file__
        import etune.kernels
        assert "site-packages" in etune.kernels.__file__ and {str(REPO)!r} not in etune.kernels.__file__
        run = etune.tune("softmax:1024,1024", backend="sim", trials=16, storage="runs.db", build=False)
        print("best", run.best.latency_s, run.best.energy_j)
    """)
    proc = _run(python, "-c", script, cwd=tmp_path)
    assert proc.stdout.startswith("best ")
    assert (venv / "bin" / "etune").exists()
