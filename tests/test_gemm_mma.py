"""Thread-level mma.sync GEMM templates (kernels/gemm_mma.py, rule set ``gemm_mma``).

As for the FlashAttention-2 templates, the PrimFunc cannot run here: its data flow is checked by
``emulate`` (the warps' ldmatrix and mma steps in NumPy, with the layouts the PrimFunc uses), its
lowered structure and nvcc build (sm_90, no spills) directly, and its numbers on sim (model
outputs). On a GPU, built templates are compared with the reference.
"""
import numpy as np
import pytest
import tvm

from etune.kernels import gemm_mma as gemm_mma_module
from etune.kernels import parse_spec
from etune.kernels.gemm_tma import gemm_tma_funcs
from etune.kernels.gemm_wgmma import gemm_wgmma_funcs
from etune.kernels.gemm_mma import (BK, SKINNY_STAGES, SKINNY_TILES, configs, emulate, emulate_skinny, gemm_mma,
                                    gemm_mma_funcs, gemm_mma_skinny, shared_bytes, skinny_shared_bytes)
from etune.search_space import ScheduleSpace, gpu_spec
from etune.search_space.analysis import kernel_launches
from etune.search_space.rules import rule_set_applies


def operands(M, N, K, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((M, K)).astype("float16"), rng.standard_normal((K, N)).astype("float16")


@pytest.mark.parametrize("shape, skinny, tile", [
    ((64, 64, 64), False, (64, 64, 2, 2)),
    ((70, 72, 40), False, (64, 64, 2, 2)),  # M, N and K past a tile: guarded rows and columns, a K tail
    ((100, 136, 96), False, (64, 128, 2, 2)),
    ((33, 64, 32), False, (64, 64, 2, 2)),
    ((128, 128, 48), False, (128, 128, 2, 4)),
    ((16, 64, 256), True, (32, 4)),
    ((5, 72, 200), True, (32, 4)),  # rows padded to 16, a column tail, K not a multiple of the warps' steps
    ((20, 128, 96), True, (64, 8)),  # two m16 row tiles
    ((32, 40, 64), True, (32, 4)),
])
def test_emulated_kernel_matches_the_reference(shape, skinny, tile):
    M, N, K = shape
    a, b = operands(M, N, K)
    workload = parse_spec(f"gemm:{M},{N},{K}")
    out = emulate_skinny(a, b, *tile) if skinny else emulate(a, b, *tile)
    ok, error = workload.check([out], workload.reference([a, b]))
    assert ok, error


@pytest.mark.parametrize("skinny", [False, True])
@pytest.mark.parametrize("layout", ["a_ldmatrix_address", "b_ldmatrix_address"])
def test_emulation_fails_when_a_layout_is_wrong(monkeypatch, layout, skinny):
    correct = getattr(gemm_mma_module, layout)
    monkeypatch.setattr(gemm_mma_module, layout, lambda *args: (correct(*args)[0] ^ 1, correct(*args)[1]))
    M = 16 if skinny else 64
    a, b = operands(M, 64, 64)
    workload = parse_spec(f"gemm:{M},64,64")
    ok, _ = workload.check([emulate_skinny(a, b) if skinny else emulate(a, b)], workload.reference([a, b]))
    assert not ok


def test_offered_for_fp16_gemm_with_room_for_its_tiles():
    for spec in ("gemm:4096,4096,4096", "gemm:16,11008,4096", "gemm:2,64,64"):
        assert rule_set_applies("gemm_mma", parse_spec(spec)), spec
    for spec in ("gemm:1,4096,4096", "gemm:64,60,64", "gemm:64,64,64,accumulate=float16", "softmax:64,64"):
        assert not rule_set_applies("gemm_mma", parse_spec(spec)), spec
    # block tiles from M = 32, skinny templates up to M = 32
    h100 = gpu_spec("h100")
    assert all("skinny" in name for name in gemm_mma_funcs(parse_spec("gemm:16,11008,4096"), h100))
    assert not any("skinny" in name for name in gemm_mma_funcs(parse_spec("gemm:64,4096,4096"), h100))
    both = gemm_mma_funcs(parse_spec("gemm:32,4096,4096"), h100)
    assert any("skinny" in name for name in both) and not all("skinny" in name for name in both)
    # tiles no larger than the problem rounded up to 64; 48 KiB without the opt-in
    assert {(bm, bn) for bm, bn, *_ in configs(100, 100)} == {(64, 128), (64, 64), (128, 128)}
    small = gemm_mma_funcs(parse_spec("gemm:4096,4096,4096"))
    assert small and all(shared_bytes(*map(int, name.split("_")[2].split("x")), int(name[-1])) <= 48 * 1024
                         for name in small)
    assert len(gemm_mma_funcs(parse_spec("gemm:4096,4096,4096"), gpu_spec("h100"))) == 18


def test_lowered_structure():
    M, N, K = 200, 264, 104
    (launch,) = kernel_launches(tvm.IRModule({"main": gemm_mma(M, N, K, 128, 128, 2, 2, 3)}),
                                gpu_spec("h100").tvm_target())
    assert launch.grid == (2 * 3, 1, 1) and launch.block == (128, 1, 1)
    assert launch.shared_bytes == shared_bytes(128, 128, 3) and launch.uses_tensor_cores
    # a 64x64 warp tile keeps 32 independent m16n8 accumulators: ILP for latency hiding
    assert launch.accumulator_tiles == 32 and launch.warp_ilp() == 2
    # every product of the padded tiles, once: no operand re-read from global memory per warp
    assert launch.traffic.tensor_core_flops == 2 * 256 * 384 * (-(-K // BK) * BK)
    assert launch.traffic.global_load_bytes == 6 * (128 + 128) * 4 * BK * 2
    # three stages of A and B tiles on the way per thread, averaged over the commits (the last two
    # of the 4 + 2 commit no copy)
    kt = -(-K // BK)
    assert launch.async_copy_bytes_in_flight == 3 * (128 * 32 + 32 * 128) * 2 / 128 * kt / (kt + 2)


def test_skinny_lowered_structure_reads_the_weights_once():
    M, N, K, bn, warps, stages = 16, 1024, 1000, 64, 4, 3
    (launch,) = kernel_launches(tvm.IRModule({"main": gemm_mma_skinny(M, N, K, bn, warps, stages)}),
                                gpu_spec("h100").tvm_target())
    assert launch.grid == (N // bn, 1, 1) and launch.block == (32 * warps, 1, 1)
    assert launch.shared_bytes == skinny_shared_bytes(M, bn, warps, stages)
    # one kernel; every warp copies its k steps of A (16 rows) and B (bn columns), K rounded up to
    # the warps' steps: B is read once, no global partials are written
    steps = -(-(-(-K // BK)) // warps) * warps
    assert launch.traffic.global_load_bytes == N // bn * steps * (16 * BK + BK * bn) * 2
    assert launch.traffic.global_store_bytes == M * N * 2


def test_sim_skinny_reads_the_weights_near_the_memory_bound():
    """On sim (model outputs), gemm 16x11008x4096 (a 7B model's MLP at batch 16): a one-kernel
    template within 1.3x the time to read the weights, using less energy than the vendor stand-in."""
    from etune.measurements.sim import simulate, vendor_outcome

    workload = parse_spec("gemm:16,11008,4096")
    gpu = gpu_spec("h100")
    space = ScheduleSpace(workload, gpu, rule_sets=["gemm_mma"])
    outcomes = [simulate(c.launches, workload, gpu) for c in space.fixed_points()]
    assert len(outcomes) == len(space.design_spaces) >= 9
    bound = workload.min_bytes / gpu.memory_bandwidth
    vendor = vendor_outcome(workload, gpu)
    assert min(o.latency_s for o in outcomes) <= 1.3 * bound
    assert min(o.energy_j for o in outcomes if o.latency_s <= 1.3 * bound) < vendor.energy_j


@pytest.mark.slow
def test_builds_for_sm_90_without_spills(built_templates, no_spills):
    """Every block tile (at 3 stages) and every skinny template (all depths)."""
    built = built_templates([ScheduleSpace("gemm:200,264,104", rule_sets=["gemm_mma"]),
                             ScheduleSpace("gemm:20,264,104", rule_sets=["gemm_mma"])],
                            keep=lambda template: "skinny" in template or template.endswith("_s3"))
    assert len(built) == len({c[:4] for c in configs(4096, 4096)}) + len(SKINNY_TILES) * len(SKINNY_STAGES)
    no_spills(built)


def test_sim_beats_the_wmma_space():
    """On sim (model outputs): the best template uses less energy than the best of 16 samples of
    the wmma space, whose fragments are loaded from shared memory for every product."""
    from etune.measurements.sim import simulate

    spec = "gemm:2048,2048,2048"
    workload = parse_spec(spec)
    gpu = gpu_spec("h100")

    def energy(mod):
        return simulate(kernel_launches(mod, gpu.tvm_target()), workload, gpu).energy_j

    space = ScheduleSpace(spec, rule_sets=["gemm_mma"])
    assert len(space.fixed_points()) == len(space.design_spaces) == 18
    best = min(energy(c.schedule.mod) for c in space.fixed_points())
    wmma = ScheduleSpace(spec, rule_sets=["tensorcore"])
    assert best < min(energy(c.schedule.mod) for c in wmma.sample(16, seed=0))


@pytest.mark.gpu
def test_templates_match_the_reference_on_gpu(templates_match_on_gpu):
    templates_match_on_gpu("gemm_mma", ("gemm:200,264,104", "gemm:1024,1024,1024", "gemm:20,264,104",
                                        "gemm:16,4096,4096"))


def test_default_space_samples_each_template_once():
    space = ScheduleSpace("gemm:256,256,256")
    points = [d for d in space.design_spaces if d.is_point]
    workload = parse_spec("gemm:256,256,256")
    # both tensor-core template families are offered on the sm_90 default (the Hopper one with its
    # cp.async and its TMA templates), one point per template
    per_rule_set = {rs: sum(d.rule_set == rs for d in points) for rs in {d.rule_set for d in points}}
    assert per_rule_set == {"gemm_mma": len(gemm_mma_funcs(workload, space.gpu)),
                            "gemm_wgmma": len(gemm_wgmma_funcs(workload, space.gpu))
                            + len(gemm_tma_funcs(workload, space.gpu))}
    first = space.sample(len(space.design_spaces), seed=0)
    assert {c.design_space for c in first} >= {d.index for d in points}
    # a later call (the tuner excludes what it measured) does not come back to the templates
    again = space.sample(6, seed=1, exclude={c.structural_hash for c in first})
    assert len(again) == 6 and not any(space.design_spaces[c.design_space].is_point for c in again)
