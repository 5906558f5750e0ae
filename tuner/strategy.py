"""Search strategies: which schedules to build and measure next.

A strategy proposes candidates (``propose(n)``) and is told what their measurements found
(``observe(trials)``); the loop in ``tuner.search`` builds, measures, records and keeps the budgets,
as MetaSchedule's TuneContext separates its search strategy from its builder, runner and database.

* ``GeneticSearch`` (the default): breeds a pool from the best measured schedules (mutation,
  crossover, a share of fresh samples), ranks it with the cost models under the objective and
  proposes the best predicted, spread over launch shapes, plus a share at random to keep exploring.
* ``RandomSearch``: fresh samples of the design spaces, nothing learned; the baseline a learned
  search must beat.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Callable, Protocol, Sequence

from .models import Models
from .objectives import Objective

STRATEGIES = ("genetic", "random")


@dataclasses.dataclass
class Trial:
    """A candidate the run has measured (or failed to build or measure)."""

    candidate_id: int
    structural_hash: str
    features: dict | None
    latency_s: float | None = None
    energy_j: float | None = None
    energy_converged: bool = True  # see RecordsDB.points
    energy_tried: bool = False  # an energy measurement was taken (ok or not): never taken again
    candidate: object | None = None  # search_space.Candidate; None until needed after a resume


class SearchStrategy(Protocol):
    def propose(self, n: int) -> list:
        """Up to ``n`` valid candidates not measured before, most promising first ([]: exhausted)."""

    def observe(self, trials: Sequence[Trial]) -> None:
        """Measurements came in (the same trial may come again once its energy is measured)."""


def make_strategy(name: str, space, objective: Objective, models: Models, seed: int, batch: int,
                  features: Callable, load_candidate: Callable[[Trial], object]) -> SearchStrategy:
    if name == "genetic":
        return GeneticSearch(space, objective, models, seed, batch, features, load_candidate)
    if name == "random":
        return RandomSearch(space, seed)
    raise ValueError(f"unknown search strategy {name!r} (choose {', '.join(STRATEGIES)})")


class RandomSearch:
    def __init__(self, space, seed: int = 0):
        self.space = space
        self.rng = random.Random(seed)
        self.seen: set[str] = set()

    def propose(self, n: int) -> list:
        found = self.space.sample(n, seed=self.rng.randrange(2**30), exclude=self.seen)
        self.seen.update(c.structural_hash for c in found)
        return found

    def observe(self, trials: Sequence[Trial]) -> None:
        self.seen.update(t.structural_hash for t in trials)


def launch_shape(features: dict) -> tuple:
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


class GeneticSearch:
    POOL_FACTOR = 4  # candidates bred and ranked per proposal = this x the number proposed
    EXPLORE = 0.25  # share of each proposal picked at random from the pool, not by the models
    FRESH = 0.25  # share of the pool sampled afresh rather than bred from parents

    def __init__(self, space, objective: Objective, models: Models, seed: int, batch: int,
                 features: Callable, load_candidate: Callable[[Trial], object]):
        self.space = space
        self.objective = objective
        self.models = models
        self.rng = random.Random(seed)
        self.parent_count = max(4, batch)
        self.features = features
        self.load_candidate = load_candidate
        self.trials: dict[str, Trial] = {}

    def observe(self, trials: Sequence[Trial]) -> None:
        for trial in trials:
            self.trials[trial.structural_hash] = trial

    def propose(self, n: int) -> list:
        pool = self._breed(n * self.POOL_FACTOR)
        features = [self.features(c) for c in pool]
        return [pool[i] for i in self._choose(features, n)]

    def _fastest_s(self) -> float | None:
        timed = [t.latency_s for t in self.trials.values() if t.latency_s is not None]
        return min(timed) if timed else None

    def _parents(self) -> list[Trial]:
        """The best measured candidates under the objective, energy predicted where not measured."""
        timed = [t for t in self.trials.values() if t.latency_s is not None]
        if not timed:
            return []
        energies = [t.energy_j for t in timed]
        missing = [i for i, e in enumerate(energies) if e is None]
        if missing and self.objective.needs_energy:
            predicted, _ = self.models.predict_energy([timed[i].features for i in missing],
                                                      [timed[i].latency_s for i in missing])
            if predicted is not None:
                for i, e in zip(missing, predicted):
                    energies[i] = e
        fastest = self._fastest_s()
        order = sorted(range(len(timed)), key=lambda i: self.objective.score(timed[i].latency_s, energies[i], fastest))
        order = self._top_spread(order, [t.latency_s for t in timed], self.parent_count,
                                 [t.features or {} for t in timed])
        return [timed[i] for i in order]

    def _top_spread(self, order: list[int], latency_s: list[float], count: int, features: list[dict]) -> list[int]:
        """The first ``count`` of ``order``, spread over launch shapes; under a slack, alternately the
        fastest, because the slack's bound is the fastest latency found: a run that stops looking for
        faster schedules lets its bound drift up and hands back a slower winner than the user's slack
        allows."""
        rankings = [order]
        if self.objective.bounded_by_fastest:
            rankings.append(sorted(range(len(latency_s)), key=lambda i: latency_s[i]))
        return interleave_by_shape(rankings, [launch_shape(f) for f in features], count)

    def _candidate(self, trial: Trial):
        if trial.candidate is None:
            trial.candidate = self.load_candidate(trial)
        return trial.candidate

    def _breed(self, count: int) -> list:
        """Up to ``count`` new valid candidates not measured before: a share of fresh samples (all of
        them before anything is measured), the rest mutations and crossovers of the best."""
        seen = set(self.trials)
        parents = self._parents()
        fresh_wanted = count if not parents else max(1, round(self.FRESH * count))

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

    def _choose(self, features: list[dict], count: int) -> list[int]:
        """Indices of the pool to propose: the best predicted, and a share at random to keep exploring."""
        indices = list(range(len(features)))
        predicted_latency = self.models.predict_latency(features)
        if predicted_latency is None:
            self.rng.shuffle(indices)
            return indices[:count]
        energies = [None] * len(features)
        if self.objective.needs_energy:
            energies, _ = self.models.predict_energy(features, predicted_latency)
            energies = energies or [None] * len(features)
        fastest = self._fastest_s()
        ranked = sorted(indices, key=lambda i: self.objective.score(
            predicted_latency[i], energies[i] if energies[i] is not None else predicted_latency[i], fastest))
        exploit = self._top_spread(ranked, predicted_latency, max(1, count - round(self.EXPLORE * count)), features)
        rest = [i for i in ranked if i not in exploit]
        self.rng.shuffle(rest)
        return exploit + rest[: count - len(exploit)]
