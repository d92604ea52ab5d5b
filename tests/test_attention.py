"""Attention: GQA equals MHA with repeated kv heads; masks; a loop-per-head reference."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from stablelm_ref.attention import scaled_dot_product_attention
from stablelm_ref.model import causal_mask


def loop_reference(q, k, v, allowed):
    """Per batch row and head, plain softmax attention with kv head h // group (repeat_kv order)."""
    b, h, t, d = q.shape
    group = h // k.shape[1]
    out = np.zeros_like(q)
    for i in range(b):
        for j in range(h):
            s = q[i, j] @ k[i, j // group].T / np.sqrt(d)
            s = np.where(allowed[i, 0], s, -np.inf)
            with np.errstate(invalid="ignore"):  # rows with no key: NaN, excluded below
                p = np.exp(s - s.max(-1, keepdims=True))
            out[i, j] = (p / p.sum(-1, keepdims=True)) @ v[i, j // group]
    return out


@settings(max_examples=30, deadline=None)
@given(kv=st.sampled_from([1, 2, 4]), t=st.integers(1, 9), past=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_gqa_against_loop_reference(kv, t, past, seed):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(2, 4, t, 8))
    k, v = rng.normal(size=(2, 2, kv, past + t, 8))
    mask2d = np.ones((2, past + t), bool)
    mask2d[1, : rng.integers(0, past + t)] = False       # left padding in row 1
    mask2d[1, -1] = True
    allowed = causal_mask(mask2d, 2, t, past, np)
    out, probs = scaled_dot_product_attention(q, k, v, allowed)
    ref = loop_reference(q, k, v, allowed)
    rows = allowed[:, 0].any(-1)                          # query rows with at least one key
    np.testing.assert_allclose(out[:, :][np.broadcast_to(rows[:, None], out.shape[:3])],
                               ref[np.broadcast_to(rows[:, None], ref.shape[:3])], rtol=1e-10, atol=1e-12)
    assert np.all(probs[np.broadcast_to(~allowed, probs.shape) & np.broadcast_to(rows[:, None, :, None], probs.shape)] == 0)


def test_gqa_with_as_many_kv_heads_equals_multi_head(xp):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 4, 5, 8))
    k, v = rng.normal(size=(2, 1, 2, 5, 8))
    repeated = [np.repeat(a, 2, axis=1) for a in (k, v)]     # every kv head copied for its group
    mask = causal_mask(None, 1, 5, 0, np)
    gqa, _ = scaled_dot_product_attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), xp.asarray(mask))
    mha, _ = scaled_dot_product_attention(xp.asarray(q), *map(xp.asarray, repeated), xp.asarray(mask))
    np.testing.assert_allclose(np.asarray(gqa), np.asarray(mha), rtol=1e-12, atol=1e-12)


def test_causal_mask_with_cache_and_padding():
    m = causal_mask(np.array([[False, True, True, True]]), 1, 2, 2, np)   # 2 cached, 2 new, first is pad
    np.testing.assert_array_equal(m[0, 0], [[False, True, True, False], [False, True, True, True]])
