import re

import numpy as np
import pytest

import kernels
from kernels import WorkloadError, attention, gemm, parse_spec, softmax


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
    ],
)
def test_bad_specs_raise_one_clear_error(spec, message):
    with pytest.raises(WorkloadError, match=message) as info:
        parse_spec(spec)
    assert "\n" not in str(info.value)


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
