"""Tuning objectives, the best point under each, and the energy/latency Pareto front.

Objectives compare (latency, energy) points; lower is better. ``energy`` with a slack S is the
product's default question: the least energy among points no slower than (1 + S) x the fastest
latency known. A point's energy can be measured or predicted; ``best`` only ever picks among
measured ones for energy objectives, so a reported winner is never a model's guess.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable, Sequence

from etune.measurements.records import Point

KINDS = ("latency", "energy", "edp")
DEFAULT_MAX_SLOWDOWN = 0.05
# The help text of every --objective option (etune tune, export, report).
HELP = ("latency, edp, energy (least energy within 5 % of the fastest), energy@S (slowdown S, e.g. energy@0.1) "
        "or energy@none (least energy, however slow).")
# ASCII digits only (float() also takes "1_0" and "１"); an exponent as in labels: energy@1e-05
_SLACK = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[-+]?[0-9]+)?")


class ObjectiveError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Objective:
    kind: str  # latency | energy | edp
    # energy only: allowed slowdown over the fastest latency found (None: unconstrained energy)
    max_slowdown: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ObjectiveError(f"unknown objective {self.kind!r} (choose {', '.join(KINDS)})")
        if self.max_slowdown is not None:
            if self.kind != "energy":
                raise ObjectiveError("--max-slowdown applies to the energy objective only")
            if not (0 <= self.max_slowdown < 10) or math.isnan(self.max_slowdown):
                raise ObjectiveError(f"--max-slowdown must be in [0, 10), not {self.max_slowdown}")

    @classmethod
    def parse(cls, text: str, max_slowdown: str | float | None = None) -> "Objective":
        """The one spelling of an objective, for every command and the Python API alike: ``latency``,
        ``edp``, ``energy`` (slowdown 0.05), ``energy@S`` or ``energy@none`` (unconstrained).

        ``max_slowdown`` is ``etune tune --max-slowdown``, another spelling of S (a number or
        ``none``): it applies to energy only, and where the text has an @S too they must agree."""
        kind, at, slack = (part.strip() for part in str(text).strip().lower().partition("@"))
        if kind not in KINDS:
            raise ObjectiveError(f"unknown objective {text!r} (choose {HELP.rstrip('.')})")
        if at and kind != "energy":
            raise ObjectiveError(f"only the energy objective takes a slowdown (@S), not {kind}: {text!r}")
        value = _slowdown(slack, text) if at else DEFAULT_MAX_SLOWDOWN
        if max_slowdown is not None:
            if kind != "energy":
                raise ObjectiveError("--max-slowdown applies to the energy objective only")
            given = _slowdown(max_slowdown, "--max-slowdown") if isinstance(max_slowdown, str) else float(max_slowdown)
            if at and given != value:
                raise ObjectiveError(f"--max-slowdown {max_slowdown} contradicts {text!r}: give the slowdown once")
            value = given
        return cls(kind, value if kind == "energy" else None)

    @property
    def label(self) -> str:
        """Unambiguous name (``Objective.parse(label)`` gives the objective back)."""
        if self.kind == "energy":
            return "energy@none" if self.max_slowdown is None else f"energy@{self.max_slowdown:g}"
        return self.kind

    @property
    def bounded_by_fastest(self) -> bool:
        """Energy within a slack of the fastest latency found: finding fast schedules is half the job."""
        return self.kind == "energy" and self.max_slowdown is not None

    def slack_bound_s(self, fastest_s: float) -> float:
        """The slowest latency the slack allows, given the fastest found."""
        return (1 + self.max_slowdown) * fastest_s

    def within_slack(self, latency_s: float, fastest_s: float) -> bool:
        return latency_s <= self.slack_bound_s(fastest_s)

    @property
    def needs_energy(self) -> bool:
        return self.kind != "latency"

    def score(self, latency_s: float, energy_j: float | None, fastest_s: float | None = None) -> float:
        """Lower is better. With a slack, a point slower than the bound is ranked after every point
        within it, and slower ones after less slow ones."""
        if self.kind == "latency":
            return latency_s
        if energy_j is None:
            return math.inf
        if self.kind == "edp":
            return energy_j * latency_s
        if self.max_slowdown is None or fastest_s is None:
            return energy_j
        bound = self.slack_bound_s(fastest_s)
        if latency_s <= bound:
            return energy_j
        return 1e6 * (1 + latency_s / bound) + energy_j


def _slowdown(text: str, where: str) -> float | None:
    text = text.strip().lower()
    if text in ("none", "inf"):
        return None
    if not _SLACK.fullmatch(text):
        raise ObjectiveError(f"bad slowdown {text!r} in {where!r}: a number such as 0.05, or none")
    return float(text)


def best(points: Sequence[Point], objective: Objective, allow_unconverged: bool = False) -> Point | None:
    """The best measured point: latency from every point, energy only from energy-measured ones
    whose measurement converged (or from all energy-measured ones with ``allow_unconverged``)."""
    if not points:
        return None
    fastest = min(p.latency_s for p in points)
    pool = points if objective.kind == "latency" else [
        p for p in points if p.energy_measured and (p.energy_converged or allow_unconverged)]
    if not pool:
        return None
    return min(pool, key=lambda p: (objective.score(p.latency_s, p.energy_j, fastest), p.latency_s))


def pareto_front(points: Iterable[Point]) -> list[Point]:
    """Energy-measured points no other point beats in both latency and energy, by latency."""
    front: list[Point] = []
    for p in sorted((p for p in points if p.energy_measured and p.energy_j is not None),
                    key=lambda p: (p.latency_s, p.energy_j)):
        if not front or p.energy_j < front[-1].energy_j:
            front.append(p)
    return front
