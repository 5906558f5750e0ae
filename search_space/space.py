"""Schedule spaces: MetaSchedule design spaces of a workload, and sampling, mutation and crossover.

A Candidate is a concrete schedule: a design space's trace with every sampling decision made and the
postprocessors applied. Validity (VerifyGPUCode among the postprocessors: threads, shared memory,
vector width against the target) is checked here, before anything is built.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import random
from typing import Iterable

import tvm
import tvm_ffi
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.schedule import Trace

from kernels import Workload, as_workload

from .analysis import KernelLaunch, kernel_launches, launch_problem
from .rules import RULE_SETS, schedule_rules
from .targets import GpuSpec, gpu_spec

# Postprocessors and mutators per rule set, as TVM's defaults pair them.
_DEFAULT_KIND = {"tensorcore": "cuda-tensorcore", "simt": "cuda"}


# TVM 0.27 raises plain Python exceptions across its FFI (no TVMError any more).
TVM_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AttributeError)


class SamplingError(RuntimeError):
    pass


@dataclasses.dataclass
class DesignSpace:
    index: int
    rule_set: str
    trace: Trace  # without decisions and without postprocessing
    postprocs: list
    mutators: dict  # Mutator -> probability


@dataclasses.dataclass
class Candidate:
    workload: Workload
    design_space: int
    schedule: Schedule = dataclasses.field(repr=False)
    # Kernels as lowered for the target; filled when the candidate passes the validity checks.
    launches: list[KernelLaunch] = dataclasses.field(default_factory=list, repr=False)

    @functools.cached_property
    def structural_hash(self) -> str:
        return f"{tvm_ffi.structural_hash(self.schedule.mod) & 0xFFFFFFFFFFFFFFFF:016x}"

    @property
    def trace(self) -> Trace:
        return self.schedule.trace

    @property
    def mod(self):
        return self.schedule.mod

    def trace_json(self) -> str:
        return json.dumps(_to_python(self.trace.as_json()))


def _to_python(obj):
    """TVM FFI containers to plain JSON-able Python values."""
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "items"):
        return {str(k): _to_python(v) for k, v in obj.items()}
    if hasattr(obj, "__iter__"):
        return [_to_python(v) for v in obj]
    if hasattr(obj, "value"):
        return obj.value
    return str(obj)


class ScheduleSpace:
    """The design spaces of one workload on one GPU, and the operators the search needs."""

    def __init__(self, workload: Workload | str, gpu: GpuSpec | str = "h100", rule_sets: Iterable[str] = RULE_SETS,
                 seed: int = 0):
        self.workload = as_workload(workload)
        self.gpu = gpu_spec(gpu) if isinstance(gpu, str) else gpu
        self.target = self.gpu.tvm_target()
        self.mod = self.workload.ir_module()
        self.design_spaces: list[DesignSpace] = []
        seen: set[str] = set()
        self.notes: list[str] = []
        for rule_set in rule_sets:
            generator, context, spaces = self._generate(rule_set, seed)
            for space in spaces:
                trace = Trace(space.trace.simplified(remove_postproc=True).insts, {})
                key = str(trace)
                if key in seen:  # softmax has no tensor-core site: both rule sets give the same space
                    continue
                seen.add(key)
                self.design_spaces.append(
                    DesignSpace(len(self.design_spaces), rule_set, trace, list(context.space_generator.postprocs),
                                dict(context.space_generator.mutator_probs))
                )
        if not self.design_spaces:
            raise SamplingError(f"{self.workload.spec}: MetaSchedule generated no design space")

    def _generate(self, rule_set: str, seed: int):
        """Design spaces of one rule set; without CrossThreadReduction where TVM 0.27 trips on it."""
        kind = _DEFAULT_KIND[rule_set]
        error = None
        for cross_thread_reduction in (True, False):
            generator = ms.space_generator.PostOrderApply(
                sch_rules=schedule_rules(rule_set, cross_thread_reduction), postprocs=kind, mutator_probs=kind
            )
            context = ms.TuneContext(
                mod=self.mod, target=self.target, space_generator=generator, task_name=self.workload.spec,
                rand_state=seed, num_threads=1,
            )
            try:
                spaces = generator.generate_design_space(self.mod)
            except TVM_ERRORS as exc:
                error = str(exc).strip().splitlines()[-1]
                continue
            if not cross_thread_reduction:
                self.notes.append(f"{rule_set}: CrossThreadReduction dropped (TVM: {error})")
            return generator, context, spaces
        raise SamplingError(f"{self.workload.spec}: no {rule_set} design space: {error}")

    # -- replay -------------------------------------------------------------------------------
    def _replay(self, space: DesignSpace, trace: Trace, seed: int) -> Candidate | None:
        """Apply a trace (decisions missing are sampled with ``seed``), then postprocess and verify."""
        sch = Schedule(self.mod, seed=seed, debug_mask=0)
        try:
            trace.apply_to_schedule(sch, remove_postproc=True)
            sch.enter_postproc()
            for postproc in space.postprocs:
                if not postproc.apply(sch):
                    return None
            candidate = Candidate(self.workload, space.index, sch)
            candidate.launches = kernel_launches(sch.mod, self.target)
        except TVM_ERRORS:
            return None
        if launch_problem(candidate.launches, self.gpu) is not None:
            return None
        return candidate

    def from_trace_json(self, trace_json: str, design_space: int) -> Candidate:
        """A candidate back from its stored trace (no sampling, no postprocessing: the trace has both)."""
        sch = Schedule(self.mod, debug_mask=0)
        Trace.apply_json_to_schedule(json.loads(trace_json), sch)
        return Candidate(self.workload, design_space, sch, kernel_launches(sch.mod, self.target))

    # -- operators ----------------------------------------------------------------------------
    def sample(self, n: int, seed: int = 0, max_attempts: int | None = None,
               exclude: set[str] | None = None) -> list[Candidate]:
        """n distinct valid candidates (by structural hash), drawn round-robin over the design spaces.

        Most random draws fail VerifyGPUCode (too many threads or too much shared memory for the
        drawn tiles), so this keeps drawing up to ``max_attempts`` (default 200 per candidate asked).
        """
        rng = random.Random(seed)
        seen = set(exclude or ())
        found: list[Candidate] = []
        attempts = max_attempts if max_attempts is not None else 200 * max(n, 1)
        for attempt in range(attempts):
            if len(found) >= n:
                break
            space = self.design_spaces[attempt % len(self.design_spaces)]
            candidate = self._replay(space, space.trace, rng.randrange(1, 2**30))
            if candidate is not None and candidate.structural_hash not in seen:
                seen.add(candidate.structural_hash)
                found.append(candidate)
        return found

    def mutate(self, candidate: Candidate, rng: random.Random) -> Candidate | None:
        """One MetaSchedule mutation (tile size, unroll, thread binding, compute location), or None."""
        space = self.design_spaces[candidate.design_space]
        trace = candidate.trace.simplified(remove_postproc=True)
        # Weighted order without replacement: a mutator with nothing to change (no tile to resize in
        # a softmax, say) returns None and the next one gets its turn.
        pending = [(m, float(p)) for m, p in space.mutators.items()]
        while pending:
            index = rng.choices(range(len(pending)), weights=[p for _, p in pending])[0]
            mutator, _ = pending.pop(index)
            mutated = mutator.apply(trace)
            if mutated is not None:
                return self._replay(space, mutated, rng.randrange(1, 2**30))
        return None

    def crossover(self, a: Candidate, b: Candidate, rng: random.Random) -> Candidate | None:
        """A child taking each sampling decision from one parent or the other.

        Both parents come from the same design space, so their traces have the same sampling
        instructions in the same order; a mix that is inconsistent (say, a tile split that no longer
        matches its loop) fails to replay and gives None.
        """
        if a.design_space != b.design_space:
            raise ValueError("crossover needs two candidates of the same design space")
        space = self.design_spaces[a.design_space]
        trace_a = a.trace.simplified(remove_postproc=True)
        trace_b = b.trace.simplified(remove_postproc=True)
        decisions_b = [trace_b.get_decision(inst) for inst in trace_b.insts if trace_b.get_decision(inst) is not None]
        mixed = {}
        position = 0
        for inst in trace_a.insts:
            decision = trace_a.get_decision(inst)
            if decision is None:
                continue
            if position < len(decisions_b) and rng.random() < 0.5:
                decision = decisions_b[position]
            mixed[inst] = decision
            position += 1
        return self._replay(space, Trace(trace_a.insts, mixed), rng.randrange(1, 2**30))
