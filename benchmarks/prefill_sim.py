"""Energy-aware tuning of attention prefill on sim, against sim's SDPA stand-in (issue 15).

    python benchmarks/prefill_sim.py attention:1,32,2048,2048,128 --trials 64 --jobs 1 --out run.json

For each workload: one ``etune.tune`` run (objective energy@0.05, backend sim, all rule sets, so the
fused templates compete with the unfused chain), its best point, its fastest, which design space
(rule set and fused template) each came from, and the vendor kernel as sim models it
(``vendor_outcome``). Sim figures are model outputs, not measurements.
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import etune  # noqa: E402
from etune.measurements.sim import SimBackend, vendor_outcome  # noqa: E402
from etune.search_space import ScheduleSpace  # noqa: E402


def survey(spec: str, trials: int, jobs: int, db: Path, build: bool, seed: int = 0) -> dict:
    started = time.time()
    run = etune.tune(spec, "energy@0.05", "sim", db, trials=trials, jobs=jobs, build=build, seed=seed,
                     workdir=db.parent / "builds")
    seconds = time.time() - started
    space = ScheduleSpace(spec)  # the tuner's design spaces, in its order
    sim = SimBackend("h100")
    vendor = vendor_outcome(space.workload, sim.gpu, sim.params)
    with sqlite3.connect(db) as connection:
        design_space_of = dict(connection.execute("SELECT id, design_space FROM candidates"))

    def point(p):
        design = space.design_spaces[design_space_of[p.key]]
        return {"latency_us": p.latency_s * 1e6, "energy_mj": None if p.energy_j is None else p.energy_j * 1e3,
                "rule_set": design.rule_set, "template": design.template}

    best = run.best
    fastest = min(run.pareto(), key=lambda p: p.latency_s) if run.pareto() else None
    return {"spec": spec, "backend": "sim (model output)", "objective": "energy@0.05", "trials": run.trials,
            "energy_measurements": run.energy_measurements, "stopped_by": run.stopped_by, "seconds": seconds,
            "seconds_per_trial": seconds / max(1, run.trials), "build": build,
            "max_shared_memory_per_block": space.gpu.max_shared_memory_per_block,
            "best": point(best) if best else None, "fastest": point(fastest) if fastest else None,
            "vendor": {"latency_us": vendor.latency_s * 1e6, "energy_mj": vendor.energy_j * 1e3}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+")
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--db", default="prefill_sim.db")
    parser.add_argument("--out")
    parser.add_argument("--max-shared-kib", type=int, default=None,
                        help="the h100 preset's per-block shared memory limit in KiB, in this process only "
                             "(default: the preset's, 227; 48: static shared memory only)")
    args = parser.parse_args(argv)
    if args.max_shared_kib:  # the tuner takes a preset's name: change the preset itself
        from etune.search_space import targets

        targets.PRESETS["h100"] = targets.PRESETS["h100"].with_shared_limit(args.max_shared_kib)
    results = []
    for spec in args.specs:
        result = survey(spec, args.trials, args.jobs, Path(args.db), not args.no_build)
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
