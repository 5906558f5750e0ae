"""What a records database says about each tuned workload: the best point per tuned objective, the
energy/latency Pareto front, the vendor reference and the measurement counts, per backend.

Figures from different backends are never mixed: a workload tuned on ``sim`` and on ``nvml`` gives
two entries, each naming its backend and device.
"""
from __future__ import annotations

import statistics
from collections import defaultdict

from etune.measurements.backend import model_output
from etune.measurements.records import RecordsDB

from .objectives import Objective, Point, best, pareto_front


def _point_json(point: Point | None) -> dict | None:
    if point is None:
        return None
    return {"candidate_id": point.key, "latency_s": point.latency_s, "energy_j": point.energy_j,
            "energy_measured": point.energy_measured, "energy_converged": point.energy_converged}


def _vendor(db: RecordsDB, workload_id: int, backend: str) -> dict | None:
    values: dict[str, list[float]] = defaultdict(list)
    name = None
    for m in db.measurements(workload_id):
        if m.candidate_id is None and m.ok and m.backend == backend:
            values[m.kind].append(m.value)
            name = (m.details or {}).get("vendor", name)
    if not values:
        return None
    return {"kernel": name,
            "latency_s": statistics.median(values["latency"]) if values.get("latency") else None,
            "energy_j": statistics.median(values["energy"]) if values.get("energy") else None}


def report(db: RecordsDB, specs: list[str] | None = None, backend: str | None = None,
           objective: Objective | str | None = None) -> dict:
    """The ``etune report --format json`` document; with ``objective``, only the workloads (and
    backends) with a run tuned for it, and only that run's best."""
    label = None if objective is None else (objective if isinstance(objective, Objective)
                                            else Objective.parse(objective)).label
    entries = []
    for workload in db.workloads():
        if specs and workload.spec not in specs:
            continue
        measurements = db.measurements(workload.id)
        backends = sorted({m.backend for m in measurements if backend is None or m.backend == backend})
        runs = db.runs(workload.id)
        for name in backends:
            if label is not None and not any(r.objective == label and r.backend == name for r in runs):
                continue
            mine = [m for m in measurements if m.backend == name]
            points = db.points(workload.id, name)
            best_by_objective = {}
            for run in runs:
                if run.backend == name and label in (None, run.objective):
                    run_points = db.points(workload.id, name, run_id=run.id)
                    best_by_objective[run.objective] = _point_json(best(run_points, Objective.parse(run.objective)))
            devices = sorted({m.device_name for m in mine if m.device_name})
            entries.append({
                "workload": workload.spec,
                "backend": name,
                "device": devices[0] if len(devices) == 1 else devices,
                "simulated": model_output(name, devices),
                "best": best_by_objective,
                "pareto": [{"candidate_id": p.key, "latency_s": p.latency_s, "energy_j": p.energy_j,
                            "energy_converged": p.energy_converged} for p in pareto_front(points)],
                "vendor": _vendor(db, workload.id, name),
                "counts": {
                    "candidates": len(points),
                    "latency_measurements": sum(m.kind == "latency" and m.candidate_id is not None for m in mine),
                    "energy_measurements": sum(m.kind == "energy" and m.candidate_id is not None for m in mine),
                    "failed": sum(not m.ok for m in mine),
                },
                "runs": [{"objective": r.objective, "status": r.status, "config": r.config}
                         for r in runs if r.backend == name],
            })
    return {"workloads": entries}
