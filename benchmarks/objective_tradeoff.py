"""Energy-aware vs latency-only tuning at the same trial budget (issue 5's acceptance figure).

For each seed: tune the workload for ``latency`` and for ``energy@S`` on one backend, each run with its
own budget, and compare the energy-aware best with the latency-only best. Writes JSON and a Markdown
table. On ``sim`` every figure is a model output (the table says so).

    python benchmarks/objective_tradeoff.py --spec gemm:1,4096,4096 --trials 96 --seeds 0 1 2 --backend sim --no-build
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from etune.measurements import make_backend  # noqa: E402
from etune.measurements.backend import model_output  # noqa: E402
from etune.tuner.search import tune  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="gemm:1,4096,4096")
    parser.add_argument("--trials", type=int, default=96)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-slowdown", type=float, default=0.05)
    parser.add_argument("--backend", default="sim")
    parser.add_argument("--build", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=Path("out/objective_tradeoff"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    objective = f"energy@{args.max_slowdown:g}"
    with make_backend(args.backend) as backend:  # replay:PATH names a file: the label and db name need a slug
        simulated = model_output(backend.name, backend.device().name)
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", Path(args.backend.removeprefix("replay:")).name if
                  args.backend.startswith("replay:") else args.backend)
    rows = []
    for seed in args.seeds:
        db = args.out / f"tradeoff-{slug}-seed{seed}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        common = dict(backend=args.backend, db=db, trials=args.trials, build=args.build, seed=seed)
        started = time.perf_counter()
        latency = tune(args.spec, "latency", **common)
        energy = tune(args.spec, objective, **common)
        lat_best, en_best = latency.best, energy.best
        rows.append({
            "seed": seed,
            "latency_best": {"latency_s": lat_best.latency_s, "energy_j": lat_best.energy_j},
            "energy_best": {"latency_s": en_best.latency_s, "energy_j": en_best.energy_j},
            "energy_saved": 1 - en_best.energy_j / lat_best.energy_j,
            "slowdown_vs_latency_best": en_best.latency_s / lat_best.latency_s - 1,
            "energy_measurements": energy.energy_measurements,
            "trials": energy.trials,
            "energy_measurement_ratio": energy.energy_measurements / energy.trials,
            "meets_target": (1 - en_best.energy_j / lat_best.energy_j >= 0.10
                             and en_best.latency_s <= (1 + args.max_slowdown) * lat_best.latency_s
                             and energy.energy_measurements <= 0.2 * energy.trials),
            "seconds": time.perf_counter() - started,
        })
        print(json.dumps(rows[-1]), flush=True)
    document = {"spec": args.spec, "backend": args.backend, "objective": objective, "trials": args.trials,
                "build": args.build, "simulated": simulated, "runs": rows,
                "median_energy_saved": statistics.median(r["energy_saved"] for r in rows),
                "command": " ".join(sys.argv)}
    (args.out / "objective_tradeoff.json").write_text(json.dumps(document, indent=2))
    label = f"{args.backend} (model outputs, not hardware)" if simulated else args.backend
    lines = [f"# {objective} vs latency-only, {args.spec}, {args.trials} trials each, backend {label}", "",
             "| seed | latency-only best | energy-aware best | energy saved | slowdown | energy meas / trials | target met |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lb, eb = r["latency_best"], r["energy_best"]
        lines.append(f"| {r['seed']} | {lb['latency_s'] * 1e6:.1f} us, {lb['energy_j'] * 1e3:.2f} mJ | "
                     f"{eb['latency_s'] * 1e6:.1f} us, {eb['energy_j'] * 1e3:.2f} mJ | {100 * r['energy_saved']:.1f} % | "
                     f"{100 * r['slowdown_vs_latency_best']:+.1f} % | {r['energy_measurements']}/{r['trials']} | "
                     f"{'yes' if r['meets_target'] else 'no'} |")
    (args.out / "objective_tradeoff.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
