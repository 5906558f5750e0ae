"""Scaled dot-product attention: softmax(Q K^T / sqrt(d)) V, fp16, as one tunable module.

The module holds several kernels (scores, row max, exp, row sum, normalise, P @ V); MetaSchedule
schedules each. Causal masking is aligned to the bottom-right corner (query i sees keys
j <= i + kv_len - q_len), as in decoding with a KV cache, so q_len may not exceed kv_len.
"""
from __future__ import annotations

import math

import numpy as np

from .workload import TensorSpec, Workload, WorkloadError, check_dtype, positive_ints


def attention(
    batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = False, dtype: str = "float16"
) -> Workload:
    """Tolerance: scores and both products accumulate in fp32; the probabilities are rounded to fp16
    before P @ V and the output is rounded to fp16, each 2^-11 relative at worst, so 5e-3."""
    positive_ints("attention", batch=batch, heads=heads, q_len=q_len, kv_len=kv_len, head_dim=head_dim)
    check_dtype("attention", "dtype", dtype, ("float16",))
    if causal and q_len > kv_len:
        raise WorkloadError(f"attention: causal needs q_len <= kv_len, got q_len={q_len} > kv_len={kv_len}")
    B, H, Q, KV, D = (int(v) for v in (batch, heads, q_len, kv_len, head_dim))
    scale = 1.0 / math.sqrt(D)
    offset = KV - Q  # query i may see keys j <= i + offset

    def build():
        from tvm import te, tirx

        q = te.placeholder((B, H, Q, D), dtype, name="Q")
        k = te.placeholder((B, H, KV, D), dtype, name="K")
        v = te.placeholder((B, H, KV, D), dtype, name="V")
        d = te.reduce_axis((0, D), name="d")
        scores = te.compute(
            (B, H, Q, KV),
            lambda b, h, i, j: te.sum(q[b, h, i, d].astype("float32") * k[b, h, j, d].astype("float32"), axis=d),
            name="scores",
        )
        lowest = tirx.min_value("float32")
        if causal:
            masked = te.compute(
                (B, H, Q, KV),
                lambda b, h, i, j: te.if_then_else(j <= i + offset, scores[b, h, i, j] * scale, lowest),
                name="masked",
            )
        else:
            masked = te.compute((B, H, Q, KV), lambda b, h, i, j: scores[b, h, i, j] * scale, name="masked")
        j1 = te.reduce_axis((0, KV), name="j1")
        row_max = te.compute((B, H, Q), lambda b, h, i: te.max(masked[b, h, i, j1], axis=j1), name="row_max")
        exp = te.compute(
            (B, H, Q, KV), lambda b, h, i, j: te.exp(masked[b, h, i, j] - row_max[b, h, i]), name="exp"
        )
        j2 = te.reduce_axis((0, KV), name="j2")
        row_sum = te.compute((B, H, Q), lambda b, h, i: te.sum(exp[b, h, i, j2], axis=j2), name="row_sum")
        probs = te.compute(
            (B, H, Q, KV), lambda b, h, i, j: (exp[b, h, i, j] / row_sum[b, h, i]).astype(dtype), name="probs"
        )
        j3 = te.reduce_axis((0, KV), name="j3")
        out_acc = te.compute(
            (B, H, Q, D),
            lambda b, h, i, e: te.sum(probs[b, h, i, j3].astype("float32") * v[b, h, j3, e].astype("float32"), axis=j3),
            name="out_acc",
        )
        out = te.compute((B, H, Q, D), lambda b, h, i, e: out_acc[b, h, i, e].astype(dtype), name="O")
        return te.create_prim_func([q, k, v, out])

    def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray):
        s = np.einsum("bhid,bhjd->bhij", q.astype(np.float64), k.astype(np.float64)) * scale
        if causal:
            visible = np.arange(KV)[None, :] <= np.arange(Q)[:, None] + offset
            s = np.where(visible, s, -np.inf)
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        return [np.einsum("bhij,bhjd->bhid", p, v.astype(np.float64)).astype(dtype)]

    # Score pairs that count: all of them, or the visible ones under the causal mask (query i sees
    # i + offset + 1 <= KV keys, summed over i in closed form).
    pairs = Q * KV if not causal else Q * (offset + 1) + Q * (Q - 1) // 2
    itemsize = np.dtype(dtype).itemsize
    spec = f"attention:{B},{H},{Q},{KV},{D}" + (",causal" if causal else "")
    return Workload(
        family="attention",
        spec=spec,
        params={"batch": B, "heads": H, "q_len": Q, "kv_len": KV, "head_dim": D, "causal": causal, "dtype": dtype},
        inputs=(
            TensorSpec("Q", (B, H, Q, D), dtype),
            TensorSpec("K", (B, H, KV, D), dtype),
            TensorSpec("V", (B, H, KV, D), dtype),
        ),
        outputs=(TensorSpec("O", (B, H, Q, D), dtype),),
        # The unfused module keeps the fp32 scores in GPU memory between its kernels.
        scratch=(TensorSpec("scores", (B, H, Q, KV), "float32"),),
        # Two products (QK^T and PV) of 2*D flops per visible pair, plus ~5 flops of softmax per pair.
        flops=B * H * pairs * (4 * D + 5),
        min_bytes=B * H * (2 * Q * D + 2 * KV * D) * itemsize,
        rel_tolerance=5e-3,
        build_prim_func=build,
        reference_fn=reference,
    )
