"""The tensor-core split-K family for skinny fp16 GEMM (kernels/gemm_splitk.py, rule set ``splitk_tc``).

On CPU: the templates compute the GEMM (built for TVM's llvm target, unscheduled), the rule set is
offered for 2 <= M <= 31 only, every split gets a wmma design space, and a sample lowers to a
tensor-core partial kernel writing S x M x N fp32 partials plus a merge kernel; candidates build for
sm_90 with nvcc (slow).
"""
import random
import re

import numpy as np
import pytest
import tvm

from etune.kernels import parse_spec
from etune.measurements.sim import SimBackend, vendor_outcome
from etune.kernels.gemm_splitk import split_k_gemm, split_k_prim_funcs, splits_for
from etune.search_space import Builder, ScheduleSpace, launch_problem
from etune.search_space.rules import PIPELINE_STAGES, rule_set_applies

SPEC = "gemm:16,96,256"


def run_on_cpu(spec, func):
    workload = parse_spec(spec)
    p = workload.params
    executable = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    inputs = workload.random_inputs(1)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(x, dev) for x in inputs] + [tvm.runtime.tensor(np.zeros((p["M"], p["N"]), "float16"), dev)]
    executable["main"](*args)
    return workload.check([args[-1].numpy()], workload.reference(inputs))


@pytest.mark.parametrize("spec, splits", [(SPEC, 1), (SPEC, 4), (SPEC, 16), ("gemm:8,40,96", 3), ("gemm:5,24,64", 4)])
def test_template_matches_the_reference_on_cpu(spec, splits):
    p = parse_spec(spec).params
    ok, error = run_on_cpu(spec, split_k_gemm(p["M"], p["N"], p["K"], splits))
    assert ok, error


def test_a_split_that_does_not_divide_k_is_refused():
    with pytest.raises(ValueError):
        split_k_gemm(16, 96, 250, 4)


def test_offered_for_skinny_fp16_gemm_only():
    applies = {spec: rule_set_applies("splitk_tc", parse_spec(spec)) for spec in [
        "gemm:16,11008,4096", "gemm:8,11008,4096", "gemm:2,96,256", "gemm:31,96,256",  # yes
        "gemm:1,11008,4096", "gemm:32,11008,4096",  # GEMV: SIMT split-K; from 32 rows: mma
        "gemm:16,96,1000", "gemm:16,96,16",  # no split of K into chunks of two or more wmma k-steps
        "gemm:16,96,256,accumulate=float16", "softmax:64,256"]}
    assert [s for s, yes in applies.items() if yes] == [
        "gemm:16,11008,4096", "gemm:8,11008,4096", "gemm:2,96,256", "gemm:31,96,256"]
    assert splits_for(256) == [1, 2, 4, 8]  # 16 would leave one wmma k-step per chunk
    assert split_k_prim_funcs(parse_spec("gemm:64,96,256")) == {}


@pytest.fixture(scope="module")
def space():
    return ScheduleSpace(SPEC, rule_sets=["splitk_tc"])


def test_every_split_has_a_tensor_core_design_space(space):
    assert not space.notes
    # Per split, each generated wmma space at every cp.async pipeline depth.
    labels = {d.template for d in space.design_spaces}
    assert labels == {f"splitk_tc_s{s} stages={n}" for s in (1, 2, 4, 8) for n in PIPELINE_STAGES}
    for d in space.design_spaces:
        trace = str(d.trace)
        assert "wmma_sync_16x16x16_f16f16f32" in trace and "software_pipeline_async_stages" in trace
        assert "manifest_shared_memory_local_stage" not in trace


def test_samples_are_a_tensor_core_partial_kernel_and_a_merge(space):
    M, N = 16, 96
    candidates = space.sample(12, seed=0)
    assert len(candidates) == 12
    splits_seen = set()
    streamed = 0
    for c in candidates:
        assert launch_problem(c.launches, space.gpu) is None
        splits = int(re.match(r"splitk_tc_s(\d+) ", space.design_spaces[c.design_space].template).group(1))
        splits_seen.add(splits)
        partial = c.launches[0]
        assert partial.uses_tensor_cores
        # The tiles stream with cp.async, except where the sampled k tile is the whole chunk (one trip).
        streamed += partial.async_copy_bytes_in_flight > 0
        if splits == 1:  # the plain GEMM: one kernel, the fp16 cast in its store, no partials
            assert len(c.launches) == 1 and partial.traffic.global_store_bytes == M * N * 2
            continue
        partial_buffers = [b for b in c.mod["main"].body.block.alloc_buffers if b.name == "P"]
        assert [(tuple(int(x) for x in b.shape), b.dtype) for b in partial_buffers] == [((splits, M, N), "float32")]
        partial, merge = c.launches
        assert not merge.uses_tensor_cores
        assert partial.traffic.global_store_bytes == splits * M * N * 4  # fp32 partials, written once
        # One merge thread per output element (the guard of the last block's spare threads counts as taken):
        # it reads the element's S fp32 partials and writes one fp16.
        threads = merge.blocks * merge.threads_per_block
        assert M * N <= threads < M * N + merge.threads_per_block
        assert merge.traffic.global_load_bytes == splits * 4 * threads
        assert merge.traffic.global_store_bytes == 2 * threads
    assert 1 in splits_seen and len(splits_seen) >= 3
    assert streamed >= len(candidates) - 2  # 11 of 12 here


def test_mutation_and_crossover_keep_the_pipeline(space):
    rng = random.Random(0)
    parents = space.sample(6, seed=2)
    mutants = [m for m in (space.mutate(p, rng) for p in parents for _ in range(2)) if m is not None]
    assert len({m.structural_hash for m in mutants} - {p.structural_hash for p in parents}) >= 6
    by_space = {}
    for p in parents + mutants:
        by_space.setdefault(p.design_space, []).append(p)
    a, b = next(ps for ps in by_space.values() if len(ps) >= 2)[:2]
    children = [c for c in (space.crossover(a, b, rng) for _ in range(6)) if c is not None]
    assert children
    for child in mutants + children:
        assert "software_pipeline_async_stages" in str(child.trace)
        assert child.launches[0].uses_tensor_cores


@pytest.mark.slow
def test_samples_build_to_cuda(build_dir):
    space = ScheduleSpace("gemm:8,11008,4096", rule_sets=["splitk_tc"])
    candidates = space.sample(4, seed=3)
    results = Builder(space.gpu, workdir=build_dir, jobs=1).build(candidates)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert all(k.registers > 0 and k.spill_store_bytes == 0 for r in results for k in r.kernels)


def test_sim_streams_the_weights_below_the_vendor_energy():
    """On sim (model output): the best of 16 samples of gemm:16,11008,4096 uses less energy than sim's
    cuBLAS stand-in, which the unsplit wmma space does not reach (best of 32: 61 us, 1.16x), and its
    partial kernel is DRAM-bound, not waiting on loads (as it is without the cp.async pipeline)."""
    space = ScheduleSpace("gemm:16,11008,4096", rule_sets=["splitk_tc"])
    sim = SimBackend(space.gpu, noise=0.0)
    outcomes = [sim.outcome(c) for c in space.sample(16, seed=0)]
    vendor = vendor_outcome(space.workload, sim.gpu)
    best = min(outcomes, key=lambda o: o.energy_j)
    assert best.energy_j <= vendor.energy_j
    assert best.latency_s < vendor.latency_s
    assert best.kernels[0].limiter == "dram"
