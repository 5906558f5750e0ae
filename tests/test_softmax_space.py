"""The ``rowsoftmax`` design spaces (kernels/softmax_fused.py, search_space/softmax_rules.py).

On CPU: both templates compute the workload's output (TVM's llvm target); sampled candidates are
valid, distinct and read the input once (row in registers) or twice (split rows); their decisions
are sampling instructions that mutate and cross over; every candidate of the odd shapes is computed
correctly by its own schedule with the thread bindings made serial loops (the same tiling, guards,
vectors and split remainders on the CPU); and candidates build for sm_90 with nvcc. sim figures
here are model outputs.
"""
import random

import numpy as np
import pytest
import tvm
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import Trace

from etune.kernels import parse_spec
from etune.kernels.softmax_fused import row_in_registers, softmax_prim_funcs, split_parts, split_row
from etune.search_space import Builder, ScheduleSpace, launch_problem
from etune.search_space.rules import rule_set_applies

ODD_SHAPES = ["softmax:7,50257", "softmax:3,1000", "softmax:32768,128", "softmax:8,131072"]


def run_on_cpu(workload, mod, seed=1) -> tuple[bool, float]:
    rows, cols = workload.params["rows"], workload.params["cols"]
    executable = tvm.compile(mod, target="llvm")
    inputs = workload.random_inputs(seed)
    out = tvm.runtime.tensor(np.zeros((rows, cols), "float16"))
    executable["main"](tvm.runtime.tensor(inputs[0]), out)
    return workload.check([out.numpy()], workload.reference(inputs))


def without_thread_bindings(space, candidate):
    """The candidate's trace replayed without its Bind instructions: the schedule's own loops, guards
    and vectors with every thread loop serial, which TVM's llvm target runs. (What it cannot check is
    GPU-only: that each thread reads back the registers it wrote, which the rule guarantees by
    binding every row-shaped block with the same split.)"""
    trace = candidate.trace.simplified(remove_postproc=True)
    insts = [inst for inst in trace.insts if inst.kind.name != "Bind"]
    decisions = {inst: trace.get_decision(inst) for inst in insts if trace.get_decision(inst) is not None}
    sch = Schedule(space.design_spaces[candidate.design_space].mod)
    Trace(insts, decisions).apply_to_schedule(sch, remove_postproc=True)
    return sch.mod


@pytest.mark.parametrize("rows, cols", [(3, 1000), (5, 128), (2, 50257), (4, 300), (1, 8)])
@pytest.mark.parametrize("template", [row_in_registers, split_row])
def test_templates_match_the_reference_on_cpu(template, rows, cols):
    workload = parse_spec(f"softmax:{rows},{cols}")
    ok, error = run_on_cpu(workload, tvm.IRModule({"main": template(rows, cols)}))
    assert ok, error


def test_offered_for_softmax_by_shape():
    assert rule_set_applies("rowsoftmax", parse_spec("softmax:4,64"))
    assert not rule_set_applies("rowsoftmax", parse_spec("gemm:64,64,64"))
    assert softmax_prim_funcs(parse_spec("gemm:64,64,64")) == {}
    assert set(softmax_prim_funcs(parse_spec("softmax:32768,128"))) == {"row_in_registers"}
    assert set(softmax_prim_funcs(parse_spec("softmax:3,1000"))) == {"row_in_registers", "split_row"}
    # Rows too long for one block's registers are always split.
    assert set(softmax_prim_funcs(parse_spec("softmax:8,131072"))) == {"split_row"}
    assert set(softmax_prim_funcs(parse_spec("softmax:4096,65536"))) == {"split_row"}
    parts, lines = split_parts(8, 131072)
    assert parts * 8 >= 132 and parts * lines * 256 >= 131072


@pytest.fixture(scope="module")
def space():
    # Lines of 256 tile the rows and any rows per block tile the 64 rows: no guard, exact traffic.
    return ScheduleSpace("softmax:64,2048", rule_sets=["rowsoftmax"])


@pytest.fixture(scope="module")
def sampled(space):
    return space.sample(12, seed=1)


def test_samples_are_valid_distinct_and_stream_the_input(space, sampled):
    assert len(sampled) == 12, space.last_sample
    assert len({c.structural_hash for c in sampled}) == 12
    templates = {space.design_spaces[c.design_space].template for c in sampled}
    assert templates == {"row_in_registers", "split_row"}
    in_bytes = 64 * 2048 * 2
    for c in sampled:
        assert launch_problem(c.launches, space.gpu) is None
        template = space.design_spaces[c.design_space].template
        loads = sum(k.traffic.global_load_bytes for k in c.launches)
        if template == "row_in_registers":
            assert len(c.launches) == 1 and loads == in_bytes  # one pass
        else:
            # The input twice, and each block of the second kernel reads the row's partials once.
            partials, merge = c.launches
            assert partials.traffic.global_load_bytes == in_bytes
            assert in_bytes < merge.traffic.global_load_bytes <= 1.05 * in_bytes
        assert c.launches[-1].traffic.global_store_bytes == in_bytes
    assert max(c.launches[0].max_vector_lanes for c in sampled) == 8  # 16-byte loads


def test_decisions_mutate_cross_over_and_round_trip(space, sampled):
    rng = random.Random(0)
    kinds = {i.kind.name for d in space.design_spaces for i in d.trace.insts}
    assert {"SamplePerfectTile", "SampleCategorical"} <= kinds
    mutants = [(p, space.mutate(p, rng)) for p in sampled for _ in range(2)]
    changed = [m for p, m in mutants if m is not None and m.structural_hash != p.structural_hash]
    assert len(changed) >= len(mutants) // 2
    for p, m in mutants:
        if m is not None:
            assert m.design_space == p.design_space and launch_problem(m.launches, space.gpu) is None
    by_space = {}
    for c in sampled:
        by_space.setdefault(c.design_space, []).append(c)
    a, b = next(cs for cs in by_space.values() if len(cs) >= 2)[:2]
    assert any(space.crossover(a, b, rng) is not None for _ in range(6))
    back = space.from_trace_json(sampled[0].trace_json(), sampled[0].design_space)
    assert back.structural_hash == sampled[0].structural_hash


@pytest.mark.parametrize("rows, cols", [(9, 1001), (5, 3), (3, 13), (2, 300)])
def test_rows_that_share_16_byte_groups_match_the_reference_on_cpu(rows, cols):
    """Rows start mid-group when 8 does not divide cols: the first and last group of each row go half
    by half, the others as vectors (head offsets 0 to 7 over the rows here)."""
    workload = parse_spec(f"softmax:{rows},{cols}")
    for template in (row_in_registers, split_row):
        ok, error = run_on_cpu(workload, tvm.IRModule({"main": template(rows, cols)}))
        assert ok, (template.__name__, error)


def test_odd_rows_still_get_16_byte_vectors():
    space = ScheduleSpace("softmax:7,50257", rule_sets=["rowsoftmax"])
    candidates = space.sample(6, seed=0)
    assert max(c.launches[0].max_vector_lanes for c in candidates) == 8
    assert all(c.launches[0].max_gather_lanes == 1 for c in candidates)  # aligned accesses, no gathers


@pytest.mark.parametrize("spec", ODD_SHAPES)
def test_odd_shapes_give_valid_candidates_that_compute_softmax(spec):
    space = ScheduleSpace(spec, rule_sets=["rowsoftmax"])
    candidates = space.sample(3, seed=2)
    assert len(candidates) == 3, space.last_sample
    for c in candidates:
        assert launch_problem(c.launches, space.gpu) is None
        ok, error = run_on_cpu(space.workload, without_thread_bindings(space, c))
        assert ok, (space.design_spaces[c.design_space].template, error)


def test_default_space_offers_rowsoftmax_beside_the_te_chain():
    space = ScheduleSpace("softmax:64,2048")
    rule_sets = {d.rule_set for d in space.design_spaces}
    assert "rowsoftmax" in rule_sets and {"tensorcore", "simt"} & rule_sets  # the TE chain (one space)
    assert {d.template for d in space.design_spaces if d.rule_set == "rowsoftmax"} == {"row_in_registers",
                                                                                       "split_row"}


def test_sim_row_in_registers_reaches_the_memory_bound():
    """On sim (model output): the best of 16 samples of softmax 32768x128 is within 1.6x of moving
    its bytes at HBM bandwidth (2 us of it is sim's launch gap) and below sim's torch.softmax stand-in."""
    from etune.measurements.sim import SimBackend, vendor_outcome

    space = ScheduleSpace("softmax:32768,128", rule_sets=["rowsoftmax"])
    sim = SimBackend(space.gpu, noise=0.0)
    outcomes = [sim.outcome(c) for c in space.sample(16, seed=0)]
    bound = space.workload.min_bytes / space.gpu.memory_bandwidth
    assert min(o.latency_s for o in outcomes) <= 1.6 * bound
    assert min(o.energy_j for o in outcomes) <= vendor_outcome(space.workload, sim.gpu).energy_j


@pytest.mark.slow
def test_odd_shapes_build_for_sm_90(build_dir):
    candidates = []
    for spec in ODD_SHAPES:
        space = ScheduleSpace(spec, rule_sets=["rowsoftmax"])
        candidates += space.sample(1, seed=4)
    results = Builder(space.gpu, workdir=build_dir, jobs=2).build(candidates)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert all(k.registers > 0 and k.spill_store_bytes == 0 for r in results for k in r.kernels)


@pytest.mark.gpu
def test_built_candidates_match_reference_on_gpu(build_dir):
    from etune.measurements.tvm_runner import run_and_check

    for spec in ("softmax:7,50257", "softmax:3,1000", "softmax:8,131072"):
        local = ScheduleSpace(spec, "local", rule_sets=["rowsoftmax"])
        for i, build in enumerate(Builder(local.gpu, workdir=build_dir).build(local.sample(3, seed=5))):
            assert build.ok, build.error
            ok, error = run_and_check(local.workload, build.library, seed=i)
            assert ok, f"{spec}: relative error {error}"
