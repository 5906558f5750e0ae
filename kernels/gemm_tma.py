"""Hopper GEMM with TMA loads: ``gemm_wgmma``'s warpgroups and accumulators, with the tiles brought in
by the Tensor Memory Accelerator (128-byte swizzle) instead of per-thread cp.async, and B multicast to
a cluster of blocks that share it.

Why: at 4096^3 ``gemm_wgmma``'s best tile (192x256) is limited by L2 bandwidth as much as by the
tensor cores (docs/sim_results.md): every block reads its own copy of the A and B tiles. With a
cluster of ``cluster`` blocks stacked along M (the same columns, consecutive row tiles), each block
loads its A tile and 1 / ``cluster`` of the B tile with ``.multicast::cluster``, which writes that
part into the shared memory of every block of the cluster: B is read from L2 once per cluster. One
thread issues a whole stage (one A box, BN / 64 B boxes), so the copies cost no thread instructions.

Layouts (what ``kernels/hopper_tma``'s checks exercise, and CUTLASS's canonical 128B-swizzle layouts;
``hopper_tma.descriptor_operand``):

- A (row-major M x K, K-major for wgmma): one TMA box of 64 k (128 bytes) x BM rows per stage. The
  operand of m64 tile m and k16 step kk starts at byte ``m * 64 * 128 + kk * 32`` of the stage's A
  tile; SBO 1 KiB between 8-row groups, LBO unused (1).
- B (row-major K x N, MN-major): BN / 64 boxes of 64 n (128 bytes) x 64 k, 8 KiB apart. The operand
  of k16 step kk starts at byte ``kk * 2048``; LBO 8 KiB between 64-column chunks, SBO 1 KiB between
  8-row groups of k.

Every box starts at a multiple of 1 KiB (the swizzle's period). TMA fills what lies outside the
matrices with zeros and still counts the whole box's bytes, so the M, N and K tails need no
predicates; rows past M and columns past N are not stored. N and K are multiples of 8 (a tensor map's
global strides are multiples of 16 bytes).

Pipeline (``stages`` S): per stage s a *full* mbarrier (one arrival, by the local issuing thread with
the stage's byte count, which the copies complete) and an *empty* one (one arrival per block of the
cluster). Thread 0 starts steps 0 .. S - 1. In step v every thread waits on full[v % S] with parity
``v // S % 2``, the warpgroups run their wgmmas on the stage and wait for them, the block
synchronises, and thread 0 tells every block of the cluster that its copy of the stage is free
(a remote ``mbarrier.arrive.release.cluster``). Before it loads step v + S into the stage, thread 0
waits until every block has freed it (empty[v % S], parity ``v // S % 2``): a multicast writes into
the peers' shared memory too. The thread that waits is also a consumer (no warp specialisation), so
a late peer delays its warpgroup; the blocks of a cluster run side by side, so the wait is short.
A cluster barrier after the barriers' initialisation (a peer's multicast may signal them) and one
before exit (no block leaves while a peer may still signal it) close the kernel.

Not yet run on a GPU: the layouts and the index arithmetic are checked by ``emulate`` (NumPy, through
hopper_tma's model of the swizzle and the descriptors) and the build by nvcc/ptxas; whether the GPU
does what that model says is what the device check's ``tma`` phase asks first.
"""
from __future__ import annotations

import numpy as np

from . import gemm_wgmma
from .gemm_wgmma import WG_THREADS, fitting_tiles, isa_accumulator, store_accumulators
from .hopper_tma import (A_K_STEP, A_LBO, A_SBO, SWIZZLE_128B, TMA_LOAD, TMA_LOAD_MULTICAST, descriptor_operand,
                         tma_place, wgmma_b_operand)

BK = 64  # k per stage: 128 bytes of fp16, the 128-byte swizzle's row
BOX_N = 64  # B's boxes: 64 columns (128 bytes) x BK rows
BOX_BYTES = BOX_N * BK * 2
SWIZZLE_ROW_BYTES = 128
# The descriptors' strides and k16 steps in bytes are those hopper_tma's wgmma checks run on a GPU: A
# K-major (SBO 1 KiB, LBO unused, 32-byte k16 steps), B MN-major in 64-column boxes of BK rows (LBO
# one box, SBO 1 KiB, 2 KiB k16 steps).
B_LBO, B_SBO, B_K_STEP = wgmma_b_operand(b_k_major=False)[2]
assert B_LBO == BOX_BYTES  # the checks' boxes are this template's B boxes
# (BM, BN, warpgroups over M, m64 tiles per warpgroup): gemm_wgmma's tiles with BN a multiple of 64.
TILES = ((128, 128, 2, 1), (128, 256, 2, 1), (192, 256, 3, 1), (256, 128, 2, 2))
# Stages of k 64 in flight: 4 fit every tile (at most 224 KiB); 3 scored the same on sim at every tile
# and shape, and each template offered costs the tuner a trial and the device check's survey a measurement.
STAGES = (4,)
CLUSTERS = (1, 2, 4)  # blocks along M sharing each B tile
# Attribute wrapped around each TMA load: the bytes it reads from global memory, for
# search_space.analysis (the load itself is an opaque call whose box size lives in the host's tensor map).
TMA_BYTES_ATTR = "etune_tma_load_bytes"


def stage_elements(bm: int, bn: int) -> int:
    return (bm + bn) * BK


def shared_bytes(bm: int, bn: int, stages: int) -> int:
    return stages * stage_elements(bm, bn) * 2


def a_operand_byte(m_tile: int, kk: int) -> int:
    """Byte offset in the stage's A tile of the 64 x 16 operand of m64 tile ``m_tile``, k16 step ``kk``."""
    return m_tile * 64 * SWIZZLE_ROW_BYTES + kk * A_K_STEP


def b_boxes_of(rank: int, bn: int, cluster: int) -> range:
    """The B boxes (64-column chunks of the tile) the block of cluster rank ``rank`` loads, for every
    block of its cluster."""
    per_block = bn // BOX_N // cluster
    return range(rank * per_block, (rank + 1) * per_block)


def tile_origin(bx, rank, grid_n: int, cluster: int, bm: int, bn: int):
    """(first row, first column) of block ``bx``'s tile: clusters of consecutive blocks take consecutive
    row tiles of one column of tiles."""
    group = bx // cluster
    return (group // grid_n * cluster + rank) * bm, group % grid_n * bn


def grid(M: int, N: int, bm: int, bn: int, cluster: int) -> tuple[int, int]:
    """(blocks, column tiles): row tiles rounded up to whole clusters (a block past M loads zeros)."""
    row_tiles = -(-M // bm)
    grid_m = -(-row_tiles // cluster) * cluster
    grid_n = -(-N // bn)
    return grid_m * grid_n, grid_n


def configs(M: int, N: int) -> list[tuple[int, int, int, int, int, int]]:
    """(BM, BN, warpgroups, m64 tiles per warpgroup, stages, cluster) offered: ``fitting_tiles``;
    clusters that split the B boxes evenly, where there are row tiles to share them."""
    return [(*t, s, c) for t in fitting_tiles(TILES, M, N) for s in STAGES for c in CLUSTERS
            if t[1] // BOX_N % c == 0 and (c == 1 or -(-M // t[0]) >= c)]


def gemm_tma_funcs(workload, gpu=None) -> dict:
    """{name: PrimFunc} of the TMA templates for ``workload`` on ``gpu`` (sm_90 only) whose shared
    memory fits; the ``gemm_wgmma`` rule set offers them beside its cp.async templates."""
    if not gemm_wgmma.applies(workload) or not gemm_wgmma.offered_on(gpu):
        return {}
    p = workload.params
    return {f"gemm_tma_{bm}x{bn}_g{g}x{mt}_s{s}_c{c}": gemm_tma(p["M"], p["N"], p["K"], bm, bn, g, mt, s, c)
            for bm, bn, g, mt, s, c in configs(p["M"], p["N"])
            if shared_bytes(bm, bn, s) <= gpu.max_shared_memory_per_block}


def gemm_tma(M: int, N: int, K: int, bm: int = 128, bn: int = 256, warpgroups: int = 2, m_tiles: int = 1,
             stages: int = 4, cluster: int = 2, dtype: str = "float16"):
    from tvm.script import tirx as T

    G, MT, ST, CL = int(warpgroups), int(m_tiles), int(stages), int(cluster)
    if bm != 64 * G * MT or bm > 256:
        raise ValueError(f"BM {bm} must be 64 x warpgroups x m tiles ({G} x {MT}), at most 256 (a TMA box)")
    if bn % BOX_N or not BOX_N <= bn <= 256:
        raise ValueError(f"BN {bn}: a multiple of {BOX_N} up to 256")
    if CL < 1 or (bn // BOX_N) % CL:
        raise ValueError(f"the {bn // BOX_N} B boxes of a tile do not split over a cluster of {CL}")
    if ST < 2:
        raise ValueError("at least two stages")
    if N % 8 or K % 8:
        raise ValueError("N and K must be multiples of 8 (16-byte tensor-map strides)")
    THREADS = WG_THREADS * G
    NACC = bn // 2
    STAGE = stage_elements(bm, bn)
    A_TILE = bm * BK
    A_BYTES = A_TILE * 2
    STAGE_BYTES = STAGE * 2
    KT = -(-K // BK)
    BLOCKS, GN = grid(M, N, bm, bn, CL)
    B_PER_BLOCK = bn // BOX_N // CL
    PROLOGUE = min(ST, KT)  # steps on their way before the loop
    wgmma = getattr(T.ptx.wgmma.mma_async.sync.aligned, f"m64n{bn}k16").f32.f16.f16
    b_load = TMA_LOAD_MULTICAST if CL > 1 else TMA_LOAD
    b_mask = [T.uint16((1 << CL) - 1)] if CL > 1 else []

    @T.macro
    def load_step(Ts, Full, A_map, B_map, u, row0, col0, rank):
        """Step ``u``'s A box and this block's share of its B boxes into stage u % ST (thread 0)."""
        T.ptx.mbarrier.arrive.expect_tx.shared.b64(T.address_of(Full[u % ST]), T.uint32(STAGE_BYTES))
        with T.attr("default", TMA_BYTES_ATTR, A_BYTES):
            T.ptx[TMA_LOAD](T.address_of(Ts[u % ST * STAGE]), T.address_of(A_map), u * BK, row0,
                            T.address_of(Full[u % ST]))
        for j in T.unroll(B_PER_BLOCK):
            with T.attr("default", TMA_BYTES_ATTR, BOX_BYTES):
                T.ptx[b_load](T.address_of(Ts[u % ST * STAGE + A_TILE + (rank * B_PER_BLOCK + j) * BOX_N * BK]),
                              T.address_of(B_map), col0 + (rank * B_PER_BLOCK + j) * BOX_N, u * BK,
                              T.address_of(Full[u % ST]), *b_mask)

    @T.prim_func(s_tir=True)
    def main(A: T.Buffer((M, K), dtype), B: T.Buffer((K, N), dtype), C: T.Buffer((M, N), dtype)):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        A_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        T.call_packed("runtime.cuTensorMapEncodeTiled", A_map, dtype, 2, A.data, K, M, K * 2, BK, bm, 1, 1, 0,
                      SWIZZLE_128B, 0, 0)
        B_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        T.call_packed("runtime.cuTensorMapEncodeTiled", B_map, dtype, 2, B.data, N, K, N * 2, BOX_N, BK, 1, 1, 0,
                      SWIZZLE_128B, 0, 0)
        rank = T.env_thread("clusterCtaIdx.x")
        bx = T.env_thread("blockIdx.x")
        tx = T.env_thread("threadIdx.x")
        T.launch_thread(rank, CL)
        T.launch_thread(bx, BLOCKS)
        T.launch_thread(tx, THREADS)
        with T.sblock():
            Ts = T.sblock_alloc_buffer((ST * STAGE,), dtype, scope="shared.dyn", align=1024)
            Full = T.sblock_alloc_buffer((ST,), "uint64", scope="shared", align=8)
            Empty = T.sblock_alloc_buffer((ST,), "uint64", scope="shared", align=8)
            Acc = T.sblock_alloc_buffer((MT * NACC,), "float32", scope="local")
            DescA = T.sblock_alloc_buffer((1,), "uint64", scope="local")
            DescB = T.sblock_alloc_buffer((1,), "uint64", scope="local")
            Remote = T.sblock_alloc_buffer((1,), "uint32", scope="local")
            row0 = T.meta_var(tile_origin(bx, rank, GN, CL, bm, bn)[0])
            col0 = T.meta_var(tile_origin(bx, rank, GN, CL, bm, bn)[1])
            wg = T.meta_var(tx // WG_THREADS)
            t = T.meta_var(tx % WG_THREADS)
            if tx == 0:
                for s in T.serial(ST):
                    T.ptx.mbarrier.init.shared.b64(T.address_of(Full[s]), T.uint32(1))
                    T.ptx.mbarrier.init.shared.b64(T.address_of(Empty[s]), T.uint32(CL))
                T.ptx.fence.mbarrier_init.release.cluster()
            T.cuda.cluster_sync()  # a peer's multicast may signal these barriers: initialised first
            for i in T.unroll(MT * NACC):
                Acc[i] = T.float32(0)
            if tx == 0:
                for u in T.serial(PROLOGUE):
                    load_step(Ts, Full, A_map, B_map, u, row0, col0, rank)
            for v in T.serial(KT):
                T.cuda.mbarrier_wait(T.address_of(Full[v % ST]), v // ST % 2)
                T.ptx.wgmma.fence.sync.aligned()
                for kk in T.unroll(BK // 16):
                    T.cuda.wgmma.encode_matrix_descriptor(
                        T.address_of(DescB[0]), Ts.access_ptr("r", offset=v % ST * STAGE + A_TILE + kk * B_K_STEP // 2),
                        B_LBO // 16, B_SBO // 16, SWIZZLE_128B)
                    for m in T.unroll(MT):
                        T.cuda.wgmma.encode_matrix_descriptor(
                            T.address_of(DescA[0]),
                            Ts.access_ptr("r", offset=v % ST * STAGE + a_operand_byte(wg * MT + m, kk) // 2),
                            A_LBO // 16, A_SBO // 16, SWIZZLE_128B)
                        wgmma(*[Acc[m * NACC + i] for i in range(NACC)], DescA[0], DescB[0], True, 1, 1, 0, 1)
                T.ptx.wgmma.commit_group.sync.aligned()
                T.ptx.wgmma.wait_group.sync.aligned(0)
                T.tvm_storage_sync("shared")  # every warpgroup is done with stage v % ST
                if tx == 0:
                    for r in T.serial(CL):  # free in every block of the cluster
                        T.ptx.mapa.shared__cluster.u32(
                            Remote[0], T.cuda.cvta_generic_to_shared(T.address_of(Empty[v % ST])), T.uint32(r))
                        T.ptx.mbarrier.arrive.release.cluster.shared__cluster.b64(Remote[0])
                    if v + ST < KT:
                        T.cuda.mbarrier_wait(T.address_of(Empty[v % ST]), v // ST % 2)
                        load_step(Ts, Full, A_map, B_map, v + ST, row0, col0, rank)
            store_accumulators(C, Acc, row0, col0, wg, t, MT, NACC)
            T.cuda.cluster_sync()  # no block leaves while a peer may still signal its barriers

    return main


# -- NumPy emulation ------------------------------------------------------------------------------------
def _box(matrix: np.ndarray, row: int, col: int, rows: int, cols: int) -> np.ndarray:
    """A TMA box: ``rows`` x ``cols`` of ``matrix`` from (row, col), zeros outside it."""
    out = np.zeros((rows, cols), matrix.dtype)
    part = matrix[row:row + rows, col:col + cols]
    out[:part.shape[0], :part.shape[1]] = part
    return out


def emulate(a: np.ndarray, b: np.ndarray, bm: int = 128, bn: int = 256, warpgroups: int = 2, m_tiles: int = 1,
            cluster: int = 2) -> np.ndarray:
    """``gemm_tma``'s output computed as its blocks do: each block's stage filled box by box where the
    template puts them (its own A box; every rank's B boxes, as the multicasts deliver them), with
    ``hopper_tma.tma_place``'s swizzle; every wgmma's operands read through the template's descriptors
    (``hopper_tma.descriptor_operand``); accumulators as the ISA lays them out, stored by
    ``acc_fragment`` with the template's guards."""
    M, K = a.shape
    N = b.shape[1]
    G, MT = warpgroups, m_tiles
    nacc = bn // 2
    blocks, grid_n = grid(M, N, bm, bn, cluster)
    d_rows, d_cols = isa_accumulator(bn)
    out = np.zeros((M, N), a.dtype)
    a_tile = bm * BK
    for bx in range(blocks):
        rank = bx % cluster
        row0, col0 = tile_origin(bx, rank, grid_n, cluster, bm, bn)
        acc = np.zeros((G, MT, WG_THREADS, nacc), np.float32)
        for k0 in range(0, K, BK):
            stage = np.zeros(stage_elements(bm, bn), a.dtype)
            tma_place(stage, 0, _box(a, row0, k0, bm, BK))
            for peer in range(cluster):  # the B boxes every rank multicasts to this block
                for box in b_boxes_of(peer, bn, cluster):
                    tma_place(stage, (a_tile + box * BOX_N * BK) * 2, _box(b, k0, col0 + box * BOX_N, BK, BOX_N))
            for kk in range(BK // 16):
                b_op = descriptor_operand(stage, a_tile * 2 + kk * B_K_STEP, B_LBO, B_SBO, bn, False)
                for g in range(G):
                    for m in range(MT):
                        a_op = descriptor_operand(stage, a_operand_byte(g * MT + m, kk), A_LBO, A_SBO, 64, True)
                        d = a_op.astype(np.float32) @ b_op.astype(np.float32)
                        acc[g, m] += d[d_rows, d_cols]
        gemm_wgmma.emulate_store(out, acc, row0, col0)
    return out
