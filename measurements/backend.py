"""The measurement interface the tuner sees: a Backend turns built candidates into latency and energy.

Three implementations: ``nvml`` (a real NVIDIA GPU, measurements.nvml_backend), ``sim`` (an analytic
H100/H200, measurements.sim) and ``replay`` (a recorded dataset, measurements.replay). The tuner never
knows which one it talks to, except that every record carries the backend's name, so a sim figure can
never pass for a hardware one.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Callable, Sequence

from .records import KINDS


class BackendError(RuntimeError):
    """The backend cannot be used at all (no GPU, NVML missing, ...): one readable line."""


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    backend: str  # "nvml" | "sim"
    name: str  # "NVIDIA H100 80GB HBM3", or "sim:NVIDIA H100 80GB HBM3"
    driver: str | None = None
    details: dict = dataclasses.field(default_factory=dict)  # clocks, power limit, idle power, ...


@dataclasses.dataclass
class MeasureResult:
    """One measurement of one candidate (or vendor reference). ``value`` is seconds per call for
    ``latency`` and joules per call (idle power included) for ``energy``."""

    structural_hash: str | None  # None for a vendor reference
    kind: str
    ok: bool
    value: float | None = None
    spread: float | None = None  # coefficient of variation over repeats / windows
    error: str | None = None  # why it failed: build missing, wrong output, fault, time-out
    # kind-specific numbers, all JSON-able. latency: min_s, median_s, repeats, checked, rel_err.
    # energy: latency_s, avg_power_w, idle_power_w, energy_above_idle_j, windows, converged, method.
    details: dict = dataclasses.field(default_factory=dict)
    sm_clock_mhz: float | None = None
    temperature_c: float | None = None
    started_at: float | None = None
    finished_at: float | None = None


Progress = Callable[[MeasureResult], None]


class Backend(abc.ABC):
    """Measures candidates of one workload family or another on one device."""

    name: str
    # The build target a backend's numbers belong to (a replayed dataset's), or None: the caller's.
    target: str | None = None

    def recorded_pool(self, spec: str):
        """The only schedules this backend can measure for ``spec`` (measurements.replay.RecordedPool),
        or None when it measures any schedule."""
        return None

    @abc.abstractmethod
    def device(self) -> DeviceInfo:
        ...

    @abc.abstractmethod
    def measure(self, candidates: Sequence, kind: str, builds: Sequence | None = None,
                progress: Progress | None = None) -> list[MeasureResult]:
        """One result per candidate (search_space.Candidate), in order; ``builds`` are their
        search_space.BuildResults (required by backends that run code). A failure is a result with
        ok=False and its reason, never an exception: one bad kernel must not stop a tuning run."""

    @abc.abstractmethod
    def measure_vendor(self, workload, kind: str) -> MeasureResult:
        """The vendor library's kernel for ``workload`` (torch.matmul / torch.softmax / SDPA),
        measured by the same protocol as candidates so reports compare like with like."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def record_result(db, result: MeasureResult, *, workload_id: int, backend: str, device: DeviceInfo,
                  candidate_id: int | None = None, run_id: int | None = None, extra: dict | None = None) -> int:
    """Store one result in a RecordsDB (``extra`` joins its details); a failed result keeps no value."""
    return db.add_measurement(
        workload_id=workload_id, candidate_id=candidate_id, run_id=run_id, kind=result.kind, backend=backend,
        value=result.value if result.ok else None, spread=result.spread, device_name=device.name,
        driver=device.driver, sm_clock_mhz=result.sm_clock_mhz, temperature_c=result.temperature_c,
        details={**(result.details or {}), **(extra or {})}, ok=result.ok, error=result.error,
        started_at=result.started_at, finished_at=result.finished_at,
    )


def model_output(backend: str, device_names) -> bool:
    """True for figures of the analytic model: sim's own, or a replay of a dataset that sim made."""
    names = [device_names] if isinstance(device_names, str) else list(device_names or ())
    return backend == "sim" or any(n.startswith("replay:sim:") for n in names)


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
