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
- key tile: granules of K/V staged in shared memory per step (sample_perfect_tile of the granule loop;
  causal, where the loop's length depends on the query tile: sample_categorical of 1/2/4);
- SIMT: row threads x rows per thread over the query tile (threadIdx.y) and column threads x columns
  per thread over head_dim (threadIdx.x), both sample_perfect_tile; warps per block = their product
  / 32. Tensor cores: warps over 16-row strips (sample_perfect_tile), 32 lanes; the wmma intrinsics
  of each operand's scope (``shared`` or ``shared.dyn``);
- vector width of the cooperative Q/K/V loads (sample_categorical 1/2/4/8 fp16) and the unroll step.
"""
from __future__ import annotations

import tvm

from .choices import uniform_choice

VECTOR_WIDTHS = [1, 2, 4, 8]
UNROLL_STEPS = [0, 16, 64, 512]
STAGE_GRANULES = [1, 2, 4]  # key granules per shared-memory stage when the key loop is not constant


def split_kv_decode(sch, block):
    """Schedule the split-KV decode template; ``block`` is its ``q_load`` block."""
    g = sch.get_sblock
    sch.unannotate(block, "schedule_rule")
    b, h, s, i, e = sch.get_loops(block)
    # Slots of one (batch, head): blocks along the KV length x slots per block; every block works on
    # all the query rows of its slots.
    s_blocks, _ = sch.split(s, sch.sample_perfect_tile(s, n=2, max_innermost_factor=64))
    sch.bind(sch.fuse(b, h, s_blocks), "blockIdx.x")
    vec = sch.sample_categorical(VECTOR_WIDTHS, [0.1, 0.2, 0.3, 0.4])
    qk = g("qk")
    phases = sch.get_loops(qk)[-3]
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
    # straight into registers with vector loads (no reuse across the block to stage in shared memory),
    # once for all the query rows (the rows' loop inside the thread's slice).
    k, r, i, e = sch.get_loops(qk)[-4:]
    r_outer, r_inner = rows(r)
    sch.fuse(k, r_outer)
    cols(e, vectorize=False)
    # K's row is loaded above the query rows' loop (the reduction over threadIdx.x must stay the
    # innermost loops), each thread its slice, by the same threads as the product.
    k_local = sch.cache_read(qk, 1, "local")
    sch.compute_at(k_local, r_inner, preserve_unit_loops=True)
    cols(sch.get_loops(k_local)[-1])
    for name in ("row_max", "prob", "row_sum"):
        rows(sch.get_loops(g(name))[-1])
    # P @ V: each thread accumulates its rows in registers, then the row phases are summed via shared.
    pv = g("pv")
    r, e, k, i = sch.get_loops(pv)[-4:]
    r_outer, r_inner = rows(r)
    e_outer, e_inner = cols(e, vectorize=False)
    sch.reorder(r_inner, e_outer, k, r_outer, i, e_inner)
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
    unroll = uniform_choice(sch, UNROLL_STEPS)
    sch.annotate(g("root"), "meta_schedule.unroll_explicit", unroll)
    return [sch]


def _stage_key_granules(sch, block) -> None:
    """The part both prefill schedules share: one thread block per (batch, head, query tile), and K/V
    staged in shared memory a sampled number of granules at a time (the key tile)."""
    g = sch.get_sblock
    sch.unannotate(block, "schedule_rule")
    b, h, qt = sch.get_loops(block)[:3]
    sch.bind(sch.fuse(b, h, qt), "blockIdx.x")
    t = sch.get_loops(g("granule"))[-1]
    if isinstance(sch.get(t).extent, tvm.tirx.IntImm):
        t_stage, _ = sch.split(t, sch.sample_perfect_tile(t, n=2, max_innermost_factor=4))
    else:
        # Causal: the key loop's length depends on the query tile (no perfect tiles of it); the last
        # stage of a tile is guarded, and its K/V loads past the diagonal are skipped or zeros.
        stage = uniform_choice(sch, STAGE_GRANULES)
        t_stage, _ = sch.split(t, [None, stage])
    for name in ("k_load", "v_load"):
        sch.compute_at(g(name), t_stage, preserve_unit_loops=True)


def _bind_threads(sch, row_threads, col_threads) -> None:
    sch.bind(row_threads, "threadIdx.y")
    sch.bind(col_threads, "threadIdx.x")


def _cooperative_loads(sch, row_threads, col_threads, vec) -> None:
    """Q, K and V into shared memory by all threads, ``vec`` fp16 per access."""
    for name in ("q_load", "k_load", "v_load"):
        loops = sch.get_loops(sch.get_sblock(name))
        fused = sch.fuse(*loops[-2:] if name == "q_load" else loops[-3:])
        _, r_t, c_t, lanes = sch.split(fused, [None, row_threads, col_threads, vec])
        _bind_threads(sch, r_t, c_t)
        sch.vectorize(lanes)


def _row_statistics(sch, row_threads, col_threads) -> None:
    """Row max, rescale factor and sum: each row's reduction over a granule in one thread (from
    shared memory), the rows dealt to all threads."""
    for name in ("tile_max", "max_store", "rescale", "tile_sum", "sum_store"):
        qi = sch.get_loops(sch.get_sblock(name))[0]  # the loops inside the granule block
        _, r_t, c_t = sch.split(qi, [None, row_threads, col_threads])
        _bind_threads(sch, r_t, c_t)


def flash_prefill(sch, block):
    """Schedule the SIMT form of the flash prefill template; ``block`` is its ``q_load`` block.
    Threads: threadIdx.y over query rows x threadIdx.x over columns (head_dim, or a granule's keys)."""
    g = sch.get_sblock
    _stage_key_granules(sch, block)
    # Thread layout, shared by every block: row threads x rows per thread over the query tile, column
    # threads x columns per thread over head_dim (each thread's part of the output in registers).
    qi, e = sch.get_loops(g("O"))[-2:]
    rows = sch.sample_perfect_tile(qi, n=2, max_innermost_factor=8)
    cols = sch.sample_perfect_tile(e, n=2, max_innermost_factor=8)
    vec = sch.sample_categorical(VECTOR_WIDTHS, [0.1, 0.2, 0.3, 0.4])

    def tile_output(qi, e):
        """Rows and head_dim columns of the output tile, as the output accumulator is owned."""
        r_t, r_i = sch.split(qi, rows)
        c_t, c_i = sch.split(e, cols)
        sch.reorder(r_t, c_t, r_i, c_i)
        _bind_threads(sch, r_t, c_t)
        return r_i, c_i

    def tile_scores(qi, j):
        """Rows as the output, keys of a granule strided over the column threads."""
        r_t, r_i = sch.split(qi, rows)
        j_o, j_t = sch.split(j, [None, cols[0]])
        sch.reorder(r_t, j_t, r_i, j_o)
        _bind_threads(sch, r_t, j_t)
        return r_i, j_o

    def cache_operands(block, names, loop):
        """Each thread's slice of the named operands in registers, loaded once per step of ``loop``."""
        reads = [region.source.name for region in sch.get(block).reads]
        for name in names:
            cached = sch.cache_read(block, reads.index(name), "local")
            sch.compute_at(cached, loop, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(cached)[-1])

    _cooperative_loads(sch, rows[0], cols[0], vec)
    # S = Q K^T: a micro-tile of scores per thread, accumulated in registers, stored as owned.
    qk = g("qk")
    qi, j, d = sch.get_loops(qk)[-3:]
    r_i, j_o = tile_scores(qi, j)
    sch.reorder(d, r_i, j_o)
    cache_operands(qk, ("Qs", "Ks"), d)
    for name in ("s_store", "prob"):
        tile_scores(*sch.get_loops(g(name))[-2:])
    _row_statistics(sch, rows[0], cols[0])
    # O += P V: the thread's rows x columns of the accumulator.
    pv = g("pv")
    r_i, c_i = tile_output(*sch.get_loops(pv)[-3:-1])
    j = sch.get_loops(pv)[-1]
    sch.reorder(j, r_i, c_i)
    cache_operands(pv, ("P", "Vs"), j)
    tile_output(*sch.get_loops(g("O"))[-2:])
    unroll = uniform_choice(sch, UNROLL_STEPS)
    sch.annotate(g("root"), "meta_schedule.unroll_explicit", unroll)
    return [sch]


# wmma intrinsics (TVM's names) per product: A load, B load, multiply-accumulate.
_QK_INTRINSICS = ("wmma_load_16x16x16_f16_a_shared", "wmma_load_16x16x16_f16_b_trans_shared",
                  "wmma_sync_16x16x16_f16f16f32_trans")
_PV_INTRINSICS = ("wmma_load_16x16x16_f16_a_shared", "wmma_load_16x16x16_f16_b_shared",
                  "wmma_sync_16x16x16_f16f16f32")


def flash_prefill_tensor_cores(sch, block):
    """Schedule the tensor-core form of the flash prefill template (wmma 16x16x16, fp32 accumulate).

    Threads: warps (threadIdx.y, sampled) x 32 lanes. Each product's 16x16 output tiles are dealt to
    the warps by 16-row strips; the row statistics, probabilities and the output merge run on all
    threads as in the SIMT schedule, with 32 column threads."""
    from .rules import tensor_intrinsics

    tensor_intrinsics()  # registers the wmma intrinsics
    g = sch.get_sblock
    _stage_key_granules(sch, block)
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

    def tiles_16(loops):
        """Two loops cut into 16x16 tiles: (outer row, outer column, inner row, inner column)."""
        (r_o, r_16), (c_o, c_16) = (sch.split(loop, [None, 16]) for loop in loops)
        sch.reorder(r_o, c_o, r_16, c_16)
        return r_o, c_o, r_16

    qk_tiles = wmma_tiles("qk")
    # Warps over the 16-row strips of the query tile, in both products.
    warps, _ = sch.sample_perfect_tile(qk_tiles[0], n=2, max_innermost_factor=16)

    def dyn(block, buffer):
        """Dynamic shared memory (a template beyond 48 KiB) has intrinsics of its own."""
        scopes = {region.source.name: region.source.scope() for region in [*sch.get(block).reads, *sch.get(block).writes]}
        return "_dyn" if scopes[buffer] == "shared.dyn" else ""

    def product(name, tiling, store, operands, intrinsics):
        intrinsics = (intrinsics[0] + dyn(g(name), operands[0]), intrinsics[1] + dyn(g(name), operands[1]),
                      intrinsics[2])
        i_o, k_o, j_o, inner = tiling
        warp, per_warp = sch.split(i_o, [warps, None])
        sch.bind(warp, "threadIdx.y")
        block = g(name)
        sch.set_scope(block, 0, "wmma.accumulator")
        reads = [region.source.name for region in sch.get(block).reads]
        # A fragments per reduction step, B fragments per column tile.
        for buffer, fragment, load, at in zip(operands, ("wmma.matrix_a", "wmma.matrix_b"), intrinsics, (k_o, j_o)):
            cached = sch.cache_read(block, reads.index(buffer), fragment)
            sch.compute_at(cached, at, preserve_unit_loops=True)
            sch.tensorize(tiles_16(sch.get_loops(cached)[-2:])[2], load)
        init = sch.decompose_reduction(block, per_warp)
        sch.tensorize(sch.get_loops(init)[-2], "wmma_fill_16x16x16_f32")
        sch.tensorize(inner, intrinsics[2])
        # The accumulator tiles to shared memory, each by the warp that holds it.
        r_o, _, r_16 = tiles_16(sch.get_loops(g(store))[-2:])
        sch.bind(sch.split(r_o, [warps, None])[0], "threadIdx.y")
        sch.tensorize(r_16, "wmma_store_16x16x16_f32_shared" + dyn(g(store), "S"))

    _cooperative_loads(sch, warps, 32, vec)
    product("qk", qk_tiles, "s_store", ("Qs", "Ks"), _QK_INTRINSICS)
    product("pv", wmma_tiles("pv"), "o_store", ("P", "Vs"), _PV_INTRINSICS)
    _row_statistics(sch, warps, 32)
    # Probabilities: a warp's rows (as max_row holds them), 32 consecutive keys of a row per step.
    qi, j = sch.get_loops(g("prob"))[-2:]
    r_t, rows = sch.split(qi, [warps, None])
    _, lanes = sch.split(j, [None, 32])
    sch.reorder(r_t, lanes, rows)
    _bind_threads(sch, r_t, lanes)
    warp_rows, _ = sch.split(sch.get_loops(g("max_row"))[-1], [warps, None])
    sch.bind(warp_rows, "threadIdx.y")
    # The running output as the SIMT schedule owns it: rows over warps, contiguous columns per lane.
    for name in ("o_merge", "O"):
        qi, e = sch.get_loops(g(name))[-3:-1] if name == "o_merge" else sch.get_loops(g(name))[-2:]
        r_t, _ = sch.split(qi, [warps, None])
        lanes, _ = sch.split(e, [32, None])
        sch.reorder(r_t, lanes)
        _bind_threads(sch, r_t, lanes)

    # The rescale factors of a warp's rows into every lane's registers, read once per row (not per
    # column) by the merge.
    warp_rows, _ = sch.split(sch.get_loops(g("alpha_row"))[-1], [warps, None])
    sch.bind(warp_rows, "threadIdx.y")
    unroll = uniform_choice(sch, UNROLL_STEPS)
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
