"""The ``mma`` rule set: ldmatrix + mma.sync tensor cores, cp.async software pipelines, and shared.dyn
beyond 48 KiB (search_space/rules.py, analysis.py; sim's view of them)."""
import dataclasses
import re

import pytest

from etune.kernels import as_workload
from etune.measurements.sim import SimBackend, simulate
from etune.search_space import SamplingError, ScheduleSpace, gpu_spec, launch_problem
from etune.search_space.rules import PIPELINE_STAGES, rule_set_applies

SPEC = "gemm:512,512,512"
FLOPS = 2 * 512**3


@pytest.fixture(scope="module")
def space():
    return ScheduleSpace(SPEC, rule_sets=["mma"])


@pytest.fixture(scope="module")
def candidates(space):
    return space.sample(8, seed=0)


def _stages(space, candidate) -> int:
    return int(space.design_spaces[candidate.design_space].template.removeprefix("stages="))


def test_offered_for_fp16_gemm_with_m_and_n_multiples_of_32():
    assert rule_set_applies("mma", as_workload("gemm:32,256,256"))
    assert rule_set_applies("mma", as_workload("gemm:4096,4096,4000,accumulate=float16"))
    for spec in ("gemm:16,256,256", "gemm:48,256,256", "gemm:256,48,256", "gemm:8,256,256", "softmax:64,256"):
        assert not rule_set_applies("mma", as_workload(spec)), spec


def test_a_rule_set_without_a_space_leaves_the_others(monkeypatch):
    """TVM's mma tiling fails for M = 16 (as for the 16x11008x4096 suite GEMM). Offered anyway, it
    must not take the other rule sets' spaces with it, and alone it says why there is no space."""
    import etune.search_space.space as space_module

    monkeypatch.setattr(space_module, "rule_set_applies", lambda rule_set, workload: True)
    space = ScheduleSpace("gemm:16,256,256", rule_sets=["mma", "tensorcore"])
    assert space.design_spaces and {d.rule_set for d in space.design_spaces} == {"tensorcore"}
    assert any(note.startswith("mma: no design space") for note in space.notes)
    with pytest.raises(SamplingError, match="no mma design space"):
        ScheduleSpace("gemm:16,256,256", rule_sets=["mma"])


def test_one_design_space_per_pipeline_depth(space):
    assert [d.template for d in space.design_spaces] == [f"stages={s}" for s in PIPELINE_STAGES]
    for design, stages in zip(space.design_spaces, PIPELINE_STAGES):
        text = str(design.trace)
        assert f"software_pipeline_stage\", ann_val=[0, 0, {stages - 2}, {stages - 1}, {stages - 1}]" in text
        assert "mma_sync_m16n8k8_f16f16f32" in text and "software_pipeline_async_stages" in text


def test_samples_are_pipelined_and_use_dynamic_shared_memory(space, candidates):
    assert len(candidates) == 8
    assert {_stages(space, c) for c in candidates} == set(PIPELINE_STAGES)
    for c in candidates:
        assert launch_problem(c.launches, space.gpu) is None
        (k,) = c.launches
        assert k.uses_tensor_cores
        assert k.static_shared_bytes == 0 and k.dynamic_shared_bytes == k.shared_bytes > 0
        # cp.async keeps S - 1 stages of the A and B tiles on the way; shared memory holds S of them
        # (S - 1 when the inner k loop has one step: then no fragment load reads a tile one stage later).
        stages = _stages(space, c)
        stage_bytes = k.async_copy_bytes_in_flight * k.threads_per_block / (stages - 1)
        assert stage_bytes > 0
        assert k.dynamic_shared_bytes in (stages * stage_bytes, (stages - 1) * stage_bytes)
    assert max(c.launches[0].dynamic_shared_bytes for c in candidates) > 48 * 1024


def test_cuda_source_has_ldmatrix_mma_sync_and_cp_async(candidates):
    from etune.tuner.export import cuda_source

    big = max(candidates, key=lambda c: c.launches[0].dynamic_shared_bytes)
    assert big.launches[0].dynamic_shared_bytes > 48 * 1024
    source = cuda_source("gemm", big.mod["main"], "h100")
    assert "ldmatrix.sync.aligned.m8n8.x4" in source
    assert "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32" in source
    assert "cp.async.cg.shared.global" in source and "cp.async.wait_group" in source
    assert "extern __shared__" in source
    assert re.search(r"(?<!extern )__shared__ ", source) is None  # nothing static


def test_static_shared_memory_is_limited_to_48_kib(candidates):
    gpu = gpu_spec("h100")
    assert gpu.max_static_shared_memory_per_block == 48 * 1024 and gpu.max_shared_memory_per_block == 227 * 1024
    k = max((c.launches[0] for c in candidates), key=lambda k: k.dynamic_shared_bytes)
    assert k.dynamic_shared_bytes > 48 * 1024
    assert launch_problem([k], gpu) is None
    static = dataclasses.replace(k, dynamic_shared_bytes=0)
    assert "static shared memory" in launch_problem([static], gpu)
    limit = gpu.max_shared_memory_per_block
    beyond = dataclasses.replace(k, shared_bytes=limit + 16, dynamic_shared_bytes=limit + 16)
    assert f"> {limit}" in launch_problem([beyond], gpu)


def test_wmma_space_keeps_its_static_accumulator_store():
    # The wmma loads go to shared.dyn, the fp32 accumulator store to static shared memory (the
    # pitfall at the top of rules.py); with the opt-in limit the loads may now exceed 48 KiB.
    space = ScheduleSpace(SPEC, rule_sets=["tensorcore"])
    tensor = [c for c in space.sample(6, seed=0) if c.launches[0].uses_tensor_cores]
    assert len(tensor) >= 3
    for c in tensor:
        k = c.launches[0]
        assert 0 < k.static_shared_bytes <= 48 * 1024 and k.dynamic_shared_bytes > 0
        assert launch_problem(c.launches, space.gpu) is None
        # its fp32 accumulator fragments, 16x16 each (two m16n8 tiles), are part of the local bytes
        assert k.accumulator_tiles >= 2 and k.accumulator_tiles % 2 == 0
        assert 16 * k.accumulator_tiles <= k.local_bytes_per_thread


def test_sim_counts_the_tensor_core_work_and_the_copies(candidates):
    sim = SimBackend("h100", noise=0.0)
    compulsory = 2 * 512 * 512 * 2
    for c in candidates:
        (k,) = c.launches
        t = k.traffic
        assert t.tensor_core_flops == FLOPS  # 2*16*8*8 per m16n8k8 mma, counted once per thread
        assert t.tensor_core_instructions == FLOPS / 64
        assert t.arithmetic_ops == 0
        # Every A and B byte reaches shared memory by cp.async (16 B per thread and copy), and the
        # fp32 accumulator passes through the shared.dyn pool on its way out (TVM's mma store) ...
        assert t.global_load_bytes >= compulsory
        assert t.global_load_instructions == t.global_load_bytes / 16
        assert t.shared_store_bytes == t.global_load_bytes + 512 * 512 * 4
        # ... A and B leave it by ldmatrix (each warp reads its rows of A and columns of B once per
        # k step), the accumulator by plain loads.
        assert t.shared_load_bytes >= compulsory + 512 * 512 * 4
        assert t.global_store_bytes == 512 * 512 * 2  # the fp16 result
        # the fp32 accumulators mma writes into: m16n8 tiles of 4 values per thread
        assert k.accumulator_tiles >= 1 and 16 * k.accumulator_tiles <= k.local_bytes_per_thread
        outcome = sim.outcome(c)
        energy = outcome.breakdown["energy_by_component_j"]
        assert outcome.breakdown["throttle_stretch"] == 1.0
        assert energy["tensor"] == pytest.approx(FLOPS * sim.params.tensor_flop_j)
        # Without its cp.async pipeline the same kernel would keep fewer bytes on the way.
        plain = simulate([dataclasses.replace(k, async_copy_bytes_in_flight=0.0)], c.workload, "h100")
        assert plain.kernels[0].times["latency"] >= outcome.kernels[0].times["latency"]
    assert any(simulate([dataclasses.replace(c.launches[0], async_copy_bytes_in_flight=0.0)], c.workload,
                        "h100").kernels[0].times["latency"] > sim.outcome(c).kernels[0].times["latency"]
               for c in candidates)
