"""The TMA GEMM templates (kernels/gemm_tma.py, offered by the ``gemm_wgmma`` rule set on sm_90).

No GPU here: the data flow is checked by ``emulate`` (each block's boxes placed with the 128-byte
swizzle where the template puts them, the multicast boxes of every rank of its cluster, every wgmma's
operands read through the template's descriptors), the analysis of the lowered code (what sim and the
features see) and the sm_90a build. On a GPU the device check's ``tma`` phase and the ``gemm_wgmma``
GPU test run them against the reference.
"""
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tvm

from etune.kernels import gemm_tma as tma_module
from etune.kernels import parse_spec
from etune.kernels.gemm_tma import (BK, BOX_N, CLUSTERS, STAGES, TILES, configs, emulate, gemm_tma, gemm_tma_funcs,
                                    shared_bytes)
from etune.measurements.sim import simulate
from etune.search_space import ScheduleSpace, gpu_spec
from etune.search_space.analysis import kernel_launches
from etune.search_space.build import find_nvcc


def operands(M, N, K, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((M, K)).astype("float16"), rng.standard_normal((K, N)).astype("float16")


def emulated_ok(shape, tile, cluster):
    M, N, K = shape
    a, b = operands(M, N, K)
    workload = parse_spec(f"gemm:{M},{N},{K}")
    return workload.check([emulate(a, b, *tile, cluster=cluster)], workload.reference([a, b]))


@pytest.mark.parametrize("shape, tile, cluster", [
    ((128, 128, 64), (128, 128, 2, 1), 1),
    ((330, 320, 200), (128, 256, 2, 1), 2),  # M, N and K tails; a cluster with a block past M
    ((520, 264, 456), (128, 256, 2, 1), 4),  # five row tiles in two clusters of four
    ((200, 136, 72), (192, 256, 3, 1), 2),  # N below the tile: the second rank's box is all zeros
    ((300, 264, 136), (256, 128, 2, 2), 2),
    ((70, 72, 40), (128, 128, 2, 1), 1),  # K below one stage
])
def test_emulated_kernel_matches_the_reference(shape, tile, cluster):
    ok, error = emulated_ok(shape, tile, cluster)
    assert ok, error


@pytest.mark.parametrize("name, wrong", [
    ("A_SBO", 512),  # A's 8-row groups half as far apart
    ("B_LBO", 1024),  # B's LBO and SBO exchanged
    ("B_SBO", 8192),
    ("A_K_STEP", 64),  # an A k16 step two swizzle chunks on
    ("B_K_STEP", 1024),  # a B k16 step 8 rows on, not 16
    ("a_operand_byte", lambda m, kk: m * 64 * 128 + kk * 32 + 128),  # the next row
    ("b_boxes_of", lambda rank, bn, cluster: range(0, bn // BOX_N // cluster)),  # every rank the same boxes
    ("tile_origin", lambda bx, rank, gn, cl, bm, bn: ((bx // cl // gn * cl) * bm, bx // cl % gn * bn)),  # rank ignored
])
def test_emulation_fails_when_a_layout_is_wrong(monkeypatch, name, wrong):
    monkeypatch.setattr(tma_module, name, wrong)
    try:
        ok, _ = emulated_ok((300, 264, 136), (128, 256, 2, 1), 2)
    except IndexError:  # a descriptor that reads past the stage
        ok = False
    assert not ok


def test_offered_on_sm_90_with_clusters_that_split_b():
    h100, a100 = gpu_spec("h100"), gpu_spec("a100")
    big = parse_spec("gemm:4096,4096,4096")
    assert not gemm_tma_funcs(big, a100) and not gemm_tma_funcs(big)
    funcs = gemm_tma_funcs(big, h100)
    assert len(funcs) == sum(len(STAGES) * sum(bn // BOX_N % c == 0 for c in CLUSTERS) for _, bn, _, _ in TILES)
    assert all(shared_bytes(bm, bn, s) <= h100.max_shared_memory_per_block for bm, bn, _, _, s, _ in configs(4096, 4096))
    assert {"gemm_tma_128x256_g2x1_s4_c4", "gemm_tma_192x256_g3x1_s4_c2", "gemm_tma_128x128_g2x1_s4_c1"} <= set(funcs)
    assert "gemm_tma_128x128_g2x1_s4_c4" not in funcs  # two B boxes do not split over four blocks
    # clusters only where there are row tiles to share B: M = 150 has two of 128, one of 192
    small = {(bm, c) for bm, _, _, _, _, c in configs(150, 264)}
    assert (128, 2) in small and (128, 4) not in small and (192, 2) not in small
    for spec in ("gemm:32,4096,4096", "gemm:64,60,64", "softmax:64,64"):
        assert not gemm_tma_funcs(parse_spec(spec), h100), spec
    with pytest.raises(ValueError, match="do not split"):
        gemm_tma(256, 128, 64, 128, 128, 2, 1, 3, 4)
    with pytest.raises(ValueError, match="multiples of 8"):
        gemm_tma(256, 132, 64)


def _launch(M, N, K, tile, stages, cluster):
    (launch,) = kernel_launches(tvm.IRModule({"main": gemm_tma(M, N, K, *tile, stages, cluster)}),
                                gpu_spec("h100").tvm_target())
    return launch


@pytest.mark.parametrize("cluster", [1, 2, 4])
def test_analysis_counts_tma_loads_once_per_cluster(cluster):
    """Bytes a TMA load reads come from the attribute the template puts around it (the load itself is
    an opaque call); a multicast box is read once and lands in every block of the cluster; the
    cluster rank's launch does not count the grid twice."""
    M, N, K = 512, 512, 200
    launch = _launch(M, N, K, (128, 256, 2, 1), 4, cluster)
    blocks, steps = (M // 128) * (N // 256), -(-K // BK)
    assert launch.grid == (blocks, 1, 1) and launch.block == (256, 1, 1)
    t = launch.traffic
    assert t.tensor_core_flops == t.wgmma_flops == 2 * M * N * steps * BK
    a_bytes, b_bytes = 128 * BK * 2, 256 * BK * 2
    assert t.global_load_bytes == blocks * steps * (a_bytes + b_bytes / cluster)
    assert t.shared_store_bytes == blocks * steps * (a_bytes + b_bytes)  # what lands, multicasts included
    # one instruction per box, issued by one thread: the A box and this block's share of B's
    assert t.global_load_instructions == blocks * steps * (1 + 256 // BOX_N // cluster)
    assert launch.async_copy_bytes_in_flight == launch.dynamic_shared_bytes / 2 / 256


def test_sim_credits_multicast_with_less_l2_traffic_and_energy():
    """At 4096^3 (model outputs): the same tile with B multicast over 2 and 4 blocks reads less from
    L2 and takes less energy than without, and the best TMA template beats the best cp.async one."""
    outcomes = {c: simulate([_launch(4096, 4096, 4096, (128, 256, 2, 1), 4, c)], parse_spec("gemm:4096,4096,4096"))
                for c in (1, 2, 4)}
    l2 = [outcomes[c].breakdown["l2_bytes"] for c in (1, 2, 4)]
    energy = [outcomes[c].energy_j for c in (1, 2, 4)]
    assert l2[0] > l2[1] > l2[2] and energy[0] > energy[1] > energy[2]
    from etune.kernels.gemm_wgmma import gemm_wgmma

    (cp_async,) = kernel_launches(tvm.IRModule({"main": gemm_wgmma(4096, 4096, 4096, 192, 256, 3, 1, 3)}),
                                  gpu_spec("h100").tvm_target())
    assert energy[2] < 0.95 * simulate([cp_async], parse_spec("gemm:4096,4096,4096")).energy_j


def _nvcc(cuda: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([find_nvcc(), "-arch=sm_90a", "-O3", *flags, str(cuda)], check=True, capture_output=True,
                          text=True)


@pytest.mark.slow
def test_builds_for_sm_90a_without_spills(built_templates, no_spills, tmp_path):
    """Every TMA template offered at a shape with tails and five row tiles (clusters of 2 and 4 for
    128-row tiles), built with etune's builder:
    tensor maps as grid constants, the multicast with its cluster launch, 128B-swizzle descriptors;
    ptxas neither injects waits nor serialises the wgmmas of the two largest tiles."""
    space = ScheduleSpace("gemm:520,264,4104", rule_sets=["gemm_wgmma"])
    built = built_templates([space], keep=lambda template: template.startswith("gemm_tma_"))
    assert len(built) == len(gemm_tma_funcs(space.workload, space.gpu)) == 9
    no_spills(built)
    for template, result in built:
        bn, cluster = int(template.split("_")[2].split("x")[1]), int(template[-1])
        source = next(Path(result.artifact_dir).glob("*.cu")).read_text()
        assert "const __grid_constant__ CUtensorMap A_map, const __grid_constant__ CUtensorMap B_map" in source
        assert f"wgmma.mma_async.sync.aligned.m64n{bn}k16.f32.f16.f16" in source, template
        assert (".multicast::cluster" in source) == (cluster > 1), template
        # A: LBO 1 (unused), SBO 1 KiB; B: LBO 8 KiB, SBO 1 KiB; 128-byte swizzle (3)
        assert re.search(r"ptx_wgmma_encode_matrix_descriptor\(\(&\(DescA_ptr\[0\]\)\), [^;]*, 1, 64, 3\);", source)
        assert re.search(r"ptx_wgmma_encode_matrix_descriptor\(\(&\(DescB_ptr\[0\]\)\), [^;]*, 512, 64, 3\);", source)
        if template in ("gemm_tma_128x256_g2x1_s4_c4", "gemm_tma_192x256_g3x1_s4_c2"):
            report = _nvcc(next(Path(result.artifact_dir).glob("*.cu")), "-cubin", "-Xptxas", "-v", "-o",
                           str(tmp_path / "k.cubin")).stderr
            assert "C7517" not in report and "injected" not in report and "serializ" not in report, (template, report)
