"""Sampling valid schedules of a multi-kernel module (attention) is bounded, valid and reproducible.

Attention lowers to several kernels that must all be valid at once; ScheduleSpace.sample repairs a
failed draw kernel by kernel (search_space/space.py). These tests keep that honest on a small shape.
"""
import random

import pytest
from tvm.s_tir import Schedule

from etune.search_space import ScheduleSpace, launch_problem
from etune.search_space.space import _decision_key, _kernel_module, _Repair, decision_groups

SPEC = "attention:1,2,64,64,64,causal"
MAX_ATTEMPTS = 600  # replays for 4 candidates; the repair needs far fewer (whole-draw rejection: more)


@pytest.fixture(scope="module")
def space():
    # The unfused chain's spaces: the fused prefill templates are one kernel each (tests/test_attention_fused.py).
    return ScheduleSpace(SPEC, rule_sets=["tensorcore", "simt"])


@pytest.fixture(scope="module")
def sampled(space):
    return space.sample(4, seed=3, max_attempts=MAX_ATTEMPTS), dict(space.last_sample)


def test_attention_samples_are_valid_distinct_and_bounded(space, sampled):
    candidates, stats = sampled
    assert len(candidates) == 4, stats
    assert stats["replays"] <= MAX_ATTEMPTS
    assert len({c.structural_hash for c in candidates}) == 4
    for c in candidates:
        assert len(c.launches) >= 4, [k.name for k in c.launches]  # scores, row max, row sum, P @ V at least
        assert launch_problem(c.launches, space.gpu) is None
        for kernel in c.launches:
            assert launch_problem([kernel], space.gpu) is None, kernel


def test_attention_sampling_is_reproducible(space, sampled):
    candidates, _ = sampled
    again = space.sample(4, seed=3, max_attempts=MAX_ATTEMPTS)
    assert [c.structural_hash for c in again] == [c.structural_hash for c in candidates]
    others = space.sample(2, seed=4, max_attempts=MAX_ATTEMPTS, exclude={c.structural_hash for c in candidates})
    assert others and not {c.structural_hash for c in others} & {c.structural_hash for c in candidates}


def test_attention_candidate_round_trips_through_its_trace(space, sampled):
    c = sampled[0][0]
    back = space.from_trace_json(c.trace_json(), c.design_space)
    assert back.structural_hash == c.structural_hash


def test_decisions_are_grouped_by_block(space):
    for design_space in space.design_spaces:
        groups = decision_groups(design_space.trace)
        assert groups.samples and set(groups.group_of) == set(groups.samples)
        # The two products (scores and P @ V) are tiled independently: their tile sizes are in
        # different groups, so one can be redrawn while the other is kept.
        tiles = {groups.group_of[p] for p in groups.samples
                 if design_space.trace.insts[p].kind.name == "SamplePerfectTile"}
        assert len(tiles) >= 2, design_space.index


def test_a_failed_draw_is_traced_to_the_kernels_that_fail(space):
    """Only the decisions of kernels that fail VerifyGPUCode on their own are drawn again."""
    rng = random.Random(0)
    design_space = next(d for d in space.design_spaces if d.rule_set == "simt")
    for _ in range(30):
        outcome = space._evaluate(design_space, design_space.trace, rng.randrange(1, 2**30), design_space.groups)
        if type(outcome.failed_postproc).__name__ != "VerifyGPUCode":
            continue
        redraw = space._failing_groups(design_space, outcome, {})
        if redraw:
            break
    else:
        pytest.fail("no draw failing in some kernels but not all")
    assert len(outcome.kernel_groups) >= 4
    for index, groups in enumerate(outcome.kernel_groups):
        alone = outcome.failed_postproc.apply(Schedule(_kernel_module(outcome.schedule.mod, index), debug_mask=0))
        assert bool(alone) == (not groups & redraw), index


def test_repair_keeps_the_decisions_of_passing_kernels(space):
    rng = random.Random(1)
    design_space = next(d for d in space.design_spaces if d.rule_set == "simt")
    repair = _Repair()
    for _ in range(300):
        kept = dict(repair.kept)
        candidate = space._repair_step(design_space, rng, repair)
        if candidate is not None:
            break
    else:
        pytest.fail("no valid candidate in 300 replays")
    assert kept, "the candidate should come from a repaired draw"
    trace = candidate.trace
    insts = list(trace.insts)
    for position, decision in kept.items():
        assert _decision_key(trace.get_decision(insts[position])) == _decision_key(decision)
    assert launch_problem(candidate.launches, space.gpu) is None
