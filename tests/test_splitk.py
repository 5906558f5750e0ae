"""The split-K design spaces of GEMV and skinny GEMM (search_space/splitk.py)."""
import random

import pytest

from etune.measurements.sim import SimBackend, vendor_outcome
from etune.search_space import Builder, ScheduleSpace, launch_problem
from etune.search_space.space import mutate_tile_size
from etune.search_space.splitk import K_LANES


@pytest.fixture(scope="module")
def gemv_space():
    return ScheduleSpace("gemm:1,4096,4096", rule_sets=["splitk"])


def test_offered_only_for_skinny_gemm():
    # (gemm_mma: its skinny one-kernel templates, from M = 2)
    assert {d.rule_set for d in ScheduleSpace("gemm:2,512,512").design_spaces} == {"tensorcore", "simt", "splitk",
                                                                                  "splitk_tc", "gemm_mma"}
    assert "splitk" not in {d.rule_set for d in ScheduleSpace("gemm:8,256,256").design_spaces}
    assert "splitk" not in {d.rule_set for d in ScheduleSpace("softmax:64,256").design_spaces}


def test_samples_are_valid_and_split_k(gemv_space):
    # Two design spaces: K over lanes (one kernel), and over lanes and blocks (partials + merge kernel).
    assert len(gemv_space.design_spaces) == 2
    candidates = gemv_space.sample(12, seed=0)
    assert len(candidates) == 12
    assert gemv_space.last_sample["replays"] <= 24
    kernels = set()
    for c in candidates:
        assert launch_problem(c.launches, gemv_space.gpu) is None
        main = c.launches[0]
        assert main.block[0] in K_LANES  # threads over K
        if main.block[0] <= 32:  # within a warp, reduced with shuffles only
            assert main.shared_bytes == 0
        assert main.traffic.global_load_bytes >= 4096 * 4096 * 2  # the whole matrix, read once
        kernels.add(len(c.launches))
        if len(c.launches) == 2:
            assert main.grid[1] > 1  # K across blocks
    assert kernels == {1, 2}
    assert max(c.launches[0].max_vector_lanes for c in candidates) >= 4


@pytest.mark.parametrize("spec", ["gemm:3,1001,999", "gemm:4,200,4096", "gemm:1,4096,4096,accumulate=float16"])
def test_odd_shapes_and_fp16_accumulation(spec):
    space = ScheduleSpace(spec, rule_sets=["splitk"])
    candidates = space.sample(6, seed=1)
    assert len(candidates) == 6
    assert all(launch_problem(c.launches, space.gpu) is None for c in candidates)


def test_mutation_redraws_the_rule_choices(gemv_space):
    rng = random.Random(0)
    parents = gemv_space.sample(6, seed=2)
    mutants = [gemv_space.mutate(p, rng) for p in parents for _ in range(2)]
    changed = [m for p, m in zip([p for p in parents for _ in range(2)], mutants)
               if m is not None and m.structural_hash != p.structural_hash]
    assert len(changed) >= 8
    # MutateTileSize (etune's) redraws exactly one categorical split factor of the rule.
    trace = parents[0].trace.simplified(remove_postproc=True)
    mutated = mutate_tile_size(trace, rng)
    moved = [i for i in trace.insts if trace.get_decision(i) is not None
             and str(mutated.get_decision(i)) != str(trace.get_decision(i))]
    assert len(moved) == 1 and moved[0].kind.name == "SampleCategorical"
    by_space = {}
    for p in parents:
        by_space.setdefault(p.design_space, []).append(p)
    a, b = next(ps for ps in by_space.values() if len(ps) >= 2)[:2]
    children = [c for c in (gemv_space.crossover(a, b, rng) for _ in range(6)) if c is not None]
    assert children and all(c.design_space == a.design_space for c in children)


def test_sim_reaches_the_memory_bound_and_the_vendor_energy(gemv_space):
    """On sim (model output): the best of 16 split-K GEMVs is within 1.5x of reading the matrix at HBM
    bandwidth and uses no more energy than sim's cuBLAS stand-in; MetaSchedule's own GEMV spaces
    reach ~46 us / 10-14 mJ here (docs/sim_results.md)."""
    sim = SimBackend(gemv_space.gpu, noise=0.0)
    outcomes = [sim.outcome(c) for c in gemv_space.sample(16, seed=0)]
    vendor = vendor_outcome(gemv_space.workload, sim.gpu)
    bound = gemv_space.workload.min_bytes / gemv_space.gpu.memory_bandwidth
    assert min(o.latency_s for o in outcomes) <= 1.5 * bound
    assert min(o.energy_j for o in outcomes) <= vendor.energy_j


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["gemm:1,4096,4096", "gemm:3,1001,999"])
def test_split_k_schedules_build_to_cuda(spec, build_dir):
    space = ScheduleSpace(spec, rule_sets=["splitk"])
    candidates = space.sample(6, seed=3)
    results = Builder(space.gpu, workdir=build_dir, jobs=2).build(candidates)
    built = [r for r in results if r.ok]
    assert len(built) == len(results), [r.error for r in results if not r.ok]
    assert all(k.registers > 0 and k.spill_store_bytes == 0 for r in built for k in r.kernels)
