"""kernels.hopper_tma: the TMA, cluster-multicast and mbarrier-ring checks build for sm_90a, and the
outputs they are held to are the ISA's (the 128-byte swizzle, the ring's sums)."""
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from etune.kernels import hopper_tma
from etune.kernels.hopper_tma import BM, BN, CLUSTER, M, N, check_input, compare, expected, swizzle_128b
from etune.search_space import Builder, gpu_spec
from etune.search_space.build import find_nvcc


def test_swizzle_128b_moves_chunk_c_of_row_r_to_chunk_c_xor_r_mod_8():
    tile = np.arange(BM * BN, dtype=np.float32).reshape(BM, BN)
    out = swizzle_128b(tile)
    assert np.array_equal(out[0], tile[0]) and np.array_equal(out[8], tile[8])  # rows 0 mod 8 stay
    assert np.array_equal(out[1, 8:16], tile[1, 0:8]) and np.array_equal(out[1, 0:8], tile[1, 8:16])
    assert np.array_equal(out[7, 0:8], tile[7, 56:64]) and np.array_equal(out[13, 16:24], tile[13, 56:64])  # 7 ^ 5 = 2
    assert all(sorted(out[r]) == sorted(tile[r]) for r in range(BM))  # a permutation within each row


def test_the_ring_sums_what_each_consumer_thread_reads():
    """expected("ring") against the kernel's own indexing, written out for two blocks: consumer thread
    j adds element i * 128 + j of every step's row-major 64 x 64 box, then its cluster rank."""
    a = check_input()
    want = expected("ring", a)
    assert want.shape == (M // BM * CLUSTER, 128)
    for block in (0, 5):
        rows = a[block // CLUSTER * BM:(block // CLUSTER + 1) * BM].astype(np.float32)
        for j in (0, 77, 127):
            total = sum(float(rows[(i * 128 + j) // BN, k * BN + (i * 128 + j) % BN])
                        for k in range(N // BN) for i in range(BM * BN // 128))
            assert want[block, j] == total + block % CLUSTER


def test_compare_counts_wrong_and_unwritten_elements():
    a = check_input()
    both = expected("multicast", a)
    assert compare(both, np.stack([a, a])) == {"passed": True, "mismatches": 0, "of": 2 * M * N, "first_wrong": None}
    half_missing = np.stack([a, np.full_like(a, np.nan)])
    result = compare(both, half_missing)
    assert result["mismatches"] == M * N and result["first_wrong"][0] == [1, 0, 0]
    assert not compare(both, a)["passed"]  # the wrong shape
    swizzled = expected("tile_copy_swizzle128", a)
    assert not compare(expected("tile_copy", a), swizzled)["passed"]  # the swizzle is not the identity here
    assert compare(expected("tile_copy_swizzle128", a), swizzled)["passed"]


@pytest.mark.parametrize("name", hopper_tma.GEMM_CHECKS)
def test_the_gemm_checks_are_due_the_exact_product_and_the_template_gives_it(name):
    """The GEMM checks' operands and output: the template's emulation (its boxes, multicasts and
    descriptors on the ISA's semantics) gives exactly the product due, with every tail."""
    from etune.kernels import gemm_tma

    (a, b), want = hopper_tma.check_arguments(name)
    assert a.shape == hopper_tma.GEMM_CHECK_SHAPE[::2] and b.shape == hopper_tma.GEMM_CHECK_SHAPE[:0:-1]
    exact = (a.astype(np.float64) @ b.astype(np.float64))
    assert np.abs(exact).max() < 2048 and np.array_equal(want, exact)  # exact in fp16 too: nothing to round
    cluster = int(name[-1])
    out = gemm_tma.emulate(a, b, *hopper_tma.GEMM_CHECK_TILE, cluster=cluster)
    assert compare(want, out)["passed"]
    assert not compare(want, gemm_tma.emulate(a, b[:, ::-1].copy(), *hopper_tma.GEMM_CHECK_TILE, cluster))["passed"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    candidates = hopper_tma.check_candidates()
    results = Builder(gpu_spec("h200"), workdir=tmp_path_factory.mktemp("tma"), jobs=2).build(candidates)
    return {c.structural_hash.removeprefix("tma_"): r for c, r in zip(candidates, results)}


def test_every_check_builds_for_sm_90a(built, tmp_path):
    """The TMA load (with the swizzle asked for), the multicast with its cluster launch, and the
    ring's setmaxnreg honoured by ptxas (it ignores it without __launch_bounds__(256, 1))."""
    assert set(built) == set(hopper_tma.CHECKS)
    sources = {}
    for name, result in built.items():
        assert result.ok, (name, result.error)
        assert all(k.spill_store_bytes == 0 for k in result.kernels), name
        sources[name] = next(Path(result.artifact_dir).glob("*.cu")).read_text()
        assert "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes" in sources[name]
        assert "const __grid_constant__ CUtensorMap A_map" in sources[name]
    for name in ("multicast", "ring"):
        assert ".multicast::cluster" in sources[name] and "%cluster_ctarank" in sources[name]
    assert "__launch_bounds__(256, 1)" in sources["ring"]
    # K-major operands with the 128-byte swizzle: LBO 1 (unused), SBO 1024 B >> 4, CUtensorMapSwizzle 3;
    # the four k16 steps 32 bytes (16 halves) apart in A's tile and in W's, 8 KiB further
    assert "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16" in sources["wgmma_swizzle128"]
    starts = re.findall(r"ptx_wgmma_encode_matrix_descriptor\(\(&\(Desc[AB]_ptr\[0\]\)\), \(&\(Ts_ptr\[(\d+)\]\)\), 1, 64, 3\);",
                        sources["wgmma_swizzle128"])
    assert sorted(map(int, starts)) == [0, 16, 32, 48, 4096, 4112, 4128, 4144]
    # the MN-major B (a GEMM's row-major B): LBO 8 KiB between 64-column chunks, SBO 1 KiB, k16 steps 2 KiB
    mn = sources["wgmma_mn_major_swizzle128"]
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16" in mn
    starts = re.findall(r"ptx_wgmma_encode_matrix_descriptor\(\(&\(DescB_ptr\[0\]\)\), \(&\(Ts_ptr\[(\d+)\]\)\), 512, 64, 3\);",
                        mn)
    assert sorted(map(int, starts)) == [4096, 5120, 6144, 7168]
    cuda = next(Path(built["ring"].artifact_dir).glob("*.cu"))
    report = subprocess.run([find_nvcc(), "-arch=sm_90a", "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"),
                             str(cuda)], check=True, capture_output=True, text=True).stderr
    assert "C7508" not in report and "ignored" not in report, report
    assert "232 registers" in report  # the consumer's setmaxnreg.inc sets the kernel's register count


@pytest.mark.gpu
def test_checks_pass_on_gpu(built):
    for name, result in built.items():
        assert hopper_tma.run_check(name, result.library)["passed"], name


@pytest.mark.parametrize("b_k_major", [True, False])
def test_the_wgmma_checks_descriptors_read_what_tma_wrote(b_k_major):
    """On the ISA's semantics (the 128-byte swizzle of TMA and of the descriptors, CUTLASS's
    canonical layouts), the kernel's descriptors name exactly the A and B tiles its TMA boxes hold;
    with LBO and SBO swapped they do not (so the emulation can tell)."""
    a = check_input()
    name = "wgmma_swizzle128" if b_k_major else "wgmma_mn_major_swizzle128"
    assert np.array_equal(hopper_tma.emulate_wgmma_check(a, b_k_major), expected(name, a))
    n, boxes, (lbo, sbo, step) = hopper_tma.wgmma_b_operand(b_k_major)
    if not b_k_major:
        swapped = hopper_tma.emulate_wgmma_check(a, b_k_major, (n, boxes, (sbo, lbo, step)))
        assert not np.array_equal(swapped, expected(name, a))
    wrong_step = hopper_tma.emulate_wgmma_check(a, b_k_major, (n, boxes, (lbo, sbo, step // 2)))
    assert not np.array_equal(wrong_step, expected(name, a))
