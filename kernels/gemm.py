"""GEMM and GEMV: C[M, N] = A[M, K] @ B[K, N], fp16 in and out, row-major like torch.matmul(A, B)."""
from __future__ import annotations

import math

import numpy as np

from .workload import TensorSpec, Workload, check_dtype, positive_ints

DTYPES = ("float16",)
ACCUMULATE = ("float32", "float16")
FP16_UNIT_ROUNDOFF = 2.0**-11


def gemm(M: int, N: int, K: int, dtype: str = "float16", accumulate: str = "float32") -> Workload:
    """A GEMM (GEMV when M is small).

    Tolerance: with fp32 accumulation the error is the fp16 rounding of the output (relative
    2^-11 at worst), so 2e-3 leaves margin. With fp16 accumulation every partial sum is rounded; the
    rounding errors add up like a random walk over the K steps, about 2^-11 * sqrt(K) relative at
    worst (scalar loops; tensor cores round less often), so we allow 1.5 times that.
    """
    positive_ints("gemm", M=M, N=N, K=K)
    check_dtype("gemm", "dtype", dtype, DTYPES)
    check_dtype("gemm", "accumulate", accumulate, ACCUMULATE)
    M, N, K = int(M), int(N), int(K)

    def build():
        from tvm import te

        a = te.placeholder((M, K), dtype, name="A")
        b = te.placeholder((K, N), dtype, name="B")
        k = te.reduce_axis((0, K), name="k")
        if accumulate == dtype:
            c = te.compute((M, N), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
            return te.create_prim_func([a, b, c])
        acc = te.compute(
            (M, N),
            lambda i, j: te.sum(a[i, k].astype(accumulate) * b[k, j].astype(accumulate), axis=k),
            name="C_acc",
        )
        c = te.compute((M, N), lambda i, j: acc[i, j].astype(dtype), name="C")
        return te.create_prim_func([a, b, c])

    def reference(a: np.ndarray, b: np.ndarray):
        return [(a.astype(np.float64) @ b.astype(np.float64)).astype(dtype)]

    if accumulate == dtype:
        tolerance = max(2e-3, 1.5 * FP16_UNIT_ROUNDOFF * math.sqrt(K))
    else:
        tolerance = 2e-3
    spec = f"gemm:{M},{N},{K}" + ("" if accumulate == "float32" else f",accumulate={accumulate}")
    itemsize = np.dtype(dtype).itemsize
    return Workload(
        family="gemm",
        spec=spec,
        params={"M": M, "N": N, "K": K, "dtype": dtype, "accumulate": accumulate},
        inputs=(TensorSpec("A", (M, K), dtype), TensorSpec("B", (K, N), dtype)),
        outputs=(TensorSpec("C", (M, N), dtype),),
        flops=2 * M * N * K,
        min_bytes=(M * K + K * N + M * N) * itemsize,
        rel_tolerance=tolerance,
        build_prim_func=build,
        reference_fn=reference,
    )
