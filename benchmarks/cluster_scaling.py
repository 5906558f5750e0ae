"""Wall time on a Ray cluster vs the number of measurement actors (sim) and of build workers (nvcc).

A local Ray cluster with fake GPUs (``num_gpus``) runs one sim measurement actor per GPU; each
measurement sleeps for a scaled share (``--scale``) of the GPU time it would take on hardware, so the
wall time shows what parallel measurement buys. The run: one generation of N sampled candidates,
every one measured for latency and energy (the candidates are sampled once and given to every run:
TVM's sampling is the same work whatever the cluster). The figures are sim model outputs.

``--build-workers``: the same candidates built for sm_90 with nvcc as Ray tasks on a local cluster
of that many CPUs (no cache: a fresh directory each time). Those are real builds on this host, so the
workers cannot usefully outnumber its cores.

    python benchmarks/cluster_scaling.py --actors 1 2 4 --build-workers 1 2 --out docs/raw/cluster_scaling_sim_DATE.json

Needs Ray (pip install 'etune[ray]').
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from etune.energy_model.policy import UpdatePolicy  # noqa: E402
from etune.measurements.records import RecordsDB  # noqa: E402
from etune.tuner.cluster import ClusterBackend, connect  # noqa: E402
from etune.tuner.objectives import Objective  # noqa: E402
from etune.tuner.search import Tuner, TuneSettings  # noqa: E402

WORKLOAD = "softmax:1024,1024"


class GivenCandidates:
    """A search strategy that proposes the given candidates once (the same run for every cluster)."""

    def __init__(self, candidates):
        self.left = list(candidates)

    def propose(self, n: int) -> list:
        found, self.left = self.left[:n], self.left[n:]
        return found

    def observe(self, trials) -> None:
        pass


def sample_candidates(n: int, spec: str = WORKLOAD) -> list:
    from etune.kernels import as_workload
    from etune.search_space import ScheduleSpace, gpu_spec

    return ScheduleSpace(as_workload(spec), gpu_spec("h100"), seed=0).sample(n, seed=0)


def start_local_cluster(gpus: int, cpus: int = 2):
    """A local Ray with fake GPUs whose workers import etune from this checkout (a new one: any Ray
    this process had is shut down first)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()

    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in paths:  # once: this runs again for each cluster
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *paths])
    # address="local": a new cluster even when another runs on this host (ray.init would join that one)
    ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False, logging_level="ERROR")
    return connect("ray")


def energy_heavy_run(db_path, candidates, actors: int, scale: float, during=None):
    """Tune the candidates (all measured for energy, in one generation) on ``actors`` sim actors.
    Returns the Status, the run's wall time and the actors still alive at the end. ``during(backend)``
    runs in a thread alongside (a test kills an actor with it)."""
    n = len(candidates)
    backend = ClusterBackend("sim", actors=actors, gpu="h100", wall_time_scale=scale)
    try:
        with RecordsDB.open(db_path) as db:
            # The budget keeps one measurement for a final check, which the winner then no longer needs.
            settings = TuneSettings(trials=n, batch=n, energy_measurements=n + 1, build=False, seed=1)
            tuner = Tuner(candidates[0].workload.spec, Objective.parse("energy@none"), backend, db, settings,
                          strategy=GivenCandidates(candidates), policy=UpdatePolicy(per_batch=n, seed=1))
            if during is not None:
                threading.Thread(target=during, args=(backend,), daemon=True).start()
            started = time.monotonic()
            status = tuner.run()
            return status, time.monotonic() - started, len(backend.actors)
    finally:
        backend.close()


def build_all(candidates, workdir) -> tuple[float, int]:
    """Build the candidates through Ray tasks on the connected cluster: wall seconds and builds that
    succeeded."""
    from etune.search_space import gpu_spec
    from etune.tuner.cluster import cluster_builder

    builder = cluster_builder(gpu_spec("h100"), candidates[0].workload, workdir=workdir)
    started = time.monotonic()
    results = builder.build(candidates)
    return time.monotonic() - started, sum(r.ok for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--scale", type=float, default=0.2, help="wall seconds per simulated GPU second")
    parser.add_argument("--build-workers", type=int, nargs="*", default=[],
                        help="also time building the candidates with this many Ray CPUs (nvcc; real)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import tempfile

    candidates = sample_candidates(args.candidates)
    rows, build_rows = [], []
    with tempfile.TemporaryDirectory() as directory:
        if args.actors:
            start_local_cluster(max(args.actors))
        for actors in args.actors:
            status, wall_s, _ = energy_heavy_run(Path(directory) / f"{actors}.db", candidates, actors, args.scale)
            rows.append({"actors": actors, "wall_s": wall_s, "trials": status.trials,
                         "energy_measurements": status.energy_measurements})
            print(f"{actors} actors: {wall_s:.1f} s ({status.trials} latency, {status.energy_measurements} energy)")
        for workers in args.build_workers:
            start_local_cluster(gpus=0, cpus=workers)
            wall_s, built = build_all(candidates, Path(directory) / f"builds-{workers}")
            build_rows.append({"build_workers": workers, "wall_s": wall_s, "built": built, "builds": len(candidates)})
            print(f"{workers} build workers: {wall_s:.1f} s ({built}/{len(candidates)} built)")
    for table in (rows, build_rows):
        for row in table:
            row["speedup"] = table[0]["wall_s"] / row["wall_s"]
    document = {
        "benchmark": "cluster_scaling", "backend": "sim", "note": "sim model outputs: measurements sleep for "
        f"{args.scale} of their simulated GPU time on fake Ray GPUs", "workload": WORKLOAD,
        "candidates": args.candidates, "scale": args.scale, "host": platform.node(), "cpus": os.cpu_count(),
        "date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]), "rows": rows,
        "build_rows": build_rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    if rows:
        print("| measurement actors | wall s | speed-up | latency / energy measurements |")
        print("|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['actors']} | {row['wall_s']:.1f} | {row['speedup']:.2f}x | {row['trials']} / "
              f"{row['energy_measurements']} |")
    if build_rows:
        print("\n| build workers (Ray CPUs) | wall s | speed-up | built |")
        print("|---:|---:|---:|---:|")
        for row in build_rows:
            print(f"| {row['build_workers']} | {row['wall_s']:.1f} | {row['speedup']:.2f}x | {row['built']}/{row['builds']} |")


if __name__ == "__main__":
    main()
