import re

import numpy as np
import pytest

import etune.kernels as kernels
from etune.kernels import WorkloadError, attention, gemm, parse_spec, softmax


def test_suite_matches_design_and_specs_round_trip():
    suite = kernels.suite()
    assert len(suite) == 11
    assert {w.family for w in suite.values()} == {"gemm", "softmax", "attention"}
    for w in suite.values():
        assert parse_spec(w.spec) == w


def test_flops_and_bytes():
    g = gemm(4096, 4096, 4096)
    assert g.flops == 2 * 4096**3
    assert g.min_bytes == 3 * 4096 * 4096 * 2
    s = softmax(4096, 2048)
    assert s.min_bytes == 2 * 4096 * 2048 * 2
    full = attention(1, 2, 8, 8, 16)
    causal = attention(1, 2, 8, 8, 16, causal=True)
    # Causal attention at q_len == kv_len sees 8*9/2 of the 64 pairs.
    assert causal.flops * 64 == full.flops * 36


@pytest.mark.parametrize(
    "spec, message",
    [
        ("gemm:4096,4096", "needs 3 sizes"),
        ("gemm:0,4,4", "positive integer"),
        ("gemm:-1,4,4", "positive integer"),
        ("gemm:4,4,4,accumulate=float64", "unknown accumulate"),
        ("gemm:4,4,4,dtype=int8", "unknown dtype"),
        ("gemm:4,x,4", "not an integer"),
        ("conv:1,2", "unknown kernel family"),
        ("gemm 4096", "expected FAMILY:SIZES"),
        ("attention:1,1,8,4,64,causal", "q_len <= kv_len"),
        ("attention:1,1,8,8,64,banana", "not an integer"),
        ("softmax:4,4,causal", "not an integer size"),
        ("softmax:4", "needs 2 sizes"),
        # ASCII digits only (int() takes all of these)
        ("gemm:+16,4,4", "not an integer size"),
        ("gemm:1_6,4,4", "not an integer size"),
        ("gemm:\uff11\uff16,4,4", "not an integer size"),
        ("gemm:\u0661\u0666,4,4", "not an integer size"),
        ("gemm:1 6,4,4", "not an integer size"),
        # Sizes without bounds: int32 indexing, and the largest GPU memory
        ("gemm:99999999999999999999,1,1", "M=99999999999999999999 is too large"),
        ("gemm:100000,100000,100000", "A would hold 10000000000 elements"),
        ("attention:1,1,2000000000,2000000000,1,causal", "scores would hold 4000000000000000000 elements"),
    ],
)
def test_bad_specs_raise_one_clear_error(spec, message):
    with pytest.raises(WorkloadError, match=message) as info:
        parse_spec(spec)
    assert "\n" not in str(info.value)


def test_sizes_fit_the_memory_asked_for():
    assert parse_spec(" gemm: 64 , 64,64 ").spec == "gemm:64,64,64"  # spaces around the fields are fine
    assert parse_spec("gemm:40000,40000,40000").memory_bytes == 3 * 40000**2 * 2
    with pytest.raises(WorkloadError, match="need 9.6 GB of GPU memory, more than the 8 GB"):
        parse_spec("gemm:40000,40000,40000", memory_bytes=8 * 10**9)
    # The causal pair count has a closed form (it was a Python loop over q_len).
    for q_len, kv_len in ((1, 1), (3, 3), (3, 7), (2**15, 2**15)):
        pairs = sum(min(kv_len, i + kv_len - q_len + 1) for i in range(q_len))
        assert attention(1, 1, q_len, kv_len, 1, causal=True).flops == pairs * (4 + 5)


def _naive_attention(q, k, v, causal):
    """Loop form, independent of the vectorised reference."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    out = np.zeros(q.shape)
    for bi in range(b):
        for hi in range(h):
            for i in range(lq):
                s = np.array([q[bi, hi, i] @ k[bi, hi, j] / np.sqrt(d) for j in range(lk)], dtype=np.float64)
                if causal:
                    s[np.arange(lk) > i + lk - lq] = -np.inf
                p = np.exp(s - s.max())
                out[bi, hi, i] = (p / p.sum()) @ v[bi, hi]
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_attention_reference_matches_loop_form(causal):
    w = attention(1, 2, 3, 5, 4, causal=causal)
    q, k, v = (x.astype(np.float64) for x in w.random_inputs(seed=3))
    (out,) = w.reference(w.random_inputs(seed=3))
    np.testing.assert_allclose(out.astype(np.float64), _naive_attention(q, k, v, causal), rtol=2e-3, atol=2e-3)


def test_softmax_reference_is_stable_and_normalised():
    w = softmax(4, 16)
    x = (np.random.default_rng(0).uniform(-1, 1, (4, 16)) * 1e4).astype("float16")  # exp would overflow unshifted
    (y,) = w.reference([x])
    assert np.all(np.isfinite(y.astype(np.float64)))
    np.testing.assert_allclose(y.astype(np.float64).sum(axis=1), 1.0, atol=1e-2)


def test_check_rejects_wrong_and_nan_outputs():
    w = gemm(8, 8, 8)
    inputs = w.random_inputs(seed=1)
    (ref,) = w.reference(inputs)
    assert w.check([ref], [ref]) == (True, 0.0)
    wrong = ref.copy()
    wrong[0, 0] += 10
    assert not w.check([wrong], [ref])[0]
    poisoned = ref.copy().astype(np.float32)
    poisoned[3, 3] = np.nan
    assert not w.check([poisoned], [ref])[0]


def test_random_inputs_are_random_and_seeded():
    w = gemm(16, 16, 16)
    a1, _ = w.random_inputs(seed=1)
    a2, _ = w.random_inputs(seed=1)
    a3, _ = w.random_inputs(seed=2)
    assert np.array_equal(a1, a2) and not np.array_equal(a1, a3)
    assert np.unique(a1).size > 100


def test_prim_funcs_have_the_declared_signature():
    for w in (gemm(32, 16, 64), softmax(8, 32), attention(1, 2, 4, 8, 16, causal=True)):
        header = next(line for line in w.prim_func.script().splitlines() if line.startswith("def main("))
        params = re.findall(r'(\w+): T\.Buffer\(\(([\d, ]+)\), "(\w+)"\)', header)
        assert [(n, tuple(int(d) for d in shape.split(",")), dt) for n, shape, dt in params] == [
            (t.name, t.shape, t.dtype) for t in w.args]
