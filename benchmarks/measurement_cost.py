"""What a latency measurement and an energy measurement cost, in seconds, per backend.

docs/design.md's budget logic (measure every candidate's latency, only a few candidates' energy) rests on
energy being far more expensive: about a second of back-to-back launches per candidate, against
milliseconds for latency. This samples N candidates of a small workload and times each backend's
``measure([candidate], kind)`` for both kinds, one candidate at a time, as the tuner calls it.
One-time costs (backend start, the nvml worker's first task, idle power) are reported apart.

    python benchmarks/measurement_cost.py --samples 8 --out out/measurement_cost
    python benchmarks/measurement_cost.py --backends nvml --workload gemm:1024,1024,1024

Writes OUT/measurement_cost.json and OUT/measurement_cost.md, each row labelled with its backend and
device. Figures from ``sim`` are the cost of the analytic model, not of hardware measurements.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from etune.kernels import parse_spec  # noqa: E402
from etune.measurements import BackendError, make_backend  # noqa: E402
from etune.measurements.nvml_energy import nvml_available  # noqa: E402
from etune.search_space import Builder, ScheduleSpace, gpu_spec  # noqa: E402


def _summary(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0}
    return {"n": len(seconds), "median_s": statistics.median(seconds), "mean_s": statistics.fmean(seconds),
            "min_s": min(seconds), "max_s": max(seconds)}


def _open_backend(name: str, target: str):
    """(backend, None) or (None, why not)."""
    try:
        return make_backend(name, gpu=target), None
    except ImportError as exc:
        return None, f"{name} backend not available ({exc}); is measurements/sim.py written yet?"
    except BackendError as exc:
        return None, str(exc)


def _time_one_time_costs(backend, candidates, builds) -> dict:
    """Costs paid once per backend, kept out of the per-measurement figures."""
    costs = {}
    if backend.name == "nvml":
        from etune.measurements.gpu_lock import GpuLock

        started = time.perf_counter()
        backend.measure(candidates[:1], "latency", builds=builds[:1] if builds else None)
        costs["first_latency_incl_worker_start_s"] = time.perf_counter() - started
        started = time.perf_counter()
        with GpuLock(backend.device_index):
            backend.measure_idle_power()
        costs["idle_power_s"] = time.perf_counter() - started
    return costs


def _measure_backend(name: str, args, candidates, builder) -> dict | None:
    started = time.perf_counter()
    backend, why = _open_backend(name, args.target)
    if backend is None:
        print(f"skipping {name}: {why}", file=sys.stderr)
        return {"backend": name, "skipped": why}
    setup_s = time.perf_counter() - started
    try:
        device = backend.device()
        builds = None
        build_s = None
        if backend.name == "nvml" or args.build:
            started = time.perf_counter()
            builds = builder.build(candidates)
            build_s = time.perf_counter() - started
        one_time = _time_one_time_costs(backend, candidates, builds)
        rows = {"latency": [], "energy": []}
        for kind in ("latency", "energy"):
            for i, candidate in enumerate(candidates):
                if kind == "energy" and i >= args.energy_samples:
                    break
                started = time.perf_counter()
                (result,) = backend.measure([candidate], kind, builds=[builds[i]] if builds else None)
                seconds = time.perf_counter() - started
                rows[kind].append({"structural_hash": candidate.structural_hash, "seconds": seconds,
                                   "ok": result.ok, "value": result.value, "error": result.error,
                                   "converged": (result.details or {}).get("converged")})
                print(f"{backend.name} {kind:7s} {i + 1}/{len(candidates)}: {seconds:.3f} s "
                      f"({'ok' if result.ok else result.error})", file=sys.stderr)
        device = backend.device()
    finally:
        backend.close()
    latency = _summary([r["seconds"] for r in rows["latency"]])
    energy = _summary([r["seconds"] for r in rows["energy"]])
    ratio = (energy["median_s"] / latency["median_s"]
             if latency.get("median_s") and energy.get("median_s") else None)
    return {
        "backend": backend.name,
        "device": device.name,
        "driver": device.driver,
        "device_details": device.details,
        "setup_s": setup_s,
        "build_s": build_s,
        "one_time": one_time,
        "latency": latency,
        "energy": energy,
        "energy_over_latency": ratio,
        "ok": {kind: sum(r["ok"] for r in rows[kind]) for kind in rows},
        "measurements": rows,
    }


def _markdown(report: dict) -> str:
    lines = [
        f"# Measurement cost: {report['workload']}",
        "",
        f"{report['date']}, host {report['host']}, {report['samples']} sampled candidates "
        f"(energy on {report['energy_samples']}), target {report['target']}. "
        "Seconds of wall time per `measure([candidate], kind)` call.",
        "",
        "| backend | device | latency s/meas. (median) | energy s/meas. (median) | energy / latency | "
        "ok latency | ok energy | one-time costs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["backends"]:
        if "skipped" in row:
            lines.append(f"| {row['backend']} | skipped: {row['skipped']} | | | | | | |")
            continue
        one_time = ", ".join(f"{k} {v:.2f} s" for k, v in row["one_time"].items()) or "-"
        if row["build_s"] is not None:
            one_time += f"; build {row['build_s']:.1f} s"
        ratio = f"{row['energy_over_latency']:.3g}x" if row["energy_over_latency"] else "-"

        def fmt(summary):
            return f"{summary['median_s']:.3g}" if summary.get("median_s") is not None else "-"

        lines.append(
            f"| {row['backend']} | {row['device']} | {fmt(row['latency'])} | {fmt(row['energy'])} | {ratio} | "
            f"{row['ok']['latency']}/{row['latency']['n']} | {row['ok']['energy']}/{row['energy']['n']} | "
            f"{one_time} |"
        )
    lines += ["", "`sim` rows time the analytic model (no GPU); they are not hardware measurements."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="softmax:4096,4096", help="a small workload spec")
    parser.add_argument("--samples", type=int, default=8, help="candidates sampled and latency-measured")
    parser.add_argument("--energy-samples", type=int, default=None,
                        help="of those, how many get an energy measurement (default: all)")
    parser.add_argument("--backends", default="auto",
                        help="comma-separated: sim, nvml, or auto (sim, plus nvml when a GPU answers)")
    parser.add_argument("--target", default="h100")
    parser.add_argument("--build", action="store_true", help="build for sim too (nvml always builds)")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/measurement_cost")
    parser.add_argument("--workdir", default=None, help="build artifacts (default: OUT/builds)")
    args = parser.parse_args()
    args.energy_samples = args.samples if args.energy_samples is None else min(args.energy_samples, args.samples)

    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    if names == ["auto"]:
        names = ["sim"] + (["nvml"] if nvml_available() else [])
    workload = parse_spec(args.workload)
    gpu = gpu_spec(args.target)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    candidates = ScheduleSpace(workload, gpu, seed=args.seed).sample(args.samples, seed=args.seed)
    sample_s = time.perf_counter() - started
    if not candidates:
        print(f"no valid candidates of {workload.spec} were sampled", file=sys.stderr)
        return 1
    builder = Builder(gpu, workdir=args.workdir or out / "builds", jobs=args.jobs)
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "workload": workload.spec,
        "target": gpu.name,
        "samples": len(candidates),
        "energy_samples": min(args.energy_samples, len(candidates)),
        "sample_s": sample_s,
        "backends": [_measure_backend(name, args, candidates, builder) for name in names],
    }
    (out / "measurement_cost.json").write_text(json.dumps(report, indent=2, default=str))
    markdown = _markdown(report)
    (out / "measurement_cost.md").write_text(markdown)
    print(markdown)
    return 0 if any("skipped" not in row for row in report["backends"]) else 1


if __name__ == "__main__":
    sys.exit(main())
