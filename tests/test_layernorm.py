"""LayerNorm and per-head qk LayerNorm: properties and a float64 reference written out by hand."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

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


def test_float32_input_keeps_dtype_and_uses_wide_statistics(xp):
    x = np.random.default_rng(2).normal(100.0, 1e-3, size=(4, 64)).astype(np.float32)  # large mean, tiny spread
    y = layer_norm(xp.asarray(x), xp.ones(64, dtype=xp.float32), xp.zeros(64, dtype=xp.float32), 1e-12)
    assert y.dtype == xp.float32
    ref = layer_norm(x.astype(np.float64), np.ones(64), np.zeros(64), 1e-12)
    # float32 statistics on inputs ~100 with spread 1e-3: a few e-3 relative at worst, never garbage
    np.testing.assert_allclose(np.asarray(y), ref, atol=5e-2)


def test_per_head_norm_uses_each_heads_own_weight(xp):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 5, 8))                          # [B, heads, T, D]
    weights = [rng.normal(size=8) for _ in range(3)]
    y = np.asarray(per_head_layer_norm(xp.asarray(x), [xp.asarray(w) for w in weights], 1e-5))
    for h in range(3):
        ref = layer_norm(x[:, h], weights[h], None, 1e-5)
        np.testing.assert_allclose(y[:, h], ref, rtol=1e-12, atol=1e-12)
