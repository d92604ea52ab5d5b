"""generate() and its processors without torch: properties against independent references.

The reference for greedy decoding is the plain loop "run the whole sequence, take argmax of the last
position" (no cache, no position-id trick), in float64. Processors are checked as the mathematical
statements that define them. (Token-for-token equality with transformers: tests/crosscheck/.)
"""

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stablelm_ref.errors import GenerationError
from stablelm_ref.heads import StableLmForCausalLM
from stablelm_ref.generation import (TextStreamer, apply_repetition_penalty, apply_temperature, apply_top_k,
                                     apply_top_p, generate, sample, softmax)

from conftest import VARIANTS, tiny_model

V = 101  # tiny vocabulary (conftest.TINY)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4, eos_token_id=None, pad_token_id=1)


def greedy_reference(model, row, n):
    """No cache, no padding: append argmax of the last position n times."""
    row = list(row)
    for _ in range(n):
        row.append(int(np.argmax(model(np.array([row])).logits[0, -1])))
    return row


def left_pad(rows, pad=1):
    width = max(map(len, rows))
    ids = np.array([[pad] * (width - len(r)) + list(r) for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# ---- greedy ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_left_padded_batch_equals_each_row_alone(variant):
    model = tiny_model(seed=6, eos_token_id=None, **VARIANTS[variant])
    rows = [[5, 17, 33, 2, 90, 41, 7], [12, 8], [60, 61, 62, 63]]
    ids, mask = left_pad(rows)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=6)
    assert out.shape == (3, 7 + 6)
    for i, r in enumerate(rows):
        assert out[i, 7:].tolist() == greedy_reference(model, r, 6)[len(r):]


def test_left_padded_rows_get_positions_that_skip_the_padding(monkeypatch):
    """The positions the model receives: a row's real tokens are at 0, 1, 2, ... whatever its padding,
    and each new token one further. (Rotary is relative, so arange positions that count the padding
    change the logits only by rounding: the outputs alone cannot tell.)"""
    model = tiny_model(seed=6, eos_token_id=None)
    rows = [[5, 17, 33, 2, 90, 41, 7], [12, 8], [60, 61, 62, 63]]
    ids, mask = left_pad(rows)
    received = []
    forward = StableLmForCausalLM.forward

    def recording_forward(self, input_ids, **kw):
        received.append((np.asarray(kw["position_ids"]), np.asarray(kw["attention_mask"])))
        return forward(self, input_ids, **kw)

    monkeypatch.setattr(StableLmForCausalLM, "forward", recording_forward)
    new = 4
    generate(model, ids, attention_mask=mask, max_new_tokens=new)
    assert len(received) == new                                        # the prompt, then one step per token
    prefill, steps = received[0], received[1:]
    for i, r in enumerate(rows):
        pad = ids.shape[1] - len(r)
        assert prefill[0][i, pad:].tolist() == list(range(len(r)))     # real tokens from 0, padding skipped
        assert [int(np.ravel(p[i])[-1]) for p, _ in steps] == list(range(len(r), len(r) + new - 1))
        assert all(m[i, :pad].sum() == 0 and m[i, pad:].all() for _, m in steps)  # the padding stays masked


def test_kv_cache_is_preallocated_and_logits_to_keep_is_1(model):
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, ids, **kw):
            cache = kw["past_key_values"]
            calls.append((np.shape(ids), cache.max_len, cache.growable, kw["logits_to_keep"], cache.length))
            out = model(ids, **kw)
            assert out.logits.shape[1] == 1
            return out

    generate(Spy(), [[3, 4, 5]], max_new_tokens=4)
    assert calls[0] == ((1, 3), 7, False, 1, 0)                          # prefill of the whole prompt
    assert [c[0] for c in calls[1:]] == [(1, 1)] * 3                      # then one token per step
    assert [c[4] for c in calls[1:]] == [3, 4, 5] and all(c[1] == 7 for c in calls)


# ---- EOS and pad ---------------------------------------------------------------------------------

def test_rows_after_eos_emit_pad_and_generation_stops_when_all_finish(model):
    ids, mask = left_pad([[5, 17, 33], [40, 41, 42, 43, 44]])
    free = generate(model, ids, attention_mask=mask, max_new_tokens=8)
    eos = int(free[0, 5 + 1])                                              # row 0's second new token
    out = generate(model, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=1)
    first = int(np.argmax(free[0, 5:] == eos))
    assert out[0, 5 + first] == eos and (out[0, 5 + first + 1:] == 1).all()
    row1 = free[1, 5:].tolist()
    if eos not in row1:                                                   # row 1 runs to max_new_tokens
        assert out[1].tolist() == free[1].tolist()
    alone = generate(model, [[5, 17, 33]], max_new_tokens=8, eos_token_id=eos)
    assert alone.shape[1] == 3 + first + 1 and alone[0, -1] == eos       # stops early, like transformers


def test_pad_defaults_to_eos_when_model_has_none():
    model = tiny_model(seed=4, eos_token_id=None, pad_token_id=None)
    ids, mask = left_pad([[5, 17, 33], [40, 41, 42, 43, 44]], pad=0)
    free = generate(model, ids, attention_mask=mask, max_new_tokens=6)
    eos = [int(free[0, 5]), 99]                                            # a list of EOS ids: first is pad
    out = generate(model, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos)
    assert out[0, 5] == eos[0] and (out[0, 6:] == eos[0]).all()


def test_max_length_and_default_length(model):
    assert generate(model, [[3, 4, 5]], max_length=8).shape == (1, 8)
    with pytest.warns(UserWarning, match="default max_length"):
        assert generate(model, [[3, 4, 5]]).shape == (1, 3 + 20)
    with pytest.warns(UserWarning, match="default max_length"):                # capped at max_position_embeddings
        assert generate(model, [list(range(2, 60))]).shape == (1, 64)


# ---- sampling ------------------------------------------------------------------------------------

def test_seed_reproducible_and_different_seeds_differ(model):
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0)
    a = generate(model, [[3, 4, 5], [9, 9, 9]], seed=1, **kw)
    b = generate(model, [[3, 4, 5], [9, 9, 9]], seed=1, **kw)
    c = generate(model, [[3, 4, 5], [9, 9, 9]], seed=2, **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()  # 24 draws over ~101 tokens at temperature 1.5: equal with probability ~0


def test_temperature_to_zero_equals_greedy(model):
    ids, mask = left_pad([[5, 17, 33, 2], [12, 8]])
    greedy = generate(model, ids, attention_mask=mask, max_new_tokens=8)
    cold = generate(model, ids, attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=1e-6,
                    top_k=0, seed=0)
    np.testing.assert_array_equal(cold, greedy)


def test_sampled_tokens_stay_in_top_k(model):
    """Every sampled token is among the k most likely of the model's logits at that step."""
    out = generate(model, [[3, 4, 5]], max_new_tokens=10, do_sample=True, top_k=3, seed=7)[0].tolist()
    for t in range(3, len(out)):
        logits = model(np.array([out[:t]])).logits[0, -1]
        assert out[t] in np.argsort(logits)[-3:]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 40), vocab=st.integers(2, 60))
def test_top_k_keeps_exactly_the_k_largest(seed, k, vocab):
    scores = np.random.default_rng(seed).normal(0, 2, (3, vocab))
    out = apply_top_k(scores, k)
    kept = np.isfinite(out)
    kk = min(k, vocab)
    for row in range(3):
        assert set(np.nonzero(kept[row])[0]) == set(np.argsort(scores[row])[-kk:])
    np.testing.assert_array_equal(out[kept], scores[kept])
    draws = sample(softmax(out), np.random.default_rng(seed))
    assert all(kept[r, d] for r, d in enumerate(draws))


def test_top_k_keeps_ties_like_transformers():
    scores = np.array([[1.0, 3.0, 3.0, 3.0, 0.5]])
    assert np.isfinite(apply_top_k(scores, 2)).tolist() == [[False, True, True, True, False]]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), p=st.floats(0.01, 1.0), vocab=st.integers(2, 50))
def test_top_p_keeps_the_smallest_set_reaching_p(seed, p, vocab):
    scores = np.random.default_rng(seed).normal(0, 2, (2, vocab))
    out = apply_top_p(scores, p)
    for row in range(2):
        probs = softmax(scores[row])
        kept = np.nonzero(np.isfinite(out[row]))[0]
        order = np.argsort(probs)[::-1]
        assert set(kept) == set(order[:len(kept)])                        # the most likely tokens
        mass = probs[kept].sum()
        assert mass >= p - 1e-12                                          # reaches p
        if len(kept) > 1:
            assert mass - probs[kept].min() < p + 1e-12                   # and no smaller such set does


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), t=st.floats(0.05, 20))
def test_temperature_divides(seed, t):
    scores = np.random.default_rng(seed).normal(0, 2, (2, 9))
    np.testing.assert_allclose(apply_temperature(scores, t) * t, scores, rtol=1e-14)


def test_sample_matches_the_distribution():
    """20,000 draws of a fixed distribution: every frequency within 5 standard deviations."""
    probs = np.array([0.5, 0.25, 0.125, 0.0, 0.1, 0.025])
    n = 20_000
    draws = sample(np.tile(probs, (n, 1)), np.random.default_rng(0))
    freq = np.bincount(draws, minlength=6) / n
    sigma = np.sqrt(probs * (1 - probs) / n)
    assert (np.abs(freq - probs) <= 5 * sigma + 1e-12).all()
    assert freq[3] == 0                                                   # probability 0: never drawn


# ---- repetition penalty --------------------------------------------------------------------------

def test_repetition_penalty_formula_and_left_padding():
    scores = np.array([[2.0, -2.0, 1.0, -1.0, 0.0]], dtype=np.float32)
    ids = np.array([[3, 3, 0, 1, 4]])            # first two positions are left padding (id 3)
    out = apply_repetition_penalty(scores, ids, 2.0, ignore_prefix=np.array([2]))
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.0]]  # 0: /2, 1: *2, 3: only in the padding, 4: 0 stays 0
    assert out.dtype == np.float32


@pytest.mark.parametrize("penalty, want", [(1e300, [[0.0, -np.inf, 1.0, -1.0, 0.0]]),
                                            (1e-300, [[np.inf, -0.0, 1.0, -1.0, 0.0]])])
def test_repetition_penalty_beyond_the_dtype_takes_its_limit_without_warnings(penalty, want):
    """A finite penalty the scores' dtype cannot hold (GenerationConfig takes any finite value > 0): the limit,
    positive scores to 0 and negative to -inf (or the reverse), and no NumPy RuntimeWarning leaking to the user."""
    import warnings

    scores = np.array([[2.0, -2.0, 1.0, -1.0, 0.0]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = apply_repetition_penalty(scores, np.array([[0, 1, 4]]), penalty)
    assert out.tolist() == want and out.dtype == np.float32


def test_repetition_penalty_discourages_repeats(model):
    out = generate(model, [[3, 4, 5]], max_new_tokens=15, repetition_penalty=1e6)[0, 3:].tolist()
    assert len(set(out)) == len(out) and not set(out) & {3, 4, 5}  # a huge penalty forbids every repeat


# ---- streaming -----------------------------------------------------------------------------------

def test_streamer_protocol(model):
    events = []

    class Recorder:
        def put(self, ids):
            events.append(("put", np.asarray(ids).tolist()))

        def end(self):
            events.append(("end",))

    out = generate(model, [[3, 4, 5]], max_new_tokens=4, streamer=Recorder())
    assert events[0] == ("put", [[3, 4, 5]]) and events[-1] == ("end",)
    assert [e[1] for e in events[1:-1]] == [[t] for t in out[0, 3:].tolist()]


def test_text_streamer_writes_the_decoded_text_and_holds_partial_characters():
    class ByteTok:  # decodes ids as UTF-8 bytes: a multi-byte character spans several ids
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    buf = io.StringIO()
    s = TextStreamer(ByteTok(), skip_prompt=True, file=buf)
    s.put(np.array([list(b"prompt ")]))
    writes = []
    for b in "héllo 🙂".encode():
        s.put(np.array([b]))
        writes.append(buf.getvalue())
    s.end()
    assert buf.getvalue() == "héllo 🙂\n"
    assert all("\ufffd" not in w for w in writes)


@pytest.mark.parametrize("name", ["skip_prompt", "skip_special_tokens"])
def test_text_streamer_flags_follow_the_one_flag_rule(name):
    """TextStreamer(tok, skip_prompt="no") skipped the prompt (a non-empty string is true), silently; its flags
    take what every flag takes (errors.check_flag), np.bool_ included."""
    with pytest.raises(GenerationError, match=rf"^{name} must be True or False, got 'no'$"):
        TextStreamer(object(), **{name: "no"})
    assert getattr(TextStreamer(object(), **{name: np.False_}), name) is False


# ---- argument checking ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(max_length=3), "max_length is 3"),
    (dict(do_sample=True, temperature=0), r"temperature must be a number > 0, got 0 \(for greedy decoding use "
                                          r"do_sample=False\)"),
    (dict(do_sample=True, temperature=float("nan")), "temperature"),
    (dict(do_sample=True, top_k=-1), "top_k must be an integer >= 0"),
    (dict(do_sample=True, top_p=0), r"top_p must be a number in \(0, 1\]"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(repetition_penalty=0), "repetition_penalty must be a number > 0"),
    (dict(do_sample="yes"), "do_sample must be True or False"),
    (dict(do_sample=True, seed=-1), "seed must be an integer >= 0"),
    (dict(eos_token_id=101), r"eos_token_id 101 is outside the vocabulary \[0, 101\)"),
    (dict(eos_token_id="a"), "eos_token_id must be an integer"),
    (dict(pad_token_id=-1), "pad_token_id -1 is outside"),
    (dict(attention_mask=[[1, 1]]), "attention_mask has shape"),
    (dict(attention_mask=[[0, 0, 0]]), "all padding"),
    (dict(attention_mask=[[0, 2, 1]]), "only hold 0"),
    (dict(streamer=object()), "streamer must have put"),
])
def test_invalid_arguments_raise_generation_error(model, kwargs, match):
    kwargs.setdefault("max_new_tokens", 2) if "max_length" not in kwargs else None
    with pytest.raises(GenerationError, match=match):
        generate(model, [[3, 4, 5]], **kwargs)


@pytest.mark.parametrize("ids, match", [([[3, 4, 500]], "outside the vocabulary"), ([[]], "empty"),
                                        ([[1.5, 2.0]], "integers")])
def test_invalid_ids_raise_generation_error(model, ids, match):
    with pytest.raises(GenerationError, match=match):
        generate(model, ids, max_new_tokens=2)


def test_generate_needs_a_causal_lm():
    from stablelm_ref import StableLmForSequenceClassification

    with pytest.raises(GenerationError, match="no language-modelling head"):
        generate(tiny_model(cls=StableLmForSequenceClassification), [[3, 4]], max_new_tokens=2)


def test_prompt_longer_than_context_is_refused_but_decoding_past_it_is_allowed():
    """One check (model.check_context) for the forward, generate and the chat command: a prompt of exactly
    max_position_embeddings tokens runs, one more is refused, each in its caller's words."""
    model = tiny_model()  # max_position_embeddings 64
    assert model(np.ones((1, 64), np.int64)).logits.shape == (1, 64, model.config.vocab_size)
    with pytest.raises(GenerationError, match=r"^the input has 65 tokens, more than the model's context"):
        model(np.ones((1, 65), np.int64))
    with pytest.warns(UserWarning, match="past max_position_embeddings"):
        assert np.asarray(model.generate(np.ones((1, 64), np.int64), max_new_tokens=1)).shape == (1, 65)
    with pytest.raises(GenerationError, match=r"^the prompt has 65 tokens, more than the model's context "
                                              r"\(max_position_embeddings = 64\); shorten"):
        model.generate(np.ones((1, 65), np.int64), max_new_tokens=1)
    with pytest.warns(UserWarning, match="past max_position_embeddings"):
        out = model.generate(np.ones((1, 60), np.int64), max_new_tokens=8)
    assert np.asarray(out).shape == (1, 68)


# ---- the step backends -------------------------------------------------------------------------

def test_engine_fast_on_the_cpu_is_fast_cpu_and_gives_the_same_tokens():
    """engine="fast" steps through model.fast() (FastCpuModel: the same function, float64 here, so the
    tokens equal the reference's exactly at these margins); "auto" on the CPU is the reference itself."""
    from stablelm_ref.fast_cpu import FastCpuModel
    from stablelm_ref.generation import ModelSteps, step_backend

    m = tiny_model(seed=8, eos_token_id=None, pad_token_id=1)
    ids, mask = left_pad([[5, 17, 33, 2, 90], [12, 8]])
    ref = generate(m, ids, attention_mask=mask, max_new_tokens=6, engine="reference")
    steps = step_backend(m, 2, 13, "fast")
    assert isinstance(steps, ModelSteps) and isinstance(steps.model, FastCpuModel)
    assert step_backend(m, 2, 13).model is m and step_backend(m, 2, 13, "reference").model is m
    assert np.array_equal(generate(m, ids, attention_mask=mask, max_new_tokens=6, engine="fast"), ref)
    assert np.array_equal(generate(m, ids, attention_mask=mask, max_new_tokens=6), ref)
    with pytest.raises(GenerationError, match="engine must be one of"):
        generate(m, ids, max_new_tokens=2, engine="graph")


def test_a_backend_that_picks_inside_its_step_is_asked_for_the_ids(model):
    """A step backend may pick the next ids itself (the GPU engine's argmax or sampler): the loop then
    takes chosen_ids() instead of processing logits, and passes the draws u it would have sampled with."""
    from stablelm_ref import generation

    calls = []

    class Picking(generation.ModelSteps):
        def choose_in_step(self, settings):
            return True

        def step(self, next_ids, next_dev, mask, position, fused=False, u=None):
            calls.append((fused, None if u is None else u.copy()))
            logits = super().step(next_ids, next_dev, mask, position)
            self.picked = np.argmax(np.asarray(logits), axis=-1)              # what the loop would pick
            return None

        def chosen_ids(self):
            return self.picked

    real = generation.step_backend
    generation.step_backend = lambda m, b, t, e="auto": Picking(m, b, t)
    try:
        ids = np.array([[5, 6, 7]])
        out = generate(model, ids, max_new_tokens=5)
        sampled = generate(model, ids, max_new_tokens=3, do_sample=True, seed=4)
    finally:
        generation.step_backend = real
    assert np.array_equal(out, generate(model, ids, max_new_tokens=5))      # the same greedy tokens
    assert [c[0] for c in calls] == [True] * 6
    assert calls[-1][1] is not None and calls[0][1] is None                 # draws only when sampling
    want = np.random.default_rng(4)
    want.random(1)                                                          # the first token's draw
    assert np.array_equal(calls[-2][1], want.random(1)) and sampled.shape == (1, 6)


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "linear", "factor": 2.0},
                                          {"rope_type": "dynamic", "factor": 2.0}])
@pytest.mark.parametrize("prompt, new", [(60, 4), (60, 5), (64, 1), (65, 1)])
def test_the_context_limit_is_one_predicate_for_the_refusal_and_the_warning(rope_scaling, prompt, new):
    """model.past_context decides both: the forward and generate refuse a prompt past the context, generate
    warns when prompt + new tokens go past it; with dynamic rope scaling there is no limit (neither happens)."""
    import warnings

    from stablelm_ref.model import past_context

    model = tiny_model(rope_scaling=rope_scaling)  # max_position_embeddings 64
    dynamic = rope_scaling is not None and rope_scaling["rope_type"] == "dynamic"
    assert past_context(model.config, prompt) == (prompt > 64 and not dynamic)
    assert past_context(model.config, prompt + new) == (prompt + new > 64 and not dynamic)
    ids = np.ones((1, prompt), np.int64)
    if past_context(model.config, prompt):
        with pytest.raises(GenerationError, match="more than the model's context"):
            model(ids)
        with pytest.raises(GenerationError, match="more than the model's context"):
            model.generate(ids, max_new_tokens=new)
        return
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = model.generate(ids, max_new_tokens=new, eos_token_id=None)
    assert np.asarray(out).shape == (1, prompt + new)
    warned = any("past max_position_embeddings" in str(w.message) for w in seen)
    assert warned == past_context(model.config, prompt + new)


# ---- what a reader is told: help(model.generate) and the module's docstring ------------------------------------

def test_model_generate_shows_generation_generates_arguments_and_docstring():
    """Before: help(StableLmForCausalLM.generate) showed generate(self, input_ids, **kwargs) and a pointer."""
    import inspect
    import pydoc

    from stablelm_ref import generation

    theirs = list(inspect.signature(generation.generate).parameters.values())
    ours = list(inspect.signature(StableLmForCausalLM.generate).parameters.values())
    assert [p.name for p in ours] == ["self"] + [p.name for p in theirs[1:]]
    assert [(p.default, p.kind) for p in ours[1:]] == [(p.default, p.kind) for p in theirs[1:]]
    bound = inspect.signature(tiny_model(seed=1).generate)
    assert list(bound.parameters) == [p.name for p in theirs[1:]]         # the model given, as for any method
    text = pydoc.render_doc(StableLmForCausalLM.generate)
    assert "max_new_tokens=None" in text and "repetition_penalty" in text and "**kwargs" not in text
    assert generation.generate.__doc__ in StableLmForCausalLM.generate.__doc__


def test_the_random_generators_the_docstrings_name_take_an_int_seed():
    """generation.py's docstrings said numpy.random.Generator(seed), a TypeError with an int seed (it takes a
    BitGenerator): every np.random.<name>(seed) they name must build a generator from an int; the code uses
    default_rng."""
    import re

    from stablelm_ref import generation

    texts = generation.__doc__ + generation.generate.__doc__
    named = re.findall(r"(?:np|numpy)\.random\.(\w+)\(seed\)", texts)
    assert named and set(named) == {"default_rng"}
    for name in named:
        getattr(np.random, name)(7).random()
