"""The ``nvml`` backend: latency and energy of built candidates on a real NVIDIA GPU.

Where things run. The parent (the tuner's process) holds NVML, the per-GPU lock and the idle power;
every kernel runs in an `IsolatedRunner` worker process, so a kernel that faults, hangs or kills its
CUDA context costs one failed result ("worker crashed (signal 6, SIGABRT)", "timed out after 60 s",
"RuntimeError: CUDA: an illegal memory access was encountered") and the next candidate runs in a
fresh worker. The worker is also replaced after any task that raised, because a CUDA error such as an
illegal address leaves the context unusable while the process lives on. The worker keeps the
workload's random inputs and numpy reference outputs between candidates (computing a float64
reference of a large GEMM or attention takes seconds to minutes; it is done once per worker).

Every measurement starts with a check: the library's ``main`` on random inputs (not constants: GEMM
power depends on the values) into NaN-poisoned outputs, compared with the workload's reference. A
wrong answer is a failed result, "wrong output (rel err ...)", and no number is kept.

Latency: TVM's ``time_evaluator`` on the loaded runtime module (it exists in TVM 0.27 for a module
from ``load_module``; only the ``Executable`` of ``tvm.compile`` lacks it). It launches the calls
back-to-back from C++ and times them with CUDA events on TVM's stream (``Timer::Start(dev)``, the CUDA
timer). ``number`` calls per repeat are chosen so a repeat takes ~1 ms of GPU time (well above event
resolution, and cheap), after ~50 ms of warm-up to bring the clocks up; value = median seconds per
call over the repeats, spread = their coefficient of variation.

Energy: docs/design.md's protocol (`nvml_energy.measure_energy`) with the GPU lock held and idle power
measured once per backend. One "launch" of the protocol is one ``time_evaluator`` call with
``number=N, repeat=1, min_repeat_ms=0``: N + 1 calls (TVM adds one untimed warm-up call) issued
back-to-back by C++, so kernels of ~10 us keep the GPU busy, which one Python call per kernel cannot
do. N is chosen so a launch takes ~5 ms: long against the idle gap between launches (the evaluator
syncs at its end, then Python starts the next one: tens of us, < 1 %), short against the ~100 ms
counter step, so detecting the window edges (one launch each) adds ~0.2 % noise to a 1 s window.
Energy per call = energy per launch / (N + 1). A CUDA graph would remove the gaps but TVM launches on
its own stream, which torch or cupy cannot capture without changing how TVM was built; the vendor
references (torch) do use CUDA graphs (measurements.vendor). ``details["busy_fraction"]`` (event-timed
GPU time / wall time) shows how busy the GPU actually was.
"""
from __future__ import annotations

import logging
import math
import os
import statistics
import time
from typing import Sequence

import pynvml

from .backend import Backend, BackendError, DeviceInfo, MeasureResult, Progress, check_kind
from .gpu_lock import GpuBusyError, GpuLock
from .nvml_energy import NvmlEnergySource, measure_energy, measure_idle_power
from .runner import IsolatedRunner, TaskResult
from .stats import coefficient_of_variation

log = logging.getLogger(__name__)

LATENCY_REPEAT_S = 1e-3  # GPU time of one latency repeat
LATENCY_WARMUP_S = 0.05
LATENCY_BUDGET_S = 2.0  # repeats are cut down for slow kernels so one latency costs about this
ENERGY_BATCH_S = 5e-3  # GPU time of one energy launch (a time_evaluator batch)
PREPARE_TIMEOUT_S = 900.0  # random inputs + float64 numpy reference of the largest suite workload


# ==================================================================================================
# Worker side: these functions run in the IsolatedRunner's worker process.

_STATE: dict = {"prepared": None, "sources": {}}


def _worker_env() -> None:
    # CUDA numbers GPUs fastest-first unless told otherwise; NVML (and nvidia-smi, and GpuLock)
    # use PCI bus order. Only effective before this process makes its first CUDA call.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


class _Prepared:
    def __init__(self, spec: str, seed: int):
        from etune.kernels import parse_spec

        started = time.perf_counter()
        self.spec, self.seed = spec, seed
        self.workload = parse_spec(spec)
        self.inputs = self.workload.random_inputs(seed)
        self.reference = self.workload.reference(self.inputs)
        self.seconds = time.perf_counter() - started
        self._device_inputs: dict = {}

    def device_inputs(self, device) -> list:
        import tvm

        key = (device.dlpack_device_type(), device.index)
        if key not in self._device_inputs:
            self._device_inputs[key] = [tvm.runtime.tensor(a, device) for a in self.inputs]
        return self._device_inputs[key]


def _prepared(spec: str, seed: int) -> _Prepared:
    current = _STATE["prepared"]
    if current is None or (current.spec, current.seed) != (spec, seed):
        _STATE["prepared"] = None  # one workload at a time: references can be large
        _STATE["prepared"] = _Prepared(spec, seed)
    return _STATE["prepared"]


def prepare_task(spec: str, seed: int) -> dict:
    """Make (or find) the workload's inputs and reference in this worker."""
    _worker_env()
    prepared = _prepared(spec, seed)
    return {"seconds": prepared.seconds}


def _source(nvml_index: int) -> NvmlEnergySource:
    sources = _STATE["sources"]
    if nvml_index not in sources:
        sources[nvml_index] = NvmlEnergySource.open(nvml_index)
    return sources[nvml_index]


def _safe(read):
    try:
        return float(read())
    except Exception:  # noqa: BLE001 - telemetry annotates, it must not fail a measurement
        return None


def _telemetry(source: NvmlEnergySource) -> dict:
    return {"temperature_c": _safe(source.temperature_c), "sm_clock_mhz": _safe(source.sm_clock_mhz)}


def _median_of(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class _TvmTimer:
    """time_evaluator helpers around one loaded module and its argument tensors."""

    def __init__(self, module, device, args):
        self.module, self.device, self.args = module, device, args

    def evaluate(self, number: int, repeat: int) -> list[float]:
        evaluator = self.module.time_evaluator("main", self.device, number=number, repeat=repeat,
                                               min_repeat_ms=0)
        return list(evaluator(*self.args).results)

    def per_call(self) -> float:
        """Rough seconds per call from three single timed calls."""
        return max(statistics.median(self.evaluate(1, 3)), 1e-7)

    def warm_up(self, per_call: float, seconds: float) -> None:
        self.evaluate(max(1, math.ceil(seconds / per_call)), 1)


def _latency(timer: _TvmTimer, options: dict) -> dict:
    per_call = timer.per_call()  # 4 calls: warm-up enough for a slow kernel
    if per_call < options["latency_repeat_s"]:  # a fast one: bring the clocks up, then size again
        timer.warm_up(per_call, options["latency_warmup_s"])
        per_call = max(statistics.median(timer.evaluate(max(1, math.ceil(1e-3 / per_call)), 3)), 1e-7)
    number = max(1, math.ceil(options["latency_repeat_s"] / per_call))
    repeats = max(3, min(options["latency_repeats"], math.ceil(options["latency_budget_s"] / (number * per_call))))
    times = timer.evaluate(number, repeats)
    median = statistics.median(times)
    return {
        "ok": True,
        "value": median,
        "spread": coefficient_of_variation(times),
        "details": {"min_s": min(times), "median_s": median, "mean_s": statistics.fmean(times),
                    "repeats": repeats, "number": number,
                    "timer": "tvm time_evaluator (CUDA events, back-to-back calls)"},
    }


def energy_record(result, calls_per_launch: int, extra: dict | None = None) -> dict:
    """An `EnergyResult` whose launches were batches of ``calls_per_launch`` calls, per call."""
    c = calls_per_launch
    windows = [
        {"calls": w.launches * c, "seconds": w.seconds, "joules": w.joules,
         "joules_per_call": w.joules_per_call / c, "seconds_per_call": w.seconds_per_call / c,
         "avg_power_w": w.avg_power_w, "temperature_c": w.temperature_c, "sm_clock_mhz": w.sm_clock_mhz,
         "power_w": w.power_w,
         "sampled_joules_per_call": None if w.sampled_joules is None else w.sampled_joules / (w.launches * c)}
        for w in result.windows
    ]
    energy = result.energy_per_call_j / c
    latency = result.latency_per_call_s / c
    above = result.energy_above_idle_per_call_j
    details = {
        "latency_s": latency,
        "avg_power_w": energy / latency if latency > 0 else None,
        "idle_power_w": result.idle_power_w,
        "energy_above_idle_j": None if above is None else above / c,
        "windows": windows,
        "converged": result.converged,
        "method": result.method,
        "calls_per_launch": c,
        **(extra or {}),
    }
    return {
        "ok": True,
        "value": energy,
        "spread": result.cv,
        "details": details,
        "temperature_c": _median_of(w.temperature_c for w in result.windows),
        "sm_clock_mhz": _median_of(w.sm_clock_mhz for w in result.windows),
    }


def _energy_options(options: dict) -> dict:
    return {"min_window_s": options["min_window_s"], "max_windows": options["max_windows"],
            "target_cv": options["target_cv"], "idle_power_w": options["idle_power_w"],
            "integrate_power": options.get("integrate_power", False)}


def _energy(timer: _TvmTimer, source: NvmlEnergySource, options: dict) -> dict:
    per_call = timer.per_call()
    number = max(1, round(options["energy_batch_s"] / per_call))
    evaluator = timer.module.time_evaluator("main", timer.device, number=number, repeat=1, min_repeat_ms=0)
    device_per_call: list[float] = []

    def launch() -> None:  # synchronous: the evaluator waits for its own end event
        device_per_call.append(evaluator(*timer.args).results[0])

    result = measure_energy(launch, source, sync=timer.device.sync, **_energy_options(options))
    calls = number + 1
    record = energy_record(result, calls)
    device_latency = statistics.median(device_per_call)
    wall_latency = record["details"]["latency_s"]
    record["details"].update({
        "launch": f"tvm time_evaluator batch: {number} timed + 1 warm-up call",
        "device_latency_s": device_latency,
        # GPU time of the N timed calls (events) over wall time of the N + 1 calls, per call
        "busy_fraction": min(1.0, device_latency / wall_latency) if wall_latency > 0 else None,
    })
    return record


def candidate_task(spec: str, library: str, kind: str, options: dict) -> dict:
    """Check, then measure ``kind`` for one built library. Runs in the worker."""
    _worker_env()
    import tvm

    from .tvm_runner import cuda_runtime_problem, describe_mismatch, run_once

    prepared = _prepared(spec, options["seed"])
    workload = prepared.workload
    # device_type and energy_source exist for tests: the same code on an llvm library and a fake meter.
    device_type = options.get("device_type", "cuda")
    problem = cuda_runtime_problem() if device_type == "cuda" else None
    device = tvm.device(device_type, options["cuda_index"])
    if not device.exist:
        raise RuntimeError(f"TVM sees no CUDA device {options['cuda_index']}: {problem or 'is this TVM built with CUDA?'}")
    module = tvm.runtime.load_module(library)
    args, outputs = run_once(module["main"], workload, prepared.device_inputs(device), device)
    ok, rel_err = workload.check(outputs, prepared.reference)
    checked = {"checked": True, "rel_err": rel_err}
    if not ok:
        return {"ok": False, "error": describe_mismatch(workload, rel_err), "details": checked}
    timer = _TvmTimer(module, device, args)
    source = options.get("energy_source") or _source(options["nvml_index"])
    if kind == "latency":
        record = _latency(timer, options)
        record.update(_telemetry(source))
    else:
        record = _energy(timer, source, options)
    record["details"].update(checked)
    return record


def vendor_task(spec: str, kind: str, options: dict) -> dict:
    """Check, then measure ``kind`` for the vendor kernel of the workload. Runs in the worker."""
    _worker_env()
    from . import vendor
    from .tvm_runner import describe_mismatch

    prepared = _prepared(spec, options["seed"])
    batch = {"graph_batch_s": options["vendor_graph_batch_s"]} if options.get("vendor_graph_batch_s") else {}
    kernel = vendor.prepare(prepared.workload, device_index=options["cuda_index"], inputs=prepared.inputs,
                            reference=prepared.reference, **batch)
    facts = vendor.describe(kernel)
    if not kernel.ok:
        return {"ok": False, "error": describe_mismatch(prepared.workload, kernel.rel_err), "details": facts}
    source = _source(options["nvml_index"])
    if kind == "latency":
        timing = kernel.latency(repeats=options["latency_repeats"], repeat_s=options["latency_repeat_s"],
                                warmup_s=options["latency_warmup_s"], budget_s=options["latency_budget_s"])
        cv = timing.pop("cv")
        record = {"ok": True, "value": timing["median_s"], "spread": cv, "details": {**timing, **facts}}
        record.update(_telemetry(source))
        return record
    result = measure_energy(kernel.launch, source, sync=kernel.sync, **_energy_options(options))
    record = energy_record(result, kernel.calls_per_launch, facts)
    record["details"]["launch"] = (f"CUDA graph replay of {kernel.calls_per_launch} calls"
                                   if kernel.batching == "cuda-graph" else "one Python call per launch")
    return record


# ==================================================================================================
# Parent side.

def _cuda_index(nvml_index: int, handle) -> int:
    """The CUDA ordinal of NVML device ``nvml_index`` under CUDA_DEVICE_ORDER=PCI_BUS_ID, honouring
    CUDA_VISIBLE_DEVICES when it lists indices or UUIDs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return nvml_index
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    try:
        uuid = pynvml.nvmlDeviceGetUUID(handle)
    except pynvml.NVMLError:
        uuid = None
    for position, entry in enumerate(entries):
        if entry == str(nvml_index) or (uuid and (entry == uuid or uuid.startswith(entry))):
            return position
    raise BackendError(f"nvml backend: GPU {nvml_index} is not in CUDA_VISIBLE_DEVICES={visible}")


def _reason_not_runnable(build) -> str | None:
    if build is None:
        return "not built: the nvml backend runs the built library"
    if not build.ok:
        return f"build {build.status}: {build.error or 'no reason given'}"
    if not build.runnable:
        return ("built without a CUDA-enabled TVM runtime: the library cannot launch kernels "
                "(rebuild where TVM has CUDA)")
    if not build.library or not os.path.isfile(build.library):
        return f"built library missing: {build.library}"
    return None


class NvmlBackend(Backend):
    """Measures on NVIDIA GPU ``device_index`` (NVML numbering, as nvidia-smi shows it)."""

    name = "nvml"

    def __init__(self, device_index: int = 0, min_window_s: float = 1.0, max_windows: int = 10,
                 target_cv: float = 0.01, latency_repeats: int = 20, timeout_s: float | None = None,
                 lock_wait: bool = True, lock_timeout_s: float | None = None, seed: int = 0,
                 energy_batch_s: float = ENERGY_BATCH_S, idle_settle_s: float = 0.5,
                 vendor_graph_batch_s: float | None = None, integrate_power: bool = False):
        self.device_index = int(device_index)
        self.min_window_s, self.max_windows, self.target_cv = min_window_s, max_windows, target_cv
        self.latency_repeats = latency_repeats
        self.timeout_s = timeout_s
        self.lock_wait, self.lock_timeout_s = lock_wait, lock_timeout_s
        self.seed = seed
        self.energy_batch_s = energy_batch_s
        self.idle_settle_s = idle_settle_s
        # For reference measurements: vendor launches of another length, and sampled power integrated
        # over every counter window (benchmarks/device_check.py's acceptance phase).
        self.vendor_graph_batch_s = vendor_graph_batch_s
        self.integrate_power = integrate_power
        self._idle_power_w: float | None = None
        self._idle_error: str | None = None
        self._runner: IsolatedRunner | None = None
        self._handle = self._open_nvml()
        self._source = NvmlEnergySource(self._handle, index=self.device_index, owns_init=True)
        try:
            self.cuda_index = _cuda_index(self.device_index, self._handle)
        except BaseException:
            self._source.close()
            raise

    # -- NVML ----------------------------------------------------------------------------------
    def _open_nvml(self):
        """NVML initialised (once more) and the device's handle; one readable BackendError if not."""
        try:
            pynvml.nvmlInit()
        except (pynvml.NVMLError, OSError) as exc:
            raise BackendError(f"nvml backend: NVML is not available ({exc}); no NVIDIA driver or GPU "
                               "here? Use --backend sim to run without a GPU") from None
        try:
            count = pynvml.nvmlDeviceGetCount()
            if count == 0:
                raise BackendError("nvml backend: NVML found no NVIDIA GPU; use --backend sim")
            if not 0 <= self.device_index < count:
                raise BackendError(f"nvml backend: no GPU {self.device_index} (NVML sees {count})")
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
        except BaseException as exc:
            pynvml.nvmlShutdown()
            if isinstance(exc, pynvml.NVMLError):
                raise BackendError(f"nvml backend: cannot open GPU {self.device_index}: {exc}") from None
            raise
        return handle

    def device(self) -> DeviceInfo:
        handle = self._handle
        details: dict = {"index": self.device_index, "cuda_index": self.cuda_index}

        def read(key, fn, scale=1.0):
            try:
                value = fn()
            except (pynvml.NVMLError, AttributeError):
                return
            details[key] = value / scale if isinstance(value, (int, float)) and scale != 1.0 else value

        read("power_limit_w", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle), 1000.0)
        read("max_sm_clock_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM))
        read("max_mem_clock_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM))
        read("sm_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
        read("mem_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM))
        read("memory_total_gib", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).total, float(1 << 30))
        read("uuid", lambda: pynvml.nvmlDeviceGetUUID(handle))
        if self._idle_power_w is not None:
            details["idle_power_w"] = self._idle_power_w
        if self._idle_error is not None:
            details["idle_power_error"] = self._idle_error
        try:
            name = self._source.device_name()
        except pynvml.NVMLError:
            name = f"NVIDIA GPU {self.device_index}"
        try:
            driver = self._source.driver_version()
        except pynvml.NVMLError:
            driver = None
        return DeviceInfo("nvml", name, driver, details)

    def measure_idle_power(self) -> float | None:
        """Idle power in W, measured once per backend (with the GPU lock held by the caller)."""
        if self._idle_power_w is None and self._idle_error is None:
            time.sleep(self.idle_settle_s)  # let the last kernels' clocks and power settle
            try:
                self._idle_power_w = measure_idle_power(self._source)
                log.info("idle power of GPU %d: %.1f W", self.device_index, self._idle_power_w)
            except Exception as exc:  # noqa: BLE001 - energy is still measured, only not split
                self._idle_error = f"{type(exc).__name__}: {exc}"
                log.warning("idle power unavailable: %s", self._idle_error)
        return self._idle_power_w

    # -- running -------------------------------------------------------------------------------
    @property
    def runner(self) -> IsolatedRunner:
        if self._runner is None:
            self._runner = IsolatedRunner(timeout_s=self._timeout("latency"), restart_after_error=True)
        return self._runner

    def _timeout(self, kind: str) -> float:
        if self.timeout_s is not None:
            return float(self.timeout_s)
        if kind == "energy":  # warm-up, up to max_windows windows and their edges, with margin
            return 60.0 + 3.0 * self.max_windows * self.min_window_s
        return 60.0

    def _options(self) -> dict:
        return {
            "seed": self.seed, "nvml_index": self.device_index, "cuda_index": self.cuda_index,
            "latency_repeats": self.latency_repeats, "latency_repeat_s": LATENCY_REPEAT_S,
            "latency_warmup_s": LATENCY_WARMUP_S, "latency_budget_s": LATENCY_BUDGET_S,
            "energy_batch_s": self.energy_batch_s, "min_window_s": self.min_window_s,
            "max_windows": self.max_windows, "target_cv": self.target_cv,
            "idle_power_w": self._idle_power_w, "vendor_graph_batch_s": self.vendor_graph_batch_s,
            "integrate_power": self.integrate_power,
        }

    def _lock(self) -> GpuLock:
        return GpuLock(self.device_index, wait=self.lock_wait, timeout=self.lock_timeout_s)

    def _acquire(self) -> GpuLock:
        lock = self._lock()
        try:
            return lock.acquire()
        except GpuBusyError as exc:
            raise BackendError(f"nvml backend: {exc}") from None

    def _prepare(self, spec: str) -> TaskResult:
        return self.runner.run(prepare_task, (spec, self.seed), timeout_s=PREPARE_TIMEOUT_S)

    def _run(self, fn, args: tuple, kind: str, structural_hash: str | None, spec: str,
             extra_timeout_s: float = 0.0) -> MeasureResult:
        started = time.time()
        prepared = self._prepare(spec)
        if not prepared.ok:
            return MeasureResult(structural_hash, kind, False,
                                 error=f"preparing inputs and reference failed: {prepared.error}",
                                 started_at=started, finished_at=time.time())
        task = self.runner.run(fn, args, timeout_s=self._timeout(kind) + extra_timeout_s)
        finished = time.time()
        if not task.ok:
            return MeasureResult(structural_hash, kind, False, error=task.error, started_at=started,
                                 finished_at=finished, details={"failure": task.status})
        record = task.value
        if not record.get("ok"):
            return MeasureResult(structural_hash, kind, False, error=record.get("error"),
                                 details=record.get("details") or {}, started_at=started, finished_at=finished)
        return MeasureResult(structural_hash, kind, True, value=record["value"], spread=record.get("spread"),
                             details=record.get("details") or {}, sm_clock_mhz=record.get("sm_clock_mhz"),
                             temperature_c=record.get("temperature_c"), started_at=started, finished_at=finished)

    def measure(self, candidates: Sequence, kind: str, builds: Sequence | None = None,
                progress: Progress | None = None) -> list[MeasureResult]:
        check_kind(kind)
        if builds is None:
            raise ValueError("the nvml backend runs built code: pass the candidates' builds")
        if len(builds) != len(candidates):
            raise ValueError(f"{len(candidates)} candidates but {len(builds)} builds")
        results: list[MeasureResult] = []
        # Inputs and reference outputs are CPU work (minutes for a float64 attention reference):
        # made before the GPU is locked; inside, the worker finds them cached.
        for spec in dict.fromkeys(c.workload.spec for c, b in zip(candidates, builds)
                                  if _reason_not_runnable(b) is None):
            self._prepare(spec)
        lock = self._acquire()
        try:
            if kind == "energy":
                self.measure_idle_power()
            options = self._options()
            for candidate, build in zip(candidates, builds):
                structural_hash = candidate.structural_hash
                reason = _reason_not_runnable(build)
                if reason is not None:
                    now = time.time()
                    result = MeasureResult(structural_hash, kind, False, error=reason, started_at=now,
                                           finished_at=now, details={"failure": "not runnable"})
                else:
                    spec = candidate.workload.spec
                    result = self._run(candidate_task, (spec, build.library, kind, options), kind,
                                       structural_hash, spec)
                if progress is not None:
                    progress(result)
                results.append(result)
        finally:
            lock.release()
        return results

    def measure_vendor(self, workload, kind: str) -> MeasureResult:
        import importlib.util

        from .vendor import VendorError, vendor_name

        check_kind(kind)
        name = vendor_name(workload)
        if importlib.util.find_spec("torch") is None:  # the worker would only fail later
            raise VendorError("vendor references need PyTorch with CUDA (pip install torch)")
        self._prepare(workload.spec)
        lock = self._acquire()
        try:
            if kind == "energy":
                self.measure_idle_power()
            result = self._run(vendor_task, (workload.spec, kind, self._options()), kind, None, workload.spec,
                               extra_timeout_s=60.0)  # importing torch and capturing the graph
        finally:
            lock.release()
        result.details.setdefault("vendor", name)
        return result

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        self._source.close()
