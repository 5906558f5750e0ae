"""Build (and, on a GPU, run and check) sampled schedules of every suite workload.

Writes JSON and a Markdown table: build success rate and build seconds per candidate per workload,
and where a CUDA GPU is present, how many built candidates matched the numpy reference.

    python benchmarks/check_builds.py --samples 32 --out out/check_builds
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from etune.kernels import parse_spec, suite  # noqa: E402
from etune.search_space import Builder, ScheduleSpace, gpu_spec  # noqa: E402
from etune.search_space.rules import RULE_SETS  # noqa: E402


def gpu_present() -> bool:
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--workloads", nargs="*", default=None, help="specs (default: the suite)")
    parser.add_argument("--check-per-workload", type=int, default=8, help="built candidates run per workload")
    parser.add_argument("--target", default="h100")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rule-sets", nargs="+", default=None, choices=RULE_SETS,
                        help="sample these rule sets' design spaces only (default: all that apply)")
    parser.add_argument("--out", default="out/check_builds")
    parser.add_argument("--workdir", default=None, help="build artifacts (default: OUT/builds)")
    parser.add_argument("--max-shared-kib", type=int, default=None,
                        help="per-block shared memory limit in KiB (default: the preset's, 227 on sm_90; 48: static shared memory only)")
    args = parser.parse_args()

    workloads = [parse_spec(s) for s in args.workloads] if args.workloads else list(suite().values())
    gpu = gpu_spec(args.target).with_shared_limit(args.max_shared_kib)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = gpu_present()
    builder = Builder(gpu, workdir=args.workdir or out / "builds", jobs=args.jobs)
    rows = []
    for workload in workloads:
        started = time.perf_counter()
        space = ScheduleSpace(workload, gpu, seed=args.seed, **({"rule_sets": args.rule_sets} if args.rule_sets else {}))
        candidates = space.sample(args.samples, seed=args.seed)
        sample_s = time.perf_counter() - started
        started = time.perf_counter()
        results = builder.build(candidates)
        wall_s = time.perf_counter() - started
        ok = [r for r in results if r.ok]
        row = {
            "workload": workload.spec,
            "design_spaces": len(space.design_spaces),
            "sampled": len(candidates),
            "sample_seconds": round(sample_s, 2),
            "built": len(ok),
            "build_rate": round(len(ok) / max(1, len(results)), 3),
            "build_seconds_median": round(statistics.median(r.seconds for r in ok), 2) if ok else None,
            "build_wall_seconds": round(wall_s, 2),
            "build_wall_seconds_per_candidate": round(wall_s / max(1, len(results)), 2),
            "failures": sorted({(r.error or r.status)[:160] for r in results if not r.ok}),
            # Per design space (template name, or rule set): [built, sampled].
            "by_design_space": {},
            "spilling": sum(any(k.spill_store_bytes > 0 for k in r.kernels) for r in ok),
            # candidates with more than 48 KiB of dynamic shared memory (the opt-in range), and of them built
            "dynamic_shared_above_48k": sum(max(k.dynamic_shared_bytes for k in c.launches) > 48 * 1024
                                            for c in candidates),
            "dynamic_shared_above_48k_built": sum(max(k.dynamic_shared_bytes for k in c.launches) > 48 * 1024
                                                  for c, r in zip(candidates, results) if r.ok),
            "notes": space.notes,
        }
        for candidate, result in zip(candidates, results):
            design = space.design_spaces[candidate.design_space]
            counts = row["by_design_space"].setdefault(design.template or design.rule_set, [0, 0])
            counts[0] += bool(result.ok)
            counts[1] += 1
        if on_gpu:
            from etune.measurements.tvm_runner import run_and_check

            checked, passed, worst = 0, 0, 0.0
            errors = []
            for i, r in enumerate(ok[: args.check_per_workload]):
                try:
                    good, err = run_and_check(workload, r.library, seed=i + 1)
                except Exception as exc:  # record and go on: one bad kernel must not stop the sweep
                    good, err = False, float("inf")
                    errors.append(str(exc).strip().splitlines()[-1][:160])
                checked += 1
                passed += good
                worst = max(worst, err)
            row.update(checked=checked, matched=passed, worst_rel_error=worst, tolerance=workload.rel_tolerance,
                       run_errors=errors)
        rows.append(row)
        print(json.dumps(row), flush=True)

    report = {
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "jobs": builder.jobs,
        "target": gpu.name,
        "gpu_present": on_gpu,
        "samples": args.samples,
        "rule_sets": args.rule_sets or "all that apply",
        "max_shared_kib": args.max_shared_kib,
        "rows": rows,
    }
    (out / "check_builds.json").write_text(json.dumps(report, indent=1))
    lines = ["| workload | spaces | sampled | built | build s (median) | wall s/cand | checked on GPU |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        gpu_col = f"{r['matched']}/{r['checked']} (worst {r['worst_rel_error']:.1e})" if "checked" in r else "-"
        lines.append(f"| {r['workload']} | {r['design_spaces']} | {r['sampled']} | {r['built']} ({100*r['build_rate']:.0f} %) "
                     f"| {r['build_seconds_median']} | {r['build_wall_seconds_per_candidate']} | {gpu_col} |")
    (out / "check_builds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
