"""Exports of a records database: a kernel library (one shared library and a manifest) and a
MetaSchedule JSON database.

The kernel library holds, per workload, the best candidate under one objective, rebuilt from its
stored trace and compiled with every other one into ``libetune_kernels.so`` (one TVM module, one
function per workload, named after the spec made identifier-safe). ``manifest.json`` says what each
function computes (spec, inputs, outputs), why it was chosen (objective, measured latency and energy,
backend and device of the measurements, ``simulated`` when they come from the sim backend), and how to
rebuild it (structural hash, schedule trace); ``kernels/<name>.cu`` is each kernel's CUDA source.
``kernels.load_library`` loads it.

The library is runnable only when TVM compiled the CUDA (a CUDA-enabled TVM runtime): a CPU-only TVM
keeps the CUDA as source, so the library it exports cannot launch anything. etune still compiles that
source with nvcc (search_space.build's helper) so the export is known to compile for the arch, and
says ``"runnable": false`` in the manifest; export on a GPU host to get a runnable library.

The MetaSchedule database (``database_workload.json`` and ``database_tuning_record.json``, the files
of ``tvm.s_tir.meta_schedule.database.JSONDatabase``) carries the same schedules as tuning records:
trace, run_secs (the latency measurements) and target, so TVM can apply them to the workloads'
PrimFuncs (``database.query_schedule`` / ``query_ir_module``, or a Relax build under the database).
MetaSchedule ranks records by mean run_secs only; a database exported for an objective other than
latency therefore holds just the chosen record per workload, so the one TVM picks is the one etune
chose.

An export is written into a new folder beside the output folder, which it then replaces by renames:
a failed export changes nothing. The output folder must be new, empty, or an earlier etune export
(``etune-export.json`` lists what that one wrote), replaced only when asked to (``--force``); etune
never deletes files it did not write.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from etune.kernels.library import FORMAT, FORMAT_VERSION, MANIFEST_FILE
from etune.measurements.backend import model_output
from etune.measurements.records import CandidateRow, RecordsDB, RecordsDBError, Run, WorkloadRow

from .objectives import Objective, ObjectiveError, Point, best

LIBRARY_FILE = "libetune_kernels.so"
SOURCES_DIR = "kernels"
MS_WORKLOAD_FILE = "database_workload.json"
MS_RECORD_FILE = "database_tuning_record.json"
# Every export lists the files it wrote here, so that a later export knows what it may replace.
MARKER_FILE = "etune-export.json"
MARKER_FORMAT = "etune-export"
FORMATS = ("library", "metaschedule", "both")

SIM_NOTE = ("latency and energy come from the simulated GPU (backend 'sim', an analytic model), "
            "not from a measurement on hardware")
NOT_RUNNABLE_NOTE = ("exported with a TVM that has no CUDA runtime: the library holds the CUDA source, not "
                     "a compiled binary, and cannot launch kernels. Export again on a GPU host with a "
                     "CUDA-enabled TVM to get a runnable library.")


class ExportError(RuntimeError):
    """An export cannot be made (empty database, unknown workload, nothing measured...): one line."""


# -- the database side ---------------------------------------------------------------------------
def measured_backends(db: RecordsDB, workload_id: int) -> list[str]:
    """Backends with at least one ok latency measurement of a candidate of the workload."""
    return sorted({m.backend for m in db.measurements(workload_id, kind="latency")
                   if m.ok and m.candidate_id is not None})


def kernel_name(spec: str) -> str:
    """The spec as a C identifier: ``gemm:64,64,64`` -> ``gemm_64_64_64``."""
    name = re.sub(r"[^0-9A-Za-z]+", "_", spec).strip("_")
    if not name or not name[0].isalpha():
        name = "k_" + name
    return name


@dataclasses.dataclass
class Selection:
    """The candidate chosen for one workload, with the measurements behind the choice."""

    workload: WorkloadRow
    name: str
    objective: Objective
    backend: str
    point: Point
    candidate: CandidateRow
    latency_samples: int
    energy_samples: int
    device_names: list[str]
    drivers: list[str]
    runs: list[Run]

    @property
    def simulated(self) -> bool:
        return model_output(self.backend, self.device_names)


def _objective(objective: Objective | str) -> Objective:
    if isinstance(objective, Objective):
        return objective
    try:
        return Objective.parse(objective)
    except ObjectiveError as exc:
        raise ExportError(f"bad objective {objective!r}: {exc}") from None


@contextmanager
def _open_db(db_path: str | Path) -> Iterator[RecordsDB]:
    """The records database, read-only; any problem with it is an ExportError (one line)."""
    try:
        with RecordsDB.open(db_path, readonly=True) as db:
            yield db
    except RecordsDBError as exc:
        raise ExportError(str(exc)) from None


def _wanted_workloads(db: RecordsDB, db_path, workloads: Sequence[str] | None) -> list[WorkloadRow]:
    rows = db.workloads()
    if not rows:
        raise ExportError(f"records database {db_path} has no workloads: tune something first (etune tune)")
    if not workloads:
        return rows
    from etune.kernels import WorkloadError, parse_spec

    by_spec = {r.spec: r for r in rows}
    chosen = []
    for spec in workloads:
        try:
            canonical = parse_spec(spec).spec
        except WorkloadError as exc:
            raise ExportError(str(exc)) from None
        if canonical not in by_spec:
            raise ExportError(f"workload {canonical} is not in {db_path}; it has: {', '.join(by_spec)}")
        if by_spec[canonical] not in chosen:
            chosen.append(by_spec[canonical])
    return chosen


def _pick_backend(db: RecordsDB, workload: WorkloadRow, backend: str | None) -> str:
    backends = measured_backends(db, workload.id)
    if not backends:
        raise ExportError(f"{workload.spec}: no candidate has an ok latency measurement")
    if backend is not None:
        if backend not in backends:
            raise ExportError(f"{workload.spec}: no ok latency measurement on backend {backend!r} "
                              f"(measured on: {', '.join(backends)})")
        return backend
    if len(backends) == 1:
        return backends[0]
    real = [b for b in backends if b != "sim"]
    if len(real) == 1:  # hardware measurements win over the simulator's
        return real[0]
    raise ExportError(f"{workload.spec} was measured on several backends ({', '.join(backends)}): "
                      "choose one with --backend")


def _select(db: RecordsDB, workload: WorkloadRow, objective: Objective, backend: str | None,
            allow_unconverged: bool = False) -> Selection:
    chosen_backend = _pick_backend(db, workload, backend)
    runs = db.runs(workload.id)
    tuned = sorted({r.objective for r in runs if r.backend == chosen_backend})
    if objective.label not in tuned:  # another objective's winner would pass for this one's
        raise ExportError(f"{workload.spec} has no run tuned for {objective.label} on {chosen_backend} (tuned for: "
                          f"{', '.join(tuned) or 'nothing'}): tune it with --objective {objective.label}, or export "
                          "an objective it was tuned for")
    points = db.points(workload.id, chosen_backend)
    point = best(points, objective, allow_unconverged)
    if point is None and best(points, objective, allow_unconverged=True) is not None:
        raise ExportError(f"{workload.spec}: every energy measurement on backend {chosen_backend!r} that could win "
                          "hit its window cap unconverged (spread above target); measure again on a quieter GPU, "
                          "or export them anyway with --allow-unconverged")
    if point is None:
        raise ExportError(f"{workload.spec}: no candidate has an ok energy measurement on backend "
                          f"{chosen_backend!r}, which objective {objective.label} needs "
                          "(export with --objective latency, or measure energy first)")
    candidate = db.candidate(point.key)
    mine = [m for m in db.measurements(workload.id, candidate_id=candidate.id)
            if m.ok and m.backend == chosen_backend]
    return Selection(
        workload=workload, name=kernel_name(workload.spec), objective=objective, backend=chosen_backend,
        point=point, candidate=candidate,
        latency_samples=sum(m.kind == "latency" for m in mine),
        energy_samples=sum(m.kind == "energy" for m in mine),
        device_names=sorted({m.device_name for m in mine if m.device_name}),
        drivers=sorted({m.driver for m in mine if m.driver}),
        runs=runs,
    )


def select_best(db_path: str | Path, objective: Objective | str, backend: str | None = None,
                workloads: Sequence[str] | None = None, allow_unconverged: bool = False) -> list[Selection]:
    """The best candidate of each workload (all of the database's, or the listed specs) under the
    objective, from one backend's measurements (default: the only backend, or the one real one when
    the simulator measured too). Raises ExportError for an empty database, an unknown workload, or a
    workload without a measured candidate."""
    objective = _objective(objective)
    with _open_db(db_path) as db:
        selections = [_select(db, w, objective, backend, allow_unconverged)
                      for w in _wanted_workloads(db, db_path, workloads)]
    names = [s.name for s in selections]
    if len(set(names)) != len(names):  # two specs that differ only in punctuation
        raise ExportError(f"two workloads map to the same function name: {', '.join(names)}")
    return selections


# -- rebuilding and compiling ------------------------------------------------------------------------
def _gpu(gpu):
    from etune.search_space import TargetError, gpu_spec

    if not isinstance(gpu, str):
        return gpu
    try:
        return gpu_spec(gpu)
    except TargetError as exc:
        raise ExportError(str(exc)) from None


_SPACES: dict = {}


def _space(spec: str, gpu):
    """The ScheduleSpace of a workload (cached: creating one generates its design spaces)."""
    from etune.search_space import SamplingError, ScheduleSpace

    key = (spec, gpu)
    if key not in _SPACES:
        try:
            _SPACES[key] = ScheduleSpace(spec, gpu)
        except SamplingError as exc:
            raise ExportError(str(exc)) from None
    return _SPACES[key]


def rebuild(spec: str, candidate: CandidateRow, gpu):
    """The search_space Candidate back from its stored trace; its structural hash must be the
    stored one (a different TVM or etune can replay a trace to a different schedule)."""
    from etune.search_space.space import TVM_ERRORS

    space = _space(spec, _gpu(gpu))
    try:
        rebuilt = space.from_trace_json(candidate.trace, candidate.design_space)
    except (TVM_ERRORS + (json.JSONDecodeError,)) as exc:
        reason = (str(exc).strip().splitlines() or [repr(exc)])[-1]
        raise ExportError(f"{spec}: candidate {candidate.id} does not replay: {reason}") from None
    if rebuilt.structural_hash != candidate.structural_hash:
        raise ExportError(f"{spec}: candidate {candidate.id} replays to schedule {rebuilt.structural_hash}, not the "
                          f"measured {candidate.structural_hash} (database written by another TVM or etune?)")
    return rebuilt


@contextmanager
def _cuda_compile_callback(function):
    """Installs ``tvm_callback_cuda_compile`` for the duration, then puts back whatever was there."""
    import tvm_ffi

    name = "tvm_callback_cuda_compile"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, function, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)
        else:
            tvm_ffi.remove_global_func(name)


def _tvm_reason(exc: BaseException) -> str:
    lines = [l.strip() for l in str(exc).strip().splitlines() if l.strip()]
    return next((l for l in reversed(lines) if "Error" in l or "error" in l), lines[-1] if lines else repr(exc))


def _compile(functions: dict, gpu, on_cuda, failure: str):
    """tvm.compile of {name: PrimFunc} for the GPU, with ``on_cuda(code)`` as TVM's CUDA compiler;
    a failure is one ExportError starting with ``failure``."""
    import tvm

    from etune.search_space.build import compile_module

    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in functions.items()})
    with _cuda_compile_callback(lambda code, *_: on_cuda(code)):
        try:
            return compile_module(mod, gpu)
        except Exception as exc:
            raise ExportError(f"{failure}: {_tvm_reason(exc)}") from None


def _device_module(executable):
    modules = [m for m in executable.mod.imports if m.kind == "cuda"]
    if not modules:
        raise ExportError("TVM produced no CUDA module")
    return modules[0]


def cuda_source(name: str, prim_func, gpu) -> str:
    """The CUDA source TVM generates for one kernel function (no nvcc run: a callback hands the
    source back in place of a binary on a CUDA-enabled TVM; a CPU-only TVM keeps the source)."""
    captured: list[str] = []

    def capture(code):
        captured.append(code)
        return code

    executable = _compile({name: prim_func}, _gpu(gpu), capture, f"{name}: TVM cannot lower the kernel")
    return captured[-1] if captured else _device_module(executable).inspect_source()


@dataclasses.dataclass
class CompiledLibrary:
    path: Path
    runnable: bool
    nvcc_checked: bool  # nvcc compiled the CUDA for the arch (always true when runnable)
    resources: list  # search_space.build.KernelResources of every device kernel, from ptxas
    note: str | None = None


def compile_library(functions: dict, gpu, path: str | Path) -> CompiledLibrary:
    """Compiles {name: PrimFunc} into one shared library at ``path`` for the GPU target.

    On a CUDA-enabled TVM, TVM calls etune's nvcc helper (search_space.build.nvcc_compile) through
    ``tvm_callback_cuda_compile`` and embeds the cubin: the library runs. On a CPU-only TVM the
    library embeds the CUDA source; the source is compiled with the same helper anyway (so a kernel
    that does not compile is an export error, and ptxas reports its resources), and the library is
    marked not runnable.
    """
    from etune.search_space.build import BuildError, nvcc_compile

    gpu = _gpu(gpu)
    path = Path(path)
    compiled: list = []
    with tempfile.TemporaryDirectory(prefix="etune-export-") as workdir:
        def compile_with_nvcc(code):
            compiled.append(nvcc_compile(code, gpu.arch, Path(workdir)))
            return compiled[-1][0]

        executable = _compile(functions, gpu, compile_with_nvcc, "compiling the kernel library failed")
        runnable = bool(compiled)
        note = None
        if not runnable:
            try:
                compiled.append(nvcc_compile(_device_module(executable).inspect_source(), gpu.arch, Path(workdir)))
            except BuildError as exc:
                if "not found" not in str(exc):
                    raise ExportError(f"the kernels' CUDA does not compile for {gpu.arch}: {exc}") from None
                note = f"not checked with nvcc ({exc})"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            executable.export_library(str(path))
        except Exception as exc:
            raise ExportError(f"writing {path} failed: {_tvm_reason(exc)}") from None
    return CompiledLibrary(path, runnable, bool(compiled), compiled[-1][1] if compiled else [], note)


# -- the kernel library --------------------------------------------------------------------------
def _etune_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("etune")
    except PackageNotFoundError:
        return "unknown"


def _tensors(specs) -> list[dict]:
    return [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in specs]


def _target_json(target):
    try:
        return json.loads(str(target))
    except ValueError:
        return str(target)


def _kernel_entry(selection: Selection, rebuilt, resources: list) -> dict:
    workload = rebuilt.workload
    point = selection.point
    own = re.compile(rf"^{re.escape(selection.name)}_kernel(_\d+)?$")
    entry = {
        "name": selection.name,
        "spec": workload.spec,
        "family": workload.family,
        "params": workload.params,
        "inputs": _tensors(workload.inputs),
        "outputs": _tensors(workload.outputs),
        "objective": selection.objective.label,
        "candidate_id": selection.candidate.id,
        "structural_hash": selection.candidate.structural_hash,
        "design_space": selection.candidate.design_space,
        "latency_s": point.latency_s,
        "energy_j": point.energy_j,
        "energy_measured": point.energy_measured,
        "energy_converged": point.energy_converged,
        "measurements": {
            "backend": selection.backend,
            "device_name": ", ".join(selection.device_names) or None,
            "driver": ", ".join(selection.drivers) or None,
            "latency_samples": selection.latency_samples,
            "energy_samples": selection.energy_samples,
        },
        "simulated": selection.simulated,
        "tuning_runs": [{"objective": r.objective, "backend": r.backend, "status": r.status,
                         "arch": (r.config or {}).get("target")} for r in selection.runs],
        "source": f"{SOURCES_DIR}/{selection.name}.cu",
        "device_kernels": [dataclasses.asdict(k) for k in resources if own.match(k.name)],
        "trace": json.loads(selection.candidate.trace),
    }
    if selection.simulated:
        entry["note"] = SIM_NOTE
    return entry


def _write_json(path: Path, document) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)


def _write_library(db_path, objective: Objective, directory: Path, backend, gpu, workloads,
                   allow_unconverged: bool) -> dict:
    """Writes the kernel library into ``directory`` (a new, empty folder); returns the manifest."""
    import tvm

    selections = select_best(db_path, objective, backend, workloads, allow_unconverged)
    rebuilt = [rebuild(s.workload.spec, s.candidate, gpu) for s in selections]
    sources = directory / SOURCES_DIR
    sources.mkdir()
    functions = {}
    for selection, candidate in zip(selections, rebuilt):
        func = candidate.mod["main"]
        functions[selection.name] = func
        (sources / f"{selection.name}.cu").write_text(cuda_source(selection.name, func, gpu))
    library = compile_library(functions, gpu, directory / LIBRARY_FILE)

    simulated = any(s.simulated for s in selections)
    other_arch = sorted({f"{s.workload.spec} (tuned for {arch})" for s in selections for r in s.runs
                         if (arch := (r.config or {}).get("target")) and arch != gpu.arch})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "etune_version": _etune_version(),
        "tvm_version": tvm.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "target": {"gpu": gpu.name, "arch": gpu.arch, "tvm_target": _target_json(gpu.tvm_target())},
        "objective": objective.label,
        "records_db": str(db_path),
        "library": LIBRARY_FILE,
        "runnable": library.runnable,
        "nvcc_checked": library.nvcc_checked,
        "simulated": simulated,
        "notes": [n for n in (
            None if library.runnable else NOT_RUNNABLE_NOTE,
            library.note,
            f"compiled for {gpu.arch}, but tuned for another arch: {', '.join(other_arch)}" if other_arch else None,
            f"{SIM_NOTE} for: {', '.join(s.workload.spec for s in selections if s.simulated)}" if simulated else None,
        ) if n],
        "kernels": [_kernel_entry(s, c, library.resources) for s, c in zip(selections, rebuilt)],
    }
    _write_json(directory / MANIFEST_FILE, manifest)
    return manifest


# -- the MetaSchedule database -------------------------------------------------------------------------
def _structural_hash(mod) -> str:
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def _latency_values(db: RecordsDB, workload_id: int, backend: str) -> dict[int, list[float]]:
    values: dict[int, list[float]] = defaultdict(list)
    for m in db.measurements(workload_id, kind="latency"):
        if m.ok and m.candidate_id is not None and m.backend == backend and m.value is not None:
            values[m.candidate_id].append(float(m.value))
    return values


def _write_ms_database(db_path, objective: Objective | None, directory: Path, out: Path, backend, gpu,
                       workloads, allow_unconverged: bool) -> dict:
    """Writes the MetaSchedule database into ``directory`` (to become ``out``) and checks it by
    loading it back and querying each workload's best schedule; returns the summary."""
    from tvm.s_tir import meta_schedule as ms

    target = gpu.tvm_target()
    plan = []  # (workload row, backend, [(candidate row, run_secs)], expected hashes)
    with _open_db(db_path) as db:
        for workload in _wanted_workloads(db, db_path, workloads):
            if objective is not None:
                chosen = _select(db, workload, objective, backend, allow_unconverged)
                run_secs = _latency_values(db, workload.id, chosen.backend)[chosen.candidate.id]
                plan.append((workload, chosen.backend, [(chosen.candidate, run_secs)],
                             {chosen.candidate.structural_hash}))
                continue
            chosen_backend = _pick_backend(db, workload, backend)
            values = _latency_values(db, workload.id, chosen_backend)
            rows = [(c, values[c.id]) for c in db.candidates(workload.id) if values.get(c.id)]
            fastest = min(statistics.fmean(v) for _, v in rows)  # MetaSchedule ranks by mean run_secs
            plan.append((workload, chosen_backend, rows,
                         {c.structural_hash for c, v in rows if statistics.fmean(v) == fastest}))

    database = ms.database.JSONDatabase(path_workload=str(directory / MS_WORKLOAD_FILE),
                                        path_tuning_record=str(directory / MS_RECORD_FILE))
    for workload, _, rows, _ in plan:
        space = _space(workload.spec, gpu)
        for row, run_secs in rows:
            candidate = rebuild(workload.spec, row, gpu)
            # A trace applies to its design space's module: the workload's TE chain, or a fused template
            # (one MetaSchedule workload each; commit_workload finds one committed before).
            mod = space.design_spaces[row.design_space].mod
            database.commit_tuning_record(ms.database.TuningRecord(
                candidate.trace, database.commit_workload(mod), run_secs=run_secs, target=target,
                args_info=ms.arg_info.ArgInfo.from_entry_func(mod, remove_preproc=True)))
    del database
    for name in (MS_WORKLOAD_FILE, MS_RECORD_FILE):
        if not (directory / name).exists():  # a database with no record writes no record file
            (directory / name).write_text("")

    summary = {"path_workload": str(out / MS_WORKLOAD_FILE), "path_tuning_record": str(out / MS_RECORD_FILE),
               "objective": None if objective is None else objective.label, "workloads": []}
    loaded = load_ms_database(directory)
    for workload, chosen_backend, rows, expected in plan:
        space = _space(workload.spec, gpu)
        # Per module (the TE chain, each fused template): TVM must give back its fastest record.
        groups = defaultdict(list)
        for row, run_secs in rows:
            groups[id(space.design_spaces[row.design_space].mod)].append((row, statistics.fmean(run_secs)))
        winner = None
        for group in groups.values():
            mod = space.design_spaces[group[0][0].design_space].mod
            fastest = min(secs for _, secs in group)
            wanted = {row.structural_hash for row, secs in group if secs == fastest}
            schedule = loaded.query_schedule(mod, target, "main")
            got = None if schedule is None else _structural_hash(schedule.mod)
            if got not in wanted:
                raise ExportError(f"{workload.spec}: the exported MetaSchedule database gives schedule {got}, "
                                  f"expected {' or '.join(sorted(wanted))}")
            winner = got if got in expected else winner
        summary["workloads"].append({"spec": workload.spec, "backend": chosen_backend, "records": len(rows),
                                     "structural_hash": winner, "simulated": chosen_backend == "sim"})
    return summary


# -- the output folder ---------------------------------------------------------------------------------
def _earlier_export(out: Path) -> set[str]:
    """The entries (relative paths) of an earlier etune export in ``out``: those its marker file
    lists, or, for an export made before the marker, those its manifest names. Empty if none."""
    try:
        marker = json.loads((out / MARKER_FILE).read_text())
        if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT and isinstance(marker.get("files"), list):
            return {str(f) for f in marker["files"]} | {MARKER_FILE}
    except (OSError, ValueError):
        pass
    from etune.kernels.library import LibraryError, read_manifest

    try:
        manifest = read_manifest(out)
    except LibraryError:
        return set()
    return ({MANIFEST_FILE, manifest["library"], MS_WORKLOAD_FILE, MS_RECORD_FILE}
            | {f"{SOURCES_DIR}/{k['name']}.cu" for k in manifest["kernels"]})


def _entries(directory: Path) -> set[str]:
    """Every file and folder under ``directory``, as relative paths; a folder counts as its own
    entry only when empty (then nothing else says it is there)."""
    entries = set()
    for path in directory.rglob("*"):
        if not path.is_dir() or path.is_symlink() or not any(path.iterdir()):
            entries.add(path.relative_to(directory).as_posix())
    return entries


@contextmanager
def _staged(out: Path, force: bool) -> Iterator[Path]:
    """A new folder beside ``out`` to write an export into. When the export is written, it becomes
    ``out`` by renames: ``out`` was missing or empty, or held an earlier etune export and ``force``
    is given. A folder holding anything etune did not write is refused, with or without ``force``:
    etune never deletes a user's files. A failed export leaves ``out`` as it was."""
    replace = False
    if out.is_symlink():
        raise ExportError(f"{out} is a symbolic link: give the folder itself")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.exists():
        present = _entries(out)
        ours = _earlier_export(out)
        foreign = sorted(present - ours)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise ExportError(f"{out} holds files etune did not write ({foreign[0]}{more}): export into a new or "
                              "empty folder (etune never deletes files it did not write)")
        if present and not force:
            raise ExportError(f"{out} holds an earlier etune export: add --force to replace it")
        replace = bool(present)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.etune-{os.getpid()}-{time.time_ns()}"
    staging.mkdir()  # the mode the user's umask gives, as the folder it becomes
    try:
        yield staging
        files = sorted(_entries(staging))
        _write_json(staging / MARKER_FILE, {"format": MARKER_FORMAT, "files": files})
        if replace:
            old = staging.with_name(staging.name + "-old")
            os.rename(out, old)
            try:
                os.rename(staging, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            if out.exists():
                out.rmdir()  # empty (fails if something appeared in it since)
            os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export(db_path: str | Path, objective: Objective | str | None, out_dir: str | Path, format: str = "library",
           backend: str | None = None, gpu="h100", workloads: Sequence[str] | None = None,
           force: bool = False, allow_unconverged: bool = False) -> tuple[dict | None, dict | None]:
    """Exports into ``out_dir``: the kernel library (``format`` library), the MetaSchedule database
    (metaschedule) or both; returns (manifest, MetaSchedule summary), None for what was not asked.
    ``allow_unconverged``: a schedule whose energy measurement did not converge may be the winner
    (its manifest entry says so).

    The export is written into a new folder beside ``out_dir`` that then takes its place, so a
    failed export changes nothing; ``out_dir`` must be new, empty, or an earlier export (replaced
    only with ``force``). Raises ExportError with one readable line when it cannot."""
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r} (choose {', '.join(FORMATS)})")
    objective = None if objective is None else _objective(objective)
    if objective is None and format != "metaschedule":
        raise ExportError("a kernel library is exported for an objective")
    gpu = _gpu(gpu)
    manifest = summary = None
    out = Path(out_dir)
    with _staged(out, force) as staging:
        if format in ("library", "both"):
            manifest = _write_library(db_path, objective, staging, backend, gpu, workloads, allow_unconverged)
        if format in ("metaschedule", "both"):
            summary = _write_ms_database(db_path, objective, staging, out, backend, gpu, workloads,
                                         allow_unconverged)
    return manifest, summary


def export_library(db_path: str | Path, objective: Objective | str, out_dir: str | Path,
                   backend: str | None = None, gpu="h100", workloads: Sequence[str] | None = None,
                   force: bool = False) -> dict:
    """Exports the best candidate of every workload (or the listed specs) under ``objective`` as one
    shared library ``out_dir/libetune_kernels.so`` with ``manifest.json`` and ``kernels/<name>.cu``;
    returns the manifest. See ``export`` for the output folder."""
    return export(db_path, objective, out_dir, "library", backend, gpu, workloads, force)[0]


def export_ms_database(db_path: str | Path, out_dir: str | Path, backend: str | None = None, gpu="h100",
                       objective: Objective | str | None = None,
                       workloads: Sequence[str] | None = None, force: bool = False) -> dict:
    """Writes ``out_dir/database_workload.json`` and ``out_dir/database_tuning_record.json`` (the
    files of MetaSchedule's JSONDatabase; see ``export`` for the output folder) and checks them by
    loading them back and querying each workload's best schedule.

    Without an objective every candidate with a latency measurement becomes a tuning record (its
    run_secs: its latency measurements), and TVM picks the fastest. With one, only the objective's
    choice per workload is written, so TVM picks it. Returns a summary: the two paths and, per
    workload, the spec, the number of records and the structural hash of the schedule TVM queries.

    Loading these files in a fresh process replays tensor-core traces, which needs TVM's CUDA tensor
    intrinsics registered first: ``import tvm.s_tir.tensor_intrin.cuda``.
    """
    return export(db_path, objective, out_dir, "metaschedule", backend, gpu, workloads, force)[1]


def load_ms_database(directory: str | Path):
    """The JSONDatabase exported into ``directory`` (registers the CUDA tensor intrinsics first, which
    replaying tensor-core traces needs)."""
    from tvm.s_tir import meta_schedule as ms

    from etune.search_space.rules import tensor_intrinsics

    tensor_intrinsics()  # registers the wmma/mma intrinsics

    directory = Path(directory)
    for name in (MS_WORKLOAD_FILE, MS_RECORD_FILE):
        if not (directory / name).is_file():
            raise ExportError(f"no MetaSchedule database in {directory}: {name} is missing")
    return ms.database.JSONDatabase(path_workload=str(directory / MS_WORKLOAD_FILE),
                                    path_tuning_record=str(directory / MS_RECORD_FILE), allow_missing=False)
