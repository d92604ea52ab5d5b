"""Hostile input, round 3: classes of failure the first two rounds did not reach, one section per class.

Each test states the class, then checks that the input gets a StableLmError naming what is wrong (never a
traceback from deep inside NumPy, jinja2 or the tokenizers library, never a silent wrong answer) and that
nothing is lost: no file replaced or left behind that would load something else than what was saved.
"""

import json
import os
import re
import shutil

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from conftest import cases, files_of, tiny_model
from stablelm_ref import StableLmForCausalLM, checkpoint
from stablelm_ref.errors import CheckpointError, GenerationError
from stablelm_ref.kv_cache import KVCache
from stablelm_ref.trace import TRACE_FORMAT, read_trace, write_trace


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_tokenizer import tiny_tokenizer_dir

    path = str(tmp_path_factory.mktemp("m3") / "model")
    tiny_model(seed=5, dtype="float32", vocab_size=320, max_position_embeddings=64).save_pretrained(path)
    tiny_tokenizer_dir(path)
    return path


def copy_of(model_dir, tmp_path, name="copy"):
    path = str(tmp_path / name)
    shutil.copytree(model_dir, path)
    return path


# ---- class: an output path that names a file of another kind (trace --out over a model's weights) --------

def test_trace_out_never_replaces_a_file_that_is_not_a_trace(model_dir, tmp_path):
    """`stablelm-ref trace --out DIR/model.safetensors` replaced the model's weights with the trace (seen:
    the directory then failed to load). Any existing file that is not a trace is kept, the command exits 2."""
    from stablelm_ref.cli import main

    directory = copy_of(model_dir, tmp_path)
    before = files_of(directory)
    for name in sorted(before):
        assert main(["trace", "--model", directory, "--ids", "1,2", "--out", os.path.join(directory, name)]) == 2
    assert files_of(directory) == before
    StableLmForCausalLM.from_pretrained(directory)                           # still loads


def test_a_trace_may_replace_a_trace_and_only_a_trace(tmp_path):
    path = tmp_path / "t.safetensors"
    write_trace(path, {"a": np.zeros(2)})
    write_trace(path, {"b": np.ones(3)})                                     # a trace over a trace: replaced
    trace, meta = read_trace(path)
    assert list(trace) == ["b"] and meta["format"] == TRACE_FORMAT
    other = tmp_path / "weights.safetensors"
    checkpoint.save_file({"w": np.ones(2, np.float32)}, str(other))          # safetensors, but not a trace
    text = tmp_path / "notes.txt"
    text.write_text("keep me")
    for path in (other, text):
        before = path.read_bytes()
        with pytest.raises(CheckpointError, match="not a stablelm-ref trace"):
            write_trace(path, {"a": np.zeros(2)})
        assert path.read_bytes() == before
    with pytest.raises(CheckpointError, match="output path"):
        write_trace(None, {"a": np.zeros(2)})


# ---- class: a save that writes what from_pretrained refuses or does not read -------------------------------

def test_save_into_a_sharded_checkpoint_loads_the_new_weights(model_dir, tmp_path):
    """Saving into a directory that held a sharded checkpoint left its index, which from_pretrained reads
    first: the old weights came back, silently. The index is removed after the new files are in place."""
    old = StableLmForCausalLM.from_pretrained(model_dir)
    directory = str(tmp_path / "sharded")
    os.makedirs(directory)
    names = sorted(old.params)
    shards = {"model-1.safetensors": names[:10], "model-2.safetensors": names[10:]}
    for shard, part in shards.items():
        checkpoint.save_file({n: old.params[n] for n in part}, os.path.join(directory, shard))
    with open(os.path.join(directory, checkpoint.INDEX_NAME), "w") as f:
        json.dump({"weight_map": {n: shard for shard, part in shards.items() for n in part}}, f)
    old.config.save_pretrained(directory)
    assert np.array_equal(StableLmForCausalLM.from_pretrained(directory).params["model.norm.bias"],
                          old.params["model.norm.bias"])
    new = tiny_model(seed=9, dtype="float32", vocab_size=320, max_position_embeddings=64)
    new.save_pretrained(directory)
    back = StableLmForCausalLM.from_pretrained(directory)
    for name, value in new.params.items():
        np.testing.assert_array_equal(back.params[name], value)
    assert not os.path.exists(os.path.join(directory, checkpoint.INDEX_NAME))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.params.__setitem__("model.norm.bias", np.full(64, np.nan, np.float32)), "NaN or Inf"),
    (lambda m: m.config.__setattr__("num_hidden_layers", 3), r"implies at least 36 tensors \(num_hidden_layers=3"),
    (lambda m: m.params.pop("model.norm.bias"), "missing from the model"),
    (lambda m: m.params.__setitem__("model.extra.weight", np.ones(2, np.float32)), "not implied by the config"),
    (lambda m: m.params.__setitem__("model.norm.bias", np.zeros(65, np.float32)), r"shape \(65,\)"),
    (lambda m: m.config.__setattr__("tie_word_embeddings", True), "lm_head.weight differs"),   # an untied model
])
def test_a_save_that_would_not_load_is_refused_before_writing(tmp_path, edit, match):
    """A model edited after loading (its config, its params) or holding NaN saved files that from_pretrained
    then refused: the output was lost. The save is refused, naming the tensor, and writes nothing."""
    model = tiny_model(seed=1, dtype="float32", vocab_size=320, max_position_embeddings=64)
    directory = tmp_path / "out"
    edit(model)
    with pytest.raises(CheckpointError, match=match):
        model.save_pretrained(directory)
    assert not directory.exists()


def test_a_tied_config_saves_an_lm_head_equal_to_the_embedding_and_loads_it_back(tmp_path):
    """The tied case's other side: an lm_head.weight equal to the embedding is a copy from_pretrained allows."""
    model = tiny_model(seed=1, dtype="float32", vocab_size=320, max_position_embeddings=64)
    model.params["lm_head.weight"] = model.params["model.embed_tokens.weight"].copy()
    model.config.tie_word_embeddings = True
    model.save_pretrained(tmp_path / "out")
    back = StableLmForCausalLM.from_pretrained(tmp_path / "out")
    ids = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(back(ids).logits, model(ids).logits)


@cases(25)
@given(scale=st.floats(1.0, 1e30), dtype=st.sampled_from(["float16", "bfloat16", "float32"]))
def test_a_save_in_a_narrower_dtype_either_loads_back_or_is_refused(tmp_path_factory, scale, dtype):
    """Property: save_pretrained(dir, dtype) of finite float64 weights either writes files that load and
    round-trip to the cast values exactly, or raises CheckpointError naming the dtype's range (float16's
    maximum is 65504, bfloat16's and float32's 3.4e38) and writes nothing."""
    model = tiny_model(seed=2, dtype="float64", vocab_size=320, max_position_embeddings=64)
    model.params["model.norm.bias"] = model.params["model.norm.bias"] * scale
    directory = tmp_path_factory.mktemp("narrow") / "out"
    limit = float(np.finfo(checkpoint.SAFETENSORS_DTYPES["BF16"] if dtype == "bfloat16" else dtype).max)
    if np.abs(model.params["model.norm.bias"]).max() * (1 + 2**-8) <= limit:   # within range after rounding
        model.save_pretrained(directory, dtype=dtype)
        back = StableLmForCausalLM.from_pretrained(directory, dtype="float64")
        np.testing.assert_array_equal(back.params["model.norm.bias"],
                                      model.params["model.norm.bias"].astype(
                                          checkpoint.SAFETENSORS_DTYPES["BF16"] if dtype == "bfloat16" else dtype))
    else:
        try:
            model.save_pretrained(directory, dtype=dtype)
        except CheckpointError as e:
            assert "range" in str(e) and "model.norm.bias" in str(e)
            assert not directory.exists()
        else:  # values just below the limit that rounded down: then they must load back
            StableLmForCausalLM.from_pretrained(directory, dtype="float64")


def test_weights_beyond_the_load_dtype_say_to_load_wider(tmp_path):
    """Finite float64 weights beyond float32's range were reported as 'NaN or Inf ... the file is damaged':
    the file is fine, float32 cannot hold them. The message names the range and dtype='float64'."""
    model = tiny_model(seed=1, dtype="float64", vocab_size=320, max_position_embeddings=64)
    model.params["model.norm.bias"][3] = 1e300
    model.save_pretrained(tmp_path / "wide")
    with pytest.raises(CheckpointError, match=r"model.norm.bias.*beyond float32's range.*dtype='float64'"):
        StableLmForCausalLM.from_pretrained(tmp_path / "wide")
    back = StableLmForCausalLM.from_pretrained(tmp_path / "wide", dtype="float64")
    assert back.params["model.norm.bias"][3] == 1e300
    from stablelm_ref.model import _narrowed                                  # the GPU's narrowing, on the host

    with pytest.raises(CheckpointError, match=r"'w' holds 1 values beyond float16's range \(largest magnitude "
                                              r"7e\+04\); load it with dtype='bfloat16'"):
        _narrowed("w", np.float32([1.0, 7e4]), np.float16, "DIR")
    assert _narrowed("w", np.float32([1.0, 6e4]), np.float16, "DIR").dtype == np.float16


@pytest.mark.parametrize("directory", [None, 5, "", ["out"]])
def test_save_to_a_non_path_is_a_clear_error(directory):
    model = tiny_model(seed=1, dtype="float32", vocab_size=320, max_position_embeddings=64)
    with pytest.raises(CheckpointError, match=r"^the output directory (must be a path \(a string or os.PathLike\), "
                                               r"got|is empty \(''\): give a directory to save into)"):
        model.save_pretrained(directory)


# ---- class: a chat template whose code raises an exception of any type ------------------------------------

FILTERS = sorted(__import__("jinja2").filters.FILTERS) + ["tojson"]
STR_METHODS = sorted(m for m in dir(str) if not m.startswith("_"))
VALUES = ['"abc"', "messages", "messages[0]", "3", "-2.5", "none", "[3, 'a']", "{'k': 1}", "range(3)"]
ARGS = ["", "0", "-5", "10**20", '"bogus"', '"x"', "none", "[]", "{}", '"%s"', '"{:z}"', "attribute=5"]


@cases(150)
@given(value=st.sampled_from(VALUES), call=st.one_of(st.sampled_from(FILTERS).map(lambda f: "|" + f),
                                                       st.sampled_from(STR_METHODS).map(lambda m: "." + m)),
       args=st.lists(st.sampled_from(ARGS), max_size=3))
def test_any_exception_a_template_raises_is_a_tokenizer_error(fast_limits, value, call, args):
    """Property: a template calling any jinja2 filter or str method on any value with hostile arguments
    renders or raises TokenizerError. Before, only nine exception types were caught: str.encode('bogus')
    (LookupError) and truncate(-5) (AssertionError) escaped as tracebacks."""
    from stablelm_ref.errors import TokenizerError
    from stablelm_ref.tokenizer import render_chat_template

    argv = ", ".join(a for a in args if a)
    template = "{{ " + value + call + ("(" + argv + ")" if argv or call.startswith(".") else "") + " }}"
    try:
        out = render_chat_template(template, messages=[{"role": "user", "content": "hi"}])
    except TokenizerError as e:   # says the template failed, and how: the exception's type, or the sandbox's limit
        assert str(e).startswith(TEMPLATE_FAILURES), str(e)
    else:
        assert isinstance(out, str)


TEMPLATE_FAILURES = ("the chat template failed: ", "the chat template was refused by the sandbox: ",
                     "the chat template is not valid Jinja (line ")


@pytest.mark.parametrize("template", ['{{ "x".encode("bogus") }}', '{{ "abc"|truncate(-5) }}'])
def test_the_exceptions_seen_escaping_are_tokenizer_errors(template):
    from stablelm_ref.errors import TokenizerError
    from stablelm_ref.tokenizer import render_chat_template

    with pytest.raises(TokenizerError, match=r"the chat template failed: (LookupError|AssertionError)"):
        render_chat_template(template, messages=[])


def test_a_template_variable_named_template_is_context(model_dir):
    """apply_chat_template(messages, template=...) collided with render_chat_template's own argument
    (TypeError); keyword arguments are template variables, whatever their name."""
    from stablelm_ref import Tokenizer

    tok = Tokenizer.from_pretrained(model_dir)
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="{{ template }}|{{ x }}",
                                  template="T", x=1)
    assert out == "T|1"


# ---- class: the tokenizers library panicking on a text (a Rust panic is a BaseException) -------------------

def test_a_tokenizer_panic_is_a_tokenizer_error(model_dir, tmp_path):
    """A tokenizer.json whose Split regex backtracks catastrophically made the Rust regex engine give up
    and the library panic: pyo3's PanicException derives from BaseException, so it escaped every handler
    (in the CLI: a traceback). Encoding now raises TokenizerError naming the file."""
    from stablelm_ref import Tokenizer
    from stablelm_ref.errors import TokenizerError

    directory = copy_of(model_dir, tmp_path)
    path = os.path.join(directory, "tokenizer.json")
    with open(path) as f:
        data = json.load(f)
    data["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}
    with open(path, "w") as f:
        json.dump(data, f)
    tok = Tokenizer.from_pretrained(directory)
    assert tok.encode("aaa")                                                # the regex works on short texts
    with pytest.raises(TokenizerError, match=r"tokenizer.json cannot handle this input"):
        tok.encode("a" * 40 + "!")
    with pytest.raises(TokenizerError, match=r"tokenizer.json cannot handle this input"):
        tok(["ok", "a" * 40 + "!"])


# ---- class: flags and special tokens of the wrong type (arguments and tokenizer_config.json) ---------------

@pytest.mark.parametrize("value", ["no", "false", 1, None, [True]])
@pytest.mark.parametrize("call", [
    lambda t, v: t.encode("hi", add_special_tokens=v), lambda t, v: t("hi", padding=v),
    lambda t, v: t("hi", add_special_tokens=v), lambda t, v: t.decode([1, 2], skip_special_tokens=v),
    lambda t, v: t.batch_decode([[1, 2]], skip_special_tokens=v),
    lambda t, v: t.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=v),
    lambda t, v: t.apply_chat_template([{"role": "user", "content": "x"}], tokenize=v),
])
def test_flags_take_booleans_only(model_dir, call, value):
    """encode(add_special_tokens='no') raised TypeError inside the tokenizers library; 'false' elsewhere was
    true, silently. Every flag of the tokenizer's methods takes True or False."""
    from stablelm_ref import Tokenizer
    from stablelm_ref.errors import TokenizerError

    tok = Tokenizer.from_pretrained(model_dir)
    with pytest.raises(TokenizerError, match=r"must be True or False, got"):
        call(tok, value)


@pytest.mark.parametrize("key, value, match", [
    ("add_bos_token", "false", "'add_bos_token' must be True or False, got 'false' (in JSON: true or false)"),
    ("add_eos_token", 1, "'add_eos_token' must be True or False"),
    ("model_max_length", True, "'model_max_length' must be a whole number >= 1"),
    ("model_max_length", -5, "'model_max_length' must be a whole number >= 1"),
    ("model_max_length", "64", "'model_max_length' must be a whole number >= 1"),
])
def test_tokenizer_config_values_of_the_wrong_type(model_dir, tmp_path, key, value, match):
    """"add_bos_token": "false" in tokenizer_config.json added a BOS token (bool("false") is True)."""
    from stablelm_ref import Tokenizer
    from stablelm_ref.errors import TokenizerError

    directory = copy_of(model_dir, tmp_path)
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        data = json.load(f)
    data[key] = value
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(TokenizerError, match=re.escape(match)):
        Tokenizer.from_pretrained(directory)
    data[key] = {"add_bos_token": False, "add_eos_token": True, "model_max_length": 1e30}[key]  # accepted forms
    with open(path, "w") as f:
        json.dump(data, f)
    Tokenizer.from_pretrained(directory)


def test_special_tokens_and_paths_of_the_wrong_type(model_dir):
    from stablelm_ref import Tokenizer
    from stablelm_ref.errors import TokenizerError

    with pytest.raises(TokenizerError, match="bos_token must be a string"):
        Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"), bos_token=5)
    with pytest.raises(TokenizerError, match="path of a tokenizer.json"):
        Tokenizer.from_file(None)


# ---- class: past_key_values made for another model, and KVCache arguments ---------------------------------

@pytest.fixture(scope="module")
def small():
    return tiny_model(seed=1, dtype="float32", vocab_size=320, max_position_embeddings=64)


@pytest.mark.parametrize("other", [dict(num_hidden_layers=3), dict(num_hidden_layers=1), dict(num_key_value_heads=2),
                                   dict(hidden_size=32, intermediate_size=64), dict(dtype="float64")])
@pytest.mark.parametrize("fast", [False, True])
def test_a_cache_from_another_model_is_refused(small, other, fast):
    """A cache from a model with more layers was used silently (its first layers' buffers); fewer layers
    was an IndexError, other kv heads a broadcasting ValueError inside kv_cache, a float64 cache mixed
    float64 keys into a float32 model. Each names both geometries; the cache is left as it was."""
    settings_ = dict(seed=2, dtype="float32", vocab_size=320, max_position_embeddings=64)
    settings_.update(other)
    cache = tiny_model(**settings_)(np.array([[1, 2]]), use_cache=True).past_key_values
    before = [k.copy() for k in cache.keys], cache.length
    model = small.fast() if fast else small
    with pytest.raises(GenerationError, match=r"past_key_values was made for another model: .* this model has 2 "
                                              r"layers, 4 kv heads of size 16, float32"):
        model(np.array([[3]]), past_key_values=cache, use_cache=True)
    assert cache.length == before[1] and all(np.array_equal(a, b) for a, b in zip(cache.keys, before[0]))


def test_a_cache_of_the_right_geometry_still_continues_exactly(small):
    """The check refuses only what does not fit: a cache made by hand for this model continues like the
    model's own (logits equal to the full forward's last position to float32 rounding of the same math)."""
    cache = KVCache(small.config, 1, 8, small.dtype, np)
    small(np.array([[5, 6]]), past_key_values=cache, use_cache=True)
    step = small(np.array([[7]]), past_key_values=cache, use_cache=True).logits[:, -1]
    full = small(np.array([[5, 6, 7]])).logits[:, -1]
    np.testing.assert_allclose(step, full, rtol=0, atol=1e-5)   # |logits| ~ 1-10; float32 over 2 layers: ~1e-6


@pytest.mark.parametrize("kwargs, match", [(dict(batch_size=-1), "batch_size"), (dict(batch_size=0), "batch_size"),
                                           (dict(max_len=2.5), "max_len"), (dict(max_len=True), "max_len"),
                                           (dict(batch_size="2"), "batch_size")])
def test_kvcache_arguments(small, kwargs, match):
    args = dict(batch_size=1, max_len=4)
    args.update(kwargs)
    with pytest.raises(GenerationError, match=f"KV cache {match} must be an integer >= 1"):
        KVCache(small.config, args["batch_size"], args["max_len"], np.float32, np)


# ---- class: forward and generate arguments that failed late (after the work) or deep ----------------------

def test_generate_refuses_a_timings_that_is_not_a_dict_before_generating(small):
    """timings=[] raised AttributeError after the whole generation: the sequences were lost."""
    calls = []

    class Streamer:
        def put(self, ids):
            calls.append(ids)

        def end(self):
            pass

    with pytest.raises(GenerationError, match="timings must be a dict"):
        small.generate([[1, 2]], max_new_tokens=2, timings=[], streamer=Streamer())
    assert calls == []                                                    # refused before the first token


def test_a_row_that_is_all_pad_token_is_refused_when_the_mask_is_inferred(small):
    """Without an attention_mask a row of only pad_token_id became an all-padding row and generated from
    nothing, silently; a given mask of such a row was already refused."""
    with pytest.raises(GenerationError, match=r"row 0 of input_ids is all pad_token_id \(1\)"):
        small.generate([[1, 1], [5, 6]], max_new_tokens=2, pad_token_id=1, eos_token_id=0)
    out = small.generate([[1, 5], [5, 6]], max_new_tokens=2, pad_token_id=1, eos_token_id=0)  # one pad: fine
    assert out.shape == (2, 4)


def test_numpy_booleans_are_flags(small):
    """do_sample=np.bool_(False) (what a comparison gives) was refused: 'must be True or False, got False'."""
    a = small.generate([[5, 6]], max_new_tokens=3, do_sample=np.bool_(False))
    b = small.generate([[5, 6]], max_new_tokens=3)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs, match", [(dict(trace=5), "trace must be a function"),
                                           (dict(use_cache="no"), "use_cache must be True or False"),
                                           (dict(output_hidden_states="yes"), "output_hidden_states must be True")])
@pytest.mark.parametrize("fast", [False, True])
def test_forward_flags_and_callbacks_of_the_wrong_type(small, kwargs, match, fast):
    """trace=5 was a TypeError inside the layer loop; use_cache='no' made a cache (a true string)."""
    with pytest.raises(GenerationError, match=match):
        (small.fast() if fast else small)(np.array([[1, 2]]), **kwargs)


# ---- class: from_pretrained arguments of the wrong name or type (Hub ids, offline) -------------------------

@pytest.mark.parametrize("path", ["model_dir", "acme/not-cached"])
@pytest.mark.parametrize("kwargs, match", [
    (dict(cache_dir=5), "cache_dir must be a directory, got 5"),
    (dict(revision=5), "revision must be a branch, tag or commit name, got 5"),
    (dict(revision=""), "revision must be"),
    (dict(local_files_only="yes"), "local_files_only must be True or False"),
    (dict(token=5), "token must be a Hub token string"),
    (dict(torch_dtype="bfloat16"), r"unknown argument 'torch_dtype'; this project takes dtype="),
    (dict(trust_remote_code=True), r"unknown argument 'trust_remote_code'; .*no code from a checkpoint"),
    (dict(revison="main"), r"unknown argument 'revison' \(its Hub arguments are revision, cache_dir"),
])
def test_from_pretrained_arguments_are_checked_for_directories_and_repo_ids(model_dir, path, kwargs, match,
                                                                             monkeypatch):
    """cache_dir=5 or revision=5 with a repo id were TypeErrors inside os.fspath or huggingface_hub; an unknown
    argument (torch_dtype, a typo) was ignored for a directory and a TypeError for a repo id. Checked before
    any file or network access, for every from_pretrained, each raising its own error class."""
    from stablelm_ref import StableLmConfig, Tokenizer
    from stablelm_ref import hub
    from stablelm_ref.errors import ConfigError, TokenizerError

    monkeypatch.setattr(hub, "snapshot_download", lambda *a, **k: pytest.fail("the Hub was asked"))
    path = model_dir if path == "model_dir" else path
    for load, error in ((StableLmForCausalLM.from_pretrained, CheckpointError),
                        (Tokenizer.from_pretrained, TokenizerError), (StableLmConfig.from_pretrained, ConfigError)):
        with pytest.raises(error, match=match):
            load(path, **kwargs)


# ---- class: config.json values accepted but wrong: named by the wrong key, or out of range -----------------

@pytest.mark.parametrize("key, value, match", [
    ("max_position_embeddings", 10**40, "'max_position_embeddings' must be at most"),   # was blamed on rope_theta
    ("max_position_embeddings", 2**62, "'max_position_embeddings' must be at most"),
    ("hidden_dropout", 5.0, "'hidden_dropout' is a probability"),
    ("attention_dropout", 1.5, "'attention_dropout' is a probability"),
    ("classifier_dropout", "x", "'classifier_dropout' must be a finite number"),
    ("classifier_dropout", 2, "'classifier_dropout' is a probability"),
])
def test_config_values_out_of_range_name_their_key(key, value, match):
    from conftest import TINY
    from stablelm_ref import StableLmConfig
    from stablelm_ref.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        StableLmConfig.from_dict({**TINY, key: value})
    StableLmConfig.from_dict({**TINY, "max_position_embeddings": 2**53, "classifier_dropout": 0.1})  # the edges load


def test_config_extra_must_be_a_dict():
    from stablelm_ref import StableLmConfig
    from stablelm_ref.errors import ConfigError

    with pytest.raises(ConfigError, match="extra must be a dict"):
        StableLmConfig(extra=5)


# ---- class: command-line options whose empty value meant something else -----------------------------------

def test_an_empty_model_option_is_an_error_not_the_default_model(capsys):
    """--model '' ran the embedded default model, as if --model had not been given."""
    from stablelm_ref.cli import main

    assert main(["generate", "--model", "", "--max-new-tokens", "1", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "got ''" in err


# ---- class: text from a file reaching the terminal (escape sequences, forged lines) -------------------------

@cases(60)
@given(name=st.text(min_size=1, max_size=12), producer=st.text(max_size=12))
def test_compare_prints_no_control_characters_from_a_trace(tmp_path_factory, name, producer):
    """Property: whatever text a trace's tensor names and metadata hold, `stablelm-ref compare` prints no
    control character but the newlines of its own layout: one table row per tensor. Before, a name
    '\\x1b]0;...\\x07\\x1b[2J' retitled and cleared the terminal and a name with a newline forged a row."""
    import contextlib
    import io

    from stablelm_ref.cli import main

    assume(name != "plain")
    path = str(tmp_path_factory.mktemp("esc") / "t.safetensors")
    write_trace(path, {name: np.zeros(2), "plain": np.ones(2)}, {"producer": producer})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["compare", path, path]) == 0
    text = out.getvalue()
    assert all(c.isprintable() or c == "\n" for c in text)
    assert text.count("\n") == 11         # A, B, tolerance, ok rule, blank, header, rule, 2 rows, blank, summary


def test_an_error_message_carrying_template_text_is_printable(model_dir, tmp_path, capsys, monkeypatch):
    """raise_exception in a downloaded chat template reached the terminal raw through the CLI's error line."""
    import io
    import sys

    from stablelm_ref.cli import main

    directory = copy_of(model_dir, tmp_path)
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        data = json.load(f)
    data["chat_template"] = "{{ raise_exception('\\x1b[2J\\x1b]0;owned\\x07 cleared') }}"
    with open(path, "w") as f:
        json.dump(data, f)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", "--model", directory, "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "\\x1b[2J" in err and all(c.isprintable() or c == "\n" for c in err) and err.count("\n") == 1


# ---- class: the other public constructors and arguments taken as objects ----------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(config={"vocab_size": 5}), "from_config takes a StableLmConfig"), (dict(config=None), "takes a StableLmConfig"),
    (dict(seed=-1), "seed must be an integer >= 0"), (dict(seed=1.5), "seed must be"),
    (dict(std=float("nan")), "std must be a finite number"), (dict(std=-1.0), "std must be"),
])
def test_from_config_arguments(kwargs, match):
    """from_config({'vocab_size': 5}) was an AttributeError, seed=-1 a ValueError inside NumPy's generator,
    std=nan built a model of NaN weights."""
    from conftest import tiny_config
    from stablelm_ref.errors import StableLmError

    args = dict(config=tiny_config(), seed=0, std=None)
    args.update(kwargs)
    with pytest.raises(StableLmError, match=match):
        StableLmForCausalLM.from_config(args.pop("config"), **args)


def test_a_streamer_class_instead_of_an_instance(small):
    """streamer=TextStreamer (the class) passed the check (its put is callable) and failed with a TypeError."""
    from stablelm_ref import TextStreamer

    with pytest.raises(GenerationError, match=r"streamer is the class TextStreamer; pass an instance"):
        small.generate([[1, 2]], max_new_tokens=1, streamer=TextStreamer)


@pytest.mark.parametrize("key", ["pad_token_id", "eos_token_id"])
def test_token_ids_from_the_config_are_named_as_such(key):
    """A pad or eos id outside the vocabulary in config.json was reported like an argument the user gave."""
    model = tiny_model(seed=1, dtype="float32", vocab_size=320, max_position_embeddings=64, **{key: 10**6})
    with pytest.raises(GenerationError, match=rf"{key} \(from the model's config.json\) 1000000 is outside"):
        model.generate([[1, 2]], max_new_tokens=1)
    with pytest.raises(GenerationError, match=rf"^{key} 999 is outside"):
        model.generate([[1, 2]], max_new_tokens=1, **{key: 999})


# ---- class: a writer that wrote a corrupt file, or failed with a TypeError ---------------------------------

NAMES = st.one_of(st.text(max_size=8), st.sampled_from(["__metadata__", "order", "format"]), st.integers(0, 3))
DTYPES = st.sampled_from(["<f4", ">f4", "<f8", ">f8", "<f2", "<i8", ">i4", "|b1", "|u1", "<u4", "<c8", "|O"])


SAFETENSORS_DTYPES = {np.dtype(t) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "b1")} | {
    np.dtype(ml_dtypes.bfloat16)}                                  # the format's types that NumPy has


def expected_refusal(trace, meta):
    """The start of the message write_trace must refuse with, in the order it checks (None: it must write):
    metadata JSON cannot hold, a name that is not a string or is '__metadata__' (in the trace's order), then a
    dtype safetensors has no type for (in name order)."""
    for key, value in meta.items():
        if not isinstance(value, (str, int)):
            return f"trace metadata {key!r}: "
    for name in trace:
        if not isinstance(name, str) or name == "__metadata__":
            return f"cannot save a tensor named {name!r}: "
    for name in sorted(trace):
        if trace[name].dtype.newbyteorder("=") not in SAFETENSORS_DTYPES:
            return f"cannot save tensor {name!r} of dtype {trace[name].dtype} as safetensors"
    return None


@cases(80)
@given(entries=st.lists(st.tuples(NAMES, DTYPES, st.lists(st.integers(0, 3), max_size=3)), min_size=1, max_size=4),
       meta=st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), st.integers(), st.just(object())),
                            max_size=2))
def test_write_trace_round_trips_or_refuses_and_never_writes_a_corrupt_file(tmp_path_factory, entries, meta):
    """Property: write_trace of any {name: array} and metadata either writes a file that read_trace returns
    exactly (same names in order, values, dtypes up to byte order, the trace format whatever the metadata
    says), or raises CheckpointError and writes nothing. Before: a tensor named '__metadata__' gave a file
    that could not be read (the metadata overwrote its header entry), int names and non-JSON metadata were
    TypeErrors, big-endian arrays were refused."""
    rng = np.random.default_rng(0)
    trace = {}
    for name, dtype, shape in entries:
        if dtype == "|O":
            trace[name] = np.empty(shape, dtype=object)
        else:
            trace[name] = (rng.normal(size=shape) * 100).astype(dtype)
    path = tmp_path_factory.mktemp("w") / "t.safetensors"
    refusal = expected_refusal(trace, meta)
    if refusal is not None:                      # refused, naming the key, name or dtype; nothing written
        with pytest.raises(CheckpointError) as e:
            write_trace(path, trace, meta)
        assert str(e.value).startswith(refusal), (str(e.value), refusal)
        assert not path.exists() and os.listdir(path.parent) == []
        return
    write_trace(path, trace, meta)
    back, read_meta = read_trace(path)
    assert list(back) == list(trace) and read_meta["format"] == TRACE_FORMAT
    for name, value in trace.items():
        assert back[name].dtype == value.dtype.newbyteorder("=") and back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value)


def test_a_warning_in_the_cli_is_one_line_in_its_own_words(model_dir, capsys):
    """--max-new-tokens past the context printed Python's warning: a source path and a line of code."""
    import warnings

    from stablelm_ref.cli import main

    before = warnings.showwarning
    assert main(["generate", "--model", model_dir, "--max-new-tokens", "70", "hi"]) == 0
    err = capsys.readouterr().err
    assert err == ("stablelm-ref: warning: prompt + new tokens = 72 positions, past max_position_embeddings (64): "
                   "the model was not trained that far\n")
    assert warnings.showwarning is before                                  # restored when the command ends


def test_saving_under_the_embedded_models_name_is_refused(tmp_path, monkeypatch):
    """save_pretrained('stablelm-ref:default') made a folder that from_pretrained of that name never reads
    (it is the embedded model's name): the saved model could not be loaded back by its name."""
    monkeypatch.chdir(tmp_path)
    model = tiny_model(seed=1, dtype="float32", vocab_size=320, max_position_embeddings=64)
    with pytest.raises(CheckpointError, match="names the embedded default model"):
        model.save_pretrained("stablelm-ref:default")
    assert os.listdir(tmp_path) == []


# ---- property: ids outside the vocabulary, at every entry that takes ids ----------------------------------

@pytest.fixture(scope="module")
def entries():
    """Every public call that takes token ids, on one tiny vocabulary (V = 101)."""
    from stablelm_ref import StableLmForSequenceClassification, StableLmForTokenClassification

    causal = tiny_model(seed=3, dtype="float32")
    seq = tiny_model(seed=3, dtype="float32", cls=StableLmForSequenceClassification, pad_token_id=0)
    tok = tiny_model(seed=3, dtype="float32", cls=StableLmForTokenClassification)
    fast = tiny_model(seed=3, dtype="float32").fast()
    return {"forward": causal, "generate": lambda ids: causal.generate(ids, max_new_tokens=1),
            "fast": fast, "fast generate": lambda ids: fast.generate(ids, max_new_tokens=1),
            "run_with_trace": causal.run_with_trace, "sequence": seq, "token": tok}


@cases(60)
@given(data=st.data(), dtype=st.sampled_from(["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]),
       entry=st.sampled_from(["forward", "generate", "fast", "fast generate", "run_with_trace", "sequence", "token"]),
       flat=st.booleans())
def test_any_id_outside_the_vocabulary_is_refused_naming_it(entries, data, dtype, entry, flat):
    """Property: an id array holding any value outside [0, vocab_size) is refused by every entry with a
    GenerationError naming one of the offending values (and nothing runs)."""
    info = np.iinfo(dtype)
    vocab = 101
    rows, cols = (1 if flat else data.draw(st.integers(1, 3))), data.draw(st.integers(1, 5))
    ids = np.array(data.draw(st.lists(st.integers(0, vocab - 1), min_size=rows * cols, max_size=rows * cols)),
                   dtype=dtype).reshape(rows, cols)
    bad = [v for v in (-1, vocab, info.min, info.max, -(2**31), 2**40) if info.min <= v <= info.max
           and not 0 <= v < vocab]                                        # never empty: info.max >= 127 > vocab
    ids[data.draw(st.integers(0, rows - 1)), data.draw(st.integers(0, cols - 1))] = data.draw(st.sampled_from(bad))
    with pytest.raises(GenerationError, match=r"token id (-?\d+) is outside the vocabulary \[0, 101\)") as e:
        entries[entry](ids[0] if flat else ids)
    named = int(str(e.value).split("token id ")[1].split(" ")[0])
    assert named in set(ids.reshape(-1).tolist()) and not 0 <= named < vocab


def test_a_hub_snapshot_with_a_missing_blob_says_the_download_is_incomplete(model_dir, tmp_path, monkeypatch):
    """A cached snapshot whose link points at a blob that is gone (an interrupted download, a cleaned cache)
    said only 'no such file' for a file that `ls` shows; each reader now names the dangling link."""
    from stablelm_ref import StableLmConfig, Tokenizer
    from stablelm_ref.errors import ConfigError, TokenizerError

    snap = tmp_path / "models--acme--tiny" / "snapshots" / "0123"
    blobs = tmp_path / "models--acme--tiny" / "blobs"
    os.makedirs(snap)
    os.makedirs(blobs)
    for name in os.listdir(model_dir):
        shutil.copy(os.path.join(model_dir, name), blobs / (name + ".blob"))
        os.symlink(os.path.relpath(blobs / (name + ".blob"), snap), snap / name)
    StableLmForCausalLM.from_pretrained(snap)                                # complete: loads
    for name, load, error in (("model.safetensors", StableLmForCausalLM.from_pretrained, CheckpointError),
                              ("config.json", StableLmConfig.from_pretrained, ConfigError),
                              ("tokenizer.json", Tokenizer.from_pretrained, TokenizerError)):
        os.unlink(blobs / (name + ".blob"))
        with pytest.raises(error, match=r"a link to .*which does not exist \(an incomplete download\?\)"):
            load(str(snap))


def test_a_chat_longer_than_the_context_says_so_in_the_chats_words(model_dir, capsys, monkeypatch):
    """A conversation outgrowing the context ended with generate's 'the prompt has N tokens ...; shorten the
    prompt', advice the chat's user cannot follow: it now says the conversation has grown past the context."""
    import io
    import sys

    from stablelm_ref.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n" + "the weather is nice today " * 8 + "\n"))
    assert main(["chat", "--model", model_dir, "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("stablelm-ref: error: the conversation has grown to ")
    assert "more than the model's context (max_position_embeddings = 64); start a new chat" in err[-1]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("num_labels, problem", [(1, "regression"), (3, "regression"),
                                                 (3, "multi_label_classification")])
def test_non_finite_float_labels_are_refused(bad, num_labels, problem):
    """A NaN or Inf regression or multi-label target gave a NaN (or Inf) loss, silently."""
    from stablelm_ref import StableLmForSequenceClassification

    model = tiny_model(seed=4, dtype="float32", cls=StableLmForSequenceClassification, pad_token_id=0,
                       id2label={str(i): str(i) for i in range(num_labels)}, problem_type=problem)
    labels = np.zeros((2, num_labels), np.float32)
    assert np.isfinite(model([[1, 2], [3, 4]], labels=labels).loss)
    labels[1, -1] = bad
    with pytest.raises(GenerationError, match=r"labels hold (nan|inf|-inf): regression targets"):
        model([[1, 2], [3, 4]], labels=labels)


# ---- class: one mask, two checks that disagreed (the forward's and generate's) ----------------------------

MASK_VALUES = st.sampled_from([0, 1, 1, 1, 2, -1, 0.5, float("nan"), True, False])
MASK_DTYPES = st.sampled_from([None, "int64", "uint8", "float32", "bool", "complex64", "U1", "datetime64[s]", "O"])


@cases(120)
@given(values=st.integers(1, 3).flatmap(lambda w: st.lists(st.lists(MASK_VALUES, min_size=w, max_size=w), min_size=1,
                                                          max_size=2)), dtype=MASK_DTYPES, flat=st.booleans())
def test_forward_and_generate_judge_a_mask_alike(small, values, dtype, flat):
    """Property: for input_ids of shape [B, T], an attention_mask is accepted by the forward exactly when it
    is numeric (bools, integers or floats), of shape [B, T] (as tests/test_hostile_input.py states it), and holds
    only 0 and 1
    (an independent statement); generate accepts the same masks except a row of only padding. Before, generate
    had its own check: it accepted complex masks, raised TypeError on structured arrays, and its messages
    differed ('rectangular list of numbers' for a rectangular array of strings)."""
    width = len(values[0])
    ids = np.arange(1, 1 + len(values) * width).reshape(len(values), width)
    try:
        mask = np.asarray(values, dtype=dtype) if dtype else values
    except (ValueError, TypeError, OverflowError):
        return                                                             # ragged, or not convertible: skip
    if flat:
        mask, ids = np.asarray(mask)[0], ids[:1]
    arr = np.asarray(mask)
    valid = arr.dtype.kind in "biuf" and arr.shape == ids.shape and bool(np.all((arr == 0) | (arr == 1)))
    try:
        small(ids, attention_mask=mask)
        forward_ok = True
    except GenerationError as e:
        forward_ok = False
        assert "attention_mask" in str(e)
    assert forward_ok == valid
    padding_row = valid and not np.asarray(arr, dtype=np.float64).reshape(ids.shape).any(axis=1).all()
    try:
        small.generate(ids, attention_mask=mask, max_new_tokens=1)
        generate_ok = True
    except GenerationError as e:
        generate_ok = False
        assert "attention_mask" in str(e)
    assert generate_ok == (valid and not padding_row)


def test_chat_reads_a_bounded_turn_from_stdin(model_dir, capsys, monkeypatch):
    """`stablelm-ref chat < /dev/zero` (or a file without newlines) read one line without end, growing
    the process until memory ran out; a turn is read up to MAX_TURN_CHARS."""
    import io
    import sys

    from stablelm_ref import cli

    monkeypatch.setattr(cli, "MAX_TURN_CHARS", 1000)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\0" * 5000))
    assert cli.main(["chat", "--model", model_dir, "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "a chat turn on standard input is longer than 1,000 characters" in err and err.count("\n") == 1
    monkeypatch.setattr(sys, "stdin", io.StringIO("x" * 20 + "\n"))   # a turn within the bound: a reply
    assert cli.main(["chat", "--model", model_dir, "--max-new-tokens", "1"]) == 0


# ---- class: config.json that disagrees with the weights in a way the shapes do not show -------------------

def test_a_tied_config_with_a_different_lm_head_is_refused(tmp_path):
    """config.json saying tie_word_embeddings: true over a checkpoint whose lm_head.weight is not the
    embedding (an untied model with a wrong config) loaded silently and gave the embedding's logits. A copy
    equal to the embedding (what tied models often save) still loads, to the same logits."""
    model = tiny_model(seed=6, dtype="float32", vocab_size=320, max_position_embeddings=64, tie_word_embeddings=True)
    embed = model.params["model.embed_tokens.weight"]
    for name, lm_head, ok in (("copy", embed.copy(), True), ("other", embed + np.float32(0.5), False),
                              ("one value", np.where(np.arange(embed.size).reshape(embed.shape) == 7, 0, embed), False)):
        directory = tmp_path / name
        directory.mkdir()
        checkpoint.save_file({**model.params, "lm_head.weight": lm_head}, str(directory / "model.safetensors"))
        model.config.save_pretrained(directory)
        if ok:
            back = StableLmForCausalLM.from_pretrained(directory)
            np.testing.assert_array_equal(back([[1, 2]]).logits, model([[1, 2]]).logits)
        else:
            with pytest.raises(CheckpointError, match="tie_word_embeddings: true, but lm_head.weight differs"):
                StableLmForCausalLM.from_pretrained(directory)
    from stablelm_ref import StableLmModel

    StableLmModel.from_pretrained(tmp_path / "other")                        # no head: lm_head is not used
