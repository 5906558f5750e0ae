"""etune's schedule rule for the fused attention templates (kernels/attention_fused.py).

MetaSchedule's ApplyCustomRule calls ``s_tir.meta_schedule.<target key>.<name>`` for a block annotated with
``schedule_rule = <name>``; this module registers the rules under the ``cuda`` key. Every tunable is a
sampling instruction of the trace, so MetaSchedule's mutators, etune's crossover and the records treat
it like any other decision:

split-KV decode
- slots per thread block (sample_perfect_tile of the slot loop): how many blocks stream each row's K/V
  (slots / slots per block), i.e. the split count;
- vector width (sample_categorical 1/2/4/8 fp16): K/V loads and the threads over head_dim (head_dim /
  width, threadIdx.x);
- threads over key rows (sample_perfect_tile of the row phases, threadIdx.y): the keys a block works on at
  once (threads over rows x steps per slot = the per-block KV tile);
- the unroll step (sample_categorical, as TVM's own rules annotate it).

flash prefill (the query tile is the template's: see kernels/attention_fused.py)
- key tile: granules of K/V staged in shared memory per step (sample_perfect_tile of the granule loop);
- SIMT: row threads x rows per thread over the query tile (threadIdx.y) and column threads x columns
  per thread over head_dim (threadIdx.x), both sample_perfect_tile; warps per block = their product
  / 32. Tensor cores: warps over 16-row strips (sample_perfect_tile), 32 lanes;
- vector width of the cooperative Q/K/V loads (sample_categorical 1/2/4/8 fp16) and the unroll step.
"""
from __future__ import annotations

import tvm

VECTOR_WIDTHS = [1, 2, 4, 8]
UNROLL_STEPS = [0, 16, 64, 512]


def split_kv_decode(sch, block):
    """Schedule the split-KV decode template; ``block`` is its ``q_load`` block."""
    g = sch.get_sblock
    sch.unannotate(block, "schedule_rule")
    b, h, i, s, e = sch.get_loops(block)
    # Slots of one (batch, head, query) row: blocks along the KV length x slots per block.
    s_blocks, _ = sch.split(s, sch.sample_perfect_tile(s, n=2, max_innermost_factor=64))
    sch.bind(sch.fuse(b, h, i, s_blocks), "blockIdx.x")
    vec = sch.sample_categorical(VECTOR_WIDTHS, [0.1, 0.2, 0.3, 0.4])
    qk = g("qk")
    phases = sch.get_loops(qk)[-2]
    rows_threads = sch.sample_perfect_tile(phases, n=2, max_innermost_factor=64)

    def rows(loop):
        outer, inner = sch.split(loop, rows_threads)
        sch.bind(inner, "threadIdx.y")
        return outer, inner

    def cols(loop, vectorize=True):
        outer, inner = sch.split(loop, [None, vec])
        sch.bind(outer, "threadIdx.x")
        if vectorize:
            sch.vectorize(inner)
        return outer, inner

    cols(sch.get_loops(block)[-1])
    # Scores: a thread's slice of head_dim, reduced across threadIdx.x (warp shuffles); K comes
    # straight into registers with vector loads (no reuse across the block to stage in shared memory).
    k, r, e = sch.get_loops(qk)[-3:]
    r_outer, _ = rows(r)
    sch.fuse(k, r_outer)
    e_outer, _ = cols(e, vectorize=False)
    k_local = sch.cache_read(qk, 1, "local")
    sch.compute_at(k_local, e_outer, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(k_local)[-1])
    for name in ("row_max", "prob", "row_sum"):
        rows(sch.get_loops(g(name))[-1])
    # P @ V: each thread accumulates its rows in registers, then the row phases are summed via shared.
    pv = g("pv")
    r, e, k = sch.get_loops(pv)[-3:]
    r_outer, r_inner = rows(r)
    e_outer, e_inner = cols(e, vectorize=False)
    sch.reorder(r_inner, e_outer, k, r_outer, e_inner)
    v_local = sch.cache_read(pv, 1, "local")
    sch.compute_at(v_local, r_outer, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(v_local)[-1])
    store = g("pv_store")
    r, e = sch.get_loops(store)[-2:]
    r_outer, r_inner = rows(r)
    # fp32 stores stay scalar: 8 lanes would be 32 bytes, past the 16-byte vector VerifyGPUCode allows.
    e_outer, e_inner = cols(e, vectorize=False)
    sch.reorder(r_inner, e_outer, r_outer, e_inner)
    cols(sch.get_loops(g("pv_sum"))[-2], vectorize=False)
    cols(sch.get_loops(g("store_partial"))[-1], vectorize=False)
    # Merge: one block per query row, head_dim over threads.
    b, h, i, _, _ = sch.get_loops(g("merge_max"))
    sch.bind(sch.fuse(b, h, i), "blockIdx.x")
    for name in ("merge_max", "merge_sum", "merge_out", "O"):
        sch.bind(sch.get_loops(g(name))[1], "threadIdx.x")
    unroll = sch.sample_categorical(UNROLL_STEPS, [0.25] * 4)
    sch.annotate(g("root"), "meta_schedule.unroll_explicit", unroll)
    return [sch]


def flash_prefill(sch, block):
    """Schedule the flash prefill template; ``block`` is its ``q_load`` block. One thread block per
    (batch, head, query tile), threads (threadIdx.y over query rows) x (threadIdx.x over columns)."""
    g = sch.get_sblock
    sch.unannotate(block, "schedule_rule")
    b, h, qt = sch.get_loops(block)[:3]
    sch.bind(sch.fuse(b, h, qt), "blockIdx.x")
    # Key tile: granules of K and V staged in shared memory per step of the key loop.
    t = sch.get_loops(g("granule"))[-1]
    t_stage, _ = sch.split(t, sch.sample_perfect_tile(t, n=2, max_innermost_factor=4))
    for name in ("k_load", "v_load"):
        sch.compute_at(g(name), t_stage, preserve_unit_loops=True)
    # Thread layout, shared by every block: row threads x rows per thread over the query tile, column
    # threads x columns per thread over head_dim (each thread's part of the output in registers).
    qi, e = sch.get_loops(g("O"))[-2:]
    rows = sch.sample_perfect_tile(qi, n=2, max_innermost_factor=8)
    cols = sch.sample_perfect_tile(e, n=2, max_innermost_factor=8)
    vec = sch.sample_categorical(VECTOR_WIDTHS, [0.1, 0.2, 0.3, 0.4])

    def threads(row_threads, col_threads):
        sch.bind(row_threads, "threadIdx.y")
        sch.bind(col_threads, "threadIdx.x")

    def tile_output(name):
        """Rows and head_dim columns of the output tile, as the output accumulator is owned."""
        qi, e = sch.get_loops(g(name))[-3:-1] if name == "pv" else sch.get_loops(g(name))[-2:]
        r_t, r_i = sch.split(qi, rows)
        c_t, c_i = sch.split(e, cols)
        sch.reorder(r_t, c_t, r_i, c_i)
        threads(r_t, c_t)
        return r_i, c_i

    def tile_scores(name, qi, j):
        """Rows as the output, keys of a granule strided over the column threads."""
        r_t, r_i = sch.split(qi, rows)
        j_o, j_t = sch.split(j, [None, cols[0]])
        sch.reorder(r_t, j_t, r_i, j_o)
        threads(r_t, j_t)
        return r_i, j_o

    def one_row_per_thread(name):
        """Row statistics: each row's reduction over the granule in one thread, read from shared."""
        qi = sch.get_loops(g(name))[0]  # the loops inside the granule block
        _, r_t, c_t = sch.split(qi, [None, rows[0], cols[0]])
        threads(r_t, c_t)

    def cooperative(name):
        loops = sch.get_loops(g(name))
        fused = sch.fuse(*loops[-2:] if name == "q_load" else loops[-3:])
        _, r_t, c_t, lanes = sch.split(fused, [None, rows[0], cols[0], vec])
        threads(r_t, c_t)
        sch.vectorize(lanes)

    def cache_operands(block, names, loop):
        """Each thread's slice of the named operands in registers, loaded once per step of ``loop``."""
        reads = [region.source.name for region in sch.get(block).reads]
        for name in names:
            cached = sch.cache_read(block, reads.index(name), "local")
            sch.compute_at(cached, loop, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(cached)[-1])

    for name in ("q_load", "k_load", "v_load"):
        cooperative(name)
    # S = Q K^T: a micro-tile of scores per thread, accumulated in registers, stored as owned.
    qk = g("qk")
    qi, j, d = sch.get_loops(qk)[-3:]
    r_i, j_o = tile_scores("qk", qi, j)
    sch.reorder(d, r_i, j_o)
    cache_operands(qk, ("Qs", "Ks"), d)
    for name in ("s_store", "prob"):
        tile_scores(name, *sch.get_loops(g(name))[-2:])
    for name in ("tile_max", "max_store", "rescale", "tile_sum", "sum_store"):
        one_row_per_thread(name)
    # O += P V: the thread's rows x columns of the accumulator.
    pv = g("pv")
    r_i, c_i = tile_output("pv")
    j = sch.get_loops(pv)[-1]
    sch.reorder(j, r_i, c_i)
    cache_operands(pv, ("P", "Vs"), j)
    tile_output("O")
    unroll = sch.sample_categorical(UNROLL_STEPS, [0.25] * 4)
    sch.annotate(g("root"), "meta_schedule.unroll_explicit", unroll)
    return [sch]


def flash_prefill_tensor_cores(sch, block):
    """Schedule the tensor-core form of the flash prefill template (wmma 16x16x16, fp32 accumulate).

    Threads: warps (threadIdx.y, sampled) x 32 lanes. Each product's 16x16 output tiles are dealt to
    the warps; the row statistics, probabilities and the output merge run on all threads as in the
    SIMT schedule, with 32 column threads."""
    from .rules import tensor_intrinsics

    tensor_intrinsics()  # registers the wmma intrinsics
    g = sch.get_sblock
    sch.unannotate(block, "schedule_rule")
    b, h, qt = sch.get_loops(block)[:3]
    sch.bind(sch.fuse(b, h, qt), "blockIdx.x")
    t = sch.get_loops(g("granule"))[-1]
    t_stage, _ = sch.split(t, sch.sample_perfect_tile(t, n=2, max_innermost_factor=4))
    for name in ("k_load", "v_load"):
        sch.compute_at(g(name), t_stage, preserve_unit_loops=True)
    vec = sch.sample_categorical(VECTOR_WIDTHS, [0.1, 0.2, 0.3, 0.4])

    def wmma_tiles(name):
        """The block's 16x16x16 tiles: (row tiles, reduction tiles, column tiles, the 16^3 loops). The
        reduction outside the columns: a warp loads each A fragment once for all its columns."""
        i, j, k = sch.get_loops(g(name))[-3:]
        i_o, i_16 = sch.split(i, [None, 16])
        j_o, j_16 = sch.split(j, [None, 16])
        k_o, k_16 = sch.split(k, [None, 16])
        sch.reorder(i_o, k_o, j_o, i_16, j_16, k_16)
        return i_o, k_o, j_o, i_16

    qk_tiles = wmma_tiles("qk")
    # Warps over the 16-row strips of the query tile, in both products.
    warps, _ = sch.sample_perfect_tile(qk_tiles[0], n=2, max_innermost_factor=16)

    def product(name, tiling, store, operands, intrinsics):
        i_o, k_o, j_o, inner = tiling
        warp, per_warp = sch.split(i_o, [warps, None])
        sch.bind(warp, "threadIdx.y")
        block = g(name)
        sch.set_scope(block, 0, "wmma.accumulator")
        reads = [region.source.name for region in sch.get(block).reads]
        for buffer, fragment, load, at in zip(operands, ("wmma.matrix_a", "wmma.matrix_b"), intrinsics[:2], (k_o, j_o)):
            cached = sch.cache_read(block, reads.index(buffer), fragment)
            sch.compute_at(cached, at, preserve_unit_loops=True)
            loops = sch.get_loops(cached)[-2:]
            outer = [sch.split(loop, [None, 16])[0] for loop in loops]
            sch.reorder(*outer, *[sch.get_loops(cached)[-3], sch.get_loops(cached)[-1]])
            sch.tensorize(sch.get_loops(cached)[-2], load)
        init = sch.decompose_reduction(block, per_warp)
        sch.tensorize(sch.get_loops(init)[-2], "wmma_fill_16x16x16_f32")
        sch.tensorize(inner, intrinsics[2])
        i, j = sch.get_loops(g(store))[-2:]
        i_o, i_16 = sch.split(i, [None, 16])
        j_o, j_16 = sch.split(j, [None, 16])
        sch.reorder(i_o, j_o, i_16, j_16)
        sch.bind(sch.split(i_o, [warps, None])[0], "threadIdx.y")
        sch.tensorize(i_16, "wmma_store_16x16x16_f32_shared")

    def threads(row_threads, lanes):
        sch.bind(row_threads, "threadIdx.y")
        sch.bind(lanes, "threadIdx.x")

    for name in ("q_load", "k_load", "v_load"):
        loops = sch.get_loops(g(name))
        fused = sch.fuse(*loops[-2:] if name == "q_load" else loops[-3:])
        _, r_t, lanes, vector = sch.split(fused, [None, warps, 32, vec])
        threads(r_t, lanes)
        sch.vectorize(vector)
    product("qk", qk_tiles, "s_store", ("Qs", "Ks"), ("wmma_load_16x16x16_f16_a_shared",
                                             "wmma_load_16x16x16_f16_b_trans_shared",
                                             "wmma_sync_16x16x16_f16f16f32_trans"))
    product("pv", wmma_tiles("pv"), "o_store", ("P", "Vs"), ("wmma_load_16x16x16_f16_a_shared", "wmma_load_16x16x16_f16_b_shared",
                                            "wmma_sync_16x16x16_f16f16f32"))
    for name in ("tile_max", "max_store", "rescale", "tile_sum", "sum_store"):
        _, r_t, lanes = sch.split(sch.get_loops(g(name))[0], [None, warps, 32])
        threads(r_t, lanes)
    _, r_t, lanes = sch.split(sch.fuse(*sch.get_loops(g("prob"))[-2:]), [None, warps, 32])
    threads(r_t, lanes)
    for name in ("o_merge", "O"):
        qi, e = sch.get_loops(g(name))[-3:-1] if name == "o_merge" else sch.get_loops(g(name))[-2:]
        r_t, _ = sch.split(qi, [warps, None])
        lanes, _ = sch.split(e, [32, None])
        sch.reorder(r_t, lanes)
        threads(r_t, lanes)
    unroll = sch.sample_categorical(UNROLL_STEPS, [0.25] * 4)
    sch.annotate(g("root"), "meta_schedule.unroll_explicit", unroll)
    return [sch]


RULES = {"etune_split_kv_decode": split_kv_decode, "etune_flash_prefill": flash_prefill,
         "etune_flash_prefill_tc": flash_prefill_tensor_cores}


def register() -> None:
    """Register the rules for ApplyCustomRule (idempotent)."""
    for name, rule in RULES.items():
        key = f"s_tir.meta_schedule.cuda.{name}"
        if tvm.get_global_func(key, allow_missing=True) is None:
            tvm.register_global_func(key, rule)
