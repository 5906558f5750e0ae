"""Energy per kernel call from the NVML energy counter (docs/design.md, "Energy measurement protocol").

The protocol is written against the small `EnergySource` interface so that it can be tested on a
simulated device; on a real GPU the source is `NvmlEnergySource`.

Why the windows look the way they do: the counter only moves in steps (~100 ms apart on an H100), so
a window must start and end on a step edge, be long (>= 1 s) compared with the step, and keep the GPU
busy the whole time. Both edges are found while the GPU is busy running short "edge" batches, so the
detection delay (at most one edge batch) is the same at both ends and cancels in expectation.
Consecutive windows share an edge, so the GPU never idles between them.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import pynvml

from .stats import coefficient_of_variation

log = logging.getLogger(__name__)

# nvmlDeviceGetTotalEnergyConsumption is an unsigned 64-bit millijoule count; a decrease is a wrap.
COUNTER_MODULUS = 2**64

Clock = Callable[[], float]
Sleep = Callable[[float], None]


class EnergyCounterUnsupported(RuntimeError):
    """The device has no usable energy counter (NVML says NOT_SUPPORTED, or it never moves)."""


class EnergySource(Protocol):
    """What the protocol needs from a device; `NvmlEnergySource` is the real one."""

    def total_energy_mj(self) -> int: ...

    def power_w(self) -> float: ...

    def temperature_c(self) -> float: ...

    def sm_clock_mhz(self) -> float: ...

    def device_name(self) -> str: ...

    def driver_version(self) -> str: ...


# ----------------------------------------------------------------------------------------------
# NVML


def nvml_available() -> bool:
    """True when an NVIDIA driver answers and reports at least one GPU."""
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError):
        return False
    try:
        return pynvml.nvmlDeviceGetCount() > 0
    except pynvml.NVMLError:
        return False
    finally:
        pynvml.nvmlShutdown()  # NVML counts init/shutdown pairs, so other users stay initialised


_FIELD_VALUE_MEMBER = {
    pynvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: "usVal",
}


class NvmlEnergySource:
    """`EnergySource` for one GPU through NVML (nvidia-ml-py). Only reads; never changes settings."""

    def __init__(self, handle, *, index: int | None = None, owns_init: bool = False):
        self._handle = handle
        self.index = index
        self._owns_init = owns_init
        self._instant_power = True  # cleared once the instantaneous-power field is seen to fail

    @classmethod
    def open(cls, index: int = 0) -> "NvmlEnergySource":
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError:
            pynvml.nvmlShutdown()
            raise
        return cls(handle, index=index, owns_init=True)

    def close(self) -> None:
        if self._owns_init:
            self._owns_init = False
            pynvml.nvmlShutdown()

    def __enter__(self) -> "NvmlEnergySource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def total_energy_mj(self) -> int:
        try:
            return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound) as exc:
            raise EnergyCounterUnsupported(f"NVML energy counter unavailable: {exc}") from exc

    def power_w(self) -> float:
        # nvmlDeviceGetPowerUsage is a ~1 s average on recent GPUs; the field is instantaneous.
        if self._instant_power:
            try:
                (fv,) = pynvml.nvmlDeviceGetFieldValues(
                    self._handle, [pynvml.NVML_FI_DEV_POWER_INSTANT]
                )
                if fv.nvmlReturn == pynvml.NVML_SUCCESS:
                    return getattr(fv.value, _FIELD_VALUE_MEMBER[fv.valueType]) / 1000.0
            except (pynvml.NVMLError, KeyError):
                pass
            self._instant_power = False
        return self.usage_power_w()

    def usage_power_w(self) -> float:
        """``nvmlDeviceGetPowerUsage``: the board's own (averaged) power reading."""
        return pynvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0

    def temperature_c(self) -> float:
        return float(pynvml.nvmlDeviceGetTemperature(self._handle, pynvml.NVML_TEMPERATURE_GPU))

    def sm_clock_mhz(self) -> float:
        return float(pynvml.nvmlDeviceGetClockInfo(self._handle, pynvml.NVML_CLOCK_SM))

    def device_name(self) -> str:
        return pynvml.nvmlDeviceGetName(self._handle)

    def driver_version(self) -> str:
        return pynvml.nvmlSystemGetDriverVersion()


# ----------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class EnergyWindow:
    """One timed window of back-to-back launches, with telemetry read in its middle."""

    launches: int
    seconds: float
    joules: float
    joules_per_call: float
    seconds_per_call: float
    avg_power_w: float
    t_start: float
    t_end: float
    temperature_c: float | None
    sm_clock_mhz: float | None
    power_w: float | None  # instantaneous reading, not the window average
    # With integrate_power: the window's energy from sampled power (nvmlDeviceGetPowerUsage), a second
    # reference that shares no code with the counter's.
    sampled_joules: float | None = None


@dataclass(frozen=True)
class EnergyResult:
    energy_per_call_j: float  # median over windows, idle power included
    latency_per_call_s: float  # median over windows, from wall time / launches
    cv: float | None  # coefficient of variation of J/call over windows (None with < 2 windows)
    windows: list[EnergyWindow]
    idle_power_w: float | None
    energy_above_idle_per_call_j: float | None  # None when idle power was not given
    method: str  # "counter" or "power-integration"
    converged: bool  # cv <= target_cv with >= 3 windows


@dataclass(frozen=True)
class _Telemetry:
    temperature_c: float | None = None
    sm_clock_mhz: float | None = None
    power_w: float | None = None


def _read_telemetry(source: EnergySource) -> _Telemetry:
    def safe(read: Callable[[], float]) -> float | None:
        # Telemetry only annotates a window; a failing sensor must not lose the measurement.
        try:
            return float(read())
        except Exception as exc:  # noqa: BLE001
            log.debug("telemetry read failed: %s", exc)
            return None

    return _Telemetry(safe(source.temperature_c), safe(source.sm_clock_mhz), safe(source.power_w))


def _make_window(launches: int, t0: float, t1: float, joules: float, tel: _Telemetry,
                 sampled_joules: float | None = None) -> EnergyWindow:
    seconds = t1 - t0
    window = EnergyWindow(
        launches=launches,
        seconds=seconds,
        joules=joules,
        joules_per_call=joules / launches,
        seconds_per_call=seconds / launches,
        avg_power_w=joules / seconds,
        t_start=t0,
        t_end=t1,
        temperature_c=tel.temperature_c,
        sm_clock_mhz=tel.sm_clock_mhz,
        power_w=tel.power_w,
        sampled_joules=sampled_joules,
    )
    log.info(
        "energy window: %d launches, %.3f s, %.3f J, %.6g J/call, %s C, %s MHz, %s W",
        window.launches, window.seconds, window.joules, window.joules_per_call,
        window.temperature_c, window.sm_clock_mhz, window.power_w,
    )
    return window


def _counter_delta_mj(e0: int, e1: int) -> int:
    return (e1 - e0) % COUNTER_MODULUS


# ----------------------------------------------------------------------------------------------
# Launching


class _Launcher:
    """Runs batches of back-to-back launches and sizes them from the measured time per call."""

    MAX_GROWTH = 16  # one fast first timing must not blow the batch size up

    def __init__(self, launch: Callable[[], None], sync: Callable[[], None], clock: Clock):
        self._launch = launch
        self._sync = sync
        self._clock = clock
        self._per_call_s: float | None = None
        self._largest = 1

    def size_for(self, seconds: float) -> int:
        cap = self._largest * self.MAX_GROWTH
        if self._per_call_s is None:
            return 1
        if self._per_call_s <= 0:  # the clock could not time the last batch: it was too short
            return cap
        return max(1, min(cap, round(seconds / self._per_call_s)))

    def run(self, n: int, during: Callable[[], None] | None = None) -> int:
        """Enqueue n launches, run `during` while the device works on them, then wait for them."""
        start = self._clock()
        for _ in range(n):
            self._launch()
        if during is not None:
            during()
        self._sync()
        self._per_call_s = (self._clock() - start) / n
        self._largest = max(self._largest, n)
        return n


@dataclass(frozen=True)
class _Options:
    min_window_s: float
    max_windows: int
    target_cv: float
    batch_s: float
    edge_batch_s: float
    edge_timeout_s: float
    sample_interval_s: float
    integrate_power: bool = False


def _warm_up(launcher: _Launcher, clock: Clock, warmup_s: float, batch_s: float) -> None:
    start = clock()
    while True:
        launcher.run(launcher.size_for(batch_s))
        if clock() - start >= warmup_s:
            return


def _run_body(launcher: _Launcher, source: EnergySource, clock: Clock, t0: float,
              opts: _Options) -> tuple[int, _Telemetry]:
    """Launch batches until min_window_s has passed since t0; read telemetry mid-window."""
    launches = 0
    telemetry: list[_Telemetry] = []

    def read_telemetry() -> None:  # runs while a batch is executing, so it sees a busy GPU
        telemetry.append(_read_telemetry(source))

    while clock() - t0 < opts.min_window_s:
        due = not telemetry and clock() - t0 >= opts.min_window_s / 2
        launches += launcher.run(launcher.size_for(opts.batch_s), read_telemetry if due else None)
    return launches, (telemetry[0] if telemetry else _read_telemetry(source))


def _busy_until_step(launcher: _Launcher, source: EnergySource, clock: Clock,
                     opts: _Options) -> tuple[float, int, int]:
    """Run short batches until the counter changes; return (time, counter, launches run)."""
    reference = source.total_energy_mj()
    since = clock()
    launches = 0
    while True:
        launches += launcher.run(launcher.size_for(opts.edge_batch_s))
        energy = source.total_energy_mj()
        now = clock()
        if energy != reference:
            return now, energy, launches
        if now - since > opts.edge_timeout_s:
            raise EnergyCounterUnsupported(
                f"energy counter did not move in {opts.edge_timeout_s} s of work"
            )


def _enough(windows: list[EnergyWindow], target_cv: float) -> bool:
    cv = coefficient_of_variation(w.joules_per_call for w in windows)
    return len(windows) >= 3 and cv is not None and cv <= target_cv


def _counter_windows(launcher: _Launcher, source: EnergySource, clock: Clock, sleep: Sleep,
                     opts: _Options) -> list[EnergyWindow]:
    windows: list[EnergyWindow] = []
    t0, e0, _ = _busy_until_step(launcher, source, clock, opts)
    while len(windows) < opts.max_windows and not _enough(windows, opts.target_cv):
        sampler = None
        if opts.integrate_power:
            read_power = getattr(source, "usage_power_w", source.power_w)
            first = (clock(), read_power())
            sampler = _PowerSampler(read_power, clock, sleep, opts.sample_interval_s)
            sampler.start()
        launches, telemetry = _run_body(launcher, source, clock, t0, opts)
        t1, e1, tail = _busy_until_step(launcher, source, clock, opts)
        sampled = None
        if sampler is not None:  # the samples' mean power over the counter's window
            samples = sorted([first, *sampler.stop(), (clock(), read_power())])
            if samples[-1][0] > samples[0][0]:
                sampled = _trapezoid_j(samples) / (samples[-1][0] - samples[0][0]) * (t1 - t0)
        joules = _counter_delta_mj(e0, e1) / 1000.0
        windows.append(_make_window(launches + tail, t0, t1, joules, telemetry, sampled))
        t0, e0 = t1, e1  # the next window starts on this window's closing edge
    return windows


class _PowerSampler:
    """Samples power on a background thread, so sampling continues while the main thread syncs."""

    def __init__(self, read: Callable[[], float], clock: Clock, sleep: Sleep, interval_s: float):
        self._read, self._clock, self._sleep, self._interval_s = read, clock, sleep, interval_s
        self._stop = threading.Event()
        self._samples: list[tuple[float, float]] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="etune-power-sampler", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._samples.append((self._clock(), self._read()))
                self._sleep(self._interval_s)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread in stop()
            self._error = exc

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._samples


def _trapezoid_j(samples: list[tuple[float, float]]) -> float:
    samples = sorted(samples)
    return sum((p0 + p1) / 2 * (t1 - t0) for (t0, p0), (t1, p1) in zip(samples, samples[1:]))


def _power_windows(launcher: _Launcher, source: EnergySource, clock: Clock, sleep: Sleep,
                   opts: _Options) -> list[EnergyWindow]:
    windows: list[EnergyWindow] = []
    while len(windows) < opts.max_windows and not _enough(windows, opts.target_cv):
        t0 = clock()
        samples = [(t0, source.power_w())]
        sampler = _PowerSampler(source.power_w, clock, sleep, opts.sample_interval_s)
        sampler.start()
        try:
            launches, telemetry = _run_body(launcher, source, clock, t0, opts)
        finally:
            samples += sampler.stop()
        t1 = clock()
        samples.append((t1, source.power_w()))
        windows.append(_make_window(launches, t0, t1, _trapezoid_j(samples), telemetry))
    return windows


# ----------------------------------------------------------------------------------------------
# Public entry points


def measure_energy(
    launch: Callable[[], None],
    source: EnergySource,
    *,
    sync: Callable[[], None],
    min_window_s: float = 1.0,
    max_windows: int = 10,
    target_cv: float = 0.01,
    warmup_s: float = 0.2,
    clock: Clock = time.perf_counter,
    sleep: Sleep = time.sleep,
    idle_power_w: float | None = None,
    batch_s: float = 0.02,
    edge_batch_s: float = 0.001,
    edge_timeout_s: float = 2.0,
    sample_interval_s: float = 0.015,
    integrate_power: bool = False,
) -> EnergyResult:
    """Energy per call of `launch` (one asynchronous kernel call); `sync` waits for the device.

    `sync` has no default on purpose: without a real device sync the windows would time the CPU.
    Pass `idle_power_w` (from `measure_idle_power`, measured once per session) to get the part of
    the energy above idle; it is not measured here because that would cost ~1 s per call.
    """
    if min_window_s <= 0 or max_windows < 1:
        raise ValueError("min_window_s must be > 0 and max_windows >= 1")
    opts = _Options(min_window_s, max_windows, target_cv, batch_s, edge_batch_s, edge_timeout_s,
                    sample_interval_s, integrate_power)
    launcher = _Launcher(launch, sync, clock)
    _warm_up(launcher, clock, warmup_s, batch_s)
    try:
        windows = _counter_windows(launcher, source, clock, sleep, opts)
        method = "counter"
    except EnergyCounterUnsupported as exc:
        log.warning("energy counter unusable (%s); integrating sampled power instead", exc)
        windows = _power_windows(launcher, source, clock, sleep, opts)
        method = "power-integration"

    energy = statistics.median(w.joules_per_call for w in windows)
    latency = statistics.median(w.seconds_per_call for w in windows)
    above_idle = None if idle_power_w is None else energy - idle_power_w * latency
    return EnergyResult(
        energy_per_call_j=energy,
        latency_per_call_s=latency,
        cv=coefficient_of_variation(w.joules_per_call for w in windows),
        windows=windows,
        idle_power_w=idle_power_w,
        energy_above_idle_per_call_j=above_idle,
        method=method,
        converged=_enough(windows, target_cv),
    )


def _idle_until_step(source: EnergySource, clock: Clock, sleep: Sleep, poll_s: float,
                     timeout_s: float) -> tuple[float, int]:
    reference = source.total_energy_mj()
    since = clock()
    while True:
        sleep(poll_s)
        energy = source.total_energy_mj()
        now = clock()
        if energy != reference:
            return now, energy
        if now - since > timeout_s:
            raise EnergyCounterUnsupported(f"energy counter did not move in {timeout_s} s")


def measure_idle_power(
    source: EnergySource,
    seconds: float = 1.0,
    *,
    clock: Clock = time.perf_counter,
    sleep: Sleep = time.sleep,
    poll_s: float = 0.001,
    edge_timeout_s: float = 2.0,
    sample_interval_s: float = 0.015,
) -> float:
    """Idle power in watts: counter difference over a step-aligned window, else mean sampled power.

    The caller must make sure nothing else runs on the GPU meanwhile (see gpu_lock).
    """
    try:
        t0, e0 = _idle_until_step(source, clock, sleep, poll_s, edge_timeout_s)
        sleep(max(0.0, seconds - (clock() - t0)))
        t1, e1 = _idle_until_step(source, clock, sleep, poll_s, edge_timeout_s)
        return _counter_delta_mj(e0, e1) / 1000.0 / (t1 - t0)
    except EnergyCounterUnsupported as exc:
        log.warning("energy counter unusable (%s); averaging sampled idle power", exc)
    readings = []
    start = clock()
    while not readings or clock() - start < seconds:
        readings.append(source.power_w())
        sleep(sample_interval_s)
    return statistics.fmean(readings)
