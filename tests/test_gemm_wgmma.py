"""Thread-level Hopper wgmma GEMM templates (kernels/gemm_wgmma.py, opt-in rule set ``gemm_wgmma``).

No GPU here: the data flow is checked by ``emulate`` (the copies into the descriptor layout, every
wgmma's operands read through its descriptor as the PTX ISA defines it, the accumulator fragment),
the generated code and the sm_90a build (ptxas: no spills) directly. On a GPU, built templates are
compared with the reference (``gpu`` test).
"""
import dataclasses
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tvm

from etune.kernels import gemm_wgmma as wgmma_module
from etune.kernels import parse_spec
from etune.kernels.gemm_wgmma import BK, STAGES, TILES, configs, emulate, gemm_wgmma, gemm_wgmma_funcs, shared_bytes
from etune.measurements.sim import SimParams, simulate
from etune.search_space import ScheduleSpace, gpu_spec
from etune.search_space.analysis import kernel_launches
from etune.search_space.build import arch_for_source, find_nvcc
from etune.search_space.rules import RULE_SETS, rule_set_applies


def operands(M, N, K, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((M, K)).astype("float16"), rng.standard_normal((K, N)).astype("float16")


def emulated_ok(shape, tile):
    M, N, K = shape
    a, b = operands(M, N, K)
    workload = parse_spec(f"gemm:{M},{N},{K}")
    return workload.check([emulate(a, b, *tile)], workload.reference([a, b]))


@pytest.mark.parametrize("shape, tile", [
    ((128, 128, 64), (128, 128, 2, 1)),
    ((200, 264, 104), (128, 128, 2, 1)),  # M, N and K past a tile: guarded rows and columns, a K tail
    ((70, 72, 40), (64, 128, 1, 1)),  # K below one stage, N below the tile
    ((64, 256, 136), (64, 256, 1, 1)),
    ((130, 256, 72), (128, 256, 2, 1)),
    ((190, 136, 200), (128, 128, 1, 2)),  # one warpgroup, two m64 tiles
    ((300, 136, 200), (256, 128, 2, 2)),
    ((250, 264, 136), (192, 256, 3, 1)),  # three warpgroups: 5 1/3 rounds of B copies per thread
])
def test_emulated_kernel_matches_the_reference(shape, tile):
    ok, error = emulated_ok(shape, tile)
    assert ok, error


def _swapped(strides):
    return lambda *args: tuple(reversed(strides(*args)))


def _row_off(layout):
    def moved(*args):
        row, col = layout(*args)
        return row ^ 1, col
    return moved


def _next_row(start):
    return lambda *args: start(*args) + 8


@pytest.mark.parametrize("name, wrong", [
    ("a_strides", _swapped),  # A's LBO and SBO exchanged
    ("b_strides", _swapped),  # B's LBO and SBO exchanged
    ("a_chunk", _row_off),  # a copy's row off by one
    ("b_chunk", _row_off),  # a copy's k off by one
    ("acc_fragment", _row_off),  # an accumulator's row off by one
    ("a_operand_start", _next_row),  # an A descriptor's start one 16-byte row on
    ("b_operand_start", _next_row),  # a B descriptor's start one 16-byte row on
])
def test_emulation_fails_when_a_layout_is_wrong(monkeypatch, name, wrong):
    monkeypatch.setattr(wgmma_module, name, wrong(getattr(wgmma_module, name)))
    ok, _ = emulated_ok((128, 128, 64), (128, 128, 2, 1))
    assert not ok


def test_descriptor_read_follows_the_isa_core_matrices():
    """A no-swizzle K-major operand: core matrix (i, j) (rows 8i.., k 8j..) 128 contiguous bytes at
    start + i * SBO + j * LBO; MN-major: core matrix (j, i) (k 8j.., n 8i..), rows along k."""
    tile = np.arange(4096).astype(np.float32)
    k_major = wgmma_module.emulate_descriptor_read(tile, 64, 512 // 16, 2048 // 16, 64, True)
    assert k_major.shape == (64, 16)
    assert k_major[0, 0] == 64 and k_major[0, 7] == 71 and k_major[1, 0] == 72  # 8 k per 16-byte row
    assert k_major[0, 8] == 64 + 256 and k_major[8, 0] == 64 + 1024  # LBO along K, SBO along M
    mn_major = wgmma_module.emulate_descriptor_read(tile, 0, 2048 // 16, 128 // 16, 128, False)
    assert mn_major.shape == (16, 128)
    assert mn_major[0, 1] == 1 and mn_major[1, 0] == 8 and mn_major[0, 8] == 64 and mn_major[8, 0] == 1024


def test_offered_for_fp16_gemm_on_sm_90_only():
    h100, a100 = gpu_spec("h100"), gpu_spec("a100")
    assert "gemm_wgmma" in RULE_SETS  # in the default space where it applies
    for spec in ("gemm:4096,4096,4096", "gemm:64,64,64", "gemm:100,136,40"):
        assert rule_set_applies("gemm_wgmma", parse_spec(spec)), spec
        assert gemm_wgmma_funcs(parse_spec(spec), h100), spec
        assert not gemm_wgmma_funcs(parse_spec(spec), a100), spec
        assert not gemm_wgmma_funcs(parse_spec(spec)), spec  # no target: not offered
    for spec in ("gemm:32,4096,4096", "gemm:64,60,64", "gemm:64,64,64,accumulate=float16", "softmax:64,64"):
        assert not rule_set_applies("gemm_wgmma", parse_spec(spec)), spec
    assert {(bm, bn) for bm, bn, *_ in configs(100, 100)} == {(64, 128), (128, 128)}
    big = gemm_wgmma_funcs(parse_spec("gemm:4096,4096,4096"), h100)
    assert len(big) == len(TILES) * len(STAGES)
    assert all(shared_bytes(*map(int, name.split("_")[2].split("x")), int(name[-1])) <= 227 * 1024 for name in big)
    space = ScheduleSpace("gemm:256,256,256", rule_sets=["gemm_wgmma", "gemm_mma"])
    assert {d.rule_set for d in space.design_spaces} == {"gemm_wgmma", "gemm_mma"}
    assert all(d.is_point for d in space.design_spaces)


def test_arch_specific_target_for_wgmma():
    assert arch_for_source("asm volatile(\"wgmma.fence.sync.aligned;\")", "sm_90") == "sm_90a"
    assert arch_for_source("mma.sync.aligned.m16n8k16", "sm_90") == "sm_90"
    assert arch_for_source("wgmma.fence", "sm_80") == "sm_80"


def test_lowered_structure():
    M, N, K = 200, 264, 104
    (launch,) = kernel_launches(tvm.IRModule({"main": gemm_wgmma(M, N, K, 128, 128, 2, 1, 3)}),
                                gpu_spec("h100").tvm_target())
    assert launch.grid == (2 * 3, 1, 1) and launch.block == (256, 1, 1)
    assert launch.shared_bytes == launch.dynamic_shared_bytes == shared_bytes(128, 128, 3)
    assert launch.uses_tensor_cores
    # A and B tiles from global memory once per block and k step (zero-filled tails included)
    assert launch.traffic.global_load_bytes == 6 * (128 + 128) * -(-K // BK) * BK * 2


def test_analysis_counts_wgmma_flops_and_operand_reads():
    M, N, K = 200, 264, 104
    (launch,) = kernel_launches(tvm.IRModule({"main": gemm_wgmma(M, N, K, 128, 128, 2, 1, 3)}),
                                gpu_spec("h100").tvm_target())
    t = launch.traffic
    k_padded = -(-K // BK) * BK
    assert t.tensor_core_flops == t.wgmma_flops == 2 * 256 * 384 * k_padded
    # one HGMMA per warp and m64n128k16: per thread, one per call
    wgmmas_per_block = 2 * k_padded // 16
    assert t.tensor_core_instructions == 6 * wgmmas_per_block * 256 / 2
    # the descriptors' operands, 64x16 of A and 16x128 of B per call, read from shared memory (no
    # load instructions), beside the copies' and the epilogue's own accesses
    operands = 6 * wgmmas_per_block / 2 * (64 * 16 + 16 * 128) * 2
    assert t.shared_load_bytes >= operands
    assert t.shared_store_bytes == t.global_load_bytes  # cp.async: every copied byte lands in shared
    # 64 fp32 accumulators per thread: 16 independent m16n8 tiles, counted up to 2 for hiding
    assert launch.accumulator_tiles == 16 and launch.warp_ilp() == 2
    # sim runs these flops at wgmma's rate, not mma.sync's
    params = SimParams()
    as_mma_sync = dataclasses.replace(params, wgmma_efficiency=params.tensor_core_efficiency)
    tensor_s = [simulate([launch], params=p).kernels[0].times["tensor"] for p in (params, as_mma_sync)]
    assert tensor_s[0] * params.wgmma_efficiency == pytest.approx(tensor_s[1] * params.tensor_core_efficiency)


def _nvcc(cuda: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([find_nvcc(), "-arch=sm_90a", "-O3", *flags, str(cuda)], check=True, capture_output=True,
                          text=True)


@pytest.mark.slow
def test_builds_for_sm_90a_without_spills(built_templates, no_spills, tmp_path):
    """Every template offered for a big GEMM (all tiles and depths), built at a shape with tails; the
    generated code has the wgmma of the tile, its descriptors (LBO and SBO >> 4) and the fences;
    ptxas (once per tile) neither injects a warpgroup.wait nor serialises the wgmmas (which it does when it sees the
    accumulators used while a wgmma may be in flight); the accumulators are read after the last
    wgmma.wait_group."""
    built = built_templates([ScheduleSpace("gemm:200,264,4104", rule_sets=["gemm_wgmma"])],  # a k loop nvcc keeps
                            keep=lambda template: template.startswith("gemm_wgmma_"))  # gemm_tma's: test_gemm_tma
    assert len(built) == len(TILES) * len(STAGES)
    no_spills(built)
    for template, result in built:
        bn = int(template.split("_")[2].split("x")[1])
        cuda = next(Path(result.artifact_dir).glob("*.cu"))
        source = cuda.read_text()
        assert f"wgmma.mma_async.sync.aligned.m64n{bn}k16.f32.f16.f16" in source, template
        # A: LBO 128 B, SBO 1 KiB; B: LBO BN * 16 B, SBO 128 B (in 16-byte units)
        assert re.search(r"ptx_wgmma_encode_matrix_descriptor\([^;]*, 8, 64, 0\);", source), template
        assert re.search(rf"ptx_wgmma_encode_matrix_descriptor\([^;]*, {bn}, 8, 0\);", source), template
        assert "fence.proxy.async" in source and "wgmma.fence.sync.aligned" in source, template
        if template.endswith("_s3"):  # ptxas's report once per tile: the depth changes loop bounds only
            report = _nvcc(cuda, "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin")).stderr
            assert "C7517" not in report and "injected" not in report and "serializ" not in report, (template, report)
    template, result = built[0]
    _nvcc(next(Path(result.artifact_dir).glob("*.cu")), "-ptx", "-o", str(tmp_path / "k.ptx"))
    ptx = (tmp_path / "k.ptx").read_text()
    assert ptx.index("cvt.rn.f16.f32") > ptx.rindex("wgmma.wait_group.sync.aligned"), template


@pytest.mark.gpu
def test_templates_match_the_reference_on_gpu(templates_match_on_gpu):
    templates_match_on_gpu("gemm_wgmma", ("gemm:200,264,104", "gemm:1024,1024,1024", "gemm:64,64,64"))