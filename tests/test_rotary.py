"""Partial rotary: norm kept, pass-through untouched, q.k depends only on the position difference."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from stablelm_ref.rotary import apply_rotary, inverse_frequencies, rotary_cos_sin

from conftest import tiny_config


def rotate(xp, x, positions, config):
    pos = xp.asarray(np.asarray(positions, dtype=np.int64).reshape(1, -1))
    cos, sin = rotary_cos_sin(pos, config, xp.float64)
    return apply_rotary(xp.asarray(x), cos, sin, config.rotary_ndims)


@settings(max_examples=40, deadline=None)
@given(factor=st.sampled_from([0.25, 0.5, 1.0]), pos=st.integers(0, 60), seed=st.integers(0, 2**16))
def test_norm_kept_and_pass_through_untouched(factor, pos, seed):
    config = tiny_config(partial_rotary_factor=factor)
    d = config.rotary_ndims
    x = np.random.default_rng(seed).normal(size=(1, 2, 1, config.head_dim))
    y = np.asarray(rotate(np, x, [pos], config))
    np.testing.assert_array_equal(y[..., d:], x[..., d:])
    # each pair (i, i + d/2) is rotated by one angle, so its norm is kept
    half = d // 2
    np.testing.assert_allclose(y[..., :half] ** 2 + y[..., half:d] ** 2, x[..., :half] ** 2 + x[..., half:d] ** 2,
                               rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(0, 50), n=st.integers(0, 50), shift=st.integers(0, 10), seed=st.integers(0, 2**16))
def test_dot_product_depends_only_on_position_difference(m, n, shift, seed):
    config = tiny_config()
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(2, 1, 1, 1, config.head_dim))
    a = (np.asarray(rotate(np, q, [m], config)) * np.asarray(rotate(np, k, [n], config))).sum()
    b = (np.asarray(rotate(np, q, [m + shift], config)) * np.asarray(rotate(np, k, [n + shift], config))).sum()
    assert abs(a - b) < 1e-9 * max(1.0, abs(a))


def test_rotate_half_not_interleaved(xp):
    """GPT-NeoX style: dims i and i + d/2 form a pair (not 2i, 2i+1). Checked against the formula."""
    config = tiny_config()  # head_dim 16, rotary 4
    x = np.arange(1.0, 17.0).reshape(1, 1, 1, 16)
    y = np.asarray(rotate(xp, x, [3], config))
    theta = 10000.0 ** (-np.arange(0, 4, 2) / 4) * 3
    c, s = np.cos(theta), np.sin(theta)
    x1, x2 = x[0, 0, 0, :2], x[0, 0, 0, 2:4]
    np.testing.assert_allclose(y[0, 0, 0, :4], np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s]), rtol=1e-12)


def test_scaling_types():
    linear = tiny_config(rope_scaling={"rope_type": "linear", "factor": 4.0})
    plain = tiny_config()
    np.testing.assert_allclose(inverse_frequencies(linear, np, np.float64),
                               inverse_frequencies(plain, np, np.float64) / 4.0)
    dynamic = tiny_config(rope_scaling={"type": "dynamic", "factor": 2.0})  # legacy key "type"
    inside = inverse_frequencies(dynamic, np, np.float64, seq_len=64)
    np.testing.assert_allclose(inside, inverse_frequencies(plain, np, np.float64))  # unchanged up to max_pos
    beyond = inverse_frequencies(dynamic, np, np.float64, seq_len=128)
    d = dynamic.rotary_ndims
    base = 10000.0 * (2.0 * 128 / 64 - 1.0) ** (d / (d - 2))
    np.testing.assert_allclose(beyond, base ** (-np.arange(0, d, 2) / d))
