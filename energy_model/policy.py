"""The dynamic update strategy: which candidates get a real (expensive) energy measurement.

Every built candidate has its latency measured (milliseconds); an energy measurement costs about a
second of back-to-back launches, so only a few per batch get one. ``UpdatePolicy.select`` picks them,
deterministically, in this order:

1. **best** — the candidates the model ranks best under the objective (a callable ``score(latency,
   energy)`` with the predicted energy, or: predicted energy, with candidates slower than
   ``(1 + slack) x fastest`` ranked after all others). The best prediction is always verified, because
   a reported winner must carry a measured energy.
2. **uncertain** — the highest relative uncertainty ``std / mean`` among the rest (where the
   ensemble disagrees, a measurement teaches the model most).
3. **check** — only while the model is in *alarm* (recent error above the threshold, or the last
   batch's error grown by ``growth`` over the earlier rolling error): candidates spread evenly over the
   predicted ranking, so a biased model is caught wherever it is wrong, not only at the top.

How many: a *quota* per batch that adapts to the model's accuracy. It starts at ``per_batch`` (cold:
fewer than ``min_observations`` prediction errors known). After each batch it is halved while the
rolling MAPE of the last ``window`` observations stays below ``mape_threshold`` (the model is
trusted; down to ``min_per_batch``, never 0), and reset to ``per_batch`` when the error grows. The
quota is split ~2/3 best and ~1/3 uncertain (at least one best). Hard caps: ``per_batch`` (and the
``budget`` passed to one call) per batch, ``global_budget`` over the run.

Without predictions (no model yet) it picks by latency (fastest first: energy and latency correlate)
and spreads the rest evenly over the latency ranking for coverage.

Accounting: ``select`` counts what it returns as spent (the caller measures those) and opens a new
batch; ``observe(predicted, measured)`` records the model's out-of-sample error for each measurement
(predicted before measuring); ``needs_retrain`` is true once new measurements arrived since
``mark_retrained()``.

Every policy here has that interface (``select``, ``observe``), so the tuner can swap them:

* ``ExpectedImprovementPolicy`` — the candidates whose expected improvement of the objective over the
  best *measured* score is largest, under the model's uncertainty (log-energy Gaussian with the
  ensemble's spread); only within the latency slack.
* ``FastestFirstPolicy`` — the naive way: the k fastest within the slack, predictions ignored.
* ``RandomPolicy`` — a seeded random choice within the slack (what a model must beat at all).
"""
from __future__ import annotations

import dataclasses
import math
from collections import deque
from typing import Callable, Sequence

import numpy as np

Score = Callable[[float, float], float]


@dataclasses.dataclass
class Selection:
    """Why each index was chosen (``policy.last``)."""

    indices: list[int]
    reasons: dict[int, str]
    quota: int
    state: str  # UpdatePolicy: cold | accurate | alarm; the others: their label


class SelectionPolicy:
    """What every policy shares: budgets, the record of the model's out-of-sample errors, and the
    candidates a batch may pick from. Subclasses rank the eligible candidates in ``_choose``."""

    label = "policy"  # Selection.state and history of the policies without states of their own

    def __init__(self, per_batch: int | None = None, global_budget: int | None = None, slack: float | None = None,
                 window: int = 32, retrain_after: int = 1, seed: int = 0):
        self.per_batch = per_batch
        self.global_budget = global_budget
        self.slack = slack
        self.window = window
        self.retrain_after = retrain_after
        self.seed = seed
        self.spent = 0
        self.errors: deque[float] = deque(maxlen=window)  # absolute percentage errors (fractions)
        self.batches: list[list[float]] = [[]]  # errors observed per batch (after each select)
        self.unretrained = 0
        self.last: Selection | None = None
        self.history: list[dict] = []

    # -- accuracy ------------------------------------------------------------------------------
    def observe(self, predicted, measured) -> None:
        """Record out-of-sample prediction errors (scalars or sequences of equal length)."""
        pred = np.atleast_1d(np.asarray(predicted, dtype=np.float64))
        true = np.atleast_1d(np.asarray(measured, dtype=np.float64))
        if pred.shape != true.shape:
            raise ValueError("predicted and measured differ in length")
        for p, t in zip(pred, true):
            if math.isfinite(p) and math.isfinite(t) and t != 0:
                error = abs(p - t) / abs(t)
                self.errors.append(error)
                self.batches[-1].append(error)
            self.unretrained += 1

    def measured(self, count: int = 1) -> None:
        """Measurements taken without a prediction (they still call for a retrain)."""
        self.unretrained += count

    @property
    def rolling_mape(self) -> float:
        return float(np.mean(self.errors)) if self.errors else math.nan

    @property
    def needs_retrain(self) -> bool:
        return self.unretrained >= self.retrain_after

    def mark_retrained(self) -> None:
        self.unretrained = 0

    @property
    def remaining(self) -> int | None:
        return None if self.global_budget is None else max(0, self.global_budget - self.spent)

    def _cap(self, cap: int | None, budget: int | None, available: int) -> int:
        """``cap`` (None: no limit of the policy's own) within this call's budget, the global budget
        and the candidates available."""
        for limit in (cap, budget, self.remaining):
            if limit is not None:
                available = min(available, int(limit))
        return max(0, available)

    def _record(self, chosen: list[int], reasons: dict[int, str], quota: int, state: str, n: int) -> list[int]:
        self.spent += len(chosen)
        self.last = Selection(chosen, reasons, quota, state)
        self.history.append({"batch": len(self.history), "state": state, "quota": quota, "chosen": len(chosen),
                             "candidates": n, "rolling_mape": self.rolling_mape, "spent": self.spent})
        return chosen

    def to_json(self) -> dict:
        return {"policy": type(self).__name__, "spent": self.spent, "rolling_mape": self.rolling_mape,
                "history": self.history}

    # -- choosing ------------------------------------------------------------------------------
    def select(self, predicted_mean: Sequence[float] | None, predicted_std: Sequence[float] | None = None,
               latency_s: Sequence[float] | None = None, score: Score | None = None,
               fastest_s: float | None = None, budget: int | None = None, exclude: Sequence[int] = (),
               incumbent: float | None = None) -> list[int]:
        """Indices (into the batch) to measure energy for, most important first.

        As ``UpdatePolicy.select``; candidates slower than ``(1 + slack) x fastest`` (with ``slack``
        set) are never picked. ``incumbent``: the best measured score so far (lower is better).
        """
        n = _length(predicted_mean, latency_s)
        self.batches.append([])
        latency = _floats(latency_s, n)
        blocked = set(int(i) for i in exclude)
        eligible = [i for i in _within_slack(latency, self.slack, fastest_s) if i not in blocked]
        cap = self._cap(self.per_batch, budget, len(eligible))
        chosen = self._choose(eligible, cap, _floats(predicted_mean, n) if predicted_mean is not None else None,
                              _floats(predicted_std, n) if predicted_std is not None else np.zeros(n),
                              latency, score, incumbent)[:cap]
        return self._record([i for i, _ in chosen], dict(chosen), cap, self.label, n)

    def _choose(self, eligible, cap, mean, std, latency, score, incumbent) -> list[tuple[int, str]]:
        """(index, reason) pairs among ``eligible``, best first (``select`` keeps the first ``cap``).
        ``mean`` is None without a model; ``std`` is 0 where unknown; arrays cover the whole batch."""
        raise NotImplementedError


class UpdatePolicy(SelectionPolicy):
    def __init__(self, per_batch: int = 4, min_per_batch: int = 1, global_budget: int | None = None,
                 mape_threshold: float = 0.10, growth: float = 1.5, window: int = 32, min_observations: int = 6,
                 slack: float | None = None, extra_checks: int = 2, best_share: float = 2 / 3,
                 retrain_after: int = 1, seed: int = 0):
        if per_batch < 1 or min_per_batch < 1 or min_per_batch > per_batch:
            raise ValueError("need 1 <= min_per_batch <= per_batch")
        super().__init__(per_batch, global_budget, slack, window, retrain_after, seed)
        self.min_per_batch = min_per_batch
        self.mape_threshold = mape_threshold
        self.growth = growth
        self.min_observations = min_observations
        self.extra_checks = extra_checks
        self.best_share = best_share
        self.quota = per_batch

    # -- accuracy ------------------------------------------------------------------------------
    def _previous_mape(self) -> float:
        """Mean error of the observations before the most recent batch that has any."""
        batches = [b for b in self.batches if b]
        earlier = [e for b in batches[:-1] for e in b][-self.window:]
        return float(np.mean(earlier)) if earlier else math.nan

    def _last_batch_mape(self) -> float:
        batches = [b for b in self.batches if b]
        return float(np.mean(batches[-1])) if batches else math.nan

    @property
    def state(self) -> str:
        """cold (too few errors known), alarm (error high or growing), or accurate."""
        if len(self.errors) < self.min_observations:
            return "cold"
        rolling = self.rolling_mape
        recent = self._last_batch_mape()
        previous = self._previous_mape()
        if rolling > self.mape_threshold or recent > self.mape_threshold:
            return "alarm"
        if math.isfinite(previous) and previous > 0 and recent > self.growth * previous and \
                recent > 0.5 * self.mape_threshold:
            return "alarm"
        return "accurate"

    # -- choosing ------------------------------------------------------------------------------
    def _objective(self, mean, latency, score, fastest_s) -> np.ndarray:
        n = len(mean)
        if score is not None:
            return np.array([float(score(latency[i], mean[i])) for i in range(n)])
        values = np.asarray(mean, dtype=np.float64).copy()
        bound = _slack_bound(latency, self.slack, fastest_s)
        if bound is not None:
            slow = latency > bound
            # Slower than the bound: after all within it, and slower ones after less slow ones.
            values[slow] = 1e30 * (1.0 + latency[slow] / bound)
        return values

    def select(self, predicted_mean: Sequence[float] | None, predicted_std: Sequence[float] | None = None,
               latency_s: Sequence[float] | None = None, score: Score | None = None,
               fastest_s: float | None = None, budget: int | None = None,
               exclude: Sequence[int] = (), incumbent: float | None = None) -> list[int]:
        """Indices (into the batch) to measure energy for, most important first.

        ``predicted_mean``/``predicted_std``: the model's energy per candidate (None: no model yet).
        ``latency_s``: measured latencies. ``score(latency, energy)``: the objective (lower is better);
        else predicted energy, with the latency slack of this policy. ``budget``: this call's cap (on
        top of ``per_batch`` and the global budget). ``exclude``: indices never to pick (measured).
        ``incumbent`` is accepted for the other policies' sake and not used.
        """
        n = _length(predicted_mean, latency_s)
        state = self.state
        # The quota follows the model's accuracy, judged on the batch just observed.
        if state == "alarm" or state == "cold":
            self.quota = self.per_batch
        elif state == "accurate" and self.last is not None and self.batches[-1]:
            self.quota = max(self.min_per_batch, self.quota // 2)
        self.batches.append([])
        blocked = set(int(i) for i in exclude)
        cap = self._cap(min(self.quota + (self.extra_checks if state == "alarm" else 0),
                            self.per_batch + self.extra_checks), budget, n - len(blocked & set(range(n))))
        reasons: dict[int, str] = {}
        chosen: list[int] = []

        def take(indices, reason, limit):
            for i in indices:
                if len(chosen) >= limit:
                    break
                if i not in reasons and i not in blocked:
                    chosen.append(int(i))
                    reasons[int(i)] = reason

        latency = _floats(latency_s, n)
        if cap > 0 and predicted_mean is None:
            order = _fastest_first([i for i in range(n) if i not in blocked], latency)
            take(order[:1], "fastest (no model)", cap)
            take(_spread([i for i in order if i not in reasons], cap - len(chosen), self.seed), "spread (no model)", cap)
        elif cap > 0:
            mean = _floats(predicted_mean, n)
            std = np.zeros(n) if predicted_std is None else _floats(predicted_std, n)
            objective = self._objective(mean, latency, score, fastest_s)
            objective = np.where(np.isfinite(objective), objective, np.inf)
            # Measured ones out of the ranking first, so spreading over it never lands on one.
            order = [int(i) for i in np.lexsort((np.arange(n), objective)) if int(i) not in blocked]
            n_best = max(1, round(self.best_share * min(cap, self.quota)))
            take(order, "best predicted", min(n_best, cap))
            relative = np.where(mean > 0, std / np.where(mean > 0, mean, 1.0), np.inf)
            relative = np.where(np.isfinite(relative), relative, np.inf)
            by_uncertainty = [int(i) for i in np.lexsort((np.arange(n), -relative))]
            take(by_uncertainty, "most uncertain", min(cap, self.quota))
            if state == "alarm":
                rest = [i for i in order if i not in reasons]
                take(_spread(rest, cap - len(chosen), self.seed), "error check", cap)
            # Quota not filled by uncertainty (e.g. zero std everywhere): next best predicted.
            take(order, "best predicted", min(cap, self.quota))
        return self._record(chosen, reasons, self.quota, state, n)

    def to_json(self) -> dict:
        return {**super().to_json(), "quota": self.quota, "state": self.state}


class FastestFirstPolicy(SelectionPolicy):
    """The naive way: energy for the fastest candidates within the slack, whatever the model says.

    With ``per_batch=None`` and no budget, every candidate within the slack (the post-hoc way: tune
    for latency, then measure the energy of everything near the fastest)."""

    label = "fastest first"

    def _choose(self, eligible, cap, mean, std, latency, score, incumbent):
        return [(i, "fastest") for i in _fastest_first(eligible, latency)]


class RandomPolicy(SelectionPolicy):
    """A seeded random choice among the candidates within the slack, whatever the model says."""

    label = "random"

    def __init__(self, per_batch: int | None = None, global_budget: int | None = None, slack: float | None = None,
                 seed: int = 0):
        super().__init__(per_batch, global_budget, slack, seed=seed)
        self.rng = np.random.default_rng(seed)

    def _choose(self, eligible, cap, mean, std, latency, score, incumbent):
        return [(int(i), "random") for i in self.rng.permutation(eligible)[:cap]]


class ExpectedImprovementPolicy(SelectionPolicy):
    """Energy for the candidates with the largest expected improvement of the objective over the
    incumbent (the best measured score; lower is better), under the model's uncertainty.

    The energy of a candidate is taken as lognormal: log-energy Gaussian around the log of the
    predicted energy with sigma = the ensemble's relative spread ``std / mean``. An ensemble that
    agrees with itself can still be wrong together, so sigma is at least the policy's observed
    out-of-sample error (rolling mean absolute relative error x sqrt(pi/2), the sigma of a Gaussian
    with that mean absolute deviation) once ``min_observations`` errors are known.

    ``score(latency, energy)`` must be affine in energy at a fixed latency, as every objective of
    tuner/objectives.py is (energy within the slack, energy x latency, latency); it is probed at two
    energies per candidate. Without ``score`` the objective is the energy.

    Only candidates that can improve (expected improvement > 0) are picked, largest first; ties go
    to the lower predicted score, then the lower index. With no incumbent (nothing measured yet) the
    best predicted score is the reference, and the best predicted candidate is picked when nothing
    promises more. Without predictions (no model yet): the fastest first.
    """

    label = "expected improvement"

    def __init__(self, per_batch: int | None = None, global_budget: int | None = None, slack: float | None = None,
                 min_observations: int = 6, window: int = 32, seed: int = 0):
        super().__init__(per_batch, global_budget, slack, window=window, seed=seed)
        self.min_observations = min_observations

    @property
    def sigma_floor(self) -> float:
        if len(self.errors) < self.min_observations:
            return 0.0
        return self.rolling_mape * math.sqrt(math.pi / 2)

    def expected_improvement(self, mean, std, latency, score: Score | None = None,
                             incumbent: float | None = None) -> np.ndarray:
        """Expected improvement over ``incumbent`` per candidate (0 where none is possible or the
        inputs are not finite), in the score's units."""
        mean, std, latency = (np.asarray(v, dtype=np.float64) for v in (mean, std, latency))
        # The score as slope x energy + offset at each candidate's latency.
        at_mean = _scores(score, latency, mean)
        if incumbent is None and not np.isfinite(at_mean).any():
            return np.zeros(mean.shape)
        with np.errstate(invalid="ignore", divide="ignore"):
            slope = (_scores(score, latency, 2 * mean) - at_mean) / mean
            offset = at_mean - slope * mean
            reference = np.nanmin(at_mean) if incumbent is None else float(incumbent)
            sigma = np.maximum(std / mean, self.sigma_floor)
            threshold = (reference - offset) / slope  # the energy below which the score improves
            improvement = np.where(slope > 0, slope * _lognormal_shortfall(threshold, mean, sigma),
                                   np.maximum(0.0, reference - at_mean))
        return np.where(np.isfinite(improvement) & (mean > 0), np.maximum(improvement, 0.0), 0.0)

    def _choose(self, eligible, cap, mean, std, latency, score, incumbent):
        if mean is None:
            return [(i, "fastest (no model)") for i in _fastest_first(eligible, latency)]
        if not eligible:
            return []
        idx = np.asarray(eligible)
        gain = self.expected_improvement(mean[idx], np.nan_to_num(std[idx], nan=0.0), latency[idx], score, incumbent)
        predicted = _scores(score, latency[idx], mean[idx])
        predicted = np.where(np.isfinite(predicted), predicted, np.inf)
        order = np.lexsort((idx, predicted, -gain))
        picks = [(int(idx[k]), "expected improvement") for k in order if gain[k] > 0]
        if not picks and incumbent is None and np.isfinite(predicted).any():
            picks = [(int(idx[order[0]]), "best predicted (nothing measured)")]
        return picks


def _lognormal_shortfall(threshold, median, sigma):
    """E[max(0, threshold - X)] for X lognormal with the given median and log-space sigma
    (elementwise; sigma 0 means X = median)."""
    threshold, median, sigma = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (threshold, median, sigma)))
    certain = np.maximum(0.0, threshold - median)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = (np.log(np.where(threshold > 0, threshold, 1.0)) - np.log(median)) / sigma
        uncertain = threshold * _normal_cdf(d) - median * np.exp(sigma**2 / 2) * _normal_cdf(d - sigma)
    return np.where(threshold <= 0, 0.0, np.where(sigma > 0, uncertain, certain))


_normal_cdf = np.vectorize(lambda x: 0.5 * math.erfc(-x / math.sqrt(2)) if not math.isnan(x) else math.nan,
                           otypes=[float])


def _scores(score: Score | None, latency: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """``score(latency, energy)`` elementwise; without a score, the energy."""
    if score is None:
        return np.asarray(energy, dtype=np.float64).copy()
    return np.array([float(score(lat, e)) for lat, e in zip(latency, energy)])


def _length(predicted_mean, latency_s) -> int:
    return len(predicted_mean) if predicted_mean is not None else (len(latency_s) if latency_s is not None else 0)


def _floats(values, n: int) -> np.ndarray:
    """A float array of ``n`` values (None entries, or no values at all, become NaN)."""
    if values is None:
        return np.full(n, np.nan)
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _slack_bound(latency: np.ndarray, slack: float | None, fastest_s: float | None) -> float | None:
    """The slowest latency within ``slack`` of the fastest (given or in the batch); None: no bound."""
    if slack is None or not np.isfinite(latency).any():
        return None
    fastest = np.nanmin(latency) if fastest_s is None else min(fastest_s, np.nanmin(latency))
    return (1.0 + slack) * fastest


def _within_slack(latency: np.ndarray, slack: float | None, fastest_s: float | None) -> list[int]:
    bound = _slack_bound(latency, slack, fastest_s)
    if bound is None:
        return list(range(len(latency)))
    return [i for i in range(len(latency)) if latency[i] <= bound]


def _fastest_first(indices, latency: np.ndarray) -> list[int]:
    """``indices`` by latency (unknown last), ties by index."""
    indices = np.asarray(list(indices), dtype=int)
    if indices.size == 0:
        return []
    return [int(indices[k]) for k in np.lexsort((indices, np.nan_to_num(latency[indices], nan=np.inf)))]


def _spread(indices: Sequence[int], count: int, seed: int = 0) -> list[int]:
    """``count`` indices evenly spaced over ``indices`` (a ranking), offset by the seed."""
    indices = list(indices)
    if count <= 0 or not indices:
        return []
    if count >= len(indices):
        return indices
    step = len(indices) / count
    offset = (seed % 997) / 997 * step
    return [indices[min(len(indices) - 1, int(offset + k * step))] for k in range(count)]
