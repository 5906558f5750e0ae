"""The benchmark suite: latency-only vs energy-aware tuning vs the vendor library, per workload.

For each workload: tune with ``latency`` (the MetaSchedule-style baseline) and with ``energy@S`` at the
same trial budget, measure the vendor kernel (cuBLAS via torch.matmul, torch.softmax, SDPA; on sim a
roofline stand-in) by the same protocol, and write ``docs/benchmarks.md``-style Markdown and raw JSON.

Resumable: everything lives in ``--db``; ``--time-budget`` stops an invocation cleanly (the H100 is lent
in calls of at most ten minutes) and the same command continues where it stopped. Tuning wall time is
accumulated over invocations in ``<db>.suite.json``.

    python benchmarks/suite.py --backend nvml --trials 64 --db suite.db --time-budget 540 --out docs
    python benchmarks/suite.py --backend sim --no-build --trials 8 --workloads softmax-32768x128   # CI
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from etune.kernels import SUITE_SPECS, as_workload  # noqa: E402
from etune.measurements import make_backend  # noqa: E402
from etune.measurements.backend import record_result  # noqa: E402
from etune.measurements.records import RecordsDB  # noqa: E402
from etune.search_space import gpu_spec  # noqa: E402
from etune.tuner.objectives import Objective, best  # noqa: E402
from etune.tuner.search import TuneSettings, Tuner  # noqa: E402


def _vendor(db: RecordsDB, backend, workload, workload_id: int) -> dict:
    """The vendor reference, measured once per backend and kept in the database."""
    found = {m.kind: m for m in db.measurements(workload_id) if m.candidate_id is None and m.ok
             and m.backend == backend.name}
    device = backend.device()
    for kind in ("latency", "energy"):
        if kind not in found:
            result = backend.measure_vendor(workload, kind)
            record_result(db, result, workload_id=workload_id, backend=backend.name, device=device)
            if result.ok:
                found[kind] = db.measurements(workload_id, kind=kind)[-1]
    any_row = found.get("latency") or found.get("energy")
    return {"latency": found["latency"].value if "latency" in found else None,
            "energy": found["energy"].value if "energy" in found else None,
            "kernel": (any_row.details or {}).get("vendor") if any_row else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(SUITE_SPECS), help="suite names (kernels.SUITE_SPECS)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--max-slowdown", type=float, default=0.05)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds for this invocation")
    parser.add_argument("--db", type=Path, default=Path("suite.db"))
    parser.add_argument("--target", default="h100")
    parser.add_argument("--build", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/suite"))
    args = parser.parse_args()
    unknown = [w for w in args.workloads if w not in SUITE_SPECS]
    if unknown:
        parser.error(f"unknown suite workloads {unknown}; choose from {list(SUITE_SPECS)}")
    deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
    backend = make_backend(args.backend, gpu=args.target)
    gpu = gpu_spec(args.target)
    state_path = Path(f"{args.db}.suite.json")
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    objectives = [Objective("latency"), Objective("energy", args.max_slowdown)]
    rows = []
    stopped = False
    with RecordsDB.open(args.db) as db:
        for name in args.workloads:
            workload = as_workload(SUITE_SPECS[name])
            row = {"workload": name, "spec": workload.spec, "backend": backend.name,
                   "device": backend.device().name}
            for objective in objectives:
                key = f"{workload.spec}|{objective.label}|{backend.name}"
                left = None if deadline is None else deadline - time.monotonic()
                if not stopped and (left is None or left > 0):
                    settings = TuneSettings(trials=args.trials, time_budget_s=left, seed=args.seed, build=args.build,
                                            target=args.target)
                    started = time.perf_counter()
                    status = Tuner(workload.spec, objective, backend, db, settings).run()
                    state[key] = state.get(key, 0.0) + time.perf_counter() - started
                    state_path.write_text(json.dumps(state, indent=1))
                    stopped = status.stopped_by in ("time", "interrupted")
                else:
                    stopped = True
                run = next((r for r in db.runs() if r.objective == objective.label and r.backend == backend.name
                            and r.workload_id == db.add_workload(workload.spec, workload.family, workload.params)), None)
                winner = None
                if run is not None:
                    points = db.points(run.workload_id, backend.name, run_id=run.id)
                    winner = best(points, objective)
                    energy_count = len(db.measurements(run.workload_id, run_id=run.id, kind="energy"))
                row[objective.label] = None if winner is None else {
                    "latency_s": winner.latency_s, "energy_j": winner.energy_j, "trials": len(points),
                    "energy_measurements": energy_count, "tuning_wall_s": state.get(key),
                    "roofline_fraction": gpu.roofline_seconds(workload.flops, workload.min_bytes) / winner.latency_s,
                    "complete": len(points) >= args.trials,
                }
            if not stopped:
                row["vendor"] = _vendor(db, backend, workload, db.add_workload(workload.spec, workload.family,
                                                                              workload.params))
            rows.append(row)
    backend.close()
    _write(args, rows, objectives[1].label)
    if stopped:
        print("stopped by the time budget: run the same command again to continue", file=sys.stderr)


def _write(args, rows, energy_label: str) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    document = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "trials": args.trials,
                "objective": energy_label, "rows": rows}
    (args.out / "benchmarks.json").write_text(json.dumps(document, indent=2))
    simulated = any(r["backend"] == "sim" for r in rows)

    def fmt(point):
        if not point or point.get("energy_j") is None:
            return "-"
        return f"{point['latency_s'] * 1e6:.1f} us / {point['energy_j'] * 1e3:.2f} mJ"

    lines = ["# etune benchmark suite" + (" (backend sim: model outputs, not hardware)" if simulated else ""), "",
             f"`{document['command']}`, {document['date']}, {args.trials} trials per objective.", "",
             f"| workload | backend | latency-only best | energy-aware best ({energy_label}) | vendor | energy saved vs "
             "latency-only | latency change | energy vs vendor | energy meas. | roofline fraction |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat, en, vendor = r.get("latency"), r.get(energy_label), r.get("vendor")
        saved = change = versus = "-"
        if lat and en and lat.get("energy_j") and en.get("energy_j"):
            saved = f"{100 * (1 - en['energy_j'] / lat['energy_j']):.1f} %"
            change = f"{100 * (en['latency_s'] / lat['latency_s'] - 1):+.1f} %"
        if en and vendor and vendor.get("energy") and en.get("energy_j"):
            versus = f"{en['energy_j'] / vendor['energy']:.2f}x"
        vendor_text = "-" if not vendor or vendor.get("energy") is None else \
            f"{vendor['latency'] * 1e6:.1f} us / {vendor['energy'] * 1e3:.2f} mJ"
        lines.append(f"| {r['workload']} | {r['backend']} | {fmt(lat)} | {fmt(en)} | {vendor_text} | {saved} | "
                     f"{change} | {versus} | {en['energy_measurements'] if en else '-'} | "
                     f"{en['roofline_fraction']:.2f} |" if en else
                     f"| {r['workload']} | {r['backend']} | {fmt(lat)} | - | {vendor_text} | - | - | - | - | - |")
    (args.out / "benchmarks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
