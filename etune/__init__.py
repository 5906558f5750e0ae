"""etune: energy-aware GPU kernel autotuning on TVM MetaSchedule, from Python.

    import etune

    run = etune.tune("softmax:4096,4096", objective="energy@0.05", backend="sim", storage="runs.db",
                     trials=64)
    run.best            # the winner under the objective: measured latency (s) and energy (J) per call
    run.pareto()        # the run's measured energy/latency Pareto front
    run.frame()         # one row per candidate the run measured (pandas)
    etune.report("runs.db")                 # what `etune report --format json` prints
    lib = etune.load_library("lib/")        # an `etune export`: kernels callable with torch/CuPy tensors
    etune.suite()                           # the benchmark suite's workloads by name

Everything here is a thin layer over the subpackages (``etune.tuner``, ``etune.measurements``,
``etune.kernels``, ``etune.search_space``, ``etune.energy_model``);
the command line (``etune tune ...``) and this API take the same objective spellings and specs.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

# The subpackages (etune.kernels, etune.tuner, ...) live beside this folder in a source checkout (the
# repository's layout) and inside it once installed (pyproject's package-dir). In a checkout used
# without installing it (PYTHONPATH=repo, as on the device machine), look for them beside it too.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_checkout, "pyproject.toml")) and os.path.isdir(os.path.join(_checkout, "tuner")):
    __path__.append(_checkout)  # noqa: F821 - a package's __path__

__all__ = ["Run", "load_library", "report", "suite", "tune"]


@dataclasses.dataclass
class Run:
    """One tuning run of one workload, as it stands after ``tune`` returned (the records database
    holds every measurement; running ``tune`` again with the same arguments resumes it)."""

    spec: str
    objective: str  # its label: latency, edp, energy@0.05, energy@none
    backend: str  # nvml, sim or replay
    storage: Path
    run_id: int
    stopped_by: str  # trials | energy | time | interrupted | exhausted
    trials: int
    energy_measurements: int

    @property
    def best(self):
        """The best measured point under the objective (tuner.objectives.Point: ``key`` is the
        candidate id; ``latency_s``, ``energy_j`` per call), or None when nothing was measured."""
        from etune.tuner.objectives import Objective, best

        return best(self._points(), Objective.parse(self.objective))

    def pareto(self) -> list:
        """The measured energy/latency Pareto front of the run, fastest first."""
        from etune.tuner.objectives import pareto_front

        return pareto_front(self._points())

    def frame(self):
        """One row per candidate the run measured (``tuner.analysis.records_frame`` of this run)."""
        from etune.tuner.analysis import records_frame

        df = records_frame(self.storage)
        return df[df["run_id"] == self.run_id].reset_index(drop=True)

    def _points(self) -> list:
        from etune.measurements.records import RecordsDB

        with RecordsDB.open(self.storage, readonly=True) as db:
            (workload,) = [w for w in db.workloads() if w.spec == self.spec]
            return db.points(workload.id, self.backend, run_id=self.run_id)


def tune(spec: str | list[str], objective: str = "energy@0.05", backend: str = "auto",
         storage: str | Path = "etune.db", *, trials: int = 64, energy_measurements: int | None = None,
         time_budget_s: float | None = None, target: str = "h100", seed: int = 0, strategy: str = "genetic",
         build: bool = True, batch: int = 16, jobs: int | None = None, workdir: str | Path | None = None, log=None,
         cluster: str | None = None) -> Run | list[Run]:
    """Tune one workload and return the run (with ``cluster``, several at once: a list of specs gives
    a list of runs).

    Args:
        spec: the workload, e.g. ``"gemm:1,4096,4096"``, ``"softmax:4096,4096"``,
            ``"attention:8,32,1,4096,128"`` (``etune kernels`` lists the syntax).
        objective: ``latency``, ``energy`` (least energy), ``energy@0.05`` (least energy within 5 %
            of the fastest schedule found), or ``edp``.
        backend: ``nvml`` (the GPU), ``sim`` (an analytic GPU: model outputs), ``replay:PATH`` (a
            recorded dataset), or ``auto`` (the GPU when NVML finds one, else sim).
        storage: the SQLite records database; the same call resumes an interrupted run.
        trials: candidates measured for latency (over all resumes).
        energy_measurements: energy measurements (default 15 % of the trials, at least 3).
        time_budget_s: seconds for this call.
        target: the GPU preset to build for (``h100``, ``h200``, ``a100``, ``local``).
        seed: makes a run repeat.
        strategy: the search: ``genetic`` (model-guided) or ``random`` (a baseline).
        build: build candidates with nvcc (``False``: sim only, no register counts).
        batch: candidates built and measured per generation.
        jobs: parallel builds (default: the CPU count).
        workdir: build artifacts and cache.
        log: a callable taking one line of progress text.
        cluster: tune on a Ray cluster (``pip install 'etune[ray]'``): ``"ray"`` (start or attach a
            local one), ``"ray://HOST:PORT"`` or ``"auto"``; builds run on its CPUs, measurements on
            one actor per GPU, and the workloads are tuned at once.

    Returns:
        A ``Run``: ``best``, ``pareto()``, ``frame()``.
    """
    storage = Path(storage)
    settings = dict(trials=trials, energy_measurements=energy_measurements, time_budget_s=time_budget_s, seed=seed,
                    strategy=strategy, target=target, build=build, batch=batch, jobs=jobs,
                    workdir=None if workdir is None else Path(workdir))
    specs = [spec] if isinstance(spec, str) else list(spec)
    if cluster is not None:
        from etune.tuner.cluster import tune_on_cluster

        statuses = tune_on_cluster(specs, objective, backend, storage, cluster=cluster, log=log, **settings)
    elif len(specs) == 1:
        from etune.tuner.search import tune as run_tuner

        statuses = [run_tuner(specs[0], objective, backend=backend, db=storage, log=log, **settings)]
    else:
        raise ValueError("several workloads at once need a cluster (cluster='ray'); else tune them one by one")
    runs = [Run(s.workload, s.objective, s.backend, storage, s.run_id, s.stopped_by, s.trials, s.energy_measurements)
            for s in statuses]
    return runs[0] if isinstance(spec, str) else runs


def report(storage: str | Path = "etune.db", specs: list[str] | None = None, backend: str | None = None) -> dict:
    """Best point per tuned objective, Pareto front, vendor reference and counts per workload and
    backend: the document ``etune report --format json`` prints."""
    from etune.measurements.records import RecordsDB
    from etune.tuner.report import report as make_report

    with RecordsDB.open(storage, readonly=True) as db:
        return make_report(db, specs=specs, backend=backend)


def load_library(directory: str | Path):
    """An exported kernel library (``etune export``): ``lib["gemm:4096,4096,4096"](a, b, c)``."""
    from etune.kernels import load_library as load

    return load(directory)


def suite() -> dict:
    """The benchmark suite's workloads by name (``kernels.suite``)."""
    from etune.kernels import suite as workloads

    return workloads()
