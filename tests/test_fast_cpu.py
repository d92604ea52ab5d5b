"""fast_cpu.FastCpuModel equals the reference forward (the concept files) on every variant.

float64: both compute the same equations in the same order except for BLAS summation order (fused
GEMMs, transposed layouts), so they agree to rounding, ~1e-15 relative; 1e-10 fails on any real bug.
float32: rounding is ~1e-7 relative per operation and grows with depth, so a fixed bound says
little. Instead the fast float32 logits must be as close to the float64 truth as the reference's own
float32 logits are (within 2x, plus a floor of 8 float32 ulps of the logits' scale for cases where
the reference happens to round luckily); a bug (wrong head, mask, rotary slice) is O(1) off.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stablelm_ref import StableLmForCausalLM
from stablelm_ref.errors import GenerationError, StableLmError
from stablelm_ref.fast_cpu import FastCpuModel
from stablelm_ref.kv_cache import KVCache

from conftest import VARIANTS, tiny_model

TOL = 1e-10
EPS32 = float(np.finfo(np.float32).eps)


def _pair(variant, seed, dtype="float64", **extra):
    ref = tiny_model(seed=seed, dtype=dtype, **VARIANTS[variant], **extra)
    twin = tiny_model(seed=seed, dtype=dtype, **VARIANTS[variant], **extra)  # fast() rewires params: keep one pristine
    return ref, twin.fast()


def _padded(rng, b, t, pad):
    ids = rng.integers(0, 101, (b, t))
    mask = np.ones((b, t), np.int64)
    for row, p in enumerate(pad):
        mask[row, :p] = 0
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, pos


@settings(max_examples=20, deadline=None)
@given(variant=st.sampled_from(sorted(VARIANTS)), b=st.integers(1, 3), t=st.integers(1, 10),
       pad=st.lists(st.integers(0, 4), min_size=3, max_size=3), keep=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_forward_equals_reference_float64(variant, b, t, pad, keep, seed):
    ref, fast = _pair(variant, 1)
    ids, mask, pos = _padded(np.random.default_rng(seed), b, t, [min(p, t - 1) for p in pad[:b]])
    want = ref(ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
    got = fast(ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
    assert got.shape == want.shape and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def _decode(model, ids, mask, pos, t, cache=None):
    """Prefill t tokens, then one token at a time through the cache; all logits [B, T_total, vocab]."""
    out = model(ids[:, :t], attention_mask=mask[:, :t], position_ids=pos[:, :t], past_key_values=cache,
                use_cache=True)
    pieces, cache = [out.logits], out.past_key_values
    for i in range(t, ids.shape[1]):
        out = model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], position_ids=pos[:, i:i + 1],
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        pieces.append(out.logits)
    return np.concatenate(pieces, axis=1), cache


@settings(max_examples=20, deadline=None)
@given(variant=st.sampled_from(sorted(VARIANTS)), b=st.integers(1, 3), t=st.integers(1, 6), steps=st.integers(1, 6),
       pad=st.integers(0, 3), preallocated=st.booleans(), seed=st.integers(0, 2**16))
def test_kv_cache_decoding_equals_reference_float64(variant, b, t, steps, pad, preallocated, seed):
    """Prefill then one token at a time through the cache (left padding in row 0), step for step against
    the reference (a padding position attends to nothing; its logits depend on the schedule, in both)."""
    ref, fast = _pair(variant, 2)
    pad = min(pad, t - 1)
    ids, mask, pos = _padded(np.random.default_rng(seed), b, t + steps, [pad] + [0] * (b - 1))
    want, ref_cache = _decode(ref, ids, mask, pos, t)
    cache = KVCache(ref.config, b, t + steps, np.float64, np) if preallocated else None
    got, cache = _decode(fast, ids, mask, pos, t, cache)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    # the tokens (not the padding) also equal one full forward
    full = ref(ids, attention_mask=mask, position_ids=pos).logits
    np.testing.assert_allclose(got[:, pad:], full[:, pad:], rtol=0, atol=TOL)
    assert cache.get_seq_length() == t + steps
    for layer in range(ref.config.num_hidden_layers):                   # the cache holds what the reference caches
        np.testing.assert_allclose(cache.keys[layer][:, :, :t + steps], ref_cache.keys[layer][:, :, :t + steps],
                                   rtol=0, atol=TOL)
        np.testing.assert_allclose(cache.values[layer][:, :, :t + steps],
                                   ref_cache.values[layer][:, :, :t + steps], rtol=0, atol=TOL)


@settings(max_examples=10, deadline=None)
@given(variant=st.sampled_from(sorted(VARIANTS)), t=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_float32_is_as_accurate_as_the_reference(variant, t, seed):
    truth = tiny_model(seed=3, dtype="float64", **VARIANTS[variant])
    ref32 = tiny_model(seed=3, dtype="float32", **VARIANTS[variant])
    fast32 = tiny_model(seed=3, dtype="float32", **VARIANTS[variant]).fast()
    ids = np.random.default_rng(seed).integers(0, 101, (2, t))
    exact = truth(ids).logits
    ref_err = np.abs(ref32(ids).logits - exact).max()
    got = fast32(ids).logits
    assert got.dtype == np.float32
    fast_err = np.abs(got - exact).max()
    assert fast_err <= 2 * ref_err + 8 * EPS32 * np.abs(exact).max(), (fast_err, ref_err)


def test_other_activation_and_tied_embeddings():
    ref, fast = _pair("3b", 4, hidden_act="gelu_new", tie_word_embeddings=True)
    ids = [[3, 1, 4, 1, 5, 9, 2, 6]]
    np.testing.assert_allclose(fast(ids).logits, ref(ids).logits, rtol=0, atol=TOL)


def test_fast_shares_the_weights_and_the_reference_still_agrees():
    model = tiny_model(seed=5)
    ids = [[7, 8, 9, 10]]
    before = model(ids).logits
    fast = model.fast()
    assert model.fast() is fast
    q = model.params["model.layers.0.self_attn.q_proj.weight"]
    assert np.shares_memory(q, fast.layers[0].qkv_t)                  # a view, not a second copy
    np.testing.assert_allclose(model(ids).logits, before, rtol=0, atol=TOL)
    assert fast.config is model.config and fast.dtype == model.dtype   # what generate() reads


def test_delegates_what_it_does_not_cover():
    ref, fast = _pair("12b", 6)
    ids = np.array([[1, 2, 3, 4, 5]])
    out = fast(ids, labels=ids, output_hidden_states=True)
    want = ref(ids, labels=ids, output_hidden_states=True)
    assert abs(out.loss - want.loss) < TOL and len(out.hidden_states) == len(want.hidden_states)


def test_errors():
    fast = tiny_model(seed=7).fast()
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        fast([[1, 500]])
    with pytest.raises(GenerationError, match="logits_to_keep"):
        fast([[1, 2]], logits_to_keep=-1)
    cache = KVCache(fast.config, 2, 4, np.float64, np)
    with pytest.raises(GenerationError, match="batch 2"):
        fast([[1, 2]], past_key_values=cache)
    with pytest.raises(GenerationError, match="max_len"):
        fast([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]], past_key_values=cache)
    with pytest.raises(StableLmError, match="StableLmForCausalLM"):
        FastCpuModel(object())
    assert isinstance(fast.model, StableLmForCausalLM)


def test_generate_through_the_fast_model_equals_the_reference():
    """generation.generate drives either model through the same calls: same greedy tokens, left-padded batch."""
    ref, fast = _pair("1_6b", 8)
    ids = [[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]]
    mask = [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    got = fast.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_fast_path_shares_the_reference_input_checks():
    """Both paths check inputs through model._prepare_inputs: decoding past the context through the cache is
    allowed on both (as transformers), negative positions and foreign caches are refused on both."""
    model = tiny_model(seed=9, dtype="float32")  # max_position_embeddings 64
    fast = model.fast()
    for m in (model, fast):
        out = m(np.ones((1, 64), np.int64), use_cache=True)
        step = m([[3]], past_key_values=out.past_key_values, use_cache=True)   # position 64
        assert np.isfinite(step.logits).all()
        with pytest.raises(GenerationError, match="is negative"):
            m([[1, 2]], position_ids=[[-1, 0]])
        with pytest.raises(GenerationError, match="past_key_values must be the KVCache"):
            m([[1]], past_key_values=object(), use_cache=True)
