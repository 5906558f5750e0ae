"""FlashAttention-2 prefill at thread level: S, P and O stay in mma.sync register fragments.

The tensor-core prefill of kernels/attention_fused.py goes through wmma, whose fragments are opaque:
a thread cannot tell which rows it holds, so the scores go to shared memory for the softmax and the
P V tile goes there again to be rescaled row by row. MetaSchedule's mma intrinsics keep the
accumulator in a warp-level scope that only their store reads. This template is written where the
layout is known (PTX ISA, "Matrix fragments for mma.m16n8k16"), so that, as in FlashAttention-2:

- each warp owns 16 query rows; Q is held in registers as m16n8k16 A fragments for the whole kernel;
- per key tile, S = Q K^T lands in m16n8 fp32 accumulators, two rows per thread (``lane // 4`` and
  ``lane // 4 + 8``), so the row max and sum are the thread's own values reduced over its quad of
  four lanes (two shuffles);
- P is rounded to fp16 and re-packed, register to register, as the A fragment of P V: two adjacent
  n8 accumulator tiles are exactly one k16 A fragment;
- O is rescaled in registers and written once.

K and V go through shared memory (16-byte loads, rows padded by 16 bytes so ldmatrix's eight row
addresses fall in distinct banks) and into B fragments with ``ldmatrix`` (``.trans`` for V, which
is key-major). Template parameters: warps per block (the query tile is 16 rows per warp) and the
key tile. Arguments, shapes and masking are those of kernels/attention.py's workload (keys past
kv_len and, causal, past the bottom-right aligned diagonal get the lowest float as their score).

Fragment layouts are plain functions of the lane (kernels/mma_fragments.py and the ldmatrix addresses
here), shared by the PrimFunc and by ``emulate``, a NumPy run of the same algorithm lane by lane, which the tests compare with the
reference: the register-level data flow is checked on a machine without a GPU.
"""
from __future__ import annotations

import math

import numpy as np

from .mma_fragments import LANES, a_fragment, c_fragment, copy_tile_async, emulate_ldmatrix, emulate_mma, scatter

MMA_WARPS = (4, 8)
MMA_ROW_TILES = (1, 2)  # m16 row tiles per warp
MMA_KEY_TILES = (32, 64)
MMA_STAGES = (1, 2)  # K/V tiles in shared memory at once (cp.async: the next tile loads during this one)
MAX_QUERY_TILE = 256
ROW_PAD = 8  # fp16 elements (16 bytes) of padding per shared-memory row


# -- ldmatrix x4 row addresses: lane L gives the shared-memory row of matrix L // 8 -----------------
def q_ldmatrix_address(lane, tile, chunk):
    """Q tile (row-major): the A fragment of 16 rows (``tile``) x one k16 chunk of head_dim."""
    return tile * 16 + lane % 16, chunk * 16 + lane // 16 * 8


def k_ldmatrix_address(lane, pair, chunk):
    """K tile (key-major): two n8 key tiles (``pair``) x one k16 chunk of head_dim. Matrices: keys
    0-7 at d 0-7 and d 8-15 (B fragment of key tile 2 pair), then keys 8-15 (key tile 2 pair + 1)."""
    return pair * 16 + lane // 16 * 8 + lane % 8, chunk * 16 + lane // 8 % 2 * 8


def v_ldmatrix_address(lane, chunk, pair):
    """V tile (key-major, loaded with .trans): one k16 chunk of keys x two n8 tiles of head_dim."""
    return chunk * 16 + lane // 8 % 2 * 8 + lane % 8, pair * 16 + lane // 16 * 8


def p_fragment_index(tile, i):
    """Where element ``i`` of score tile ``tile`` (an m16n8 accumulator) goes in the P A fragments:
    tiles 2c and 2c + 1 are k16 chunk c, columns 0-7 and 8-15."""
    return tile // 2 * 8 + tile % 2 * 4 + i


def query_tile(warps: int, row_tiles: int = 1) -> int:
    return 16 * warps * row_tiles


def mma_prefill_configs(q_len: int, kv_len: int, head_dim: int) -> list[tuple[int, int, int, int]]:
    """(warps, row tiles, key tile, stages) of the templates offered: query tiles up to 256 rows
    and no longer than q_len rounded up to 64, key tiles no longer than kv_len rounded up to 32,
    and fragments that fit the registers (see ``fits_registers``). Two row tiles only with two
    stages: ptxas (CUDA 13) gives the single-stage form more registers (255 and 120 bytes of
    spills at head_dim 128 against 241 and none; 230 against 195 at 64)."""
    configs = []
    for warps in MMA_WARPS:
        for rows in MMA_ROW_TILES:
            tile = query_tile(warps, rows)
            if tile > MAX_QUERY_TILE or tile > max(64, -(-q_len // 64) * 64):
                continue
            for keys in MMA_KEY_TILES:
                if keys > max(32, -(-kv_len // 32) * 32) or not fits_registers(head_dim, rows, keys):
                    continue
                configs.extend((warps, rows, keys, stages) for stages in MMA_STAGES if rows == 1 or stages > 1)
    return configs


def fragment_registers(head_dim: int, row_tiles: int, key_tile: int) -> int:
    """32-bit registers of a thread's fragments: O and S (fp32), P (fp16), and Q when it stays in
    registers (one row tile)."""
    o = row_tiles * head_dim // 8 * 4
    s = row_tiles * key_tile // 8 * 4
    p = row_tiles * key_tile // 16 * 4
    q = head_dim // 16 * 4 if row_tiles == 1 else 4
    return o + s + p + q + 8


def fits_registers(head_dim: int, row_tiles: int, key_tile: int) -> bool:
    """Fragments within 200 of the 255 registers a thread may have (the rest: addresses, row
    statistics): beyond, ptxas spills the accumulators."""
    return fragment_registers(head_dim, row_tiles, key_tile) <= 200


def applies(workload) -> bool:
    """Attention prefill (q_len past the split-KV decode's) in fp16 with head_dim a multiple of 16,
    up to 256."""
    from .attention_fused import DECODE_MAX_Q

    p = workload.params
    return (workload.family == "attention" and p["q_len"] > DECODE_MAX_Q and p["dtype"] == "float16"
            and p["head_dim"] % 16 == 0 and p["head_dim"] <= 256)


def mma_prefill_funcs(workload, gpu=None) -> dict:
    """The templates that apply to ``workload``: {name: PrimFunc}, those whose shared memory fits
    ``gpu`` (a GpuSpec; default 48 KiB, what a block gets without the opt-in)."""
    from .attention_fused import STATIC_SHARED_BYTES

    if not applies(workload):
        return {}
    p = workload.params
    max_shared = gpu.max_shared_memory_per_block if gpu is not None else STATIC_SHARED_BYTES
    shape = (p["batch"], p["heads"], p["q_len"], p["kv_len"], p["head_dim"], p["causal"], p["dtype"])
    return {f"flash_prefill_mma_w{w}r{r}k{k}s{s}": flash_prefill_mma(*shape, warps=w, row_tiles=r, key_tile=k, stages=s)
            for w, r, k, s in mma_prefill_configs(p["q_len"], p["kv_len"], p["head_dim"])
            if mma_shared_bytes(p["head_dim"], w, r, k, s) <= max_shared}


def mma_shared_bytes(head_dim: int, warps: int, row_tiles: int, key_tile: int, stages: int) -> int:
    q = query_tile(warps, row_tiles) * (head_dim + ROW_PAD) * 2 if row_tiles > 1 else 0
    return q + 2 * stages * key_tile * (head_dim + ROW_PAD) * 2


def flash_prefill_mma(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = False,
                      dtype: str = "float16", warps: int = 4, row_tiles: int = 1, key_tile: int = 64,
                      stages: int = 1):
    """The PrimFunc: one block of ``32 warps`` threads per (batch, head, ``16 warps row_tiles`` query
    rows). With one row tile, Q stays in registers; with more, Q is staged in shared memory and its
    fragments reloaded per key tile (FlashAttention-2's choice: the registers go to S and O). K and V
    tiles are copied with cp.async into ``stages`` buffers: tile t + stages - 1 is on its way while
    tile t is used."""
    import tvm
    from tvm.script import tirx as T

    B, H, QL, KV, D = batch, heads, q_len, kv_len, head_dim
    W, M, N, ST = int(warps), int(row_tiles), int(key_tile), int(stages)
    if D % 16 or N % 16:
        raise ValueError(f"head_dim {D} and key tile {N} must be multiples of 16")
    TQ = query_tile(W, M)
    NQ, NT = -(-QL // TQ), -(-KV // N)
    THREADS = 32 * W
    DP = D + ROW_PAD
    CHUNKS = D // 16  # k16 chunks of head_dim (QK^T) and n16 pairs of head_dim tiles (P V)
    KEY_PAIRS = N // 16  # pairs of n8 key tiles (QK^T) and k16 chunks of keys (P V)
    S_TILE, O_TILE = N // 8 * 4, D // 8 * 4  # fp32 accumulators per row tile
    ROW_VECTORS = D // 8  # 16-byte vectors per row
    Q_ROUNDS = -(-(TQ * ROW_VECTORS) // THREADS)
    Q_IN_REGISTERS = M == 1
    scale = 1.0 / math.sqrt(D) * math.log2(math.e)
    offset = KV - QL  # causal, bottom-right aligned: query i sees keys j <= i + offset
    full = T.uint32(0xFFFFFFFF)
    lowest = T.min_value("float32")
    zero = T.Cast(dtype, 0)
    mma_args = ("m16n8k16", "row", "col", "fp16", "fp16", "fp32")

    def visible(q, key):
        return tvm.tirx.all(key < KV, key <= q + offset) if causal else key < KV

    def tiles_seen(qt):
        # Causal: key tiles up to the last one the tile's last real row sees (at least one).
        if not causal:
            return NT
        last_row = T.min(qt * TQ + TQ - 1, QL - 1)
        return T.min(NT, T.max(1, T.floordiv(last_row + offset, N) + 1))

    def shared_offset(address):
        return address[0] * DP + address[1]

    def quad_reduce(x, combine):
        # The four lanes holding a row's columns are lane ^ 1 and lane ^ 2 apart.
        y = combine(x, T.tvm_warp_shuffle_xor(full, x, 1, 32, 32))
        return combine(y, T.tvm_warp_shuffle_xor(full, y, 2, 32, 32))

    def loaded_row(index):
        return index // ROW_VECTORS

    def loaded_column(index, v):
        return index % ROW_VECTORS * 8 + v

    @T.prim_func(s_tir=True)
    def main(Q: T.Buffer((B, H, QL, D), dtype), K: T.Buffer((B, H, KV, D), dtype),
             V: T.Buffer((B, H, KV, D), dtype), O: T.Buffer((B, H, QL, D), dtype)):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        bx = T.env_thread("blockIdx.x")
        tx = T.env_thread("threadIdx.x")
        T.launch_thread(bx, B * H * NQ)
        T.launch_thread(tx, THREADS)
        # K and V as (batch x heads x keys) rows of head_dim: a head's rows start at head_row
        K_rows = T.decl_buffer((B * H * KV, D), dtype, data=K.data)
        V_rows = T.decl_buffer((B * H * KV, D), dtype, data=V.data)
        with T.sblock():
            Ks = T.sblock_alloc_buffer((ST, N, DP), dtype, scope="shared.dyn")
            Vs = T.sblock_alloc_buffer((ST, N, DP), dtype, scope="shared.dyn")
            Qs = T.sblock_alloc_buffer((1 if Q_IN_REGISTERS else TQ, DP), dtype, scope="shared.dyn")
            Qf = T.sblock_alloc_buffer((CHUNKS * 8 if Q_IN_REGISTERS else M * 8,), dtype, scope="local")
            Kf = T.sblock_alloc_buffer((8,), dtype, scope="local")
            Vf = T.sblock_alloc_buffer((8,), dtype, scope="local")
            Pf = T.sblock_alloc_buffer((M * KEY_PAIRS * 8,), dtype, scope="local")
            S = T.sblock_alloc_buffer((M * S_TILE,), "float32", scope="local")
            Oa = T.sblock_alloc_buffer((M * O_TILE,), "float32", scope="local")
            Mr = T.sblock_alloc_buffer((M * 2,), "float32", scope="local")  # running max of the thread's rows
            Mn = T.sblock_alloc_buffer((M * 2,), "float32", scope="local")  # max after this key tile
            Lr = T.sblock_alloc_buffer((M * 2,), "float32", scope="local")  # running sum (the thread's columns)
            Al = T.sblock_alloc_buffer((M * 2,), "float32", scope="local")  # rescale of the running state
            b = T.meta_var(bx // (H * NQ))
            h = T.meta_var(bx // NQ % H)
            # Causal: the longest query tiles (most key tiles) are scheduled first.
            qt = T.meta_var(NQ - 1 - bx % NQ if causal else bx % NQ)
            warp = T.meta_var(tx // 32)
            lane = T.meta_var(tx % 32)
            warp_row = T.meta_var(qt * TQ + warp * 16 * M)  # first query row of the warp's row tiles
            tiles = T.meta_var(tiles_seen(qt))
            key_limit = T.meta_var(T.min(KV, tiles * N))
            head_row = T.meta_var((b * H + h) * KV)
            if Q_IN_REGISTERS:
                # Q straight into its A fragments (read once per block).
                for c in T.unroll(CHUNKS):
                    for i in T.unroll(8):
                        Qf[c * 8 + i] = T.if_then_else(
                            a_fragment(lane, i)[0] + warp_row < QL,
                            Q[b, h, T.min(a_fragment(lane, i)[0] + warp_row, QL - 1), c * 16 + a_fragment(lane, i)[1]],
                            zero)
            else:
                for rnd in T.serial(Q_ROUNDS):
                    for v in T.vectorized(8):
                        if rnd * THREADS + tx < TQ * ROW_VECTORS:
                            Qs[loaded_row(rnd * THREADS + tx), loaded_column(rnd * THREADS + tx, v)] = T.if_then_else(
                                qt * TQ + loaded_row(rnd * THREADS + tx) < QL,
                                Q[b, h, T.min(qt * TQ + loaded_row(rnd * THREADS + tx), QL - 1),
                                  loaded_column(rnd * THREADS + tx, v)], zero)
            for i in T.unroll(M * O_TILE):
                Oa[i] = T.float32(0)
            for r in T.unroll(M * 2):
                Mr[r] = lowest
                Lr[r] = T.float32(0)
            for u in T.serial(ST + tiles - 1):
                if u < tiles:
                    # Tile u into buffer u % ST (rows past the keys this block needs: zeros).
                    copy_tile_async(Ks, u % ST, K_rows, head_row + u * N, 0, N, D, head_row + key_limit, D, tx, THREADS)
                    copy_tile_async(Vs, u % ST, V_rows, head_row + u * N, 0, N, D, head_row + key_limit, D, tx, THREADS)
                T.evaluate(T.ptx.cp.async_.commit_group())
                if u >= ST - 1:
                    t = T.meta_var(u - (ST - 1))  # the tile used now
                    T.evaluate(T.ptx.cp.async_.wait_group(ST - 1))
                    T.tvm_storage_sync("shared")
                    # S = Q K^T
                    for i in T.unroll(M * S_TILE):
                        S[i] = T.float32(0)
                    for c in T.unroll(CHUNKS):
                        if not Q_IN_REGISTERS:
                            for m in T.unroll(M):
                                T.evaluate(T.ptx_legacy.ldmatrix(
                                    False, 4, ".b16", Qf.data, m * 8, Qs.access_ptr("r"),
                                    shared_offset(q_ldmatrix_address(lane, warp * M + m, c)), dtype=dtype))
                        for p in T.unroll(KEY_PAIRS):
                            T.evaluate(T.ptx_legacy.ldmatrix(
                                False, 4, ".b16", Kf.data, 0, Ks.access_ptr("r"),
                                t % ST * N * DP + shared_offset(k_ldmatrix_address(lane, p, c)), dtype=dtype))
                            for m in T.unroll(M):
                                for half in T.unroll(2):
                                    T.evaluate(T.ptx_legacy.mma(
                                        *mma_args, Qf.data, c * 8 if Q_IN_REGISTERS else m * 8, Kf.data, half * 4,
                                        S.data, m * S_TILE + p * 8 + half * 4, False, dtype="float32"))
                    # Online softmax on the thread's rows (two per row tile).
                    for r in T.unroll(M * 2):
                        Mn[r] = Mr[r]
                    for j in T.unroll(M * S_TILE):
                        S[j] = T.if_then_else(
                            visible(warp_row + j // S_TILE * 16 + c_fragment(lane, j % 4)[0],
                                    t * N + j % S_TILE // 4 * 8 + c_fragment(lane, j % 4)[1]),
                            S[j] * T.float32(scale), lowest)
                        Mn[j // S_TILE * 2 + j % 4 // 2] = T.max(Mn[j // S_TILE * 2 + j % 4 // 2], S[j])
                    for r in T.unroll(M * 2):
                        Mn[r] = quad_reduce(Mn[r], T.max)
                        Al[r] = T.exp2(Mr[r] - Mn[r])
                        Mr[r] = Mn[r]
                        Lr[r] = Lr[r] * Al[r]
                    for j in T.unroll(M * S_TILE):
                        Pf[j // S_TILE * KEY_PAIRS * 8 + p_fragment_index(j % S_TILE // 4, j % 4)] = T.Cast(
                            dtype, T.exp2(S[j] - Mn[j // S_TILE * 2 + j % 4 // 2]))
                        Lr[j // S_TILE * 2 + j % 4 // 2] = Lr[j // S_TILE * 2 + j % 4 // 2] + T.Cast(
                            "float32", Pf[j // S_TILE * KEY_PAIRS * 8 + p_fragment_index(j % S_TILE // 4, j % 4)])
                    for i in T.unroll(M * O_TILE):
                        Oa[i] = Oa[i] * Al[i // O_TILE * 2 + i % 4 // 2]
                    # O += P V
                    for c in T.unroll(KEY_PAIRS):
                        for p in T.unroll(CHUNKS):
                            T.evaluate(T.ptx_legacy.ldmatrix(
                                True, 4, ".b16", Vf.data, 0, Vs.access_ptr("r"),
                                t % ST * N * DP + shared_offset(v_ldmatrix_address(lane, c, p)), dtype=dtype))
                            for m in T.unroll(M):
                                for half in T.unroll(2):
                                    T.evaluate(T.ptx_legacy.mma(
                                        *mma_args, Pf.data, m * KEY_PAIRS * 8 + c * 8, Vf.data, half * 4,
                                        Oa.data, m * O_TILE + p * 8 + half * 4, False, dtype="float32"))
                    T.tvm_storage_sync("shared")
            for r in T.unroll(M * 2):
                Lr[r] = quad_reduce(Lr[r], lambda x, y: x + y)
            for i in T.unroll(M * O_TILE):
                if warp_row + i // O_TILE * 16 + c_fragment(lane, i % 4)[0] < QL:
                    O[b, h, warp_row + i // O_TILE * 16 + c_fragment(lane, i % 4)[0],
                      i % O_TILE // 4 * 8 + c_fragment(lane, i % 4)[1]] = T.Cast(
                        dtype, Oa[i] / Lr[i // O_TILE * 2 + i % 4 // 2])

    return main


# -- NumPy emulation: the PrimFunc's algorithm lane by lane (kernels/mma_fragments.py) -------------
def emulate(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = False, warps: int = 4,
            row_tiles: int = 1, key_tile: int = 64) -> np.ndarray:
    """The output of ``flash_prefill_mma`` computed as its threads do (per warp and lane, fp16
    fragments, fp32 accumulators, fp16 probabilities, exp2 with log2(e) folded into the scale).
    Stages change when tiles arrive, not what is computed, so they are not a parameter here."""
    B, H, QL, D = q.shape
    KV = k.shape[2]
    W, M, N = warps, row_tiles, key_tile
    TQ = query_tile(W, M)
    NQ, NT = -(-QL // TQ), -(-KV // N)
    scale = np.float32(1.0 / math.sqrt(D) * math.log2(math.e))
    offset = KV - QL
    lowest = np.finfo(np.float32).min
    a_rows, a_cols = scatter(a_fragment, 8)
    c_rows, c_cols = scatter(c_fragment, 4)
    pair = [0, 0, 1, 1]  # the thread's row (of two) that accumulator element i belongs to
    out = np.zeros(q.shape, q.dtype)
    for b in range(B):
        for h in range(H):
            for qt in range(NQ):
                rows = qt * TQ + np.arange(TQ)
                qs = np.zeros((TQ, D + ROW_PAD), q.dtype)
                qs[rows < QL, :D] = q[b, h, rows[rows < QL]]
                last_row = min(qt * TQ + TQ - 1, QL - 1)
                tiles = min(NT, max(1, (last_row + offset) // N + 1)) if causal else NT
                for w in range(W):
                    base = qt * TQ + w * 16 * M
                    oa = np.zeros((M, D // 8, 32, 4), np.float32)
                    mr = np.full((M, 32, 2), lowest, np.float32)
                    lr = np.zeros((M, 32, 2), np.float32)
                    for t in range(tiles):
                        keys = t * N + np.arange(N)
                        ks = np.zeros((N, D + ROW_PAD), k.dtype)
                        vs = np.zeros((N, D + ROW_PAD), v.dtype)
                        ks[keys < KV, :D] = k[b, h, keys[keys < KV]]
                        vs[keys < KV, :D] = v[b, h, keys[keys < KV]]
                        s = np.zeros((M, N // 8, 32, 4), np.float32)
                        for c in range(D // 16):
                            if M == 1:  # Q held in registers: its A fragments straight from memory
                                qf = [qs[w * 16 + a_rows, c * 16 + a_cols]]
                            else:
                                qf = [emulate_ldmatrix(qs, lambda lane: q_ldmatrix_address(lane, w * M + m, c), False)
                                      for m in range(M)]
                            for p in range(N // 16):
                                kf = emulate_ldmatrix(ks, lambda lane: k_ldmatrix_address(lane, p, c), False)
                                for m in range(M):
                                    s[m, 2 * p] = emulate_mma(qf[m], kf[:, :4], s[m, 2 * p])
                                    s[m, 2 * p + 1] = emulate_mma(qf[m], kf[:, 4:], s[m, 2 * p + 1])
                        key = t * N + np.arange(N // 8)[None, :, None, None] * 8 + c_cols[None, None]
                        row = base + np.arange(M)[:, None, None, None] * 16 + c_rows[None, None]
                        seen = (key < KV) & (key <= row + offset) if causal else key < KV
                        s = np.where(seen, s * scale, lowest).astype(np.float32)
                        tile_max = np.stack([s[..., :2].max(axis=(1, 3)), s[..., 2:].max(axis=(1, 3))], -1)
                        mn = np.maximum(mr, tile_max)
                        for lane_mask in (1, 2):
                            mn = np.maximum(mn, mn[:, LANES ^ lane_mask])
                        alpha = np.exp2(mr - mn)
                        mr = mn
                        pr = np.exp2(s - mn[:, None][..., pair]).astype(np.float16)
                        wide = pr.astype(np.float32)
                        lr = lr * alpha + np.stack([wide[..., :2].sum(axis=(1, 3)), wide[..., 2:].sum(axis=(1, 3))], -1)
                        pf = np.empty((M, N // 16, 32, 8), np.float16)
                        for tile in range(N // 8):
                            for i in range(4):
                                index = p_fragment_index(tile, i)
                                pf[:, index // 8, :, index % 8] = pr[:, tile, :, i]
                        oa = oa * alpha[:, None][..., pair]
                        for c in range(N // 16):
                            for p in range(D // 16):
                                vf = emulate_ldmatrix(vs, lambda lane: v_ldmatrix_address(lane, c, p), True)
                                for m in range(M):
                                    oa[m, 2 * p] = emulate_mma(pf[m, c], vf[:, :4], oa[m, 2 * p])
                                    oa[m, 2 * p + 1] = emulate_mma(pf[m, c], vf[:, 4:], oa[m, 2 * p + 1])
                    for lane_mask in (1, 2):
                        lr = lr + lr[:, LANES ^ lane_mask]
                    values = (oa / lr[:, None][..., pair]).astype(q.dtype)
                    rows_out = base + np.arange(M)[:, None, None, None] * 16 + c_rows[None, None] + 0 * values
                    cols_out = np.arange(D // 8)[None, :, None, None] * 8 + c_cols[None, None] + 0 * values
                    keep = rows_out < QL
                    out[b, h, rows_out[keep].astype(int), cols_out[keep].astype(int)] = values[keep]
    return out
