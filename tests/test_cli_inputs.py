"""Issue 13, bad input: every user mistake and every unusable file ends in one readable line and a
non-zero exit, never a traceback, and loses nothing already recorded."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from etune.measurements.records import RecordsDB
from etune.tuner.cli import app

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
runner = CliRunner()


def one_line_error(result, code=None) -> str:
    """The single ``error:`` line on stderr of a command that failed."""
    assert result.exit_code != 0 and (code is None or result.exit_code == code), (result.exit_code, result.output)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, unusable_databases):
    root = tmp_path_factory.mktemp("files")
    unusable_databases(root)
    return root


BAD = [("other.db", "another application's SQLite database"), ("text.db", "not an SQLite database"),
       ("dir.db", "is a directory"), ("truncated.db", "malformed"), ("missing.db", "no records database"),
       ("newer.db", "written by a newer etune (schema version")]
COMMANDS = [["report"], ["export", "--format", "metaschedule"], ["measure", "--candidate", "1", "--backend", "sim"],
            ["tune", "softmax:256,256", "--backend", "sim", "--no-build", "--trials", "2"]]


@pytest.mark.parametrize("name,message,command", [
    (name, message, command) for name, message in BAD for command in COMMANDS
    if not (command[0] == "tune" and name == "missing.db")])  # tune starts a new database
def test_a_bad_database_is_one_line_for_every_command(files, name, message, command):
    path = files / name
    before = path.read_bytes() if path.is_file() else None
    line = one_line_error(runner.invoke(app, [*command, "--db", str(path)]))
    assert message in line
    assert (path.read_bytes() if path.is_file() else None) == before


def test_an_empty_file_is_no_database_to_read_but_tune_may_start_one(files, tmp_path):
    assert "empty file" in one_line_error(runner.invoke(app, ["report", "--db", str(files / "empty.db")]))
    assert (files / "empty.db").read_bytes() == b""


@pytest.mark.parametrize("args,message", [
    (["--backend", "bogus"], "no records for backend bogus in {db} (it has softmax:8,8; backends sim; runs tuned "
                             "for latency)"),
    (["--objective", "energy@0.1"], "no records for runs tuned for energy@0.1 in"),
    (["gemm:8,8,8", "--backend", "sim"], "no records for gemm:8,8,8 and backend sim in"),
    (["--objective", "energy@+1"], "bad objective"),
])
def test_report_says_what_it_did_not_find(files, args, message):
    db = files / "good.db"
    assert message.format(db=db) in one_line_error(runner.invoke(app, ["report", "--db", str(db), *args]))
    result = runner.invoke(app, ["report", "--db", str(db), "softmax:8, 8", "--objective", "latency", "--format",
                                 "json"])
    assert result.exit_code == 0 and '"softmax:8,8"' in result.stdout, result.output


def test_report_on_an_empty_database_is_an_error(tmp_path):
    RecordsDB.open(tmp_path / "new.db").close()
    line = one_line_error(runner.invoke(app, ["report", "--db", str(tmp_path / "new.db")]), 1)
    assert "holds no records yet: tune something first" in line


def test_a_tune_that_measured_nothing_is_an_error(tmp_path, monkeypatch):
    from etune.measurements.backend import MeasureResult
    from etune.measurements.sim import SimBackend

    def fail_all(self, candidates, kind, builds=None, progress=None):
        results = [MeasureResult(c.structural_hash, kind, False, error="wrong output") for c in candidates]
        for result in results:
            progress and progress(result)
        return results

    monkeypatch.setattr(SimBackend, "measure", fail_all)
    result = runner.invoke(app, ["tune", "softmax:256,256", "--backend", "sim", "--no-build", "--trials", "3",
                                 "--batch", "3", "--db", str(tmp_path / "t.db")])
    assert "no schedule was measured for softmax:256,256 (stopped by trials)" in one_line_error(result, 1)


def test_a_full_disk_during_tune_is_one_line_and_keeps_the_records(tmp_path, monkeypatch):
    opened = RecordsDB.open

    def nearly_full(path, **options):  # what a full disk looks like to SQLite
        db = opened(path, **options)
        pages = db._conn.execute("PRAGMA page_count").fetchone()[0]
        db._conn.execute(f"PRAGMA max_page_count = {pages + 4}")
        return db

    monkeypatch.setattr(RecordsDB, "open", nearly_full)
    path = tmp_path / "full.db"
    result = runner.invoke(app, ["tune", "softmax:256,256", "--backend", "sim", "--no-build", "--trials", "40",
                                 "--batch", "8", "--db", str(path)])
    assert "database or disk is full; free some space and run the same command again" in one_line_error(result, 1)
    monkeypatch.undo()
    with RecordsDB.open(path, readonly=True) as db:
        assert db.workloads() and db.runs()


def test_measure_json_into_a_directory_is_refused_before_measuring(tmp_path):
    result = runner.invoke(app, ["measure", "--vendor", "softmax:64,64", "--backend", "sim", "--json", str(tmp_path),
                                 "--db", str(tmp_path / "m.db")])
    assert "is a directory; give a file name" in one_line_error(result, 2)
    assert not (tmp_path / "m.db").exists()


def _readonly_mount_prefix(directory: Path) -> list[str] | None:
    """A command prefix that runs a command with ``directory`` mounted read-only (a user and mount
    namespace: no privileges needed), or None where this system cannot."""
    if shutil.which("unshare") is None:
        return None
    prefix = ["unshare", "-rm", "sh", "-c",
              'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"', str(directory)]
    probe = subprocess.run([*prefix, "touch", str(directory / "probe")], capture_output=True, text=True)
    if "Read-only file system" not in probe.stderr:
        return None
    return prefix


def test_a_database_on_a_read_only_file_system_reports_and_refuses_tune(files, tmp_path):
    shutil.copy(files / "good.db", tmp_path / "good.db")  # closed cleanly: no -wal or -shm beside it
    prefix = _readonly_mount_prefix(tmp_path)
    if prefix is None:
        pytest.skip("cannot mount a folder read-only here (no unshare or user namespaces)")
    cli = [sys.executable, "-m", "etune.tuner.cli"]
    report = subprocess.run([*prefix, *cli, "report", "--db", str(tmp_path / "good.db"), "--format", "json"],
                            capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert report.returncode == 0, report.stderr
    assert '"softmax:8,8"' in report.stdout and '"latency_measurements": 200' in report.stdout
    tune = subprocess.run([*prefix, *cli, "tune", "softmax:8,8", "--backend", "sim", "--no-build",
                           "--db", str(tmp_path / "good.db")], capture_output=True, text=True, env=ENV, cwd=REPO,
                          timeout=300)
    assert tune.returncode != 0 and "Traceback" not in tune.stderr, tune.stderr
    (line,) = tune.stderr.strip().splitlines()
    assert line.startswith("error:") and "read-only" in line, line


# -- Ctrl-C, SIGTERM, SIGKILL and a second etune on the same run --------------------------------------
def _tune(db: Path) -> list[str]:
    return [sys.executable, "-m", "etune.tuner.cli", "tune", "softmax:256,256", "--backend", "sim", "--no-build",
            "--objective", "latency", "--trials", "500", "--batch", "4", "--db", str(db)]


def _started(db: Path, at_least: int, latency_counts):
    """A tune process, once it has recorded ``at_least`` latency measurements."""
    import time

    process = subprocess.Popen(_tune(db), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**ENV, "PYTHONUNBUFFERED": "1"}, cwd=db.parent)
    deadline = time.monotonic() + 240
    while sum(latency_counts(db).values()) < at_least:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    return process


def _stopped(process, signum) -> tuple[str, str]:
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    # 128 + signum as a shell reports a process ended by the signal; now and then CPython ends by
    # raising SIGINT on itself once it saw a KeyboardInterrupt somewhere (the shell shows 130 then too).
    assert process.returncode in (128 + signum, -signum), (process.returncode, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return out, lines[0]


def test_ctrl_c_and_sigterm_stop_the_run_and_the_same_command_resumes_it(tmp_path, latency_counts):
    import signal

    db = tmp_path / "s.db"
    first = _started(db, 4, latency_counts)
    try:
        # A second etune on the same run is refused: it would measure every candidate again.
        line = one_line_error(runner.invoke(app, _tune(db)[3:]), 1)
        assert f"run 1 (softmax:256,256, latency on sim) is being tuned by another etune (pid {first.pid}" in line
        _, line = _stopped(first, signal.SIGINT)
    finally:
        first.kill()
    assert line == f"interrupted (Ctrl-C): what was measured is kept in {db}; the same command resumes the run"
    kept = latency_counts(db)
    with RecordsDB.open(db, readonly=True) as records:
        assert [r.status for r in records.runs()] == ["interrupted"]
    third = _started(db, sum(kept.values()) + 1, latency_counts)
    try:
        out, line = _stopped(third, signal.SIGTERM)
    finally:
        third.kill()
    assert line.startswith("terminated (SIGTERM): what was measured is kept in")
    assert f"the previous invocation of run 1 was interrupted; resuming with {len(kept)} candidates" in out
    counts = latency_counts(db)
    assert set(counts.values()) == {1} and len(counts) > len(kept)  # nothing lost, nothing measured twice


def test_build_workers_die_with_their_parent(tmp_path):
    import signal
    import time

    import psutil

    busy = tmp_path / "busy"
    script = (f"import os, sys, time; sys.path.insert(0, {str(REPO)!r})\n"
              "from search_space.build import build_pool\n"
              "def build(marker):\n"
              "    open(marker, 'w').close()\n"
              "    time.sleep(600)\n"
              "pool = build_pool(1, 600)\n"
              "print(pool.submit(os.getpid).result(), flush=True)\n"
              f"pool.submit(build, {str(busy)!r})\n"
              "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        worker = int(parent.stdout.readline())
        deadline = time.monotonic() + 60
        while not busy.exists():  # the worker is in the middle of a "build"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        deadline = time.monotonic() + 30
        while psutil.pid_exists(worker) and psutil.Process(worker).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the build worker outlived its parent"
            time.sleep(0.1)
    finally:
        parent.kill()
        if "worker" in locals() and psutil.pid_exists(worker):
            psutil.Process(worker).kill()
