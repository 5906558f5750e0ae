"""Schedule spaces: MetaSchedule design spaces of a workload, and sampling, mutation and crossover.

A Candidate is a concrete schedule: a design space's trace with every sampling decision made and the
postprocessors applied. Validity (VerifyGPUCode among the postprocessors: threads, shared memory,
vector width against the target) is checked here, before anything is built.

Sampling repairs draws kernel by kernel. A multi-kernel module (attention lowers to four kernels)
is valid only if every kernel is, so whole-draw rejection needs about 1 / (product of the kernels'
pass rates) draws per candidate: ~65 for attention prefill, most failing VerifyGPUCode in the QK^T or
the P @ V kernel. Each sampling decision of a design space belongs to one group of blocks (the data
flow of the trace's random variables from ``get_sblock``). A draw that fails is checked kernel by
kernel with the check that failed (the module cut down to one top-level statement), and only the
decisions of the failing kernels' groups are drawn again; the others are kept. A failure that cannot
be traced to some kernels, or that is in all of them (so always with one kernel: GEMM, most softmax
spaces), starts a fresh draw exactly as before. Every candidate returned has passed the same full
checks as before. The kernels' checks depend on disjoint decisions (the unroll step shared by all
aside), so within a design space a candidate is drawn from the distribution whole-draw rejection
gives; across design spaces, those whose kernels are repaired cheaply give more candidates.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import random
from typing import Iterable

import tvm
import tvm_ffi
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule import _ffi_api as _ms_ffi
from tvm.s_tir import stmt as s_stmt
from tvm.s_tir.schedule import LoopRV, SBlockRV, Trace

from etune.kernels import Workload, as_workload
from etune.kernels.attention_fused import fused_prim_funcs
from etune.kernels.attention_mma import mma_prefill_funcs
from etune.kernels.gemm_mma import gemm_mma_funcs
from etune.kernels.gemm_tma import gemm_tma_funcs
from etune.kernels.gemm_wgmma import gemm_wgmma_funcs
from etune.kernels.gemm_splitk import split_k_prim_funcs
from etune.kernels.softmax_fused import softmax_prim_funcs

from . import interrupts
from .analysis import KernelLaunch, kernel_launches, launch_problem
from .rules import DYNAMIC_SHARED_RULE_SETS, RULE_SETS, pipeline_variants, postprocs, rule_set_applies, schedule_rules
from .targets import GpuSpec, gpu_spec

# Postprocessors and mutators per rule set, as TVM's defaults pair them.
_DEFAULT_KIND = {"tensorcore": "cuda-tensorcore", "mma": "cuda-tensorcore", "splitk_tc": "cuda-tensorcore",
                 "simt": "cuda", "fused": "cuda", "splitk": "cuda", "rowsoftmax": "cuda", "flash_mma": "cuda",
                 "gemm_mma": "cuda", "gemm_wgmma": "cuda"}
# Rule sets over etune's TIR templates instead of the workload's TE chain:
# {rule set: (workload, GpuSpec) -> the templates that apply, {name: PrimFunc}}.
_TEMPLATES = {"fused": fused_prim_funcs, "rowsoftmax": lambda workload, gpu: softmax_prim_funcs(workload),
              "splitk_tc": split_k_prim_funcs, "flash_mma": mma_prefill_funcs, "gemm_mma": gemm_mma_funcs,
              # Hopper templates: cp.async stages, and TMA stages with B multicast over clusters
              "gemm_wgmma": lambda workload, gpu: {**gemm_wgmma_funcs(workload, gpu), **gemm_tma_funcs(workload, gpu)}}


# TVM 0.27 raises plain Python exceptions across its FFI (no TVMError any more).
TVM_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AttributeError)


class SamplingError(RuntimeError):
    pass


# Replays after which a draw still being repaired starts afresh: the decisions shared by all kernels
# (the unroll step) are only drawn anew with a fresh draw. A SIMT attention kernel passes about one
# draw in 50, so this is rarely reached.
MAX_ROUNDS_PER_DRAW = 256


@dataclasses.dataclass(frozen=True)
class DecisionGroups:
    """Which block group each sampling decision of a design-space trace belongs to.

    Two random variables are in one group when an instruction uses or makes both (``get_loops`` of a
    block, ``split`` of a loop by sampled factors, ``annotate`` of a block with a sampled value,
    ``compute_at`` of one block under another's loop). Blocks that end up in different kernels are in
    different groups unless the schedule ties them together; the root block's group (the unroll
    decision) reaches every kernel.
    """

    samples: tuple[int, ...]  # trace positions of the sampling instructions
    group_of: dict  # sampling position -> group id
    blocks: tuple[tuple[int, int, int], ...]  # (position, output index, group id) of every block RV made


def _random_variables(values):
    for value in values:
        if isinstance(value, (SBlockRV, LoopRV, tvm.tirx.Var)):
            yield value
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
            yield from _random_variables(value)


def decision_groups(trace: Trace) -> DecisionGroups:
    parent: dict[int, int] = {}

    def find(key: int) -> int:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    insts = list(trace.insts)
    for inst in insts:
        keys = [rv.__chandle__() for rv in _random_variables(list(inst.inputs) + list(inst.outputs))]
        for key in keys:
            parent.setdefault(key, key)
        for key in keys[1:]:
            a, b = find(keys[0]), find(key)
            if a != b:
                parent[b] = a
    ids: dict[int, int] = {}
    samples, group_of, blocks = [], {}, []
    for position, inst in enumerate(insts):
        outputs = list(inst.outputs)
        if inst.kind.name.startswith("Sample"):
            rvs = list(_random_variables(list(inst.inputs) + outputs))
            samples.append(position)
            # A sampling instruction with no random variable at all is a group of its own.
            key = find(rvs[0].__chandle__()) if rvs else ("alone", position)
            group_of[position] = ids.setdefault(key, len(ids))
        for index, output in enumerate(outputs):
            if isinstance(output, SBlockRV):
                blocks.append((position, index, ids.setdefault(find(output.__chandle__()), len(ids))))
    return DecisionGroups(tuple(samples), group_of, tuple(blocks))


def _kernel_statements(mod) -> list:
    """The top-level statements of the scheduled function's root block: one kernel each."""
    body = mod["main"].body.block.body
    return list(body.seq) if type(body).__name__ == "SeqStmt" else [body]


def _kernel_module(mod, index: int):
    """The module with only the ``index``-th top-level statement (kernel) of the root block kept."""
    func = mod["main"]
    realize = func.body
    root = realize.block
    block = s_stmt.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, _kernel_statements(mod)[index],
                          root.init, root.alloc_buffers, root.match_buffers, root.annotations)
    return tvm.IRModule({"main": func.with_body(s_stmt.SBlockRealize(realize.iter_values, realize.predicate, block))})


def _kernel_groups(sch: Schedule, groups: DecisionGroups) -> list[set[int]]:
    """Per top-level statement of the freshly scheduled module, the decision groups whose blocks it holds."""
    insts = list(sch.trace.insts)
    kernels: list[set[int]] = [set() for _ in _kernel_statements(sch.mod)]
    for position, index, group in groups.blocks:
        try:
            sref = sch.get_sref(insts[position].outputs[index])
        except TVM_ERRORS:  # inlined or replaced by a later instruction
            continue
        if sref is None or sref.parent is None:  # the root block
            continue
        while sref.parent.parent is not None:
            sref = sref.parent
        kernels[max(sref.seq_index, 0)].add(group)
    return kernels


def _decision_key(decision) -> str:
    return json.dumps(_to_python(decision))


@dataclasses.dataclass
class DesignSpace:
    index: int
    rule_set: str
    trace: Trace  # without decisions and without postprocessing
    postprocs: list
    mutators: dict  # Mutator -> probability
    # The module the trace applies to: the workload's TE chain, or a fused template computing the same
    # outputs from the same arguments (kernels/attention_fused.py).
    mod: object = dataclasses.field(default=None, repr=False)
    # The template's name, the variant of a generated space ("stages=3"), or both ("splitk_tc_s8 stages=3").
    template: str | None = None

    @functools.cached_property
    def is_point(self) -> bool:
        """No sampling decision: the space is one schedule (thread-level templates)."""
        return not any(inst.kind.name.startswith("Sample") for inst in self.trace.insts)

    @functools.cached_property
    def groups(self) -> DecisionGroups:
        return decision_groups(self.trace)


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


@dataclasses.dataclass
class _Outcome:
    """What one replay of a trace gave: a valid candidate, or why not."""

    schedule: Schedule
    candidate: Candidate | None = None
    failed_postproc: object = None  # the postprocessor that said no
    problem: str | None = None  # launch_problem of the lowered kernels
    decisions: dict | None = None  # sampling position -> decision drawn
    kernel_groups: list | None = None  # per top-level statement (kernel), its decision groups


@dataclasses.dataclass
class _Repair:
    """A design space's draw in progress during one ``sample`` call."""

    kept: dict = dataclasses.field(default_factory=dict)  # sampling position -> decision kept
    verdicts: dict = dataclasses.field(default_factory=dict)  # (check, kernel, its decisions) -> passed
    rounds: int = 0  # replays since the last fresh draw


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _split_factors_no_other_mutator_covers(trace: Trace) -> list:
    """Sampled split factors that no TVM mutator changes: all but ``split(l, [None, v])`` whose inner
    loop is bound to threadIdx.x (MutateThreadBinding's pattern). Only etune's own rules (``splitk``)
    make such factors; TVM's rules sample split factors with SamplePerfectTile."""
    bound_x = {inst.inputs[0].__chandle__() for inst in trace.insts
               if inst.kind.name == "Bind" and str(inst.attrs[0]) == "threadIdx.x"}
    factors = []
    for inst in trace.insts:
        if inst.kind.name != "Split":
            continue
        given = list(inst.inputs[1:])
        thread_binding = (len(given) == 2 and given[0] is None and inst.outputs[1].__chandle__() in bound_x)
        if not thread_binding:
            factors.extend(f for f in given if isinstance(f, tvm.tirx.Var))
    return factors


def mutate_tile_size(trace: Trace, rng: random.Random) -> Trace | None:
    """TVM's MutateTileSize, visiting the trace in program order.

    TVM's own collects its sites by iterating the trace's decision map, which is ordered by object
    address, so one seed gave different mutants in two processes (or two spaces of one process).
    Same moves otherwise: move a factor from one tile of a split to another (the innermost within
    its ``max_innermost_factor``), or redraw a cooperative-fetch vector length. It also redraws the
    categorical split factors of etune's own rules, which no TVM mutator reaches.
    """
    fetched = [inst.inputs[1] for inst in trace.insts
               if inst.kind.name == "Annotate" and str(inst.attrs[0]) == "meta_schedule.cooperative_fetch"]
    factors = _split_factors_no_other_mutator_covers(trace)
    tiles_sites, vector_sites = [], []
    for inst in trace.insts:
        decision = trace.get_decision(inst)
        if decision is None:
            continue
        if inst.kind.name == "SamplePerfectTile":
            tiles = [int(t) for t in decision]
            if len(tiles) >= 2 and math.prod(tiles) >= 2:
                tiles_sites.append((inst, tiles))
        elif (inst.kind.name == "SampleCategorical" and len(inst.attrs[1]) > 1
              and any(inst.outputs[0].same_as(var) for var in fetched + factors)):
            vector_sites.append((inst, int(decision)))
    sites = len(tiles_sites) + len(vector_sites)
    if sites == 0:
        return None
    pick = rng.randrange(sites)
    if pick >= len(tiles_sites):
        inst, original = vector_sites[pick - len(tiles_sites)]
        probs = [float(p) for i, p in enumerate(inst.attrs[1]) if i != original]
        chosen = rng.choices(range(len(probs)), weights=probs)[0]
        return trace.with_decision(inst, chosen + (chosen >= original), True)
    inst, tiles = tiles_sites[pick]
    n = len(tiles)
    for _ in range(64):
        x = rng.randrange(n)
        if tiles[x] <= 1:
            continue
        y = rng.randrange(n - 1)
        y += y >= x
        factors = _divisors(tiles[x])
        if y != n - 1:
            divide = factors[rng.randrange(1, len(factors))]
        else:
            limit = int(inst.attrs[1])
            fitting = [i for i in range(1, len(factors)) if factors[i] * tiles[y] <= limit]
            if not fitting:
                if n <= 2:
                    return None
                continue
            divide = factors[rng.randrange(1, fitting[-1] + 1)]
        tiles[x] //= divide
        tiles[y] *= divide
        return trace.with_decision(inst, tiles, True)
    return None


def _in_stable_order(mutator_probs) -> dict:
    """TVM's Map iterates in object-address order, which differs between processes (and between two
    spaces of one process); by type name, the weighted pick of a mutator repeats with the seed."""
    return dict(sorted(((m, float(p)) for m, p in mutator_probs.items()), key=lambda mp: type(mp[0]).__name__))


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
            if not rule_set_applies(rule_set, self.workload):
                continue
            if rule_set in _TEMPLATES:  # one module per template that applies
                modules = [(name, tvm.IRModule({"main": func}))
                           for name, func in _TEMPLATES[rule_set](self.workload, self.gpu).items()]
            else:
                modules = [(None, self.mod)]
            for template, mod in modules:
                try:
                    generator, context, spaces = self._generate(rule_set, seed, mod)
                except SamplingError as exc:
                    # another rule set may still give spaces; with none at all, the error below says why
                    self.notes.append(f"{rule_set}{f' {template}' if template else ''}: no design space ({exc})")
                    continue
                for space in spaces:
                    generated = Trace(space.trace.simplified(remove_postproc=True).insts, {})
                    for variant, trace in pipeline_variants(rule_set, generated):
                        key = f"{template}:{trace}"  # fused templates may share a trace
                        if key in seen:  # softmax has no tensor-core site: both rule sets give the same space
                            continue
                        seen.add(key)
                        self.design_spaces.append(
                            DesignSpace(len(self.design_spaces), rule_set, trace, list(context.space_generator.postprocs),
                                        _in_stable_order(context.space_generator.mutator_probs), mod,
                                        " ".join(label for label in (template, variant) if label) or None)
                        )
        self.last_sample: dict = {}
        self._point_hashes: dict[int, str] = {}  # one-point design space -> its schedule's hash
        if not self.design_spaces:
            reasons = "; ".join(self.notes)
            raise SamplingError(f"{self.workload.spec}: MetaSchedule generated no design space"
                                + (f" ({reasons})" if reasons else ""))

    def _generate(self, rule_set: str, seed: int, mod=None):
        """Design spaces of one rule set; without CrossThreadReduction where TVM 0.27 trips on it."""
        kind = _DEFAULT_KIND[rule_set]
        mod = self.mod if mod is None else mod
        error = None
        for cross_thread_reduction in (True, False):
            interrupts.check()  # the errors caught below may be a Ctrl-C that TVM wrapped
            generator = ms.space_generator.PostOrderApply(
                sch_rules=schedule_rules(rule_set, cross_thread_reduction), postprocs=postprocs(rule_set, kind),
                mutator_probs=kind,
            )
            # VerifyGPUCode checks the target's shared-memory limit: the opt-in one for spaces that
            # allocate shared.dyn, 48 KiB for the others (launch_problem checks both kinds after lowering).
            target = self.gpu.tvm_target(dynamic_shared=rule_set in DYNAMIC_SHARED_RULE_SETS)
            context = ms.TuneContext(
                mod=mod, target=target, space_generator=generator, task_name=self.workload.spec,
                rand_state=seed, num_threads=1,
            )
            try:
                spaces = generator.generate_design_space(mod)
            except TVM_ERRORS as exc:
                error = str(exc).strip().splitlines()[-1]
                continue
            if not cross_thread_reduction:
                self.notes.append(f"{rule_set}: CrossThreadReduction dropped (TVM: {error})")
            return generator, context, spaces
        raise SamplingError(f"{self.workload.spec}: no {rule_set} design space: {error}")

    # -- replay -------------------------------------------------------------------------------
    def _evaluate(self, space: DesignSpace, trace: Trace, seed: int, groups: DecisionGroups | None = None) -> _Outcome:
        """Apply a trace (decisions missing are sampled with ``seed``), then postprocess and verify.

        With ``groups``, the outcome also records the decisions drawn and which decision groups each
        kernel holds, so that a failure can be traced to kernels (see ``_failing_groups``).
        """
        interrupts.check()  # the errors this catches may be a Ctrl-C that TVM wrapped
        sch = Schedule(space.mod, seed=seed, debug_mask=0)
        outcome = _Outcome(sch)
        try:
            trace.apply_to_schedule(sch, remove_postproc=True)
        except TVM_ERRORS:
            return outcome
        if groups is not None:
            try:
                applied = sch.trace
                insts = list(applied.insts)
                outcome.decisions = {p: applied.get_decision(insts[p]) for p in groups.samples}
                outcome.kernel_groups = _kernel_groups(sch, groups)
            except (*TVM_ERRORS, KeyError):
                outcome.decisions = outcome.kernel_groups = None
        try:
            sch.enter_postproc()
            for postproc in space.postprocs:
                if not postproc.apply(sch):
                    outcome.failed_postproc = postproc
                    return outcome
            candidate = Candidate(self.workload, space.index, sch)
            candidate.launches = kernel_launches(sch.mod, self.target)
        except TVM_ERRORS:
            return outcome
        outcome.problem = launch_problem(candidate.launches, self.gpu)
        if outcome.problem is None:
            outcome.candidate = candidate
        return outcome

    def _replay(self, space: DesignSpace, trace: Trace, seed: int) -> Candidate | None:
        return self._evaluate(space, trace, seed).candidate

    def _failing_groups(self, space: DesignSpace, outcome: _Outcome, verdicts: dict) -> set[int] | None:
        """The decision groups of the kernels that failed, or None where the failure cannot be traced.

        Each kernel is checked alone (the module with only its top-level statement) with the check
        that failed: VerifyGPUCode as configured for the space, or ``launch_problem`` of its lowered
        kernels. ``verdicts`` remembers kernels already checked with the same decisions.
        """
        groups = space.groups
        if outcome.decisions is None or outcome.kernel_groups is None:
            return None
        sch = outcome.schedule
        postproc = outcome.failed_postproc
        if postproc is not None and type(postproc).__name__ == "VerifyGPUCode":
            name = "verify"

            def passes(mod) -> bool:
                return bool(postproc.apply(Schedule(mod, debug_mask=0, enable_check=False)))
        elif postproc is None and outcome.problem is not None:
            name = "launch"

            def passes(mod) -> bool:
                return launch_problem(kernel_launches(mod, self.target), self.gpu) is None
        else:
            return None
        try:
            statements = _kernel_statements(sch.mod)
        except (*TVM_ERRORS, KeyError):
            return None
        if len(statements) != len(outcome.kernel_groups):
            return None
        in_kernels = set().union(*outcome.kernel_groups)
        shared = {g for g in groups.group_of.values() if g not in in_kernels}  # the unroll decision, say
        keys = []
        for kernel in outcome.kernel_groups:
            relevant = kernel | shared
            keys.append((name, len(keys), tuple((p, _decision_key(d)) for p, d in sorted(outcome.decisions.items())
                                                if groups.group_of[p] in relevant)))
        unknown = [index for index, key in enumerate(keys) if key not in verdicts]
        if len(unknown) == 1 and all(verdicts[key] for key in keys if key in verdicts):
            # The module failed and every other kernel is known to pass (or it is the only kernel):
            # blame this one without checking it alone.
            verdicts[keys[unknown[0]]] = False
        redraw: set[int] = set()
        for index, kernel in enumerate(outcome.kernel_groups):
            passed = verdicts.get(keys[index])
            if passed is None:
                try:
                    passed = passes(_kernel_module(sch.mod, index))
                except TVM_ERRORS:
                    passed = False
                verdicts[keys[index]] = passed
            if not passed:
                if not kernel:  # a failing kernel with no decision of its own: nothing to redraw
                    return None
                redraw |= kernel
        if not redraw or redraw >= in_kernels:
            # Every kernel failed (always so with one kernel): a fresh draw, as whole-draw rejection.
            return None
        return redraw

    def _repair_step(self, space: DesignSpace, rng: random.Random, repair: _Repair) -> Candidate | None:
        """One replay of ``space``'s draw in progress: the valid candidate it gave, or None.

        The replay keeps the decisions ``repair`` holds (none: a fresh draw) and draws the others. If
        it fails in some kernels, the decisions of those kernels' groups are dropped for the next
        replay and all others kept; a failure that cannot be traced to kernels starts a fresh draw.
        """
        groups = space.groups
        kept = repair.kept
        if kept:
            insts = list(space.trace.insts)
            trace = Trace(insts, {insts[p]: d for p, d in kept.items()})
        else:
            trace = space.trace
        outcome = self._evaluate(space, trace, rng.randrange(1, 2**30), groups)
        repair.rounds += 1
        if outcome.candidate is not None:
            repair.kept, repair.rounds = {}, 0
            return outcome.candidate
        redraw = self._failing_groups(space, outcome, repair.verdicts)
        if redraw is None or repair.rounds >= MAX_ROUNDS_PER_DRAW:
            repair.kept, repair.rounds = {}, 0
        else:
            repair.kept = {p: d for p, d in outcome.decisions.items() if groups.group_of[p] not in redraw}
        return None

    def fixed_points(self) -> list[Candidate]:
        """The valid candidates of the design spaces with no decision to draw: thread-level templates
        (``flash_mma``, ``gemm_mma``), where the template is the whole schedule."""
        points = []
        for space in self.design_spaces:
            if space.is_point:
                candidate = self._replay(space, space.trace, seed=1)
                if candidate is not None:
                    self._point_hashes[space.index] = candidate.structural_hash
                    points.append(candidate)
        return points

    def from_trace_json(self, trace_json: str, design_space: int) -> Candidate:
        """A candidate back from its stored trace (no sampling, no postprocessing: the trace has both)."""
        sch = Schedule(self.design_spaces[design_space].mod, debug_mask=0)
        Trace.apply_json_to_schedule(json.loads(trace_json), sch)
        return Candidate(self.workload, design_space, sch, kernel_launches(sch.mod, self.target))

    # -- operators ----------------------------------------------------------------------------
    def sample(self, n: int, seed: int = 0, max_attempts: int | None = None,
               exclude: set[str] | None = None) -> list[Candidate]:
        """n distinct valid candidates (by structural hash), drawn round-robin over the design spaces.

        Most random draws fail VerifyGPUCode (too many threads or too much shared memory for the
        drawn tiles) in some kernel. Each design space keeps a draw in progress, and every attempt
        (one replay, taking the spaces in turn) repairs it: the decisions of the kernels that failed
        are drawn again, the others kept (see ``_repair_step``). ``max_attempts`` bounds the
        replays, default 200 per candidate asked; ``last_sample`` tells how it went.
        """
        rng = random.Random(seed)
        seen = set(exclude or ())
        found: list[Candidate] = []
        attempts = max_attempts if max_attempts is not None else 200 * max(n, 1)
        repairs = [_Repair() for _ in self.design_spaces]  # each space's draw in progress
        used = duplicates = 0
        # A one-point space (a thread-level template) is visited once per call, and not at all once
        # its point is known to be excluded: another visit could only give the same schedule.
        turns = collections.deque(s for s in self.design_spaces
                                  if not (s.is_point and self._point_hashes.get(s.index) in seen))
        for _ in range(attempts):
            if len(found) >= n or not turns:
                break
            space = turns[0]
            turns.rotate(-1)
            candidate = self._repair_step(space, rng, repairs[space.index])
            used += 1
            if space.is_point:
                turns.remove(space)
            if candidate is None:
                continue
            if space.is_point:
                self._point_hashes[space.index] = candidate.structural_hash
            if candidate.structural_hash in seen:
                duplicates += 1
            else:
                seen.add(candidate.structural_hash)
                found.append(candidate)
        self.last_sample = {"replays": used, "duplicates": duplicates, "found": len(found)}
        return found

    def mutate(self, candidate: Candidate, rng: random.Random) -> Candidate | None:
        """One MetaSchedule mutation (tile size, unroll, thread binding, compute location), or None."""
        space = self.design_spaces[candidate.design_space]
        trace = candidate.trace.simplified(remove_postproc=True)
        # Weighted order without replacement: a mutator with nothing to change (no tile to resize in
        # a softmax, say) returns None and the next one gets its turn.
        pending = list(space.mutators.items())
        while pending:
            index = rng.choices(range(len(pending)), weights=[p for _, p in pending])[0]
            mutator, _ = pending.pop(index)
            # Mutator.apply seeds itself from the device's entropy; seeding it from rng (and
            # visiting tile sites in program order) makes a run with a given seed repeat exactly.
            if type(mutator).__name__ == "MutateTileSize":
                mutated = mutate_tile_size(trace, rng)
            else:
                mutated = _ms_ffi.MutatorApply(mutator, trace, rng.randrange(1, 2**30))
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
