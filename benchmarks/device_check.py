"""The device check: one short, time-boxed GPU call that turns a lent GPU into lasting data.

Three modes (``benchmarks/device_check.sh`` wraps them):

``prepare`` (here, on the CPU machine, before the GPU is asked for) picks the survey pool (random
samples of each workload's design space plus the best a short sim run finds), builds every candidate
to a runnable library (cubins for sm_90 inside TVM's host module; a stand-in ``libcuda.so.1`` lets
TVM's CUDA runtime load without a driver, see ``cuda_stub``), computes their features, and packs it
all with a runtime-only TVM (no compiler: ~5 MB instead of 57) and ``libcudart.so.13`` into
``.carry_hw/``. It prints the carried size and the planned time of every phase.

``run`` (on the GPU, carry ``[".carry_hw"]``) runs the phases, most valuable first, each with its own
deadline, each writing its rows to ``$OUT/dataset.jsonl`` (measurements.dataset) before the next
starts, so a call killed at its limit still returns what it measured:

1. facts: GPU name, driver, clocks, power limit, temperature, memory, versions;
2. correctness: two candidates of every survey workload run against the float64 reference, and a
   kernel that faults between two good ones (the isolated runner must record the fault and measure
   the next one in a fresh worker);
3. tma: kernels.hopper_tma's six checks of TMA loads (plain and 128-byte swizzled), wgmma reading
   swizzled K-major and MN-major tiles through descriptors, cluster multicast and a warp-specialised
   mbarrier ring, then the TMA GEMM template (kernels.gemm_tma, clusters of 2 and 4) at a small shape
   with every tail, each against its exact expected output in a worker with a short time-out (a
   wrong barrier phase hangs rather than fails);
4. acceptance: torch.matmul fp16 4096^3, etune's protocol 5 times against one 10 s window run with
   another launch batch size, with the same window's sampled power integrated as a second reference
   (a wrong per-call divisor or idle gaps between launches would show up as a difference);
5. survey: every pool candidate's latency (the TMA GEMM templates only if the tma phase passed
   their checks), then energy round-robin over the workloads (sim's best first), at least 64
   energy measurements over the 6 workloads if the time allows;
6. vendor: torch.matmul, torch.softmax and SDPA (causal and decode too) by the same protocol.

``dry-run`` runs the same phases on ``sim`` on a CPU machine, with a small pool and no builds, and
writes the same dataset format (labelled sim); CI runs it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from etune.measurements.dataset import DatasetWriter, finite, load_dataset, make_header  # noqa: E402

TARGET = "h200"
# One workload per family and shape class of the suite: the survey covers them all.
SURVEY = {
    "gemv": "gemm:1,4096,4096",
    "gemm-skinny": "gemm:16,11008,4096",  # the tensor-core split-K family (splitk_tc): LLM decode shapes
    "gemm": "gemm:4096,4096,4096",
    "softmax": "softmax:4096,4096",
    "attention-prefill": "attention:1,32,2048,2048,128",
    "attention-decode": "attention:8,32,1,4096,128",
}
VENDOR_FIRST = list(SURVEY.values())  # the survey's own references first, then the rest of the suite
ACCEPTANCE_SPEC = "gemm:4096,4096,4096"

# Planned seconds per phase on the GPU (the survey takes what the others leave).
PLAN_S = {"facts": 10, "correctness": 45, "tma": 20, "acceptance": 60, "survey": 170, "vendor": 50}
# A TMA check runs in microseconds; its worker needs a few seconds for CUDA and the library.
TMA_CHECK_TIMEOUT_S = 10
BUDGET_S = 360  # the whole measuring call, within the device tool's limit with room for a retry
# Survey energy: windows of 0.5 s, 3 of them (the counter steps every ~100 ms on an H100, so edge
# detection adds ~0.4 % per window); the acceptance phase checks etune's default 1 s protocol.
SURVEY_WINDOW_S = 0.5
SURVEY_WINDOWS = 3
ENERGY_PER_WORKLOAD = 16

PACK = ROOT / ".carry_hw"
CUDA_STUB_SOURCE = """/* A stand-in libcuda.so.1 for machines without an NVIDIA driver: every entry point fails with
   CUDA_ERROR_NO_DEVICE (100). TVM's CUDA runtime loads with it, so tvm.compile + export_library make
   libraries that hold cubins; nothing can run here. */
#define STUB(name) int name() { return 100; }
STUB(cuInit) STUB(cuDriverGetVersion) STUB(cuGetProcAddress) STUB(cuGetProcAddress_v2)
STUB(cuDeviceGet) STUB(cuDeviceGetCount) STUB(cuDeviceGetName) STUB(cuDeviceGetAttribute)
STUB(cuCtxGetCurrent) STUB(cuFuncSetAttribute) STUB(cuGetErrorName) STUB(cuGetErrorString)
STUB(cuLaunchKernel) STUB(cuLaunchKernelEx) STUB(cuModuleGetFunction) STUB(cuModuleLoadData)
STUB(cuModuleUnload) STUB(cuTensorMapEncodeTiled)
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ==================================================================================================
# Choosing the pool (CPU, full TVM)

@dataclasses.dataclass
class PoolEntry:
    candidate: object  # search_space.Candidate
    selected_by: str  # random | sim-best | template
    template: str | None = None  # the thread-level template's name (selected_by "template")


def select_pool(spec: str, random_n: int, best_n: int, sim_trials: int, seed: int = 0) -> list[PoolEntry]:
    """``random_n`` random samples and the ``best_n`` best that sim finds (by sim energy within 5 % of
    the fastest, and the fastest), distinct. ``sim_trials`` > 0: a short energy@0.05 tuning run on
    sim; 0: the best of a 4 x ``best_n`` random sample ranked by sim (cheap, for the dry run). Then
    every design space that is a single point (the thread-level ``flash_mma``, ``gemm_mma`` and
    ``gemm_wgmma`` templates): hand-laid-out fragments are checked against the reference only on a GPU, so each is
    measured."""
    from etune.measurements.sim import SimBackend
    from etune.search_space import ScheduleSpace

    space = ScheduleSpace(spec, TARGET, seed=seed)
    sim = SimBackend(gpu=TARGET, seed=seed, noise=0.0)
    entries = [PoolEntry(c, "random") for c in space.sample(random_n, seed=seed)]
    seen = {e.candidate.structural_hash for e in entries}
    if best_n:
        if sim_trials:
            ranked = _sim_run_best(spec, sim_trials, seed)
        else:
            ranked = space.sample(4 * best_n, seed=seed + 1, exclude=seen)
        outcomes = {c.structural_hash: sim.outcome(c) for c in ranked}
        fastest = min(o.latency_s for o in outcomes.values())
        by_energy = sorted(ranked, key=lambda c: (outcomes[c.structural_hash].latency_s > 1.05 * fastest,
                                                  outcomes[c.structural_hash].energy_j))
        by_latency = sorted(ranked, key=lambda c: outcomes[c.structural_hash].latency_s)
        picked = 0
        for candidate in (c for pair in zip(by_energy, by_latency) for c in pair):
            if picked >= best_n:
                break
            if candidate.structural_hash not in seen:
                seen.add(candidate.structural_hash)
                entries.append(PoolEntry(candidate, "sim-best"))
                picked += 1
    for candidate in space.fixed_points():
        if candidate.structural_hash not in seen:
            seen.add(candidate.structural_hash)
            entries.append(PoolEntry(candidate, "template", space.design_spaces[candidate.design_space].template))
    return entries


def _sim_run_best(spec: str, trials: int, seed: int) -> list:
    """The candidates a short sim tuning run measured, rebuilt from its records."""
    from etune.measurements.records import RecordsDB
    from etune.measurements.sim import SimBackend
    from etune.tuner.objectives import Objective
    from etune.tuner.search import TuneSettings, Tuner

    with tempfile.TemporaryDirectory() as tmp, RecordsDB.open(Path(tmp) / "sim.db") as db:
        tuner = Tuner(spec, Objective.parse("energy@0.05"), SimBackend(gpu=TARGET, seed=seed), db,
                      TuneSettings(trials=trials, seed=seed, build=False, target=TARGET))
        tuner.run()
        rows = db.candidates(tuner.workload_id)
        return [tuner.space.from_trace_json(r.trace, r.design_space) for r in rows]


# ==================================================================================================
# prepare (CPU): pool, runnable builds, runtime-only TVM

def cuda_stub(directory: Path) -> Path:
    """Build the stand-in ``libcuda.so.1`` into ``directory`` (a C compiler is all it needs)."""
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / "libcuda.so.1"
    if not library.exists():
        source = directory / "cuda_stub.c"
        source.write_text(CUDA_STUB_SOURCE)
        subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(library), str(source)],
                       check=True)
    return library


def _runtime_pack(out: Path) -> None:
    """TVM's runtime (python package without the compiler library), tvm_ffi for the GPU host's Python
    3.12, and libcudart.so.13, as runtime.tar.xz."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        versions = {"apache-tvm": _dist_version("apache-tvm"), "apache-tvm-ffi": _dist_version("apache-tvm-ffi")}
        wheels = tmp / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp",
                        *[a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                                      "manylinux_2_17_x86_64", "manylinux2014_x86_64") for a in ("--platform", p)],
                        "-d", str(wheels), *[f"{k}=={v}" for k, v in versions.items()]], check=True)
        site = tmp / "py"
        for wheel in wheels.glob("*.whl"):
            shutil.unpack_archive(str(wheel), str(site), "zip")
        for dropped in ("tvm/lib/libtvm_compiler.so", "tvm/3rdparty", "tvm/src", "tvm/include",
                        "tvm_ffi/include", "tvm_ffi/src", "tvm_ffi/cython", "tvm_ffi/3rdparty"):
            path = site / dropped
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        lib = tmp / "lib"
        lib.mkdir()
        cudart = _find_cudart()
        shutil.copy2(cudart, lib / "libcudart.so.13")
        archive = out / "runtime.tar.xz"
        with tarfile.open(archive, "w:xz", preset=9) as tar:
            tar.add(site, "py")
            tar.add(lib, "lib")


def _dist_version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)


def _find_cudart() -> Path:
    for directory in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", "/usr/local/cuda-13.0"):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
            path = Path(directory, sub, "libcudart.so.13")
            if directory and path.exists():
                return path.resolve()
    raise SystemExit("device_check prepare: libcudart.so.13 not found (install the CUDA 13 toolkit)")


def prepare(args) -> None:
    from etune.energy_model.features import candidate_features
    from etune.search_space import Builder, gpu_spec

    started = time.monotonic()
    pack = args.pack
    if pack.exists():
        shutil.rmtree(pack)
    (pack / "libs").mkdir(parents=True)
    stub = cuda_stub(Path(tempfile.gettempdir()) / "etune-cuda-stub")
    # Build workers are new processes: they find the stand-in driver through the environment.
    os.environ["LD_LIBRARY_PATH"] = f"{stub.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"
    gpu = gpu_spec(TARGET)
    builder = Builder(gpu, workdir=args.workdir, jobs=args.jobs)
    manifest = {"target": TARGET, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "survey": SURVEY,
                "plan_s": PLAN_S, "budget_s": BUDGET_S, "candidates": [], "faulting": None,
                "command": " ".join(["python", *sys.argv])}
    for family, spec in SURVEY.items():
        log(f"{spec}: choosing {args.random} random + {args.best} sim-best (sim run of {args.sim_trials} trials)")
        entries = select_pool(spec, args.random, args.best, args.sim_trials, seed=args.seed)
        builds = builder.build([e.candidate for e in entries])
        built = 0
        for entry, build in zip(entries, builds):
            if not (build.ok and build.runnable):
                log(f"  not runnable: {entry.candidate.structural_hash}: {build.error or build.status}")
                continue
            target = pack / "libs" / build.structural_hash
            target.mkdir()
            shutil.copy2(build.library, target / "lib.so")
            c = entry.candidate
            manifest["candidates"].append({
                "spec": spec, "family": c.workload.family, "design_space": c.design_space, "trace": c.trace_json(),
                "structural_hash": c.structural_hash, "selected_by": entry.selected_by, "template": entry.template,
                "features": candidate_features(c, gpu, build=build),
                "build": {"status": build.status, "seconds": build.seconds, "error": None,
                          "kernels": [dataclasses.asdict(k) for k in build.kernels]},
                "library": f"libs/{build.structural_hash}/lib.so"})
            built += 1
        log(f"  {built}/{len(entries)} runnable")
    from etune.measurements.tvm_runner import faulting_candidate

    fault = faulting_candidate()
    (result,) = Builder(gpu, workdir=args.workdir / "faulting", jobs=1).build([fault])
    if result.ok and result.runnable:
        (pack / "libs" / "faulting").mkdir()
        shutil.copy2(result.library, pack / "libs" / "faulting" / "lib.so")
        manifest["faulting"] = {"spec": fault.workload.spec, "library": "libs/faulting/lib.so"}
    manifest["tma_checks"] = _build_tma_checks(pack, gpu, args)
    (pack / "manifest.json").write_text(json.dumps(finite(manifest)))
    _runtime_pack(pack)
    log(f"prepared in {time.monotonic() - started:.0f} s")
    print_plan(pack)


def _build_tma_checks(pack: Path, gpu, args) -> dict:
    """kernels.hopper_tma's checks built into the pack: {check name: library path in the pack}."""
    from etune.kernels import hopper_tma
    from etune.search_space import Builder

    checks = hopper_tma.check_candidates()
    libraries = {}
    for check, build in zip(checks, Builder(gpu, workdir=args.workdir / "tma", jobs=args.jobs).build(checks)):
        if not (build.ok and build.runnable):
            log(f"  {check.structural_hash} not runnable: {build.error or build.status}")
            continue
        (pack / "libs" / check.structural_hash).mkdir()
        shutil.copy2(build.library, pack / "libs" / check.structural_hash / "lib.so")
        libraries[check.structural_hash.removeprefix("tma_")] = f"libs/{check.structural_hash}/lib.so"
    log(f"TMA checks: {len(libraries)}/{len(checks)} runnable")
    return libraries


def _tracked_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    return sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file())


def print_plan(pack: Path) -> None:
    """What one device call carries (limit 64 MiB) and the planned seconds of every phase."""
    tree = _tracked_bytes()
    print("\nCarried to the GPU (one call, limit 64 MiB):")
    if (pack / "manifest.json").exists():
        pack_bytes = sum(p.stat().st_size for p in pack.rglob("*") if p.is_file())
        manifest = json.loads((pack / "manifest.json").read_text())
        print(f"  project tree {tree / 2**20:.1f} MiB + {pack.name} {pack_bytes / 2**20:.1f} MiB (runtime-only TVM "
              f"and libcudart {(pack / 'runtime.tar.xz').stat().st_size / 2**20:.1f} MiB, "
              f"{len(manifest['candidates'])} libraries) = {(tree + pack_bytes) / 2**20:.1f} MiB")
        for spec in manifest["survey"].values():
            print(f"  {spec}: {sum(c['spec'] == spec for c in manifest['candidates'])} candidates")
    else:
        print(f"  project tree {tree / 2**20:.1f} MiB; no {pack.name} here yet (`device_check.sh prepare` makes it)")
    print(f"\nPlanned seconds per phase on the GPU (call budget {BUDGET_S} s; the machine's start is extra):")
    for phase, seconds in PLAN_S.items():
        print(f"  {phase:12s} {seconds:4d} s")
    print(f"  {'total':12s} {sum(PLAN_S.values()):4d} s")


# ==================================================================================================
# The phases (GPU or sim)

class Session:
    """What every phase shares: the dataset being written, the clock, the backend, the pool."""

    def __init__(self, out: Path, backend, dry_run: bool, budget_s: float, pack: Path | None = None,
                 manifest: dict | None = None):
        self.out, self.backend, self.dry_run, self.pack = out, backend, dry_run, pack
        self.manifest = manifest or {}
        self.pool: dict[str, dict[str, Member]] = {}  # spec -> structural hash -> member
        self.measured: set = set()  # (spec, hash, kind) measured so far
        self.latency: dict = {}  # (spec, hash) -> seconds, or None when it failed
        # the tma phase's verdict on the TMA GEMM template: the survey runs its templates only then
        self.tma_gemm_passed = False
        self.start = time.monotonic()
        self.end = self.start + budget_s
        device = backend.device()
        self.device = device
        header = make_header(backend.name, device.name.removeprefix("sim:"), device.driver, target=TARGET,
                             device=device.details, dry_run=dry_run, survey_window_s=SURVEY_WINDOW_S)
        self.writer = DatasetWriter(out / "dataset.jsonl", header)

    def left(self) -> float:
        return self.end - time.monotonic()

    def phase(self, name: str, planned_s: float, run) -> None:
        """Run one phase with its deadline; a phase that raises is recorded and the next one runs."""
        started = time.monotonic()
        reserve = sum(PLAN_S[p] for p in _after(name))
        deadline = min(started + planned_s, self.end - reserve) if name != "survey" else self.end - reserve
        deadline = max(deadline, started + 1.0)
        log(f"== {name} (until +{deadline - self.start:.0f} s)")
        status, error = "ok", None
        try:
            note = run(self, deadline)
        except Exception as exc:  # noqa: BLE001 - one phase's failure must not lose the others
            status, error, note = "error", f"{type(exc).__name__}: {str(exc).strip()[:500]}", None
            log(f"   {name} failed: {error}")
        seconds = time.monotonic() - started
        self.writer.write({"type": "phase", "phase": name, "status": status, "error": error, "seconds": seconds,
                           "planned_s": planned_s, "note": note})


def _after(name: str) -> list[str]:
    names = list(PLAN_S)
    return names[names.index(name) + 1:]


def _facts(session: Session, deadline: float) -> str:
    facts = {"device": dataclasses.asdict(session.device), "host": platform.node()}
    if not session.dry_run and shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True, timeout=30)
        (session.out / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr)
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,power.limit,power.default_limit,"
                                "clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,persistence_mode,"
                                "memory.total", "--format=csv"], capture_output=True, text=True, timeout=30)
        facts["nvidia_smi"] = query.stdout.strip()
        log(query.stdout.strip())
    session.writer.write({"type": "facts", **facts})
    return session.device.name


@contextlib.contextmanager
def settings(backend, **values):
    """The backend's measurement settings changed for a while (one backend for the whole call: one
    worker process, one idle-power measurement, each reference output computed once)."""
    saved = {name: getattr(backend, name) for name in values if hasattr(backend, name)}
    for name in saved:
        setattr(backend, name, values[name])
    try:
        yield backend
    finally:
        for name, value in saved.items():
            setattr(backend, name, value)


def _measure(session: Session, spec: str, hashes: list[str], kind: str, **extra) -> list:
    """Measure pool candidates of one workload and write a row for each as it comes."""
    pool = session.pool[spec]
    candidates = [pool[h].candidate for h in hashes]
    builds = [pool[h].build for h in hashes] if not session.dry_run else None

    def record(result) -> None:
        session.writer.measurement(spec, result, **extra)
        if kind == "latency":
            session.measured.add((spec, result.structural_hash, "latency"))
            session.latency[(spec, result.structural_hash)] = result.value if result.ok else None

    return session.backend.measure(candidates, kind, builds=builds, progress=record)


def _correctness(session: Session, deadline: float) -> str:
    notes = []
    for spec in SURVEY.values():
        if time.monotonic() > deadline:
            notes.append("deadline")
            break
        hashes = list(session.pool[spec])[:2]
        results = _measure(session, spec, hashes, "latency", phase="correctness")
        ok = sum(r.ok for r in results)
        for h, r in zip(hashes, results):
            if not r.ok:
                log(f"   {spec} {h}: {r.error}")
        if session.dry_run:  # sim runs no code: there is no output to check
            session.writer.write({"type": "check", "check": "reference", "spec": spec, "passed": None,
                                  "note": "sim runs no code"})
            continue
        session.writer.write({"type": "check", "check": "reference", "spec": spec, "passed": ok == len(results),
                              "ok": ok, "of": len(results), "errors": [r.error for r in results if not r.ok]})
        notes.append(f"{spec} {ok}/{len(results)}")
    notes.append(_isolation(session))
    return ", ".join(notes)


def _crash_task():
    os.abort()


def _good_task(value):
    return value


def _isolation(session: Session) -> str:
    """A faulting kernel between two good ones: the fault is a failed result with its reason and the
    next candidate measures in a fresh worker. On sim (no kernels run), the same for CPU tasks."""
    if session.dry_run:
        from etune.measurements.runner import IsolatedRunner

        with IsolatedRunner(timeout_s=30) as runner:
            results = [runner.run(_good_task, (1,)), runner.run(_crash_task), runner.run(_good_task, (2,))]
        passed = results[0].ok and not results[1].ok and results[2].ok
        errors = [r.error for r in results]
    else:
        fault = session.manifest.get("faulting")
        if not fault:
            return "isolation: no faulting library packed"
        good_spec = SURVEY["softmax"]
        good = [session.pool[good_spec][h] for h in list(session.pool[good_spec])[:2]]
        bad = types.SimpleNamespace(candidate=types.SimpleNamespace(
            workload=_workload(fault["spec"]), structural_hash="faulting"),
            build=_build("faulting", session.pack / fault["library"]))
        entries = [good[0], bad, good[1]]
        results = [session.backend.measure([e.candidate], "latency", builds=[e.build])[0] for e in entries]
        passed = results[0].ok and not results[1].ok and results[1].value is None and results[2].ok
        errors = [r.error for r in results]
    session.writer.write({"type": "check", "check": "isolation", "passed": bool(passed), "errors": errors})
    return f"isolation {'passed' if passed else 'FAILED'} ({errors[1]})"


def _tma(session: Session, deadline: float) -> str:
    """kernels.hopper_tma's checks in an isolated worker, each with its own time-out; a row per check."""
    from etune.kernels import hopper_tma
    from etune.measurements.runner import IsolatedRunner

    if session.dry_run:
        for name in hopper_tma.CHECKS:
            session.writer.write({"type": "check", "check": f"tma:{name}", "passed": None, "note": "sim runs no code"})
        return "sim runs no code"
    libraries = session.manifest.get("tma_checks") or {}
    passed, gemm_passed = [], []
    with IsolatedRunner(timeout_s=TMA_CHECK_TIMEOUT_S) as runner:
        for name in hopper_tma.CHECKS:
            if time.monotonic() > deadline:
                break
            row = {"type": "check", "check": f"tma:{name}"}
            if name not in libraries:
                row.update(passed=None, note="not built")
            else:
                result = runner.run(hopper_tma.run_check, (name, str(session.pack / libraries[name])))
                if result.ok:
                    row.update(result.value, note=f"{result.value['mismatches']} of {result.value['of']} elements wrong")
                else:
                    row.update(passed=False, errors=[f"{result.status}: {result.error}"])
            session.writer.write(row)
            log(f"   tma:{name}: {row.get('passed')} {row.get('note') or row.get('errors')}")
            passed.append(row.get("passed") is True)
            gemm_passed.append(row.get("passed") is True and name in hopper_tma.GEMM_CHECKS)
    session.tma_gemm_passed = sum(gemm_passed) == len(hopper_tma.GEMM_CHECKS)
    return f"{sum(passed)}/{len(hopper_tma.CHECKS)} passed" + ("" if len(passed) == len(hopper_tma.CHECKS) else " (deadline)")


def _acceptance(session: Session, deadline: float) -> str:
    """benchmarks/energy_acceptance.py's check (etune's protocol 5 times vs one 10 s window)."""
    import energy_acceptance
    from etune.kernels import parse_spec

    workload = parse_spec(ACCEPTANCE_SPEC)

    def measure(phase: str):
        result = session.backend.measure_vendor(workload, "energy")
        session.writer.measurement(workload.spec, result, vendor=result.details.get("vendor"), phase=phase)
        return result

    def measure_long():
        with settings(session.backend, **energy_acceptance.long_window_settings()):
            return measure("acceptance-long")

    verdict = energy_acceptance.acceptance(lambda: measure("acceptance"), measure_long, repeats=5)
    session.writer.write({"type": "acceptance", "spec": workload.spec, **verdict})
    if "error" in verdict:
        return f"failed: {verdict['error']}"
    power = verdict["difference_sampled_power"]
    return (f"{'passed' if verdict['passed'] else 'FAILED'}: median vs 10 s window {verdict['difference']:+.2%}"
            + (f" (integrated power {power:+.2%})" if power is not None else "") + f", CV {verdict['cv']:.2%}")


def _is_tma(member: Member) -> bool:
    return (member.template or "").startswith("gemm_tma")


def _survey(session: Session, deadline: float) -> str:
    # Latency of every candidate, workload by workload (cheap), then energy round-robin. The TMA
    # templates only after the tma phase ran their GEMM checks right, one at a time and last: a
    # kernel that hangs costs the backend's whole time-out, so the first failure stops the rest.
    tma_failed = False
    for spec, pool in session.pool.items():
        todo = [h for h in pool if (spec, h, "latency") not in session.measured and not _is_tma(pool[h])]
        for start in range(0, len(todo), 4):
            if time.monotonic() > deadline - 30:
                break
            _measure(session, spec, todo[start:start + 4], "latency", phase="survey")
        for h in [h for h in pool if _is_tma(pool[h])] if session.tma_gemm_passed else []:
            if tma_failed or time.monotonic() > deadline - 30:
                break
            (result,) = _measure(session, spec, [h], "latency", phase="survey")
            tma_failed = not result.ok
    # Energy: sim's best first, then the fastest measured (their energy is what tuning cares about).
    order = {}
    for spec, pool in session.pool.items():
        ok = [h for h in pool if session.latency.get((spec, h)) is not None]
        best = [h for h in ok if pool[h].selected_by == "sim-best"]
        rest = sorted((h for h in ok if h not in best), key=lambda h: session.latency[(spec, h)])
        pairs = itertools.zip_longest(best, rest)
        order[spec] = [h for pair in pairs for h in pair if h is not None][:ENERGY_PER_WORKLOAD]
    done = 0
    with settings(session.backend, min_window_s=SURVEY_WINDOW_S, max_windows=SURVEY_WINDOWS):
        for round_ in range(ENERGY_PER_WORKLOAD):
            for spec, hashes in order.items():
                if round_ >= len(hashes):
                    continue
                if time.monotonic() > deadline - 6:
                    return f"{done} energy measurements (deadline)"
                (result,) = _measure(session, spec, [hashes[round_]], "energy", phase="survey")
                done += result.ok
    return f"{done} energy measurements over {len(order)} workloads"


def _vendor(session: Session, deadline: float) -> str:
    from etune.kernels import SUITE_SPECS, parse_spec

    specs = list(dict.fromkeys(VENDOR_FIRST + list(SUITE_SPECS.values())))
    done = []
    for spec in specs:
        if time.monotonic() > deadline - 5:
            break
        workload = parse_spec(spec)
        for kind in ("latency", "energy"):
            result = session.backend.measure_vendor(workload, kind)
            session.writer.measurement(spec, result, vendor=result.details.get("vendor"), phase="vendor")
        done.append(spec)
    return f"{len(done)}/{len(specs)} vendor kernels"


PHASES = {"facts": _facts, "correctness": _correctness, "tma": _tma, "acceptance": _acceptance, "survey": _survey,
          "vendor": _vendor}


@dataclasses.dataclass
class Member:
    candidate: object
    build: object
    selected_by: str
    template: str | None = None


def _workload(spec: str):
    from etune.kernels import parse_spec

    return parse_spec(spec)


def _build(structural_hash: str, library: Path):
    """What the nvml backend needs of a build (search_space.BuildResult's fields, without importing
    search_space: it needs TVM's compiler, which the GPU host does not get)."""
    return types.SimpleNamespace(structural_hash=structural_hash, ok=True, status="ok", error=None,
                                 runnable=True, library=str(library))


def run_phases(session: Session) -> None:
    """Every phase in order, then the dataset's report (``report.md`` beside it, and printed last:
    the device tool returns the end of the output)."""
    for name, planned in PLAN_S.items():
        session.phase(name, planned, PHASES[name])
    session.writer.close()
    report = report_markdown(load_dataset(session.writer.path))
    (session.out / "report.md").write_text(report)
    print(report)


def run(args, backend=None) -> None:
    """On the GPU, from the pack (``backend``: tests pass a stand-in for the NVML one)."""
    if backend is None:
        from etune.measurements.nvml_backend import NvmlBackend

        backend = NvmlBackend(timeout_s=60)
    pack = args.pack
    manifest = json.loads((pack / "manifest.json").read_text())
    with backend:
        session = Session(args.out, backend, dry_run=False, budget_s=args.budget_s, pack=pack, manifest=manifest)
        for c in manifest["candidates"]:
            session.writer.write({"type": "candidate", **{k: v for k, v in c.items() if k != "library"}})
            candidate = types.SimpleNamespace(workload=_workload(c["spec"]), structural_hash=c["structural_hash"])
            session.pool.setdefault(c["spec"], {})[c["structural_hash"]] = Member(
                candidate, _build(c["structural_hash"], pack / c["library"]), c["selected_by"], c.get("template"))
        run_phases(session)


def dry_run(args) -> None:
    """Every phase on sim, on this machine: a small pool, no builds."""
    from etune.energy_model.features import candidate_features
    from etune.measurements.sim import SimBackend
    from etune.search_space import gpu_spec

    print_plan(PACK)
    gpu = gpu_spec(TARGET)
    session = Session(args.out, SimBackend(gpu=TARGET, seed=args.seed), dry_run=True, budget_s=args.budget_s)
    for spec in SURVEY.values():
        started = time.monotonic()
        entries = select_pool(spec, args.random, args.best, args.sim_trials, seed=args.seed)
        for e in entries:
            session.writer.candidate(e.candidate, features=candidate_features(e.candidate, gpu),
                                     selected_by=e.selected_by, template=e.template)
            session.pool.setdefault(spec, {})[e.candidate.structural_hash] = Member(e.candidate, None, e.selected_by,
                                                                                    e.template)
        log(f"{spec}: {len(entries)} candidates in {time.monotonic() - started:.0f} s")
    session.start = time.monotonic()  # the phases' clock starts when the GPU call would
    session.end = session.start + args.budget_s
    run_phases(session)


# ==================================================================================================
# Reading a session back

def report_markdown(dataset) -> str:
    """A dataset's phases, checks, acceptance, survey and vendor figures as Markdown."""
    from etune.measurements.dataset import frame

    h = dataset.header
    label = "sim (model outputs, not hardware)" if h.get("backend") == "sim" else h.get("backend")
    lines = [f"# Device check: {h.get('gpu')} ({label}), {h.get('date')}", "",
             f"- driver {h.get('driver')}; versions {json.dumps(h.get('versions'))}",
             f"- command `{h.get('command')}`; dataset `{dataset.path.name}`"
             + (" (its last line was torn: the call was cut off)" if dataset.truncated else ""), "",
             "| phase | status | seconds | planned | result |", "|---|---|---|---|---|"]
    for row in dataset.of_type("phase"):
        lines.append(f"| {row['phase']} | {row['status']} | {row['seconds']:.0f} | {row['planned_s']} | "
                     f"{row.get('note') or row.get('error') or ''} |")
    checks = list(dataset.of_type("check"))
    if checks:
        lines += ["", "| check | workload | passed | detail |", "|---|---|---|---|"]
        for row in checks:
            detail = row.get("note") or "; ".join(str(e) for e in row.get("errors") or [] if e) or \
                (f"{row.get('ok')}/{row.get('of')}" if "of" in row else "")
            lines.append(f"| {row['check']} | {row.get('spec', '')} | {row.get('passed')} | {detail} |")
    for row in dataset.of_type("acceptance"):
        if row.get("error"):
            lines += ["", f"Energy acceptance ({row['spec']}): failed: {row['error']}"]
            continue
        power = row.get("difference_sampled_power")
        lines += ["", f"Energy acceptance ({row['spec']}, torch.matmul): {'passed' if row['passed'] else 'FAILED'}; "
                  f"median of 5 {1e3 * row['median_energy_j']:.2f} mJ, one 10 s window "
                  f"{1e3 * row['long_window_energy_j']:.2f} mJ ({row['difference']:+.2%}"
                  + (f"; against its integrated sampled power {power:+.2%}" if power is not None else "")
                  + f"), CV {row['cv']:.2%} (targets: within 3 %, CV <= 1 %)"]
    table = frame(dataset)
    if not table.empty:
        lines += ["", "| workload | candidates | latency ok | energy ok | fastest us | least energy mJ | "
                  "power W (min-max) | vendor us | vendor mJ | best/vendor energy |", "|---|---|---|---|---|---|---|---|---|---|"]
        for spec, rows in table.groupby("spec", sort=False):
            mine = rows[rows["vendor"].isna() & rows["structural_hash"].notna()]
            vendor = rows[rows["structural_hash"].isna()]
            v_lat = vendor["latency_s"].dropna()
            v_energy = vendor["energy_j"].dropna()
            lat, energy, power = mine["latency_s"].dropna(), mine["energy_j"].dropna(), mine["avg_power_w"].dropna()
            ratio = energy.min() / v_energy.iloc[0] if len(energy) and len(v_energy) else None
            cells = [spec, len(mine), len(lat), len(energy),
                     f"{lat.min() * 1e6:.1f}" if len(lat) else "-", f"{energy.min() * 1e3:.3f}" if len(energy) else "-",
                     f"{power.min():.0f}-{power.max():.0f}" if len(power) else "-",
                     f"{v_lat.iloc[0] * 1e6:.1f}" if len(v_lat) else "-", f"{v_energy.iloc[0] * 1e3:.3f}" if len(v_energy) else "-",
                     f"{ratio:.2f}x" if ratio else "-"]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def import_results(args) -> None:
    """A device call's files (``dataset.jsonl``, ``device_check.log``, ``nvidia-smi.txt``) into
    ``data/hw/<date>-<gpu>.*``, the dataset gzipped, with its Markdown report beside it."""
    import re

    from etune.measurements.dataset import compress, load_dataset

    dataset = load_dataset(args.dir / "dataset.jsonl")
    name = args.name or f"{dataset.header['date'][:10]}-{re.sub(r'[^a-z0-9]+', '-', dataset.gpu.lower()).strip('-')}"
    target = ROOT / "data" / "hw"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(args.dir / "dataset.jsonl", target / f"{name}.jsonl")
    compressed = compress(target / f"{name}.jsonl")
    for extra, suffix in (("device_check.log", "log"), ("nvidia-smi.txt", "nvidia-smi.txt")):
        if (args.dir / extra).exists():
            shutil.copy2(args.dir / extra, target / f"{name}.{suffix}")
    text = report_markdown(load_dataset(compressed))
    (target / f"{name}.md").write_text(text)
    print(text)
    print(f"written: {compressed.relative_to(ROOT)} and data/hw/{name}.md; add the figures to docs/results.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("prepare", help="on the CPU machine: pool, runnable builds, runtime-only TVM into --pack")
    p.add_argument("--pack", type=Path, default=PACK)
    p.add_argument("--workdir", type=Path, default=ROOT / ".etune" / "device-builds")
    p.add_argument("--random", type=int, default=16)
    p.add_argument("--best", type=int, default=8)
    p.add_argument("--sim-trials", type=int, default=32)
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("run", help="on the GPU: the phases, from --pack, into --out")
    p.add_argument("--pack", type=Path, default=PACK)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/device_check")))
    p.add_argument("--budget-s", type=float, default=BUDGET_S)
    p = sub.add_parser("import", help="here, after the call: the returned files into data/hw/")
    p.add_argument("dir", type=Path, help="the folder the device call's files came back to")
    p.add_argument("--name", help="file name stem under data/hw/ (default: <date>-<gpu>)")
    p = sub.add_parser("dry-run", help="on a CPU machine: every phase on sim, a small pool, no builds")
    p.add_argument("--out", type=Path, default=Path("out/device_check_dry_run"))
    p.add_argument("--random", type=int, default=4)
    p.add_argument("--best", type=int, default=2)
    p.add_argument("--sim-trials", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=BUDGET_S)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.mode in ("run", "dry-run"):
        args.out.mkdir(parents=True, exist_ok=True)
    {"prepare": prepare, "run": run, "dry-run": dry_run, "import": import_results}[args.mode](args)


if __name__ == "__main__":
    main()
