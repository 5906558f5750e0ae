"""Tensor-core GEMM at thread level: mma.sync m16n8k16 with 64x64-class warp tiles in registers.

TVM 0.27's MetaSchedule reaches the tensor cores through wmma (fragments loaded from shared memory
for every 16x16x16 product) or its mma path (m16n8k8, M and N multiples of 32). Here, as in
CUTLASS's sm80 kernels: a block computes a BM x BN tile of C, its warps a (BM / WM) x (BN / WN) tile
each, with the accumulators in registers (m16n8 fp32 fragments, ``c_fragment``); per k step of 32,
A and B tiles arrive in shared memory by cp.async (``stages`` of them in flight) and each warp loads
its A fragments (``ldmatrix``) and B fragments (``ldmatrix.trans``: B is row-major, k x n) once and
uses each in every product of its tile: a 64 x 64 warp tile reads 8 KB of shared memory per 32 k
for 262k flops, half of what 32 x 32 wmma tiles read. Rows and columns past M and N and the K tail
are zero-filled by the predicated cp.async and not stored.

Template parameters (each template a design space of one point, rule set ``gemm_mma``): block tile,
warp grid and pipeline stages. fp16 in and out, fp32 accumulation; N and K multiples of 8 (16-byte
rows of A and B). For skinny GEMM (2 <= M <= 32, LLM decode shapes) ``gemm_mma_skinny``: a block
per 32 or 64 columns whose warps split K among them, one kernel (the ``splitk_tc`` family needs a
merge kernel and global partials).
"""
from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from .mma_fragments import c_fragment, copy_tile_async, emulate_ldmatrix, emulate_mma

BK = 32  # k per stage: two k16 chunks
PAD = 8  # fp16 elements (16 bytes) of padding per shared-memory row
# (BM, BN, warps over M, warps over N)
TILES = ((128, 128, 2, 2), (128, 256, 2, 4), (256, 128, 4, 2), (128, 128, 2, 4), (64, 128, 2, 2),
         (64, 64, 2, 2))
STAGES = (2, 3, 4)


def a_ldmatrix_address(lane, tile, chunk):
    """A tile (row-major, m x k): the A fragment of 16 rows (``tile``) x one k16 chunk."""
    return tile * 16 + lane % 16, chunk * 16 + lane // 16 * 8


def b_ldmatrix_address(lane, chunk, pair):
    """B tile (row-major, k x n; loaded with .trans): one k16 chunk x two n8 tiles (``pair``)."""
    return chunk * 16 + lane // 8 % 2 * 8 + lane % 8, pair * 16 + lane // 16 * 8


def tiled_applies(workload) -> bool:
    p = workload.params
    return (workload.family == "gemm" and p.get("dtype") == "float16" and p.get("accumulate") == "float32"
            and int(p["N"]) % 8 == 0 and int(p["K"]) % 8 == 0 and int(p["M"]) >= 32)


@T.macro
def warp_tile_products(Af, Bf, Acc, As, a_base, a_pitch, Bs, b_base, b_pitch, row_tiles, col_tiles, lane):
    """One k step of BK for a warp: the A fragments of its ``row_tiles`` m16 tiles (rows from
    element ``a_base`` of ``As``) and the B fragments of its ``col_tiles`` n8 tiles (columns from
    ``b_base`` of ``Bs``) by ldmatrix, then every product into the accumulators ``Acc``."""
    for c in T.unroll(BK // 16):
        for m in T.unroll(row_tiles):
            T.evaluate(T.ptx_legacy.ldmatrix(
                False, 4, ".b16", Af.data, m * 8, As.access_ptr("r"),
                a_base + a_ldmatrix_address(lane, m, c)[0] * a_pitch + a_ldmatrix_address(lane, m, c)[1],
                dtype="float16"))
        for p in T.unroll(col_tiles // 2):
            T.evaluate(T.ptx_legacy.ldmatrix(
                True, 4, ".b16", Bf.data, p * 8, Bs.access_ptr("r"),
                b_base + b_ldmatrix_address(lane, c, p)[0] * b_pitch + b_ldmatrix_address(lane, c, p)[1],
                dtype="float16"))
        for m in T.unroll(row_tiles):
            for n in T.unroll(col_tiles):
                T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", "fp16", "fp16", "fp32", Af.data, m * 8,
                                            Bf.data, n * 4, Acc.data, (m * col_tiles + n) * 4, False, dtype="float32"))


def shifted(address, *args, rows=0, cols=0):
    """``address`` of a warp's tile moved by (rows, cols) within the block's tile."""
    def moved(lane):
        row, col = address(lane, *args)
        return row + rows, col + cols
    return moved


def emulate_warp_tile_products(at: np.ndarray, bt: np.ndarray, row0: int, col0: int, acc: np.ndarray) -> None:
    """``warp_tile_products`` in NumPy on the (row tiles, column tiles, 32, 4) accumulators ``acc``:
    the warp's rows from ``row0`` of the A tile ``at``, its columns from ``col0`` of the B tile ``bt``."""
    row_tiles, col_tiles = acc.shape[:2]
    for c in range(BK // 16):
        af = [emulate_ldmatrix(at, shifted(a_ldmatrix_address, m, c, rows=row0), False) for m in range(row_tiles)]
        bf = [emulate_ldmatrix(bt, shifted(b_ldmatrix_address, c, p, cols=col0), True) for p in range(col_tiles // 2)]
        for m in range(row_tiles):
            for n in range(col_tiles):
                acc[m, n] = emulate_mma(af[m], bf[n // 2][:, n % 2 * 4:n % 2 * 4 + 4], acc[m, n])


def applies(workload) -> bool:
    """The block-tiled templates (M >= 32) or the skinny ones (2 <= M <= 32)."""
    return tiled_applies(workload) or skinny_applies(workload)


def shared_bytes(bm: int, bn: int, stages: int) -> int:
    return stages * (bm * (BK + PAD) + BK * (bn + PAD)) * 2


def configs(M: int, N: int) -> list[tuple[int, int, int, int, int]]:
    """(BM, BN, WM, WN, stages) offered: block tiles no larger than the problem rounded up to 64
    (one at least)."""
    fitting = [t for t in TILES if t[0] <= max(64, -(-M // 64) * 64) and t[1] <= max(64, -(-N // 64) * 64)]
    return [(*t, s) for t in (fitting or [TILES[-1]]) for s in STAGES]


def gemm_mma_funcs(workload, gpu=None) -> dict:
    """{name: PrimFunc} of the templates whose shared memory fits ``gpu`` (default 48 KiB): the
    block-tiled ones and the skinny ones, where each applies."""
    funcs = skinny_funcs(workload, gpu)
    if not tiled_applies(workload):
        return funcs
    p = workload.params
    max_shared = gpu.max_shared_memory_per_block if gpu is not None else 48 * 1024
    return {**{f"gemm_mma_{bm}x{bn}_w{wm}x{wn}_s{s}": gemm_mma(p["M"], p["N"], p["K"], bm, bn, wm, wn, s)
               for bm, bn, wm, wn, s in configs(p["M"], p["N"]) if shared_bytes(bm, bn, s) <= max_shared},
            **funcs}


def gemm_mma(M: int, N: int, K: int, bm: int = 128, bn: int = 128, wm: int = 2, wn: int = 2, stages: int = 3,
             dtype: str = "float16"):
    import tvm
    from tvm.script import tirx as T

    TM, TN = bm // wm, bn // wn  # warp tile
    if TM % 16 or TN % 16:
        raise ValueError(f"warp tile {TM} x {TN} must be multiples of 16")
    MT, NT = TM // 16, TN // 8  # m16 and n8 tiles per warp
    THREADS = 32 * wm * wn
    AP, BP = BK + PAD, bn + PAD
    KT = -(-K // BK)
    GM, GN = -(-M // bm), -(-N // bn)
    ST = int(stages)

    @T.prim_func(s_tir=True)
    def main(A: T.Buffer((M, K), dtype), B: T.Buffer((K, N), dtype), C: T.Buffer((M, N), dtype)):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        bx = T.env_thread("blockIdx.x")
        tx = T.env_thread("threadIdx.x")
        T.launch_thread(bx, GM * GN)
        T.launch_thread(tx, THREADS)
        with T.sblock():
            As = T.sblock_alloc_buffer((ST, bm, AP), dtype, scope="shared.dyn")
            Bs = T.sblock_alloc_buffer((ST, BK, BP), dtype, scope="shared.dyn")
            Af = T.sblock_alloc_buffer((MT * 8,), dtype, scope="local")
            Bf = T.sblock_alloc_buffer((NT * 4,), dtype, scope="local")
            Acc = T.sblock_alloc_buffer((MT * NT * 4,), "float32", scope="local")
            # Blocks along N first: consecutive blocks share their A rows (and B stays in L2).
            row0 = T.meta_var(bx // GN * bm)
            col0 = T.meta_var(bx % GN * bn)
            warp_row = T.meta_var(tx // 32 // wn * TM)
            warp_col = T.meta_var(tx // 32 % wn * TN)
            lane = T.meta_var(tx % 32)
            for i in T.unroll(MT * NT * 4):
                Acc[i] = T.float32(0)
            for u in T.serial(KT + ST - 1):
                if u < KT:
                    # k step u into buffer u % ST: A rows past M and k past K are zero-filled
                    copy_tile_async(As, u % ST, A, row0, u * BK, bm, BK, M, K, tx, THREADS)
                    copy_tile_async(Bs, u % ST, B, u * BK, col0, BK, bn, K, N, tx, THREADS)
                T.evaluate(T.ptx.cp.async_.commit_group())
                if u >= ST - 1:
                    T.evaluate(T.ptx.cp.async_.wait_group(ST - 1))
                    T.tvm_storage_sync("shared")
                    warp_tile_products(Af, Bf, Acc, As, ((u - (ST - 1)) % ST * bm + warp_row) * AP, AP,
                                       Bs, (u - (ST - 1)) % ST * BK * BP + warp_col, BP, MT, NT, lane)
                    T.tvm_storage_sync("shared")
            T.evaluate(T.ptx.cp.async_.wait_group(0))
            for m in T.unroll(MT):
                for n in T.unroll(NT):
                    for i in T.unroll(4):
                        if tvm.tirx.all(row0 + warp_row + m * 16 + c_fragment(lane, i)[0] < M,
                                        col0 + warp_col + n * 8 + c_fragment(lane, i)[1] < N):
                            C[row0 + warp_row + m * 16 + c_fragment(lane, i)[0],
                              col0 + warp_col + n * 8 + c_fragment(lane, i)[1]] = T.Cast(dtype, Acc[(m * NT + n) * 4 + i])

    return main


def emulate(a: np.ndarray, b: np.ndarray, bm: int = 64, bn: int = 64, wm: int = 2, wn: int = 2) -> np.ndarray:
    """``gemm_mma``'s output computed as its warps do (ldmatrix and mma semantics, fp32 accumulators)."""
    M, K = a.shape
    N = b.shape[1]
    TM, TN = bm // wm, bn // wn
    MT, NT = TM // 16, TN // 8
    c_rows, c_cols = c_fragment(np.arange(32)[:, None], np.arange(4)[None, :])
    out = np.zeros((M, N), a.dtype)
    for row0 in range(0, M, bm):
        for col0 in range(0, N, bn):
            for wr in range(wm):
                for wc in range(wn):
                    acc = np.zeros((MT, NT, 32, 4), np.float32)
                    for k0 in range(0, K, BK):
                        at = np.zeros((bm, BK + PAD), a.dtype)
                        bt = np.zeros((BK, bn + PAD), b.dtype)
                        rows, ks = slice(row0, min(row0 + bm, M)), slice(k0, min(k0 + BK, K))
                        at[:rows.stop - row0, :ks.stop - k0] = a[rows, ks]
                        bt[:ks.stop - k0, :min(col0 + bn, N) - col0] = b[ks, col0:min(col0 + bn, N)]
                        emulate_warp_tile_products(at, bt, wr * TM, wc * TN, acc)
                    for m in range(MT):
                        for n in range(NT):
                            r = row0 + wr * TM + m * 16 + c_rows
                            col = col0 + wc * TN + n * 8 + c_cols
                            keep = (r < M) & (col < N)
                            out[r[keep], col[keep]] = acc[m, n][keep].astype(a.dtype)
    return out


# -- skinny GEMM (2 <= M <= 32): K split across the warps of a block, one kernel --------------------
SKINNY_MAX_M = 32
SKINNY_TILES = ((32, 4), (32, 8), (64, 4), (64, 8))  # (BN, warps)
SKINNY_STAGES = (2, 3, 4)


def skinny_applies(workload) -> bool:
    p = workload.params
    return (workload.family == "gemm" and p.get("dtype") == "float16" and p.get("accumulate") == "float32"
            and 2 <= int(p["M"]) <= SKINNY_MAX_M and int(p["N"]) % 8 == 0 and int(p["K"]) % 8 == 0)


def skinny_shared_bytes(M: int, bn: int, warps: int, stages: int) -> int:
    mt = -(-M // 16)
    pipeline = warps * stages * (16 * mt * (BK + PAD) + BK * (bn + PAD)) * 2
    # The warps' partial tiles, summed at the end: TVM's merge of the shared.dyn buffers lets them
    # reuse the pipeline's bytes, which are dead by then.
    return max(pipeline, warps * 16 * mt * bn * 4)


def skinny_funcs(workload, gpu=None) -> dict:
    """{name: PrimFunc} of the skinny templates whose shared memory fits ``gpu`` (default 48 KiB)."""
    if not skinny_applies(workload):
        return {}
    p = workload.params
    max_shared = gpu.max_shared_memory_per_block if gpu is not None else 48 * 1024
    return {f"gemm_mma_skinny_n{bn}_w{w}_s{s}": gemm_mma_skinny(p["M"], p["N"], p["K"], bn, w, s)
            for bn, w in SKINNY_TILES for s in SKINNY_STAGES
            if skinny_shared_bytes(p["M"], bn, w, s) <= max_shared}


def gemm_mma_skinny(M: int, N: int, K: int, bn: int = 32, warps: int = 8, stages: int = 3, dtype: str = "float16"):
    """Skinny GEMM in one kernel: a block per ``bn`` columns; its warps take interleaved k steps of 32,
    each with its own cp.async pipeline of A (all M rows, zero-padded to 16s) and B tiles and its
    own accumulators; the warps' partial tiles are summed through shared memory and stored once. No
    second kernel and no global partials (the split-K families need both)."""
    import tvm
    from tvm.script import tirx as T

    MT = -(-M // 16)
    NT = bn // 8
    W, ST = int(warps), int(stages)
    THREADS = 32 * W
    AP, BP = BK + PAD, bn + PAD
    KT = -(-K // BK)
    STEPS = -(-KT // W)  # k steps per warp (the last ones of some warps past K: zero tiles)
    GN = -(-N // bn)

    @T.prim_func(s_tir=True)
    def main(A: T.Buffer((M, K), dtype), B: T.Buffer((K, N), dtype), C: T.Buffer((M, N), dtype)):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        bx = T.env_thread("blockIdx.x")
        tx = T.env_thread("threadIdx.x")
        T.launch_thread(bx, GN)
        T.launch_thread(tx, THREADS)
        with T.sblock():
            As = T.sblock_alloc_buffer((W * ST, 16 * MT, AP), dtype, scope="shared.dyn")  # [warp * ST + stage]
            Bs = T.sblock_alloc_buffer((W * ST, BK, BP), dtype, scope="shared.dyn")
            Part = T.sblock_alloc_buffer((W, 16 * MT, bn), "float32", scope="shared.dyn")
            Af = T.sblock_alloc_buffer((MT * 8,), dtype, scope="local")
            Bf = T.sblock_alloc_buffer((NT * 4,), dtype, scope="local")
            Acc = T.sblock_alloc_buffer((MT * NT * 4,), "float32", scope="local")
            Sum = T.sblock_alloc_buffer((1,), "float32", scope="local")
            col0 = T.meta_var(bx * bn)
            warp = T.meta_var(tx // 32)
            lane = T.meta_var(tx % 32)
            for i in T.unroll(MT * NT * 4):
                Acc[i] = T.float32(0)
            for u in T.serial(STEPS + ST - 1):
                if u < STEPS:
                    # the warp's k step u (global step u * W + warp) into its buffer u % ST
                    copy_tile_async(As, warp * ST + u % ST, A, 0, (u * W + warp) * BK, 16 * MT, BK, M, K, lane, 32)
                    copy_tile_async(Bs, warp * ST + u % ST, B, (u * W + warp) * BK, col0, BK, bn, K, N, lane, 32)
                T.evaluate(T.ptx.cp.async_.commit_group())
                if u >= ST - 1:
                    T.evaluate(T.ptx.cp.async_.wait_group(ST - 1))
                    T.tvm_storage_sync("warp")
                    warp_tile_products(Af, Bf, Acc, As, (warp * ST + (u - (ST - 1)) % ST) * 16 * MT * AP, AP,
                                       Bs, (warp * ST + (u - (ST - 1)) % ST) * BK * BP, BP, MT, NT, lane)
                    T.tvm_storage_sync("warp")
            T.evaluate(T.ptx.cp.async_.wait_group(0))
            for m in T.unroll(MT):
                for n in T.unroll(NT):
                    for i in T.unroll(4):
                        Part[warp, m * 16 + c_fragment(lane, i)[0], n * 8 + c_fragment(lane, i)[1]] = Acc[(m * NT + n) * 4 + i]
            T.tvm_storage_sync("shared")
            for e in T.serial(-(-(16 * MT * bn) // THREADS)):
                if tvm.tirx.all(e * THREADS + tx < 16 * MT * bn, (e * THREADS + tx) // bn < M,
                                col0 + (e * THREADS + tx) % bn < N):
                    Sum[0] = T.float32(0)
                    for w in T.serial(W):
                        Sum[0] = Sum[0] + Part[w, (e * THREADS + tx) // bn, (e * THREADS + tx) % bn]
                    C[(e * THREADS + tx) // bn, col0 + (e * THREADS + tx) % bn] = T.Cast(dtype, Sum[0])

    return main


def emulate_skinny(a: np.ndarray, b: np.ndarray, bn: int = 32, warps: int = 4) -> np.ndarray:
    """``gemm_mma_skinny``'s output computed as its warps do: interleaved k steps per warp, partial
    tiles summed in fp32 at the end."""
    M, K = a.shape
    N = b.shape[1]
    mt, nt = -(-M // 16), bn // 8
    kt = -(-K // BK)
    c_rows, c_cols = c_fragment(np.arange(32)[:, None], np.arange(4)[None, :])
    out = np.zeros((M, N), a.dtype)
    for col0 in range(0, N, bn):
        part = np.zeros((warps, 16 * mt, bn), np.float32)
        for w in range(warps):
            acc = np.zeros((mt, nt, 32, 4), np.float32)
            for step in range(w, kt, warps):
                k0 = step * BK
                at = np.zeros((16 * mt, BK + PAD), a.dtype)
                bt = np.zeros((BK, bn + PAD), b.dtype)
                ks = slice(k0, min(k0 + BK, K))
                at[:M, :ks.stop - k0] = a[:, ks]
                bt[:ks.stop - k0, :min(col0 + bn, N) - col0] = b[ks, col0:min(col0 + bn, N)]
                emulate_warp_tile_products(at, bt, 0, 0, acc)
            for m in range(mt):
                for n in range(nt):
                    part[w, m * 16 + c_rows, n * 8 + c_cols] = acc[m, n]
        total = part.sum(axis=0)
        width = min(col0 + bn, N) - col0
        out[:, col0:col0 + width] = total[:M, :width].astype(a.dtype)
    return out
