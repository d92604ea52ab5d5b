"""model.generation_config: generate's defaults from generation_config.json, as transformers loads them.

The reference for "what the file means" is generate's own explicit arguments: a model whose file says
{do_sample: true, temperature: 0.7, ...} must generate exactly what the same model without the file
generates when those values are passed as arguments (same seed, same draws), and an explicit argument
must beat the file. Token sequences are compared exactly: both sides run the same arithmetic, so any
difference means a setting was resolved differently. tests/crosscheck/test_generation_config_vs_transformers.py
compares the same resolution with transformers' generate.
"""

import fnmatch
import json
import math
import os
import re
import warnings

import numpy as np
import pytest

from stablelm_ref import hub
from stablelm_ref.errors import CheckpointError, GenerationError
from stablelm_ref.generation_config import GenerationConfig
from stablelm_ref.heads import StableLmForCausalLM

from conftest import tiny_model

VOCAB = 101  # tiny_config's vocab_size
PROMPT = [[5, 17, 42, 8, 99, 23]]


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """A tiny checkpoint saved by save_pretrained (its generation_config.json comes from config.json)."""
    path = tmp_path_factory.mktemp("plain")
    tiny_model(seed=4, dtype="float64").save_pretrained(path)
    return str(path)


def with_generation_config(src, dst, content):
    """A copy of the checkpoint src whose generation_config.json holds `content` (a dict, or raw text)."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name != "generation_config.json":
            with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
                g.write(f.read())
    with open(os.path.join(dst, "generation_config.json"), "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    return str(dst)


def free_run(model, n=12):
    return model.generate(PROMPT, max_new_tokens=n, eos_token_id=None)[0, len(PROMPT[0]):]


# ---- loading ------------------------------------------------------------------------------------

def test_file_fields_are_loaded_and_unknown_keys_ignored(plain_dir, tmp_path):
    d = with_generation_config(plain_dir, tmp_path, {
        "bos_token_id": 0, "eos_token_id": [3, 7], "pad_token_id": 1, "do_sample": True, "temperature": 0.7,
        "top_k": 10, "top_p": 0.9, "max_new_tokens": 5, "repetition_penalty": 1.1,
        "num_beams": 1, "transformers_version": "5.17.0", "cache_implementation": "static"})
    gc = StableLmForCausalLM.from_pretrained(d).generation_config
    assert gc.to_dict() == dict(bos_token_id=0, eos_token_id=[3, 7], pad_token_id=1, do_sample=True, temperature=0.7,
                                top_k=10, top_p=0.9, max_new_tokens=5, repetition_penalty=1.1)
    assert gc.max_length is None


def test_without_the_file_the_token_ids_come_from_config_json(plain_dir, tmp_path):
    d = with_generation_config(plain_dir, tmp_path, {})
    os.remove(os.path.join(d, "generation_config.json"))
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    config.update(eos_token_id=[2, 9], pad_token_id=4)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    gc = StableLmForCausalLM.from_pretrained(d).generation_config
    assert gc.to_dict() == dict(bos_token_id=0, eos_token_id=[2, 9], pad_token_id=4)


def test_the_default_model_file_agrees_with_its_config():
    model = StableLmForCausalLM.from_pretrained("stablelm-ref:default")
    c = model.config
    assert model.generation_config.to_dict() == dict(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                                                     pad_token_id=c.pad_token_id)


# ---- generate: the file's values are the defaults, explicit arguments win ------------------------

SAMPLING_FILE = {"eos_token_id": [3, 7], "do_sample": True, "temperature": 0.7, "top_k": 10, "top_p": 0.9,
                 "max_new_tokens": 5, "repetition_penalty": 1.1}
SAMPLING_ARGS = dict(eos_token_id=[3, 7], do_sample=True, temperature=0.7, top_k=10, top_p=0.9, max_new_tokens=5,
                     repetition_penalty=1.1)


def test_file_defaults_generate_as_the_same_explicit_arguments(plain_dir, tmp_path):
    model = StableLmForCausalLM.from_pretrained(with_generation_config(plain_dir, tmp_path, SAMPLING_FILE))
    plain = StableLmForCausalLM.from_pretrained(plain_dir)
    for seed in range(4):
        got = model.generate(PROMPT, seed=seed)
        want = plain.generate(PROMPT, seed=seed, **SAMPLING_ARGS)
        np.testing.assert_array_equal(got, want)
        assert got.shape[1] <= len(PROMPT[0]) + 5
    # and they are not what transformers' bare defaults give (greedy, 20 tokens): the file mattered
    with pytest.warns(UserWarning, match="default max_length"):
        bare = plain.generate(PROMPT, seed=0)
    assert bare.shape == (1, len(PROMPT[0]) + 20)


def test_explicit_arguments_win_over_the_file(plain_dir, tmp_path):
    model = StableLmForCausalLM.from_pretrained(with_generation_config(plain_dir, tmp_path, SAMPLING_FILE))
    plain = StableLmForCausalLM.from_pretrained(plain_dir)
    # greedy and no EOS by argument; the file's repetition penalty still applies (it does when greedy too)
    greedy = plain.generate(PROMPT, max_new_tokens=8, eos_token_id=None, do_sample=False, repetition_penalty=1.1)
    np.testing.assert_array_equal(model.generate(PROMPT, max_new_tokens=8, eos_token_id=None, do_sample=False),
                                  greedy)
    # temperature 1.3 instead of 0.7, everything else from the file
    np.testing.assert_array_equal(model.generate(PROMPT, temperature=1.3, seed=2),
                                  plain.generate(PROMPT, seed=2, **{**SAMPLING_ARGS, "temperature": 1.3}))


def test_eos_list_from_the_file_stops_and_explicit_none_does_not(plain_dir, tmp_path):
    plain = StableLmForCausalLM.from_pretrained(plain_dir)
    free = free_run(plain)
    stop = int(free[3])                                       # the greedy run emits it at step 3 (or earlier)
    first = int(np.nonzero(free == stop)[0][0])
    d = with_generation_config(plain_dir, tmp_path, {"eos_token_id": [VOCAB - 1, stop], "max_new_tokens": 12})
    model = StableLmForCausalLM.from_pretrained(d)
    out = model.generate(PROMPT)[0, len(PROMPT[0]):]
    np.testing.assert_array_equal(out, free[:first + 1])       # stopped right after the file's EOS id
    np.testing.assert_array_equal(model.generate(PROMPT, eos_token_id=None)[0, len(PROMPT[0]):], free)


def test_max_length_from_the_file_is_the_total_length(plain_dir, tmp_path):
    """transformers 5: a max_length set anywhere (argument or file) is prompt + new tokens; only when none is set
    are DEFAULT_MAX_LENGTH (20) tokens generated, with its warning. A file's 20 is a total length too."""
    model = StableLmForCausalLM.from_pretrained(with_generation_config(plain_dir, tmp_path / "a", {"max_length": 9}))
    assert model.generate(PROMPT, eos_token_id=None).shape == (1, 9)                    # 6 prompt + 3
    assert model.generate(PROMPT, eos_token_id=None, max_new_tokens=2).shape == (1, 8)  # the argument wins
    with pytest.raises(GenerationError, match=r"max_length \(from the model's generation config\) is 9"):
        model.generate([list(range(2, 12))])
    model = StableLmForCausalLM.from_pretrained(with_generation_config(plain_dir, tmp_path / "b", {"max_length": 20}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # no "default max_length" warning: the file set it
        assert model.generate(PROMPT, eos_token_id=None).shape == (1, 20)


def test_max_new_tokens_from_the_file_wins_over_an_explicit_max_length_as_in_transformers(plain_dir, tmp_path):
    model = StableLmForCausalLM.from_pretrained(with_generation_config(plain_dir, tmp_path, {"max_new_tokens": 4}))
    assert model.generate(PROMPT, eos_token_id=None, max_length=15).shape == (1, 6 + 4)


def test_an_edited_generation_config_is_checked_at_generate(plain_dir):
    model = StableLmForCausalLM.from_pretrained(plain_dir)
    model.generation_config.top_p = 2.0
    with pytest.raises(GenerationError, match=r"model.generation_config: top_p must be a number in \(0, 1\], got 2.0"):
        model.generate(PROMPT, max_new_tokens=2)
    model.generation_config.top_p = None
    model.generation_config.eos_token_id = VOCAB
    with pytest.raises(GenerationError, match=rf"eos_token_id \(from model.generation_config\) {VOCAB} is outside"):
        model.generate(PROMPT, max_new_tokens=2)


FLAG_VALUES = [(np.True_, True), (np.False_, False), (True, True), (0, None), (1, None), ("True", None)]


@pytest.mark.parametrize("value, as_bool", FLAG_VALUES, ids=[repr(v) for v, _ in FLAG_VALUES])
def test_generate_and_the_generation_config_take_the_same_do_sample_values(plain_dir, value, as_bool):
    """One rule (errors.check_flag) for do_sample wherever it enters: generate's argument, a GenerationConfig
    field, a field edited on the model. Before, generate took np.bool_ (what a comparison gives) and the
    generation config refused it; 0, 1 and "True" are refused by both, in the same words. Where accepted, the
    value decodes exactly as the bool it stands for (the same seeded draws)."""
    model = StableLmForCausalLM.from_pretrained(plain_dir)
    kwargs = dict(max_new_tokens=6, eos_token_id=None, seed=5, temperature=3.0)
    message = rf"do_sample must be True or False, got {re.escape(repr(value))}$"
    if as_bool is None:
        with pytest.raises(GenerationError, match=message):
            model.generate(PROMPT, do_sample=value, **kwargs)
        with pytest.raises(GenerationError, match=message):
            GenerationConfig(do_sample=value).check()
        model.generation_config.do_sample = value
        with pytest.raises(GenerationError, match="model.generation_config: " + message):
            model.generate(PROMPT, **kwargs)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                    # greedy with a temperature: the "ignored" warning
        want = model.generate(PROMPT, do_sample=as_bool, **kwargs)
        np.testing.assert_array_equal(model.generate(PROMPT, do_sample=value, **kwargs), want)
        GenerationConfig(do_sample=value).check()
        model.generation_config.do_sample = value
        np.testing.assert_array_equal(model.generate(PROMPT, **kwargs), want)
    if as_bool:                                            # the draws mattered: sampling differs from greedy
        assert not np.array_equal(want, model.generate(PROMPT, do_sample=False, max_new_tokens=6, eos_token_id=None))


def test_numpy_values_in_the_generation_config_are_saved_as_json(plain_dir, tmp_path):
    """A field set to a NumPy scalar or array (np.int64 from arithmetic, np.True_ from a comparison) passes
    generate's checks; save_pretrained raised a TypeError (json cannot write them) instead of saving."""
    model = StableLmForCausalLM.from_pretrained(plain_dir)
    gc = model.generation_config
    gc.do_sample, gc.max_new_tokens, gc.temperature = np.True_, np.int64(7), np.float32(0.5)
    gc.eos_token_id = np.array([3, 7])
    model.save_pretrained(tmp_path)
    with open(tmp_path / "generation_config.json") as f:
        saved = json.load(f)
    assert {k: saved[k] for k in ("do_sample", "max_new_tokens", "temperature", "eos_token_id")} == dict(
        do_sample=True, max_new_tokens=7, temperature=0.5, eos_token_id=[3, 7])   # 0.5 is exact in float32
    assert all(type(saved[k]) is t for k, t in (("do_sample", bool), ("max_new_tokens", int)))


def test_fast_form_uses_the_reference_models_generation_config(plain_dir, tmp_path):
    model = StableLmForCausalLM.from_pretrained(with_generation_config(plain_dir, tmp_path, SAMPLING_FILE),
                                                dtype="float64")
    np.testing.assert_array_equal(model.fast().generate(PROMPT, seed=1), model.generate(PROMPT, seed=1))


# ---- hostile files ------------------------------------------------------------------------------

HOSTILE = [
    ({"eos_token_id": "0"}, "eos_token_id must be an integer token id or a list of them, got '0'"),
    ({"eos_token_id": [3, 7.5]}, "eos_token_id must be an integer token id or a list of them, got [3, 7.5]"),
    ({"eos_token_id": []}, "eos_token_id must be an integer token id or a list of them, got []"),
    ({"eos_token_id": [3, VOCAB]}, f"eos_token_id {VOCAB} is outside the vocabulary [0, {VOCAB})"),
    ({"pad_token_id": [1, 2]}, "pad_token_id must be an integer token id, got [1, 2]"),
    ({"bos_token_id": -1}, f"bos_token_id -1 is outside the vocabulary [0, {VOCAB})"),
    ({"do_sample": "true"}, "do_sample must be True or False, got 'true' (in JSON: true or false)"),
    ({"do_sample": 1}, "do_sample must be True or False, got 1 (in JSON: true or false)"),
    ({"temperature": 0}, "temperature must be a number > 0, got 0"),
    ({"top_p": 1.5}, "top_p must be a number in (0, 1], got 1.5"),
    ({"top_k": True}, "top_k must be an integer >= 0 (0 turns it off), got True"),
    ({"top_k": 2.5}, "top_k must be an integer >= 0 (0 turns it off), got 2.5"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
    ({"max_length": "20"}, "max_length must be an integer >= 1, got '20'"),
    ({"repetition_penalty": -1.0}, "repetition_penalty must be a number > 0 (1.0 turns it off), got -1.0"),
]


@pytest.mark.parametrize("content, message", HOSTILE, ids=[str(c) for c, _ in HOSTILE])
def test_hostile_generation_config_is_refused_naming_file_key_and_value(plain_dir, tmp_path, content, message):
    d = with_generation_config(plain_dir, tmp_path, content)
    with pytest.raises(CheckpointError) as e:
        StableLmForCausalLM.from_pretrained(d)
    text = str(e.value)
    assert text.startswith(os.path.join(d, "generation_config.json") + ": "), text
    assert message in text and "fix or remove the file" in text


@pytest.mark.parametrize("raw, reason", [
    ('{"temperature": NaN}', "temperature must be a number > 0, got nan"),
    ('{"top_p": Infinity}', "top_p must be a number in (0, 1], got inf"),
    ("[1, 2]", "must hold a JSON object, got list"),
    ('{"eos_token_id": 0', "not valid JSON"),
])
def test_non_finite_or_malformed_generation_config_is_refused(plain_dir, tmp_path, raw, reason):
    d = with_generation_config(plain_dir, tmp_path, raw)
    with pytest.raises(CheckpointError, match="generation_config.json") as e:
        StableLmForCausalLM.from_pretrained(d)
    assert reason in str(e.value)


def test_generation_config_refuses_unknown_fields_in_python():
    with pytest.raises(GenerationError, match="no field 'temprature'"):
        GenerationConfig(temprature=0.7)


# ---- saving -------------------------------------------------------------------------------------

def test_round_trip_keeps_the_generation_config(plain_dir, tmp_path):
    model = StableLmForCausalLM.from_pretrained(with_generation_config(plain_dir, tmp_path / "a", SAMPLING_FILE))
    model.save_pretrained(tmp_path / "b")
    again = StableLmForCausalLM.from_pretrained(tmp_path / "b")
    assert again.generation_config == model.generation_config
    with open(tmp_path / "b" / "generation_config.json") as f:
        assert json.load(f) == SAMPLING_FILE
    np.testing.assert_array_equal(again.generate(PROMPT, seed=3), model.generate(PROMPT, seed=3))


def test_from_config_models_save_config_json_token_ids(tmp_path):
    model = tiny_model(seed=1, eos_token_id=[2, 5], pad_token_id=3)
    model.save_pretrained(tmp_path)
    with open(tmp_path / "generation_config.json") as f:
        assert json.load(f) == {"bos_token_id": 0, "eos_token_id": [2, 5], "pad_token_id": 3}


def test_an_invalid_generation_config_is_not_saved_and_nothing_is_written(plain_dir, tmp_path):
    model = StableLmForCausalLM.from_pretrained(plain_dir)
    model.generation_config.temperature = math.nan
    with pytest.raises(CheckpointError, match="cannot save: model.generation_config: temperature must be a number "
                                              "> 0, got nan"):
        model.save_pretrained(tmp_path / "out")
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []


def test_hub_download_fetches_generation_config_json():
    assert any(fnmatch.fnmatch("generation_config.json", p) for p in hub.ALLOW_PATTERNS)


def test_generation_config_is_not_written_when_the_weights_fail(plain_dir, tmp_path):
    model = StableLmForCausalLM.from_pretrained(plain_dir)
    model.params["model.norm.weight"] = model.params["model.norm.weight"] * np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="NaN"):
            model.save_pretrained(tmp_path / "out")
    assert not os.path.exists(tmp_path / "out" / "generation_config.json")


def test_generation_config_that_is_not_a_regular_file_inside_the_directory_is_refused(plain_dir, tmp_path):
    d = with_generation_config(plain_dir, tmp_path / "dir", {})
    os.remove(os.path.join(d, "generation_config.json"))
    os.mkdir(os.path.join(d, "generation_config.json"))
    with pytest.raises(CheckpointError, match="generation_config.json"):
        StableLmForCausalLM.from_pretrained(d)
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"max_new_tokens": 3}))
    d = with_generation_config(plain_dir, tmp_path / "link", {})
    os.remove(os.path.join(d, "generation_config.json"))
    os.symlink(outside, os.path.join(d, "generation_config.json"))
    with pytest.raises(CheckpointError, match="generation_config.json"):
        StableLmForCausalLM.from_pretrained(d)


def test_a_generation_config_replaced_by_a_dict_is_named(plain_dir):
    model = StableLmForCausalLM.from_pretrained(plain_dir)
    model.generation_config = {"max_new_tokens": 3}
    with pytest.raises(GenerationError, match="model.generation_config must be a GenerationConfig .* got dict"):
        model.generate(PROMPT)
