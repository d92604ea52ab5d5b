"""Attention: GQA equals MHA with repeated kv heads; masks; a loop-per-head reference; the kernel seam."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from stablelm_ref import kernels
from stablelm_ref.attention import causal_attention, causal_mask, scaled_dot_product_attention


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


# ---- the seam: attention.causal_attention picks an implementation by the arrays' library ------------------

def _seam_inputs(seed=0, b=2, h=4, kvh=2, t=5, past=3, d=8):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, h, t, d))
    k, v = rng.normal(size=(2, b, kvh, past + t, d))
    key_mask = np.ones((b, past + t), bool)
    key_mask[1, :4] = False                                   # left padding in row 1: query 0 sees no key
    return q, k, v, key_mask


def test_seam_without_a_kernel_is_the_reference_equation():
    q, k, v, key_mask = _seam_inputs()
    out, weights = causal_attention(q, k, v, key_mask)
    ref, probs = scaled_dot_product_attention(q, k, v, causal_mask(key_mask, 2, 5, 3, np))
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(weights, probs)
    # a query that sees no key gets the mean of all values (transformers' eager softmax over equal scores)
    np.testing.assert_allclose(out[1, :, 0], np.repeat(v[1].mean(axis=1), 2, axis=0), rtol=1e-12)


def test_seam_dispatches_by_library_and_falls_back(monkeypatch):
    q, k, v, key_mask = _seam_inputs()
    calls = []

    def fake(q_, k_, v_, mask_):
        calls.append(mask_)
        return None if len(calls) == 2 else (np.full(q_.shape, 7.0), None)   # the second call declines

    monkeypatch.setitem(kernels._IMPLEMENTATIONS, ("attention", "numpy"), fake)
    out, weights = causal_attention(q, k, v, key_mask)
    assert (out == 7.0).all() and weights is None and calls[0] is key_mask
    out, weights = causal_attention(q, k, v, key_mask)               # declined: the reference runs
    np.testing.assert_array_equal(out, scaled_dot_product_attention(q, k, v, causal_mask(key_mask, 2, 5, 3, np))[0])
    with kernels.reference_only():
        out, weights = causal_attention(q, k, v, key_mask)
    assert len(calls) == 2 and weights is not None
    import array_api_strict
    causal_attention(*(array_api_strict.asarray(a) for a in (q, k, v, key_mask)))  # another library: not asked
    assert len(calls) == 2


def _float64_kernel(q, k, v, key_mask, causal=True, out=None):
    """A stand-in for flash_attention_prefill on NumPy: the float64 spec (cuda/reference.py), written
    into `out` as the kernel writes (query rows that see no key: zeros)."""
    from stablelm_ref.cuda.reference import attention_reference

    out[...] = attention_reference(q, k, v, key_mask, causal=causal).astype(out.dtype)
    return out


@settings(max_examples=12, deadline=None)
@given(kv=st.sampled_from([1, 2]), d=st.sampled_from([64, 80]), t=st.integers(1, 7), pad=st.integers(0, 6),
       steps=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_model_through_the_kernel_glue_equals_the_reference(kv, d, t, pad, steps, seed):
    """The CuPy implementation's glue (cuda/flash_prefill.attention_for_model: strided views of the
    projection and of the KV cache, the merged-heads output layout, the rows that see no key) run on
    the CPU with a float64 stand-in for the kernel, through a whole float32 model: prefill with left
    padding, then decode steps over the cache. Both sides compute in float32 except attention itself
    (float64 in the stand-in): differences are float32 roundings carried through two layers, ~1e-7 of
    the logits' size; 1e-5 leaves two orders of margin and fails on any wrong index or mask (order 1)."""
    from conftest import tiny_model
    from stablelm_ref.cuda.flash_prefill import attention_for_model

    model = tiny_model(seed=seed % 7, dtype="float32", hidden_size=2 * d, num_attention_heads=2,
                       num_key_value_heads=kv, intermediate_size=96)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 101, (2, t + pad))
    mask = np.ones_like(ids)
    mask[1, :pad] = 0                                        # row 1 left-padded by `pad` tokens
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)

    def run():
        out = model(ids, attention_mask=mask, position_ids=positions, use_cache=True)
        logits, cache, m = [out.logits], out.past_key_values, mask
        for i in range(steps):
            m = np.concatenate([m, np.ones((2, 1), m.dtype)], axis=1)
            step = model((ids[:, -1:] + i) % 101, attention_mask=m, position_ids=m.sum(1, keepdims=True) - 1,
                         past_key_values=cache)
            logits.append(step.logits)
        return np.concatenate(logits, axis=1)

    with kernels.reference_only():
        ref = run()
    calls = []

    def glue(q, k, v, key_mask):
        calls.append(q.shape)
        return attention_for_model(q, k, v, key_mask, kernel=_float64_kernel)

    kernels.register("attention", "numpy", glue)
    try:
        got = run()
    finally:
        del kernels._IMPLEMENTATIONS[("attention", "numpy")]
    assert len(calls) == 2 * (1 + steps)                     # every layer of every forward went through it
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err <= 1e-5, err
