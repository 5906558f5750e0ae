"""The records database: workloads, candidate schedules and their measurements in one SQLite file.

Every write is its own transaction, so a tuning run killed at any moment keeps every measurement it
had committed (measurements are expensive: an energy measurement costs about a second of GPU time).
Vendor reference measurements are rows with `candidate_id` NULL and details like
{"vendor": "torch.matmul"}.

`RecordsDB.open` is the one way in, for every command: ``readonly=True`` (report, export, analysis)
never writes, not even the journal mode, and refuses a file that is not an etune records database;
for writing (tune, measure) it creates a new database or takes an empty file, and refuses another
application's SQLite file. Whatever goes wrong with the file (a directory, not SQLite, damaged,
read-only, a newer schema, a full disk) is a RecordsDBError with one readable line.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sqlite3
import statistics
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 2  # stored in PRAGMA user_version; bump it and add a migration when the schema changes
KINDS = ("latency", "energy")  # what a measurement measures: seconds per call, joules per call
# PRAGMA application_id of an etune records database ("etun"), set whenever etune writes one. Files
# written before it was set are recognised by their tables and user_version.
APPLICATION_ID = 0x6574756E
_ETUNE_TABLES = {"workloads", "candidates", "measurements"}
_SQLITE_HEADER = b"SQLite format 3\x00"
# How the previous invocation of a run ended, by the status it left (see Tuner._load_previous).
_ENDINGS = {"running": "ended without finishing (killed?)", "interrupted": "was interrupted",
            "stopped": "stopped at its time budget", "finished": "finished"}
# What some SQLite errors mean for the user.
_HINTS = {"database or disk is full": "free some space and run the same command again: what was recorded is kept",
          "attempt to write a readonly database": "it is read-only here",
          "database is locked": "another process holds it locked",
          "file is not a database": "it is not an SQLite database",
          "database disk image is malformed": "it is damaged (truncated or corrupt)"}


class RecordsDBError(RuntimeError):
    """A records database cannot be opened, read or written: one readable line."""


class RunBusyError(RecordsDBError):
    """Another process is tuning the run."""


def _explain(path, exc: sqlite3.Error) -> RecordsDBError:
    message = str(exc).strip() or type(exc).__name__
    hint = next((h for m, h in _HINTS.items() if m in message), None)
    return RecordsDBError(f"records database {path}: {message}" + (f"; {hint}" if hint else ""))

_SCHEMA_V1 = (
    """CREATE TABLE workloads (
        id INTEGER PRIMARY KEY,
        spec TEXT NOT NULL UNIQUE,
        family TEXT NOT NULL,
        params TEXT NOT NULL,           -- JSON
        created_at REAL NOT NULL        -- unix seconds
    )""",
    """CREATE TABLE candidates (
        id INTEGER PRIMARY KEY,
        workload_id INTEGER NOT NULL REFERENCES workloads(id),
        structural_hash TEXT NOT NULL,
        design_space INTEGER NOT NULL,
        trace TEXT NOT NULL,
        features TEXT,                  -- JSON, filled in later
        created_at REAL NOT NULL,
        UNIQUE (workload_id, structural_hash)
    )""",
    """CREATE TABLE measurements (
        id INTEGER PRIMARY KEY,
        candidate_id INTEGER REFERENCES candidates(id),  -- NULL for vendor references
        workload_id INTEGER NOT NULL REFERENCES workloads(id),
        kind TEXT NOT NULL CHECK (kind IN ('latency', 'energy')),
        backend TEXT NOT NULL,
        device_name TEXT,
        driver TEXT,
        sm_clock_mhz REAL,
        temperature_c REAL,
        value REAL,                     -- seconds or joules per call
        spread REAL,
        details TEXT,                   -- JSON
        ok INTEGER NOT NULL CHECK (ok IN (0, 1)),
        error TEXT,
        started_at REAL,
        finished_at REAL,
        CHECK (ok = 0 OR value IS NOT NULL)
    )""",
    "CREATE INDEX measurements_by_workload ON measurements (workload_id, kind)",
    "CREATE INDEX measurements_by_candidate ON measurements (candidate_id, kind)",
)

# v2: tuning runs, so a report can say which objective a workload was tuned for and a resumed run
# finds the run it continues.
_SCHEMA_V2 = (
    """CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        workload_id INTEGER NOT NULL REFERENCES workloads(id),
        objective TEXT NOT NULL,        -- label: latency, energy, edp, energy@0.05
        backend TEXT NOT NULL,
        config TEXT NOT NULL,           -- JSON: budgets, seed, target
        status TEXT NOT NULL,           -- running | finished | interrupted
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        UNIQUE (workload_id, objective, backend)
    )""",
    # Which run took a measurement: runs of different objectives on one database each keep their
    # own budget, so a latency-only and an energy-aware run compare at the same trial count.
    "ALTER TABLE measurements ADD COLUMN run_id INTEGER REFERENCES runs(id)",
    "CREATE INDEX measurements_by_run ON measurements (run_id, kind)",
)

# MIGRATIONS[v] takes a database at version v to v + 1.
_MIGRATIONS: dict[int, tuple[str, ...]] = {0: _SCHEMA_V1, 1: _SCHEMA_V2}


@dataclass(frozen=True)
class WorkloadRow:
    """A workload as recorded (``kernels.Workload`` is the workload itself)."""

    id: int
    spec: str
    family: str
    params: dict
    created_at: float


@dataclass(frozen=True)
class CandidateRow:
    """A candidate as recorded: its trace, not the schedule (``search_space.Candidate``)."""

    id: int
    workload_id: int
    structural_hash: str
    design_space: int
    trace: str
    features: Any | None
    created_at: float


@dataclass(frozen=True)
class Measurement:
    id: int
    candidate_id: int | None
    workload_id: int
    kind: str
    backend: str
    device_name: str | None
    driver: str | None
    sm_clock_mhz: float | None
    temperature_c: float | None
    value: float | None
    spread: float | None
    details: dict | None
    ok: bool
    error: str | None
    started_at: float | None
    finished_at: float | None
    run_id: int | None = None


@dataclass(frozen=True)
class Point:
    """A candidate's measured (latency, energy): what objectives rank and the Pareto front shows."""

    key: object  # candidate id (from the database), structural hash, or "vendor"
    latency_s: float
    energy_j: float | None = None
    energy_measured: bool = False
    # False when an energy measurement hit its window cap with the spread above its target: the
    # number is less certain, and such a point wins only when the user allows it.
    energy_converged: bool = True


@dataclass(frozen=True)
class Run:
    id: int
    workload_id: int
    objective: str
    backend: str
    config: dict
    status: str
    created_at: float
    updated_at: float


def _candidate(r: sqlite3.Row) -> CandidateRow:
    return CandidateRow(r["id"], r["workload_id"], r["structural_hash"], r["design_space"], r["trace"],
                     _load(r["features"]), r["created_at"])


def _dump(obj: Any) -> str | None:
    return None if obj is None else json.dumps(obj, sort_keys=True)


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class _RunLock:
    """An flock on a file beside the database, held by the one process tuning a run. The kernel drops
    it when its holder dies, so a run killed outright (SIGKILL) never stays locked."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """None once held; who holds it ("pid N on host H") when another process does."""
        try:
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
                    os.close(fd)
                    return holder or "a process that has not said who it is yet"
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)  # the holder before us removed the file as we opened it: lock the new one
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode(), 0)
        except OSError as exc:
            raise RecordsDBError(f"cannot lock the run with {self.path}: {exc.strerror}") from None
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.unlink(self.path)  # before unlocking, so that the next holder locks a new file
            except OSError:
                pass
            os.close(fd)


def _check_file(path: Path, must_exist: bool, write: bool) -> None:
    """What can be told of the path before SQLite opens it (SQLite would create a missing file, say
    "file is not a database" of a text file only once it reads it, and "unable to open database
    file" of a read-only one)."""
    if path.is_dir():
        raise RecordsDBError(f"{path} is a directory, not a records database file (e.g. {path / 'etune.db'})")
    if not path.exists():
        if must_exist:
            raise RecordsDBError(f"no records database at {path}")
        if not path.parent.is_dir():
            raise RecordsDBError(f"directory {path.parent} does not exist")
        if write and not os.access(path.parent, os.W_OK):
            raise RecordsDBError(f"folder {path.parent} is read-only here: etune cannot create {path.name} in it")
        return
    try:
        with path.open("rb") as f:
            header = f.read(len(_SQLITE_HEADER))
    except OSError as exc:
        raise RecordsDBError(f"cannot read {path}: {exc.strerror}") from None
    if header and header != _SQLITE_HEADER:
        raise RecordsDBError(f"{path} is not an SQLite database, so not an etune records database")
    if not header and must_exist:
        raise RecordsDBError(f"{path} is an empty file, not an etune records database")
    if write and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
        raise RecordsDBError(f"{path} is read-only here (the file or its folder): etune cannot record into it; "
                             "etune report and etune export can still read it")


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; _write() opens each one explicitly.
    if not readonly:
        return sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError as exc:
        if "unable to open" not in str(exc):
            conn.close()
            raise
        # A WAL database in a read-only folder without its -shm file (a read-only file system, say):
        # SQLite can read it only as immutable, which is what it is there.
        conn.close()
        conn = sqlite3.connect(uri + "&immutable=1", uri=True, timeout=30.0, isolation_level=None)
    conn.execute("PRAGMA query_only=ON")
    return conn


def _whose(conn: sqlite3.Connection) -> str:
    """"etune", "empty" (no table: a new or 0-byte file) or "other" (another application's)."""
    application_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if application_id == APPLICATION_ID:
        return "etune"
    if application_id == 0 and not tables and version == 0:
        return "empty"
    if application_id == 0 and _ETUNE_TABLES <= tables and version >= 1:
        return "etune"
    return "other"


class RecordsDB:
    """A records database file. Use `RecordsDB.open(path)`; one instance per thread."""

    def __init__(self, conn: sqlite3.Connection, path: str, readonly: bool = False):
        self._conn = conn
        self.path = path
        self.readonly = readonly
        self._locks: dict[str, _RunLock] = {}  # run key -> its lock, held by this process
        self._run_keys: dict[int, str] = {}  # run id -> run key
        self._previous: dict[int, str | None] = {}  # run id -> status it had when start_run found it

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False, create: bool = True) -> "RecordsDB":
        """The records database at ``path``. ``readonly``: never writes, and the file must be an
        etune records database of a schema this etune reads. Otherwise a new path or an empty file
        becomes one (unless ``create`` is False), another application's SQLite file is refused, and
        an older schema is brought up to date. RecordsDBError with one line when it cannot."""
        path = Path(path)
        _check_file(path, must_exist=readonly or not create, write=not readonly)
        conn = None
        try:
            conn = _connect(path, readonly)
            conn.row_factory = sqlite3.Row
            whose = _whose(conn)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if whose == "other":
                raise RecordsDBError(f"{path} is another application's SQLite database, not etune records"
                                     + ("" if readonly else ": etune does not write into it; give a new path"))
            if readonly and whose == "empty":
                raise RecordsDBError(f"{path} is an empty SQLite database, not etune records: nothing to read")
            if version > SCHEMA_VERSION:
                raise RecordsDBError(f"{path} was written by a newer etune (schema version {version}; this one "
                                     f"knows up to {SCHEMA_VERSION}): upgrade etune")
            if readonly:
                if version < SCHEMA_VERSION:
                    raise RecordsDBError(f"{path} has the schema of an older etune (version {version}): open it "
                                         "for writing once (etune tune) to bring it up to date")
                return cls(conn, str(path), readonly=True)
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: COMMIT returns after the transaction is written to the WAL file with
            # write(2), i.e. it is in the OS page cache, so a SIGKILLed process loses nothing it
            # committed. Only an OS crash or power cut can drop the last commits (never corrupting the
            # file); FULL would guard against that too at the price of an fsync per commit.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            db = cls(conn, str(path))
            db._migrate()
            return db
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.Error):
                raise _explain(path, exc) from None
            raise

    def close(self) -> None:
        for lock in self._locks.values():
            lock.release()
        self._locks.clear()
        self._conn.close()

    def __enter__(self) -> "RecordsDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise RecordsDBError(f"records database {self.path} was opened read-only")
        try:
            # IMMEDIATE takes the write lock up front, so a read-then-insert cannot race another writer.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                if self._conn.in_transaction:  # some errors make SQLite roll back by itself
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
            raise  # etune's own mistakes, not the file's
        except sqlite3.DatabaseError as exc:  # full, read-only, damaged, locked for too long...
            raise _explain(self.path, exc) from None

    def _read(self, sql: str, args=()) -> list[sqlite3.Row]:
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise _explain(self.path, exc) from None

    def _migrate(self) -> None:
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:  # another etune upgraded it since open() looked
                raise RecordsDBError(f"{self.path} was written by a newer etune (schema version {version}; "
                                     f"this one knows up to {SCHEMA_VERSION}): upgrade etune")
            for v in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[v]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    @property
    def schema_version(self) -> int:
        return self._read("PRAGMA user_version")[0][0]

    # -- workloads

    def add_workload(self, spec: str, family: str, params: dict) -> int:
        """Id of the workload named `spec`, inserting it the first time (the spec is its identity)."""
        with self._write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO workloads (spec, family, params, created_at)"
                " VALUES (?, ?, ?, ?)",
                (spec, family, _dump(params), time.time()),
            )
            return conn.execute("SELECT id FROM workloads WHERE spec = ?", (spec,)).fetchone()[0]

    def workloads(self) -> list[WorkloadRow]:
        rows = self._read("SELECT * FROM workloads ORDER BY id")
        return [WorkloadRow(r["id"], r["spec"], r["family"], _load(r["params"]), r["created_at"])
                for r in rows]

    # -- candidates

    def add_candidate(self, workload_id: int, structural_hash: str, design_space: int, trace: str,
                      features: Any | None = None) -> int:
        """Id of the candidate, inserting it unless one with the same structural hash exists."""
        if not isinstance(trace, str):
            raise TypeError("trace must be a serialised string")
        with self._write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO candidates"
                " (workload_id, structural_hash, design_space, trace, features, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (workload_id, structural_hash, design_space, trace, _dump(features), time.time()),
            )
            return conn.execute(
                "SELECT id FROM candidates WHERE workload_id = ? AND structural_hash = ?",
                (workload_id, structural_hash),
            ).fetchone()[0]

    def set_features(self, candidate_id: int, features: Any) -> None:
        with self._write() as conn:
            cur = conn.execute("UPDATE candidates SET features = ? WHERE id = ?",
                               (_dump(features), candidate_id))
            if cur.rowcount != 1:
                raise KeyError(f"no candidate {candidate_id}")

    def candidates(self, workload_id: int) -> list[CandidateRow]:
        rows = self._read("SELECT * FROM candidates WHERE workload_id = ? ORDER BY id", (workload_id,))
        return [_candidate(r) for r in rows]

    def candidate(self, candidate_id: int) -> CandidateRow | None:
        rows = self._read("SELECT * FROM candidates WHERE id = ?", (candidate_id,))
        return _candidate(rows[0]) if rows else None

    # -- tuning runs

    def start_run(self, workload_id: int, objective: str, backend: str, config: dict) -> int:
        """Id of the run tuning this workload for this objective on this backend; a second call
        (a resumed run) finds the same run, marks it running again and updates its config.

        One process at a time tunes a run: it holds the run's lock (a file beside the database) from
        here to finish_run or close; RunBusyError while another process holds it. How the previous
        invocation ended is then ``previous_ending(run_id)``."""
        key = hashlib.sha1(f"{workload_id}\0{objective}\0{backend}".encode()).hexdigest()[:16]
        lock = self._locks.get(key) or _RunLock(Path(f"{os.path.realpath(self.path)}-run-{key}.lock"))
        if lock.fd is None:
            holder = lock.acquire()
            if holder is not None:
                spec = self._read("SELECT spec FROM workloads WHERE id = ?", (workload_id,))
                run = self._read("SELECT id FROM runs WHERE workload_id = ? AND objective = ? AND backend = ?",
                                 (workload_id, objective, backend))
                raise RunBusyError(
                    f"run {run[0][0] if run else '?'} ({spec[0][0] if spec else workload_id}, {objective} on "
                    f"{backend}) is being tuned by another etune ({holder}) with {self.path}: wait for it to end, "
                    "or stop it, then run this command again")
            self._locks[key] = lock
        now = time.time()
        with self._write() as conn:
            inserted = conn.execute(
                "INSERT INTO runs (workload_id, objective, backend, config, status, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, 'running', ?, ?) ON CONFLICT (workload_id, objective, backend) DO NOTHING",
                (workload_id, objective, backend, _dump(config), now, now),
            ).rowcount
            run_id, status = conn.execute(
                "SELECT id, status FROM runs WHERE workload_id = ? AND objective = ? AND backend = ?",
                (workload_id, objective, backend),
            ).fetchone()
            conn.execute("UPDATE runs SET config = ?, status = 'running', updated_at = ? WHERE id = ?",
                         (_dump(config), now, run_id))
        self._run_keys[run_id] = key
        self._previous[run_id] = None if inserted else status
        return run_id

    def previous_ending(self, run_id: int) -> str | None:
        """How the invocation before the one start_run began ended ("was interrupted", "ended without
        finishing (killed?)"...); None for a run start_run created."""
        status = self._previous.get(run_id)
        return None if status is None else _ENDINGS.get(status, f"left it {status}")

    def finish_run(self, run_id: int, status: str) -> None:
        with self._write() as conn:
            conn.execute("UPDATE runs SET status = ?, updated_at = ? WHERE id = ?",
                         (status, time.time(), run_id))
        lock = self._locks.pop(self._run_keys.pop(run_id, ""), None)
        if lock is not None:
            lock.release()

    def runs(self, workload_id: int | None = None) -> list[Run]:
        sql, args = "SELECT * FROM runs", ()
        if workload_id is not None:
            sql, args = sql + " WHERE workload_id = ?", (workload_id,)
        rows = self._read(sql + " ORDER BY id", args)
        return [Run(r["id"], r["workload_id"], r["objective"], r["backend"], _load(r["config"]),
                    r["status"], r["created_at"], r["updated_at"]) for r in rows]

    # -- measurements

    def add_measurement(
        self,
        *,
        workload_id: int,
        kind: str,
        backend: str,
        value: float | None,
        candidate_id: int | None = None,
        spread: float | None = None,
        device_name: str | None = None,
        driver: str | None = None,
        sm_clock_mhz: float | None = None,
        temperature_c: float | None = None,
        details: dict | None = None,
        ok: bool = True,
        error: str | None = None,
        started_at: float | None = None,
        finished_at: float | None = None,
        run_id: int | None = None,
    ) -> int:
        """Record one measurement; value is seconds (latency) or joules (energy) per call."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO measurements (candidate_id, workload_id, kind, backend, device_name,"
                " driver, sm_clock_mhz, temperature_c, value, spread, details, ok, error,"
                " started_at, finished_at, run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (candidate_id, workload_id, kind, backend, device_name, driver, sm_clock_mhz,
                 temperature_c, value, spread, _dump(details), int(ok), error, started_at,
                 finished_at, run_id),
            )
            return cur.lastrowid

    def measurements(self, workload_id: int | None = None, kind: str | None = None,
                     candidate_id: int | None = None, run_id: int | None = None) -> list[Measurement]:
        """Measurements in insertion order, optionally filtered (failed ones included, ok=False)."""
        where, args = [], []
        for column, wanted in (("workload_id", workload_id), ("kind", kind),
                               ("candidate_id", candidate_id), ("run_id", run_id)):
            if wanted is not None:
                where.append(f"{column} = ?")
                args.append(wanted)
        sql = "SELECT * FROM measurements"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._read(sql + " ORDER BY id", args)
        return [
            Measurement(
                r["id"], r["candidate_id"], r["workload_id"], r["kind"], r["backend"],
                r["device_name"], r["driver"], r["sm_clock_mhz"], r["temperature_c"], r["value"],
                r["spread"], _load(r["details"]), bool(r["ok"]), r["error"], r["started_at"],
                r["finished_at"], r["run_id"],
            )
            for r in rows
        ]

    def points(self, workload_id: int, backend: str | None = None, run_id: int | None = None) -> list[Point]:
        """One Point per candidate of the workload with an ok latency measurement (on ``backend``, in
        the run ``run_id``, where given), by candidate id: the median of its ok latencies and of its
        ok energies (``energy_measured`` False without any). Vendor references and failed
        measurements are left out. The one query behind the tuner, the report, export and analysis."""
        latency: dict[int, list[float]] = {}
        energy: dict[int, list[float]] = {}
        unconverged: set[int] = set()
        for m in self.measurements(workload_id, run_id=run_id):
            if not m.ok or m.candidate_id is None or m.value is None or backend not in (None, m.backend):
                continue
            (latency if m.kind == "latency" else energy).setdefault(m.candidate_id, []).append(m.value)
            if m.kind == "energy" and (m.details or {}).get("converged") is False:
                unconverged.add(m.candidate_id)
        points = []
        for cid in sorted(latency):
            e = statistics.median(energy[cid]) if cid in energy else None
            points.append(Point(cid, statistics.median(latency[cid]), e, e is not None, cid not in unconverged))
        return points

    def has_measurement(self, candidate_id: int, kind: str) -> bool:
        """True if the candidate has any `kind` measurement, failed ones included (not retried)."""
        return bool(self._read("SELECT 1 FROM measurements WHERE candidate_id = ? AND kind = ? LIMIT 1",
                               (candidate_id, kind)))
