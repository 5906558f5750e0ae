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
    """Why each index was chosen (``UpdatePolicy.last``)."""

    indices: list[int]
    reasons: dict[int, str]
    quota: int
    state: str  # cold | accurate | alarm


class UpdatePolicy:
    def __init__(self, per_batch: int = 4, min_per_batch: int = 1, global_budget: int | None = None,
                 mape_threshold: float = 0.10, growth: float = 1.5, window: int = 32, min_observations: int = 6,
                 slack: float | None = None, extra_checks: int = 2, best_share: float = 2 / 3,
                 retrain_after: int = 1, seed: int = 0):
        if per_batch < 1 or min_per_batch < 1 or min_per_batch > per_batch:
            raise ValueError("need 1 <= min_per_batch <= per_batch")
        self.per_batch = per_batch
        self.min_per_batch = min_per_batch
        self.global_budget = global_budget
        self.mape_threshold = mape_threshold
        self.growth = growth
        self.window = window
        self.min_observations = min_observations
        self.slack = slack
        self.extra_checks = extra_checks
        self.best_share = best_share
        self.retrain_after = retrain_after
        self.seed = seed
        self.quota = per_batch
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

    @property
    def needs_retrain(self) -> bool:
        return self.unretrained >= self.retrain_after

    def mark_retrained(self) -> None:
        self.unretrained = 0

    @property
    def remaining(self) -> int | None:
        return None if self.global_budget is None else max(0, self.global_budget - self.spent)

    # -- choosing ------------------------------------------------------------------------------
    def _objective(self, mean, latency, score, fastest_s) -> np.ndarray:
        n = len(mean)
        if score is not None:
            return np.array([float(score(latency[i], mean[i])) for i in range(n)])
        values = np.asarray(mean, dtype=np.float64).copy()
        if self.slack is not None and latency is not None:
            lat = np.asarray(latency, dtype=np.float64)
            fastest = np.nanmin(lat) if fastest_s is None else min(fastest_s, np.nanmin(lat))
            slow = lat > (1.0 + self.slack) * fastest
            # Slower than the bound: after all within it, and slower ones after less slow ones.
            values[slow] = 1e30 * (1.0 + lat[slow] / fastest)
        return values

    def select(self, predicted_mean: Sequence[float] | None, predicted_std: Sequence[float] | None = None,
               latency_s: Sequence[float] | None = None, score: Score | None = None,
               fastest_s: float | None = None, budget: int | None = None,
               exclude: Sequence[int] = ()) -> list[int]:
        """Indices (into the batch) to measure energy for, most important first.

        ``predicted_mean``/``predicted_std``: the model's energy per candidate (None: no model yet).
        ``latency_s``: measured latencies. ``score(latency, energy)``: the objective (lower is better);
        else predicted energy, with the latency slack of this policy. ``budget``: this call's cap (on
        top of ``per_batch`` and the global budget). ``exclude``: indices never to pick (measured).
        """
        n = len(predicted_mean) if predicted_mean is not None else (len(latency_s) if latency_s is not None else 0)
        state = self.state
        # The quota follows the model's accuracy, judged on the batch just observed.
        if state == "alarm" or state == "cold":
            self.quota = self.per_batch
        elif state == "accurate" and self.last is not None and self.batches[-1]:
            self.quota = max(self.min_per_batch, self.quota // 2)
        self.batches.append([])
        cap = self.quota + (self.extra_checks if state == "alarm" else 0)
        cap = min(cap, self.per_batch + self.extra_checks)
        if budget is not None:
            cap = min(cap, int(budget))
        if self.remaining is not None:
            cap = min(cap, self.remaining)
        blocked = set(int(i) for i in exclude)
        pool = [i for i in range(n) if i not in blocked]
        cap = max(0, min(cap, len(pool)))
        reasons: dict[int, str] = {}
        chosen: list[int] = []

        def take(indices, reason, limit):
            for i in indices:
                if len(chosen) >= limit:
                    break
                if i not in reasons and i not in blocked:
                    chosen.append(int(i))
                    reasons[int(i)] = reason

        if cap > 0 and predicted_mean is None:
            lat = np.asarray(latency_s, dtype=np.float64) if latency_s is not None else np.arange(n, dtype=float)
            order = [int(i) for i in np.lexsort((np.arange(n), np.nan_to_num(lat, nan=np.inf)))]
            take(order[:1], "fastest (no model)", cap)
            take(_spread([i for i in order if i not in reasons], cap - len(chosen), self.seed), "spread (no model)", cap)
        elif cap > 0:
            mean = np.array([np.nan if v is None else float(v) for v in predicted_mean], dtype=np.float64)
            std = (np.zeros(n) if predicted_std is None else
                   np.array([np.nan if v is None else float(v) for v in predicted_std], dtype=np.float64))
            latency = None if latency_s is None else [np.nan if v is None else float(v) for v in latency_s]
            objective = self._objective(mean, latency, score, fastest_s)
            objective = np.where(np.isfinite(objective), objective, np.inf)
            order = [int(i) for i in np.lexsort((np.arange(n), objective))]
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
        self.spent += len(chosen)
        self.last = Selection(chosen, reasons, self.quota, state)
        self.history.append({"batch": len(self.history), "state": state, "quota": self.quota, "chosen": len(chosen),
                             "candidates": n, "rolling_mape": self.rolling_mape, "spent": self.spent})
        return chosen

    def to_json(self) -> dict:
        return {"quota": self.quota, "spent": self.spent, "state": self.state, "rolling_mape": self.rolling_mape,
                "history": self.history}


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
