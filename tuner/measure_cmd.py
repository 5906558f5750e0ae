"""``etune measure``: measure one candidate from a records database, or a vendor reference.

    etune measure --db runs.db --candidate 17 --kind both --backend nvml
    etune measure --vendor gemm:4096,4096,4096 --kind energy --db runs.db

A candidate is re-created from its stored trace (``ScheduleSpace.from_trace_json``), built (nvcc, the
build cache under ``--workdir`` is reused), measured and recorded in the database. A vendor reference
(torch.matmul / torch.softmax / SDPA) is recorded with ``candidate_id`` NULL and details
``{"vendor": ...}``. Register it in the CLI with ``app.command("measure")(measure_command)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from etune.measurements.backend import record_result

from .console import console, fail, records_db



KIND_CHOICES = ("latency", "energy", "both")


def _kinds(kind: str) -> list[str]:
    if kind not in KIND_CHOICES:
        fail(f"--kind must be one of {', '.join(KIND_CHOICES)}, not {kind!r}")
    return ["latency", "energy"] if kind == "both" else [kind]


def _resolve_backend_name(name: str) -> str:
    if name not in ("auto", "nvml", "sim") and not name.startswith("replay:"):
        fail(f"unknown backend {name!r} (choose auto, nvml, sim or replay:DATASET)")
    if name == "auto":
        from etune.measurements.nvml_energy import nvml_available

        return "nvml" if nvml_available() else "sim"
    return name


def _make_backend(name: str, target: str, device: int):
    from etune.measurements import BackendError, make_backend

    resolved = _resolve_backend_name(name)
    options = {"device_index": device} if resolved == "nvml" else {}
    try:
        return make_backend(resolved, gpu=target, **options)
    except BackendError as exc:
        fail(str(exc))
    except ImportError as exc:
        fail(f"the {resolved} backend cannot be loaded: {exc}")


def _find_candidate(records, candidate_id: int):
    candidate = records.candidate(candidate_id)
    if candidate is None:
        return None, None
    return next(w for w in records.workloads() if w.id == candidate.workload_id), candidate


def _format_value(kind: str, value: float | None) -> str:
    if value is None:
        return "-"
    if kind == "latency":
        return f"{value * 1e6:.2f} us" if value < 1e-3 else f"{value * 1e3:.3f} ms"
    return f"{value * 1e3:.3f} mJ"


def _format_optional(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def _print_results(title: str, backend_name: str, device, results) -> None:
    table = Table(title=f"{title}\nbackend: {backend_name}, device: {device.name}")
    for column in ("kind", "ok", "value/call", "spread", "avg power", "idle", "notes"):
        table.add_column(column, no_wrap=column != "notes")
    for result in results:
        d = result.details or {}
        if result.ok:
            notes = []
            if result.kind == "energy" and "method" in d:
                windows = d.get("windows") or []
                count = len(windows) if isinstance(windows, (list, tuple)) else windows
                notes.append(f"{d.get('method', '?')}, {count} windows, "
                             f"{'converged' if d.get('converged') else 'NOT converged'}")
                if d.get("energy_above_idle_j") is not None:
                    notes.append(f"above idle {d['energy_above_idle_j'] * 1e3:.3f} mJ")
            else:
                if d.get("min_s") is not None:
                    notes.append(f"min {_format_value('latency', d['min_s'])}")
            if d.get("rel_err") is not None:
                notes.append(f"rel err {d['rel_err']:.2g}")
            note = "; ".join(notes)
        else:
            note = result.error or "failed"
        table.add_row(
            result.kind, "yes" if result.ok else "[red]no[/]",
            _format_value(result.kind, result.value if result.ok else None),
            _format_optional(result.spread, "{:.2%}"),
            _format_optional(d.get("avg_power_w"), "{:.0f} W"),
            _format_optional(d.get("idle_power_w"), "{:.0f} W"),
            escape(note),
        )
    console.print(table)
    if backend_name == "sim":
        console.print("backend: sim (analytic GPU model, not a hardware measurement)", highlight=False)


def _record(records, workload_id: int, candidate_id: int | None, backend, device, result) -> int:
    return record_result(records, result, workload_id=workload_id, backend=backend.name, device=device,
                         candidate_id=candidate_id)


def _report(title: str, backend_name: str, info, results, json_out: Path | None, about: dict) -> None:
    """The table, the optional JSON file, and exit status 1 when any measurement failed."""
    _print_results(title, backend_name, info, results)
    if json_out is not None:
        payload = {**about, "backend": backend_name, "device": dataclasses.asdict(info),
                   "results": [dataclasses.asdict(r) for r in results]}
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(payload, indent=2, default=str))
        except OSError as exc:
            fail(f"cannot write {json_out}: {exc.strerror} (the measurements are recorded)", code=1)
    if not all(r.ok for r in results):
        raise typer.Exit(1)


def measure_command(
    db: Optional[Path] = typer.Option(None, "--db", help="Records database (SQLite)."),
    candidate: Optional[int] = typer.Option(None, "--candidate", help="Id of a candidate in --db."),
    vendor: Optional[str] = typer.Option(
        None, "--vendor", help="Measure the vendor reference of this workload instead, e.g. gemm:4096,4096,4096."),
    kind: str = typer.Option("both", "--kind", help="latency, energy or both."),
    backend: str = typer.Option("auto", "--backend", help="auto (nvml when a GPU answers, else sim), nvml, sim or "
                                "replay:DATASET (recorded measurements)."),
    target: str = typer.Option("h100", "--target", help="GPU target preset the candidate is built for."),
    device: int = typer.Option(0, "--device", min=0, help="GPU index (NVML numbering) for the nvml backend."),
    build: Optional[bool] = typer.Option(
        None, "--build/--no-build", help="Build the candidate with nvcc (default: for nvml, which runs it; sim does not need it)."),
    workdir: Path = typer.Option(Path(".etune/builds"), help="Build artifacts and cache."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
) -> None:
    """Measure one candidate of a records database (or a vendor reference) and record the result."""
    kinds = _kinds(kind)
    if json_out is not None and json_out.is_dir():  # found out before measuring, not after
        fail(f"--json {json_out} is a directory; give a file name, e.g. {json_out / 'measure.json'}")
    if (candidate is None) == (vendor is None):
        fail("give exactly one of --candidate ID (with --db) or --vendor SPEC")
    if candidate is not None:
        if db is None:
            fail("--candidate needs --db FILE, the records database that holds it")
        _measure_candidate(db, candidate, kinds, backend, target, device, build, workdir, json_out)
    else:
        _measure_vendor(vendor, db, kinds, backend, target, device, json_out)


def _measure_candidate(db: Path, candidate_id: int, kinds, backend_name, target, device, build, workdir,
                       json_out) -> None:
    from etune.kernels import WorkloadError, parse_spec
    from etune.search_space import TargetError, gpu_spec


    try:
        gpu = gpu_spec(target)
    except TargetError as exc:
        fail(str(exc))
    with records_db(db, create=False) as records:
        stored_workload, stored = _find_candidate(records, candidate_id)
        if stored is None:
            fail(f"no candidate {candidate_id} in {db}")
        try:
            workload = parse_spec(stored_workload.spec)
        except WorkloadError as exc:
            fail(f"candidate {candidate_id}: {exc}")
        backend = _make_backend(backend_name, target, device)
        try:
            from etune.search_space import Builder, ScheduleSpace
            from etune.search_space.space import TVM_ERRORS

            with console.status(f"replaying candidate {candidate_id} of {workload.spec}"):
                try:
                    cand = ScheduleSpace(workload, gpu).from_trace_json(stored.trace, stored.design_space)
                except TVM_ERRORS + (json.JSONDecodeError,) as exc:
                    fail(f"candidate {candidate_id} does not replay on {workload.spec}: "
                         f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}",
                         code=1)
            if cand.structural_hash != stored.structural_hash:
                console.print(f"[yellow]note[/] candidate {candidate_id} replays to structural hash "
                              f"{cand.structural_hash}, stored {stored.structural_hash} (another TVM?)",
                              highlight=False)
            if backend.name == "replay":  # it answers for its recorded schedules only: say so, record nothing
                from etune.measurements.backend import BackendError

                try:
                    pool = backend.recorded_pool(workload.spec)
                except BackendError as exc:
                    fail(str(exc))
                if cand.structural_hash not in {h for _, _, h in pool.entries}:
                    fail(f"candidate {candidate_id} ({cand.structural_hash}) is not in the replay dataset "
                         f"{backend.dataset.path}")
            builds = None
            if build if build is not None else backend.name == "nvml":
                with console.status(f"building candidate {candidate_id} for {gpu.name} ({gpu.arch})"):
                    result = Builder(gpu, workdir=workdir, jobs=1).build([cand])[0]
                if not result.ok:
                    console.print(f"[red]build {escape(result.status)}[/] {escape(result.error or '')}",
                                  highlight=False)
                builds = [result]
            elif backend.name == "nvml":
                fail("the nvml backend runs the built kernel: drop --no-build")
            info = backend.device()
            results = []
            for kind in kinds:
                with console.status(f"measuring {kind} of candidate {candidate_id} on {info.name}"):
                    result = backend.measure([cand], kind, builds=builds)[0]
                _record(records, stored_workload.id, stored.id, backend, info, result)
                results.append(result)
            info = backend.device()  # idle power is known once energy was measured
        finally:
            backend.close()
    _report(f"candidate {candidate_id} of {workload.spec}", backend.name, info, results, json_out,
            {"candidate_id": candidate_id, "workload": workload.spec})


def _measure_vendor(spec: str, db: Optional[Path], kinds, backend_name, target, device, json_out) -> None:
    from etune.kernels import WorkloadError, parse_spec
    from etune.measurements.vendor import VendorError, vendor_name


    try:
        workload = parse_spec(spec)
    except WorkloadError as exc:
        fail(str(exc))
    try:
        name = vendor_name(workload)
    except VendorError as exc:
        fail(str(exc))
    with records_db(db) if db is not None else contextlib.nullcontext() as records:  # refused before measuring
        backend = _make_backend(backend_name, target, device)
        try:
            info = backend.device()
            results = []
            for kind in kinds:
                with console.status(f"measuring {kind} of {name} at {workload.spec} on {info.name}"):
                    try:
                        result = backend.measure_vendor(workload, kind)
                    except VendorError as exc:
                        fail(str(exc))
                result.details = dict(result.details or {})
                result.details.setdefault("vendor", name)
                results.append(result)
            info = backend.device()
        finally:
            backend.close()
        if records is not None:
            workload_id = records.add_workload(workload.spec, workload.family, workload.params)
            for result in results:
                _record(records, workload_id, None, backend, info, result)
    _report(f"{name} at {workload.spec}", backend.name, info, results, json_out,
            {"vendor": name, "workload": workload.spec})
