"""The ``etune`` command line."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="etune: energy-aware GPU kernel autotuning on TVM MetaSchedule.")
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """A user mistake: one readable line on stderr and a non-zero exit, never a traceback."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _workloads(specs: List[str]):
    from kernels import WorkloadError, parse_spec

    try:
        return [parse_spec(s) for s in specs]
    except WorkloadError as exc:
        fail(str(exc))


def _gpu(name: str):
    from search_space import TargetError, gpu_spec

    try:
        return gpu_spec(name)
    except TargetError as exc:
        fail(str(exc))


@app.command("kernels")
def list_kernels() -> None:
    """List the benchmark suite (DESIGN.md) and the spec syntax."""
    from kernels import FAMILIES, suite

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
    target: str = typer.Option("h100", help="GPU target preset: h100, a100, or local (NVML)."),
    samples: int = typer.Option(32, min=1, help="Distinct valid schedules to sample per workload."),
    build: bool = typer.Option(True, help="Build every sampled schedule to a CUDA cubin."),
    jobs: Optional[int] = typer.Option(None, min=1, help="Parallel builds (default: CPU cores)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    workdir: Path = typer.Option(Path(".etune/builds"), help="Build artifacts and cache."),
) -> None:
    """Sample valid schedules of each workload and build them: the build success rate per workload."""
    from search_space import Builder, SamplingError, ScheduleSpace

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


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
