"""The ``etune`` command line."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .console import console, err_console, fail, records_db
from .export_cmd import export_command, verify_command
from .measure_cmd import measure_command
from .objectives import HELP as OBJECTIVE_HELP

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="etune: energy-aware GPU kernel autotuning on TVM MetaSchedule.")

def _workloads(specs: List[str]):
    from etune.kernels import WorkloadError, parse_spec

    try:
        return [parse_spec(s) for s in specs]
    except WorkloadError as exc:
        fail(str(exc))


def _gpu(name: str):
    from etune.search_space import TargetError, gpu_spec

    try:
        return gpu_spec(name)
    except TargetError as exc:
        fail(str(exc))


@app.command("kernels")
def list_kernels() -> None:
    """List the benchmark suite and the spec syntax."""
    from etune.kernels import FAMILIES, suite

    table = Table(title="etune benchmark suite (fp16)")
    for column in ("name", "spec", "GFLOP", "min MB"):
        table.add_column(column, justify="right" if column in ("GFLOP", "min MB") else "left")
    for name, w in suite().items():
        table.add_row(name, w.spec, f"{w.flops / 1e9:.2f}", f"{w.min_bytes / 1e6:.1f}")
    console.print(table)
    console.print("Spec syntax: " + "   ".join(f.usage for f in FAMILIES.values()), highlight=False, markup=False)


@app.command("space")
def space(
    specs: List[str] = typer.Argument(..., help="Workloads, e.g. gemm:4096,4096,4096 softmax:4096,4096"),
    target: str = typer.Option("h100", help="GPU target preset: h100, h200, a100, or local (NVML)."),
    samples: int = typer.Option(32, min=1, help="Distinct valid schedules to sample per workload."),
    build: bool = typer.Option(True, help="Build every sampled schedule to a CUDA cubin."),
    jobs: Optional[int] = typer.Option(None, min=1, help="Parallel builds (default: CPU cores)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    workdir: Path = typer.Option(Path(".etune/builds"), help="Build artifacts and cache."),
) -> None:
    """Sample valid schedules of each workload and build them: the build success rate per workload."""
    from etune.search_space import Builder, SamplingError, ScheduleSpace

    workloads = _workloads(specs)
    gpu = _gpu(target)
    builder = Builder(gpu, workdir=workdir, jobs=jobs)
    table = Table(title=f"schedule spaces on {gpu.name} ({gpu.arch})")
    for column in ("workload", "spaces", "sampled", "sample s", "built", "rate", "build s/cand"):
        table.add_column(column, no_wrap=True)
    failures_seen: list[str] = []
    worst_rate = 1.0
    for workload in workloads:
        started = time.perf_counter()
        try:
            space_ = ScheduleSpace(workload, gpu, seed=seed)
            with console.status(f"sampling {samples} schedules of {workload.spec}"):
                candidates = space_.sample(samples, seed=seed)
        except SamplingError as exc:
            fail(str(exc), code=1)
        sample_s = time.perf_counter() - started
        for note in space_.notes:
            console.print(f"[yellow]note[/] {workload.spec}: {escape(note)}", highlight=False)
        built_text, rate_text, per_candidate = "-", "-", "-"
        if build and candidates:
            with _progress() as progress:
                task = progress.add_task(f"building {workload.spec}", total=len(candidates))
                results = builder.build(candidates, progress=lambda _r: progress.advance(task))
            ok = sum(r.ok for r in results)
            worst_rate = min(worst_rate, ok / len(results))
            built_text = f"{ok}/{len(results)}"
            rate_text = f"{100 * ok / len(results):.0f}%"
            fresh = [r.seconds for r in results if r.ok and not r.cached]
            per_candidate = f"{statistics.median(fresh):.1f}" if fresh else "cached"
            failures_seen += [f"{workload.spec}: {r.error or r.status}" for r in results if not r.ok]
        table.add_row(workload.spec, str(len(space_.design_spaces)), f"{len(candidates)}/{samples}",
                      f"{sample_s:.1f}", built_text, rate_text, per_candidate)
    console.print(table)
    for failure in failures_seen:
        console.print(f"[red]build failed[/] {escape(failure)}", highlight=False)
    if build and worst_rate < 0.9:
        raise typer.Exit(1)


def _objective(text: str, max_slowdown: str | None = None):
    from .objectives import Objective, ObjectiveError

    try:
        return Objective.parse(text, max_slowdown)
    except ObjectiveError as exc:
        fail(f"bad objective: {exc}")


def _announce_backend(name: str, target: str):
    """Make the backend and say which one it is on the first line: sim figures never pass as GPU ones."""
    from etune.measurements import BackendError, make_backend
    from etune.measurements.nvml_energy import nvml_available

    if name not in ("auto", "nvml", "sim") and not name.startswith("replay:"):
        fail(f"unknown backend {name!r} (choose auto, nvml, sim or replay:DATASET)")
    try:
        backend = make_backend(name, gpu=target if target != "local" else "h100")
    except BackendError as exc:
        fail(str(exc))
    device = backend.device()
    if backend.name == "sim":
        why = "no NVIDIA GPU found by NVML" if name == "auto" and not nvml_available() else "as asked"
        console.print(f"backend: [bold]sim[/] (simulated {escape(device.name.removeprefix('sim:'))}; {why}): "
                      "figures are model outputs, not measurements", highlight=False)
    elif backend.name == "replay":
        console.print(f"backend: [bold]replay[/] of {escape(device.details['dataset'])} "
                      f"({escape(device.details['recorded_backend'] or '?')} measurements of "
                      f"{escape(device.name.split(':', 2)[-1])}, recorded {device.details['recorded_on']}): "
                      "recorded values with their recorded spread as noise", highlight=False)
    else:
        console.print(f"backend: [bold]nvml[/] ({escape(device.name)}, driver {device.driver})", highlight=False)
    return backend


def _status_line(status) -> str:
    def fmt(point):
        if point is None:
            return "-"
        energy = f"{point.energy_j * 1e3:.3g} mJ" if point.energy_j is not None else "energy ?"
        return f"{point.latency_s * 1e6:.1f} us, {energy}"

    return (f"{status.workload} [{status.objective}] gen {status.generation}  best {fmt(status.best)}  "
            f"fastest {fmt(status.fastest)}  energy meas {status.energy_measurements}/{status.energy_budget}")


@app.command("tune")
def tune(
    specs: List[str] = typer.Argument(..., help="Workloads, e.g. gemm:4096,4096,4096 softmax:4096,4096"),
    objective: str = typer.Option("energy", help=OBJECTIVE_HELP),
    max_slowdown: Optional[str] = typer.Option(
        None, help="Another spelling of energy@S: the allowed slowdown over the fastest schedule found, e.g. "
                   "0.05 (the default), or none."),
    backend: str = typer.Option("auto", help="nvml (the GPU), sim (analytic GPU), replay:DATASET (recorded "
                                "measurements, e.g. data/hw/*.jsonl.gz), auto: the GPU if NVML finds one."),
    db: Path = typer.Option(Path("etune.db"), help="Records database (SQLite); the same command resumes."),
    trials: int = typer.Option(64, min=1, help="Candidates measured for latency per workload."),
    energy_measurements: Optional[int] = typer.Option(
        None, min=0, help="Energy measurements per workload (default 15 % of trials, at least 3)."),
    time_budget: Optional[float] = typer.Option(None, min=1, help="Seconds for this invocation, all workloads."),
    target: str = typer.Option("h100", help="GPU target preset: h100, h200, a100, or local (NVML)."),
    batch: int = typer.Option(16, min=1, help="Candidates built and measured per generation."),
    seed: int = typer.Option(0),
    strategy: str = typer.Option("genetic", help="Search strategy: genetic (model-guided, the default) or random."),
    build: bool = typer.Option(True, help="Build candidates with nvcc (--no-build: sim only)."),
    jobs: Optional[int] = typer.Option(None, min=1, help="Parallel builds (default: CPU cores)."),
    workdir: Path = typer.Option(Path(".etune/builds"), help="Build artifacts and cache."),
    cluster: Optional[str] = typer.Option(
        None, help="Tune the workloads at once on a Ray cluster (pip install 'etune[ray]'): ray (start or attach "
                   "a local one), ray://HOST:PORT, or auto. Builds run on its CPUs, measurements on its GPUs."),
) -> None:
    """Tune workloads for an objective; every measurement goes to --db as it is taken, and the same
    command resumes a run that was interrupted (Ctrl-C, SIGTERM) or killed."""
    import signal

    from etune.measurements.backend import BackendError
    from etune.search_space import interrupts

    from .search import TuneSettings, Tuner
    from .strategy import STRATEGIES

    workloads = _workloads(specs)
    _gpu(target)  # a bad target fails here, in one line
    goal = _objective(objective, max_slowdown)
    if strategy not in STRATEGIES:
        fail(f"unknown search strategy {strategy!r} (choose {', '.join(STRATEGIES)})")
    deadline = None if time_budget is None else time.monotonic() + time_budget
    summaries = []
    with records_db(db) as records, interrupts.stop_on(signal.SIGINT, signal.SIGTERM):
        chosen = _announce_backend(backend, target) if cluster is None else _cluster_backend(cluster, backend, target)
        try:
            if not build and chosen.name == "nvml":
                fail("--no-build is for the sim backend only: a GPU runs built kernels")
            for workload in workloads:  # a replayed dataset answers only for its own workloads: say so up front
                try:
                    chosen.recorded_pool(workload.spec)
                except BackendError as exc:
                    fail(str(exc))
            if cluster is not None:
                summaries = _tune_on_cluster(workloads, goal, chosen, db, TuneSettings(
                    trials=trials, energy_measurements=energy_measurements, time_budget_s=time_budget, batch=batch,
                    seed=seed, strategy=strategy, target=target, build=build, jobs=jobs, workdir=workdir))
                workloads = []  # tuned
            for workload in workloads:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                settings = TuneSettings(trials=trials, energy_measurements=energy_measurements, time_budget_s=left,
                                        batch=batch, seed=seed, strategy=strategy, target=target, build=build,
                                        jobs=jobs, workdir=workdir)
                with _progress() as progress:
                    task = progress.add_task(f"{workload.spec}: design spaces", total=trials)

                    def show(status, task=task, progress=progress):
                        progress.update(task, completed=status.trials, description=escape(_status_line(status)))

                    with console.status(f"generating design spaces of {workload.spec}"):
                        tuner = Tuner(workload.spec, goal, chosen, records, settings, on_status=show,
                                      log=lambda m: console.print(escape(m), highlight=False))
                    status = tuner.run()
                summaries.append(status)
                console.print(escape(_status_line(status)) + f"  stopped by {status.stopped_by}", highlight=False)
                if status.stopped_by == "interrupted":
                    raise KeyboardInterrupt
        except BaseException as exc:
            # Ctrl-C or SIGTERM: in a run (which recorded it), while making design spaces, or
            # turned into another error by TVM on its way through a callback.
            if not isinstance(exc, KeyboardInterrupt) and interrupts.received() is None:
                raise
            signum = interrupts.received() or signal.SIGINT
            how = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted (Ctrl-C)"
            err_console.print(f"{how}: what was measured is kept in {escape(str(db))}; the same command resumes "
                              "the run", highlight=False, soft_wrap=True)
            raise typer.Exit(128 + signum)
        finally:
            chosen.close()
    console.print(f"records in {db}; see: etune report --db {db}", highlight=False)
    unmeasured = [f"{s.workload} (stopped by {s.stopped_by})" for s in summaries if s.fastest is None]
    if unmeasured:
        fail(f"no schedule was measured for {', '.join(unmeasured)}", code=1)


def _cluster_backend(address: str, backend: str, target: str):
    """Connect to the Ray cluster and start a measurement actor on each of its GPUs; say where."""
    from etune.measurements import BackendError

    from .cluster import ClusterBackend, ClusterError, connect

    try:
        with console.status(f"connecting to the Ray cluster ({address}) and starting measurement actors"):
            connect(address)
            chosen = ClusterBackend(backend, gpu=target if target != "local" else "h100",
                                    log=lambda m: console.print(escape(m), highlight=False))
    except (ClusterError, BackendError) as exc:
        fail(str(exc))
    device = chosen.device()
    note = ": figures are model outputs, not measurements" if chosen.name == "sim" else ""
    console.print(f"backend: [bold]{chosen.name}[/] ({escape(device.name)}) on {len(chosen.actors)} measurement actors "
                  f"of the Ray cluster{note}", highlight=False)
    return chosen


def _tune_on_cluster(workloads, goal, chosen, db: Path, settings) -> list:
    """Every workload at once (tuner.cluster.tune_workloads), one progress bar each."""
    from .cluster import tune_workloads

    with _progress() as progress:
        tasks = {w.spec: progress.add_task(f"{w.spec}: design spaces", total=settings.trials) for w in workloads}

        def show(status):
            progress.update(tasks[status.workload], completed=status.trials, description=escape(_status_line(status)))

        summaries = tune_workloads([w.spec for w in workloads], goal, chosen, db, settings, on_status=show,
                                   log=lambda m: console.print(escape(m), highlight=False))
    for status in summaries:
        console.print(escape(_status_line(status)) + f"  stopped by {status.stopped_by}", highlight=False)
    if any(s.stopped_by == "interrupted" for s in summaries):
        raise KeyboardInterrupt
    return summaries


@app.command("report")
def report(
    db: Path = typer.Option(Path("etune.db"), help="Records database."),
    specs: Optional[List[str]] = typer.Argument(None, help="Only these workloads."),
    backend: Optional[str] = typer.Option(None, help="Only this backend (nvml, sim or replay)."),
    objective: Optional[str] = typer.Option(None, help="Only runs tuned for this objective: " + OBJECTIVE_HELP),
    format: str = typer.Option("table", help="table or json."),
) -> None:
    """Best record per tuned objective, the energy/latency Pareto front and the vendor reference."""
    import json

    from .report import report as make_report

    if format not in ("table", "json"):
        fail(f"unknown format {format!r} (choose table or json)")
    goal = None if objective is None else _objective(objective)
    specs = [w.spec for w in _workloads(specs)] if specs else None
    with records_db(db, readonly=True) as records:
        document = make_report(records, specs=specs, backend=backend, objective=goal)
        if not document["workloads"]:  # say what was asked for and what there is, never a silent exit 0
            if not records.workloads():
                fail(f"{db} holds no records yet: tune something first (etune tune --db {db})", code=1)
            asked = [", ".join(specs or []), backend and f"backend {backend}", goal and f"runs tuned for {goal.label}"]
            there = [", ".join(w.spec for w in records.workloads()),
                     "backends " + ", ".join(sorted({m.backend for m in records.measurements()})),
                     "runs tuned for " + ", ".join(sorted({r.objective for r in records.runs()}) or ["nothing"])]
            fail(f"no records for {' and '.join(a for a in asked if a)} in {db} (it has {'; '.join(there)})", code=1)
    if format == "json":
        print(json.dumps(document, indent=2))
        return
    for entry in document["workloads"]:
        label = f"{entry['backend']} ({entry['device']})" + (": model outputs, not hardware" if entry["simulated"] else "")
        table = Table(title=f"{entry['workload']} on {label}", title_justify="left")
        for column in ("", "latency us", "energy mJ", "avg W", "energy measured"):
            table.add_column(column, justify="right" if column else "left")

        def row(name, point):
            if point is None:
                table.add_row(name, "-", "-", "-", "-")
                return
            e = point.get("energy_j")
            table.add_row(name, f"{point['latency_s'] * 1e6:.2f}", f"{e * 1e3:.3f}" if e is not None else "-",
                          f"{e / point['latency_s']:.0f}" if e is not None else "-",
                          ("yes" if point.get("energy_converged", True) else "yes, unconverged")
                          if point.get("energy_measured", e is not None) else "no")

        for objective, point in entry["best"].items():
            row(f"best {objective}", point)
        if entry["vendor"]:
            row(f"vendor {entry['vendor']['kernel']}", entry["vendor"])
        for i, point in enumerate(entry["pareto"]):
            row(f"pareto {i + 1}", point)
        console.print(table)
        counts = entry["counts"]
        console.print(f"{counts['candidates']} candidates, {counts['latency_measurements']} latency and "
                      f"{counts['energy_measurements']} energy measurements, {counts['failed']} failed",
                      highlight=False)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


# Commands defined in their own modules.

app.command("measure")(measure_command)
app.command("export")(export_command)
app.command("verify")(verify_command)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
