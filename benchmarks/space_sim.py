"""Best-of-N on sim per rule set against sim's vendor stand-in: how good a design space can get.

    python benchmarks/space_sim.py gemm:1,4096,4096 gemm:16,11008,4096 --samples 64 --out /tmp/space_sim.json
    python benchmarks/space_sim.py softmax:4096,4096 --samples 64 --tune 256 --out /tmp/space_sim.json

For each workload and rule set: N sampled schedules (seed 0), their noise-free sim outcomes, the
fastest and the least-energy schedule, and the vendor kernel as sim models it. With ``--tune T``, also
an ``energy@0.05`` run of T trials over the default space (every rule set that applies; seed 0, no
builds), its best and fastest against the vendor stand-in and the memory bound. Sim figures are
model outputs, not measurements.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from etune.kernels import as_workload  # noqa: E402
from etune.measurements.sim import SimBackend, vendor_outcome  # noqa: E402
from etune.search_space import SamplingError, ScheduleSpace, gpu_spec  # noqa: E402
from etune.search_space.rules import RULE_SETS, rule_set_applies  # noqa: E402


def survey(spec: str, samples: int, gpu: str = "h100", seed: int = 0, rule_sets=RULE_SETS,
           max_shared_kib: int | None = None, max_warp_ilp: float | None = None) -> dict:
    sim = SimBackend(gpu)
    if max_warp_ilp is not None:  # another model of latency hiding (1: warps only, before 2026-12-01)
        sim = SimBackend(gpu, params=dataclasses.replace(sim.params, max_warp_ilp=max_warp_ilp))
    target = gpu_spec(gpu).with_shared_limit(max_shared_kib)  # the preset, or another shared-memory limit
    rows = {}
    vendor = None
    for rule_set in rule_sets:
        started = time.time()
        try:
            space = ScheduleSpace(spec, target, rule_sets=[rule_set], seed=seed)
        except SamplingError:  # a template rule set with no template for this workload
            continue
        if not space.design_spaces or not rule_set_applies(rule_set, space.workload):
            continue
        vendor = vendor or vendor_outcome(space.workload, sim.gpu, sim.params)
        outcomes = [(sim.outcome(c), c) for c in space.sample(samples, seed=seed)]
        if not outcomes:
            continue
        fastest = min(outcomes, key=lambda oc: oc[0].latency_s)
        frugal = min(outcomes, key=lambda oc: oc[0].energy_j)
        best_by_template = {}
        for outcome, candidate in outcomes:
            template = space.design_spaces[candidate.design_space].template
            if template and outcome.energy_j * 1e3 < best_by_template.get(template, {}).get("energy_mj", float("inf")):
                best_by_template[template] = {"latency_us": outcome.latency_s * 1e6, "energy_mj": outcome.energy_j * 1e3}
        rows[rule_set] = {
            "samples": len(outcomes),
            "least_energy_by_template": best_by_template,
            "least_energy_template": space.design_spaces[frugal[1].design_space].template,
            "replays": space.last_sample.get("replays"),
            "fastest": {"latency_us": fastest[0].latency_s * 1e6, "energy_mj": fastest[0].energy_j * 1e3},
            "least_energy": {"latency_us": frugal[0].latency_s * 1e6, "energy_mj": frugal[0].energy_j * 1e3,
                             "trace": frugal[1].trace_json()},
            "seconds": time.time() - started,
        }
    bound_us = as_workload(spec).min_bytes / sim.gpu.memory_bandwidth * 1e6
    return {"spec": spec, "gpu": gpu, "max_shared_kib": max_shared_kib, "backend": "sim (model output)",
            "sim_max_warp_ilp": sim.params.max_warp_ilp,
            "memory_bound_us": bound_us,
            "vendor": {"latency_us": vendor.latency_s * 1e6, "energy_mj": vendor.energy_j * 1e3}, "rule_sets": rows}


def tuned(spec: str, trials: int, db: Path, gpu: str = "h100", seed: int = 0) -> dict:
    """An energy@0.05 run on sim over the default space: its best and fastest, and what they are."""
    from etune.measurements.records import RecordsDB
    from etune.tuner.search import tune

    started = time.time()
    status = tune(spec, "energy@0.05", backend="sim", db=db, target=gpu, trials=trials, build=False, seed=seed)
    space = ScheduleSpace(spec, gpu, seed=seed)

    def point(p) -> dict:
        with RecordsDB.open(db) as records:
            stored = records.candidate(p.key)
        design = space.design_spaces[stored.design_space]
        kernels = space.from_trace_json(stored.trace, stored.design_space).launches
        energy_mj = p.energy_j * 1e3 if p.energy_j is not None else None  # the fastest may not be energy-measured
        return {"candidate_id": p.key, "latency_us": p.latency_s * 1e6, "energy_mj": energy_mj,
                "rule_set": design.rule_set, "template": design.template,
                "kernels": [{"grid": k.grid[0], "block": list(k.block), "vector_lanes": k.max_vector_lanes}
                            for k in kernels]}

    return {"objective": "energy@0.05", "trials": status.trials, "energy_measurements": status.energy_measurements,
            "seed": seed, "best": point(status.best), "fastest": point(status.fastest),
            "seconds": time.time() - started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--tune", type=int, default=0, metavar="TRIALS",
                        help="also an energy@0.05 run of this many trials on sim over the default space")
    parser.add_argument("--db", default="space_sim.db", help="records database of the --tune runs")
    parser.add_argument("--rule-sets", nargs="+", default=list(RULE_SETS), choices=RULE_SETS)
    parser.add_argument("--max-shared-kib", type=int, default=None,
                        help="build the design spaces for the preset with this per-block shared memory limit")
    parser.add_argument("--sim-max-warp-ilp", type=float, default=None,
                        help="survey with this cap on a warp's accumulator ILP in sim's latency hiding "
                             "(1: the model before 2026-12-01)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.tune and args.sim_max_warp_ilp is not None:
        parser.error("--tune runs on the default sim model; survey another one without --tune")
    results = []
    for spec in args.specs:
        result = survey(spec, args.samples, args.gpu, rule_sets=args.rule_sets, max_shared_kib=args.max_shared_kib,
                        max_warp_ilp=args.sim_max_warp_ilp)
        if args.out:  # the survey stays if the tuning run fails
            Path(args.out).write_text(json.dumps(results + [result], indent=1))
        if args.tune:
            result["tuned"] = tuned(spec, args.tune, Path(args.db), args.gpu)
        results.append(result)
        if args.out:  # after every workload: a long run keeps what it has
            Path(args.out).write_text(json.dumps(results, indent=1))
        vendor = result["vendor"]
        print(f"{spec}: vendor {vendor['latency_us']:.1f} us {vendor['energy_mj']:.2f} mJ, "
              f"memory bound {result['memory_bound_us']:.1f} us (sim)")
        for rule_set, row in result["rule_sets"].items():
            f, e = row["fastest"], row["least_energy"]
            print(f"  {rule_set:10s} n={row['samples']:3d} fastest {f['latency_us']:7.1f} us {f['energy_mj']:7.2f} mJ"
                  f" | least energy {e['latency_us']:7.1f} us {e['energy_mj']:7.2f} mJ"
                  f" ({e['energy_mj'] / vendor['energy_mj']:.2f}x vendor)")
        if "tuned" in result:
            best = result["tuned"]["best"]
            print(f"  tuned energy@0.05, {result['tuned']['trials']} trials: {best['latency_us']:.1f} us "
                  f"{best['energy_mj']:.2f} mJ ({best['energy_mj'] / vendor['energy_mj']:.2f}x vendor energy, "
                  f"{best['latency_us'] / result['memory_bound_us']:.2f}x the memory bound; {best['rule_set']} "
                  f"{best['template'] or ''})")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
