"""Recorded measurement datasets: what one device session measured, kept as JSON lines.

A GPU is lent rarely and briefly, so everything it measures is written down in a form that CI and
later sessions can use without one: the ``replay`` backend serves it to the tuner and the energy
model, and ``benchmarks/sim_calibration.py`` fits sim's constants to it. A sim dry run writes the
same format, labelled ``backend: sim`` in its header.

One file per device session (``data/hw/<date>-<gpu>.jsonl``, gzipped once it is off the device).
Every line is one JSON object with a ``type``:

- ``header`` (first line): format, version, backend (``nvml`` or ``sim``), gpu, driver, tvm, torch,
  etune versions, date, host and command;
- ``candidate``: one schedule of the pool: spec, family, design_space, trace (JSON text),
  structural_hash, features (energy_model.features), build (per-kernel registers, spills, shared
  memory; build seconds), selected_by (``random`` or ``sim-best``);
- ``measurement``: one measurement of a candidate (structural_hash set) or of the vendor kernel
  (``vendor`` set, structural_hash null): spec, kind (``latency`` or ``energy``), ok, value (s or J
  per call), spread (coefficient of variation), error, sm_clock_mhz, temperature_c and the backend's
  details (latency: median_s, min_s, repeats; energy: latency_s, avg_power_w, idle_power_w,
  energy_above_idle_j, windows, converged, method);
- ``facts``, ``check``, ``acceptance``, ``phase``: what the device check found, phase by phase.

Lines are appended and flushed one at a time, so a session killed at its time limit keeps every line
it finished; a reader skips a torn last line and says so (``Dataset.truncated``).
"""
from __future__ import annotations

import dataclasses
import datetime
import gzip
import io
import json
import platform
import sys
from pathlib import Path
from typing import Iterator

from .backend import KINDS

FORMAT = "etune-dataset"
VERSION = 1


class DatasetError(ValueError):
    """A dataset file that cannot be used: missing, not etune's format, or of a newer version."""


def _open_text(path: Path, mode: str):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, mode + "b"), encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def versions() -> dict:
    """Versions of what measured (missing packages are None, never an error)."""
    from importlib import metadata

    found = {"python": platform.python_version()}
    for name, dist in (("tvm", "apache-tvm"), ("tvm_ffi", "apache-tvm-ffi"), ("torch", "torch"),
                       ("etune", "etune"), ("nvidia_ml_py", "nvidia-ml-py")):
        try:
            found[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[name] = None
    if found["tvm"] is None:  # a runtime-only TVM unpacked on PYTHONPATH has no distribution metadata
        try:
            import tvm

            found["tvm"] = getattr(tvm, "__version__", None)
        except ImportError:
            pass
    return found


def make_header(backend: str, gpu: str, driver: str | None, command: str | None = None, **extra) -> dict:
    return {"type": "header", "format": FORMAT, "version": VERSION, "backend": backend, "gpu": gpu,
            "driver": driver, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "command": command or " ".join(sys.argv), "versions": versions(), **extra}


class DatasetWriter:
    """Appends rows to a dataset file, one flushed line each. Plain JSON lines: a gzip stream cut off
    by a killed process is unreadable to its end, a text file only loses its last line."""

    def __init__(self, path: str | Path, header: dict):
        self.path = Path(path)
        if self.path.suffix == ".gz":
            raise DatasetError("a dataset is written as plain .jsonl; gzip it once it is complete")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")
        self.write(header)

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(finite(row), default=_json_default, allow_nan=False) + "\n")
        self._file.flush()

    def candidate(self, candidate, *, features: dict | None, build=None, selected_by: str, **extra) -> None:
        """A search_space.Candidate of the pool, with its features and build resources."""
        self.write({
            "type": "candidate", "spec": candidate.workload.spec, "family": candidate.workload.family,
            "design_space": candidate.design_space, "trace": candidate.trace_json(),
            "structural_hash": candidate.structural_hash, "features": features,
            "build": build_summary(build), "selected_by": selected_by, **extra,
        })

    def measurement(self, spec: str, result, *, vendor: str | None = None, **extra) -> None:
        """One measurements.backend.MeasureResult."""
        self.write(measurement_row(spec, result, vendor=vendor, **extra))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _json_default(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


def finite(value):
    """JSON has no NaN or infinity; a non-finite figure is recorded as missing."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def build_summary(build) -> dict | None:
    if build is None:
        return None
    return {"status": build.status, "seconds": build.seconds, "error": build.error,
            "kernels": [dataclasses.asdict(k) for k in build.kernels]}


def measurement_row(spec: str, result, *, vendor: str | None = None, **extra) -> dict:
    return {
        "type": "measurement", "spec": spec, "structural_hash": result.structural_hash, "vendor": vendor,
        "kind": result.kind, "ok": result.ok, "value": result.value if result.ok else None,
        "spread": result.spread, "error": result.error, "sm_clock_mhz": result.sm_clock_mhz,
        "temperature_c": result.temperature_c, "details": result.details or {}, **extra,
    }


@dataclasses.dataclass
class Record:
    """A candidate (or a vendor kernel) of a dataset with its latest measurement of each kind."""

    spec: str
    structural_hash: str | None
    candidate: dict | None = None  # the ``candidate`` row; None for a vendor kernel
    vendor: str | None = None
    latency: dict | None = None  # ``measurement`` rows
    energy: dict | None = None

    def measured(self, kind: str) -> dict | None:
        row = getattr(self, kind)
        return row if row is not None and row.get("ok") and row.get("value") is not None else None


@dataclasses.dataclass
class Dataset:
    path: Path
    header: dict
    rows: list[dict]
    truncated: bool = False

    @property
    def backend(self) -> str:
        return self.header.get("backend", "?")

    @property
    def gpu(self) -> str:
        return self.header.get("gpu", "?")

    def of_type(self, kind: str) -> Iterator[dict]:
        return (r for r in self.rows if r.get("type") == kind)

    def records(self) -> dict[tuple[str, str], Record]:
        """Candidates by (spec, structural hash) and vendor kernels by (spec, "vendor"), each with its
        last measurement of each kind (a later one replaces an earlier one)."""
        records: dict[tuple[str, str], Record] = {}
        for row in self.of_type("candidate"):
            key = (row["spec"], row["structural_hash"])
            records[key] = Record(row["spec"], row["structural_hash"], candidate=row)
        for row in self.of_type("measurement"):
            if row.get("kind") not in KINDS:
                continue
            if row.get("structural_hash"):
                key = (row["spec"], row["structural_hash"])
                record = records.setdefault(key, Record(row["spec"], row["structural_hash"]))
            else:
                key = (row["spec"], "vendor")
                record = records.setdefault(key, Record(row["spec"], None, vendor=row.get("vendor")))
            setattr(record, row["kind"], row)
        return records

    def specs(self) -> list[str]:
        return list(dict.fromkeys(r["spec"] for r in self.of_type("candidate")))

    def pool(self, spec: str) -> list[dict]:
        """The candidate rows of one workload, in recorded order."""
        return [r for r in self.of_type("candidate") if r["spec"] == spec]


def load_dataset(path: str | Path) -> Dataset:
    """Read a dataset (.jsonl or .jsonl.gz); a torn last line (a killed session) is dropped."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"no dataset at {path}")
    rows: list[dict] = []
    truncated = False
    try:
        with _open_text(path, "r") as f:
            lines = f.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as exc:  # a gzip cut short, or not text at all
        raise DatasetError(f"{path} is not a readable dataset ({exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                truncated = True
                continue
            raise DatasetError(f"{path}:{number} is not a JSON line") from None
    if not rows or rows[0].get("type") != "header" or rows[0].get("format") != FORMAT:
        raise DatasetError(f"{path} is not an etune dataset (its first line is not an {FORMAT} header)")
    if rows[0].get("version", 0) > VERSION:
        raise DatasetError(f"{path} is dataset version {rows[0]['version']}; this etune reads up to {VERSION}")
    return Dataset(path, rows[0], rows[1:], truncated)


def compress(path: str | Path) -> Path:
    """``x.jsonl`` -> ``x.jsonl.gz`` (the plain file is removed)."""
    path = Path(path)
    target = path.with_name(path.name + ".gz")
    with open(path, "rb") as src, gzip.open(target, "wb", compresslevel=9) as dst:
        dst.write(src.read())
    path.unlink()
    return target


def frame(dataset: Dataset, include_vendor: bool = True):
    """One row per record (pandas): spec, family, hash or vendor, latency and energy figures, power,
    clock and temperature, and the candidate's features flattened as ``f_<name>``."""
    import pandas as pd

    rows = []
    for record in dataset.records().values():
        if record.candidate is None and not include_vendor:
            continue
        latency, energy = record.measured("latency"), record.measured("energy")
        row = {"spec": record.spec, "family": record.spec.split(":")[0], "structural_hash": record.structural_hash,
               "vendor": record.vendor, "selected_by": (record.candidate or {}).get("selected_by"),
               "latency_s": latency["value"] if latency else None,
               "latency_spread": latency["spread"] if latency else None,
               "energy_j": energy["value"] if energy else None,
               "energy_spread": energy["spread"] if energy else None,
               "energy_latency_s": (energy or {}).get("details", {}).get("latency_s"),
               "avg_power_w": (energy or {}).get("details", {}).get("avg_power_w"),
               "idle_power_w": (energy or {}).get("details", {}).get("idle_power_w"),
               "converged": (energy or {}).get("details", {}).get("converged"),
               "sm_clock_mhz": (energy or latency or {}).get("sm_clock_mhz"),
               "temperature_c": (energy or latency or {}).get("temperature_c")}
        for name, value in ((record.candidate or {}).get("features") or {}).items():
            row[f"f_{name}"] = value
        rows.append(row)
    return pd.DataFrame(rows)
