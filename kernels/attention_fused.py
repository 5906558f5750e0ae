"""Fused attention as TIR templates: the same computation as kernels/attention.py, as PrimFuncs that a
custom schedule rule (search_space/attention_rules.py) tiles and binds.

Split-KV decode (flash-decoding). The KV length is cut into ``slots`` of ``chunk`` keys (the tail slot
guarded). A partial kernel computes, per query row and slot, the slot's score max, exp-sum and
unnormalised output (fp32); a merge kernel rescales the slots' partials to the global max and
normalises. Within a slot the keys are visited as ``chunk // phases`` steps of ``phases`` rows, so that
the rows a thread owns are the same in every block of the partial kernel (their scores then stay in
registers) whatever the schedule picks for the threads over rows (a divisor of ``phases``).

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
            for b, h, i, s in T.grid(B, H, QL, NS):
                for e in range(D):
                    with T.sblock("q_load"):
                        vb, vh, vi, ve = T.axis.remap("SSSS", [b, h, i, e])
                        T.sblock_attr({"schedule_rule": "etune_split_kv_decode"})
                        Ql[vb, vh, vi, ve] = Q[vb, vh, vi, ve]
                for k, r, e in T.grid(C // R, R, D):
                    with T.sblock("qk"):
                        vb, vh, vi, vs, vk, vr, ve = T.axis.remap("SSSSSSR", [b, h, i, s, k, r, e])
                        with T.init():
                            S[vb, vh, vi, vs, vk, vr] = T.float32(0)
                        S[vb, vh, vi, vs, vk, vr] += T.Cast("float32", Ql[vb, vh, vi, ve]) * T.Cast(
                            "float32", K[vb, vh, T.min(vs * C + vk * R + vr, last), ve])
                for k, r in T.grid(C // R, R):
                    with T.sblock("row_max"):
                        vb, vh, vi, vs, vk, vr = T.axis.remap("SSSSRR", [b, h, i, s, k, r])
                        with T.init():
                            Mx[vb, vh, vi, vs] = T.min_value("float32")
                        Mx[vb, vh, vi, vs] = T.max(Mx[vb, vh, vi, vs], T.if_then_else(
                            visible(vi, vs * C + vk * R + vr), S[vb, vh, vi, vs, vk, vr] * T.float32(scale),
                            T.min_value("float32")))
                for k, r in T.grid(C // R, R):
                    with T.sblock("prob"):
                        vb, vh, vi, vs, vk, vr = T.axis.remap("SSSSSS", [b, h, i, s, k, r])
                        P[vb, vh, vi, vs, vk, vr] = T.exp2(T.if_then_else(
                            visible(vi, vs * C + vk * R + vr), S[vb, vh, vi, vs, vk, vr] * T.float32(scale),
                            T.min_value("float32")) - Mx[vb, vh, vi, vs])
                for k, r in T.grid(C // R, R):
                    with T.sblock("row_sum"):
                        vb, vh, vi, vs, vk, vr = T.axis.remap("SSSSRR", [b, h, i, s, k, r])
                        with T.init():
                            Lx[vb, vh, vi, vs] = T.float32(0)
                        Lx[vb, vh, vi, vs] += P[vb, vh, vi, vs, vk, vr]
                for r, e, k in T.grid(R, D, C // R):
                    with T.sblock("pv"):
                        vb, vh, vi, vs, vr, ve, vk = T.axis.remap("SSSSSSR", [b, h, i, s, r, e, k])
                        with T.init():
                            Oacc[vb, vh, vi, vs, vr, ve] = T.float32(0)
                        Oacc[vb, vh, vi, vs, vr, ve] += P[vb, vh, vi, vs, vk, vr] * T.Cast(
                            "float32", V[vb, vh, T.min(vs * C + vk * R + vr, last), ve])
                for r, e in T.grid(R, D):
                    with T.sblock("pv_store"):
                        vb, vh, vi, vs, vr, ve = T.axis.remap("SSSSSS", [b, h, i, s, r, e])
                        Opart[vb, vh, vi, vs, vr, ve] = Oacc[vb, vh, vi, vs, vr, ve]
                for e, r in T.grid(D, R):
                    with T.sblock("pv_sum"):
                        vb, vh, vi, vs, ve, vr = T.axis.remap("SSSSSR", [b, h, i, s, e, r])
                        with T.init():
                            Ox[vb, vh, vi, vs, ve] = T.float32(0)
                        Ox[vb, vh, vi, vs, ve] += Opart[vb, vh, vi, vs, vr, ve]
                for e in range(D):
                    with T.sblock("store_partial"):
                        vb, vh, vi, vs, ve = T.axis.remap("SSSSS", [b, h, i, s, e])
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


def fused_prim_funcs(workload) -> dict:
    """Fused templates that apply to an attention workload: {template name: PrimFunc}."""
    if workload.family != "attention":
        return {}
    p = workload.params
    funcs = {}
    if p["q_len"] <= DECODE_MAX_Q:
        funcs["split_kv_decode"] = split_kv_decode(p["batch"], p["heads"], p["q_len"], p["kv_len"], p["head_dim"],
                                                   p["causal"], p["dtype"])
    return funcs
