"""The fused attention family (kernels/attention_fused.py, search_space/attention_rules.py): split-KV
decode and FlashAttention-2 style prefill.

On CPU: the templates compute the workload's outputs (built for TVM's llvm target, guarded tails and
causal masks included), their design spaces sample valid candidates whose decisions mutate and cross
over, the lowered structure is a partial kernel plus a merge kernel with no global buffer of kv_len
per query (decode) or one kernel with no global intermediate at all (prefill), and candidates build
for sm_90 with nvcc. sim figures here are model outputs.
"""
import random
from pathlib import Path

import numpy as np
import pytest
import tvm

from etune.kernels import parse_spec
from etune.kernels.attention_fused import (DECODE_CHUNK, PREFILL_GRANULE, decode_slots, flash_prefill,
                                          fused_prim_funcs, split_kv_decode)
from etune.search_space import ScheduleSpace, gpu_spec, launch_problem

SPEC = "attention:2,3,1,600,64"  # 3 slots of 256 keys, the last one a guarded tail


@pytest.mark.parametrize("shape, chunk", [
    ((1, 2, 1, 300, 64, False), DECODE_CHUNK),
    ((2, 1, 3, 200, 32, True), 64),
    ((1, 1, 2, 40, 16, True), 32),
    ((1, 2, 4, 70, 24, False), 32),
])
def test_template_matches_the_reference_on_cpu(shape, chunk):
    b, h, q, kv, d, causal = shape
    workload = parse_spec(f"attention:{b},{h},{q},{kv},{d}" + (",causal" if causal else ""))
    executable = tvm.compile(tvm.IRModule({"main": split_kv_decode(*shape, chunk=chunk)}), target="llvm")
    inputs = workload.random_inputs(1)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(x, dev) for x in inputs] + [tvm.runtime.tensor(np.zeros((b, h, q, d), "float16"), dev)]
    executable["main"](*args)
    ok, error = workload.check([args[-1].numpy()], workload.reference(inputs))
    assert ok, error


def run_on_cpu(workload, func):
    """The template built for llvm (no schedule: its loops run serially) on the workload's inputs."""
    p = workload.params
    executable = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    inputs = workload.random_inputs(1)
    dev = tvm.cpu()
    out = np.zeros((p["batch"], p["heads"], p["q_len"], p["head_dim"]), "float16")
    args = [tvm.runtime.tensor(x, dev) for x in inputs] + [tvm.runtime.tensor(out, dev)]
    executable["main"](*args)
    return workload.check([args[-1].numpy()], workload.reference(inputs))


@pytest.mark.parametrize("tensor_cores", [False, True])
@pytest.mark.parametrize("shape, q_tile", [
    ((1, 2, 70, 90, 16, False), 32),  # both lengths past a tile: guarded query rows and keys
    ((1, 1, 50, 83, 24, True), 32),  # causal with kv_len > q_len: skipped granules and a diagonal
    ((1, 1, 64, 64, 64, True), 64),
    ((1, 2, 100, 100, 16, True), 32),  # causal, square: the key loop stops at the diagonal (1 to 4 granules)
])
def test_prefill_template_matches_the_reference_on_cpu(shape, q_tile, tensor_cores):
    b, h, q, kv, d, causal = shape
    workload = parse_spec(f"attention:{b},{h},{q},{kv},{d}" + (",causal" if causal else ""))
    ok, error = run_on_cpu(workload, flash_prefill(*shape, q_tile=q_tile, tensor_cores=tensor_cores))
    assert ok, error


@pytest.mark.parametrize("shape, q_tile, granule", [
    ((1, 1, 150, 300, 32, False), 128, 128),  # a guarded tail of rows and of keys
    ((1, 2, 100, 200, 16, True), 64, 64),  # causal, kv_len > q_len: the loop stops at the diagonal
])
def test_prefill_dynamic_shared_memory_template_matches_the_reference_on_cpu(shape, q_tile, granule):
    b, h, q, kv, d, causal = shape
    workload = parse_spec(f"attention:{b},{h},{q},{kv},{d}" + (",causal" if causal else ""))
    func = flash_prefill(*shape, q_tile=q_tile, granule=granule, tensor_cores=True, shared_scope="shared.dyn")
    ok, error = run_on_cpu(workload, func)
    assert ok, error


def big_shared_gpu():
    """The H100 preset: sm_90's dynamic shared memory limit (227 KiB per block)."""
    gpu = gpu_spec("h100")
    assert gpu.max_shared_memory_per_block == 227 * 1024
    return gpu


def static_shared_gpu():
    """The H100 preset capped at 48 KiB per block (static shared memory only, as without the opt-in)."""
    return gpu_spec("h100").with_shared_limit(48)


def test_offered_with_dynamic_shared_memory():
    # 48 KiB (no target given, or no opt-in): static shared memory, 32-key granules, only the tiles that fit.
    static = fused_prim_funcs(parse_spec("attention:1,2,300,256,128"))
    assert set(static) == {"flash_prefill_q32", "flash_prefill_q64", "flash_prefill_wmma_q32"}
    funcs = fused_prim_funcs(parse_spec("attention:1,2,300,256,128"), big_shared_gpu())
    assert set(funcs) == {"flash_prefill_q32", "flash_prefill_q64", "flash_prefill_wmma_q32", "flash_prefill_wmma_q64",
                          "flash_prefill_wmma_q128", "flash_prefill_wmma_q64_g64", "flash_prefill_wmma_q128_g64",
                          "flash_prefill_wmma_q64_g128", "flash_prefill_wmma_q128_g128"}

    def scopes(func):
        return {b.name: b.scope() for b in func.body.block.alloc_buffers}

    # Q, K, V (and the scores, inside the granule) dynamic; P and the row statistics static.
    assert scopes(funcs["flash_prefill_wmma_q128_g128"]).items() >= {"Qs": "shared.dyn", "Ks": "shared.dyn",
                                                                 "Vs": "shared.dyn", "Mx": "shared", "L": "shared"}.items()
    assert scopes(static["flash_prefill_wmma_q32"])["Qs"] == "shared"
    # Granules longer than the keys are not offered.
    assert not any("_g128" in name for name in fused_prim_funcs(parse_spec("attention:1,2,300,64,128"), big_shared_gpu()))


def test_offered_by_q_len():
    assert set(fused_prim_funcs(parse_spec("attention:1,2,8,64,64"))) == {"split_kv_decode"}
    # Prefill: per query tile whose tiles fit in shared memory, a SIMT and (head_dim a multiple of 16)
    # a wmma template; with tensor cores, 64 rows of head_dim 128 do not fit beside the P V tile.
    assert set(fused_prim_funcs(parse_spec("attention:1,2,200,64,64"))) == {
        "flash_prefill_q32", "flash_prefill_q64", "flash_prefill_wmma_q32", "flash_prefill_wmma_q64"}
    assert set(fused_prim_funcs(parse_spec("attention:1,2,100,128,128,causal"))) == {
        "flash_prefill_q32", "flash_prefill_q64", "flash_prefill_wmma_q32"}
    assert set(fused_prim_funcs(parse_spec("attention:1,2,200,64,40"))) == {
        "flash_prefill_q32", "flash_prefill_q64", "flash_prefill_q128"}
    assert set(fused_prim_funcs(parse_spec("attention:1,2,9,64,40"))) == {"flash_prefill_q32"}  # tiles up to q_len
    assert fused_prim_funcs(parse_spec("gemm:64,64,64")) == {}


@pytest.fixture(scope="module")
def space():
    return ScheduleSpace(SPEC, rule_sets=["fused"])


@pytest.fixture(scope="module")
def sampled(space):
    return space.sample(6, seed=1, max_attempts=300)


def test_samples_are_valid_split_plus_merge(space, sampled):
    assert len(sampled) == 6, space.last_sample
    workload = space.workload
    p = workload.params
    slots = decode_slots(p["kv_len"])
    rows = p["batch"] * p["heads"] * p["q_len"]
    for c in sampled:
        assert launch_problem(c.launches, space.gpu) is None
        assert len(c.launches) == 2, [k.name for k in c.launches]
        partial, merge = c.launches
        heads = p["batch"] * p["heads"]  # a partial block works on all the query rows of its slots
        assert partial.blocks % heads == 0 and partial.blocks <= heads * slots
        assert merge.blocks == rows
        # No global buffer of kv_len per query: the only global intermediates are the slot partials.
        for buffer in c.mod["main"].body.block.alloc_buffers:
            if buffer.scope() == "global":
                assert int(np.prod([int(x) for x in buffer.shape])) <= rows * slots * p["head_dim"], buffer
        # Each of K and V is read once (keys past the tail read the last key again, clamped).
        kv_bytes = 2 * rows * slots * DECODE_CHUNK * p["head_dim"] * 2
        assert partial.traffic.global_load_bytes < 1.1 * kv_bytes
        # The partials are stored once: the one-writer guards (threadIdx.y == 0) are counted as such.
        assert partial.traffic.global_store_bytes <= rows * slots * (p["head_dim"] + 2) * 4


def test_small_q_len_reads_k_and_v_once_per_slot():
    """q_len 4: one partial block works on the 4 query rows of its slots, so K and V are read once
    per (batch, head) slot, not once per query row, and the 4 rows' results are still right (the
    template on llvm; the scheduled kernels need a GPU)."""
    spec = "attention:2,3,4,600,64"
    space = ScheduleSpace(spec, rule_sets=["fused"])
    candidates = space.sample(3, seed=0, max_attempts=100)
    assert len(candidates) == 3, space.last_sample
    p = space.workload.params
    slots = decode_slots(p["kv_len"])
    heads = p["batch"] * p["heads"]
    kv_once = 2 * heads * slots * DECODE_CHUNK * p["head_dim"] * 2  # the tail slot padded (clamped reads)
    q_bytes = heads * p["q_len"] * p["head_dim"] * 2
    for c in candidates:
        partial, merge = c.launches
        assert partial.blocks % heads == 0 and partial.blocks <= heads * slots
        assert merge.blocks == heads * p["q_len"]
        # The guarded lanes of the head_dim split may add a little; once per query row would be 4x.
        assert partial.traffic.global_load_bytes < 1.2 * kv_once + slots * q_bytes
        assert partial.traffic.global_store_bytes <= heads * p["q_len"] * slots * (p["head_dim"] + 2) * 4


def test_decisions_mutate_cross_over_and_round_trip(space, sampled):
    rng = random.Random(0)
    kinds = {i.kind.name for i in space.design_spaces[0].trace.insts}
    assert {"SamplePerfectTile", "SampleCategorical"} <= kinds
    mutants = [m for m in (space.mutate(sampled[i % 6], rng) for i in range(12)) if m is not None]
    assert mutants and all(len(m.launches) == 2 for m in mutants)
    assert {m.structural_hash for m in mutants} - {c.structural_hash for c in sampled}
    children = [space.crossover(sampled[0], sampled[i], rng) for i in range(1, 6)]
    assert any(child is not None for child in children)
    back = space.from_trace_json(sampled[0].trace_json(), sampled[0].design_space)
    assert back.structural_hash == sampled[0].structural_hash


def test_default_space_offers_fused_beside_the_unfused_chain():
    space = ScheduleSpace("attention:1,2,1,256,64")
    rule_sets = [d.rule_set for d in space.design_spaces]
    assert "fused" in rule_sets and {"simt", "tensorcore"} & set(rule_sets)
    fused = next(d for d in space.design_spaces if d.rule_set == "fused")
    assert fused.template == "split_kv_decode" and fused.mod is not space.mod


@pytest.mark.slow
def test_builds_for_sm_90(space, sampled, tmp_path):
    from etune.search_space import Builder

    results = Builder(space.gpu, workdir=tmp_path, jobs=2).build(sampled[:4])
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    for r in results:
        assert len(r.kernels) == 2 and all(k.registers > 0 for k in r.kernels)


@pytest.mark.gpu
def test_built_candidates_match_reference_on_gpu(space, sampled, tmp_path):
    from etune.measurements.tvm_runner import run_and_check
    from etune.search_space import Builder

    local = ScheduleSpace(SPEC, "local", rule_sets=["fused"])
    for i, build in enumerate(Builder(local.gpu, workdir=tmp_path).build(local.sample(3, seed=5))):
        assert build.ok, build.error
        ok, error = run_and_check(local.workload, build.library, seed=i)
        assert ok, f"relative error {error}"


PREFILL_SPEC = "attention:1,2,100,150,64,causal"  # 5 granules, the last a guarded tail


@pytest.fixture(scope="module")
def prefill_space():
    return ScheduleSpace(PREFILL_SPEC, static_shared_gpu(), rule_sets=["fused"])


@pytest.fixture(scope="module")
def prefill_sampled(prefill_space):
    return prefill_space.sample(8, seed=1, max_attempts=400)


def test_prefill_samples_are_one_kernel_without_global_intermediates(prefill_space, prefill_sampled):
    assert len(prefill_sampled) == 8, prefill_space.last_sample
    assert {d.template for d in prefill_space.design_spaces} == {
        "flash_prefill_q32", "flash_prefill_q64", "flash_prefill_wmma_q32", "flash_prefill_wmma_q64"}
    p = prefill_space.workload.params
    templates = set()
    for c in prefill_sampled:
        template = prefill_space.design_spaces[c.design_space].template
        templates.add(template)
        q_tile = int(template.rsplit("_q", 1)[1])
        assert launch_problem(c.launches, prefill_space.gpu) is None
        assert len(c.launches) == 1, [k.name for k in c.launches]
        (kernel,) = c.launches
        assert kernel.uses_tensor_cores == ("wmma" in template)
        query_tiles = -(-p["q_len"] // q_tile)
        assert kernel.blocks == p["batch"] * p["heads"] * query_tiles
        for buffer in c.mod["main"].body.block.alloc_buffers:
            assert buffer.scope() != "global", buffer
        # Each query tile reads K and V once (the tail granule padded; the causal skip is a branch,
        # which the count includes) and Q once; the output is stored once. The count also includes
        # the guarded lanes of a cooperative load whose threads x vector width exceed its tile (up
        # to 4x here); reading K/V once per query row would be q_tile (32 or 64) times as much.
        keys = -(-p["kv_len"] // PREFILL_GRANULE) * PREFILL_GRANULE
        kv_bytes = 2 * p["batch"] * p["heads"] * query_tiles * keys * p["head_dim"] * 2
        q_bytes = p["batch"] * p["heads"] * query_tiles * q_tile * p["head_dim"] * 2
        assert kernel.traffic.global_load_bytes <= 4 * (kv_bytes + q_bytes)
        assert kernel.traffic.global_store_bytes <= q_bytes
    assert len(templates) == 4


def test_prefill_decisions_mutate_cross_over_and_round_trip(prefill_space, prefill_sampled):
    rng = random.Random(0)
    for space in prefill_space.design_spaces:
        kinds = [i.kind.name for i in space.trace.insts]
        # The threads (rows x columns, or warps with tensor cores): perfect tiles; vector width and
        # unroll: categorical; the key tile: a perfect tile of the key loop, or (causal: the loop's
        # length depends on the query tile) a categorical choice of granules per stage.
        assert kinds.count("SamplePerfectTile") == (1 if "wmma" in space.template else 2)
        assert kinds.count("SampleCategorical") == 3
    mutants = [m for m in (prefill_space.mutate(prefill_sampled[i % 8], rng) for i in range(12)) if m is not None]
    assert mutants and all(len(m.launches) == 1 for m in mutants)
    assert {m.structural_hash for m in mutants} - {c.structural_hash for c in prefill_sampled}
    same_space = [c for c in prefill_sampled if c.design_space == prefill_sampled[0].design_space]
    children = [prefill_space.crossover(same_space[0], other, rng) for other in same_space[1:] * 3]
    assert any(child is not None for child in children)
    back = prefill_space.from_trace_json(prefill_sampled[0].trace_json(), prefill_sampled[0].design_space)
    assert back.structural_hash == prefill_sampled[0].structural_hash


def test_causal_prefill_iterates_only_the_granules_a_tile_sees():
    """Causal: the key loop of a query tile stops at the diagonal, so the lowered kernel has fewer
    iterations (not an ``if`` around dead granules), and the analysis (hence sim) counts the
    tensor-core work of the granules each tile iterates: about half of the non-causal kernel's."""
    causal = ScheduleSpace("attention:1,1,256,256,32,causal", static_shared_gpu(), rule_sets=["fused"])
    index = next(i for i, d in enumerate(causal.design_spaces) if d.template == "flash_prefill_wmma_q32")
    granules = 256 // PREFILL_GRANULE  # 8 query tiles of 32 rows, 8 granules of 32 keys
    per_granule = 2 * (2 * 32 * PREFILL_GRANULE * 32)  # both products of a 32 x 32 granule, head_dim 32
    checked = 0
    for c in causal.sample(8, seed=2, max_attempts=200):
        if c.design_space != index:
            continue
        trace = c.trace
        stage = next(trace.get_decision(i) for i in trace.insts if i.kind.name == "SampleCategorical")
        stage = [1, 2, 4][int(stage)]
        # Tile qt iterates qt + 1 granules, rounded up to whole stages (the last one guarded).
        live = sum(-(-(qt + 1) // stage) * stage for qt in range(granules))
        (kernel,) = c.launches
        assert kernel.traffic.tensor_core_flops == pytest.approx(live * per_granule)
        # Without causal, every tile iterates all 8 granules.
        assert kernel.traffic.tensor_core_flops <= 0.76 * granules * granules * per_granule
        checked += 1
    assert checked


@pytest.mark.slow
def test_prefill_builds_for_sm_90(prefill_space, prefill_sampled, tmp_path):
    from etune.search_space import Builder

    # One candidate of each form (SIMT, wmma).
    by_form = {"wmma" in prefill_space.design_spaces[c.design_space].template: c for c in prefill_sampled}
    results = Builder(prefill_space.gpu, workdir=tmp_path, jobs=2).build(list(by_form.values()))
    assert len(results) == 2 and all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert all(len(r.kernels) == 1 and r.kernels[0].registers > 0 for r in results)


@pytest.mark.slow
def test_dynamic_shared_memory_prefill_builds_for_sm_90(tmp_path):
    """A wmma template beyond 48 KiB: sampled, valid for the raised limit, one kernel that reads K/V
    once per query tile, and nvcc builds it with the tiles in dynamic shared memory (ptxas reports
    only the static part: P and the row statistics)."""
    from etune.search_space import Builder

    gpu = big_shared_gpu()
    space = ScheduleSpace("attention:1,1,64,256,64", gpu, rule_sets=["fused"])
    index = next(i for i, d in enumerate(space.design_spaces) if d.template == "flash_prefill_wmma_q64_g128")
    candidates = [c for c in space.sample(12, seed=3, max_attempts=300) if c.design_space == index]
    assert candidates, space.last_sample
    candidate = candidates[0]
    (kernel,) = candidate.launches
    assert kernel.shared_bytes > 48 * 1024 and launch_problem(candidate.launches, gpu) is None
    assert launch_problem(candidate.launches, static_shared_gpu()) is not None  # not without the opt-in
    assert kernel.traffic.global_load_bytes <= 1.05 * (2 * 256 * 64 * 2 + 64 * 64 * 2)  # K, V and Q once
    (result,) = Builder(gpu, workdir=tmp_path, jobs=1).build([candidate])
    assert result.ok, result.error
    source = (Path(result.artifact_dir) / "kernel.cu").read_text()
    assert "extern __shared__" in source
    (resources,) = result.kernels
    assert resources.registers > 0 and resources.shared_bytes <= 48 * 1024 < kernel.shared_bytes


@pytest.mark.gpu
def test_prefill_candidates_match_reference_on_gpu(tmp_path):
    from etune.measurements.tvm_runner import run_and_check
    from etune.search_space import Builder

    local = ScheduleSpace(PREFILL_SPEC, "local", rule_sets=["fused"])
    for i, build in enumerate(Builder(local.gpu, workdir=tmp_path).build(local.sample(4, seed=5))):
        assert build.ok, build.error
        ok, error = run_and_check(local.workload, build.library, seed=i)
        assert ok, f"relative error {error}"
