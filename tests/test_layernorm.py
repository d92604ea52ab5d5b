"""LayerNorm and per-head qk LayerNorm: properties and a float64 reference written out by hand."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stablelm_ref import layernorm
from stablelm_ref.layernorm import layer_norm, per_head_layer_norm

finite = st.floats(-1e3, 1e3, allow_nan=False, width=64)


@settings(max_examples=60, deadline=None)
@given(x=arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(2, 40)), elements=finite))
def test_normalised_output_has_mean_0_and_variance_1(x):
    # with weight 1, bias 0: mean 0 and variance var/(var+eps) (exactly 1 when eps is negligible)
    x = x + np.random.default_rng(0).normal(size=x.shape)  # not constant rows
    n = x.shape[-1]
    y = layer_norm(x, np.ones(n), np.zeros(n), 1e-12)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-9)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-6)


def test_against_hand_written_reference(xp):
    rng = np.random.default_rng(1)
    x, w, b = rng.normal(size=(2, 3, 16)), rng.normal(size=16), rng.normal(size=16)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b
    y = layer_norm(xp.asarray(x), xp.asarray(w), xp.asarray(b), 1e-5)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-12, atol=1e-12)


# Error analysis for the tests below. A LayerNorm over n = 64 values sums twice (mean, variance). NumPy sums
# pairwise: 8 accumulators of 8 terms each, then 3 levels, so each sum's rounding error is at most
# DEPTH = 10 roundings of u * sum|x_i| (u: unit roundoff of the statistics' dtype). An error e in the mean
# shifts every deviation x_i - mean by e, so the output moves by e / sigma = DEPTH * u * kappa, with
# kappa = mean|x| / sigma the conditioning of the row; the variance's own error is relative (second order
# in e / sigma, plus DEPTH/2 roundings) and scales |y|; the subtraction, square, sqrt and division add a
# few roundings of |y|. First order:
#     |y - y_float64| <= DEPTH u kappa + (DEPTH/2 + 4) u (1 + |y|)  (+ the output's own rounding)
DEPTH = 10
U32 = 2.0**-24


def _bound(x, y_ref, u):
    x = x.astype(np.float64)
    kappa = np.mean(np.abs(x), -1, keepdims=True) / np.std(x, -1, keepdims=True)   # [rows, 1]
    first = DEPTH * u * kappa
    return first + first**2 * np.abs(y_ref) + (DEPTH / 2 + 4) * u * (1 + np.abs(y_ref))


@pytest.mark.parametrize("mean, spread", [(0.0, 1.0), (100.0, 1e-3)])   # kappa ~ 1.3 and ~ 1e5
def test_float32_input_stays_float32_within_its_error_bound(xp, mean, spread):
    x = np.random.default_rng(2).normal(mean, spread, size=(4, 64)).astype(np.float32)
    y = layer_norm(xp.asarray(x), xp.ones(64, dtype=xp.float32), xp.zeros(64, dtype=xp.float32), 1e-12)
    assert y.dtype == xp.float32                     # float32 in, float32 statistics, float32 out (transformers)
    ref = layer_norm(x.astype(np.float64), np.ones(64), np.zeros(64), 1e-12)   # the same inputs, float64
    err = np.abs(np.asarray(y).astype(np.float64) - ref)
    assert np.all(err <= _bound(x, ref, U32) + np.abs(ref) * U32)   # + rounding y to float32


def _ulp(v, dtype):
    """The spacing of `dtype` numbers at |v| (bfloat16 through ml_dtypes; subnormals of float16 included)."""
    info = ml_dtypes.finfo(dtype)
    v = np.maximum(np.abs(v), float(info.tiny))
    return np.maximum(2.0 ** np.floor(np.log2(v)) * float(info.eps), float(info.smallest_subnormal))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
def test_16_bit_input_gets_float32_statistics(dtype, monkeypatch):
    """The statistics of a 16-bit input are computed in float32 (NumPy only: the array API standard has no
    16-bit floats). Then the only visible error is the output's rounding to 16 bits: half an ulp, plus
    float32 statistics' bound (kappa ~ 100 here: 1e-4 of a float16 ulp). Statistics kept in 16 bits miss
    the mean by ~kappa * u16 of sigma, tens of ulps: the same check fails on them, below."""
    x = (10.0 + 0.1 * np.random.default_rng(4).normal(size=(8, 64))).astype(dtype)
    w, b = np.ones(64, dtype=dtype), np.zeros(64, dtype=dtype)
    ref = layer_norm(x.astype(np.float64), np.ones(64), np.zeros(64), 1e-5)    # the same 16-bit inputs, float64
    bound = 0.5 * _ulp(ref, dtype) + _bound(x, ref, U32)
    y = layer_norm(x, w, b, 1e-5)
    assert y.dtype == dtype
    assert np.all(np.abs(y.astype(np.float64) - ref) <= bound)

    monkeypatch.setattr(layernorm, "wide_dtype", lambda xp, d: d)             # statistics in 16 bits
    narrow = layer_norm(x, w, b, 1e-5).astype(np.float64)
    assert np.max(np.abs(narrow - ref) / bound) > 4                          # the check sees the difference


def test_per_head_norm_uses_each_heads_own_weight(xp):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 5, 8))                          # [B, heads, T, D]
    weights = [rng.normal(size=8) for _ in range(3)]
    y = np.asarray(per_head_layer_norm(xp.asarray(x), [xp.asarray(w) for w in weights], 1e-5))
    for h in range(3):
        ref = layer_norm(x[:, h], weights[h], None, 1e-5)
        np.testing.assert_allclose(y[:, h], ref, rtol=1e-12, atol=1e-12)
