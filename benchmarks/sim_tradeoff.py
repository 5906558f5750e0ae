"""Survey the sim backend's latency/energy trade-off on sampled schedules of the suite (sim figures).

For each workload: sample schedules, simulate them (noise-free), and report the fastest schedule, its
energy, the least energy among schedules within --slowdown of the fastest latency (what the
``energy --max-slowdown`` objective can win), and the fastest sampled latency against the sim's
idealised vendor kernel and docs/design.md's measured H100 table. Writes JSON and Markdown.

    python benchmarks/sim_tradeoff.py --samples 200 --out out/sim_tradeoff

Attention sampling is slow (seconds per candidate); it is skipped unless --attention-samples > 0.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from etune.kernels import SUITE_SPECS, parse_spec  # noqa: E402
from etune.measurements.sim import simulate, vendor_outcome  # noqa: E402
from etune.search_space import ScheduleSpace, gpu_spec  # noqa: E402

# docs/design.md, vendor references measured on an H100 (latency s, energy J per call).
H100_VENDOR_TABLE = {
    "gemm-4096": (213e-6, 152e-3), "gemm-2048x11008x4096": (304e-6, 216e-3),
    "gemm-16x11008x4096": (36e-6, 18.9e-3), "gemv-4096": (20.5e-6, 4.7e-3),
    "softmax-4096x4096": (56e-6, 32.9e-3), "softmax-65536x2048": (318e-6, 189e-3),
    "softmax-32768x128": (11.1e-6, 5.1e-3), "attention-prefill-2048": (128e-6, 91.9e-3),
    "attention-prefill-2048-causal": (91.5e-6, 63.7e-3), "attention-8x1024": (271e-6, 192e-3),
    "attention-decode-4096": (180e-6, 116e-3),
}


def survey(name: str, spec: str, samples: int, seed: int, gpu, slowdown: float) -> dict:
    workload = parse_spec(spec)
    started = time.perf_counter()
    space = ScheduleSpace(workload, gpu, seed=seed)
    candidates = space.sample(samples, seed=seed)
    sample_s = time.perf_counter() - started
    started = time.perf_counter()
    outcomes = [(c, simulate(c.launches, workload, gpu)) for c in candidates]
    sim_s = time.perf_counter() - started
    outcomes.sort(key=lambda pair: pair[1].latency_s)
    fastest = outcomes[0][1]
    near = [(c, o) for c, o in outcomes if o.latency_s <= fastest.latency_s * (1 + slowdown)]
    best_c, best = min(near, key=lambda pair: pair[1].energy_j)
    least_c, least = min(outcomes, key=lambda pair: pair[1].energy_j)
    vendor = vendor_outcome(workload, gpu)
    table = H100_VENDOR_TABLE.get(name) if gpu.name.startswith("NVIDIA H100") else None
    return {
        "workload": name, "spec": spec, "backend": "sim", "samples": len(outcomes),
        "sample_seconds": round(sample_s, 1), "sim_seconds_per_candidate": sim_s / max(1, len(outcomes)),
        "fastest": {"hash": outcomes[0][0].structural_hash, "latency_s": fastest.latency_s,
                    "energy_j": fastest.energy_j, "avg_power_w": fastest.avg_power_w,
                    "limiters": fastest.breakdown["limiters"]},
        "within_slowdown": {"slowdown": slowdown, "count": len(near), "hash": best_c.structural_hash,
                            "latency_s": best.latency_s, "energy_j": best.energy_j, "avg_power_w": best.avg_power_w,
                            "energy_saved": 1 - best.energy_j / fastest.energy_j},
        "least_energy": {"hash": least_c.structural_hash, "latency_s": least.latency_s, "energy_j": least.energy_j},
        "vendor_sim": {"name": vendor.breakdown["vendor"], "latency_s": vendor.latency_s,
                       "energy_j": vendor.energy_j, "avg_power_w": vendor.avg_power_w},
        "vendor_h100_table": {"latency_s": table[0], "energy_j": table[1]} if table else None,
        "fastest_vs_vendor_table": fastest.latency_s / table[0] if table else None,
        "fastest_vs_vendor_sim": fastest.latency_s / vendor.latency_s,
    }


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| workload | n | fastest (us) | its energy (mJ) | its power (W) | least energy within slowdown "
             "(us / mJ) | energy saved | vendor sim (us) | H100 table (us) | fastest / table |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, w, v, t = r["fastest"], r["within_slowdown"], r["vendor_sim"], r["vendor_h100_table"]
        table_us = f"{t['latency_s'] * 1e6:.1f}" if t else "-"
        ratio = f"{r['fastest_vs_vendor_table']:.2f}" if t else "-"
        lines.append(
            f"| {r['workload']} | {r['samples']} | {f['latency_s'] * 1e6:.1f} | {f['energy_j'] * 1e3:.2f} "
            f"| {f['avg_power_w']:.0f} | {w['latency_s'] * 1e6:.1f} / {w['energy_j'] * 1e3:.2f} "
            f"| {w['energy_saved'] * 100:.1f} % | {v['latency_s'] * 1e6:.1f} | {table_us} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--attention-samples", type=int, default=0)
    parser.add_argument("--workloads", nargs="*", default=None, help="suite names (default: the suite)")
    parser.add_argument("--slowdown", type=float, default=0.05)
    parser.add_argument("--target", default="h100")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/sim_tradeoff")
    args = parser.parse_args()

    gpu = gpu_spec(args.target)
    names = args.workloads or list(SUITE_SPECS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        samples = args.attention_samples if name.startswith("attention") else args.samples
        if samples <= 0:
            print(f"{name}: skipped (attention sampling is slow; use --attention-samples)", flush=True)
            continue
        row = survey(name, SUITE_SPECS.get(name, name), samples, args.seed, gpu, args.slowdown)
        rows.append(row)
        f, w = row["fastest"], row["within_slowdown"]
        print(f"{name}: n={row['samples']} fastest {f['latency_s'] * 1e6:.1f} us {f['energy_j'] * 1e3:.2f} mJ "
              f"{f['avg_power_w']:.0f} W; least energy within {args.slowdown:.0%}: {w['energy_j'] * 1e3:.2f} mJ "
              f"({w['energy_saved'] * 100:.1f} % saved, {w['count']} schedules); "
              f"fastest/vendor table {row['fastest_vs_vendor_table'] or float('nan'):.2f} (sim figures)", flush=True)
        (out / "sim_tradeoff.json").write_text(json.dumps(rows, indent=2))
    header = (f"# sim latency/energy trade-off (backend: sim, {gpu.name}, seed {args.seed}, "
              f"{datetime.date.today().isoformat()})\n\nAll figures are from the analytic sim backend, not hardware.")
    (out / "sim_tradeoff.md").write_text(markdown(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
