"""The SQLite records database: round trips, idempotency and durability under SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from etune.measurements.records import APPLICATION_ID, SCHEMA_VERSION, RecordsDB, RecordsDBError, RunBusyError

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def db(tmp_path):
    with RecordsDB.open(tmp_path / "records.db") as db:
        yield db


def test_round_trip(tmp_path):
    path = tmp_path / "records.db"
    with RecordsDB.open(path) as db:
        wid = db.add_workload("gemm_4096x4096x4096_fp16", "gemm", {"m": 4096, "n": 4096, "k": 4096})
        cid = db.add_candidate(wid, "hash-a", 2, '[["sch.split", 1]]')
        db.set_features(cid, {"flops": 1.4e11, "tiles": [64, 128]})
        mid = db.add_measurement(
            workload_id=wid, candidate_id=cid, kind="energy", backend="nvml", value=0.152,
            spread=0.004, device_name="NVIDIA H100 80GB HBM3", driver="580.0", sm_clock_mhz=1980,
            temperature_c=51.0, details={"windows": 3, "method": "counter"},
            started_at=100.0, finished_at=101.5,
        )
        vendor = db.add_measurement(workload_id=wid, kind="latency", backend="nvml", value=213e-6,
                                    details={"vendor": "torch.matmul"})

    with RecordsDB.open(path) as db:  # reopened: everything came from the file
        assert db.schema_version == SCHEMA_VERSION
        [w] = db.workloads()
        assert (w.id, w.family, w.params) == (wid, "gemm", {"m": 4096, "n": 4096, "k": 4096})
        [c] = db.candidates(wid)
        assert (c.id, c.structural_hash, c.design_space, c.trace) == (
            cid, "hash-a", 2, '[["sch.split", 1]]')
        assert c.features == {"flops": 1.4e11, "tiles": [64, 128]}
        [m] = db.measurements(workload_id=wid, kind="energy")
        assert m.id == mid and m.candidate_id == cid and m.ok
        assert (m.value, m.spread, m.sm_clock_mhz, m.finished_at) == (0.152, 0.004, 1980, 101.5)
        assert m.details == {"windows": 3, "method": "counter"}
        [v] = db.measurements(kind="latency")
        assert v.id == vendor and v.candidate_id is None and v.details["vendor"] == "torch.matmul"
        assert db.has_measurement(cid, "energy") and not db.has_measurement(cid, "latency")
        assert [x.id for x in db.measurements()] == [mid, vendor]


def test_adding_twice_returns_the_same_ids(db):
    wid = db.add_workload("softmax_4096x4096", "softmax", {"rows": 4096, "cols": 4096})
    assert db.add_workload("softmax_4096x4096", "softmax", {"rows": 4096, "cols": 4096}) == wid
    other = db.add_workload("softmax_32768x128", "softmax", {"rows": 32768, "cols": 128})
    assert other != wid

    cid = db.add_candidate(wid, "h1", 0, "trace-1")
    assert db.add_candidate(wid, "h1", 1, "trace-2") == cid  # same structure: same candidate
    assert db.add_candidate(other, "h1", 0, "trace-1") != cid  # hashes are per workload
    assert len(db.workloads()) == 2
    assert [c.trace for c in db.candidates(wid)] == ["trace-1"]


def test_failed_measurements_are_kept_and_checked(db):
    wid = db.add_workload("w", "gemm", {})
    cid = db.add_candidate(wid, "h", 0, "t")
    db.add_measurement(workload_id=wid, candidate_id=cid, kind="latency", backend="sim",
                       value=None, ok=False, error="build timed out")
    assert db.has_measurement(cid, "latency")
    [m] = db.measurements(candidate_id=cid)
    assert not m.ok and m.error == "build timed out"
    with pytest.raises(ValueError):
        db.add_measurement(workload_id=wid, kind="power", backend="sim", value=1.0)
    with pytest.raises(sqlite3.IntegrityError):  # ok rows need a value
        db.add_measurement(workload_id=wid, kind="energy", backend="sim", value=None)
    with pytest.raises(sqlite3.IntegrityError):  # foreign keys are enforced
        db.add_measurement(workload_id=wid + 99, kind="energy", backend="sim", value=1.0)
    assert len(db.measurements()) == 1  # the failed writes left nothing behind


def test_wal_mode_and_newer_schema_refused(tmp_path):
    path = tmp_path / "records.db"
    RecordsDB.open(path).close()
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(RuntimeError, match="schema version"):
        RecordsDB.open(path)


CHILD = textwrap.dedent("""
    import sys
    from etune.measurements.records import RecordsDB

    db = RecordsDB.open(sys.argv[1])
    wid = db.add_workload("gemm_64", "gemm", {"m": 64})
    i = 0
    while True:
        cid = db.add_candidate(wid, f"hash-{i}", 0, "trace " * 200)
        mid = db.add_measurement(workload_id=wid, candidate_id=cid, kind="latency",
                                 backend="sim", value=1e-6 * (i + 1), details={"i": i})
        print(cid, mid, flush=True)  # only after both commits returned
        i += 1
""")


def test_committed_rows_survive_sigkill(tmp_path):
    path = tmp_path / "records.db"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE,
                             text=True, cwd=REPO_ROOT, env=env)
    reported = []
    try:
        for line in child.stdout:
            reported.append(tuple(map(int, line.split())))
            if len(reported) >= 300:
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    reported += [tuple(map(int, line.split())) for line in child.stdout if line.endswith("\n")]
    assert child.returncode == -signal.SIGKILL
    assert len(reported) >= 300

    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    raw.close()
    with RecordsDB.open(path) as db:
        [workload] = db.workloads()
        candidates = {c.id for c in db.candidates(workload.id)}
        measurements = {m.id: m for m in db.measurements(workload_id=workload.id)}
    for cid, mid in reported:
        assert cid in candidates
        assert measurements[mid].candidate_id == cid


def test_runs_are_found_again_by_workload_objective_and_backend(tmp_path):
    with RecordsDB.open(tmp_path / "r.db") as db:
        wid = db.add_workload("softmax:8,8", "softmax", {"rows": 8, "cols": 8})
        first = db.start_run(wid, "energy@0.05", "sim", {"trials": 8})
        db.finish_run(first, "interrupted")
        again = db.start_run(wid, "energy@0.05", "sim", {"trials": 16})
        other = db.start_run(wid, "latency", "sim", {"trials": 8})
        assert again == first and other != first
        runs = {r.objective: r for r in db.runs(wid)}
        assert runs["energy@0.05"].status == "running"
        assert runs["energy@0.05"].config == {"trials": 16}
        assert set(runs) == {"energy@0.05", "latency"}
        db.add_measurement(workload_id=wid, kind="latency", backend="sim", value=1e-6, run_id=other)
        db.add_measurement(workload_id=wid, kind="latency", backend="sim", value=2e-6)
        assert [m.value for m in db.measurements(wid, run_id=other)] == [1e-6]
        assert len(db.measurements(wid)) == 2


def test_a_version_1_database_is_migrated(tmp_path):
    import sqlite3

    from etune.measurements import records

    raw = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    for statement in records._SCHEMA_V1:
        raw.execute(statement)
    raw.execute("PRAGMA user_version = 1")
    raw.execute("INSERT INTO workloads (spec, family, params, created_at) VALUES ('gemm:1,1,1', 'gemm', '{}', 0)")
    raw.close()
    with RecordsDB.open(tmp_path / "old.db") as db:
        assert db.schema_version == SCHEMA_VERSION == 2
        assert [w.spec for w in db.workloads()] == ["gemm:1,1,1"]
        assert db.runs() == []


def test_a_candidate_is_found_by_id(tmp_path):
    with RecordsDB.open(tmp_path / "c.db") as db:
        wid = db.add_workload("softmax:8,8", "softmax", {"rows": 8, "cols": 8})
        cid = db.add_candidate(wid, "abc", 1, "[]", features={"x": 1.0})
        assert db.candidate(cid) == db.candidates(wid)[0]
        assert db.candidate(cid).features == {"x": 1.0}
        assert db.candidate(cid + 1) is None


# -- files that are not (usable) etune databases -------------------------------------------------------
def _snapshot(path):
    return sorted((p.name, p.read_bytes()) for p in path.parent.iterdir() if p.is_file() and p.name.startswith(path.name))


@pytest.mark.parametrize("name,readonly,message", [
    ("other", True, "another application's SQLite database"),
    ("other", False, "another application's SQLite database, not etune records: etune does not write into it"),
    ("empty", True, "is an empty file, not an etune records database"),
    ("text", True, "is not an SQLite database"),
    ("text", False, "is not an SQLite database"),
    ("dir", True, "is a directory"),
    ("dir", False, "is a directory"),
    ("newer", True, "written by a newer etune .schema version 3; this one knows up to 2.: upgrade etune"),
    ("newer", False, "written by a newer etune"),
    ("missing", True, "no records database at"),
])
def test_what_is_not_an_etune_database_is_refused_untouched(tmp_path, unusable_databases, name, readonly, message):
    files = unusable_databases(tmp_path)
    path = files.get(name, tmp_path / "missing.db")
    before = _snapshot(path) if path.is_file() else None
    with pytest.raises(RecordsDBError, match=message) as info:
        RecordsDB.open(path, readonly=readonly)
    assert "\n" not in str(info.value)
    assert (_snapshot(path) if path.is_file() else None) == before  # nothing written, no -wal made
    if name == "other":
        raw = sqlite3.connect(path)
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not switched to WAL
        raw.close()


def test_a_damaged_database_is_one_line_when_read_or_written(tmp_path, unusable_databases):
    path = unusable_databases(tmp_path)["truncated"]
    for readonly in (True, False):
        with pytest.raises(RecordsDBError, match="malformed; it is damaged") as info:
            with RecordsDB.open(path, readonly=readonly) as db:
                db.candidates(1)
        assert "\n" not in str(info.value)


def test_writing_takes_a_new_path_or_an_empty_file_and_reading_never_writes(tmp_path, unusable_databases):
    files = unusable_databases(tmp_path)
    with RecordsDB.open(files["empty"]) as db:  # a 0-byte file becomes a records database
        db.add_workload("softmax:8,8", "softmax", {})
    raw = sqlite3.connect(files["empty"])
    assert raw.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    raw.close()
    with pytest.raises(RecordsDBError, match="no records database at"):
        RecordsDB.open(tmp_path / "new.db", create=False)
    assert not (tmp_path / "new.db").exists()
    with RecordsDB.open(files["good"], readonly=True) as db:
        assert len(db.candidates(1)) == 200
        with pytest.raises(RecordsDBError, match="opened read-only"):
            db.add_workload("gemm:8,8,8", "gemm", {})
    # A database written before etune marked its files (application_id 0) is still etune's.
    raw = sqlite3.connect(files["good"])
    raw.execute("PRAGMA application_id = 0")
    raw.close()
    with RecordsDB.open(files["good"], readonly=True) as db:
        assert [w.spec for w in db.workloads()] == ["softmax:8,8"]


def test_a_full_disk_is_one_line_and_keeps_what_was_recorded(tmp_path):
    path = tmp_path / "full.db"
    with RecordsDB.open(path) as db:
        wid = db.add_workload("softmax:8,8", "softmax", {})
        pages = db._conn.execute("PRAGMA page_count").fetchone()[0]
        db._conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # what a full disk looks like to SQLite
        with pytest.raises(RecordsDBError, match="database or disk is full; free some space") as info:
            for i in range(100):
                db.add_candidate(wid, f"h{i}", 0, "trace " * 1000)
        assert "\n" not in str(info.value)
        kept = len(db.candidates(wid))
    with RecordsDB.open(path, readonly=True) as db:
        assert len(db.candidates(wid)) == kept


def test_one_process_at_a_time_tunes_a_run(tmp_path):
    path = tmp_path / "lock.db"
    first, second = RecordsDB.open(path), RecordsDB.open(path)
    wid = first.add_workload("softmax:8,8", "softmax", {})
    run = first.start_run(wid, "latency", "sim", {})
    assert first.previous_ending(run) is None  # a new run
    with pytest.raises(RunBusyError, match=rf"run {run} \(softmax:8,8, latency on sim\) is being tuned by another "
                                           rf"etune \(pid {os.getpid()} on host .*\)"):
        second.start_run(wid, "latency", "sim", {})
    assert second.start_run(wid, "energy@0.05", "sim", {}) != run  # another run of the workload is free
    first.close()  # as if it were killed: the lock goes with the process's file descriptors
    assert second.start_run(wid, "latency", "sim", {}) == run
    assert second.previous_ending(run) == "ended without finishing (killed?)"
    second.finish_run(run, "interrupted")
    assert len(list(tmp_path.glob("*.lock"))) == 1  # the energy run's, still held
    second.close()
    assert not list(tmp_path.glob("*.lock"))  # released locks leave no file behind
    with RecordsDB.open(path) as again:
        assert again.start_run(wid, "latency", "sim", {}) == run
        assert again.previous_ending(run) == "was interrupted"
