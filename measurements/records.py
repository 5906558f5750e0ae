"""The records database: workloads, candidate schedules and their measurements in one SQLite file.

Every write is its own transaction, so a tuning run killed at any moment keeps every measurement it
had committed (measurements are expensive: an energy measurement costs about a second of GPU time).
Vendor reference measurements are rows with `candidate_id` NULL and details like
{"vendor": "torch.matmul"}.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 2  # stored in PRAGMA user_version; bump it and add a migration when the schema changes
KINDS = ("latency", "energy")

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
class Workload:
    id: int
    spec: str
    family: str
    params: dict
    created_at: float


@dataclass(frozen=True)
class Candidate:
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
class Run:
    id: int
    workload_id: int
    objective: str
    backend: str
    config: dict
    status: str
    created_at: float
    updated_at: float


def _candidate(r: sqlite3.Row) -> Candidate:
    return Candidate(r["id"], r["workload_id"], r["structural_hash"], r["design_space"], r["trace"],
                     _load(r["features"]), r["created_at"])


def _dump(obj: Any) -> str | None:
    return None if obj is None else json.dumps(obj, sort_keys=True)


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class RecordsDB:
    """A records database file. Use `RecordsDB.open(path)`; one instance per thread."""

    def __init__(self, conn: sqlite3.Connection, path: str):
        self._conn = conn
        self.path = path

    @classmethod
    def open(cls, path: str | Path) -> "RecordsDB":
        # isolation_level=None: no implicit transactions; _write() opens each one explicitly.
        conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: COMMIT returns after the transaction is written to the WAL file with
        # write(2), i.e. it is in the OS page cache, so a SIGKILLed process loses nothing it
        # committed. Only an OS crash or power cut can drop the last commits (never corrupting the
        # file); FULL would guard against that too at the price of an fsync per commit.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        db = cls(conn, str(path))
        try:
            db._migrate()
        except BaseException:
            conn.close()
            raise
        return db

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "RecordsDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so a read-then-insert cannot race another writer.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            if self._conn.in_transaction:  # some errors make SQLite roll back by itself
                self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has schema version {version}; this etune knows up to "
                    f"{SCHEMA_VERSION}. Upgrade etune."
                )
            for v in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[v]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @property
    def schema_version(self) -> int:
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

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

    def workloads(self) -> list[Workload]:
        rows = self._conn.execute("SELECT * FROM workloads ORDER BY id").fetchall()
        return [Workload(r["id"], r["spec"], r["family"], _load(r["params"]), r["created_at"])
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

    def candidates(self, workload_id: int) -> list[Candidate]:
        rows = self._conn.execute(
            "SELECT * FROM candidates WHERE workload_id = ? ORDER BY id", (workload_id,)
        ).fetchall()
        return [_candidate(r) for r in rows]

    def candidate(self, candidate_id: int) -> Candidate | None:
        row = self._conn.execute("SELECT * FROM candidates WHERE id = ?", (candidate_id,)).fetchone()
        return None if row is None else _candidate(row)

    # -- tuning runs

    def start_run(self, workload_id: int, objective: str, backend: str, config: dict) -> int:
        """Id of the run tuning this workload for this objective on this backend; a second call
        (a resumed run) finds the same run, marks it running again and updates its config."""
        now = time.time()
        with self._write() as conn:
            conn.execute(
                "INSERT INTO runs (workload_id, objective, backend, config, status, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, 'running', ?, ?)"
                " ON CONFLICT (workload_id, objective, backend) DO UPDATE SET"
                " config = excluded.config, status = 'running', updated_at = excluded.updated_at",
                (workload_id, objective, backend, _dump(config), now, now),
            )
            return conn.execute(
                "SELECT id FROM runs WHERE workload_id = ? AND objective = ? AND backend = ?",
                (workload_id, objective, backend),
            ).fetchone()[0]

    def finish_run(self, run_id: int, status: str) -> None:
        with self._write() as conn:
            conn.execute("UPDATE runs SET status = ?, updated_at = ? WHERE id = ?",
                         (status, time.time(), run_id))

    def runs(self, workload_id: int | None = None) -> list[Run]:
        sql, args = "SELECT * FROM runs", ()
        if workload_id is not None:
            sql, args = sql + " WHERE workload_id = ?", (workload_id,)
        rows = self._conn.execute(sql + " ORDER BY id", args).fetchall()
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
        rows = self._conn.execute(sql + " ORDER BY id", args).fetchall()
        return [
            Measurement(
                r["id"], r["candidate_id"], r["workload_id"], r["kind"], r["backend"],
                r["device_name"], r["driver"], r["sm_clock_mhz"], r["temperature_c"], r["value"],
                r["spread"], _load(r["details"]), bool(r["ok"]), r["error"], r["started_at"],
                r["finished_at"], r["run_id"],
            )
            for r in rows
        ]

    def has_measurement(self, candidate_id: int, kind: str) -> bool:
        """True if the candidate has any `kind` measurement, failed ones included (not retried)."""
        row = self._conn.execute(
            "SELECT 1 FROM measurements WHERE candidate_id = ? AND kind = ? LIMIT 1",
            (candidate_id, kind),
        ).fetchone()
        return row is not None
