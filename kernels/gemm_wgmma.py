"""Hopper GEMM at thread level: ``wgmma.mma_async`` (sm_90a) with A and B read from shared memory
through matrix descriptors and the fp32 accumulators in registers.

A block of ``warpgroups`` x 128 threads computes a BM x BN tile of C; warpgroup g owns the rows
``g * 64 * MT`` .. of the tile, MT m64 tiles of 64 x BN each, every one a single
``wgmma.mma_async.sync.aligned.m64n{BN}k16.f32.f16.f16`` per k16 step. Per k step of BK = 64, the A
tile (BM x 64) and the B tile (64 x BN) arrive in shared memory by cp.async, ``stages - 1`` steps
ahead, each 16-byte chunk straight into the descriptor layout below (no swizzle). fp16 in and out,
fp32 accumulation, N and K multiples of 8 (16-byte rows), rows past M and the K tail zero-filled by
the predicated cp.async and not stored: the same contract as ``gemm_mma``.

Shared-memory operands (PTX ISA 8.x, 9.7.15.5.1 "Register Fragments and Shared Memory Matrix
Layouts" of wgmma; in the 9.x numbering 9.7.17.5.1), no swizzle ("interleaved"):

- A *core matrix* is 8 rows of 16 bytes stored contiguously (128 bytes): for a K-major operand a
  row is one m (or n) and 8 consecutive k; for an MN-major operand a row is one k and 8 consecutive
  m (or n).
- The 64-bit matrix descriptor (ISA "Matrix Descriptor Format") holds: bits 0-13 the start address
  >> 4, bits 16-29 the *leading dimension byte offset* (LBO) >> 4, bits 32-45 the *stride dimension
  byte offset* (SBO) >> 4, bits 49-51 the base offset (0 here; swizzled layouts only), bits 62-63
  the swizzle mode (0: none). For the no-swizzle layouts LBO is the distance in bytes between two
  core matrices adjacent in K and SBO between two adjacent in M (A) or N (B) -- for both the K-major
  and the MN-major operand (the ISA's definition; CUTLASS's canonical layouts say the same:
  K-major ``((8,m),(T,2)):((1T,SBO),(1,LBO))``, MN-major ``((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))``).
- A is K-major (row-major M x K: ``imm-trans-a`` 0); B is row-major K x N, i.e. MN-major
  (``imm-trans-b`` 1).

So element (m, k) of the 64 x 16 A operand of one wgmma is read at byte
``start + (m // 8) * SBO + (k // 8) * LBO + (m % 8) * 16 + (k % 8) * 2`` and element (k, n) of
the 16 x BN B operand at ``start + (n // 8) * SBO + (k // 8) * LBO + (k % 8) * 16 + (n % 8) * 2``
(``emulate_descriptor_read``). TVM 0.27's ``T.cuda.wgmma.encode_matrix_descriptor(desc_ptr, addr,
ldo, sdo, swizzle)`` stores ``ldo`` and ``sdo`` into the 14-bit fields as given (it shifts only the
address), so the template passes LBO >> 4 and SBO >> 4.

The stage layout here: A chunk c (16 bytes, ``a_chunk``) is row ``c // 64 * 8 + c % 8`` and k
``c // 8 % 8 * 8`` of the tile, at element ``c * 8`` of the stage; so the 8 core matrices of one
8-row group follow each other along K (LBO = 128 bytes) and 8-row groups are 1 KiB apart
(SBO = BK * 16 bytes). B chunk c (``b_chunk``) is k ``c // BN * 8 + c % 8`` and n
``c // 8 % (BN / 8) * 8``, at element ``c * 8``: core matrices adjacent in N are 128 bytes apart
(SBO), 8-k groups BN * 16 bytes (LBO). Eight consecutive threads fill one core matrix (no bank
conflicts on the copies) and read 16 bytes from each of 8 rows of global memory.

The accumulator (ISA "Matrix Fragments for wgmma.mma_async", D of m64nNk16 in fp32,
``acc_fragment``): thread t of the warpgroup holds N / 2 floats; element i is row
``16 * (t // 32) + t % 32 // 4 + 8 * (i // 2 % 2)``, column ``8 * (i // 4) + 2 * (t % 4) + i % 2``
-- warp w owns rows 16w .. 16w + 15, laid out as the mma.sync m16n8 C fragment repeated over N / 8.

Pipeline (``stages`` S >= 2): a prologue puts k steps 0 .. S - 2 on their way (one cp.async group
each); then per k step u: wait for this thread's copies of step u (``cp.async.wait_group S - 2``),
``fence.proxy.async.shared::cta`` (the copies are generic-proxy writes that wgmma, an async-proxy
read, must see), barrier, ``wgmma.fence``, the MT x 4 wgmmas of step u, ``wgmma.commit_group``, then the
copies of step u + S - 1 into the buffer step u - 1 used (every warpgroup waited for its wgmmas of
step u - 1 before the barrier), ``cp.async.commit_group`` and ``wgmma.wait_group 0``. The copies
overlap the tensor cores; wgmma groups do not overlap each other (one in flight). The wait is
unconditional in the loop: with the wait under a condition (the loop of gemm_mma's shape, prologue
inside), ptxas cannot prove the accumulators are settled and injects a ``warpgroup.wait`` (warning
C7517). TVM's thread-sync pass adds one more barrier after the commit (it sees the descriptors'
shared-memory reads and the copies' writes), which this pipeline does not need.

Needs ``-arch=sm_90a`` (nvcc refuses wgmma for sm_90); etune's builder picks it from the source
(``search_space.build.arch_for_source``). Not yet run on a GPU: the layouts are checked by
``emulate`` (NumPy, the ISA semantics above) and the build by nvcc/ptxas.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

BK = 64  # k per stage: four k16 wgmma steps
WG_THREADS = 128
# (BM, BN, warpgroups over M, m64 tiles per warpgroup); BN is the N of the wgmma instruction.
# 192x256 (three warpgroups, 168 registers a thread at most) reads 22 % less from L2 per flop than
# 128x256: the least of any tile whose accumulators fit one SM's registers.
TILES = ((128, 128, 2, 1), (128, 256, 2, 1), (64, 128, 1, 1), (64, 256, 1, 1), (128, 128, 1, 2), (256, 128, 2, 2),
         (192, 256, 3, 1))
STAGES = (2, 3, 4)
MIN_M = 64


# -- layouts (shared by the PrimFunc and the emulation) ------------------------------------------------
def a_chunk(c):
    """(row, k) of the first element of A chunk ``c`` (16 bytes, 8 fp16 along k), stored at element
    ``c * 8`` of the stage's A tile."""
    return c // (BK) * 8 + c % 8, c // 8 % (BK // 8) * 8


def b_chunk(c, bn):
    """(k, n) of the first element of B chunk ``c`` (8 fp16 along n), stored at element ``c * 8``
    of the stage's B tile."""
    return c // bn * 8 + c % 8, c // 8 % (bn // 8) * 8


def a_strides():
    """(LBO, SBO) of the A tile in bytes: core matrices adjacent in K, adjacent in M."""
    return 128, BK * 16


def b_strides(bn):
    """(LBO, SBO) of the B tile in bytes: core matrices adjacent in K, adjacent in N."""
    return bn * 16, 128


def a_operand_start(m_tile, kk):
    """Element offset in the stage's A tile of the 64 x 16 A operand of m64 tile ``m_tile``, k16
    step ``kk``."""
    lbo, sbo = a_strides()
    return (m_tile * 64 // 8 * sbo + kk * 2 * lbo) // 2


def b_operand_start(kk, bn):
    """Element offset in the stage's B tile of the 16 x BN B operand of k16 step ``kk``."""
    lbo, _ = b_strides(bn)
    return kk * 2 * lbo // 2


def acc_fragment(t, i):
    """(row, column) in the 64 x N tile of accumulator element ``i`` of warpgroup thread ``t``."""
    return 16 * (t // 32) + t % 32 // 4 + 8 * (i // 2 % 2), 8 * (i // 4) + 2 * (t % 4) + i % 2


@T.macro
def store_accumulators(C, Acc, row0, col0, wg, t, m_tiles, nacc):
    """A warpgroup's ``m_tiles`` m64 tiles of fp32 accumulators (``acc_fragment``) into C at (row0,
    col0) in C's dtype, rows past M and columns past N left out."""
    for m in T.unroll(m_tiles):
        for i in T.unroll(nacc):
            if tvm.tirx.all(row0 + (wg * m_tiles + m) * 64 + acc_fragment(t, i)[0] < C.shape[0],
                            col0 + acc_fragment(t, i)[1] < C.shape[1]):
                C[row0 + (wg * m_tiles + m) * 64 + acc_fragment(t, i)[0], col0 + acc_fragment(t, i)[1]] = T.Cast(
                    C.dtype, Acc[m * nacc + i])


def emulate_store(out: np.ndarray, acc: np.ndarray, row0: int, col0: int) -> None:
    """``store_accumulators`` in NumPy: every warpgroup's accumulators ``acc`` (warpgroups, m64 tiles,
    128 threads, N / 2) into ``out`` where the template thinks they are, with its guards."""
    t, i = np.arange(WG_THREADS)[:, None], np.arange(acc.shape[3])[None, :]
    f_rows, f_cols = acc_fragment(t, i)
    for g in range(acc.shape[0]):
        for m in range(acc.shape[1]):
            r = row0 + (g * acc.shape[1] + m) * 64 + f_rows
            col = col0 + f_cols
            keep = (r < out.shape[0]) & (col < out.shape[1])
            out[r[keep], col[keep]] = acc[g, m][keep].astype(out.dtype)


def applies(workload) -> bool:
    p = workload.params
    return (workload.family == "gemm" and p.get("dtype") == "float16" and p.get("accumulate") == "float32"
            and int(p["N"]) % 8 == 0 and int(p["K"]) % 8 == 0 and int(p["M"]) >= MIN_M)


def offered_on(gpu) -> bool:
    """wgmma exists on sm_90 (built for sm_90a) only."""
    return gpu is not None and gpu.arch.rstrip("a") == "sm_90"


def shared_bytes(bm: int, bn: int, stages: int) -> int:
    return stages * (bm + bn) * BK * 2


def fitting_tiles(tiles, M: int, N: int) -> list:
    """The (BM, BN, ...) tiles no larger than the problem rounded up to 64 rows and 64 columns (at
    least 64 rows and 128 columns)."""
    return [t for t in tiles if t[0] <= max(64, -(-M // 64) * 64) and t[1] <= max(128, -(-N // 64) * 64)]


def configs(M: int, N: int) -> list[tuple[int, int, int, int, int]]:
    """(BM, BN, warpgroups, m64 tiles per warpgroup, stages) offered: ``fitting_tiles`` (one at least)."""
    return [(*t, s) for t in (fitting_tiles(TILES, M, N) or [TILES[2]]) for s in STAGES]


def gemm_wgmma_funcs(workload, gpu=None) -> dict:
    """{name: PrimFunc} of the templates for ``workload`` on ``gpu`` (sm_90 only) whose shared memory
    fits."""
    if not applies(workload) or not offered_on(gpu):
        return {}
    p = workload.params
    return {f"gemm_wgmma_{bm}x{bn}_g{g}x{mt}_s{s}": gemm_wgmma(p["M"], p["N"], p["K"], bm, bn, g, mt, s)
            for bm, bn, g, mt, s in configs(p["M"], p["N"])
            if shared_bytes(bm, bn, s) <= gpu.max_shared_memory_per_block}


def gemm_wgmma(M: int, N: int, K: int, bm: int = 128, bn: int = 128, warpgroups: int = 2, m_tiles: int = 1,
               stages: int = 3, dtype: str = "float16"):
    G, MT, ST = int(warpgroups), int(m_tiles), int(stages)
    if bm != 64 * G * MT:
        raise ValueError(f"BM {bm} must be 64 x warpgroups x m tiles ({G} x {MT})")
    if bn % 8 or not 8 <= bn <= 256:
        raise ValueError(f"BN {bn}: wgmma's N is a multiple of 8 up to 256")
    if ST < 2:
        raise ValueError("at least two stages")
    THREADS = WG_THREADS * G
    NACC = bn // 2  # fp32 accumulators per thread and m64 tile
    A_STAGE, B_STAGE = bm * BK, BK * bn  # elements
    A_CHUNKS, B_CHUNKS = A_STAGE // 8, B_STAGE // 8
    KT = -(-K // BK)
    GM, GN = -(-M // bm), -(-N // bn)
    A_LBO, A_SBO = a_strides()
    B_LBO, B_SBO = b_strides(bn)
    shape = f"m64n{bn}k16"
    wgmma = getattr(T.ptx.wgmma.mma_async.sync.aligned, shape).f32.f16.f16

    @T.macro
    def copy_step(As, Bs, A, B, u, row0, col0, tx):
        """cp.async of k step ``u`` into buffer u % ST: rows past M and k past K zero-filled."""
        for rnd in T.serial(-(-A_CHUNKS // THREADS)):
            with T.attr("default", "async_scope", 1):
                for v in T.vectorized(8):
                    if rnd * THREADS + tx < A_CHUNKS:
                        As[u % ST * A_STAGE + (rnd * THREADS + tx) * 8 + v] = T.if_then_else(
                            tvm.tirx.all(row0 + a_chunk(rnd * THREADS + tx)[0] < M,
                                         u * BK + a_chunk(rnd * THREADS + tx)[1] < K),
                            A[T.min(row0 + a_chunk(rnd * THREADS + tx)[0], M - 1),
                              T.min(u * BK + a_chunk(rnd * THREADS + tx)[1], K - 8) + v],
                            T.Cast(dtype, 0))
        for rnd in T.serial(-(-B_CHUNKS // THREADS)):
            with T.attr("default", "async_scope", 1):
                for v in T.vectorized(8):
                    if rnd * THREADS + tx < B_CHUNKS:
                        Bs[u % ST * B_STAGE + (rnd * THREADS + tx) * 8 + v] = T.if_then_else(
                            tvm.tirx.all(u * BK + b_chunk(rnd * THREADS + tx, bn)[0] < K,
                                         col0 + b_chunk(rnd * THREADS + tx, bn)[1] < N),
                            B[T.min(u * BK + b_chunk(rnd * THREADS + tx, bn)[0], K - 1),
                              T.min(col0 + b_chunk(rnd * THREADS + tx, bn)[1], N - 8) + v],
                            T.Cast(dtype, 0))

    @T.prim_func(s_tir=True)
    def main(A: T.Buffer((M, K), dtype), B: T.Buffer((K, N), dtype), C: T.Buffer((M, N), dtype)):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        bx = T.env_thread("blockIdx.x")
        tx = T.env_thread("threadIdx.x")
        T.launch_thread(bx, GM * GN)
        T.launch_thread(tx, THREADS)
        with T.sblock():
            As = T.sblock_alloc_buffer((ST * A_STAGE,), dtype, scope="shared.dyn")
            Bs = T.sblock_alloc_buffer((ST * B_STAGE,), dtype, scope="shared.dyn")
            Acc = T.sblock_alloc_buffer((MT * NACC,), "float32", scope="local")
            DescA = T.sblock_alloc_buffer((1,), "uint64", scope="local")
            DescB = T.sblock_alloc_buffer((1,), "uint64", scope="local")
            row0 = T.meta_var(bx // GN * bm)
            col0 = T.meta_var(bx % GN * bn)
            wg = T.meta_var(tx // WG_THREADS)
            t = T.meta_var(tx % WG_THREADS)
            for i in T.unroll(MT * NACC):
                Acc[i] = T.float32(0)
            for u in T.serial(ST - 1):  # the first ST - 1 k steps on their way (a group each)
                if u < KT:
                    copy_step(As, Bs, A, B, u, row0, col0, tx)
                T.ptx.cp.async_.commit_group()
            for v in T.serial(KT):
                # step v: this thread's copies done, made visible to the async proxy, then everyone's
                T.ptx.cp.async_.wait_group(ST - 2)
                T.ptx.fence.proxy.async_.shared__cta()
                T.tvm_storage_sync("shared")
                T.ptx.wgmma.fence.sync.aligned()
                for kk in T.unroll(BK // 16):
                    T.cuda.wgmma.encode_matrix_descriptor(
                        T.address_of(DescB[0]), Bs.access_ptr("r", offset=v % ST * B_STAGE + b_operand_start(kk, bn)),
                        B_LBO // 16, B_SBO // 16, 0)
                    for m in T.unroll(MT):
                        T.cuda.wgmma.encode_matrix_descriptor(
                            T.address_of(DescA[0]),
                            As.access_ptr("r", offset=v % ST * A_STAGE + a_operand_start(wg * MT + m, kk)),
                            A_LBO // 16, A_SBO // 16, 0)
                        wgmma(*[Acc[m * NACC + i] for i in range(NACC)], DescA[0], DescB[0], True, 1, 1, 0, 1)
                T.ptx.wgmma.commit_group.sync.aligned()
                # step v + ST - 1 into the buffer of step v - 1, whose wgmmas every warpgroup waited
                # for before the barrier above
                if v + ST - 1 < KT:
                    copy_step(As, Bs, A, B, v + ST - 1, row0, col0, tx)
                T.ptx.cp.async_.commit_group()
                T.ptx.wgmma.wait_group.sync.aligned(0)
            T.ptx.cp.async_.wait_group(0)
            store_accumulators(C, Acc, row0, col0, wg, t, MT, NACC)

    return main


# -- NumPy emulation ------------------------------------------------------------------------------------
def emulate_descriptor_read(stage: np.ndarray, start: int, lbo: int, sbo: int, rows: int, k_major: bool) -> np.ndarray:
    """The operand a no-swizzle matrix descriptor names, by the ISA's definition (module docstring):
    ``stage`` the fp16 shared-memory tile, ``start`` the start in elements, ``lbo``/``sbo`` the
    descriptor's fields (bytes >> 4). K-major: a ``rows`` x 16 (m, k) operand; MN-major: 16 x ``rows``
    (k, n)."""
    lbo_b, sbo_b = lbo * 16, sbo * 16
    r = np.arange(rows)[:, None]
    k = np.arange(16)[None, :]
    if k_major:
        byte = start * 2 + r // 8 * sbo_b + k // 8 * lbo_b + r % 8 * 16 + k % 8 * 2
        return np.take(stage, byte // 2, mode="clip")
    byte = start * 2 + r // 8 * sbo_b + k // 8 * lbo_b + k % 8 * 16 + r % 8 * 2
    return np.take(stage, byte // 2, mode="clip").T


def isa_accumulator(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns), each (128, n / 2), of the m64nNk16 fp32 accumulator registers as the PTX ISA
    draws them ("Matrix Fragments for wgmma.mma_async", WGMMA .m64nNk16 register fragment layout
    for accumulator matrix D): warp w of the warpgroup holds rows 16w .. 16w + 15; in each n8 slice
    j, lane l holds d[4j], d[4j + 1] at row 16w + l / 4, columns 8j + 2 (l % 4) and + 1, and d[4j + 2],
    d[4j + 3] eight rows below. Written out separately from ``acc_fragment`` (the template's
    indexing), so that the emulation checks one against the other."""
    rows = np.empty((WG_THREADS, n // 2), int)
    cols = np.empty((WG_THREADS, n // 2), int)
    for thread in range(WG_THREADS):
        warp, lane = divmod(thread, 32)
        for j in range(n // 8):
            for reg, (dr, dc) in enumerate(((0, 0), (0, 1), (8, 0), (8, 1))):
                rows[thread, 4 * j + reg] = 16 * warp + lane // 4 + dr
                cols[thread, 4 * j + reg] = 8 * j + 2 * (lane % 4) + dc
    return rows, cols


def emulate(a: np.ndarray, b: np.ndarray, bm: int = 128, bn: int = 128, warpgroups: int = 2,
            m_tiles: int = 1) -> np.ndarray:
    """``gemm_wgmma``'s output computed as its warpgroups do: the copies by ``a_chunk``/``b_chunk``,
    each wgmma's operands read through its descriptor (``emulate_descriptor_read``, the ISA's
    definition), the products accumulated in fp32 per thread and register as the ISA lays them out
    (``isa_accumulator``), stored where the template thinks they are (``acc_fragment``) with its
    guards."""
    M, K = a.shape
    N = b.shape[1]
    G, MT = warpgroups, m_tiles
    assert bm == 64 * G * MT
    nacc = bn // 2
    a_lbo, a_sbo = (s // 16 for s in a_strides())
    b_lbo, b_sbo = (s // 16 for s in b_strides(bn))
    d_rows, d_cols = isa_accumulator(bn)
    out = np.zeros((M, N), a.dtype)
    for row0 in range(0, M, bm):
        for col0 in range(0, N, bn):
            acc = np.zeros((G, MT, WG_THREADS, nacc), np.float32)
            for k0 in range(0, K, BK):
                a_stage = np.zeros(bm * BK, a.dtype)
                for c in range(bm * BK // 8):
                    r, k = a_chunk(c)
                    if row0 + r < M and k0 + k < K:
                        a_stage[c * 8:c * 8 + 8] = a[row0 + r, k0 + k:k0 + k + 8]
                b_stage = np.zeros(BK * bn, b.dtype)
                for c in range(BK * bn // 8):
                    k, n = b_chunk(c, bn)
                    if k0 + k < K and col0 + n < N:
                        b_stage[c * 8:c * 8 + 8] = b[k0 + k, col0 + n:col0 + n + 8]
                for kk in range(BK // 16):
                    bop = emulate_descriptor_read(b_stage, b_operand_start(kk, bn), b_lbo, b_sbo, bn, False)
                    for g in range(G):
                        for m in range(MT):
                            aop = emulate_descriptor_read(a_stage, a_operand_start(g * MT + m, kk), a_lbo, a_sbo,
                                                          64, True)
                            d = aop.astype(np.float32) @ bop.astype(np.float32)
                            acc[g, m] += d[d_rows, d_cols]  # the hardware's fragment
            emulate_store(out, acc, row0, col0)
    return out
