"""The tuning loop: a genetic search over schedules, ranked by the cost models, with sparse energy
measurements chosen by the update policy.

One generation: breed a pool of new schedules (mutation and crossover of the best measured ones, plus
fresh samples), predict their latency and energy, build the most promising, measure the latency of
every built one, measure the energy of the few the policy picks, retrain, repeat. Every measurement is
committed to the records database as it arrives, tagged with the run, so a run stopped at any moment
(budget, time, Ctrl-C, SIGKILL) resumes where it was, and never measures a candidate twice.
"""
from __future__ import annotations

import dataclasses
import math
import random
import signal
import time
from pathlib import Path
from typing import Callable

from etune.kernels import as_workload
from etune.measurements.backend import Backend, MeasureResult, record_result
from etune.measurements.records import RecordsDB
from etune.search_space import Builder, ScheduleSpace, gpu_spec, interrupts
from etune.search_space.pool import PoolSpace

from .objectives import Objective, Point, best


@dataclasses.dataclass
class TuneConfig:
    trials: int = 64  # candidates measured for latency (built or failed), over all resumes
    energy_measurements: int | None = None  # default: 15 % of trials, at least 3
    time_budget_s: float | None = None  # of this invocation
    batch: int = 16  # candidates built and latency-measured per generation
    pool_factor: int = 4  # candidates bred and ranked per generation = batch x this
    explore: float = 0.25  # share of each batch picked at random from the pool, not by the models
    seed: int = 0
    build: bool = True  # sim only may skip nvcc (no register counts then)
    jobs: int | None = None
    workdir: Path | None = None

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


@dataclasses.dataclass
class _Known:
    """A candidate this run has measured (or failed to build/measure)."""

    candidate_id: int
    structural_hash: str
    features: dict | None
    latency_s: float | None = None
    energy_j: float | None = None
    candidate: object | None = None  # search_space.Candidate, rebuilt lazily for breeding


def _shape(features: dict) -> tuple:
    """A schedule's launch shape (blocks, threads per block): schedules that share it differ in
    unrolling or inner tiling and mostly cost alike, while energy moves with the shape (how many SMs
    are busy, how many warps each holds)."""
    return (round(features.get("blocks_log2", 0.0), 2), round(features.get("threads_per_block", 0.0)))


def interleave_by_shape(rankings: list[list[int]], shapes: list, count: int) -> list[int]:
    """``count`` indices taken from the rankings in turn, at most a quarter of them (at least 2) of
    one shape, so that one family of near-identical schedules cannot crowd out the others (niching,
    in genetic-search terms). Too few shapes to fill ``count``: the rest by the first ranking."""
    per_shape = max(2, count // 4)
    taken: dict = {}
    picked: list[int] = []
    for row in zip(*rankings):
        for i in row:
            if i not in picked and taken.get(shapes[i], 0) < per_shape:
                picked.append(i)
                taken[shapes[i]] = taken.get(shapes[i], 0) + 1
    picked += [i for i in rankings[0] if i not in picked]
    return picked[:count]


class _Stop(Exception):
    def __init__(self, reason: str):
        self.reason = reason


class Tuner:
    def __init__(self, spec: str, objective: Objective, backend: Backend, db: RecordsDB,
                 config: TuneConfig | None = None, gpu: str = "h100",
                 on_status: Callable[[Status], None] | None = None, log: Callable[[str], None] | None = None):
        from etune.energy_model.model import CostModel
        from etune.energy_model.policy import UpdatePolicy

        self.workload = as_workload(spec)
        self.objective = objective
        self.backend = backend
        self.db = db
        self.config = config or TuneConfig()
        gpu = backend.target or gpu  # a replayed dataset's numbers belong to its own target
        self.gpu = gpu_spec(gpu) if isinstance(gpu, str) else gpu
        self.on_status = on_status or (lambda status: None)
        self.log = log or (lambda message: None)
        self.rng = random.Random(self.config.seed)
        self.space = ScheduleSpace(self.workload, self.gpu, seed=self.config.seed)
        self.builder = Builder(self.gpu, workdir=self.config.workdir, jobs=self.config.jobs) if self.config.build else None
        pool = backend.recorded_pool(self.workload.spec)
        if pool is not None:  # only recorded schedules can be measured: search among them, builds as recorded
            self.space = PoolSpace(self.space, pool.entries)
            self.builder = pool
            if self.space.unreplayable:
                self.log(f"{len(self.space.unreplayable)} recorded schedules do not replay with this TVM; left out")
        self.device = backend.device()
        self.workload_id = db.add_workload(self.workload.spec, self.workload.family, self.workload.params)
        self.run_id = db.start_run(self.workload_id, objective.label, backend.name, self._config_json())
        self.latency_model = CostModel(target="latency", seed=self.config.seed)
        self.energy_model = CostModel(target="energy", seed=self.config.seed)
        self.policy = UpdatePolicy(seed=self.config.seed)
        self.known: dict[str, _Known] = {}
        self.status = Status(self.workload.spec, objective.label, backend.name, trial_budget=self.config.trials,
                             energy_budget=self.config.energy_budget(objective), run_id=self.run_id)
        self._load_previous()

    # -- state ---------------------------------------------------------------------------------
    def _config_json(self) -> dict:
        c = self.config
        return {"trials": c.trials, "energy_measurements": c.energy_budget(self.objective), "batch": c.batch,
                "seed": c.seed, "build": c.build, "target": self.gpu.arch, "device": self.device.name}

    def _load_previous(self) -> None:
        """What earlier invocations of this run measured: nothing is measured twice."""
        rows = {c.id: c for c in self.db.candidates(self.workload_id)}
        for m in self.db.measurements(self.workload_id, run_id=self.run_id):
            row = rows[m.candidate_id]
            known = self.known.setdefault(row.structural_hash, _Known(row.id, row.structural_hash, row.features))
            if m.kind == "latency" and m.ok:
                known.latency_s = m.value
            elif m.kind == "energy" and m.ok:
                known.energy_j = m.value
            if m.kind == "energy":
                self.status.energy_measurements += 1
        self.status.trials = len(self.known)
        ended = self.db.previous_ending(self.run_id)  # None: a new run
        if ended is not None:
            self.log(f"the previous invocation of run {self.run_id} {ended}; resuming with {len(self.known)} "
                     "candidates measured before")
        self._retrain()
        self._update_best()

    def _points(self) -> list[Point]:
        return [Point(k.candidate_id, k.latency_s, k.energy_j, k.energy_j is not None)
                for k in self.known.values() if k.latency_s is not None]

    def _update_best(self) -> None:
        points = self._points()
        self.status.best = best(points, self.objective)
        self.status.fastest = min(points, key=lambda p: p.latency_s) if points else None

    def _fastest_s(self) -> float | None:
        return self.status.fastest.latency_s if self.status.fastest else None

    # -- models --------------------------------------------------------------------------------
    def _retrain(self) -> None:
        timed = [k for k in self.known.values() if k.latency_s is not None and k.features]
        if len(timed) >= 4:
            self.latency_model.fit([k.features for k in timed], [k.latency_s for k in timed])
        metered = [k for k in timed if k.energy_j is not None]
        if len(metered) >= 3:
            self.energy_model.fit([k.features for k in metered], [k.energy_j for k in metered],
                                  latency_s=[k.latency_s for k in metered])

    def _predict_latency(self, features: list[dict]) -> list[float] | None:
        if not self.latency_model.trained:
            return None
        mean, _ = self.latency_model.predict(features)
        return [float(x) for x in mean]

    def _predict_energy(self, features: list[dict], latency_s: list[float] | None):
        if not self.energy_model.trained:
            return None, None
        mean, std = self.energy_model.predict(features, latency_s=latency_s)
        return [float(x) for x in mean], [float(x) for x in std]

    # -- breeding ------------------------------------------------------------------------------
    def _candidate(self, known: _Known):
        if known.candidate is None:
            row = self.db.candidate(known.candidate_id)
            known.candidate = self.space.from_trace_json(row.trace, row.design_space)
        return known.candidate

    def _parents(self) -> list[_Known]:
        """The best measured candidates under the objective, energy predicted where not measured."""
        timed = [k for k in self.known.values() if k.latency_s is not None]
        if not timed:
            return []
        energies = [k.energy_j for k in timed]
        missing = [i for i, e in enumerate(energies) if e is None]
        if missing and self.objective.needs_energy:
            predicted, _ = self._predict_energy([timed[i].features for i in missing],
                                                [timed[i].latency_s for i in missing])
            if predicted is not None:
                for i, e in zip(missing, predicted):
                    energies[i] = e
        fastest = self._fastest_s()
        order = sorted(range(len(timed)), key=lambda i: self.objective.score(timed[i].latency_s, energies[i], fastest))
        order = self._top_spread(order, [k.latency_s for k in timed], max(4, self.config.batch),
                                   [k.features or {} for k in timed])
        return [timed[i] for i in order]

    def _top_spread(self, order: list[int], latency_s: list[float], count: int,
                      features: list[dict]) -> list[int]:
        """The first ``count`` of ``order``, spread over launch shapes; under a slack, alternately the
        fastest, because the slack's bound is the fastest latency found: a run that stops looking for
        faster schedules lets its bound drift up and hands back a slower winner than the user's slack
        allows."""
        rankings = [order]
        if self.objective.bounded_by_fastest:
            rankings.append(sorted(range(len(latency_s)), key=lambda i: latency_s[i]))
        return interleave_by_shape(rankings, [_shape(f) for f in features], count)

    def _breed(self, count: int) -> list:
        """Up to ``count`` new valid candidates this run has not measured: a quarter fresh samples
        (all of them before anything is measured), the rest mutations and crossovers of the best."""
        seen = set(self.known)
        parents = self._parents()
        fresh_wanted = count if not parents else max(1, round(0.25 * count))

        def fresh(n: int) -> list:
            # One sample() call for all of them: it goes round the design spaces, so every space
            # (the fused one-block-per-row softmax, say) gets its share.
            found = self.space.sample(n, seed=self.rng.randrange(2**30), exclude=seen)
            seen.update(c.structural_hash for c in found)
            return found

        pool = fresh(fresh_wanted)
        attempts = 0
        while parents and len(pool) < count and attempts < 10 * count:
            attempts += 1
            mother = self._candidate(self.rng.choice(parents))
            mates = [p for p in parents if p.candidate is not None and p.candidate is not mother
                     and p.candidate.design_space == mother.design_space]
            if mates and self.rng.random() < 1 / 3:
                child = self.space.crossover(mother, self.rng.choice(mates).candidate, self.rng)
            else:
                child = self.space.mutate(mother, self.rng)
            if child is not None and child.structural_hash not in seen:
                seen.add(child.structural_hash)
                pool.append(child)
        if len(pool) < count:
            pool += fresh(count - len(pool))
        return pool

    def _choose(self, pool: list, features: list[dict], count: int) -> list[int]:
        """Indices of the pool to build: the best predicted, and a share at random to keep exploring."""
        indices = list(range(len(pool)))
        predicted_latency = self._predict_latency(features)
        if predicted_latency is None:
            self.rng.shuffle(indices)
            return indices[:count]
        energies = [None] * len(pool)
        if self.objective.needs_energy:
            energies, _ = self._predict_energy(features, predicted_latency)
            energies = energies or [None] * len(pool)
        fastest = self._fastest_s()
        ranked = sorted(indices, key=lambda i: self.objective.score(
            predicted_latency[i], energies[i] if energies[i] is not None else predicted_latency[i], fastest))
        exploit = self._top_spread(ranked, predicted_latency, max(1, count - round(self.config.explore * count)),
                                     features)
        rest = [i for i in ranked if i not in exploit]
        self.rng.shuffle(rest)
        return exploit + rest[: count - len(exploit)]

    # -- measuring -----------------------------------------------------------------------------
    def _record(self, known: _Known, result: MeasureResult, extra: dict | None = None) -> None:
        record_result(self.db, result, workload_id=self.workload_id, backend=self.backend.name, device=self.device,
                      candidate_id=known.candidate_id, run_id=self.run_id, extra=extra)

    def _check_budget(self, deadline: float | None) -> None:
        interrupts.check()  # a Ctrl-C that TVM turned into an error on the way
        if self.status.trials >= self.config.trials:
            raise _Stop("trials")
        if deadline is not None and time.monotonic() >= deadline:
            raise _Stop("time")

    def _generation(self, deadline: float | None) -> None:
        self._check_budget(deadline)
        self.status.generation += 1
        count = min(self.config.batch, self.config.trials - self.status.trials)
        pool = self._breed(count * self.config.pool_factor)
        if not pool:
            raise _Stop("exhausted")
        builds_by_hash = {}
        features = [self._features(c) for c in pool]
        chosen = [pool[i] for i in self._choose(pool, features, count)]
        if self.builder is not None:
            builds = self.builder.build(chosen)
            builds_by_hash = {b.structural_hash: b for b in builds}
        self._check_budget(deadline)
        knowns = []
        for candidate in chosen:
            build = builds_by_hash.get(candidate.structural_hash)
            feats = self._features(candidate, build)
            cid = self.db.add_candidate(self.workload_id, candidate.structural_hash, candidate.design_space,
                                        candidate.trace_json(), features=feats)
            knowns.append(_Known(cid, candidate.structural_hash, feats, candidate=candidate))
        predicted = self._predict_latency([k.features for k in knowns])
        by_hash = {k.structural_hash: (i, k) for i, k in enumerate(knowns)}

        def record_latency(result: MeasureResult) -> None:
            i, known = by_hash[result.structural_hash]
            self._record(known, result, {"generation": self.status.generation,
                                         "predicted_latency_s": predicted[i] if predicted else None})
            if result.ok:
                known.latency_s = result.value
            self.known[known.structural_hash] = known
            self.status.trials = len(self.known)
            self._update_best()
            self.on_status(self.status)

        builds = [builds_by_hash.get(c.structural_hash) for c in chosen] if self.builder else None
        self.backend.measure(chosen, "latency", builds=builds, progress=record_latency)
        self._retrain()
        self._measure_energy([k for k in knowns if k.latency_s is not None], builds_by_hash, final=False)

    def _features(self, candidate, build=None) -> dict:
        from etune.energy_model.features import candidate_features

        return candidate_features(candidate, self.gpu, build=build)

    def _energy_left(self) -> int:
        return self.status.energy_budget - self.status.energy_measurements

    def _measure_energy(self, timed: list[_Known], builds_by_hash: dict, final: bool) -> None:
        """Energy for the few the policy picks (or, at the end, the winners that lack it)."""
        if not timed or self._energy_left() <= 0:
            return
        if final:
            picks = timed[: self._energy_left()]
            predicted = [None] * len(picks)
            std = [None] * len(picks)
        else:
            if not self.objective.needs_energy:
                return
            # Keep one measurement for the end: the winner must be verified.
            per_generation = max(1, math.ceil((self._energy_left() - 1) * len(timed)
                                               / max(1, self.config.trials - self.status.trials + len(timed))))
            allowed = min(per_generation, self._energy_left() - 1)
            if allowed <= 0:
                return
            fastest = self._fastest_s()
            if self.objective.bounded_by_fastest and fastest is not None:
                # Slower than the slack's bound, a schedule can never win: its energy would only teach
                # the model about schedules the objective has already ruled out.
                timed = [k for k in timed if self.objective.within_slack(k.latency_s, fastest)]
                if not timed:
                    return
            predicted, std = self._predict_energy([k.features for k in timed], [k.latency_s for k in timed])
            indices = self.policy.select(
                predicted_mean=predicted, predicted_std=std, latency_s=[k.latency_s for k in timed],
                score=lambda lat, energy: self.objective.score(lat, energy, fastest), budget=allowed,
            )
            picks = [timed[i] for i in indices]
            predicted = [predicted[i] if predicted else None for i in indices]
            std = [std[i] if std else None for i in indices]
        for known, pred, spread in zip(picks, predicted, std):
            candidate = self._candidate(known)
            build = builds_by_hash.get(known.structural_hash) if builds_by_hash else self._cached_build(candidate)
            result = self.backend.measure([candidate], "energy", builds=[build] if self.builder else None)[0]
            self._record(known, result, {"generation": self.status.generation, "final_check": final,
                                         "predicted_energy_j": pred, "predicted_energy_std_j": spread})
            self.status.energy_measurements += 1
            if result.ok:
                known.energy_j = result.value
                if pred is not None:
                    self.policy.observe(pred, result.value)
            self._update_best()
            self.on_status(self.status)
        self._retrain()

    def _cached_build(self, candidate):
        if self.builder is None:
            return None
        return self.builder.build([candidate])[0]

    def _final_checks(self) -> None:
        """The winner must carry a measured energy: measure the candidates that could be it."""
        timed = [k for k in self.known.values() if k.latency_s is not None and k.energy_j is None]
        if not timed or self._energy_left() <= 0:
            return
        fastest = self._fastest_s()
        if self.objective.kind == "latency":
            contenders = sorted(timed, key=lambda k: k.latency_s)[:1]
        else:
            predicted, _ = self._predict_energy([k.features for k in timed], [k.latency_s for k in timed])
            guess = predicted or [k.latency_s for k in timed]
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
        deadline = None if self.config.time_budget_s is None else time.monotonic() + self.config.time_budget_s
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
         gpu: str = "h100", on_status=None, log=None, **config) -> Status:
    """Tune one workload and return the run's status (best point, counts). See ``TuneConfig``."""
    from etune.measurements import make_backend

    objective = objective if isinstance(objective, Objective) else Objective.parse(objective)
    owned = isinstance(backend, str)
    backend_ = make_backend(backend, gpu=gpu) if owned else backend
    try:
        with RecordsDB.open(db) as records:
            tuner = Tuner(spec, objective, backend_, records, TuneConfig(**config), gpu=gpu,
                          on_status=on_status, log=log)
            return tuner.run()
    finally:
        if owned:
            backend_.close()
