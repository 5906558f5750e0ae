"""A schedule space restricted to a fixed pool of schedules (a recorded dataset's candidates).

The ``replay`` backend can only answer for schedules that were measured, so the tuner searching a
replayed dataset must only propose those. ``PoolSpace`` keeps the genetic search meaningful inside
the pool: a mutation or crossover is made in the real design space (MetaSchedule's mutators), then
mapped to one of the pool's schedules nearest to the child (fewest sampling decisions that differ,
same design space), so parents still lead to similar children.
"""
from __future__ import annotations

import json
import random
from typing import Sequence

from .space import TVM_ERRORS, Candidate, ScheduleSpace, _to_python

# Children map to one of this many nearest pool schedules, at random: the same parent does not
# always lead to the same neighbour.
NEAREST = 3


def decisions(candidate: Candidate) -> list[str]:
    trace = candidate.trace
    return [json.dumps(_to_python(trace.get_decision(inst))) for inst in trace.insts
            if trace.get_decision(inst) is not None]


class PoolSpace:
    """Sampling, mutation and crossover over the schedules of ``entries``: (design space index,
    trace JSON, recorded structural hash). An entry whose trace no longer replays to its recorded
    hash (another TVM version) is left out and listed in ``unreplayable``."""

    def __init__(self, space: ScheduleSpace, entries: Sequence[tuple[int, str, str]]):
        self.space = space
        self.workload, self.gpu = space.workload, space.gpu
        self.members: dict[str, Candidate] = {}
        self.unreplayable: list[tuple[str, str]] = []
        for design_space, trace_json, recorded_hash in entries:
            try:
                candidate = space.from_trace_json(trace_json, design_space)
            except TVM_ERRORS as exc:
                self.unreplayable.append((recorded_hash, f"does not replay: {str(exc).strip()[:200]}"))
                continue
            if candidate.structural_hash != recorded_hash:
                self.unreplayable.append((recorded_hash, f"replays to {candidate.structural_hash}"))
                continue
            self.members[recorded_hash] = candidate
        self._decisions = {h: decisions(c) for h, c in self.members.items()}

    @property
    def design_spaces(self):
        return self.space.design_spaces

    def from_trace_json(self, trace_json: str, design_space: int) -> Candidate:
        return self.space.from_trace_json(trace_json, design_space)

    def sample(self, n: int, seed: int = 0, exclude: set[str] | None = None, **_) -> list[Candidate]:
        order = sorted(self.members)
        random.Random(seed).shuffle(order)
        return [self.members[h] for h in order if h not in (exclude or ())][:n]

    def _nearest(self, child: Candidate, rng: random.Random, avoid: set[str]) -> Candidate | None:
        if child.structural_hash in self.members and child.structural_hash not in avoid:
            return self.members[child.structural_hash]
        mine = decisions(child)

        def distance(h: str) -> int:
            theirs = self._decisions[h]
            return sum(a != b for a, b in zip(mine, theirs)) + abs(len(mine) - len(theirs))

        near = sorted((h for h, c in self.members.items()
                       if h not in avoid and c.design_space == child.design_space),
                      key=lambda h: (distance(h), h))
        return self.members[rng.choice(near[:NEAREST])] if near else None

    def mutate(self, candidate: Candidate, rng: random.Random) -> Candidate | None:
        child = self.space.mutate(candidate, rng) or candidate
        return self._nearest(child, rng, {candidate.structural_hash})

    def crossover(self, a: Candidate, b: Candidate, rng: random.Random) -> Candidate | None:
        child = self.space.crossover(a, b, rng) or a
        return self._nearest(child, rng, {a.structural_hash, b.structural_hash})
