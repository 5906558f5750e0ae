"""Tensor-core split-K GEMM for skinny fp16 GEMM (2 <= M <= 31): the same computation as kernels/gemm.py
as a PrimFunc that MetaSchedule's tensor-core rules tile.

Why: with M = 8 or 16 a GEMM is a weight stream (11008 x 4096 halves for 16 rows), and a schedule
that keeps K in one block has only N / 16 wmma output tiles to spread over the SMs, each block
streaming its B tile over all of K.
Here K is cut into ``S`` chunks of ``K / S``: a batched matmul with the chunk as its batch writes fp32
partial sums ``P[s, i, j]`` (S x M x N), and an elementwise kernel adds the S partials and rounds to
fp16. The batch loop is a spatial loop to the tensor-core rules, so the blocks cover S x N / tile.
S = 1 is the unsplit GEMM in the same form: one kernel (the fp16 cast goes into the accumulator's
store), no partials. What makes either stream at DRAM speed on sim is the cp.async pipeline the
``splitk_tc`` rule set gives the tiles (search_space/rules.py): without it, gemm:16,11008,4096 was
latency-bound (best of 32, S = 2..16: 44.6 us, 20.4 mJ).

Only splits that divide K are offered, with chunks a multiple of wmma's k (16) and at least two of them:
the chunks then need no guard, which would break the tensor-core pattern match, and the cp.async
pipeline (search_space/rules.py, ``splitk_tc``) has k-steps to overlap (TVM's rule gives no pipeline
for a one-step chunk).
"""
from __future__ import annotations

# Splits of K offered. On sim (gemm:16,11008,4096) the least-energy samples had S = 1 to 16; S = 32
# never (its partials are a quarter of the weights' bytes at M = 16).
SPLITS = (1, 2, 4, 8, 16)
# Rows the family is offered for. On sim (best of 32 samples, energy vs the vendor stand-in), against the
# SIMT split-K (search_space/splitk.py): gemm:1,11008,4096 0.83x vs 0.80x (wmma pads one row to 16),
# M = 2 0.83x vs 0.87x, M = 4 0.83x vs 1.02x; against wmma without split: M = 8 0.83x vs 1.09x, M = 16
# 0.83x vs 1.16x, M = 24 1.04x and M = 31 1.06x vs 2.2x. From 32 rows on TVM's mma tiling applies to
# the unsplit GEMM (M = 32: mma 0.88x; this family, splits 4 to 32: 0.99x).
MIN_M = 2
MAX_M = 31
WMMA_K = 16


def splits_for(K: int) -> list[int]:
    """The splits of K into chunks of two or more wmma k-steps."""
    return [s for s in SPLITS if K % s == 0 and (K // s) % WMMA_K == 0 and K // s >= 2 * WMMA_K]


def split_k_gemm(M: int, N: int, K: int, splits: int, dtype: str = "float16", accumulate: str = "float32"):
    """C[M, N] = A @ B via P[s, i, j] = sum over chunk s of A[i, k] B[k, j], then C = fp16(sum_s P).
    (``splits`` = 1: P is the fp32 accumulator of the plain GEMM.)"""
    from tvm import te

    if K % splits:
        raise ValueError(f"split {splits} does not divide K = {K}")
    chunk = K // splits
    a = te.placeholder((M, K), dtype, name="A")
    b = te.placeholder((K, N), dtype, name="B")
    k = te.reduce_axis((0, chunk), name="k")
    partial = te.compute(
        (splits, M, N),
        lambda s, i, j: te.sum(a[i, s * chunk + k].astype(accumulate) * b[s * chunk + k, j].astype(accumulate), axis=k),
        name="P",
    )
    # The merge as one elementwise expression (no reduction axis): one kernel that reads the S
    # partials, adds them in fp32 and stores fp16.
    def merge(i, j):
        total = partial[0, i, j]
        for s in range(1, splits):
            total = total + partial[s, i, j]
        return total.astype(dtype)

    c = te.compute((M, N), merge, name="C")
    return te.create_prim_func([a, b, c])


def applies(workload) -> bool:
    p = workload.params
    return (workload.family == "gemm" and p.get("dtype") == "float16" and p.get("accumulate") == "float32"
            and MIN_M <= int(p["M"]) <= MAX_M and bool(splits_for(int(p["K"]))))


def split_k_prim_funcs(workload, gpu=None) -> dict:
    """Templates that apply to a workload: {``splitk_tc_s{S}``: PrimFunc}."""
    if not applies(workload):
        return {}
    p = workload.params
    return {f"splitk_tc_s{s}": split_k_gemm(p["M"], p["N"], p["K"], s) for s in splits_for(p["K"])}
