"""Does the energy model earn its keep? The energy-aware search against simple baselines, as anytime
curves of the best energy found per number of energy measurements (issue 14).

Per workload and seed, every arm tunes ``energy@S`` with the same trial budget and the same number
of energy measurements, on the same backend; only one part of the loop changes:

* ``model``: the XGBoost energy model and the update policy (etune's default);
* ``model+ei``: the model, with candidates chosen by expected improvement under its uncertainty;
* ``constant-power``: (a) no energy model, median measured power x latency in its place;
* ``random-choice``: (c) the model, but which candidates get an energy measurement is chosen at random
  among those within the slack;
* ``naive``: (b) a latency-only run of the same trials, then the energy of every candidate within the
  slack of its fastest, fastest first (its curve: the best after k of them).

A curve point (k, E): the least energy among the first k energy measurements of the run whose
latency is within the slack of the run's fastest. ``naive`` measuring everything within the slack
defines the energy to reach; each arm reports the measurements it needed to get within 0.5 % of it,
as a share of the naive way's. On ``sim`` every figure is a model output.

    python benchmarks/energy_ablation.py --backend sim --seeds 0 1 2 3 4 --trials 64
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from etune.kernels import as_workload  # noqa: E402
from etune.measurements import make_backend  # noqa: E402
from etune.measurements.backend import model_output  # noqa: E402
from etune.measurements.records import RecordsDB  # noqa: E402
from etune.tuner.models import Models  # noqa: E402
from etune.tuner.objectives import Objective  # noqa: E402
from etune.tuner.search import TuneSettings, Tuner  # noqa: E402

WORKLOADS = {"gemv": "gemm:1,4096,4096", "gemm": "gemm:1024,1024,1024", "softmax": "softmax:4096,4096",
             "attention-decode": "attention:8,32,1,4096,128"}
ARMS = ("model", "model+ei", "constant-power", "random-choice", "naive")
REACHED = 0.005  # within 0.5 % of the naive way's best counts as reaching it


def arm_parts(arm: str, seed: int) -> dict:
    """The Tuner parts that make the arm (the rest is the default loop)."""
    from etune.energy_model import baselines, policy

    if arm == "model":
        return {}
    if arm == "model+ei":
        return {"policy": policy.ExpectedImprovementPolicy(seed=seed)}
    if arm == "constant-power":
        return {"models": Models(energy=baselines.ConstantPowerModel(seed=seed), seed=seed)}
    if arm == "random-choice":
        return {"policy": policy.RandomPolicy(seed=seed)}
    raise ValueError(arm)


def anytime_curve(energies_in_order: list[tuple[float, float]], bound_s: float) -> list[float | None]:
    """Best energy within ``bound_s`` after each (latency, energy) measurement, in order (None: none yet)."""
    curve, best = [], None
    for latency_s, energy_j in energies_in_order:
        if latency_s <= bound_s and (best is None or energy_j < best):
            best = energy_j
        curve.append(best)
    return curve


def measurements_to_reach(curve: list[float | None], target_j: float) -> int | None:
    return next((k + 1 for k, e in enumerate(curve) if e is not None and e <= target_j * (1 + REACHED)), None)


def _run(spec: str, objective: Objective, backend, db_path: Path, settings: TuneSettings, parts: dict):
    with RecordsDB.open(db_path) as db:
        tuner = Tuner(spec, objective, backend, db, settings, **parts)
        status = tuner.run()
        points = {p.key: p for p in db.points(tuner.workload_id, run_id=tuner.run_id)}
        energies = [m for m in db.measurements(tuner.workload_id, run_id=tuner.run_id, kind="energy") if m.ok]
        return tuner, status, points, energies


def energy_aware_arm(spec, objective, backend, db_path, settings, arm, seed) -> dict:
    _, status, points, energies = _run(spec, objective, backend, db_path, settings, arm_parts(arm, seed))
    fastest = min(p.latency_s for p in points.values())
    bound = objective.slack_bound_s(fastest)
    curve = anytime_curve([(points[m.candidate_id].latency_s, m.value) for m in energies], bound)
    return {"curve_j": curve, "energy_measurements": len(energies), "fastest_s": fastest,
            "best": {"latency_s": status.best.latency_s, "energy_j": status.best.energy_j} if status.best else None}


def naive_arm(spec, objective, backend, db_path, settings) -> dict:
    """Latency-only run, then the energy of every candidate within the slack, fastest first."""
    latency_only = dataclasses.replace(settings, energy_measurements=0)
    tuner, _, points, _ = _run(spec, Objective.parse("latency"), backend, db_path, latency_only, {})
    fastest = min(p.latency_s for p in points.values())
    bound = objective.slack_bound_s(fastest)
    near = sorted((p for p in points.values() if p.latency_s <= bound), key=lambda p: p.latency_s)
    with RecordsDB.open(db_path, readonly=True) as db:
        rows = [db.candidate(p.key) for p in near]
    candidates = [tuner.space.from_trace_json(r.trace, r.design_space) for r in rows]
    builds = tuner.builder.build(candidates) if tuner.builder is not None else None
    results = backend.measure(candidates, "energy", builds=builds)
    measured = [(p.latency_s, r.value) for p, r in zip(near, results) if r.ok]
    curve = anytime_curve(measured, bound)
    best = min(measured, key=lambda m: m[1]) if measured else None
    return {"curve_j": curve, "energy_measurements": len(measured), "fastest_s": fastest,
            "best": {"latency_s": best[0], "energy_j": best[1]} if best else None}


def summarize(results: dict, workloads: list[str], arms: list[str]) -> list[dict]:
    rows = []
    for name in workloads:
        for arm in arms:
            per_seed = [r for r in results.values() if r["workload"] == name and r["arm"] == arm]
            naive = {r["seed"]: r for r in results.values() if r["workload"] == name and r["arm"] == "naive"}
            shares, ratios, reached, used = [], [], 0, []
            for r in per_seed:
                base = naive.get(r["seed"])
                if not base or not base["best"] or not r["best"]:
                    continue
                target = base["best"]["energy_j"]
                k = measurements_to_reach(r["curve_j"], target)
                reached += k is not None
                if k is not None:
                    shares.append(k / base["energy_measurements"])
                ratios.append(r["best"]["energy_j"] / target)
                used.append(r["energy_measurements"])
            if not ratios:
                continue
            rows.append({"workload": name, "arm": arm, "seeds": len(ratios), "reached": reached,
                         "median_share_of_naive_measurements": statistics.median(shares) if shares else None,
                         "median_best_vs_naive_best": statistics.median(ratios),
                         "worst_best_vs_naive_best": max(ratios), "median_energy_measurements": statistics.median(used)})
    return rows


def markdown(rows: list[dict], simulated: bool, args) -> str:
    label = "sim (model outputs, not hardware)" if simulated else args.backend
    lines = [f"Backend: {label}; {args.trials} trials per run; energy@{args.max_slowdown:g}; seeds "
             f"{' '.join(map(str, args.seeds))}. `reached`: seeds where the arm got within {REACHED:.1%} of the "
             "naive way's best energy; `share`: its energy measurements by then over the naive way's.", "",
             "| workload | arm | reached | median share of naive's measurements | median best / naive best | "
             "worst best / naive best | energy measurements |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        share = "-" if r["median_share_of_naive_measurements"] is None else f"{r['median_share_of_naive_measurements']:.0%}"
        lines.append(f"| {r['workload']} | {r['arm']} | {r['reached']}/{r['seeds']} | {share} | "
                     f"{r['median_best_vs_naive_best']:.3f} | {r['worst_best_vs_naive_best']:.3f} | "
                     f"{r['median_energy_measurements']:g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--energy-measurements", type=int, default=None, help="per arm (default: the tuner's)")
    parser.add_argument("--max-slowdown", type=float, default=0.05)
    parser.add_argument("--backend", default="sim")
    parser.add_argument("--build", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--out", type=Path, default=Path("out/energy_ablation"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    objective = Objective.parse(f"energy@{args.max_slowdown:g}")
    results_path = args.out / "ablation.json"
    results = json.loads(results_path.read_text())["runs"] if results_path.exists() else {}
    with make_backend(args.backend) as backend:
        simulated = model_output(backend.name, backend.device().name)
    for seed in args.seeds:  # seeds outermost: a run cut short still covers every workload
        for name in args.workloads:
            spec = as_workload(WORKLOADS[name]).spec
            for arm in args.arms:
                key = f"{name}|{seed}|{arm}"
                if key in results:  # resumable: a finished arm is kept
                    continue
                settings = TuneSettings(trials=args.trials, energy_measurements=args.energy_measurements, seed=seed,
                                        build=args.build)
                started = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp, make_backend(args.backend) as backend:
                    db_path = Path(tmp) / "runs.db"
                    if arm == "naive":
                        row = naive_arm(spec, objective, backend, db_path, settings)
                    else:
                        row = energy_aware_arm(spec, objective, backend, db_path, settings, arm, seed)
                results[key] = {"workload": name, "spec": spec, "seed": seed, "arm": arm, **row,
                                "seconds": time.perf_counter() - started}
                results_path.write_text(json.dumps({"backend": args.backend, "simulated": simulated,
                                                    "trials": args.trials, "runs": results}, indent=1))
                best = row["best"]
                print(f"{key}: {row['energy_measurements']} energy measurements, best "
                      f"{best['energy_j'] * 1e3 if best else float('nan'):.3f} mJ ({time.perf_counter() - started:.0f} s)",
                      flush=True)
    rows = summarize(results, args.workloads, args.arms)
    (args.out / "ablation.md").write_text(markdown(rows, simulated, args))
    print(markdown(rows, simulated, args))


if __name__ == "__main__":
    main()
