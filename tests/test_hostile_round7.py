"""Hostile input, round 7: a review of round 6's mends (the fast form's test of params, its copies, its making
under one lock, the save's clean-up under a Ctrl-C) and of the leads it left.

As before, each test names what a user did and checks the answer against what is true of the files, the numbers
or the words.
"""

import numpy as np
import pytest

from stablelm_ref.errors import CheckpointError
from stablelm_ref.trace import write_trace


# ---- class: advice that would do harm (a directory given as a trace's output) -----------------------------------

def test_a_directory_given_as_the_trace_s_output_is_named_as_one(tmp_path):
    """trace --out DIR: the message called the directory 'a model's weights or another file' and said 'remove it'
    (of --out /tmp, or of a model's directory). It says it is a directory, that a file name is wanted in it, and
    the directory is left as it was."""
    (tmp_path / "keep.txt").write_text("keep me")
    with pytest.raises(CheckpointError) as info:
        write_trace(tmp_path, {"a": np.zeros(2)})
    words = str(info.value)
    assert f"{tmp_path} is a directory" in words and str(tmp_path / "trace.safetensors") in words, words
    assert "remove" not in words and "another file" not in words, words
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"] and (tmp_path / "keep.txt").read_text() == "keep me"


# ---- class: work repeated on every call (two fast forms on one params dict) -------------------------------------

@pytest.mark.parametrize("how", ["copy.copy", "a model made on its params", "its params assigned"])
@pytest.mark.parametrize("built_first", [False, True])
def test_a_copied_model_and_its_original_each_build_their_fast_form_once(monkeypatch, built_first, how):
    """copy.copy(model) shared the params dict: each model's fast form, when built, made the dict's tensors views of
    its own fused copies, so the other saw its tensors replaced and rebuilt, on every call alternating between the
    two (6 builds in 3 rounds, each a copy of all the weights), as copy.copy(model.fast()) did before it returned
    the form itself. A copy has a dict of its own, of the same tensors: one build each, and both compute the
    reference's logits (float64, 1e-10: the same equations summed in another order, ~1e-15). So has a model made on
    another's params (StableLmForCausalLM(config, model.params)) or given them (twin.params = model.params), which
    shared the dict and rebuilt the same way."""
    import copy

    from stablelm_ref import StableLmForCausalLM
    from conftest import tiny_model

    model = tiny_model(seed=3)
    if built_first:
        model.fast()
    if how == "its params assigned":
        twin = tiny_model(seed=4)
        twin.params = model.params
    else:
        twin = copy.copy(model) if how == "copy.copy" else StableLmForCausalLM(model.config, model.params)
    assert twin.params is not model.params and all(twin.params[k] is v for k, v in model.params.items())
    builds = _fast_builds(monkeypatch, (model, twin), forward_too=True)
    assert len(builds) == (1 if built_first else 2) and builds[-1] is twin, len(builds)


# ---- class: an obscure error (a model or its fast form pickled or deep-copied) ----------------------------------

@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("built", [False, True])
def test_a_model_and_its_fast_form_can_be_pickled_and_deep_copied(how, built):
    """pickle.dumps(model) and copy.deepcopy(model) failed with "TypeError: cannot pickle 'module' object" (the
    model holds its array module, model.xp), and a fast form's with the same or "cannot pickle '_thread.lock'". A
    model is carried without its array module (set again from its device) and without its fast form (made again
    when asked); a fast form is carried as the fast form of its carried model. The copy's logits are the
    original's to 1e-10 (float64; the same numbers, summed in another order where a fast form made params views of
    its transposed copies, ~1e-15; a tensor lost or mixed up is O(1) off), and its tensors are its own."""
    import copy
    import pickle

    from stablelm_ref.fast_cpu import FastCpuModel
    from conftest import tiny_model

    carry = (lambda x: pickle.loads(pickle.dumps(x))) if how == "pickle" else copy.deepcopy
    model, ids = tiny_model(seed=3), [[3, 1, 4, 1, 5, 9]]
    want = model(ids).logits
    if built:
        model.fast()
    twin = carry(model)
    assert twin.xp is np and "_fast" not in vars(twin)
    np.testing.assert_allclose(twin(ids).logits, want, rtol=0, atol=1e-10)   # built: views, another sum order
    np.testing.assert_allclose(twin.fast()(ids).logits, want, rtol=0, atol=1e-10)     # float64: ~1e-15 apart
    assert twin.fast() is not model.fast()
    twin.params["model.norm.weight"][...] = 0                      # its own tensors (zeroed there: logits O(1) off)
    np.testing.assert_allclose(model(ids).logits, want, rtol=0, atol=1e-10)  # its fused views: another sum order
    form = carry(model.fast())
    assert type(form) is FastCpuModel and form.model is not model and form.model.fast() is form
    np.testing.assert_allclose(form(ids).logits, want, rtol=0, atol=1e-10)


# ---- class: an obscure error (main given a string, or words that are not strings) ------------------------------

@pytest.mark.parametrize("argv, named", [("generate hi", "one str"), (b"generate", "one bytes"),
                                         (["generate", b"hi"], "word 1 is bytes"), (("trace", 7), "word 1 is int")])
def test_main_given_a_string_or_words_that_are_not_strings_says_so(argv, named):
    """main("generate hi") split the string into letters ("invalid choice: 'g'"), and a word given as bytes failed
    inside argparse ("'in <string>' requires string as left operand, not int"). A TypeError names what main takes
    and what it got; a list, a tuple or a generator of str is taken as before (tests above and the CLI's)."""
    from stablelm_ref.cli import main

    with pytest.raises(TypeError) as info:
        main(argv)
    words = str(info.value)
    assert "the command line's words" in words and named in words, words


def test_main_takes_a_generator_or_a_tuple_of_words(capsys):
    from stablelm_ref.cli import main

    for argv in (("trace", "--help"), (w for w in ["trace", "--help"])):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0 and "usage: stablelm-ref trace" in capsys.readouterr().out


# ---- class: the reference computing with a tensor its config does not imply (q|k|v biases) ----------------------

@pytest.mark.parametrize("fast", [False, True])
def test_biases_a_config_without_qkv_bias_does_not_imply_are_not_read(fast):
    """A model with q|k|v biases and config.use_qkv_bias set False after loading: the reference added the biases
    still (w.get), though its docstring says 'biases only when use_qkv_bias', its check of params calls them
    tensors the model does not read, and transformers' q_proj has no bias then (nn.Linear(bias=use_qkv_bias)); the
    fast form left them out, 1.96 off the reference. The truth here: the same model with the bias tensors removed
    (float64, 1e-10: ~1e-15 apart, as the fast form's other tests; an added bias is O(1))."""
    from conftest import VARIANTS, tiny_model

    ids = [[3, 1, 4, 1, 5]]
    model, bare = (tiny_model(seed=4, **VARIANTS["1_6b"]) for _ in range(2))
    assert model.config.use_qkv_bias
    for m in (model, bare):
        m.config.use_qkv_bias = False
    for name in [k for k in bare.params if k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]:
        del bare.params[name]
    want = bare(ids).logits
    got = (model.fast() if fast else model)(ids).logits
    assert np.abs(got - tiny_model(seed=4, **VARIANTS["1_6b"])(ids).logits).max() > 1e-3    # the biases matter
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_a_score_bias_a_config_without_token_classification_bias_does_not_imply_is_not_read():
    """The same for the token classifier's score.bias with config.token_classification_bias set False: read as
    long as params held it. The truth: the same model without the tensor (exact: the same arithmetic, the bias
    added or not)."""
    from stablelm_ref import StableLmForTokenClassification
    from conftest import tiny_model

    ids = [[3, 1, 4, 1, 5]]
    model, bare = (tiny_model(seed=5, cls=StableLmForTokenClassification, pad_token_id=0) for _ in range(2))
    for m in (model, bare):
        m.params["score.bias"] = np.full_like(m.params["score.bias"], 0.5)     # a bias that shows
        m.config.token_classification_bias = False
    del bare.params["score.bias"]
    np.testing.assert_array_equal(model(ids).logits, bare(ids).logits)


# ---- class: a tie between tensors split silently (two names of model.params on one array) -----------------------

def test_a_fast_form_build_that_splits_tied_tensors_says_so(caplog):
    """Two names of model.params on one array (layer 1's q_proj and o_proj tied to layer 0's): a fast form's build
    copies each into its layer's fused matrices, so an edit in place of one no longer reached the other, silently. It
    is not kept (each copy lives inside its own fused matrix); the build warns, naming the tied tensors and what to
    do. The form and the model still compute one function after an edit in place of one of them (float64, 1e-10:
    the same equations summed in another order, ~1e-15). A tie a build keeps (lm_head on the embedding, read where
    it is) is not warned about."""
    import logging

    from conftest import tiny_model

    ids = [[3, 1, 4, 1, 5]]
    model = tiny_model(seed=4)
    p = model.params
    for x in ("q_proj", "o_proj"):
        p[f"model.layers.1.self_attn.{x}.weight"] = p[f"model.layers.0.self_attn.{x}.weight"]
    p["lm_head.weight"] = p["model.embed_tokens.weight"]
    with caplog.at_level(logging.WARNING, logger="stablelm_ref"):
        fast = model.fast()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("edit both" in m for m in said), said
    assert any("'model.layers.0.self_attn.q_proj.weight' and 'model.layers.1.self_attn.q_proj.weight'" in m
               for m in said), said
    assert p["lm_head.weight"] is p["model.embed_tokens.weight"]
    p["model.layers.0.self_attn.q_proj.weight"][...] *= 2
    np.testing.assert_allclose(fast(ids).logits, model(ids).logits, rtol=0, atol=1e-10)


# ---- class: an obscure error (the params property asked of a model that has none yet) ----------------------------

def test_a_model_without_params_yet_answers_hasattr_and_getattr_as_any_object_does():
    """model.params is a property reading the model's own dict: on a model whose __init__ has not set it yet (made
    with object.__new__, as copy and pickle do, or a subclass reading it before super().__init__), it raised
    KeyError: 'params', so hasattr(model, "params") and getattr(model, "params", None) raised instead of answering
    False and None. Now it is the AttributeError every missing attribute is."""
    from stablelm_ref import StableLmForCausalLM

    bare = object.__new__(StableLmForCausalLM)
    assert not hasattr(bare, "params") and getattr(bare, "params", None) is None
    with pytest.raises(AttributeError, match="params"):
        bare.params


# ---- class: two models on one params dict again (an old pickle) ---------------------------------------------------

def test_two_models_unpickled_from_one_params_dict_get_a_dict_each(monkeypatch):
    """A pickle of two models that shared one params dict (made before a model kept a dict of its own:
    StableLmForCausalLM(config, other.params) shared it) came back sharing it, since __setstate__ put the state into
    the model as it was: each model's fast form again took the other's build for an edit and built anew on every
    call (6 builds in 3 rounds). Unpickled, each model has a dict of its own (of the same tensors): one build each,
    and both compute the reference's logits (float64, 1e-10: the same equations summed in another order, ~1e-15)."""
    import pickle

    from conftest import tiny_model

    model, twin = tiny_model(seed=3), tiny_model(seed=3)
    twin.__dict__["params"] = model.params                        # as the old constructor left it
    model, twin = pickle.loads(pickle.dumps([model, twin]))
    assert twin.params is not model.params and all(twin.params[k] is v for k, v in model.params.items())
    assert len(_fast_builds(monkeypatch, (model, twin), forward_too=False)) == 2


def test_the_tie_warning_names_what_a_split_vector_was_copied_into(caplog):
    """The warning said every split tensor was copied "into its own fused matrices": a bias or a qk-norm weight (both
    layers' q_proj.bias on one zero vector, as a hand-built checkpoint may share) is copied into a joined vector (the
    layer's q|k|v bias, its qk-norm rows), no matrix. It now says fused arrays, which both are."""
    import logging

    from conftest import tiny_model

    model = tiny_model(seed=4, use_qkv_bias=True)
    zero = np.zeros_like(model.params["model.layers.0.self_attn.q_proj.bias"])
    for i in range(2):
        model.params[f"model.layers.{i}.self_attn.q_proj.bias"] = zero
    with caplog.at_level(logging.WARNING, logger="stablelm_ref"):
        model.fast()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "'model.layers.1.self_attn.q_proj.bias' of model.params" in said[0], said
    assert "its own fused arrays" in said[0] and "matri" not in said[0], said


def _fast_builds(monkeypatch, models, *, forward_too):
    """How many fast forms were built (the models built, in order) over three rounds of calls of each model's fast
    form (and its own forward, forward_too) on one prompt, every call checked against a fresh seed-3 model."""
    from stablelm_ref.fast_cpu import FastCpuModel
    from conftest import tiny_model

    ids = [[3, 1, 4, 1, 5, 9]]
    want = tiny_model(seed=3)(ids).logits
    builds, real = [], FastCpuModel._build
    monkeypatch.setattr(FastCpuModel, "_build", lambda self: (builds.append(self.model), real(self)))
    for _ in range(3):
        for m in models:
            np.testing.assert_allclose(m.fast()(ids).logits, want, rtol=0, atol=1e-10)
            if forward_too:
                np.testing.assert_allclose(m(ids).logits, want, rtol=0, atol=1e-10)
    return builds
