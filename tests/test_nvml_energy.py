"""The energy-window protocol against a simulated GPU on a virtual clock (no GPU needed)."""

from __future__ import annotations

import random
import threading
import time

import pynvml
import pytest

from etune.measurements.nvml_energy import (
    COUNTER_MODULUS,
    EnergyCounterUnsupported,
    NvmlEnergySource,
    measure_energy,
    measure_idle_power,
    nvml_available,
)

STEP_S = 0.1
CALL_S = 100e-6
BUSY_W = 500.0
IDLE_W = 70.0
TRUE_J_PER_CALL = BUSY_W * CALL_S


class FakeGpu:
    """A GPU whose energy counter publishes the energy used so far every `step_s` of virtual time.

    `launch()` runs one call synchronously: it advances the virtual clock by `call_s` at busy power.
    `sleep()` on the main thread advances it at idle power. On any other thread (the power sampler)
    `sleep()` waits a little real time instead, so virtual time is driven by the launches alone.
    """

    def __init__(self, *, call_s=CALL_S, busy_w=BUSY_W, idle_w=IDLE_W, step_s=STEP_S,
                 counter_start_mj=0, counter="ok", busy_jitter=0.0, seed=0):
        self.call_s, self.busy_w, self.idle_w, self.step_s = call_s, busy_w, idle_w, step_s
        self.counter = counter  # "ok", "unsupported" or "frozen"
        self.busy_jitter = busy_jitter
        self.now = 0.0
        self.launches = 0
        self.step_times: list[float] = []
        self.published: list[int] = []
        self._start_mj = counter_start_mj
        self._counter_mj = counter_start_mj
        self._energy_j = 0.0
        self._next_step = step_s
        self._busy = False
        self._factor = 1.0
        self._rng = random.Random(seed)
        self._lock = threading.RLock()

    # -- what measure_energy drives
    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.0002)
            return
        self._advance(seconds, busy=False)

    def launch(self) -> None:
        self._advance(self.call_s, busy=True)
        self.launches += 1

    def sync(self) -> None:
        pass

    # -- EnergySource
    def total_energy_mj(self) -> int:
        if self.counter == "unsupported":
            raise EnergyCounterUnsupported("fake: NOT_SUPPORTED")
        with self._lock:
            return self._start_mj if self.counter == "frozen" else self._counter_mj

    def power_w(self) -> float:
        with self._lock:
            return self._power(self._busy)

    def temperature_c(self) -> float:
        return 45.0

    def sm_clock_mhz(self) -> float:
        return 1980.0

    def device_name(self) -> str:
        return "Fake GPU"

    def driver_version(self) -> str:
        return "0.0"

    # -- simulation
    def _power(self, busy: bool) -> float:
        return self.busy_w * self._factor if busy else self.idle_w

    def _advance(self, dt: float, busy: bool) -> None:
        with self._lock:
            self._busy = busy
            while self.now + dt >= self._next_step:
                part = self._next_step - self.now
                self._energy_j += part * self._power(busy)
                dt -= part
                self.now = self._next_step
                self._publish()
                self._next_step += self.step_s
            self.now += dt
            self._energy_j += dt * self._power(busy)

    def _publish(self) -> None:
        self._counter_mj = (self._start_mj + round(self._energy_j * 1000)) % COUNTER_MODULUS
        self.published.append(self._counter_mj)
        self.step_times.append(self.now)
        if self.busy_jitter:  # slow power drift: a new level every counter step
            self._factor = max(0.1, 1 + self._rng.gauss(0, self.busy_jitter))


def run(gpu: FakeGpu, **kwargs):
    return measure_energy(gpu.launch, gpu, sync=gpu.sync, clock=gpu.clock, sleep=gpu.sleep, **kwargs)


def after_last_step(gpu: FakeGpu, t: float) -> float:
    """Time from the latest counter step at or before t to t."""
    return t - max(s for s in gpu.step_times if s <= t + 1e-12)


def test_recovers_energy_per_call_within_one_percent():
    gpu = FakeGpu()
    result = run(gpu, idle_power_w=IDLE_W)

    assert result.method == "counter"
    assert result.converged
    assert 3 <= len(result.windows) <= 10
    assert result.energy_per_call_j == pytest.approx(TRUE_J_PER_CALL, rel=0.01)
    assert result.latency_per_call_s == pytest.approx(CALL_S, rel=0.01)
    assert result.energy_above_idle_per_call_j == pytest.approx(
        (BUSY_W - IDLE_W) * CALL_S, rel=0.01)
    for w in result.windows:
        assert w.joules_per_call == pytest.approx(TRUE_J_PER_CALL, rel=0.01)
        assert w.avg_power_w == pytest.approx(BUSY_W, rel=0.01)
        assert w.seconds >= 1.0
        assert (w.temperature_c, w.sm_clock_mhz, w.power_w) == (45.0, 1980.0, BUSY_W)


@pytest.mark.parametrize("warmup_s", [0.05, 0.2, 0.27])  # warm-up ends at various step phases
def test_windows_start_and_end_on_counter_steps(warmup_s):
    gpu = FakeGpu()
    result = run(gpu, warmup_s=warmup_s)
    # Each edge is seen within one edge batch (1 ms) of the step, never before it.
    for w in result.windows:
        assert 0 <= after_last_step(gpu, w.t_start) <= 0.002
        assert 0 <= after_last_step(gpu, w.t_end) <= 0.002
        assert w.joules_per_call == pytest.approx(TRUE_J_PER_CALL, rel=0.01)
    for a, b in zip(result.windows, result.windows[1:]):
        assert b.t_start == a.t_end  # back to back: the GPU never idles between windows


def test_batches_grow_to_tens_of_milliseconds():
    gpu = FakeGpu(call_s=5e-6)
    syncs = []
    measure_energy(gpu.launch, gpu, sync=lambda: syncs.append(gpu.launches),
                   clock=gpu.clock, sleep=gpu.sleep, max_windows=3)
    batch_s = [(b - a) * gpu.call_s for a, b in zip(syncs, syncs[1:])]
    assert max(batch_s) <= 0.05
    # Short edge batches only hunt for counter steps; most of the work runs in 10-50 ms batches.
    assert sum(s for s in batch_s if s >= 0.01) >= 0.8 * sum(batch_s)


def test_counter_wrap_is_handled():
    start = COUNTER_MODULUS - 700_000  # 700 J before the wrap: it wraps inside the windows
    gpu = FakeGpu(counter_start_mj=start)
    result = run(gpu)

    assert min(gpu.published) < start  # the counter really wrapped
    assert result.method == "counter"
    assert result.energy_per_call_j == pytest.approx(TRUE_J_PER_CALL, rel=0.01)
    for w in result.windows:
        assert w.joules_per_call == pytest.approx(TRUE_J_PER_CALL, rel=0.01)


@pytest.mark.parametrize("counter", ["unsupported", "frozen"])
def test_missing_counter_falls_back_to_power_integration(counter):
    gpu = FakeGpu(counter=counter)
    result = run(gpu, max_windows=3)

    assert result.method == "power-integration"
    assert result.energy_per_call_j == pytest.approx(TRUE_J_PER_CALL, rel=0.03)
    assert all(w.seconds >= 1.0 for w in result.windows)


def test_noisy_device_stops_at_the_cap_unconverged():
    gpu = FakeGpu(busy_jitter=0.3, seed=1)
    result = run(gpu, max_windows=4, target_cv=0.01)

    assert len(result.windows) == 4
    assert not result.converged
    assert result.cv > 0.01


def test_converges_early_when_quiet():
    result = run(FakeGpu(), max_windows=10)
    assert len(result.windows) == 3
    assert result.cv < 0.01


def test_idle_power_from_counter():
    gpu = FakeGpu()
    assert measure_idle_power(gpu, 1.0, clock=gpu.clock, sleep=gpu.sleep) == pytest.approx(
        IDLE_W, rel=0.01)
    assert gpu.launches == 0


def test_idle_power_without_counter_averages_samples():
    gpu = FakeGpu(counter="unsupported")
    assert measure_idle_power(gpu, 0.5, clock=gpu.clock, sleep=gpu.sleep) == pytest.approx(IDLE_W)


def test_single_window_reports_no_cv_and_not_converged():
    result = run(FakeGpu(), max_windows=1)
    assert len(result.windows) == 1
    assert result.cv is None
    assert not result.converged


# -- NvmlEnergySource against a stubbed pynvml (the real one needs a driver)


def test_nvml_available_is_false_without_a_driver(monkeypatch):
    def no_driver():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    assert nvml_available() is False


def test_nvml_not_supported_counter_raises_energy_counter_unsupported(monkeypatch):
    def not_supported(handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", not_supported)
    with pytest.raises(EnergyCounterUnsupported):
        NvmlEnergySource(handle=None).total_energy_mj()


def test_nvml_power_prefers_instant_field_then_falls_back(monkeypatch):
    field = pynvml.c_nvmlFieldValue_t()
    field.nvmlReturn = pynvml.NVML_SUCCESS
    field.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    field.value.uiVal = 612_500  # milliwatts
    calls = []

    def field_values(handle, ids):
        calls.append(list(ids))
        if len(calls) > 1:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [field]

    monkeypatch.setattr(pynvml, "nvmlDeviceGetFieldValues", field_values)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", lambda handle: 250_000)
    source = NvmlEnergySource(handle=None)
    assert source.power_w() == 612.5
    assert calls == [[pynvml.NVML_FI_DEV_POWER_INSTANT]]
    assert source.power_w() == 250.0  # the field failed: averaged power from now on
    assert source.power_w() == 250.0
    assert len(calls) == 2


def test_integrated_sampled_power_agrees_with_the_counter():
    """The acceptance check's second reference: sampled power integrated over the counter's window."""
    gpu = FakeGpu()
    result = run(gpu, integrate_power=True, min_window_s=1.0, max_windows=2)
    for w in result.windows:
        assert w.sampled_joules is not None
        assert w.sampled_joules == pytest.approx(w.joules, rel=0.03)
    assert run(FakeGpu()).windows[0].sampled_joules is None  # off unless asked for
