"""mma.sync m16n8k16 fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), a NumPy
emulation of ``ldmatrix`` and ``mma``, and the cp.async tile copy, shared by the thread-level
templates (kernels/attention_mma.py, kernels/gemm_mma.py) and their CPU checks.

A layout maps (lane, element i of the lane's fragment) to (row, column) of the matrix. The templates
index their register fragments with these functions; their ``emulate`` functions run the same
algorithm lane by lane with them, so a layout mistake shows up as a wrong result on a machine
without a GPU.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

LANES = np.arange(32)


@T.macro
def copy_tile_async(dst, slot, src, row0, col0, rows, columns, valid_rows, valid_columns, thread, threads):
    """cp.async of the ``rows`` x ``columns`` tile of the 2-D buffer ``src`` at (row0, col0) into
    ``dst[slot]``, 16 bytes (8 fp16) per copy, ``threads`` threads taking the copies in turn. Rows
    at or past ``valid_rows`` and columns past ``valid_columns`` are zero-filled without a read (the
    predicated cp.async); the clamped address only keeps the operand in bounds."""
    for rnd in T.serial(-(-(rows * columns // 8) // threads)):
        with T.attr("default", "async_scope", 1):
            for v in T.vectorized(8):
                if rnd * threads + thread < rows * columns // 8:
                    dst[slot, (rnd * threads + thread) // (columns // 8), (rnd * threads + thread) % (columns // 8) * 8 + v] = T.if_then_else(
                        tvm.tirx.all(row0 + (rnd * threads + thread) // (columns // 8) < valid_rows,
                                     col0 + (rnd * threads + thread) % (columns // 8) * 8 < valid_columns),
                        src[T.min(row0 + (rnd * threads + thread) // (columns // 8), valid_rows - 1),
                            T.min(col0 + (rnd * threads + thread) % (columns // 8) * 8, valid_columns - 8) + v],
                        T.Cast(dst.dtype, 0))


def a_fragment(lane, i):
    """A (16 x 16, row-major), 8 fp16 per lane."""
    return lane // 4 + (i // 2) % 2 * 8, lane % 4 * 2 + i % 2 + i // 4 * 8


def b_fragment(lane, i):
    """B (16 x 8, k x n), 4 fp16 per lane: (k, n)."""
    return lane % 4 * 2 + i % 2 + i // 2 * 8, lane // 4


def c_fragment(lane, i):
    """C/D (16 x 8), 4 fp32 per lane."""
    return lane // 4 + i // 2 * 8, lane % 4 * 2 + i % 2


def scatter(layout, n):
    """(rows, columns) of every lane's ``n`` elements: index arrays of shape (32, n)."""
    return layout(LANES[:, None], np.arange(n)[None, :])


def emulate_ldmatrix(shared: np.ndarray, address, trans: bool) -> np.ndarray:
    """ldmatrix.x4: lane L gives the row address ``address(lanes)`` of row L % 8 of matrix L // 8;
    every lane receives two consecutive elements of row lane // 4 of each (transposed with .trans)
    8 x 8 matrix."""
    rows, cols = address(LANES)
    regs = np.empty((32, 8), shared.dtype)
    for m in range(4):
        matrix = np.stack([shared[rows[8 * m + r], cols[8 * m + r]:cols[8 * m + r] + 8] for r in range(8)])
        if trans:
            matrix = matrix.T
        regs[:, 2 * m] = matrix[LANES // 4, LANES % 4 * 2]
        regs[:, 2 * m + 1] = matrix[LANES // 4, LANES % 4 * 2 + 1]
    return regs


def emulate_mma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """mma.sync.m16n8k16.row.col.f32.f16.f16.f32 on (32, 8), (32, 4) and (32, 4) fragments."""
    A = np.zeros((16, 16), np.float32)
    A[scatter(a_fragment, 8)] = a
    Bm = np.zeros((16, 8), np.float32)
    Bm[scatter(b_fragment, 4)] = b
    C = np.zeros((16, 8), np.float32)
    C[scatter(c_fragment, 4)] = c
    return (A @ Bm + C)[scatter(c_fragment, 4)]
