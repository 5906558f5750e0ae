"""Parallel CUDA builds of candidates, each in a worker process with a time-out.

One build: the candidate's trace is replayed on the workload, TVM lowers it and generates CUDA, and
nvcc compiles that CUDA to a cubin for the target's arch with ptxas' resource report (registers,
spills, shared memory per kernel: features for the energy model). On a host whose TVM runtime has
CUDA, TVM calls ``tvm_callback_cuda_compile``; etune registers its own callback so TVM gets that same
cubin and each candidate is compiled once. A CPU-only TVM (CI, laptops) never calls the callback and
keeps the source; etune then compiles the source itself, so "built" means the same thing everywhere:
nvcc produced a cubin for the arch.

Why builds failed on the 16-core H100 host (docs/design.md): MetaSchedule's LocalBuilder gives every build
30 s and 16 nvcc runs in parallel took longer. Here the time-out comes from the workload and the
number of parallel jobs per core, a time-out is reported as such, and a build that timed out never
poisons the next one (its worker is replaced).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .targets import PASS_CONFIG, GpuSpec, gpu_spec

NVCC_FLAGS = ("-O3", "--use_fast_math", "-Xptxas", "-v")


class BuildError(RuntimeError):
    pass


@dataclasses.dataclass
class KernelResources:
    name: str
    registers: int
    shared_bytes: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int


@dataclasses.dataclass
class BuildResult:
    structural_hash: str
    status: str  # ok | error | timeout
    seconds: float
    error: str | None = None
    artifact_dir: str | None = None
    # The exported library can run kernels only when TVM compiled it (CUDA-enabled runtime).
    runnable: bool = False
    kernels: list[KernelResources] = dataclasses.field(default_factory=list)
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def library(self) -> str | None:
        return str(Path(self.artifact_dir) / "lib.so") if self.artifact_dir else None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "BuildResult":
        data = dict(data)
        data["kernels"] = [KernelResources(**k) for k in data.get("kernels", [])]
        return cls(**data)


# -- nvcc -------------------------------------------------------------------------------------------
_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_report(text: str) -> list[KernelResources]:
    kernels: list[KernelResources] = []
    current: dict | None = None
    for line in text.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            current = {"name": m.group(1), "registers": 0, "shared_bytes": 0, "stack_bytes": 0,
                       "spill_store_bytes": 0, "spill_load_bytes": 0}
            kernels.append(current)  # type: ignore[arg-type]
        elif current is not None and (m := _PTXAS_FRAME.search(line)):
            current.update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                           spill_load_bytes=int(m.group(3)))
        elif current is not None and (m := _PTXAS_USED.search(line)):
            current.update(registers=int(m.group(1)), shared_bytes=int(m.group(2) or 0))
    return [KernelResources(**k) for k in kernels]  # type: ignore[arg-type]


def find_nvcc() -> str:
    for candidate in (shutil.which("nvcc"), os.environ.get("CUDA_HOME", "") + "/bin/nvcc", "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise BuildError("nvcc not found: install the CUDA toolkit or put nvcc on PATH (or set CUDA_HOME)")


# PTX instructions that exist only for the architecture-specific target of their arch ("sm_90a"):
# ptxas refuses them for plain sm_90 ("Instruction 'wgmma.fence' not supported on .target 'sm_90'").
_ARCH_SPECIFIC = {"sm_90": ("wgmma.", "setmaxnreg.")}


def arch_for_source(source: str, arch: str) -> str:
    """The arch nvcc compiles ``source`` for: ``arch`` with the "a" suffix (sm_90 -> sm_90a) where the
    source uses an instruction only that target has (wgmma), else ``arch``. TVM 0.27 emits the same
    CUDA for the sm_90 and sm_90a targets, so only nvcc's -arch tells them apart; an sm_90a cubin
    runs on compute capability 9.0 (H100, H200) and nowhere else."""
    if any(instruction in source for instruction in _ARCH_SPECIFIC.get(arch, ())):
        return arch + "a"
    return arch


def nvcc_compile(source: str, arch: str, workdir: Path) -> tuple[bytes, list[KernelResources]]:
    """CUDA source to a cubin for ``arch`` (``arch_for_source``), with ptxas' per-kernel resource
    report."""
    arch = arch_for_source(source, arch)
    src = workdir / "kernel.cu"
    cubin = workdir / "kernel.cubin"
    src.write_text(source)
    cmd = [find_nvcc(), "-cubin", f"-arch={arch}", *NVCC_FLAGS, "-o", str(cubin), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [l for l in proc.stderr.splitlines() if "error" in l.lower()] or proc.stderr.splitlines()[-3:]
        raise BuildError("nvcc: " + " | ".join(e.strip() for e in errors[:3]))
    return cubin.read_bytes(), parse_ptxas_report(proc.stderr)


# -- the worker ----------------------------------------------------------------------------------
_MATRIX_C_LAYOUT = "tirx.index_map_m16n8k8.matrixC"


def register_mma_layouts() -> None:
    """The accumulator layout of the ``mma`` rule set's m16n8k8 fragments, which TVM's
    TransformMmaBufferLayout pass looks up by name when lowering.

    TVM registers it in ``tvm.s_tir.tensor_intrin.cuda``, whose import takes ~17 s (rules.py), so a
    process that lowers scheduled modules without having imported it (build workers, exports)
    registers the same map here: element (i, j) of a 16x8 tile at [i/8/2, j/8, i/8 % 2, j % 8 % 2].
    """
    import tvm_ffi

    if tvm_ffi.get_global_func(_MATRIX_C_LAYOUT, allow_missing=True) is not None:
        return
    from tvm.runtime import convert

    def matrix_c(indices):
        i, j = indices[0], indices[1]
        return convert([(i // 8) // 2, j // 8, (i // 8) % 2, (j % 8) % 2])

    tvm_ffi.register_global_func(_MATRIX_C_LAYOUT, matrix_c)


def forget_mma_layouts() -> None:
    """Drop the layout ``register_mma_layouts`` registered, before TVM's module registers its own."""
    import tvm_ffi

    if tvm_ffi.get_global_func(_MATRIX_C_LAYOUT, allow_missing=True) is not None:
        tvm_ffi.remove_global_func(_MATRIX_C_LAYOUT)


def compile_module(mod, gpu: GpuSpec):
    """``tvm.compile`` of a scheduled module for ``gpu`` as the search analysed it: with its passes
    (PASS_CONFIG: cp.async) and the mma accumulator layout registered. Kernels with shared.dyn are
    launched by TVM's CUDA runtime, which raises a function's dynamic shared-memory limit to what the
    launch asks (cuFuncSetAttribute), so tiles above 48 KiB run from a built library as well."""
    import tvm

    register_mma_layouts()
    target = gpu.tvm_target()
    with target, tvm.transform.PassContext(config=PASS_CONFIG):
        return tvm.compile(mod, target=target)


def _build_in_worker(module_json: str, gpu: dict, artifact_dir: str) -> dict:
    """Runs in a worker process: lower, generate CUDA, compile, export. Returns a dict.

    It gets the scheduled module itself, not the trace: replaying a tensor-core trace needs
    ``tvm.s_tir.tensor_intrin.cuda``, whose import alone takes ~17 s per process.
    """
    started = time.perf_counter()
    import tvm
    import tvm_ffi

    target_gpu = GpuSpec(**gpu)
    out = Path(artifact_dir)
    out.mkdir(parents=True, exist_ok=True)
    compiled: list[tuple[bytes, list[KernelResources]]] = []

    def compile_callback(code, *_):
        compiled.append(nvcc_compile(code, target_gpu.arch, out))
        return compiled[-1][0]

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_callback, override=True)
    try:
        executable = compile_module(tvm.ir.load_json(module_json), target_gpu)
        device_modules = [m for m in executable.mod.imports if m.kind == "cuda"]
        if not device_modules:
            raise BuildError("TVM produced no CUDA module")
        runnable = bool(compiled)
        if not compiled:  # CPU-only TVM: it kept the source; compile it the same way
            compiled.append(nvcc_compile(device_modules[0].inspect_source(), target_gpu.arch, out))
        executable.export_library(str(out / "lib.so"))
        return {"status": "ok", "runnable": runnable, "kernels": [dataclasses.asdict(k) for k in compiled[-1][1]],
                "seconds": time.perf_counter() - started}
    except Exception as exc:  # reported per candidate, never fatal to the batch
        message = str(exc).strip().splitlines()
        reason = next((l for l in reversed(message) if "Error" in l or "failed" in l.lower()), message[-1] if message else repr(exc))
        return {"status": "error", "error": f"{type(exc).__name__}: {reason.strip()[:500]}",
                "seconds": time.perf_counter() - started}


def _worker_init(parent_pid: int) -> None:
    """Runs first in each build worker: a worker dies with the etune process that started it."""
    import ctypes
    import signal

    # Ctrl-C in a terminal reaches the whole process group: the parent decides, and its pool kills
    # the workers when it stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # Linux: SIGKILL when the parent goes, even by SIGKILL (then nothing else would tell us)
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (AttributeError, OSError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def build_pool(jobs: int, timeout: float):
    """TVM's PopenPoolExecutor, with workers that die with this process."""
    from tvm.support.popen_pool import PopenPoolExecutor

    return PopenPoolExecutor(max_workers=jobs, timeout=timeout, initializer=_worker_init, initargs=(os.getpid(),))


def default_jobs() -> int:
    return max(1, os.cpu_count() or 1)


def default_timeout(workload, jobs: int) -> float:
    """Seconds one build may take: generous for big unrolled kernels, scaled by oversubscription.

    nvcc of a heavily unrolled 4096^3 GEMM candidate takes seconds of one core; with more parallel
    builds than cores each one slows down proportionally, which is what broke a fixed 30 s limit.
    """
    per_build = 60.0 if workload.flops >= 1e10 else 30.0
    oversubscription = max(1.0, jobs / max(1, os.cpu_count() or 1))
    return per_build * math.ceil(oversubscription) * 2


class Builder:
    """Builds candidates in parallel worker processes; results are cached by structural hash."""

    def __init__(self, gpu: GpuSpec | str = "h100", workdir: str | Path | None = None, jobs: int | None = None,
                 timeout_s: float | None = None, executor: Callable | None = None):
        """``executor(jobs, timeout_s)`` makes what runs ``_build_in_worker`` (``submit`` returning
        concurrent futures, ``shutdown``): local worker processes by default, Ray tasks on a cluster
        (tuner.cluster); it writes the artifacts into the directory it is given either way."""
        self.gpu = gpu_spec(gpu) if isinstance(gpu, str) else gpu
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="etune-build-"))
        self.jobs = jobs or default_jobs()
        self.timeout_s = timeout_s
        self.executor = executor or build_pool

    def artifact_dir(self, candidate) -> Path:
        safe_spec = re.sub(r"[^A-Za-z0-9_.-]+", "_", candidate.workload.spec)
        return self.workdir / self.gpu.arch / safe_spec / candidate.structural_hash

    def build(self, candidates: Sequence, progress: Callable[[BuildResult], None] | None = None) -> list[BuildResult]:
        """One BuildResult per candidate, in order; never raises for a candidate's failure."""
        import tvm

        results: list[BuildResult | None] = [None] * len(candidates)
        pending = []
        for i, candidate in enumerate(candidates):
            cached = self._cached(candidate)
            if cached is not None:
                results[i] = cached
                progress and progress(cached)
            else:
                pending.append(i)
        if pending:
            timeout = self.timeout_s or max(default_timeout(candidates[i].workload, self.jobs) for i in pending)
            gpu = dataclasses.asdict(self.gpu)
            pool = self.executor(min(self.jobs, len(pending)), timeout)
            try:
                futures = {
                    pool.submit(_build_in_worker, tvm.ir.save_json(candidates[i].mod), gpu,
                                str(self.artifact_dir(candidates[i]))): i
                    for i in pending
                }
                for future in concurrent.futures.as_completed(futures):
                    i = futures[future]
                    results[i] = self._finish(candidates[i], future, timeout)
                    progress and progress(results[i])
            finally:
                pool.shutdown(wait=False)
        return results  # type: ignore[return-value]

    def _finish(self, candidate, future, timeout: float) -> BuildResult:
        directory = self.artifact_dir(candidate)
        try:
            data = future.result()
        except (concurrent.futures.TimeoutError, TimeoutError):
            return BuildResult(candidate.structural_hash, "timeout", timeout, f"build timed out after {timeout:.0f} s")
        except Exception as exc:  # the worker died (crash in TVM or nvcc)
            return BuildResult(candidate.structural_hash, "error", 0.0, f"build worker failed: {exc!r}"[:500])
        result = BuildResult(
            structural_hash=candidate.structural_hash,
            status=data["status"],
            seconds=data["seconds"],
            error=data.get("error"),
            artifact_dir=str(directory) if data["status"] == "ok" else None,
            runnable=data.get("runnable", False),
            kernels=[KernelResources(**k) for k in data.get("kernels", [])],
        )
        if result.ok:
            (directory / "build.json").write_text(json.dumps(result.to_json()))
        return result

    def _cached(self, candidate) -> BuildResult | None:
        record = self.artifact_dir(candidate) / "build.json"
        if not record.exists():
            return None
        result = BuildResult.from_json(json.loads(record.read_text()))
        result.cached = True
        return result


def success_rate(results: Iterable[BuildResult]) -> tuple[int, int]:
    results = list(results)
    return sum(r.ok for r in results), len(results)
