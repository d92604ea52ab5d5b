"""Whole-model properties: causality, left padding, the KV cache, save/load round trip."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stablelm_ref import StableLmForCausalLM, StableLmModel
from stablelm_ref.errors import GenerationError

from conftest import VARIANTS, tiny_model

# float64 throughout: differences between two exact computations of the same function are rounding
# (~1e-15 relative); 1e-10 leaves room for different summation orders and fails on any real bug.
TOL = 1e-10


@settings(max_examples=15, deadline=None)
@given(variant=st.sampled_from(sorted(VARIANTS)), t=st.integers(2, 12), cut=st.integers(1, 11),
       seed=st.integers(0, 2**16))
def test_future_tokens_never_change_earlier_logits(variant, t, cut, seed):
    cut = min(cut, t - 1)
    model = tiny_model(seed=1, **VARIANTS[variant])
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 101, (1, t))
    b = a.copy()
    b[:, cut:] = rng.integers(0, 101, (1, t - cut))
    la, lb = model(a).logits, model(b).logits
    np.testing.assert_allclose(la[:, :cut], lb[:, :cut], rtol=0, atol=TOL)


@settings(max_examples=15, deadline=None)
@given(variant=st.sampled_from(sorted(VARIANTS)), t=st.integers(1, 10), pad=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_left_padded_row_equals_unpadded(variant, t, pad, seed):
    model = tiny_model(seed=2, **VARIANTS[variant])
    ids = np.random.default_rng(seed).integers(2, 101, (1, t))
    alone = model(ids).logits
    padded = np.concatenate([np.ones((1, pad), np.int64), ids], axis=1)
    mask = np.concatenate([np.zeros((1, pad), np.int64), np.ones((1, t), np.int64)], axis=1)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    out = model(padded, attention_mask=mask, position_ids=pos).logits
    np.testing.assert_allclose(out[:, pad:], alone, rtol=0, atol=TOL)


@settings(max_examples=15, deadline=None)
@given(variant=st.sampled_from(sorted(VARIANTS)), t=st.integers(1, 8), steps=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_incremental_decoding_equals_full_forward(variant, t, steps, seed):
    model = tiny_model(seed=3, **VARIANTS[variant])
    ids = np.random.default_rng(seed).integers(0, 101, (2, t + steps))
    full = model(ids).logits
    out = model(ids[:, :t], use_cache=True)
    pieces = [out.logits]
    cache = out.past_key_values
    for i in range(t, t + steps):
        out = model(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
        pieces.append(out.logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=0, atol=TOL)
    assert cache.get_seq_length() == t + steps


def test_save_load_round_trip(tmp_path, variant):
    model = tiny_model(seed=4, **VARIANTS[variant])
    model.save_pretrained(tmp_path)
    again = StableLmForCausalLM.from_pretrained(tmp_path, dtype="float64")
    ids = [[1, 2, 3, 4, 5]]
    np.testing.assert_array_equal(again(ids).logits, model(ids).logits)
    base = StableLmModel.from_pretrained(tmp_path, dtype="float64")  # the bare model skips lm_head.weight
    np.testing.assert_array_equal(base(ids).last_hidden_state, model(ids, output_hidden_states=True).hidden_states[-1])


def test_logits_to_keep():
    model = tiny_model(seed=5)
    ids = [[5, 6, 7, 8]]
    full = model(ids).logits
    np.testing.assert_allclose(model(ids, logits_to_keep=1).logits, full[:, -1:], rtol=0, atol=TOL)
    np.testing.assert_array_equal(model(ids, logits_to_keep=np.uint64(1)).logits, model(ids, logits_to_keep=1).logits)
    np.testing.assert_allclose(model(ids, logits_to_keep=np.array([0, 2])).logits, full[:, [0, 2]], rtol=0, atol=TOL)


@pytest.mark.parametrize("bad, match", [
    ([[0, 101]], "outside the vocabulary"), ([[-1, 3]], "outside the vocabulary"), ([[]], "empty"),
    ([[1.5, 2.0]], "integers"),
])
def test_bad_ids_are_clear_errors(bad, match):
    with pytest.raises(GenerationError, match=match):
        tiny_model()(bad)


def test_too_long_prompt():
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        tiny_model()(np.zeros((1, 65), np.int64))


@pytest.mark.parametrize("kwargs, match", [
    (dict(past_key_values=5, use_cache=True), "past_key_values must be the KVCache"),
    (dict(logits_to_keep="a"), "logits_to_keep must be an int or a 1-D array"),
    (dict(logits_to_keep=[9]), "logits_to_keep must be an int or a 1-D array"),
    (dict(logits_to_keep=-1), "logits_to_keep must be >= 0"),
    (dict(logits_to_keep=True), "logits_to_keep must be an int or a 1-D array"),     # errors.is_int: no bool
    (dict(logits_to_keep=np.True_), "logits_to_keep must be an int or a 1-D array"),
])
def test_api_misuse_is_a_clear_error(kwargs, match):
    with pytest.raises(GenerationError, match=match):
        tiny_model()([[1, 2, 3]], **kwargs)


def test_labels_need_the_logits_of_every_position_in_order():
    """The loss pairs logits[t] with labels[t + 1]: logits_to_keep may only keep all positions, in order."""
    model, ids = tiny_model(seed=6), [[5, 6, 7, 8]]
    loss = model(ids, labels=ids).loss
    for keep in (4, 9, np.arange(4), np.array([-4, -3, -2, -1])):            # every position, in order
        assert model(ids, labels=ids, logits_to_keep=keep).loss == loss
    for keep in (1, 3, np.array([0, 2]), np.array([3, 2, 1, 0]), np.array([0, 1, 2, 2])):
        with pytest.raises(GenerationError, match="labels need logits for every position"):
            model(ids, labels=ids, logits_to_keep=keep)
