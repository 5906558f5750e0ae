"""Analysis helpers for notebooks: a records database as pandas frames, and the standard figures.

    df = records_frame("runs.db")          # one row per candidate measured in a run
    plot_pareto(df)                         # latency vs energy, Pareto front, each run's best, vendor
    plot_tuning_curves(df)                  # best-so-far latency / energy against the budgets spent
    plot_model_accuracy(df)                 # predicted vs measured (the models' online predictions)

Every ``plot_*`` function takes a records frame or a database path and returns a matplotlib
``Figure``; pass ``ax=`` (or ``axes=`` for the multi-panel ones) to draw into existing axes. Figures
are built with ``matplotlib.figure.Figure`` (no pyplot state, no GUI backend), so they work headless
and in Jupyter (``display(fig)`` or as a cell's last value).

Figures from different backends are never mixed, as in ``tuner.report``: a frame that holds a
workload tuned on ``sim`` and on ``nvml`` needs ``backend=`` to pick one. A ``sim`` figure is the
analytic model's output, not a hardware measurement; titles say "(sim)".

Import-light: pandas and numpy at import time; matplotlib, scipy and the records database only in
the functions that use them.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from .objectives import Objective, Point, best, pareto_front

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "RECORD_COLUMNS", "VENDOR_COLUMNS", "best_points", "candidates_frame", "model_accuracy",
    "pareto_frame", "plot_model_accuracy", "plot_pareto", "plot_tuning_curves", "records_frame",
    "tuning_curves", "vendor_frame",
]

# name -> dtype of the records frame, in column order
RECORD_COLUMNS: dict[str, str] = {
    "workload": "object",
    "backend": "object",
    "device": "object",
    "objective": "object",  # the run's objective label (latency, energy@0.05, ...); None outside a run
    "run_id": "Int64",
    "candidate_id": "Int64",
    "order": "Int64",  # trial number: position of the candidate's first latency measurement in the run
    "generation": "Int64",
    "latency_ok": "bool",  # any ok latency measurement
    "latency_s": "float64",  # median of the ok latency measurements (seconds per call)
    "energy_j": "float64",  # median of the ok energy measurements (joules per call), NaN if none
    "energy_measured": "bool",
    # False when an energy measurement hit its window cap unconverged (RecordsDB.points)
    "energy_converged": "bool",
    "energy_order": "Int64",  # position of its first energy measurement among the run's energy ones
    "final_check": "boolean",  # the energy measurement was the end-of-run check of a winner
    "predicted_latency_s": "float64",  # latency model's prediction made before measuring
    "predicted_energy_j": "float64",  # energy model's prediction made before measuring
    "predicted_energy_std_j": "float64",
    "avg_power_w": "float64",  # average power over the energy measurement (energy / latency)
    "latency_seq": "Int64",  # position in the run's stream of measurements (both kinds), for curves
    "energy_seq": "Int64",
}

VENDOR_COLUMNS: dict[str, str] = {
    "workload": "object",
    "backend": "object",
    "device": "object",
    "vendor": "object",
    "latency_s": "float64",
    "energy_j": "float64",
    "avg_power_w": "float64",
    "latency_measurements": "Int64",
    "energy_measurements": "Int64",
    "failed": "Int64",
}

CURVE_COLUMNS: dict[str, str] = {
    "workload": "object",
    "backend": "object",
    "objective": "object",
    "run_id": "Int64",
    "step": "Int64",  # position in the run's measurement stream
    "kind": "object",  # the measurement taken at this step: latency | energy
    "candidate_id": "Int64",
    "trials": "Int64",  # latency measurements so far (failed ones included, as the tuner counts)
    "energy_measurements": "Int64",  # energy measurements so far (failed ones included)
    "best_latency_s": "float64",  # fastest measured latency so far (non-increasing)
    "best_energy_j": "float64",  # least measured energy so far, unconstrained (non-increasing)
    # the best point under the run's objective so far (tuner.objectives.best): with a slowdown bound
    # its energy can rise when a faster candidate tightens the bound
    "objective_candidate_id": "Int64",
    "objective_latency_s": "float64",
    "objective_energy_j": "float64",
}

SIM_NOTE = "sim: analytic model outputs, not hardware measurements"


# -- frames -------------------------------------------------------------------------------------------

def _empty(columns: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in columns.items()})


def _typed(rows: list[dict], columns: dict[str, str]) -> pd.DataFrame:
    if not rows:
        return _empty(columns)
    df = pd.DataFrame(rows, columns=list(columns))
    for name, dtype in columns.items():
        if dtype == "object":
            df[name] = df[name].astype(object)
        else:
            df[name] = df[name].astype(dtype)
    return df


def _num(value: Any) -> float:
    """A float, NaN for None or anything not a number."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _open(db_path):
    from etune.measurements.records import RecordsDB

    path = Path(db_path)
    if not path.exists():
        raise FileNotFoundError(f"no records database at {path}")
    return RecordsDB.open(path, readonly=True)


def records_frame(db_path: str | Path) -> pd.DataFrame:
    """One row per (run, candidate, backend) measured, columns ``RECORD_COLUMNS``.

    Values are medians over the candidate's ok measurements in that run (a tuning run measures a
    candidate once per kind). Failed latency measurements give a row with ``latency_ok`` False and
    ``latency_s`` NaN; they count as trials, as in the tuner. Candidate measurements taken outside a
    run (``etune measure --candidate``) get ``run_id``/``objective`` missing. Vendor references are in
    ``vendor_frame``. ``df.attrs["db_path"]`` holds the path, so figures can find the vendor rows.
    """
    rows = []
    with _open(db_path) as db:
        for workload in db.workloads():
            objectives = {run.id: run.objective for run in db.runs(workload.id)}
            groups: dict[tuple, list] = defaultdict(list)
            streams: dict[tuple, list] = defaultdict(list)  # (run, backend) -> candidate measurements
            for m in db.measurements(workload.id):
                if m.candidate_id is None:
                    continue
                groups[(m.run_id, m.backend, m.candidate_id)].append(m)
                streams[(m.run_id, m.backend)].append(m)
            position: dict[int, tuple[int, int]] = {}  # measurement id -> (seq, order within its kind)
            for stream in streams.values():
                counts = {"latency": 0, "energy": 0}
                for seq, m in enumerate(stream, 1):
                    counts[m.kind] += 1
                    position[m.id] = (seq, counts[m.kind])
            for (run_id, backend, candidate_id), ms in groups.items():
                lat = [m for m in ms if m.kind == "latency"]
                ene = [m for m in ms if m.kind == "energy"]
                lat_ok = [m.value for m in lat if m.ok and m.value is not None]
                ene_ok = [m.value for m in ene if m.ok and m.value is not None]
                first_lat = lat[0] if lat else None
                first_ene = ene[0] if ene else None
                ld = (first_lat.details or {}) if first_lat else {}
                ed = (first_ene.details or {}) if first_ene else {}
                latency = statistics.median(lat_ok) if lat_ok else math.nan
                energy = statistics.median(ene_ok) if ene_ok else math.nan
                powers = [_num((m.details or {}).get("avg_power_w")) for m in ene if m.ok]
                powers = [p for p in powers if not math.isnan(p)]
                if powers:
                    power = statistics.median(powers)
                elif ene_ok and lat_ok and latency > 0:
                    power = energy / latency
                else:
                    power = math.nan
                generation = ld.get("generation", ed.get("generation"))
                devices = [m.device_name for m in ms if m.device_name]
                rows.append({
                    "workload": workload.spec,
                    "backend": backend,
                    "device": devices[0] if devices else None,
                    "objective": objectives.get(run_id),
                    "run_id": run_id,
                    "candidate_id": candidate_id,
                    "order": position[first_lat.id][1] if first_lat else None,
                    "generation": generation if isinstance(generation, int) else None,
                    "latency_ok": bool(lat_ok),
                    "latency_s": latency,
                    "energy_j": energy,
                    "energy_measured": bool(ene_ok),
                    "energy_converged": all((m.details or {}).get("converged") is not False for m in ene if m.ok),
                    "energy_order": position[first_ene.id][1] if first_ene else None,
                    "final_check": bool(ed["final_check"]) if first_ene and "final_check" in ed else None,
                    "predicted_latency_s": _num(ld.get("predicted_latency_s")),
                    "predicted_energy_j": _num(ed.get("predicted_energy_j")),
                    "predicted_energy_std_j": _num(ed.get("predicted_energy_std_j")),
                    "avg_power_w": power,
                    "latency_seq": position[first_lat.id][0] if first_lat else None,
                    "energy_seq": position[first_ene.id][0] if first_ene else None,
                })
    df = _typed(rows, RECORD_COLUMNS)
    if len(df):
        df = df.sort_values(["workload", "backend", "run_id", "order", "energy_order", "candidate_id"],
                            na_position="last", kind="stable").reset_index(drop=True)
    df.attrs["db_path"] = str(db_path)
    return df


def vendor_frame(db_path: str | Path) -> pd.DataFrame:
    """Vendor references (measurements with ``candidate_id`` NULL): one row per workload, backend,
    device and vendor kernel, with the median of the ok latency and energy measurements."""
    rows = []
    with _open(db_path) as db:
        for workload in db.workloads():
            groups: dict[tuple, list] = defaultdict(list)
            for m in db.measurements(workload.id):
                if m.candidate_id is None:
                    groups[(m.backend, m.device_name, (m.details or {}).get("vendor"))].append(m)
            for (backend, device, vendor), ms in groups.items():
                lat = [m.value for m in ms if m.kind == "latency" and m.ok and m.value is not None]
                ene = [m.value for m in ms if m.kind == "energy" and m.ok and m.value is not None]
                powers = [_num((m.details or {}).get("avg_power_w")) for m in ms if m.kind == "energy" and m.ok]
                powers = [p for p in powers if not math.isnan(p)]
                latency = statistics.median(lat) if lat else math.nan
                energy = statistics.median(ene) if ene else math.nan
                power = statistics.median(powers) if powers else (energy / latency if lat and ene else math.nan)
                rows.append({
                    "workload": workload.spec, "backend": backend, "device": device, "vendor": vendor,
                    "latency_s": latency, "energy_j": energy, "avg_power_w": power,
                    "latency_measurements": sum(m.kind == "latency" for m in ms),
                    "energy_measurements": sum(m.kind == "energy" for m in ms),
                    "failed": sum(not m.ok for m in ms),
                })
    return _typed(rows, VENDOR_COLUMNS)


def _frame(data) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, (str, Path)):
        return records_frame(data)
    raise TypeError(f"expected a records frame or a database path, not {type(data).__name__}")


def candidates_frame(df) -> pd.DataFrame:
    """One row per (workload, backend, candidate) over all runs: the median of its per-run latency
    and energy (each run measures a candidate once, so this is the median of its measurements, as in
    ``RecordsDB.points``). Candidates without an ok latency are left out."""
    df = _frame(df)
    df = df[df["latency_ok"].astype(bool)]
    columns = {"workload": "object", "backend": "object", "candidate_id": "Int64", "latency_s": "float64",
               "energy_j": "float64", "energy_measured": "bool", "energy_converged": "bool", "avg_power_w": "float64",
               "runs": "object"}
    rows = []
    for (workload, backend, cid), g in df.groupby(["workload", "backend", "candidate_id"], sort=True):
        energies = g.loc[g["energy_measured"].astype(bool), "energy_j"].dropna()
        powers = g.loc[g["energy_measured"].astype(bool), "avg_power_w"].dropna()
        rows.append({
            "workload": workload, "backend": backend, "candidate_id": int(cid),
            "latency_s": float(g["latency_s"].median()),
            "energy_j": float(energies.median()) if len(energies) else math.nan,
            "energy_measured": bool(len(energies)),
            "energy_converged": bool(g["energy_converged"].astype(bool).all()),
            "avg_power_w": float(powers.median()) if len(powers) else math.nan,
            "runs": ",".join(str(o) for o in g["objective"].dropna().unique()),
        })
    return _typed(rows, columns)


def _points(g: pd.DataFrame) -> list[Point]:
    points = []
    for r in g.itertuples(index=False):
        if r.latency_ok and not math.isnan(r.latency_s):
            e = None if math.isnan(r.energy_j) else float(r.energy_j)
            points.append(Point(int(r.candidate_id), float(r.latency_s), e, e is not None, bool(r.energy_converged)))
    return points


def pareto_frame(df) -> pd.DataFrame:
    """The energy/latency Pareto front of each (workload, backend), over the candidates of all its
    runs (``tuner.objectives.pareto_front``: energy-measured points no other beats in both), ordered
    by latency, with ``rank`` 1..n along the front."""
    cands = candidates_frame(df)
    rows = []
    for (workload, backend), g in cands.groupby(["workload", "backend"], sort=True):
        by_id = {int(r.candidate_id): r for r in g.itertuples(index=False)}
        for rank, p in enumerate(pareto_front(_points(g.assign(latency_ok=True))), 1):
            r = by_id[p.key]
            rows.append({"workload": workload, "backend": backend, "rank": rank, "candidate_id": p.key,
                         "latency_s": p.latency_s, "energy_j": p.energy_j, "avg_power_w": r.avg_power_w})
    return _typed(rows, {"workload": "object", "backend": "object", "rank": "Int64", "candidate_id": "Int64",
                         "latency_s": "float64", "energy_j": "float64", "avg_power_w": "float64"})


def best_points(df) -> pd.DataFrame:
    """Each run's best point under its objective (``tuner.objectives.best`` over the run's own
    measurements, as ``etune report`` does), with the run's trial and energy-measurement counts."""
    df = _frame(df)
    df = df[df["run_id"].notna() & df["objective"].notna()]
    rows = []
    for (workload, backend, run_id), g in df.groupby(["workload", "backend", "run_id"], sort=True):
        objective = g["objective"].iloc[0]
        point = best(_points(g), Objective.parse(objective))
        rows.append({
            "workload": workload, "backend": backend, "objective": objective, "run_id": int(run_id),
            "candidate_id": point.key if point else None,
            "latency_s": point.latency_s if point else math.nan,
            "energy_j": point.energy_j if point and point.energy_j is not None else math.nan,
            "energy_measured": bool(point and point.energy_measured),
            "trials": int(g["order"].notna().sum()),
            "energy_measurements": int(g["energy_order"].notna().sum()),
        })
    return _typed(rows, {"workload": "object", "backend": "object", "objective": "object", "run_id": "Int64",
                         "candidate_id": "Int64", "latency_s": "float64", "energy_j": "float64",
                         "energy_measured": "bool", "trials": "Int64", "energy_measurements": "Int64"})


def tuning_curves(df) -> pd.DataFrame:
    """Best-so-far curves of each run, one row per measurement (step) in the order they were taken.

    ``trials`` and ``energy_measurements`` count what the run had spent after that step;
    ``best_latency_s``/``best_energy_j`` are the fastest latency and the least energy measured so far
    (non-increasing); ``objective_*`` is the best point under the run's objective so far (an energy
    objective only counts measured energies; with a slowdown bound its energy can rise when a faster
    candidate tightens the bound). Columns ``CURVE_COLUMNS``.
    """
    df = _frame(df)
    df = df[df["run_id"].notna() & df["objective"].notna()]
    rows = []
    for (workload, backend, run_id), g in df.groupby(["workload", "backend", "run_id"], sort=True):
        objective_label = g["objective"].iloc[0]
        objective = Objective.parse(objective_label)
        events = []
        for r in g.itertuples(index=False):
            if not pd.isna(r.latency_seq):
                events.append((int(r.latency_seq), "latency", r))
            if not pd.isna(r.energy_seq):
                events.append((int(r.energy_seq), "energy", r))
        events.sort(key=lambda e: e[0])
        latency: dict[int, float] = {}
        energy: dict[int, float] = {}
        trials = energies = 0
        best_latency = best_energy = math.nan
        for step, (_, kind, r) in enumerate(events, 1):
            cid = int(r.candidate_id)
            if kind == "latency":
                trials += 1
                if r.latency_ok and not math.isnan(r.latency_s):
                    latency[cid] = float(r.latency_s)
                    best_latency = min(best_latency, latency[cid]) if not math.isnan(best_latency) else latency[cid]
            else:
                energies += 1
                if r.energy_measured and not math.isnan(r.energy_j):
                    energy[cid] = float(r.energy_j)
                    best_energy = min(best_energy, energy[cid]) if not math.isnan(best_energy) else energy[cid]
            points = [Point(c, lat, energy.get(c), c in energy) for c, lat in latency.items()]
            point = best(points, objective)
            rows.append({
                "workload": workload, "backend": backend, "objective": objective_label, "run_id": int(run_id),
                "step": step, "kind": kind, "candidate_id": cid, "trials": trials, "energy_measurements": energies,
                "best_latency_s": best_latency, "best_energy_j": best_energy,
                "objective_candidate_id": point.key if point else None,
                "objective_latency_s": point.latency_s if point else math.nan,
                "objective_energy_j": point.energy_j if point and point.energy_j is not None else math.nan,
            })
    return _typed(rows, CURVE_COLUMNS)


def _mape(pred, true) -> float:
    try:
        from etune.energy_model.metrics import mape
    except ImportError:  # pragma: no cover - energy_model is part of etune
        pred, true = np.asarray(pred, float), np.asarray(true, float)
        return float(np.mean(np.abs(pred - true) / np.abs(true))) if pred.size else math.nan
    return mape(pred, true)


def _spearman(pred, true) -> float:
    try:
        from etune.energy_model.metrics import spearman
    except ImportError:  # pragma: no cover
        pred, true = pd.Series(pred, dtype=float), pd.Series(true, dtype=float)
        return float(pred.corr(true, method="spearman")) if len(pred) > 1 else math.nan
    return spearman(pred, true)


_TARGETS = {"energy": ("predicted_energy_j", "energy_j", "energy_measured"),
            "latency": ("predicted_latency_s", "latency_s", "latency_ok")}


def _pairs(df: pd.DataFrame, target: str) -> pd.DataFrame:
    predicted, measured, ok = _TARGETS[target]
    mask = df[ok].astype(bool) & df[predicted].notna() & df[measured].notna()
    return df[mask]


def model_accuracy(df, by_run: bool = False) -> pd.DataFrame:
    """How well the tuner's models predicted what was then measured: per (workload, backend[, run])
    and target (energy, latency), ``n`` pairs, ``mape`` (a fraction) and ``spearman``.

    The predictions are the ones the tuner recorded just before each measurement (models trained on
    earlier measurements only), so these are out-of-sample figures. Candidates measured without a
    prediction (before the model had enough data, and end-of-run checks) are left out."""
    df = _frame(df)
    keys = ["workload", "backend"] + (["objective", "run_id"] if by_run else [])
    rows = []
    if len(df):
        for key, g in df.groupby(keys, sort=True, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            for target, (predicted, measured, _) in _TARGETS.items():
                pairs = _pairs(g, target)
                pred, true = pairs[predicted].to_numpy(float), pairs[measured].to_numpy(float)
                rows.append({**dict(zip(keys, key)), "target": target, "n": len(pairs),
                             "mape": _mape(pred, true) if len(pairs) else math.nan,
                             "spearman": _spearman(pred, true) if len(pairs) else math.nan})
    columns = {k: ("Int64" if k == "run_id" else "object") for k in keys}
    columns.update({"target": "object", "n": "Int64", "mape": "float64", "spearman": "float64"})
    return _typed(rows, columns)


# -- figures ------------------------------------------------------------------------------------------

_LATENCY_UNITS = ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns"))
_ENERGY_UNITS = ((1.0, "J"), (1e-3, "mJ"), (1e-6, "µJ"), (1e-9, "nJ"))


def _unit(values, units) -> tuple[float, str]:
    """The largest unit in which the typical value is at least 1."""
    arr = np.asarray([v for v in np.ravel(np.asarray(values, dtype=float)) if np.isfinite(v) and v > 0])
    if arr.size == 0:
        return units[0]
    typical = float(np.median(arr))
    for scale, name in units:
        if typical >= scale:
            return scale, name
    return units[-1]


def _select(df: pd.DataFrame, workload: str | None, backend: str | None) -> tuple[pd.DataFrame, str, str]:
    """The rows of one workload on one backend; a choice is needed only when the frame has several."""
    if workload is not None:
        df = df[df["workload"] == workload]
    workloads = list(dict.fromkeys(df["workload"]))
    if not workloads:
        raise ValueError(f"no records{'' if workload is None else f' for workload {workload!r}'}")
    if len(workloads) > 1:
        raise ValueError(f"the frame holds several workloads ({', '.join(workloads)}): pass workload=")
    if backend is not None:
        df = df[df["backend"] == backend]
    backends = list(dict.fromkeys(df["backend"]))
    if not backends:
        raise ValueError(f"no records of {workloads[0]} on backend {backend!r}")
    if len(backends) > 1:
        raise ValueError(f"{workloads[0]} was measured on several backends ({', '.join(backends)}); "
                         "figures never mix them: pass backend=")
    return df, workloads[0], backends[0]


def _backend_tag(df: pd.DataFrame, backend: str) -> str:
    if backend == "sim":
        return "(sim)"
    devices = [d for d in dict.fromkeys(df["device"]) if isinstance(d, str)] if "device" in df else []
    return f"({backend}, {devices[0]})" if len(devices) == 1 else f"({backend})"


def _new_figure(nrows: int = 1, ncols: int = 1, size=(6.4, 4.8)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _run_colors(objectives: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {o: cmap(i % 10) for i, o in enumerate(objectives)}


def _spread(values) -> float:
    arr = np.asarray([v for v in np.ravel(np.asarray(values, dtype=float)) if np.isfinite(v) and v > 0])
    return float(arr.max() / arr.min()) if arr.size else 1.0


def plot_pareto(df, workload: str | None = None, backend: str | None = None, vendor: pd.DataFrame | None = None,
                log: bool | None = None, ax: "Axes | None" = None) -> "Figure":
    """Latency vs energy per call of every energy-measured candidate of one workload (all runs), the
    Pareto front as a step line, each run's best (under its objective) marked, the vendor reference
    if the database has one. Candidates with a latency but no energy measurement are ticks along the
    latency axis. ``vendor``: a ``vendor_frame``; by default read from ``df.attrs["db_path"]``.
    ``log``: log-log axes (default: when latencies or energies span more than a factor of 10)."""
    if vendor is None and isinstance(df, (str, Path)):
        vendor = vendor_frame(df)
    df = _frame(df)
    if vendor is None and df.attrs.get("db_path") and Path(df.attrs["db_path"]).exists():
        vendor = vendor_frame(df.attrs["db_path"])
    rows, workload, backend = _select(df, workload, backend)
    cands = candidates_frame(rows)
    front = pareto_frame(rows)
    bests = best_points(rows)
    if vendor is not None and len(vendor):
        vendor = vendor[(vendor["workload"] == workload) & (vendor["backend"] == backend)]
        vendor = vendor[vendor["latency_s"].notna() & vendor["energy_j"].notna()]
    else:
        vendor = None

    if ax is None:
        fig, axes = _new_figure(size=(9.0, 5.0))
        ax = axes[0, 0]
    fig = ax.figure
    measured = cands[cands["energy_measured"]]
    lat_values = list(cands["latency_s"]) + ([] if vendor is None else list(vendor["latency_s"]))
    ene_values = list(measured["energy_j"]) + ([] if vendor is None else list(vendor["energy_j"]))
    ls, lu = _unit(lat_values, _LATENCY_UNITS)
    es, eu = _unit(ene_values, _ENERGY_UNITS)

    unmeasured = cands[~cands["energy_measured"]]
    if len(unmeasured):
        ax.plot(unmeasured["latency_s"] / ls, np.full(len(unmeasured), 0.02), "|", color="0.6", markersize=10,
                transform=ax.get_xaxis_transform(), label=f"latency only ({len(unmeasured)})")
    ax.scatter(measured["latency_s"] / ls, measured["energy_j"] / es, s=28, color="tab:blue", alpha=0.75,
               label=f"energy measured ({len(measured)})", zorder=3)
    if len(front):
        # the last point's energy holds for every slower latency: run the step to the slowest point
        right = max(measured["latency_s"].max(), front["latency_s"].iloc[-1],
                    vendor["latency_s"].max() if vendor is not None and len(vendor) else -math.inf)
        ax.step(list(front["latency_s"] / ls) + [right / ls], list(front["energy_j"] / es) + [front["energy_j"].iloc[-1] / es],
                where="post", color="tab:red", lw=1.6, label=f"Pareto front ({len(front)})", zorder=2)
    markers = ["D", "s", "^", "v", "P", "X"]
    colors = _run_colors(list(bests["objective"]))
    for i, r in enumerate(bests.itertuples(index=False)):
        if pd.isna(r.candidate_id):
            continue
        energy = r.energy_j
        if math.isnan(energy):  # a latency winner never energy-measured: show it on the axis
            ax.plot(r.latency_s / ls, 0.02, markers[i % len(markers)], color=colors[r.objective], ms=10,
                    transform=ax.get_xaxis_transform(), label=f"best for {r.objective} (no energy)")
            continue
        ax.scatter([r.latency_s / ls], [energy / es], marker=markers[i % len(markers)], s=110 - 25 * (i % 3),
                   facecolors="none", edgecolors=[colors[r.objective]], linewidths=2, zorder=4,
                   label=f"best for {r.objective} (#{int(r.candidate_id)})")
    if vendor is not None:
        for r in vendor.itertuples(index=False):
            ax.scatter([r.latency_s / ls], [r.energy_j / es], marker="*", s=220, color="goldenrod",
                       edgecolors="k", linewidths=0.6, zorder=5, label=f"vendor {r.vendor or ''}".strip())
    if log is None:  # log axes when the points span more than a decade (a vendor kernel far off, ...)
        log = _spread(lat_values) > 10 or _spread(ene_values) > 10
    finite = [v / es for v in ene_values if np.isfinite(v) and v > 0]
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    if finite:  # room below the lowest point for the latency-only ticks
        lo, hi = min(finite), max(finite)
        if log:
            ratio = hi / lo if hi > lo else 1.2
            ax.set_ylim(lo / ratio ** 0.18, hi * ratio ** 0.12)
        else:
            span = hi - lo if hi > lo else 0.05 * abs(hi) or 1.0
            ax.set_ylim(lo - 0.18 * span, hi + 0.12 * span)
    ax.set_xlabel(f"latency per call ({lu})")
    ax.set_ylabel(f"energy per call ({eu})")
    ax.set_title(f"{workload}: latency vs energy {_backend_tag(rows, backend)}")
    if backend == "sim":
        ax.text(0.99, 0.99, SIM_NOTE, transform=ax.transAxes, ha="right", va="top", fontsize=7, color="0.4")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return fig


def _axes_grid(axes, rows: int, cols: int, size: tuple[float, float], caller: str) -> list:
    """The caller's rows x cols Axes as a flat list, or those of a new figure of ``size``."""
    if axes is None:
        _, grid = _new_figure(rows, cols, size=size)
        axes = grid
    axes = list(np.ravel(np.asarray(axes, dtype=object)))
    if len(axes) != rows * cols:
        raise ValueError(f"{caller} needs {rows * cols} axes, got {len(axes)}")
    return axes


def plot_tuning_curves(df, workload: str | None = None, backend: str | None = None,
                       axes: "Sequence[Axes] | np.ndarray | None" = None) -> "Figure":
    """Four panels: the fastest latency so far (top) and the energy of the best point under each run's
    objective so far (bottom), against trials (latency measurements, left) and against energy
    measurements used (right); one line per run. ``axes``: four Axes in that order (row by row)."""
    df = _frame(df)
    rows, workload, backend = _select(df, workload, backend)
    curves = tuning_curves(rows)
    axes = _axes_grid(axes, 2, 2, (10.0, 7.0), "plot_tuning_curves")
    fig = axes[0].figure
    ls, lu = _unit(curves["best_latency_s"], _LATENCY_UNITS)
    es, eu = _unit(curves["objective_energy_j"], _ENERGY_UNITS)
    colors = _run_colors(list(dict.fromkeys(curves["objective"])))
    panels = [("trials", "best_latency_s", ls), ("energy_measurements", "best_latency_s", ls),
              ("trials", "objective_energy_j", es), ("energy_measurements", "objective_energy_j", es)]
    from matplotlib.ticker import MaxNLocator

    styles = ["-", "--", ":", "-."]
    for ax, (x, y, scale) in zip(axes, panels):
        for i, ((objective, run_id), g) in enumerate(curves.groupby(["objective", "run_id"], sort=False)):
            # the value after the last step at each x: the state once that budget was spent
            last = g.groupby(x, sort=True).tail(1)
            ax.step(last[x].astype(float), last[y] / scale, where="post", marker="o", ms=3,
                    linestyle=styles[i % len(styles)], lw=1.8 if i == 0 else 1.3,
                    color=colors[objective], label=f"{objective} (run {int(run_id)})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("trials (latency measurements)" if x == "trials" else "energy measurements used")
        ax.set_ylabel(f"fastest latency so far ({lu})" if y == "best_latency_s"
                      else f"energy of best under objective ({eu})")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{workload}: best so far {_backend_tag(rows, backend)}"
                 + (f"\n{SIM_NOTE}" if backend == "sim" else ""), fontsize=11)
    return fig


def plot_model_accuracy(df, workload: str | None = None, backend: str | None = None,
                        axes: "Sequence[Axes] | np.ndarray | None" = None) -> "Figure":
    """Predicted vs measured energy (left) and latency (right) of the candidates the tuner measured
    after predicting them, one colour per run, with the y = x line; MAPE and Spearman (pooled over
    the runs) in each title. ``axes``: two Axes."""
    df = _frame(df)
    rows, workload, backend = _select(df, workload, backend)
    axes = _axes_grid(axes, 1, 2, (10.0, 4.6), "plot_model_accuracy")
    fig = axes[0].figure
    colors = _run_colors(list(dict.fromkeys(rows["objective"].dropna())))
    for ax, target in zip(axes, ("energy", "latency")):
        predicted, measured, _ = _TARGETS[target]
        pairs = _pairs(rows, target)
        units = _ENERGY_UNITS if target == "energy" else _LATENCY_UNITS
        scale, unit = _unit(pd.concat([pairs[predicted], pairs[measured]]), units)
        for objective, g in pairs.groupby(pairs["objective"].fillna("no run"), sort=False):
            ax.scatter(g[measured] / scale, g[predicted] / scale, s=24, alpha=0.8,
                       color=colors.get(objective, "0.4"), label=f"{objective} ({len(g)})")
        if len(pairs):
            lo = float(min(pairs[predicted].min(), pairs[measured].min())) / scale
            hi = float(max(pairs[predicted].max(), pairs[measured].max())) / scale
            pad = 0.05 * (hi - lo) if hi > lo else 0.05 * abs(hi) or 1.0
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "--", color="0.3", lw=1, label="y = x")
            pred, true = pairs[predicted].to_numpy(float), pairs[measured].to_numpy(float)
            ax.set_title(f"{target} model: MAPE {100 * _mape(pred, true):.1f} %, "
                         f"Spearman {_spearman(pred, true):.2f} (n={len(pairs)})", fontsize=10)
            ax.legend(fontsize=8)
        else:
            ax.set_title(f"{target} model: no predictions recorded", fontsize=10)
            ax.text(0.5, 0.5, "no candidate was measured after a prediction\n"
                    "(the model trains once it has a few measurements)",
                    transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.4")
        name = "energy per call" if target == "energy" else "latency per call"
        ax.set_xlabel(f"measured {name} ({unit})")
        ax.set_ylabel(f"predicted {name} ({unit})")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{workload}: cost model predictions vs measurements {_backend_tag(rows, backend)}"
                 + (f"\n{SIM_NOTE}" if backend == "sim" else ""), fontsize=11)
    return fig
