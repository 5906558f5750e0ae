"""``etune export`` and ``etune verify``: typer-compatible command functions (registered in tuner.cli).

    etune export --db etune.db --objective energy@0.05 --out kernels/ [--format library|metaschedule|both]
    etune verify kernels/
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .console import console, fail
from .objectives import HELP as OBJECTIVE_HELP


def export_command(
    db: Path = typer.Option(Path("etune.db"), help="Records database."),
    objective: str = typer.Option("energy", help=OBJECTIVE_HELP),
    out: Path = typer.Option(Path("etune-kernels"), "--out", "-o", help="Output directory."),
    backend: Optional[str] = typer.Option(
        None, help="Use this backend's measurements (nvml or sim); default: the only one, or the hardware one."),
    target: str = typer.Option("h100", help="GPU target preset to compile for: h100, h200, a100, or local (NVML)."),
    format: str = typer.Option(
        "library", help="library (one shared library + manifest.json + CUDA sources), metaschedule "
                        "(TVM MetaSchedule JSON database) or both."),
    workloads: Optional[List[str]] = typer.Argument(None, help="Only these workloads (default: all in --db)."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier etune export in --out."),
    allow_unconverged: bool = typer.Option(
        False, "--allow-unconverged", help="Let a schedule whose energy measurement did not converge (spread above "
                                           "target at the window cap) be the winner; the manifest says so."),
) -> None:
    """Export the best schedule of every tuned workload under an objective: a kernel library and/or a
    MetaSchedule database."""
    from rich.markup import escape
    from rich.table import Table

    from .export import ExportError, export

    try:
        with console.status(f"rebuilding the best schedules from {db} and writing {format} into {out}"):
            manifest, ms_summary = export(db, objective, out, format, backend=backend, gpu=target,
                                          workloads=workloads, force=force, allow_unconverged=allow_unconverged)
    except ExportError as exc:
        fail(str(exc))

    if manifest is not None:
        table = Table(title=f"{out}: best under {manifest['objective']} for {manifest['target']['arch']}",
                      title_justify="left")
        for column in ("function", "workload", "schedule", "latency us", "energy mJ", "measured on"):
            table.add_column(column, justify="right" if column in ("latency us", "energy mJ") else "left")
        for k in manifest["kernels"]:
            m = k["measurements"]
            where = "sim (model)" if k["simulated"] else f"{m['backend']} ({m['device_name'] or '?'})"
            energy = f"{k['energy_j'] * 1e3:.3f}" if k["energy_j"] is not None else "-"
            table.add_row(k["name"], k["spec"], k["structural_hash"], f"{k['latency_s'] * 1e6:.2f}", energy, where)
        console.print(table)
        library = out / manifest["library"]
        if manifest["runnable"]:
            console.print(f"library: {escape(str(library))} (load with kernels.load_library)", highlight=False)
        else:
            console.print(f"library: {escape(str(library))} [bold yellow]not runnable[/]: exported with a TVM "
                          "without CUDA (CUDA source only, checked with nvcc); export on a GPU host to run it",
                          highlight=False)
        console.print(f"manifest: {escape(str(out / 'manifest.json'))}; CUDA sources in "
                      f"{escape(str(out / 'kernels'))}", highlight=False)
        if manifest["simulated"]:
            console.print("[bold yellow]simulated[/]: the latency and energy figures come from the sim backend "
                          "(a model), not from hardware", highlight=False)
    if ms_summary is not None:
        records = sum(w["records"] for w in ms_summary["workloads"])
        console.print(f"MetaSchedule database: {escape(ms_summary['path_workload'])}, "
                      f"{escape(ms_summary['path_tuning_record'])} ({len(ms_summary['workloads'])} workloads, "
                      f"{records} records; load with JSONDatabase(work_dir={escape(str(out))!r}) after "
                      "import tvm.s_tir.tensor_intrin.cuda)", highlight=False)
        if any(w["simulated"] for w in ms_summary["workloads"]) and manifest is None:
            console.print("[bold yellow]simulated[/]: run_secs come from the sim backend (a model), not hardware",
                          highlight=False)


def verify_command(
    directory: Path = typer.Argument(..., help="An exported kernel library (the --out of etune export)."),
    seed: int = typer.Option(0, help="Seed of the random inputs."),
) -> None:
    """Run every kernel of an exported library on the GPU with random inputs and check it against its
    numpy reference; exits non-zero on any mismatch."""
    import numpy as np
    from rich.markup import escape
    from rich.table import Table

    from etune.kernels import LibraryError, WorkloadError, load_library, parse_spec

    try:
        library = load_library(directory)
    except LibraryError as exc:
        fail(str(exc))
    import tvm

    device = tvm.cuda(0)
    try:
        present = device.exist
    except Exception:  # no CUDA device API in this TVM
        present = False
    if not present:
        fail("etune verify runs the kernels and needs an NVIDIA GPU; none was found")

    table = Table(title=f"{directory}: kernels against their references on {device.device_name}",
                  title_justify="left")
    for column in ("function", "workload", "result", "rel. error", "tolerance"):
        table.add_column(column, justify="right" if column in ("rel. error", "tolerance") else "left")
    failures = 0
    for i, kernel in enumerate(library):
        try:
            workload = parse_spec(kernel.spec)
        except WorkloadError as exc:
            failures += 1
            table.add_row(kernel.name, kernel.spec, f"[red]error[/] {escape(str(exc))}", "-", "-")
            continue
        expected = [(t["name"], tuple(t["shape"]), t["dtype"]) for t in kernel.inputs + kernel.outputs]
        if expected != [(t.name, tuple(t.shape), t.dtype) for t in workload.args]:
            failures += 1
            table.add_row(kernel.name, kernel.spec, "[red]error[/] manifest arguments differ from the workload's",
                          "-", "-")
            continue
        try:
            inputs = workload.random_inputs(seed + i)
            # Outputs start as NaN, so an element the kernel never writes fails the check.
            outputs = [np.full(t.shape, np.nan, dtype=t.dtype) for t in workload.outputs]
            args = [tvm.runtime.tensor(a, device) for a in (*inputs, *outputs)]
            kernel(*args)
            device.sync()
            ok, error = workload.check([a.numpy() for a in args[len(inputs):]], workload.reference(inputs))
        except Exception as exc:  # a launch failure, a fault: reported per kernel
            failures += 1
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            table.add_row(kernel.name, kernel.spec, f"[red]error[/] {escape(reason[:200])}", "-", "-")
            continue
        failures += not ok
        table.add_row(kernel.name, kernel.spec, "ok" if ok else "[red]MISMATCH[/]", f"{error:.2e}",
                      f"{workload.rel_tolerance:.1e}")
    console.print(table)
    console.print(f"{len(library) - failures}/{len(library)} kernels match their reference", highlight=False)
    if failures:
        raise typer.Exit(1)
