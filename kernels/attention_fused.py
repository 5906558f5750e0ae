"""Fused attention as TIR templates: the same computation as kernels/attention.py, as PrimFuncs that a
custom schedule rule (search_space/attention_rules.py) tiles and binds.

Split-KV decode (flash-decoding). The KV length is cut into ``slots`` of ``chunk`` keys (the tail slot
guarded). A partial kernel computes, per query row and slot, the slot's score max, exp-sum and
unnormalised output (fp32); a merge kernel rescales the slots' partials to the global max and
normalises. Within a slot the keys are visited as ``chunk // phases`` steps of ``phases`` rows, so that
the rows a thread owns are the same in every block of the partial kernel (their scores then stay in
registers) whatever the schedule picks for the threads over rows (a divisor of ``phases``).

FlashAttention-2 style prefill (``flash_prefill``), for longer q_len: one kernel, one thread block per
query tile; K/V streamed through shared memory in granules, online softmax in fp32, the output
written once. The query tile (and, with tensor cores and dynamic shared memory, the granule) is a
template parameter (one template per tile, each its own design space); everything else is the rule's
sampling decisions. A SIMT form and a tensor-core (wmma) form. Causal templates iterate only the key
granules a query tile sees (the loop's length depends on the tile).

Arguments (Q, K, V, O), shapes and dtypes are those of the unfused workload, so references, builds,
export and measurement work unchanged. Scores use exp2 with log2(e) folded into the scale.
"""
from __future__ import annotations

import math

# Keys per slot, and row phases per step (the most threads over rows the rule may use). The slot
# partials (max, sum, head_dim fp32 values) are ~0.4 % of the K/V bytes at head_dim 128.
DECODE_CHUNK = 256
DECODE_PHASES = 16
# Query rows per (batch, head) up to which the split-KV decode family is offered: each row streams its
# own K/V slot (small q_len re-reads K/V from L2).
DECODE_MAX_Q = 8


def decode_slots(kv_len: int, chunk: int = DECODE_CHUNK) -> int:
    return -(-kv_len // chunk)


def split_kv_decode(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = False,
                    dtype: str = "float16", chunk: int = DECODE_CHUNK, phases: int = DECODE_PHASES):
    """The split-KV decode PrimFunc. Block names are the rule's handles; ``q_load`` carries the
    ``schedule_rule`` annotation that makes MetaSchedule's ApplyCustomRule call etune's rule."""
    import tvm
    from tvm.script import tirx as T

    B, H, QL, KV, D = batch, heads, q_len, kv_len, head_dim
    C, R = int(chunk), int(phases)
    if C % R:
        raise ValueError(f"chunk {C} is not a multiple of phases {R}")
    NS = decode_slots(KV, C)
    scale = 1.0 / math.sqrt(D) * math.log2(math.e)
    offset = KV - QL  # causal, bottom-right aligned: query i sees keys j <= i + offset
    last = KV - 1

    def visible(i, j):
        return tvm.tirx.all(j < KV, j <= i + offset) if causal else j < KV

    # Keys past the end are read clamped (in bounds) and masked to the lowest float: their weight is 0.
    @T.prim_func(s_tir=True)
    def main(Q: T.Buffer((B, H, QL, D), dtype), K: T.Buffer((B, H, KV, D), dtype),
             V: T.Buffer((B, H, KV, D), dtype), O: T.Buffer((B, H, QL, D), dtype)):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        with T.sblock("root"):
            Ql = T.sblock_alloc_buffer((B, H, QL, D), dtype, scope="local")
            S = T.sblock_alloc_buffer((B, H, QL, NS, C // R, R), "float32", scope="local")
            P = T.sblock_alloc_buffer((B, H, QL, NS, C // R, R), "float32", scope="local")
            Mx = T.sblock_alloc_buffer((B, H, QL, NS), "float32", scope="local")
            Lx = T.sblock_alloc_buffer((B, H, QL, NS), "float32", scope="local")
            Oacc = T.sblock_alloc_buffer((B, H, QL, NS, R, D), "float32", scope="local")
            Opart = T.sblock_alloc_buffer((B, H, QL, NS, R, D), "float32", scope="shared")
            Ox = T.sblock_alloc_buffer((B, H, QL, NS, D), "float32", scope="local")
            # The slot partials, the only global intermediates.
            Mp = T.sblock_alloc_buffer((B, H, QL, NS), "float32")
            Lp = T.sblock_alloc_buffer((B, H, QL, NS), "float32")
            Op = T.sblock_alloc_buffer((B, H, QL, NS, D), "float32")
            GM = T.sblock_alloc_buffer((B, H, QL, D), "float32", scope="local")
            Den = T.sblock_alloc_buffer((B, H, QL, D), "float32", scope="local")
            Acc = T.sblock_alloc_buffer((B, H, QL, D), "float32", scope="local")
            for b, h, s in T.grid(B, H, NS):
                # One slot of one (batch, head) for all its query rows: each K/V row is loaded once and
                # used by every query row (the rows are the innermost spatial loop of both products).
                for i, e in T.grid(QL, D):
                    with T.sblock("q_load"):
                        vb, vh, vi, ve = T.axis.remap("SSSS", [b, h, i, e])
                        T.sblock_attr({"schedule_rule": "etune_split_kv_decode"})
                        Ql[vb, vh, vi, ve] = Q[vb, vh, vi, ve]
                for k, r, i, e in T.grid(C // R, R, QL, D):
                    with T.sblock("qk"):
                        vb, vh, vs, vk, vr, vi, ve = T.axis.remap("SSSSSSR", [b, h, s, k, r, i, e])
                        with T.init():
                            S[vb, vh, vi, vs, vk, vr] = T.float32(0)
                        S[vb, vh, vi, vs, vk, vr] += T.Cast("float32", Ql[vb, vh, vi, ve]) * T.Cast(
                            "float32", K[vb, vh, T.min(vs * C + vk * R + vr, last), ve])
                for i, k, r in T.grid(QL, C // R, R):
                    with T.sblock("row_max"):
                        vb, vh, vs, vi, vk, vr = T.axis.remap("SSSSRR", [b, h, s, i, k, r])
                        with T.init():
                            Mx[vb, vh, vi, vs] = T.min_value("float32")
                        Mx[vb, vh, vi, vs] = T.max(Mx[vb, vh, vi, vs], T.if_then_else(
                            visible(vi, vs * C + vk * R + vr), S[vb, vh, vi, vs, vk, vr] * T.float32(scale),
                            T.min_value("float32")))
                for i, k, r in T.grid(QL, C // R, R):
                    with T.sblock("prob"):
                        vb, vh, vs, vi, vk, vr = T.axis.remap("SSSSSS", [b, h, s, i, k, r])
                        P[vb, vh, vi, vs, vk, vr] = T.exp2(T.if_then_else(
                            visible(vi, vs * C + vk * R + vr), S[vb, vh, vi, vs, vk, vr] * T.float32(scale),
                            T.min_value("float32")) - Mx[vb, vh, vi, vs])
                for i, k, r in T.grid(QL, C // R, R):
                    with T.sblock("row_sum"):
                        vb, vh, vs, vi, vk, vr = T.axis.remap("SSSSRR", [b, h, s, i, k, r])
                        with T.init():
                            Lx[vb, vh, vi, vs] = T.float32(0)
                        Lx[vb, vh, vi, vs] += P[vb, vh, vi, vs, vk, vr]
                for r, e, k, i in T.grid(R, D, C // R, QL):
                    with T.sblock("pv"):
                        vb, vh, vs, vr, ve, vk, vi = T.axis.remap("SSSSSRS", [b, h, s, r, e, k, i])
                        with T.init():
                            Oacc[vb, vh, vi, vs, vr, ve] = T.float32(0)
                        Oacc[vb, vh, vi, vs, vr, ve] += P[vb, vh, vi, vs, vk, vr] * T.Cast(
                            "float32", V[vb, vh, T.min(vs * C + vk * R + vr, last), ve])
                for i, r, e in T.grid(QL, R, D):
                    with T.sblock("pv_store"):
                        vb, vh, vs, vi, vr, ve = T.axis.remap("SSSSSS", [b, h, s, i, r, e])
                        Opart[vb, vh, vi, vs, vr, ve] = Oacc[vb, vh, vi, vs, vr, ve]
                for i, e, r in T.grid(QL, D, R):
                    with T.sblock("pv_sum"):
                        vb, vh, vs, vi, ve, vr = T.axis.remap("SSSSSR", [b, h, s, i, e, r])
                        with T.init():
                            Ox[vb, vh, vi, vs, ve] = T.float32(0)
                        Ox[vb, vh, vi, vs, ve] += Opart[vb, vh, vi, vs, vr, ve]
                for i, e in T.grid(QL, D):
                    with T.sblock("store_partial"):
                        vb, vh, vs, vi, ve = T.axis.remap("SSSSS", [b, h, s, i, e])
                        Op[vb, vh, vi, vs, ve] = Ox[vb, vh, vi, vs, ve]
                        if ve == 0:
                            Mp[vb, vh, vi, vs] = Mx[vb, vh, vi, vs]
                            Lp[vb, vh, vi, vs] = Lx[vb, vh, vi, vs]
            for b, h, i in T.grid(B, H, QL):
                # Every head_dim column recomputes the slots' max and denominator (a few slots):
                # its thread then needs no other thread's result.
                for e, s in T.grid(D, NS):
                    with T.sblock("merge_max"):
                        vb, vh, vi, ve, vs = T.axis.remap("SSSSR", [b, h, i, e, s])
                        with T.init():
                            GM[vb, vh, vi, ve] = T.min_value("float32")
                        GM[vb, vh, vi, ve] = T.max(GM[vb, vh, vi, ve], Mp[vb, vh, vi, vs])
                for e, s in T.grid(D, NS):
                    with T.sblock("merge_sum"):
                        vb, vh, vi, ve, vs = T.axis.remap("SSSSR", [b, h, i, e, s])
                        with T.init():
                            Den[vb, vh, vi, ve] = T.float32(0)
                        Den[vb, vh, vi, ve] += T.exp2(Mp[vb, vh, vi, vs] - GM[vb, vh, vi, ve]) * Lp[vb, vh, vi, vs]
                for e, s in T.grid(D, NS):
                    with T.sblock("merge_out"):
                        vb, vh, vi, ve, vs = T.axis.remap("SSSSR", [b, h, i, e, s])
                        with T.init():
                            Acc[vb, vh, vi, ve] = T.float32(0)
                        Acc[vb, vh, vi, ve] += T.exp2(Mp[vb, vh, vi, vs] - GM[vb, vh, vi, ve]) * Op[vb, vh, vi, vs, ve]
                for e in range(D):
                    with T.sblock("O"):
                        vb, vh, vi, ve = T.axis.remap("SSSS", [b, h, i, e])
                        O[vb, vh, vi, ve] = T.Cast(dtype, Acc[vb, vh, vi, ve] / Den[vb, vh, vi, ve])

    return main


# FlashAttention-2 style prefill. Keys are visited in granules of PREFILL_GRANULE: the online softmax
# rescales the running output once per granule, and the rule stages several granules of K and V in
# shared memory at a time (its sampled key tile). The query tile is the template's own constant: it is
# the loop every thread block owns across the whole key loop, which no schedule primitive can resize.
PREFILL_GRANULE = 32
# With tensor cores and dynamic shared memory, also granules of 64 and 128 keys: the fp32 P V tile
# goes through shared memory once per granule, so a larger granule moves fewer bytes per key.
PREFILL_TC_GRANULES = (32, 64, 128)
PREFILL_Q_TILES = (32, 64, 128)


def prefill_shared_bytes(q_tile: int, head_dim: int, tensor_cores: bool, granule: int = PREFILL_GRANULE) -> int:
    """Shared memory of the prefill template with one granule of K/V staged: the Q tile, K and V,
    fp32 scores (with tensor cores, as wide as the fp32 P V tile that reuses them) and fp16
    probabilities."""
    scores = q_tile * (max(head_dim, granule) if tensor_cores else granule) * 4
    return q_tile * head_dim * 2 + 2 * granule * head_dim * 2 + scores + q_tile * granule * 2


# Static shared memory per block. A template needing more allocates it dynamically (``shared.dyn``:
# TVM's CUDA runtime raises the opt-in limit at launch when a kernel's dynamic shared memory is
# above 48 KiB), up to the target's ``max_shared_memory_per_block``.
STATIC_SHARED_BYTES = 48 * 1024


def prefill_q_tiles(q_len: int, head_dim: int, tensor_cores: bool = False,
                    max_shared: int = STATIC_SHARED_BYTES, granule: int = PREFILL_GRANULE) -> list[int]:
    """Query tiles offered as templates: those whose tiles fit in ``max_shared`` bytes of shared
    memory less 1 KiB (the row statistics take a little more), and no bigger than the query length
    rounded up to 32."""
    fitting = [t for t in PREFILL_Q_TILES
               if prefill_shared_bytes(t, head_dim, tensor_cores, granule) <= max_shared - 1024]
    return [t for t in fitting if t <= max(32, -(-q_len // 32) * 32)] or fitting[:1]


def flash_prefill(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = False,
                  dtype: str = "float16", q_tile: int = 64, granule: int = PREFILL_GRANULE,
                  tensor_cores: bool = False, shared_scope: str = "shared"):
    """The FlashAttention-2 style prefill PrimFunc: one thread block per (batch, head, query tile).

    Per key granule t: scores S = Q K^T (fp32, masked, scaled), the running row max Mx (granule t's from granule
    t - 1's), the rescale Alpha = exp2(Mx_{t-1} - Mx_t), probabilities P = exp2(S - Mx_t) (fp16, as the
    unfused chain rounds them), the running sum L = L * Alpha + sum(P) and output
    Oacc = Oacc * Alpha + P V (fp32).
    The output is divided by L and written once. Rows past q_len are computed on zeros and not
    stored; keys past kv_len are loaded as zeros and masked. Causal (bottom-right aligned): the key
    loop of query tile qt has ``live_granules(qt)`` iterations, up to the last granule its last row
    sees, so granules past the diagonal are not iterated at all. A schedule that stages several
    granules at a time guards its last stage; in granules loaded there that no row sees, the K/V
    loads and (SIMT) products are skipped by an ``if`` inside those blocks (a block predicate would
    make the reductions' bindings non-affine, and TVM inserts no barrier inside a condition), and
    the row statistics leave the state as is. Granules crossing the diagonal mask per element.

    ``tensor_cores``: the form whose two products a rule can tensorize (wmma): the products are plain
    (no skip inside: a staged granule past the diagonal has zero K/V), scores are stored raw and masked where
    read, and P V goes to a per-granule tile in shared memory (the scores' buffer) that a plain block
    adds to the running output (a wmma accumulator cannot be rescaled row by row).

    ``shared_scope``: "shared" (static), or "shared.dyn" for a template beyond 48 KiB: Q, K, V and
    the fp32 scores. The probabilities and row statistics stay static (at most 34.5 KiB): TVM merges
    the dynamic buffers into one allocation, and when P shared it with the scores, its barrier
    insertion could not tell the fp16 stores from the fp32 loads apart and put a barrier in every
    iteration of the probabilities' loop.
    """
    import tvm
    from tvm.script import tirx as T

    B, H, QL, KV, D = batch, heads, q_len, kv_len, head_dim
    TQ, G = int(q_tile), int(granule)
    NQ, NT = -(-QL // TQ), -(-KV // G)
    scale = 1.0 / math.sqrt(D) * math.log2(math.e)
    offset = KV - QL  # causal, bottom-right aligned: query i sees keys j <= i + offset
    lowest = T.min_value("float32")
    rule = "etune_flash_prefill_tc" if tensor_cores else "etune_flash_prefill"

    def visible(q, key):
        return tvm.tirx.all(key < KV, key <= q + offset) if causal else key < KV

    def granule_live(qt, t):
        # Some row of query tile qt sees the granule's first key (always true without causal).
        return t * G <= qt * TQ + TQ - 1 + offset if causal else True

    def live_granules(qt):
        # Causal: the key loop of query tile qt stops after the last granule its last (real) row
        # sees, so the granules past the diagonal are not iterated at all (at least one is).
        if not causal:
            return NT
        last_row = T.min(qt * TQ + TQ - 1, QL - 1)
        return T.min(NT, T.max(1, T.floordiv(last_row + offset, G) + 1))

    def skip_inside_products(qt, t):
        return True if tensor_cores else granule_live(qt, t)

    def score(q, key, raw):
        return T.if_then_else(visible(q, key), raw * T.float32(scale), lowest)

    def stored_score(q, key, stored):
        # Scores are stored masked and scaled, or raw (tensor cores) and masked where read.
        return score(q, key, stored) if tensor_cores else stored

    @T.prim_func(s_tir=True)
    def main(Q: T.Buffer((B, H, QL, D), dtype), K: T.Buffer((B, H, KV, D), dtype),
             V: T.Buffer((B, H, KV, D), dtype), O: T.Buffer((B, H, QL, D), dtype)):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        with T.sblock("root"):
            Qs = T.sblock_alloc_buffer((B, H, NQ, TQ, D), dtype, scope=shared_scope)
            Ks = T.sblock_alloc_buffer((B, H, NQ, NT, G, D), dtype, scope=shared_scope)
            Vs = T.sblock_alloc_buffer((B, H, NQ, NT, G, D), dtype, scope=shared_scope)
            # Running row max after granules t (even) and t (odd): granule t reads granule t - 1's.
            Mx = T.sblock_alloc_buffer((B, H, NQ, 2, TQ), "float32", scope="shared")
            Alpha = T.sblock_alloc_buffer((B, H, NQ, 2, TQ), "float32", scope="shared")
            L = T.sblock_alloc_buffer((B, H, NQ, TQ), "float32", scope="shared")
            Oacc = T.sblock_alloc_buffer((B, H, NQ, TQ, D), "float32", scope="local")
            for b, h, qt in T.grid(B, H, NQ):
                for qi, d in T.grid(TQ, D):
                    with T.sblock("q_load"):
                        vb, vh, vq, vi, vd = T.axis.remap("SSSSS", [b, h, qt, qi, d])
                        T.sblock_attr({"schedule_rule": rule})
                        Qs[vb, vh, vq, vi, vd] = T.if_then_else(
                            vq * TQ + vi < QL, Q[vb, vh, T.min(vq * TQ + vi, QL - 1), vd], T.Cast(dtype, 0))
                for t, j, d in T.grid(NT, G, D):
                    with T.sblock("k_load"):
                        vb, vh, vq, vt, vj, vd = T.axis.remap("SSSSSS", [b, h, qt, t, j, d])
                        if tensor_cores:
                            Ks[vb, vh, vq, vt, vj, vd] = T.if_then_else(
                                tvm.tirx.all(granule_live(vq, vt), vt * G + vj < KV),
                                K[vb, vh, T.min(vt * G + vj, KV - 1), vd], T.Cast(dtype, 0))
                        elif granule_live(vq, vt):
                            Ks[vb, vh, vq, vt, vj, vd] = T.if_then_else(
                                vt * G + vj < KV, K[vb, vh, T.min(vt * G + vj, KV - 1), vd], T.Cast(dtype, 0))
                for t, j, d in T.grid(NT, G, D):
                    with T.sblock("v_load"):
                        vb, vh, vq, vt, vj, vd = T.axis.remap("SSSSSS", [b, h, qt, t, j, d])
                        if tensor_cores:
                            Vs[vb, vh, vq, vt, vj, vd] = T.if_then_else(
                                tvm.tirx.all(granule_live(vq, vt), vt * G + vj < KV),
                                V[vb, vh, T.min(vt * G + vj, KV - 1), vd], T.Cast(dtype, 0))
                        elif granule_live(vq, vt):
                            Vs[vb, vh, vq, vt, vj, vd] = T.if_then_else(
                                vt * G + vj < KV, V[vb, vh, T.min(vt * G + vj, KV - 1), vd], T.Cast(dtype, 0))
                for t in range(live_granules(qt)):
                    # One key granule. Its reads and writes are declared so that the tile's scope is a
                    # plain pipeline (loads -> granule -> output) that compute_at can stage K/V in;
                    # the running state it also reads stays inside. Within, every block writes its
                    # buffer alone (the first granule initialises instead of rescaling), so the rule
                    # may bind each.
                    with T.sblock("granule"):
                        vb, vh, vq = T.axis.remap("SSS", [b, h, qt])
                        vt = T.axis.spatial(NT, t)
                        T.reads(Qs[vb, vh, vq, 0:TQ, 0:D], Ks[vb, vh, vq, vt, 0:G, 0:D], Vs[vb, vh, vq, vt, 0:G, 0:D])
                        T.writes(Oacc[vb, vh, vq, 0:TQ, 0:D], L[vb, vh, vq, 0:TQ], Mx[vb, vh, vq, 0:2, 0:TQ],
                                 Alpha[vb, vh, vq, 0:2, 0:TQ])
                        # Tensor cores: S also holds the P V tile once the scores are read (one fp32
                        # buffer; TVM's merge of shared buffers otherwise gave the fp32 tile an fp16
                        # pool, which does not build).
                        S = T.sblock_alloc_buffer((TQ, max(D, G) if tensor_cores else G), "float32", scope=shared_scope)
                        P = T.sblock_alloc_buffer((TQ, G), dtype, scope="shared")
                        Mrow = T.sblock_alloc_buffer((TQ,), "float32", scope="local")
                        Lrow = T.sblock_alloc_buffer((TQ,), "float32", scope="local")
                        Arow = T.sblock_alloc_buffer((TQ,), "float32", scope="local")
                        Mr = T.sblock_alloc_buffer((TQ,), "float32", scope="local")
                        # The two products are blocks of their own: a scope with nothing but a product
                        # is one where the rule may cache operands in registers. A unit loop sits
                        # between such a block and the granule block: with none, TVM 0.27's split
                        # inside it wrote into the template's own module (copy-on-write missed).
                        for _ in range(1):
                            with T.sblock("scores"):
                                T.reads(Qs[vb, vh, vq, 0:TQ, 0:D], Ks[vb, vh, vq, vt, 0:G, 0:D])
                                T.writes(S[0:TQ, 0:G])
                                Sacc = T.sblock_alloc_buffer((TQ, G), "float32", scope="local")
                                for qi, j, d in T.grid(TQ, G, D):
                                    with T.sblock("qk"):
                                        vi, vj, vd = T.axis.remap("SSR", [qi, j, d])
                                        with T.init():
                                            Sacc[vi, vj] = T.float32(0)
                                        if skip_inside_products(vq, vt):
                                            Sacc[vi, vj] += T.Cast("float32", Qs[vb, vh, vq, vi, vd]) * T.Cast(
                                                "float32", Ks[vb, vh, vq, vt, vj, vd])
                                for qi, j in T.grid(TQ, G):
                                    with T.sblock("s_store"):
                                        vi, vj = T.axis.remap("SS", [qi, j])
                                        if tensor_cores:
                                            S[vi, vj] = Sacc[vi, vj]
                                        else:
                                            S[vi, vj] = score(vq * TQ + vi, vt * G + vj, Sacc[vi, vj])
                        # Row statistics accumulate in registers and are stored once: a shared
                        # accumulator would get a barrier per key (TVM cannot tell rows apart).
                        for qi, j in T.grid(TQ, G):
                            with T.sblock("tile_max"):
                                vi, vj = T.axis.remap("SR", [qi, j])
                                with T.init():
                                    Mrow[vi] = T.if_then_else(vt == 0, lowest, Mx[vb, vh, vq, (vt + 1) % 2, vi])
                                Mrow[vi] = T.max(Mrow[vi], stored_score(vq * TQ + vi, vt * G + vj, S[vi, vj]))
                        for qi in range(TQ):
                            with T.sblock("max_store"):
                                vi = T.axis.remap("S", [qi])
                                Mx[vb, vh, vq, vt % 2, vi] = Mrow[vi]
                        for qi in range(TQ):
                            with T.sblock("rescale"):
                                vi = T.axis.remap("S", [qi])
                                # Zero for the first granule: its "previous" output and sum are not read.
                                Alpha[vb, vh, vq, vt % 2, vi] = T.if_then_else(vt == 0, T.float32(0), T.exp2(
                                    Mx[vb, vh, vq, (vt + 1) % 2, vi] - Mx[vb, vh, vq, vt % 2, vi]))
                        if tensor_cores:
                            # The row max in registers (as alpha_row below): the probabilities' threads
                            # read it once per row, not once per score.
                            for qi in range(TQ):
                                with T.sblock("max_row"):
                                    vi = T.axis.remap("S", [qi])
                                    Mr[vi] = Mx[vb, vh, vq, vt % 2, vi]
                            for qi, j in T.grid(TQ, G):
                                with T.sblock("prob"):
                                    vi, vj = T.axis.remap("SS", [qi, j])
                                    P[vi, vj] = T.Cast(dtype, T.exp2(
                                        stored_score(vq * TQ + vi, vt * G + vj, S[vi, vj]) - Mr[vi]))
                        else:
                            for qi, j in T.grid(TQ, G):
                                with T.sblock("prob"):
                                    vi, vj = T.axis.remap("SS", [qi, j])
                                    P[vi, vj] = T.Cast(dtype, T.exp2(stored_score(vq * TQ + vi, vt * G + vj, S[vi, vj])
                                                                     - Mx[vb, vh, vq, vt % 2, vi]))
                        for qi, j in T.grid(TQ, G):
                            with T.sblock("tile_sum"):
                                vi, vj = T.axis.remap("SR", [qi, j])
                                with T.init():
                                    Lrow[vi] = T.if_then_else(
                                        vt == 0, T.float32(0), L[vb, vh, vq, vi] * Alpha[vb, vh, vq, vt % 2, vi])
                                Lrow[vi] += T.Cast("float32", P[vi, vj])
                        for qi in range(TQ):
                            with T.sblock("sum_store"):
                                vi = T.axis.remap("S", [qi])
                                L[vb, vh, vq, vi] = Lrow[vi]
                        if tensor_cores:
                            for _ in range(1):
                                with T.sblock("output_update"):
                                    T.reads(P[0:TQ, 0:G], Vs[vb, vh, vq, vt, 0:G, 0:D])
                                    T.writes(S[0:TQ, 0:D])
                                    Otacc = T.sblock_alloc_buffer((TQ, D), "float32", scope="local")
                                    for qi, e, j in T.grid(TQ, D, G):
                                        with T.sblock("pv"):
                                            vi, ve, vj = T.axis.remap("SSR", [qi, e, j])
                                            with T.init():
                                                Otacc[vi, ve] = T.float32(0)
                                            Otacc[vi, ve] += T.Cast("float32", P[vi, vj]) * T.Cast(
                                                "float32", Vs[vb, vh, vq, vt, vj, ve])
                                    for qi, e in T.grid(TQ, D):
                                        with T.sblock("o_store"):
                                            vi, ve = T.axis.remap("SS", [qi, e])
                                            S[vi, ve] = Otacc[vi, ve]
                            # The row's rescale factor in a register (the rule computes it at the
                            # row loop of the merge: read once per row, not per column).
                            for qi in range(TQ):
                                with T.sblock("alpha_row"):
                                    vi = T.axis.remap("S", [qi])
                                    Arow[vi] = Alpha[vb, vh, vq, vt % 2, vi]
                            # Written as a reduction (of one term) so that, like pv in the SIMT form,
                            # its rescale of the running output is an init and the block may be bound.
                            for qi, e, one in T.grid(TQ, D, 1):
                                with T.sblock("o_merge"):
                                    vi, ve, vone = T.axis.remap("SSR", [qi, e, one])
                                    with T.init():
                                        Oacc[vb, vh, vq, vi, ve] = T.if_then_else(
                                            vt == 0, T.float32(0), Oacc[vb, vh, vq, vi, ve] * Arow[vi])
                                    Oacc[vb, vh, vq, vi, ve] += S[vi + vone, ve]
                        else:
                            for _ in range(1):
                                with T.sblock("output_update"):
                                    T.reads(P[0:TQ, 0:G], Vs[vb, vh, vq, vt, 0:G, 0:D],
                                            Alpha[vb, vh, vq, vt % 2, 0:TQ], Oacc[vb, vh, vq, 0:TQ, 0:D])
                                    T.writes(Oacc[vb, vh, vq, 0:TQ, 0:D])
                                    for qi, e, j in T.grid(TQ, D, G):
                                        with T.sblock("pv"):
                                            vi, ve, vj = T.axis.remap("SSR", [qi, e, j])
                                            with T.init():
                                                Oacc[vb, vh, vq, vi, ve] = T.if_then_else(
                                                    vt == 0, T.float32(0),
                                                    Oacc[vb, vh, vq, vi, ve] * Alpha[vb, vh, vq, vt % 2, vi])
                                            if granule_live(vq, vt):
                                                Oacc[vb, vh, vq, vi, ve] += T.Cast("float32", P[vi, vj]) * T.Cast(
                                                    "float32", Vs[vb, vh, vq, vt, vj, ve])
                for qi, e in T.grid(TQ, D):
                    with T.sblock("O"):
                        vb, vh, vq, vi, ve = T.axis.remap("SSSSS", [b, h, qt, qi, e])
                        T.where(qt * TQ + qi < QL)
                        O[vb, vh, vq * TQ + vi, ve] = T.Cast(dtype, Oacc[vb, vh, vq, vi, ve] / L[vb, vh, vq, vi])

    return main


def fused_prim_funcs(workload, gpu=None) -> dict:
    """Fused templates that apply to an attention workload: {template name: PrimFunc}. ``gpu`` (a
    GpuSpec) bounds the shared memory of the tensor-core prefill tiles (default: 48 KiB, static)."""
    if workload.family != "attention":
        return {}
    p = workload.params
    funcs = {}
    shape = (p["batch"], p["heads"], p["q_len"], p["kv_len"], p["head_dim"], p["causal"], p["dtype"])
    if p["q_len"] <= DECODE_MAX_Q:
        funcs["split_kv_decode"] = split_kv_decode(*shape)
    else:
        # A target that allows more than 48 KiB per block gets dynamic shared memory in every
        # prefill template (a static allocation beyond 48 KiB does not build), and wmma templates with
        # the larger query tiles that fit.
        max_shared = gpu.max_shared_memory_per_block if gpu is not None else STATIC_SHARED_BYTES
        scope = "shared.dyn" if max_shared > STATIC_SHARED_BYTES else "shared"
        for q_tile in prefill_q_tiles(p["q_len"], p["head_dim"]):
            funcs[f"flash_prefill_q{q_tile}"] = flash_prefill(*shape, q_tile=q_tile, shared_scope=scope)
        if p["head_dim"] % 16 == 0:  # wmma tiles of 16 over head_dim
            for granule in PREFILL_TC_GRANULES:
                if granule > PREFILL_GRANULE and max_shared <= STATIC_SHARED_BYTES:
                    continue  # larger granules only with dynamic shared memory
                if granule > max(PREFILL_GRANULE, -(-p["kv_len"] // 32) * 32):
                    continue
                tiles = prefill_q_tiles(p["q_len"], p["head_dim"], True, max_shared, granule)
                if granule > PREFILL_GRANULE:  # a 32-row tile gains little from them (sim, d128)
                    tiles = [t for t in tiles if t >= 64]
                suffix = "" if granule == PREFILL_GRANULE else f"_g{granule}"
                for q_tile in tiles:
                    funcs[f"flash_prefill_wmma_q{q_tile}{suffix}"] = flash_prefill(
                        *shape, q_tile=q_tile, granule=granule, tensor_cores=True, shared_scope=scope)
    return funcs
