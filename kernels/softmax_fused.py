"""Row softmax as TIR templates: the same computation as kernels/softmax.py, as PrimFuncs that a custom
schedule rule (search_space/softmax_rules.py) tiles, binds and vectorises.

Each row is read through a window that starts at the last 16-byte boundary at or before the row
(``head`` = (row x cols) mod 8 halves earlier; 0 when 8 divides cols), viewed as ``NI`` lines of ``W``
columns, each line as groups of 8 halves (position ``p = i * W + g * 8 + l``, column ``p - head``).
Every group therefore starts on a 16-byte boundary whatever the row length:

- groups wholly inside the row are loaded and stored as vectors (the rule picks 1 to 8 halves per
  access; a vector never leaves its group, so the guard is the same for all its lanes);
- the row's first and last groups, which it may share with its neighbours when 8 does not divide
  cols (a vocabulary of 50257, say), are loaded and stored one half at a time, each half guarded;
- positions outside the row hold the lowest float in registers (its exp is 0), so the reductions
  need no guard.

Threads own whole vectors and consecutive lines, so the per-thread slice of every row-shaped buffer
is a compact ``items x vector`` array: the row stays in registers.

- ``row_in_registers`` (one kernel): each row is read once into registers (fp32), its max and sum are
  reduced across the row's threads, and the output written from registers.
- ``split_row`` (two kernels, for long rows with few rows): a row is cut into ``P`` parts of ``G`` lines.
  A partial kernel reduces each part to its max and exp-sum (the part in registers); a second kernel
  merges a row's ``P`` partials (online-softmax rescaling) and writes the part's output, re-reading
  its input (from L2: a few rows of a long vocabulary fit).

Arguments (X, Y) are those of the TE workload, so references, builds, export and measurement work
unchanged.
"""
from __future__ import annotations

import math

# Halves per aligned group: one 16-byte vector.
GROUP = 8
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


def next_pow2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def line_width(cols: int) -> int:
    """Columns per line: a power of two, at most MAX_LINE, at least 8 (one 16-byte vector)."""
    return max(8, min(MAX_LINE, next_pow2(cols)))


def has_edges(cols: int) -> bool:
    """Whether rows share 16-byte groups with their neighbours (then the edge groups go half by half)."""
    return cols % GROUP != 0


def window_lines(cols: int, width: int) -> int:
    """Lines of ``width`` that cover a row's window (the row and at most 7 halves before it)."""
    head = 0 if not has_edges(cols) else GROUP - math.gcd(cols, GROUP)
    return -(-(cols + head) // width)


class _Window:
    """TIR expressions of a row's window (see the module's docstring); ``line`` counts lines of ``W``."""

    def __init__(self, cols: int, width: int):
        from tvm import tirx

        self.tir = tirx
        self.C, self.W = cols, width
        self.edges = has_edges(cols)
        self.exact = not self.edges and cols % width == 0  # the lines tile every row: no guard at all

    def head(self, r):
        """Halves of the window before the row: (r x cols) mod 8."""
        return self.tir.floormod(r * self.C, GROUP) if self.edges else 0

    def flat(self, r, line, g, l):
        """Index into the flat input or output: the row's window starts on a multiple of 8 halves, and
        written so that TVM's codegen can see it (it emits a vector access only for a base it can
        prove aligned)."""
        start = self.tir.floordiv(r * self.C, GROUP) * GROUP if self.edges else r * self.C
        return start + line * self.W + g * GROUP + l

    def inside(self, r, line, g, l):
        """The position holds a column of the row."""
        if self.exact:
            return self.tir.const(True, "bool")
        p = line * self.W + g * GROUP + l
        return self.tir.all(self.head(r) <= p, p < self.head(r) + self.C) if self.edges else p < self.C

    def full(self, r, line, g):
        """The whole group is inside the row (constant over its lanes)."""
        if self.exact:
            return self.tir.const(True, "bool")
        start = line * self.W + g * GROUP
        if not self.edges:
            return start < self.C
        return self.tir.all(self.head(r) <= start, start + GROUP <= self.head(r) + self.C)

    def partial(self, r, line, g):
        return self.tir.Not(self.full(r, line, g))

    # The two groups a row may share with its neighbours, as equality tests (one group of the window
    # each; analysis.py counts the accesses under such a guard once, not once per group).
    def first_group(self, line, g):
        return line * (self.W // GROUP) + g == 0

    def last_group(self, r, line, g):
        return line * (self.W // GROUP) + g == (self.head(r) + self.C) // GROUP


def split_parts(rows: int, cols: int) -> tuple[int, int]:
    """(parts per row P, lines per part G), both powers of two, P * G * line_width >= cols."""
    width = line_width(cols)
    lines = window_lines(cols, width)
    parts = min(MAX_PARTS, next_pow2(-(-TARGET_BLOCKS // rows)), 1 << max(1, (cols // MIN_PART).bit_length() - 1))
    parts = max(parts, next_pow2(-(-cols // MAX_PART)))
    group = next_pow2(-(-lines // parts))
    parts = min(parts, next_pow2(-(-lines // group)))
    return parts, group


def row_in_registers(rows: int, cols: int, dtype: str = "float16"):
    """One kernel: a row read once into registers, reduced, normalised and written from registers."""
    import tvm
    from tvm.script import tirx as T

    R, C = int(rows), int(cols)
    W = line_width(C)
    NI, NG = window_lines(C, W), W // GROUP
    win = _Window(C, W)
    lowest = tvm.tirx.min_value("float32")

    @T.prim_func(s_tir=True)
    def main(X: T.Buffer((R, C), dtype), Y: T.Buffer((R, C), dtype)):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        with T.sblock("root"):
            Xf = T.decl_buffer((R * C,), dtype, data=X.data)
            Yf = T.decl_buffer((R * C,), dtype, data=Y.data)
            Xv = T.sblock_alloc_buffer((R, NI, W), dtype, scope="local")
            Xl = T.sblock_alloc_buffer((R, NI, W), "float32", scope="local")
            Mx = T.sblock_alloc_buffer((R,), "float32", scope="local")
            E = T.sblock_alloc_buffer((R, NI, W), "float32", scope="local")
            Sm = T.sblock_alloc_buffer((R,), "float32", scope="local")
            Yv = T.sblock_alloc_buffer((R, NI, W), dtype, scope="local")
            for r in range(R):
                for i, g, l in T.grid(NI, NG, GROUP):
                    with T.sblock("x_vec"):
                        vr, vi, vg, vl = T.axis.remap("SSSS", [r, i, g, l])
                        T.sblock_attr({"schedule_rule": "etune_softmax_row_in_registers"})
                        if win.full(vr, vi, vg):
                            Xv[vr, vi, vg * GROUP + vl] = Xf[win.flat(vr, vi, vg, vl)]
                if win.edges:
                    for i, g, l in T.grid(NI, NG, GROUP):
                        with T.sblock("x_first"):
                            vr, vi, vg, vl = T.axis.remap("SSSS", [r, i, g, l])
                            if win.first_group(vi, vg):
                                if win.partial(vr, vi, vg):
                                    if win.inside(vr, vi, vg, vl):
                                        Xv[vr, vi, vg * GROUP + vl] = Xf[win.flat(vr, vi, vg, vl)]
                    for i, g, l in T.grid(NI, NG, GROUP):
                        with T.sblock("x_last"):
                            vr, vi, vg, vl = T.axis.remap("SSSS", [r, i, g, l])
                            if win.last_group(vr, vi, vg):
                                if win.partial(vr, vi, vg):
                                    if win.inside(vr, vi, vg, vl):
                                        Xv[vr, vi, vg * GROUP + vl] = Xf[win.flat(vr, vi, vg, vl)]
                for i, g, l in T.grid(NI, NG, GROUP):
                    with T.sblock("x_f32"):
                        vr, vi, vg, vl = T.axis.remap("SSSS", [r, i, g, l])
                        Xl[vr, vi, vg * GROUP + vl] = T.if_then_else(
                            win.inside(vr, vi, vg, vl), T.Cast("float32", Xv[vr, vi, vg * GROUP + vl]), lowest)
                for i, g, l in T.grid(NI, NG, GROUP):
                    with T.sblock("row_max"):
                        vr, vi, vg, vl = T.axis.remap("SRRR", [r, i, g, l])
                        with T.init():
                            Mx[vr] = lowest
                        Mx[vr] = T.max(Mx[vr], Xl[vr, vi, vg * GROUP + vl])
                for i, g, l in T.grid(NI, NG, GROUP):
                    with T.sblock("exp"):
                        vr, vi, vg, vl = T.axis.remap("SSSS", [r, i, g, l])
                        E[vr, vi, vg * GROUP + vl] = T.exp(Xl[vr, vi, vg * GROUP + vl] - Mx[vr])
                for i, g, l in T.grid(NI, NG, GROUP):
                    with T.sblock("row_sum"):
                        vr, vi, vg, vl = T.axis.remap("SRRR", [r, i, g, l])
                        with T.init():
                            Sm[vr] = T.float32(0)
                        Sm[vr] = Sm[vr] + E[vr, vi, vg * GROUP + vl]
                for i, g, l in T.grid(NI, NG, GROUP):
                    with T.sblock("y_f16"):
                        vr, vi, vg, vl = T.axis.remap("SSSS", [r, i, g, l])
                        Yv[vr, vi, vg * GROUP + vl] = T.Cast(dtype, E[vr, vi, vg * GROUP + vl] / Sm[vr])
                for i, g, l in T.grid(NI, NG, GROUP):
                    with T.sblock("y_vec"):
                        vr, vi, vg, vl = T.axis.remap("SSSS", [r, i, g, l])
                        if win.full(vr, vi, vg):
                            Yf[win.flat(vr, vi, vg, vl)] = Yv[vr, vi, vg * GROUP + vl]
                if win.edges:
                    for i, g, l in T.grid(NI, NG, GROUP):
                        with T.sblock("y_first"):
                            vr, vi, vg, vl = T.axis.remap("SSSS", [r, i, g, l])
                            if win.first_group(vi, vg):
                                if win.partial(vr, vi, vg):
                                    if win.inside(vr, vi, vg, vl):
                                        Yf[win.flat(vr, vi, vg, vl)] = Yv[vr, vi, vg * GROUP + vl]
                    for i, g, l in T.grid(NI, NG, GROUP):
                        with T.sblock("y_last"):
                            vr, vi, vg, vl = T.axis.remap("SSSS", [r, i, g, l])
                            if win.last_group(vr, vi, vg):
                                if win.partial(vr, vi, vg):
                                    if win.inside(vr, vi, vg, vl):
                                        Yf[win.flat(vr, vi, vg, vl)] = Yv[vr, vi, vg * GROUP + vl]

    return main


def split_row(rows: int, cols: int, dtype: str = "float16"):
    """Two kernels: per part of a row its max and exp-sum (the part in registers); then per part the
    row's partials merged and the part normalised (its input read again, from L2 where it fits)."""
    import tvm
    from tvm.script import tirx as T

    R, C = int(rows), int(cols)
    W = line_width(C)
    P, G = split_parts(R, C)
    NG = W // GROUP
    win = _Window(C, W)
    lowest = tvm.tirx.min_value("float32")

    @T.prim_func(s_tir=True)
    def main(X: T.Buffer((R, C), dtype), Y: T.Buffer((R, C), dtype)):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        with T.sblock("root"):
            Xf = T.decl_buffer((R * C,), dtype, data=X.data)
            Yf = T.decl_buffer((R * C,), dtype, data=Y.data)
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
                for i, g, l in T.grid(G, NG, GROUP):
                    with T.sblock("x_vec"):
                        vr, vp, vi, vg, vl = T.axis.remap("SSSSS", [r, p, i, g, l])
                        T.sblock_attr({"schedule_rule": "etune_softmax_split_row"})
                        if win.full(vr, vp * G + vi, vg):
                            Xv[vr, vp, vi, vg * GROUP + vl] = Xf[win.flat(vr, vp * G + vi, vg, vl)]
                if win.edges:
                    for i, g, l in T.grid(G, NG, GROUP):
                        with T.sblock("x_first"):
                            vr, vp, vi, vg, vl = T.axis.remap("SSSSS", [r, p, i, g, l])
                            if win.first_group(vp * G + vi, vg):
                                if win.partial(vr, vp * G + vi, vg):
                                    if win.inside(vr, vp * G + vi, vg, vl):
                                        Xv[vr, vp, vi, vg * GROUP + vl] = Xf[win.flat(vr, vp * G + vi, vg, vl)]
                    for i, g, l in T.grid(G, NG, GROUP):
                        with T.sblock("x_last"):
                            vr, vp, vi, vg, vl = T.axis.remap("SSSSS", [r, p, i, g, l])
                            if win.last_group(vr, vp * G + vi, vg):
                                if win.partial(vr, vp * G + vi, vg):
                                    if win.inside(vr, vp * G + vi, vg, vl):
                                        Xv[vr, vp, vi, vg * GROUP + vl] = Xf[win.flat(vr, vp * G + vi, vg, vl)]
                for i, g, l in T.grid(G, NG, GROUP):
                    with T.sblock("x_f32"):
                        vr, vp, vi, vg, vl = T.axis.remap("SSSSS", [r, p, i, g, l])
                        Xl[vr, vp, vi, vg * GROUP + vl] = T.if_then_else(
                            win.inside(vr, vp * G + vi, vg, vl), T.Cast("float32", Xv[vr, vp, vi, vg * GROUP + vl]),
                            lowest)
                for i, g, l in T.grid(G, NG, GROUP):
                    with T.sblock("part_max"):
                        vr, vp, vi, vg, vl = T.axis.remap("SSRRR", [r, p, i, g, l])
                        with T.init():
                            Mx[vr, vp] = lowest
                        Mx[vr, vp] = T.max(Mx[vr, vp], Xl[vr, vp, vi, vg * GROUP + vl])
                for i, g, l in T.grid(G, NG, GROUP):
                    with T.sblock("exp"):
                        vr, vp, vi, vg, vl = T.axis.remap("SSSSS", [r, p, i, g, l])
                        E[vr, vp, vi, vg * GROUP + vl] = T.exp(Xl[vr, vp, vi, vg * GROUP + vl] - Mx[vr, vp])
                for i, g, l in T.grid(G, NG, GROUP):
                    with T.sblock("part_sum"):
                        vr, vp, vi, vg, vl = T.axis.remap("SSRRR", [r, p, i, g, l])
                        with T.init():
                            Sm[vr, vp] = T.float32(0)
                        Sm[vr, vp] = Sm[vr, vp] + E[vr, vp, vi, vg * GROUP + vl]
                for i, g, l in T.grid(G, NG, GROUP):
                    with T.sblock("store_partial"):
                        vr, vp, vi, vg, vl = T.axis.remap("SSSSS", [r, p, i, g, l])
                        T.reads(Mx[vr, vp], Sm[vr, vp])
                        T.writes(Mp[vr, vp], Lp[vr, vp])
                        if (vi * NG + vg) * GROUP + vl == 0:  # one writer per part
                            Mp[vr, vp] = Mx[vr, vp]
                            Lp[vr, vp] = Sm[vr, vp]
            for r, p in T.grid(R, P):
                for i, g, l in T.grid(G, NG, GROUP):
                    with T.sblock("merge"):
                        vr, vp, vi, vg, vl = T.axis.remap("SSSSS", [r, p, i, g, l])
                        T.reads(Mp[vr, 0:P], Lp[vr, 0:P])
                        T.writes(Gm[vr, vp], Den[vr, vp], Gl[vr, vp], Dl[vr, vp])
                        # One thread merges the row's P partials (rescaled to the row's max) in
                        # registers and hands them over in shared memory: P loads per block, not
                        # P per thread. (A merge reduced across the block's threads was tried: its
                        # guarded loads count in every thread in analysis.py, so sim charged it
                        # 5-30x its traffic; this one's serial latency is hidden by co-resident blocks.)
                        if (vi * NG + vg) * GROUP + vl == 0:
                            Gl[vr, vp] = lowest
                            for q in range(P):
                                Gl[vr, vp] = T.max(Gl[vr, vp], Mp[vr, q])
                            Dl[vr, vp] = T.float32(0)
                            for q in range(P):
                                Dl[vr, vp] = Dl[vr, vp] + T.exp(Mp[vr, q] - Gl[vr, vp]) * Lp[vr, q]
                            Gm[vr, vp] = Gl[vr, vp]
                            Den[vr, vp] = Dl[vr, vp]
                for i, g, l in T.grid(G, NG, GROUP):
                    with T.sblock("x2_vec"):
                        vr, vp, vi, vg, vl = T.axis.remap("SSSSS", [r, p, i, g, l])
                        if win.full(vr, vp * G + vi, vg):
                            Xv2[vr, vp, vi, vg * GROUP + vl] = Xf[win.flat(vr, vp * G + vi, vg, vl)]
                if win.edges:
                    for i, g, l in T.grid(G, NG, GROUP):
                        with T.sblock("x2_first"):
                            vr, vp, vi, vg, vl = T.axis.remap("SSSSS", [r, p, i, g, l])
                            if win.first_group(vp * G + vi, vg):
                                if win.partial(vr, vp * G + vi, vg):
                                    if win.inside(vr, vp * G + vi, vg, vl):
                                        Xv2[vr, vp, vi, vg * GROUP + vl] = Xf[win.flat(vr, vp * G + vi, vg, vl)]
                    for i, g, l in T.grid(G, NG, GROUP):
                        with T.sblock("x2_last"):
                            vr, vp, vi, vg, vl = T.axis.remap("SSSSS", [r, p, i, g, l])
                            if win.last_group(vr, vp * G + vi, vg):
                                if win.partial(vr, vp * G + vi, vg):
                                    if win.inside(vr, vp * G + vi, vg, vl):
                                        Xv2[vr, vp, vi, vg * GROUP + vl] = Xf[win.flat(vr, vp * G + vi, vg, vl)]
                for i, g, l in T.grid(G, NG, GROUP):
                    with T.sblock("y_f16"):
                        vr, vp, vi, vg, vl = T.axis.remap("SSSSS", [r, p, i, g, l])
                        Yv[vr, vp, vi, vg * GROUP + vl] = T.Cast(dtype, T.exp(
                            T.Cast("float32", Xv2[vr, vp, vi, vg * GROUP + vl]) - Gm[vr, vp]) / Den[vr, vp])
                for i, g, l in T.grid(G, NG, GROUP):
                    with T.sblock("y_vec"):
                        vr, vp, vi, vg, vl = T.axis.remap("SSSSS", [r, p, i, g, l])
                        if win.full(vr, vp * G + vi, vg):
                            Yf[win.flat(vr, vp * G + vi, vg, vl)] = Yv[vr, vp, vi, vg * GROUP + vl]
                if win.edges:
                    for i, g, l in T.grid(G, NG, GROUP):
                        with T.sblock("y_first"):
                            vr, vp, vi, vg, vl = T.axis.remap("SSSSS", [r, p, i, g, l])
                            if win.first_group(vp * G + vi, vg):
                                if win.partial(vr, vp * G + vi, vg):
                                    if win.inside(vr, vp * G + vi, vg, vl):
                                        Yf[win.flat(vr, vp * G + vi, vg, vl)] = Yv[vr, vp, vi, vg * GROUP + vl]
                    for i, g, l in T.grid(G, NG, GROUP):
                        with T.sblock("y_last"):
                            vr, vp, vi, vg, vl = T.axis.remap("SSSSS", [r, p, i, g, l])
                            if win.last_group(vr, vp * G + vi, vg):
                                if win.partial(vr, vp * G + vi, vg):
                                    if win.inside(vr, vp * G + vi, vg, vl):
                                        Yf[win.flat(vr, vp * G + vi, vg, vl)] = Yv[vr, vp, vi, vg * GROUP + vl]

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
