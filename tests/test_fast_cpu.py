"""fast_cpu.FastCpuModel equals the reference forward (the concept files) on every variant.

float64: both compute the same equations except for summation order (fused GEMMs, transposed layouts,
LayerNorm means as GEMVs, q scaled before q k^T, softmax divided after the product with v), so they
agree to rounding, ~1e-15 relative; 1e-10 fails on any real bug.
float32: each logit is checked against the float64 truth with a bound derived from float32 rounding
(see float32_bound): a bug (wrong head, mask, rotary slice) is O(1) off, far outside it.
"""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stablelm_ref import StableLmForCausalLM
from stablelm_ref.errors import CheckpointError, GenerationError, StableLmError
from stablelm_ref import fast_cpu
from stablelm_ref.fast_cpu import FastCpuModel, _transpose_in_place
from stablelm_ref.kv_cache import KVCache

from conftest import VARIANTS, tiny_model

TOL = 1e-10
U32 = float(np.finfo(np.float32).eps) / 2          # float32 unit roundoff, 2^-24


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


def float32_bound(truth, ids):
    """Per-logit bound on the float32 error of the whole forward, from float32 rounding.

    A dot product of n terms computed in floating point is off by at most gamma_n * sum |a_i b_i|,
    gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability of Numerical Algorithms, 3.1). The
    logits are such a sum over the final hidden state h, S_v = sum_j |W_lm[v, j] h_j|; the relative
    error h carries in from the layers is at most the sum of the gamma_n of every dot product on the
    way (per layer: the q|k|v GEMM over hidden, q k^T over head_dim, the softmax-weighted sum over the
    positions, o over H*D, gate|up over hidden, down over intermediate), each LayerNorm renormalising
    it (its inputs are O(1) here, so it does not amplify). Hence |error_v| <= gamma_N * S_v with N the
    sum of those lengths plus hidden for the lm_head: about 700 for the tiny models, a bound near 4e-5
    relative to S_v, where float32 runs land near 1e-6."""
    c = truth.config
    s = ids.shape[1]
    per_layer = c.hidden_size + c.head_dim + s + c.num_attention_heads * c.head_dim + c.hidden_size + \
        c.intermediate_size
    n = c.num_hidden_layers * per_layer + c.hidden_size
    gamma = n * U32 / (1 - n * U32)
    h = truth(ids, output_hidden_states=True).hidden_states[-1]       # the final LayerNorm's output
    return gamma * (np.abs(h) @ np.abs(truth.lm_head_weight.T))        # [B, T, vocab]


@settings(max_examples=10, deadline=None)
@given(variant=st.sampled_from(sorted(VARIANTS)), t=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_float32_is_within_the_rounding_bound(variant, t, seed):
    truth = tiny_model(seed=3, dtype="float64", **VARIANTS[variant])
    ref32 = tiny_model(seed=3, dtype="float32", **VARIANTS[variant])
    fast32 = tiny_model(seed=3, dtype="float32", **VARIANTS[variant]).fast()
    ids = np.random.default_rng(seed).integers(0, 101, (2, t))
    exact = truth(ids).logits
    bound = float32_bound(truth, ids)
    got = fast32(ids).logits
    assert got.dtype == np.float32
    ref_err = np.abs(ref32(ids).logits - exact)
    fast_err = np.abs(got - exact)
    assert (ref_err <= bound).all(), "the bound is wrong: the reference's own float32 run exceeds it"
    assert (fast_err <= bound).all(), (fast_err.max(), (fast_err / bound).max())
    last_err = np.abs(fast32(ids, logits_to_keep=1).logits - exact[:, -1:])  # the last layer on one row (t > 1)
    assert (last_err <= bound[:, -1:]).all(), (last_err.max(), (last_err / bound[:, -1:]).max())


def test_float32_bound_catches_a_small_error():
    """The bound is tight enough to fail a float32 forward with one weight rounded to bfloat16 precision."""
    truth = tiny_model(seed=3, dtype="float64", **VARIANTS["3b"])
    bad = tiny_model(seed=3, dtype="float32", **VARIANTS["3b"])
    w = bad.params["model.layers.1.mlp.down_proj.weight"]
    bad.params["model.layers.1.mlp.down_proj.weight"] = (w.view(np.uint32) & 0xFFFF0000).view(np.float32)
    ids = np.arange(24).reshape(2, 12)
    assert (np.abs(bad.fast()(ids).logits - truth(ids).logits) > float32_bound(truth, ids)).any()


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
    assert np.shares_memory(q, fast.layers[0].in_t)                  # a view, not a second copy
    np.testing.assert_allclose(model(ids).logits, before, rtol=0, atol=TOL)
    assert fast.config is model.config and fast.dtype == model.dtype   # what generate() reads


def test_generate_through_the_fast_form_reads_the_models_config_as_it_is():
    """generate(model.fast(), ...) checks against model.config as it is now, as generate(model, ...) does: the form's
    config was the one of its last build, so with model.config replaced since, generate's own checks (the prompt
    against the context, the cache's size) read the old one and the forward's check refused it in other words."""
    import dataclasses

    model = tiny_model(seed=5)
    fast = model.fast()
    ids = np.arange(1, 9)[None]
    model.config = dataclasses.replace(model.config, max_position_embeddings=4)
    assert fast.config is model.config
    errors = []
    for who in (model, fast):
        with pytest.raises(GenerationError) as e:
            who.generate(ids, max_new_tokens=2)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and errors[0].startswith("the prompt has 8 tokens")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_layers_matrices_share_one_allocation(variant):
    """Each layer's fused matrices lie in one array (one allocation: NumPy backs it with huge pages when it
    is 4 MiB or more), 4 KiB-aligned, in the order a step reads them, without overlapping; every weight of
    the layer is a view into it, and the reference still computes the same logits."""
    ref, fast = _pair(variant, 12)
    ids = [[3, 1, 4, 1, 5]]
    for i, layer in enumerate(fast.layers):
        mats = [m for m in (layer.in_t, layer.o_t, layer.gate_up_t, layer.down_t) if m is not None]
        arena = mats[0].base
        assert arena is not None and arena.ndim == 1 and all(m.base is arena for m in mats)
        starts = [m.__array_interface__["data"][0] for m in mats]
        assert all(a % 4096 == 0 for a in starts)
        assert all(a + m.nbytes <= b for a, m, b in zip(starts, mats, starts[1:]))     # in order, apart
        for name, w in fast.model.params.items():
            if name.startswith(f"model.layers.{i}.") and w.ndim == 2:
                assert w.base is arena, name
    np.testing.assert_allclose(fast.model(ids).logits, ref(ids).logits, rtol=0, atol=TOL)
    np.testing.assert_allclose(fast(ids).logits, ref(ids).logits, rtol=0, atol=TOL)


def test_delegates_what_it_does_not_cover():
    ref, fast = _pair("12b", 6)
    ids = np.array([[1, 2, 3, 4, 5]])
    out = fast(ids, labels=ids, output_hidden_states=True)
    want = ref(ids, labels=ids, output_hidden_states=True)
    assert abs(out.loss - want.loss) < TOL and len(out.hidden_states) == len(want.hidden_states)


@pytest.mark.parametrize("value", [0, 1, None, "", "no"])
def test_the_fast_form_checks_output_hidden_states_as_the_reference_does(value):
    """A falsy non-bool (0, None, "") took the fast path unchecked while the reference refuses it."""
    fast = tiny_model(seed=7).fast()
    message = rf"^output_hidden_states must be True or False, got {re.escape(repr(value))}$"
    for forward in (fast, fast.model):
        with pytest.raises(GenerationError, match=message):
            forward([[1, 2]], output_hidden_states=value)
    assert len(fast([[1, 2]], output_hidden_states=np.True_).hidden_states) == fast.config.num_hidden_layers + 1


def test_errors():
    fast = tiny_model(seed=7).fast()
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        fast([[1, 500]])
    with pytest.raises(GenerationError, match="logits_to_keep"):
        fast([[1, 2]], logits_to_keep=-1)
    for flag in (True, np.True_):                                      # errors.is_int, as heads.py: not a count
        with pytest.raises(GenerationError, match="logits_to_keep must be an int"):
            fast([[1, 2]], logits_to_keep=flag)
    np.testing.assert_array_equal(fast([[1, 2, 3]], logits_to_keep=np.uint64(1)).logits,
                                  fast([[1, 2, 3]], logits_to_keep=1).logits)
    cache = KVCache(fast.config, 2, 4, np.float64, np)
    with pytest.raises(GenerationError, match="batch 2"):
        fast([[1, 2]], past_key_values=cache)
    with pytest.raises(GenerationError, match="max_len"):
        fast([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]], past_key_values=cache)
    for other in (object(), None):       # None: __init__ took it for the model of a form already made (9841be2)
        with pytest.raises(StableLmError, match=f"^FastCpuModel takes a StableLmForCausalLM, got "
                                                f"{type(other).__name__}$"):
            FastCpuModel(other)
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


@settings(max_examples=15, deadline=None)
@given(variant=st.sampled_from(sorted(VARIANTS)), t1=st.integers(1, 11), t2=st.integers(1, 11), pad=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_prefill_in_query_blocks_equals_reference(variant, t1, t2, pad, seed):
    """Prefill attention runs in blocks of QUERY_BLOCK queries, each reading only the keys it may see: with
    blocks of 3, a prompt of t1 tokens then t2 more through the cache spans several blocks (with left padding
    in row 0 the blocks read every key, as the reference's fully masked rows do)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast_cpu, "QUERY_BLOCK", 3)
        _check_two_prompts(variant, t1, t2, pad, seed)


def _check_two_prompts(variant, t1, t2, pad, seed):
    ref, fast = _pair(variant, 10)
    pad = min(pad, t1 - 1)
    ids, mask, pos = _padded(np.random.default_rng(seed), 2, t1 + t2, [pad, 0])
    for m, p in ((mask, pos), (None, None)):
        pieces = {}
        for name, model in (("ref", ref), ("fast", fast)):
            first = model(ids[:, :t1], attention_mask=None if m is None else m[:, :t1],
                          position_ids=None if p is None else p[:, :t1], use_cache=True)
            second = model(ids[:, t1:], attention_mask=m, position_ids=None if p is None else p[:, t1:],
                           past_key_values=first.past_key_values, use_cache=True)
            pieces[name] = np.concatenate([first.logits, second.logits], axis=1)
        np.testing.assert_allclose(pieces["fast"], pieces["ref"], rtol=0, atol=TOL)
        full = ref(ids, attention_mask=m, position_ids=p).logits          # the tokens: as one forward
        np.testing.assert_allclose(pieces["fast"][:, pad:], full[:, pad:], rtol=0, atol=TOL)


@settings(max_examples=20, deadline=None)
@given(variant=st.sampled_from(sorted(VARIANTS)), t=st.integers(2, 9), steps=st.integers(1, 3), pad=st.integers(0, 3),
       keep=st.one_of(st.integers(1, 8), st.lists(st.integers(-8, 8), min_size=0, max_size=4)),
       chunked=st.booleans(), seed=st.integers(0, 2**16))
def test_prefill_keeping_some_logits_still_fills_the_cache(variant, t, steps, pad, keep, chunked, seed):
    """With logits_to_keep (an int, or positions in any order, repeated or not, negative or none) the last
    layer's outputs are computed for the kept rows only, its keys and values for all: the kept logits, every
    layer of the cache, and the decode steps after it equal the reference's (left padding in row 0;
    `chunked`: the prompt's second half goes through the cache after its first, so the kept queries also see
    earlier keys)."""
    ref, fast = _pair(variant, 11)
    pad = min(pad, t - 1)
    start = t // 2 if chunked else 0                                   # the call with logits_to_keep: t - start tokens
    n = t - start                                                      # positions: [0, n) or [-n, 0)
    keep = keep if isinstance(keep, int) else np.array([k % n - (n if k < 0 else 0) for k in keep], np.int64)
    ids, mask, pos = _padded(np.random.default_rng(seed), 2, t + steps, [pad, 0])
    results = {}
    for name, model in (("ref", ref), ("fast", fast)):
        cache = None
        if chunked:
            cache = model(ids[:, :start], attention_mask=mask[:, :start], position_ids=pos[:, :start],
                          use_cache=True).past_key_values
        out = model(ids[:, start:t], attention_mask=mask[:, :t], position_ids=pos[:, start:t], past_key_values=cache,
                    use_cache=True, logits_to_keep=keep)
        pieces, cache = [out.logits], out.past_key_values
        for i in range(t, t + steps):
            out = model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], position_ids=pos[:, i:i + 1],
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
            pieces.append(out.logits)
        results[name] = (np.concatenate(pieces, axis=1), cache)
    (got, cache), (want, ref_cache) = results["fast"], results["ref"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    for layer in range(ref.config.num_hidden_layers):
        np.testing.assert_allclose(cache.keys[layer][:, :, :t + steps], ref_cache.keys[layer][:, :, :t + steps],
                                   rtol=0, atol=TOL)
        np.testing.assert_allclose(cache.values[layer][:, :, :t + steps],
                                   ref_cache.values[layer][:, :, :t + steps], rtol=0, atol=TOL)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 7), k=st.integers(1, 40), block=st.integers(1, 9))
def test_transpose_in_place(n, k, block):
    w = np.random.default_rng(n * 1000 + k).normal(size=(n * block, k))
    want = w.T.copy()
    got = _transpose_in_place(w, block)
    assert got.shape == (k, n * block) and np.shares_memory(got, w)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("tied", [False, True])
def test_lm_head_is_transposed_in_its_own_memory(tied):
    """vocab 4100 = 2 x 2050: the lm_head becomes [hidden, vocab] C-contiguous in place; params (and a tied
    embedding) become views of it, and both models still agree."""
    ref, fast = _pair("3b", 11, vocab_size=4100, tie_word_embeddings=tied)
    name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert fast.lm_head_t.flags.c_contiguous and np.shares_memory(fast.lm_head_t, fast.params[name])
    np.testing.assert_array_equal(fast.params[name], ref.params[name])
    ids = np.random.default_rng(0).integers(0, 4100, (2, 7))
    np.testing.assert_allclose(fast(ids).logits, ref(ids).logits, rtol=0, atol=TOL)
    np.testing.assert_allclose(fast.model(ids).logits, ref(ids).logits, rtol=0, atol=TOL)


def test_lm_head_held_elsewhere_is_left_alone():
    """An lm_head array someone else still holds is not rewritten (it is read transposed instead)."""
    model = tiny_model(seed=12, vocab_size=4100)
    held = model.params["lm_head.weight"]
    before = held.copy()
    fast = model.fast()
    np.testing.assert_array_equal(held, before)
    assert not fast.lm_head_t.flags.c_contiguous and np.shares_memory(fast.lm_head_t, held)


def test_positional_arguments_follow_the_model_forward():
    """fast(ids, attention_mask, position_ids, past_key_values, use_cache, labels, logits_to_keep) as
    StableLmForCausalLM.forward takes them."""
    ref, fast = _pair("1_6b", 13)
    ids = np.array([[1, 2, 3, 4, 5]])
    want = ref(ids, None, None, None, False, ids)
    got = fast(ids, None, None, None, False, ids)
    assert abs(got.loss - want.loss) < TOL
    np.testing.assert_allclose(fast(ids, None, None, None, False, None, 2).logits,
                               ref(ids, None, None, None, False, None, 2).logits, rtol=0, atol=TOL)


def _replace(name, change):
    return lambda m: m.params.__setitem__(name, change(m.params[name]))


def _renamed(m, rename):
    """model.params refilled in place with each tensor where it was in the dict, under rename(its name): the
    same tensor objects in the same order, only the names moved (a test of the values alone cannot see it)."""
    items = [(rename(k), v) for k, v in m.params.items()]
    m.params.clear()
    m.params.update(items)


def _swap(a, b):
    return lambda name: {a: b, b: a}.get(name, name)


EDITS_AFTER_FAST = {      # each applied to a model after fast() was built, and to a twin the fast form never saw
    "values replaced": _replace("model.layers.0.mlp.up_proj.weight", lambda w: w * 2),
    "embedding replaced": _replace("model.embed_tokens.weight", lambda w: w[::-1].copy()),
    "q|k|v bias edited in place": lambda m: m.params["model.layers.1.self_attn.q_proj.bias"].__imul__(-2.0),
    "qk-norm weight edited in place": lambda m: m.params["model.layers.0.self_attn.q_layernorm.norms.1.weight"]
    .__imul__(3.0),
    "rope_theta edited": lambda m: setattr(m.config, "rope_theta", 77.0),
    "hidden_act edited": lambda m: setattr(m.config, "hidden_act", "gelu_new"),
    "a layer fewer in the config": lambda m: setattr(m.config, "num_hidden_layers", 1),
    "the params dict replaced": lambda m: setattr(m, "params", {k: v * 0.5 for k, v in m.params.items()}),
    "the config replaced": lambda m: setattr(m, "config", m.config.__class__.from_dict(
        {**m.config.to_dict(), "layer_norm_eps": 0.5})),
    "two names swapped in place": lambda m: _renamed(m, _swap("model.layers.0.self_attn.q_proj.weight",
                                                              "model.layers.0.self_attn.k_proj.weight")),
}


@pytest.mark.parametrize("edit", sorted(EDITS_AFTER_FAST))
def test_the_fast_form_follows_params_and_config_edited_after_it_was_built(edit):
    """The fast form held fused copies made when it was built: a tensor replaced in model.params, a bias or
    qk-norm weight edited in place (they were joined into copies), or a config field (rope_theta: the rotary
    table) edited afterwards changed the reference's logits but not the fast form's (differences of 0.8 to
    2.9 in a logit). Now it rebuilds from the current params; the truth is a twin edited the same way that
    never had a fast form."""
    change = EDITS_AFTER_FAST[edit]
    model, twin = (tiny_model(seed=3, use_qkv_bias=True, qk_layernorm=True) for _ in range(2))
    fast = model.fast()
    ids = [[3, 1, 4, 1, 5, 9]]
    before = fast(ids).logits
    change(model)
    change(twin)
    want = twin(ids).logits
    assert np.abs(want - before).max() > 1e-3                          # the edit changes the function
    np.testing.assert_allclose(fast(ids).logits, want, rtol=0, atol=TOL)
    np.testing.assert_allclose(model(ids).logits, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("edit, match", [
    (_replace("model.layers.0.mlp.up_proj.weight", lambda w: w[:5]),
     r"tensor 'model.layers.0.mlp.up_proj.weight' has shape \(5, 64\)"),
    (_replace("model.norm.bias", lambda w: w.astype(np.int32)), "tensor 'model.norm.bias' has dtype int32"),
    (lambda m: m.params.pop("model.layers.1.input_layernorm.weight"), "is missing from the model"),
    (lambda m: m.params.pop("lm_head.weight"), "'lm_head.weight' is missing from the model"),  # the last: by count
    (lambda m: _renamed(m, lambda k: k + "_old" if k == "lm_head.weight" else k),    # the same tensors, one renamed
     "'lm_head.weight' is missing from the model"),
], ids=["cut", "cast", "removed", "the last removed", "the last renamed"])
def test_the_fast_form_refuses_params_edited_after_it_was_built_as_the_reference_does(edit, match):
    """A tensor cut or cast after fast() ran on the old fused copies, where the reference refused it."""
    model = tiny_model(seed=3)
    fast = model.fast()
    edit(model)
    for forward in (model, fast):
        with pytest.raises(CheckpointError, match=match):
            forward([[1, 2, 3]])


def test_positions_beyond_the_rotary_table_are_computed_per_call():
    """The rotary table was made for max(position + 1, max_position_embeddings) positions: a valid config of
    max_position_embeddings 10**12 made the first call a MemoryError (7 TiB). The table now holds at most
    ROPE_TABLE positions, and cos/sin of positions beyond it are computed per call (the reference's way)."""
    ref, fast = _pair("3b", 9, max_position_embeddings=10**12)
    ids = [[3, 1, 4, 1, 5]]
    np.testing.assert_allclose(fast(ids).logits, ref(ids).logits, rtol=0, atol=TOL)
    assert fast._rope[0].shape[0] == fast_cpu.ROPE_TABLE
    far = [np.arange(5) + 10 * fast_cpu.ROPE_TABLE]
    np.testing.assert_allclose(fast(ids, position_ids=far).logits, ref(ids, position_ids=far).logits, rtol=0,
                               atol=TOL)


def test_a_second_fast_form_of_one_model_is_the_same_one_and_nothing_is_rebuilt(monkeypatch):
    """A build makes model.params views of its fused copies, so a second form (FastCpuModel(model) beside
    model.fast(), which the module doc offers as equivalent) replaced every tensor the first had seen: each call of
    either rebuilt all its copies (a copy of every weight per call). FastCpuModel(model) is now the
    model's one CPU fast form, whichever is made first; alternating calls rebuild nothing and match the reference."""
    builds = []
    real = FastCpuModel._build
    monkeypatch.setattr(FastCpuModel, "_build", lambda self: (builds.append(self), real(self)))
    model = tiny_model(seed=3)
    first = FastCpuModel(model)
    assert model.fast() is first and FastCpuModel(model) is first
    other = tiny_model(seed=4)
    assert FastCpuModel(other) is not first and other.fast() is not first
    ids = [[3, 1, 4, 1, 5]]
    want = model(ids).logits
    builds.clear()
    for form in (first, model.fast(), FastCpuModel(model), first):
        np.testing.assert_allclose(form(ids).logits, want, rtol=0, atol=TOL)
    assert builds == []


@pytest.mark.parametrize("name, dtype", [
    ("model.layers.0.self_attn.q_proj.weight", "float16"),
    ("model.layers.1.self_attn.q_proj.weight", "bfloat16"),
    ("model.embed_tokens.weight", "float16"),
    ("model.norm.weight", "float32"),
])
@pytest.mark.parametrize("when", ["after it was built", "before"])
def test_the_fast_form_refuses_a_tensor_of_another_dtype_than_the_model(name, dtype, when):
    """The reference computes with a tensor cast after loading (NumPy promotes); the fast form rebuilt its fused
    copies in the dtype of the layer's q_proj, so a float16 q_proj rounded k and v to float16 too: logits off by
    3e-3 (bfloat16: 2.5e-2) from the reference's, silently; a float16 embedding failed in np.take ("Cannot cast
    ... according to the rule 'safe'"). It computes in model.dtype only, so such a tensor is refused by name."""
    import ml_dtypes

    model = tiny_model(seed=3)                                          # float64
    ids = [[3, 1, 4, 1, 5, 9]]
    fast = model.fast() if when == "after it was built" else None
    model.params[name] = model.params[name].astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    want = model(ids).logits                                            # the reference computes with it
    assert want.dtype == np.float64
    with pytest.raises(CheckpointError, match=re.escape(
            f"the CPU fast form computes in float64 (model.dtype): tensor {name!r} has dtype {dtype}; cast it back "
            f"(.astype(np.float64)) or call the model itself, which computes with it")):
        (fast or model.fast())(ids)
    model.params[name] = model.params[name].astype(np.float64)         # cast back: the form follows
    np.testing.assert_allclose(model.fast()(ids).logits, model(ids).logits, rtol=0, atol=TOL)


def test_the_fast_form_follows_model_dtype_edited_after_it_was_built():
    """model.dtype set after fast() was built: the reference computes in the new dtype (its activations, cache and
    rotary tables), where the fast form went on in the old one for an input shape it had seen and failed inside
    np.take ("Cannot cast array data from dtype('float32') ...") for a new shape, its buffers made in the new dtype.
    model.dtype is now watched with params and config: every tensor then has another dtype and is refused by name,
    as when built; a dtype this form does not run is refused as such; set back, the form computes again."""
    model = tiny_model(seed=3)                                          # float64
    fast = model.fast()
    seen, new = [[3, 1, 4]], [[3, 1, 4, 1, 5]]
    fast(seen)
    model.dtype = np.dtype(np.float32)
    for ids in (seen, new):
        with pytest.raises(CheckpointError, match=r"^the CPU fast form computes in float32 \(model.dtype\): tensor "
                                                  r"'[^']+' has dtype float64; cast it back"):
            fast(ids)
    model.dtype = np.dtype(np.float16)
    with pytest.raises(StableLmError, match="^FastCpuModel runs NumPy float32 or float64 models; this one is cpu "
                                            "float16"):
        fast(seen)
    model.dtype = np.dtype(np.float64)
    for ids in (seen, new):
        np.testing.assert_allclose(fast(ids).logits, model(ids).logits, rtol=0, atol=TOL)


def test_calls_from_several_threads_each_get_their_own_answer():
    """The fast form writes into buffers it keeps between calls (one set per input shape): two threads calling it
    at once wrote into each other's, and got logits of the other's input or a mix (14 of 600 calls of two
    threads), or a ValueError from inside np.take. Calls now take turns; each thread's logits are those of the
    reference for its own input."""
    import threading

    model = tiny_model(seed=3)
    fast = model.fast()
    inputs = [[[3, 1, 4, 1, 5, 9]], [[7, 7, 2, 9, 1, 0]], [[2, 7, 1, 8, 2, 8]], [[1, 4, 1, 4, 2, 1]]]
    wants = [model(ids).logits for ids in inputs]
    start, wrong, errors = threading.Barrier(len(inputs)), [], []

    def run(ids, want):
        start.wait()
        try:
            for _ in range(150):
                if np.abs(fast(ids).logits - want).max() > TOL:
                    wrong.append(ids)
        except Exception as e:   # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=pair) for pair in zip(inputs, wants)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and wrong == [], (errors[:1], len(wrong))


def test_a_streamer_that_runs_a_generate_in_another_thread_and_waits_for_it():
    """A streamer's put that starts a generate of the same fast form in another thread and joins it: the form is
    held for one call (not for a whole generate, as the GPU engine is), so the inner generate runs between the outer
    one's steps, and both give the tokens they give alone (generate is deterministic: greedy)."""
    import threading

    from stablelm_ref.generation import generate

    fast = tiny_model(seed=3).fast()
    outer, inner_ids = np.array([[3, 1, 4, 1, 5]]), np.array([[2, 7, 1]])
    want_outer, want_inner = generate(fast, outer, max_new_tokens=5), generate(fast, inner_ids, max_new_tokens=4)
    got = {}

    class Joining:
        n = 0

        def put(self, ids):
            self.n += 1
            if self.n == 3:                      # the prompt, then the first new token: in the outer one's loop
                thread = threading.Thread(target=lambda: got.update(inner=generate(fast, inner_ids, max_new_tokens=4)))
                thread.start()
                thread.join(timeout=10)
                assert not thread.is_alive(), "the inner generate waited for the outer one"

        def end(self):
            pass

    assert np.array_equal(generate(fast, outer, max_new_tokens=5, streamer=Joining()), want_outer)
    assert np.array_equal(got["inner"], want_inner)


def test_threads_that_ask_a_model_for_its_fast_form_at_once_get_the_one_form():
    """model.fast() and FastCpuModel(model) from threads at once, before any form existed: each began a build, one
    popped lm_head.weight from params to transpose it in place, and the others failed with a bare KeyError from
    inside the build (or, a moment earlier, could have transposed the same memory twice). A form is now made under
    one lock: every thread gets the same form, and its logits are the reference's."""
    import threading

    ids = [[3, 1, 4, 1, 5, 9]]
    for trial in range(3):                         # a vocabulary large enough that the in-place transpose takes time
        model = tiny_model(seed=3, num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=32768)
        want = model(ids).logits
        start, forms, errors = threading.Barrier(4), [], []

        def ask(how):
            start.wait()
            try:
                forms.append(how())
            except Exception as e:   # noqa: BLE001 - reported below
                errors.append(e)

        # both ways of asking, each under the lock: FastCpuModel(model) took none (the test asked model.fast() only)
        threads = [threading.Thread(target=ask, args=(how,)) for how in (model.fast, lambda: FastCpuModel(model)) * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and len({id(f) for f in forms}) == 1, (trial, errors[:1], len(forms))
        np.testing.assert_allclose(forms[0](ids).logits, want, rtol=0, atol=TOL)
        assert model.fast() is forms[0] and FastCpuModel(model) is forms[0]


def test_a_copied_model_gets_a_fast_form_of_its_own():
    """copy.copy(model) (a variant with other weights, its tensors shared until replaced) took the
    original's fast form along, which computes the original model: the copy's fast() gave the original's logits
    however its params were replaced. A fast form serves only the model it was made for."""
    import copy

    model = tiny_model(seed=3)
    fast = model.fast()
    variant = copy.copy(model)
    variant.params = {k: v * 0.5 for k, v in model.params.items()}
    ids = [[3, 1, 4, 1, 5, 9]]
    want = variant(ids).logits
    assert np.abs(want - model(ids).logits).max() > 1e-3
    np.testing.assert_allclose(variant.fast()(ids).logits, want, rtol=0, atol=TOL)
    assert variant.fast() is not fast and model.fast() is fast


def test_a_fast_form_can_be_copied_as_before():
    """copy.copy(fast) made the object without arguments and then set its attributes; FastCpuModel.__new__,
    which returns the model's own form, took a model and made that a TypeError. (A copy is now the form itself:
    the test below; pickle and copy.deepcopy carry it as the form of the carried model, __reduce__.)"""
    import copy

    model = tiny_model(seed=3)
    ids = [[3, 1, 4]]
    np.testing.assert_allclose(copy.copy(model.fast())(ids).logits, model(ids).logits, rtol=0, atol=TOL)


def test_a_copied_fast_form_is_no_second_form_that_rebuilds_on_every_call(monkeypatch):
    """copy.copy(model.fast()) was a second form of the same model (copy's reconstruction bypasses __new__'s
    one-form rule): after any edit of params, calls alternating between the two rebuilt every fused copy on every
    call, each form seeing the other's build as params replaced (8 builds in 4 rounds). The model has one CPU fast
    form, and a copy of it is that form: one rebuild after the edit, and the logits are the reference's."""
    import copy

    model = tiny_model(seed=3)
    fast = model.fast()
    twin = copy.copy(fast)
    ids = [[3, 1, 4, 1, 5, 9]]
    model.params["model.norm.weight"] = model.params["model.norm.weight"] * 2.0
    want = model(ids).logits
    builds = []
    real = FastCpuModel._build
    monkeypatch.setattr(FastCpuModel, "_build", lambda self: (builds.append(self), real(self)))
    for _ in range(4):
        for form in (fast, twin):
            np.testing.assert_allclose(form(ids).logits, want, rtol=0, atol=TOL)
    assert len(builds) == 1, len(builds)


def test_a_decode_across_the_rotary_table_s_end_matches_the_reference():
    """The table's last row (position ROPE_TABLE - 1) and the first position beyond it, in steps through a KV cache,
    float64 against the reference (its cos/sin computed per call at every position): an off-by-one in the table's
    size or in the test of what it holds fails here, where the test above draws positions far from the end."""
    end = fast_cpu.ROPE_TABLE
    ref, fast = _pair("3b", 9, max_position_embeddings=10**12)
    caches = {side: KVCache(side.config, 1, 8, np.float64, np) for side in (ref, fast)}
    for ids, start in (([[3, 1, 4]], end - 3), ([[1]], end), ([[5]], end + 1), ([[9]], end - 1)):
        pos = [np.arange(len(ids[0])) + start]                             # end - 1 last: from the table again
        got, want = (side(ids, position_ids=pos, past_key_values=caches[side], use_cache=True).logits
                     for side in (fast, ref))
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    assert fast._rope[0].shape[0] == end


def test_the_fast_form_follows_a_config_field_edited_in_place():
    """config.rope_scaling is a dict: an edit of its factor in place leaves every field the same object, so the
    fast form compares a deep copy of the fields; comparing the fields themselves passed every test, and the form
    then ran on a rotary table of the old factor (logits 0.86 off)."""
    model = tiny_model(seed=3, rope_scaling={"rope_type": "linear", "factor": 2.0})
    fast, ids = model.fast(), [[3, 1, 4, 1, 5, 9]]
    before = fast(ids).logits
    model.config.rope_scaling["factor"] = 4.0
    want = model(ids).logits
    assert np.abs(want - before).max() > 1e-3
    np.testing.assert_allclose(fast(ids).logits, want, rtol=0, atol=TOL)


def test_a_rebuild_holds_no_second_copy_of_the_weights():
    """The first build replaces each tensor by its fused copy, one layer at a time, so the weights are never held
    twice; a rebuild (any tensor replaced, any config field edited) kept every old fused copy until the last layer
    was made: a second copy of all the weights at once (+10 GB for a 3B float32 model, for a one-tensor edit).
    Measured with tracemalloc, which NumPy reports its allocations to: the rebuild's peak above what was held must
    stay under a quarter of the layers' weights (one layer of eight is an eighth; before, 1.02x)."""
    import tracemalloc

    tracemalloc.start()
    try:
        model = tiny_model(seed=3, num_hidden_layers=8, hidden_size=256, intermediate_size=512,
                           num_attention_heads=4, num_key_value_heads=4)
        fast, ids = model.fast(), [[1, 2, 3]]
        fast(ids)
        layers = sum(v.nbytes for k, v in model.params.items() if k.startswith("model.layers."))
        model.params["model.norm.weight"] = model.params["model.norm.weight"].copy()        # a rebuild
        tracemalloc.reset_peak()
        held, _ = tracemalloc.get_traced_memory()
        got = fast(ids).logits
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(got, model(ids).logits, rtol=0, atol=TOL)
    assert peak - held < layers / 4, f"{(peak - held) / layers:.2f}x the layers' weights"


@pytest.mark.parametrize("inherited", ["python", "ignored"])
def test_a_ctrl_c_while_the_lm_head_is_transposed_leaves_the_model_whole(monkeypatch, inherited):
    """The lm_head is popped from params while its memory is rewritten as its transpose (a second or two for a
    real vocab): a Ctrl-C there left params without lm_head.weight (the model then refused every call, 'load the
    model again') and the memory half permuted. A real SIGINT, sent as the transposition starts, is held until it
    is done and params hold it again, then goes to the handler the process had: Python's raises KeyboardInterrupt
    (a program started from a shell); SIG_IGN (started in the background: nohup, `&`, some CI runners) ignores it.
    The test sets that handler itself, so it does not depend on how its runner was started (it failed under a
    runner that ignores SIGINT). Either way the handler is put back and the model then computes the reference's
    logits (float64, TOL), and the fast form, built on the next call, too."""
    import signal

    handler = signal.default_int_handler if inherited == "python" else signal.SIG_IGN
    outer = signal.signal(signal.SIGINT, handler)
    try:
        ref, model = (tiny_model(seed=11, vocab_size=4100) for _ in range(2))      # 4100 = 2 x 2050: transposed
        real = fast_cpu._transpose_in_place

        def interrupted(w, block):
            signal.raise_signal(signal.SIGINT)
            return real(w, block)

        monkeypatch.setattr(fast_cpu, "_transpose_in_place", interrupted)
        if inherited == "python":
            with pytest.raises(KeyboardInterrupt):
                model.fast()
        else:
            model.fast()                                 # the held Ctrl-C ignored, as the process's handler says
        assert signal.getsignal(signal.SIGINT) is handler                           # put back
        ids = np.random.default_rng(0).integers(0, 4100, (2, 7))
        want = ref(ids).logits
        np.testing.assert_allclose(model(ids).logits, want, rtol=0, atol=TOL)
        monkeypatch.setattr(fast_cpu, "_transpose_in_place", real)
        np.testing.assert_allclose(model.fast()(ids).logits, want, rtol=0, atol=TOL)
    finally:
        signal.signal(signal.SIGINT, outer)


def test_a_decode_step_of_a_tied_model_does_not_copy_the_embedding():
    """With tied embeddings the lm_head transposed in place leaves the embedding a [vocab, hidden] view of
    [hidden, vocab] memory; np.take of its rows copied the whole matrix to a contiguous one first, on every call (the
    shipped default model's decode step: ~10 ms where the rest is ~5, 6.3 MB copied a step). Measured with
    tracemalloc (NumPy reports its allocations to it): a step's peak must stay well under the embedding's bytes
    (the logits and a row of hidden are ~20 KB here). The logits are the reference's to 1e-4 (float32, logits up
    to 10 summed in another order: 9e-6 apart; a wrong row of the embedding is O(1) off)."""
    import tracemalloc

    from stablelm_ref import DEFAULT_MODEL
    from stablelm_ref.kv_cache import KVCache

    model = StableLmForCausalLM.from_pretrained(DEFAULT_MODEL)
    fast = model.fast()
    embed = fast.params["model.embed_tokens.weight"]
    assert model.config.tie_word_embeddings and not embed.flags.c_contiguous        # the case
    cache = KVCache(model.config, 1, 64, model.dtype, np)
    fast(np.arange(2, 10)[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
    tracemalloc.start()
    try:
        out = fast(np.array([[5]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < embed.nbytes / 8, (peak, embed.nbytes)
    ids = np.array([[*range(2, 10), 5]])
    np.testing.assert_allclose(out.logits[:, -1], model(ids).logits[:, -1], rtol=0, atol=1e-4)
    # an embedding of other strides (neither it nor its transpose C-contiguous) is gathered by indexing
    model.params["model.embed_tokens.weight"] = np.repeat(embed, 2, axis=1)[:, ::2]
    strided = model.params["model.embed_tokens.weight"]
    assert not strided.flags.c_contiguous and not strided.T.flags.c_contiguous
    np.testing.assert_allclose(fast(ids).logits, model(ids).logits, rtol=0, atol=1e-4)


def test_the_reference_forward_of_a_tied_model_with_a_fast_form_does_not_copy_the_embedding():
    """The same for the model's own forward once its fast form exists (its params' embedding is then the
    non-contiguous view): generate's default on the CPU (the reference) copied the whole embedding every step."""
    import tracemalloc

    from stablelm_ref import DEFAULT_MODEL

    model = StableLmForCausalLM.from_pretrained(DEFAULT_MODEL)
    want = model([[5, 9, 2]]).logits
    model.fast()
    embed = model.params["model.embed_tokens.weight"]
    assert not embed.flags.c_contiguous
    tracemalloc.start()
    try:
        out = model([[5, 9, 2]], logits_to_keep=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < embed.nbytes / 4, (peak, embed.nbytes)
    np.testing.assert_allclose(out.logits, want[:, -1:], rtol=0, atol=1e-4)   # (float32, as above)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_layer_tensors_name_each_tensor_of_a_layer_once(variant):
    """fast_forms.layer_tensors, the groups both fast forms join (the CPU form here, the GPU engine in its own
    layout): every tensor of a layer in exactly one place, in the model's own order inside each group, and
    nothing else; the CPU form's fused matrices are those groups side by side."""
    from stablelm_ref.fast_forms import layer_tensors

    model = tiny_model(**VARIANTS[variant])
    cfg = model.config
    for i in range(cfg.num_hidden_layers):
        t = layer_tensors(cfg, i)
        named = [*t.ln1, *(t.ln2 or ()), *t.qkv, *(t.qkv_bias or ()), t.o, *t.gate_up, t.down, *(t.qk_norms or ())]
        own = [n for n in model.params if n.startswith(f"model.layers.{i}.")]
        assert sorted(named) == sorted(own) and len(set(named)) == len(named)
        assert [n.split(".")[-2] for n in t.qkv] == ["q_proj", "k_proj", "v_proj"]
        assert [n.split(".")[-2] for n in t.gate_up] == ["gate_proj", "up_proj"]
    fast = FastCpuModel(model)
    t = layer_tensors(cfg, 0)
    group = t.qkv + (t.gate_up if cfg.use_parallel_residual else [])
    expected = np.concatenate([model.params[n] for n in group], axis=0).T
    np.testing.assert_array_equal(fast.layers[0].in_t, expected)
