"""The tuning loop: build what the search strategy proposes, measure it, record it, keep the budgets.

One generation: the strategy (``tuner.strategy``; genetic by default) proposes a batch of new
schedules, the loop builds them, measures the latency of every built one, measures the energy of the
few the update policy picks, retrains the cost models and tells the strategy what was found. Every
measurement is committed to the records database as it arrives, tagged with the run, so a run
stopped at any moment (budget, time, Ctrl-C, SIGKILL) resumes where it was, and never measures a
candidate twice.

The parts are passed in (``Tuner(..., strategy=, models=, policy=)``), as MetaSchedule's TuneContext
takes its search strategy, cost model, runner and database: a baseline or another strategy changes
one of them and nothing else.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path
from typing import Callable

from etune.kernels import as_workload
from etune.measurements.backend import Backend, MeasureResult, record_result
from etune.measurements.records import RecordsDB
from etune.search_space import Builder, ScheduleSpace, gpu_spec, interrupts
from etune.search_space.pool import PoolSpace

from .models import Models
from .objectives import Objective, Point, best
from .strategy import STRATEGIES, SearchStrategy, Trial, make_strategy


@dataclasses.dataclass
class TuneSettings:
    """What a run may spend and how it searches; recorded with the run."""

    trials: int = 64  # candidates measured for latency (built or failed), over all resumes
    energy_measurements: int | None = None  # default: 15 % of trials, at least 3
    time_budget_s: float | None = None  # of this invocation
    batch: int = 16  # candidates built and latency-measured per generation
    seed: int = 0
    strategy: str = "genetic"  # one of tuner.strategy.STRATEGIES
    target: str = "h100"  # GPU preset to build for (a replayed dataset's own target wins)
    build: bool = True  # sim only may skip nvcc (no register counts then)
    jobs: int | None = None
    workdir: Path | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown search strategy {self.strategy!r} (choose {', '.join(STRATEGIES)})")

    def energy_budget(self, objective: Objective) -> int:
        if self.energy_measurements is not None:
            return self.energy_measurements
        if not objective.needs_energy:
            return 1  # the latency winner's energy, for the report
        return max(3, round(0.15 * self.trials))


@dataclasses.dataclass
class Status:
    """What the progress display shows; also the summary a run returns."""

    workload: str
    objective: str
    backend: str
    generation: int = 0
    trials: int = 0
    trial_budget: int = 0
    energy_measurements: int = 0
    energy_budget: int = 0
    best: Point | None = None
    fastest: Point | None = None
    stopped_by: str = ""  # trials | energy | time | interrupted | exhausted
    run_id: int | None = None


class _Stop(Exception):
    def __init__(self, reason: str):
        self.reason = reason


class Tuner:
    def __init__(self, spec: str, objective: Objective, backend: Backend, db: RecordsDB,
                 settings: TuneSettings | None = None, *, strategy: SearchStrategy | None = None,
                 models: Models | None = None, policy=None, builder: Builder | None = None,
                 on_status: Callable[[Status], None] | None = None, log: Callable[[str], None] | None = None):
        """``strategy``, ``models`` and ``policy`` (which candidates get an energy measurement: an
        ``energy_model.policy.UpdatePolicy`` or anything with its ``select``/``observe``) default to
        the settings' strategy, the XGBoost models and the update policy; ``builder`` (used when the
        settings build) to a Builder of local worker processes."""
        from etune.energy_model.policy import UpdatePolicy

        self.workload = as_workload(spec)
        self.objective = objective
        self.backend = backend
        self.db = db
        self.settings = settings or TuneSettings()
        self.gpu = gpu_spec(backend.target or self.settings.target)  # a replayed dataset's numbers are its target's
        self.on_status = on_status or (lambda status: None)
        self.log = log or (lambda message: None)
        seed = self.settings.seed
        self.space = ScheduleSpace(self.workload, self.gpu, seed=seed)
        self.builder = None
        if self.settings.build:
            self.builder = builder or Builder(self.gpu, workdir=self.settings.workdir, jobs=self.settings.jobs)
        pool = backend.recorded_pool(self.workload.spec)
        if pool is not None:  # only recorded schedules can be measured: search among them, builds as recorded
            self.space = PoolSpace(self.space, pool.entries)
            self.builder = pool
            if self.space.unreplayable:
                self.log(f"{len(self.space.unreplayable)} recorded schedules do not replay with this TVM; left out")
        self.device = backend.device()
        self.workload_id = db.add_workload(self.workload.spec, self.workload.family, self.workload.params)
        self.run_id = db.start_run(self.workload_id, objective.label, backend.name, self._settings_json())
        self.models = models or Models(seed=seed)
        self.policy = policy or UpdatePolicy(seed=seed)
        self.strategy = strategy or make_strategy(self.settings.strategy, self.space, objective, self.models, seed,
                                                  self.settings.batch, self._features, self._load_candidate)
        self.trials: dict[str, Trial] = {}
        self.status = Status(self.workload.spec, objective.label, backend.name, trial_budget=self.settings.trials,
                             energy_budget=self.settings.energy_budget(objective), run_id=self.run_id)
        self._load_previous()

    # -- state ---------------------------------------------------------------------------------
    def _settings_json(self) -> dict:
        s = self.settings
        return {"trials": s.trials, "energy_measurements": s.energy_budget(self.objective), "batch": s.batch,
                "seed": s.seed, "strategy": s.strategy, "build": s.build, "target": self.gpu.arch,
                "device": self.device.name}

    def _load_previous(self) -> None:
        """What earlier invocations of this run measured: nothing is measured twice."""
        rows = {c.id: c for c in self.db.candidates(self.workload_id)}
        points = {p.key: p for p in self.db.points(self.workload_id, run_id=self.run_id)}
        measured = self.db.measurements(self.workload_id, run_id=self.run_id)
        energy_tried = {m.candidate_id for m in measured if m.kind == "energy"}
        for cid in dict.fromkeys(m.candidate_id for m in measured if m.candidate_id is not None):
            row, point = rows[cid], points.get(cid)
            self.trials[row.structural_hash] = Trial(
                cid, row.structural_hash, row.features, point.latency_s if point else None,
                point.energy_j if point and point.energy_measured else None,
                point.energy_converged if point else True, energy_tried=cid in energy_tried)
        self.status.energy_measurements = sum(m.kind == "energy" for m in measured)
        self.status.trials = len(self.trials)
        ended = self.db.previous_ending(self.run_id)  # None: a new run
        if ended is not None:
            self.log(f"the previous invocation of run {self.run_id} {ended}; resuming with {len(self.trials)} "
                     "candidates measured before")
        self.strategy.observe(list(self.trials.values()))
        self.models.retrain(self.trials.values())
        self._update_best()

    def _update_best(self) -> None:
        points = [Point(t.candidate_id, t.latency_s, t.energy_j, t.energy_j is not None, t.energy_converged)
                  for t in self.trials.values() if t.latency_s is not None]
        self.status.best = best(points, self.objective)
        self.status.fastest = min(points, key=lambda p: p.latency_s) if points else None

    def _fastest_s(self) -> float | None:
        return self.status.fastest.latency_s if self.status.fastest else None

    def _features(self, candidate, build=None) -> dict:
        from etune.energy_model.features import candidate_features

        return candidate_features(candidate, self.gpu, build=build)

    def _load_candidate(self, trial: Trial):
        """A measured candidate back from its recorded trace (after a resume)."""
        if trial.candidate is None:
            row = self.db.candidate(trial.candidate_id)
            trial.candidate = self.space.from_trace_json(row.trace, row.design_space)
        return trial.candidate

    # -- measuring -----------------------------------------------------------------------------
    def _record(self, trial: Trial, result: MeasureResult, extra: dict | None = None) -> None:
        record_result(self.db, result, workload_id=self.workload_id, backend=self.backend.name, device=self.device,
                      candidate_id=trial.candidate_id, run_id=self.run_id, extra=extra)

    def _check_budget(self, deadline: float | None) -> None:
        interrupts.check()  # a Ctrl-C that TVM turned into an error on the way
        if self.status.trials >= self.settings.trials:
            raise _Stop("trials")
        if deadline is not None and time.monotonic() >= deadline:
            raise _Stop("time")

    def _generation(self, deadline: float | None) -> None:
        self._check_budget(deadline)
        self.status.generation += 1
        chosen = self.strategy.propose(min(self.settings.batch, self.settings.trials - self.status.trials))
        if not chosen:
            raise _Stop("exhausted")
        builds_by_hash = {}
        if self.builder is not None:
            builds_by_hash = {b.structural_hash: b for b in self.builder.build(chosen)}
        self._check_budget(deadline)
        trials = []
        for candidate in chosen:
            features = self._features(candidate, builds_by_hash.get(candidate.structural_hash))
            cid = self.db.add_candidate(self.workload_id, candidate.structural_hash, candidate.design_space,
                                        candidate.trace_json(), features=features)
            trials.append(Trial(cid, candidate.structural_hash, features, candidate=candidate))
        predicted = self.models.predict_latency([t.features for t in trials])
        by_hash = {t.structural_hash: (i, t) for i, t in enumerate(trials)}

        def record_latency(result: MeasureResult) -> None:
            i, trial = by_hash[result.structural_hash]
            self._record(trial, result, {"generation": self.status.generation,
                                         "predicted_latency_s": predicted[i] if predicted else None})
            if result.ok:
                trial.latency_s = result.value
            self.trials[trial.structural_hash] = trial
            self.status.trials = len(self.trials)
            self._update_best()
            self.on_status(self.status)

        builds = [builds_by_hash.get(c.structural_hash) for c in chosen] if self.builder else None
        self.backend.measure(chosen, "latency", builds=builds, progress=record_latency)
        self.models.retrain(self.trials.values())
        self._measure_energy(trials, builds_by_hash, final=False)
        self.strategy.observe(trials)

    def _energy_left(self) -> int:
        return self.status.energy_budget - self.status.energy_measurements

    def _measure_energy(self, new: list[Trial], builds_by_hash: dict, final: bool) -> None:
        """Energy for the few the policy picks among the generation's ``new`` trials (or, at the end,
        for ``new``: the winners that lack it).

        Offering the policy every earlier timed candidate within the slack as well was tried: on
        sim's GEMV (seed 1) the update policy then spent its budget on old near-misses and ended 13 %
        above the winner it finds among each generation's own."""
        if not new or self._energy_left() <= 0:
            return
        if final:
            picks = new[: self._energy_left()]
            predicted = [None] * len(picks)
            std = [None] * len(picks)
        else:
            if not self.objective.needs_energy:
                return
            # Keep one measurement for the end: the winner must be verified.
            timed_new = sum(t.latency_s is not None for t in new)
            if not timed_new:
                return
            per_generation = max(1, math.ceil((self._energy_left() - 1) * timed_new
                                               / max(1, self.settings.trials - self.status.trials + timed_new)))
            allowed = min(per_generation, self._energy_left() - 1)
            if allowed <= 0:
                return
            timed = [t for t in new if t.latency_s is not None]
            fastest = self._fastest_s()
            if self.objective.bounded_by_fastest and fastest is not None:
                # Slower than the slack's bound, a schedule can never win: its energy would only teach
                # the model about schedules the objective has already ruled out.
                timed = [t for t in timed if self.objective.within_slack(t.latency_s, fastest)]
                if not timed:
                    return
            predicted, std = self.models.predict_energy([t.features for t in timed], [t.latency_s for t in timed])
            incumbent = self.status.best  # the best measured: what a new measurement has to beat
            indices = self.policy.select(
                predicted_mean=predicted, predicted_std=std, latency_s=[t.latency_s for t in timed],
                score=lambda lat, energy: self.objective.score(lat, energy, fastest), budget=allowed,
                incumbent=None if incumbent is None else self.objective.score(incumbent.latency_s, incumbent.energy_j,
                                                                              fastest),
            )
            picks = [timed[i] for i in indices]
            predicted = [predicted[i] if predicted else None for i in indices]
            std = [std[i] if std else None for i in indices]
        candidates = [self._load_candidate(trial) for trial in picks]
        builds = None
        if self.builder:
            builds = [builds_by_hash.get(c.structural_hash) or self._cached_build(c) for c in candidates]
        by_hash = {trial.structural_hash: (trial, pred, spread) for trial, pred, spread in zip(picks, predicted, std)}

        def record_energy(result: MeasureResult) -> None:
            trial, pred, spread = by_hash[result.structural_hash]
            self._record(trial, result, {"generation": self.status.generation, "final_check": final,
                                         "predicted_energy_j": pred, "predicted_energy_std_j": spread})
            self.status.energy_measurements += 1
            trial.energy_tried = True
            if result.ok:
                trial.energy_j = result.value
                trial.energy_converged = (result.details or {}).get("converged") is not False
                if pred is not None:
                    self.policy.observe(pred, result.value)
            self._update_best()
            self.on_status(self.status)

        # One call for the generation's picks: a cluster backend measures them on several GPUs at once.
        self.backend.measure(candidates, "energy", builds=builds, progress=record_energy)
        self.models.retrain(self.trials.values())

    def _cached_build(self, candidate):
        if self.builder is None:
            return None
        return self.builder.build([candidate])[0]

    def _final_checks(self) -> None:
        """The winner must carry a measured energy: measure the candidates that could be it."""
        timed = [t for t in self.trials.values() if t.latency_s is not None and not t.energy_tried]
        if not timed or self._energy_left() <= 0:
            return
        fastest = self._fastest_s()
        if self.objective.kind == "latency":
            contenders = sorted(timed, key=lambda t: t.latency_s)[:1]
        else:
            predicted, _ = self.models.predict_energy([t.features for t in timed], [t.latency_s for t in timed])
            guess = predicted or [t.latency_s for t in timed]
            order = sorted(range(len(timed)), key=lambda i: self.objective.score(timed[i].latency_s, guess[i], fastest))
            incumbent = self.status.best
            contenders = [timed[i] for i in order[:2] if incumbent is None or self.objective.score(
                timed[i].latency_s, guess[i], fastest) < self.objective.score(incumbent.latency_s, incumbent.energy_j, fastest)]
            if incumbent is None and not contenders:
                contenders = [timed[order[0]]]
        self._measure_energy(contenders, {}, final=True)

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> Status:
        with interrupts.stop_on(signal.SIGINT):  # Ctrl-C stops the run even inside TVM's callbacks
            return self._run()

    def _run(self) -> Status:
        deadline = None if self.settings.time_budget_s is None else time.monotonic() + self.settings.time_budget_s
        self.on_status(self.status)
        try:
            try:
                while True:
                    self._generation(deadline)
            except _Stop as stop:
                self.status.stopped_by = stop.reason
            self._final_checks()
            self.db.finish_run(self.run_id, "finished" if self.status.stopped_by != "time" else "stopped")
        except BaseException as exc:  # a KeyboardInterrupt, or what TVM made of one in a callback
            if not isinstance(exc, KeyboardInterrupt) and interrupts.received() is None:
                raise
            self.status.stopped_by = "interrupted"
            self.db.finish_run(self.run_id, "interrupted")
        self._update_best()
        self.on_status(self.status)
        return self.status


def tune(spec: str, objective: str | Objective = "energy", backend: str | Backend = "auto", db: str | Path = "etune.db",
         on_status=None, log=None, **settings) -> Status:
    """Tune one workload and return the run's status (best point, counts). ``settings``: the fields
    of ``TuneSettings``."""
    from etune.measurements import make_backend

    objective = objective if isinstance(objective, Objective) else Objective.parse(objective)
    settings = TuneSettings(**settings)
    owned = isinstance(backend, str)
    backend_ = make_backend(backend, gpu=settings.target) if owned else backend
    try:
        with RecordsDB.open(db) as records:
            return Tuner(spec, objective, backend_, records, settings, on_status=on_status, log=log).run()
    finally:
        if owned:
            backend_.close()
