"""The ``replay`` backend: latency and energy answered from a recorded dataset (measurements.dataset).

``--backend replay:data/hw/<session>.jsonl.gz`` runs the tuner, the energy model and the update
policy end to end on numbers a real GPU produced, in CI and on machines without one (Kernel Tuner's
simulation mode, which replays its cache files, is the model). A candidate is looked up by workload
spec and structural hash; its recorded value comes back with lognormal noise of the recorded spread
(coefficient of variation), seeded like sim so runs repeat. The search space it offers is the
recorded pool (``recorded_pool``; search_space.PoolSpace keeps the tuner inside it), and its builds
are the recorded ones (ptxas' registers and spills as measured), so the features are the device's.

A candidate that is not in the dataset, or was not measured for the kind asked, is an explicit miss
("not in the replay dataset"): never a made-up number.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import time
from pathlib import Path
from typing import Sequence

from .backend import Backend, BackendError, DeviceInfo, MeasureResult, Progress, check_kind
from .dataset import DatasetError, Record, load_dataset

# A recorded spread above this is treated as this: one bad window must not make replay wild.
MAX_NOISE = 0.2


@dataclasses.dataclass
class RecordedPool:
    """The recorded schedules of one workload, and their recorded builds."""

    spec: str
    entries: list[tuple[int, str, str]]  # (design space, trace JSON, structural hash)
    build_rows: dict[str, dict]  # structural hash -> the candidate row's ``build``

    def build(self, candidates: Sequence, progress=None) -> list:
        """search_space.BuildResults from the records (the ``Builder`` interface, nothing compiled)."""
        from etune.search_space.build import BuildResult, KernelResources

        results = []
        for candidate in candidates:
            row = self.build_rows.get(candidate.structural_hash)
            if row is None:
                result = BuildResult(candidate.structural_hash, "error", 0.0, "not in the replay dataset")
            else:
                result = BuildResult(candidate.structural_hash, row.get("status", "ok"), row.get("seconds") or 0.0,
                                     row.get("error"), kernels=[KernelResources(**k) for k in row.get("kernels", [])],
                                     cached=True)
            results.append(result)
            if progress is not None:
                progress(result)
        return results


class ReplayBackend(Backend):
    name = "replay"

    def __init__(self, path: str | Path, seed: int = 0):
        try:
            self.dataset = load_dataset(path)
        except DatasetError as exc:
            raise BackendError(f"replay backend: {exc}") from None
        self.seed = int(seed)
        self._records = self.dataset.records()
        self._counts: dict[tuple, int] = {}
        header = self.dataset.header
        # The build target the dataset's features and schedules were made for (h200, h100, ...).
        self.target = header.get("target")

    def device(self) -> DeviceInfo:
        h = self.dataset.header
        details = {"dataset": str(self.dataset.path), "recorded_backend": h.get("backend"), "recorded_on": h.get("date"),
                   "note": "replayed measurements: recorded values with their recorded spread as noise",
                   **(h.get("device") or {})}
        return DeviceInfo("replay", f"replay:{h.get('backend')}:{h.get('gpu')}", h.get("driver"), details)

    def recorded_pool(self, spec: str) -> RecordedPool:
        rows = self.dataset.pool(spec)
        if not rows:
            known = ", ".join(self.dataset.specs()) or "none"
            raise BackendError(f"replay backend: {self.dataset.path} has no candidates of {spec} (it has: {known})")
        return RecordedPool(spec, [(r["design_space"], r["trace"], r["structural_hash"]) for r in rows],
                            {r["structural_hash"]: r.get("build") or {"status": "ok", "kernels": []} for r in rows})

    # -- answers -------------------------------------------------------------------------------
    def _noise(self, key: tuple, spread: float | None) -> float:
        count = self._counts.get(key, 0)
        self._counts[key] = count + 1
        sigma = min(MAX_NOISE, max(0.0, spread or 0.0))
        digest = hashlib.blake2b(repr((self.seed, *key, count)).encode(), digest_size=8).digest()
        return random.Random(int.from_bytes(digest, "little")).lognormvariate(0.0, sigma) if sigma else 1.0

    def _answer(self, record: Record | None, key: tuple, structural_hash: str | None, kind: str,
                what: str) -> MeasureResult:
        now = time.time()
        row = None if record is None else getattr(record, kind)
        if row is None:
            reason = "not in the replay dataset" if record is None else f"no {kind} measurement in the replay dataset"
            return MeasureResult(structural_hash, kind, False, error=f"{reason} ({what}, {self.dataset.path.name})",
                                 details={"failure": "replay miss"}, started_at=now, finished_at=now)
        details = {**(row.get("details") or {}), "replayed_from": str(self.dataset.path)}
        if not row.get("ok"):
            return MeasureResult(structural_hash, kind, False, error=row.get("error") or "failed when recorded",
                                 details=details, started_at=now, finished_at=now)
        factor = self._noise(key + (kind,), row.get("spread"))
        value = row["value"] * factor
        if kind == "energy" and details.get("latency_s"):
            idle = details.get("idle_power_w")
            details["avg_power_w"] = value / details["latency_s"]
            if idle is not None:
                details["energy_above_idle_j"] = value - idle * details["latency_s"]
        return MeasureResult(structural_hash, kind, True, value, row.get("spread"), None, details,
                             row.get("sm_clock_mhz"), row.get("temperature_c"), now, time.time())

    def measure(self, candidates: Sequence, kind: str, builds: Sequence | None = None,
                progress: Progress | None = None) -> list[MeasureResult]:
        check_kind(kind)
        results = []
        for candidate in candidates:
            spec, structural_hash = candidate.workload.spec, candidate.structural_hash
            record = self._records.get((spec, structural_hash))
            result = self._answer(record, (spec, structural_hash), structural_hash, kind,
                                  f"candidate {structural_hash} of {spec}")
            results.append(result)
            if progress is not None:
                progress(result)
        return results

    def measure_vendor(self, workload, kind: str) -> MeasureResult:
        check_kind(kind)
        record = self._records.get((workload.spec, "vendor"))
        result = self._answer(record, (workload.spec, "vendor"), None, kind, f"vendor kernel of {workload.spec}")
        if record is not None:
            result.details.setdefault("vendor", record.vendor)
        return result
