"""Row softmax over the last axis, numerically stable (max-subtracted), fp16 in and out."""
from __future__ import annotations

import numpy as np

from .workload import TensorSpec, Workload, check_dtype, positive_ints

# Per element: max compare, subtract, exp, sum, divide.
FLOPS_PER_ELEMENT = 5


def softmax(rows: int, cols: int, dtype: str = "float16") -> Workload:
    """Softmax(x)[i, j] = exp(x[i, j] - max_j x[i]) / sum_j exp(x[i, j] - max_j x[i]).

    Computed in fp32 inside the kernel; the output is rounded to fp16 (relative 2^-11 at worst), so a
    relative L2 tolerance of 2e-3 leaves margin for fast-math exp.
    """
    positive_ints("softmax", rows=rows, cols=cols)
    check_dtype("softmax", "dtype", dtype, ("float16",))
    rows, cols = int(rows), int(cols)

    def build():
        from tvm import te

        x = te.placeholder((rows, cols), dtype, name="X")
        j = te.reduce_axis((0, cols), name="j")
        row_max = te.compute((rows,), lambda i: te.max(x[i, j].astype("float32"), axis=j), name="row_max")
        exp = te.compute((rows, cols), lambda i, c: te.exp(x[i, c].astype("float32") - row_max[i]), name="exp")
        k = te.reduce_axis((0, cols), name="k")
        row_sum = te.compute((rows,), lambda i: te.sum(exp[i, k], axis=k), name="row_sum")
        y = te.compute((rows, cols), lambda i, c: (exp[i, c] / row_sum[i]).astype(dtype), name="Y")
        return te.create_prim_func([x, y])

    def reference(x: np.ndarray):
        x64 = x.astype(np.float64)
        e = np.exp(x64 - x64.max(axis=-1, keepdims=True))
        return [(e / e.sum(axis=-1, keepdims=True)).astype(dtype)]

    nbytes = rows * cols * np.dtype(dtype).itemsize
    return Workload(
        family="softmax",
        spec=f"softmax:{rows},{cols}",
        params={"rows": rows, "cols": cols, "dtype": dtype},
        inputs=(TensorSpec("X", (rows, cols), dtype),),
        outputs=(TensorSpec("Y", (rows, cols), dtype),),
        flops=FLOPS_PER_ELEMENT * rows * cols,
        min_bytes=2 * nbytes,
        rel_tolerance=2e-3,
        build_prim_func=build,
        reference_fn=reference,
    )
