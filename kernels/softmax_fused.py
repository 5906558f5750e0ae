"""Row softmax as TIR templates: the same computation as kernels/softmax.py, as PrimFuncs that a custom
schedule rule (search_space/softmax_rules.py) tiles, binds and vectorises.

Each row is viewed as ``NI`` lines of ``W`` columns (column ``c = i * W + w``; the last line guarded
where ``W`` does not divide the row). Threads own whole vectors of a line and consecutive lines, so the
per-thread slice of every row-shaped buffer is a compact ``items x vector`` array: the row stays in
registers.

- ``row_in_registers`` (one kernel): each row is read once into registers (fp32), its max and sum are
  reduced across the row's threads, and the output written from registers.
- ``split_row`` (two kernels, for long rows with few rows): a row is cut into ``P`` parts of ``G`` lines.
  A partial kernel reduces each part to its max and exp-sum (the part in registers); a second kernel
  merges a row's ``P`` partials (online-softmax rescaling) and writes the part's output, re-reading
  its input (from L2: a few rows of a long vocabulary fit).

Guards are written so that they do not depend on the lanes of an aligned vector: a column group of
``A = gcd(cols, 8)`` columns is either all inside the row or all outside it, and the rule only picks
vector widths that divide ``A``. Arguments (X, Y) are those of the TE workload, so references,
builds, export and measurement work unchanged.
"""
from __future__ import annotations

import math

# Widest line (columns) a row is cut into: 32 lanes x 8 halves, a warp's 16-byte loads.
MAX_LINE = 256
# Rows longer than this never get the whole row in one block's registers (1024 threads x 32 fp32).
MAX_ROW_IN_REGISTERS = 32 * 1024
# Fewer rows than this (about two H100/H200 waves of one block per SM) leave SMs idle with a block
# per row: the split template is offered.
FEW_ROWS = 256
# Columns per part of a split row at most (a part sits in one block's registers), and parts per row
# aimed at: enough blocks for every SM with the few rows that remain.
MAX_PART = 16 * 1024
TARGET_BLOCKS = 4 * 132
# Parts per row at most where the row allows (one thread merges a row's partials, serially), and
# columns per part at least (each block of the second kernel reads all of its row's partials).
MAX_PARTS = 64
MIN_PART = 1024


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def line_width(cols: int) -> int:
    """Columns per line: a power of two, at most MAX_LINE, at least 8 (one 16-byte vector)."""
    return max(8, min(MAX_LINE, _next_pow2(cols)))


def alignment(cols: int) -> int:
    """Columns per group that is never split by the row's end (gcd(cols, 8)): the widest safe vector."""
    return math.gcd(cols, 8)


def split_parts(rows: int, cols: int) -> tuple[int, int]:
    """(parts per row P, lines per part G), both powers of two, P * G * line_width >= cols."""
    width = line_width(cols)
    lines = -(-cols // width)
    parts = min(MAX_PARTS, _next_pow2(-(-TARGET_BLOCKS // rows)), 1 << max(1, (cols // MIN_PART).bit_length() - 1))
    parts = max(parts, _next_pow2(-(-cols // MAX_PART)))
    group = _next_pow2(-(-lines // parts))
    parts = min(parts, _next_pow2(-(-lines // group)))
    return parts, group


def _inside(cols: int, width: int):
    """The in-row test of line ``i``, column ``w``: a guard in the block body (not a block predicate,
    which MetaSchedule's loop transformations reject here), or None where lines tile the row."""
    if cols % width == 0:
        return None
    return lambda i, w: i * width + w < cols


def row_in_registers(rows: int, cols: int, dtype: str = "float16"):
    """One kernel: a row read once into registers, reduced, normalised and written from registers."""
    import tvm
    from tvm.script import tirx as T

    R, C = int(rows), int(cols)
    W = line_width(C)
    NI = -(-C // W)
    inside = _inside(C, W)
    lowest = tvm.tirx.min_value("float32")
    true = tvm.tirx.const(True, "bool")

    def valid(i, w):
        return true if inside is None else inside(i, w)

    # Columns past the row's end are never read or written; in registers they hold the lowest float,
    # whose exp is 0, so the reductions need no guard.
    @T.prim_func(s_tir=True)
    def main(X: T.Buffer((R, C), dtype), Y: T.Buffer((R, C), dtype)):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        with T.sblock("root"):
            Xv = T.sblock_alloc_buffer((R, NI, W), dtype, scope="local")
            Xl = T.sblock_alloc_buffer((R, NI, W), "float32", scope="local")
            Mx = T.sblock_alloc_buffer((R,), "float32", scope="local")
            E = T.sblock_alloc_buffer((R, NI, W), "float32", scope="local")
            Sm = T.sblock_alloc_buffer((R,), "float32", scope="local")
            Yv = T.sblock_alloc_buffer((R, NI, W), dtype, scope="local")
            for r in range(R):
                for i, w in T.grid(NI, W):
                    with T.sblock("x_vec"):
                        vr, vi, vw = T.axis.remap("SSS", [r, i, w])
                        T.sblock_attr({"schedule_rule": "etune_softmax_row_in_registers"})
                        if valid(vi, vw):
                            Xv[vr, vi, vw] = X[vr, vi * W + vw]
                for i, w in T.grid(NI, W):
                    with T.sblock("x_f32"):
                        vr, vi, vw = T.axis.remap("SSS", [r, i, w])
                        Xl[vr, vi, vw] = T.if_then_else(valid(vi, vw), T.Cast("float32", Xv[vr, vi, vw]), lowest)
                for i, w in T.grid(NI, W):
                    with T.sblock("row_max"):
                        vr, vi, vw = T.axis.remap("SRR", [r, i, w])
                        with T.init():
                            Mx[vr] = lowest
                        Mx[vr] = T.max(Mx[vr], Xl[vr, vi, vw])
                for i, w in T.grid(NI, W):
                    with T.sblock("exp"):
                        vr, vi, vw = T.axis.remap("SSS", [r, i, w])
                        E[vr, vi, vw] = T.exp(Xl[vr, vi, vw] - Mx[vr])
                for i, w in T.grid(NI, W):
                    with T.sblock("row_sum"):
                        vr, vi, vw = T.axis.remap("SRR", [r, i, w])
                        with T.init():
                            Sm[vr] = T.float32(0)
                        Sm[vr] = Sm[vr] + E[vr, vi, vw]
                for i, w in T.grid(NI, W):
                    with T.sblock("y_f16"):
                        vr, vi, vw = T.axis.remap("SSS", [r, i, w])
                        Yv[vr, vi, vw] = T.Cast(dtype, E[vr, vi, vw] / Sm[vr])
                for i, w in T.grid(NI, W):
                    with T.sblock("y_vec"):
                        vr, vi, vw = T.axis.remap("SSS", [r, i, w])
                        if valid(vi, vw):
                            Y[vr, vi * W + vw] = Yv[vr, vi, vw]

    return main


def split_row(rows: int, cols: int, dtype: str = "float16"):
    """Two kernels: per part of a row its max and exp-sum (the part in registers); then per part the
    row's partials merged and the part normalised (its input read again, from L2 where it fits)."""
    import tvm
    from tvm.script import tirx as T

    R, C = int(rows), int(cols)
    W = line_width(C)
    P, G = split_parts(R, C)
    inside = _inside(C, W)
    lowest = tvm.tirx.min_value("float32")
    true = tvm.tirx.const(True, "bool")

    def valid(p, i, w):
        return true if inside is None else inside(p * G + i, w)

    def column(p, i, w):
        return (p * G + i) * W + w

    @T.prim_func(s_tir=True)
    def main(X: T.Buffer((R, C), dtype), Y: T.Buffer((R, C), dtype)):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        with T.sblock("root"):
            Xv = T.sblock_alloc_buffer((R, P, G, W), dtype, scope="local")
            Xl = T.sblock_alloc_buffer((R, P, G, W), "float32", scope="local")
            Mx = T.sblock_alloc_buffer((R, P), "float32", scope="local")
            E = T.sblock_alloc_buffer((R, P, G, W), "float32", scope="local")
            Sm = T.sblock_alloc_buffer((R, P), "float32", scope="local")
            # The parts' partials: the only global intermediates (8 bytes per part).
            Mp = T.sblock_alloc_buffer((R, P), "float32")
            Lp = T.sblock_alloc_buffer((R, P), "float32")
            Gl = T.sblock_alloc_buffer((R, P), "float32", scope="local")
            Dl = T.sblock_alloc_buffer((R, P), "float32", scope="local")
            Gm = T.sblock_alloc_buffer((R, P), "float32", scope="shared")
            Den = T.sblock_alloc_buffer((R, P), "float32", scope="shared")
            Xv2 = T.sblock_alloc_buffer((R, P, G, W), dtype, scope="local")
            Yv = T.sblock_alloc_buffer((R, P, G, W), dtype, scope="local")
            for r, p in T.grid(R, P):
                for i, w in T.grid(G, W):
                    with T.sblock("x_vec"):
                        vr, vp, vi, vw = T.axis.remap("SSSS", [r, p, i, w])
                        T.sblock_attr({"schedule_rule": "etune_softmax_split_row"})
                        if valid(vp, vi, vw):
                            Xv[vr, vp, vi, vw] = X[vr, column(vp, vi, vw)]
                for i, w in T.grid(G, W):
                    with T.sblock("x_f32"):
                        vr, vp, vi, vw = T.axis.remap("SSSS", [r, p, i, w])
                        Xl[vr, vp, vi, vw] = T.if_then_else(
                            valid(vp, vi, vw), T.Cast("float32", Xv[vr, vp, vi, vw]), lowest)
                for i, w in T.grid(G, W):
                    with T.sblock("part_max"):
                        vr, vp, vi, vw = T.axis.remap("SSRR", [r, p, i, w])
                        with T.init():
                            Mx[vr, vp] = lowest
                        Mx[vr, vp] = T.max(Mx[vr, vp], Xl[vr, vp, vi, vw])
                for i, w in T.grid(G, W):
                    with T.sblock("exp"):
                        vr, vp, vi, vw = T.axis.remap("SSSS", [r, p, i, w])
                        E[vr, vp, vi, vw] = T.exp(Xl[vr, vp, vi, vw] - Mx[vr, vp])
                for i, w in T.grid(G, W):
                    with T.sblock("part_sum"):
                        vr, vp, vi, vw = T.axis.remap("SSRR", [r, p, i, w])
                        with T.init():
                            Sm[vr, vp] = T.float32(0)
                        Sm[vr, vp] = Sm[vr, vp] + E[vr, vp, vi, vw]
                for i, w in T.grid(G, W):
                    with T.sblock("store_partial"):
                        vr, vp, vi, vw = T.axis.remap("SSSS", [r, p, i, w])
                        T.reads(Mx[vr, vp], Sm[vr, vp])
                        T.writes(Mp[vr, vp], Lp[vr, vp])
                        if vi * W + vw == 0:  # one writer per part
                            Mp[vr, vp] = Mx[vr, vp]
                            Lp[vr, vp] = Sm[vr, vp]
            for r, p in T.grid(R, P):
                for i, w in T.grid(G, W):
                    with T.sblock("merge"):
                        vr, vp, vi, vw = T.axis.remap("SSSS", [r, p, i, w])
                        T.reads(Mp[vr, 0:P], Lp[vr, 0:P])
                        T.writes(Gm[vr, vp], Den[vr, vp], Gl[vr, vp], Dl[vr, vp])
                        # One thread merges the row's P partials (rescaled to the row's max) in
                        # registers and hands them over in shared memory: P loads per block, not
                        # P per thread.
                        if vi * W + vw == 0:
                            Gl[vr, vp] = lowest
                            for q in range(P):
                                Gl[vr, vp] = T.max(Gl[vr, vp], Mp[vr, q])
                            Dl[vr, vp] = T.float32(0)
                            for q in range(P):
                                Dl[vr, vp] = Dl[vr, vp] + T.exp(Mp[vr, q] - Gl[vr, vp]) * Lp[vr, q]
                            Gm[vr, vp] = Gl[vr, vp]
                            Den[vr, vp] = Dl[vr, vp]
                for i, w in T.grid(G, W):
                    with T.sblock("x2_vec"):
                        vr, vp, vi, vw = T.axis.remap("SSSS", [r, p, i, w])
                        if valid(vp, vi, vw):
                            Xv2[vr, vp, vi, vw] = X[vr, column(vp, vi, vw)]
                for i, w in T.grid(G, W):
                    with T.sblock("y_f16"):
                        vr, vp, vi, vw = T.axis.remap("SSSS", [r, p, i, w])
                        Yv[vr, vp, vi, vw] = T.Cast(
                            dtype, T.exp(T.Cast("float32", Xv2[vr, vp, vi, vw]) - Gm[vr, vp]) / Den[vr, vp])
                for i, w in T.grid(G, W):
                    with T.sblock("y_vec"):
                        vr, vp, vi, vw = T.axis.remap("SSSS", [r, p, i, w])
                        if valid(vp, vi, vw):
                            Y[vr, column(vp, vi, vw)] = Yv[vr, vp, vi, vw]

    return main


def softmax_prim_funcs(workload) -> dict:
    """Row-softmax templates that apply to a workload: {template name: PrimFunc}."""
    if workload.family != "softmax":
        return {}
    p = workload.params
    funcs = {}
    if p["cols"] <= MAX_ROW_IN_REGISTERS:
        funcs["row_in_registers"] = row_in_registers(p["rows"], p["cols"], p["dtype"])
    if p["rows"] < FEW_ROWS or p["cols"] > MAX_ROW_IN_REGISTERS:
        funcs["split_row"] = split_row(p["rows"], p["cols"], p["dtype"])
    return funcs
