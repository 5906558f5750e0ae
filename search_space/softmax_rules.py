"""etune's schedule rules for the row-softmax templates (kernels/softmax_fused.py), rule set ``rowsoftmax``.

Registered for MetaSchedule's ApplyCustomRule like the attention rules (search_space/attention_rules.py).
Every tunable is a sampling instruction of the trace, with candidates fitted to the shape so that every
value is valid for it (wrong combinations, such as more than 1024 threads, are dropped by the
validity checks like any other draw); MetaSchedule's mutators, etune's ``mutate_tile_size`` (which
redraws categorical split factors) and crossover act on them:

- vector width ``V`` (halves per access: 1 to 8; accesses stay inside a 16-byte group of the row's
  window, so every one is aligned and all its lanes share one guard);
- threads over a row's lines ``Ti`` (threadIdx.x is ``Ti x W / V``: a warp or a few per row for
  short rows, up to a whole block for long ones); each thread then holds ``ceil(lines / Ti) x V``
  values of its row;
- rows per block ``Ry`` (threadIdx.y; a warp per row and several rows per block for short rows);
- split rows only: parts per block (``sample_perfect_tile`` of the parts), i.e. blocks per row;
- the unroll step (as TVM's own rules annotate it).

Loads and stores go through fp16 local vectors; fp32 work stays scalar (VerifyGPUCode rejects
vectors wider than 16 bytes).
"""
from __future__ import annotations

import tvm

from etune.kernels.softmax_fused import has_edges, line_width, next_pow2, split_parts, window_lines

from .choices import uniform_choice

VECTOR_WIDTHS = (1, 2, 4, 8)
LINE_THREADS = (1, 2, 4, 8, 16, 32)
ROWS_PER_BLOCK = (1, 2, 4, 8, 16)
UNROLL_STEPS = (0, 16, 64, 512)


def _fitting(values, limit: int) -> list[int]:
    """Values up to ``limit`` (at least the smallest value, so a categorical is never empty)."""
    fit = [v for v in values if v <= limit]
    return fit or [min(values)]


class _Lines:
    """Splits and binds the (line, group, lane) loops of every row-shaped block the same way, so that
    each thread's slice of a local buffer is the same in every block (and compacts to items x vector)."""

    def __init__(self, sch, lines: int):
        self.sch = sch
        self.vector = uniform_choice(sch, VECTOR_WIDTHS)
        self.line_threads = uniform_choice(sch, _fitting(LINE_THREADS, next_pow2(lines)))

    def bind(self, block, vectorize: bool = False) -> None:
        sch = self.sch
        i, g, lane = sch.get_loops(block)[-3:]
        ti, ii = sch.split(i, [self.line_threads, None], preserve_unit_iters=True)
        lo, v = sch.split(lane, [None, self.vector], preserve_unit_iters=True)
        sch.reorder(ti, g, lo, ii, v)
        sch.bind(sch.fuse(ti, g, lo), "threadIdx.x")
        if vectorize:
            sch.vectorize(v)


def _row_blocks(cols: int, *names: str) -> list[str]:
    """The template's block names, with the half-by-half edge copies after each vector copy where rows
    share 16-byte groups (``x_vec`` -> ``x_vec``, ``x_first``, ``x_last``)."""
    blocks = []
    for name in names:
        blocks.append(name)
        if name.endswith("_vec") and has_edges(cols):
            stem = name.removesuffix("_vec")
            blocks += [f"{stem}_first", f"{stem}_last"]
    return blocks


def _input_shape(sch) -> tuple[int, int]:
    func = sch.mod["main"]
    return tuple(int(e) for e in func.params[0].shape)  # X (rows, cols)


def _unroll(sch) -> None:
    unroll = uniform_choice(sch, UNROLL_STEPS)
    sch.annotate(sch.get_sblock("root"), "meta_schedule.unroll_explicit", unroll)


def row_in_registers(sch, block):
    """Schedule the ``row_in_registers`` template; ``block`` is its ``x_vec`` block."""
    g = sch.get_sblock
    sch.unannotate(block, "schedule_rule")
    rows, cols = _input_shape(sch)
    lines = window_lines(cols, line_width(cols))
    row = sch.get_loops(block)[0]
    rows_per_block = uniform_choice(sch, _fitting(ROWS_PER_BLOCK, next_pow2(rows)))
    outer, inner = sch.split(row, [None, rows_per_block], preserve_unit_iters=True)
    sch.bind(outer, "blockIdx.x")
    sch.bind(inner, "threadIdx.y")
    line = _Lines(sch, lines)
    for name in _row_blocks(cols, "x_vec", "x_f32", "row_max", "exp", "row_sum", "y_f16", "y_vec"):
        line.bind(g(name), vectorize=name.endswith("_vec"))
    _unroll(sch)
    return [sch]


def split_row(sch, block):
    """Schedule the ``split_row`` template; ``block`` is its ``x_vec`` block. Both kernels put a few
    parts of a row in each thread block (sample_perfect_tile of the parts: blocks per row = parts /
    parts per block), one after another."""
    g = sch.get_sblock
    sch.unannotate(block, "schedule_rule")
    rows, cols = _input_shape(sch)
    parts, lines = split_parts(rows, cols)
    line = _Lines(sch, lines)
    kernels = (_row_blocks(cols, "x_vec", "x_f32", "part_max", "exp", "part_sum", "store_partial"),
               _row_blocks(cols, "merge", "x2_vec", "y_f16", "y_vec"))
    for names in kernels:
        row, part = sch.get_loops(g(names[0]))[:2]
        outer, _ = sch.split(part, sch.sample_perfect_tile(part, n=2, max_innermost_factor=parts),
                             preserve_unit_iters=True)
        sch.bind(sch.fuse(row, outer), "blockIdx.x")
        for name in names:
            line.bind(g(name), vectorize=name.endswith("_vec"))
    _unroll(sch)
    return [sch]


RULES = {"etune_softmax_row_in_registers": row_in_registers, "etune_softmax_split_row": split_row}


def register() -> None:
    """Register the rules for ApplyCustomRule (idempotent)."""
    for name, rule in RULES.items():
        key = f"s_tir.meta_schedule.cuda.{name}"
        if tvm.get_global_func(key, allow_missing=True) is None:
            tvm.register_global_func(key, rule)
