"""config.json, hand-edited and hostile: each invalid value a ConfigError naming the key and the value.
(Random edits of whole config files are fuzzed in test_hostile_input.py.)"""

import json
import os

import numpy as np
import pytest

from stablelm_ref import StableLmConfig, StableLmForCausalLM, checkpoint
from stablelm_ref.errors import CheckpointError, ConfigError

from conftest import TINY, tiny_config, tiny_model


def from_dict(**overrides):
    return StableLmConfig.from_dict({**TINY, **overrides})


@pytest.mark.parametrize("key, value, match", [
    ("vocab_size", "101", "'vocab_size' must be an integer >= 1, got '101'"),
    ("hidden_size", 64.0, "'hidden_size' must be an integer >= 1, got 64.0"),
    ("num_hidden_layers", None, "'num_hidden_layers' must be an integer >= 1, got None"),
    ("num_attention_heads", True, "'num_attention_heads' must be an integer >= 1, got True"),
    ("max_position_embeddings", [64], "must be an integer"),
    ("use_qkv_bias", 1.0, "'use_qkv_bias' must be true or false, got 1.0"),
    ("qk_layernorm", "false", "'qk_layernorm' must be true or false, got 'false'"),
    ("tie_word_embeddings", None, "must be true or false"),
    ("layer_norm_eps", "1e-5", "'layer_norm_eps' must be a finite number"),
    ("layer_norm_eps", float("nan"), "'layer_norm_eps' must be a finite number"),
    ("rope_theta", float("inf"), "'rope_theta' must be a finite number"),
    ("rope_theta", False, "'rope_theta' must be a finite number"),
    ("partial_rotary_factor", None, "'partial_rotary_factor' must be a finite number"),
    ("bos_token_id", "0", "'bos_token_id' must be an integer >= 0, got '0'"),
    ("eos_token_id", [0, "1"], "'eos_token_id' must be an integer >= 0, got '1'"),
    ("id2label", {"zero": "A"}, "'id2label' must have integer keys"),
    ("id2label", ["A", "B"], "'id2label' must be an object"),
    ("architectures", "StableLmForCausalLM", "'architectures' must look like"),
    ("torch_dtype", 16, "'torch_dtype' names the dtype the weights were saved in, a torch dtype's name .*got 16"),
    ("rope_scaling", "linear", "rope_scaling must be an object"),
    ("rope_parameters", [1], "rope_parameters must be an object"),
])
def test_wrong_types(key, value, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(**{key: value})


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "num_key_value_heads", "max_position_embeddings"])
@pytest.mark.parametrize("value", [0, -1, -2**63])
def test_zero_or_negative_sizes(key, value):
    with pytest.raises(ConfigError, match=f"config key '{key}' must be an integer >= 1, got {value}"):
        from_dict(**{key: value})


@pytest.mark.parametrize("overrides, match", [
    (dict(hidden_size=65), "hidden_size \\(65\\) must be divisible by num_attention_heads \\(4\\)"),
    (dict(num_key_value_heads=3), "num_attention_heads \\(4\\) must be divisible by num_key_value_heads \\(3\\)"),
    (dict(partial_rotary_factor=0.0), "partial_rotary_factor must be in \\(0, 1\\]"),
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor must be in \\(0, 1\\]"),
    (dict(partial_rotary_factor=0.2), "rotary dims .* = 3 must be even"),
    (dict(layer_norm_eps=0), "'layer_norm_eps' must be > 0"),
    (dict(hidden_dropout=-0.1), "'hidden_dropout' must be >= 0"),
    (dict(hidden_act="swiglu"), "hidden_act 'swiglu' is not supported; use one of silu"),
    (dict(hidden_act=["silu"]), "hidden_act \\['silu'\\] is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling type 'yarn' is not supported"),
    (dict(rope_scaling={"type": "longrope"}), "rope scaling type 'longrope' is not supported"),
    (dict(rope_scaling={"rope_type": "linear"}), "needs a number 'factor' from 1 to 3.4e\\+38, got None"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 0.5}), "needs a number 'factor' from 1 to 3.4e\\+38, got 0.5"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": "2"}), "needs a number 'factor' from 1 to 3.4e\\+38, got '2'"),
    (dict(hidden_size=16, partial_rotary_factor=0.5, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
     "dynamic rope scaling needs more than 2 rotary dims"),
    (dict(problem_type="ranking"), "problem_type 'ranking' is not one of"),
    (dict(model_type="llama"), "model_type is 'llama', not 'stablelm'"),
    (dict(model_type="gpt_neox"), "model_type is 'gpt_neox', not 'stablelm'"),
    (dict(model_type=None), "model_type is None"),
])
def test_invalid_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(**overrides)


PROBABILITIES = ("hidden_dropout", "attention_dropout", "classifier_dropout")
BAD_PROBABILITY = {"not a number": ("x", "must be a finite number"), "negative": (-0.5, "must be >= 0"),
                   "above 1": (1.5, "is a probability, from 0 to 1")}


@pytest.mark.parametrize("first", PROBABILITIES[:-1])
@pytest.mark.parametrize("first_bad", BAD_PROBABILITY)
@pytest.mark.parametrize("later_bad", BAD_PROBABILITY)
def test_a_config_with_several_bad_dropouts_names_the_first_key_whatever_each_fails(first, first_bad, later_bad):
    """validate() takes the keys in its order and runs all of one key's checks before the next key's: with two
    bad dropouts, the earlier key is named, whichever check each fails (a number above 1 in hidden_dropout was
    named after a string in attention_dropout when the type checks ran as one loop and the range as another)."""
    later = PROBABILITIES[PROBABILITIES.index(first) + 1]
    value, match = BAD_PROBABILITY[first_bad]
    with pytest.raises(ConfigError, match=f"^config key '{first}' {match}"):
        from_dict(**{first: value, later: BAD_PROBABILITY[later_bad][0]})


def test_missing_model_type():
    d = dict(TINY)
    del d["model_type"]
    with pytest.raises(ConfigError, match="no 'model_type'"):
        StableLmConfig.from_dict(d)


@pytest.mark.parametrize("value", [[], "text", 3, None])
def test_config_that_is_not_an_object(tmp_path, value):
    (tmp_path / "config.json").write_text(json.dumps(value))
    with pytest.raises(ConfigError, match="config.json: config must be a JSON object"):
        StableLmConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("content, match", [
    (b"{not json", "not valid JSON"), (b"\xff\xfe", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # RecursionError before the fix
])
def test_config_that_is_not_json(tmp_path, content, match):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        StableLmConfig.from_pretrained(tmp_path)


def test_config_path_that_is_a_directory(tmp_path):
    (tmp_path / "config.json").mkdir()  # IsADirectoryError escaped before the fix
    with pytest.raises(ConfigError, match="config.json: cannot read"):
        StableLmConfig.from_pretrained(tmp_path)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        StableLmConfig.from_pretrained(tmp_path)


def test_extra_keys_are_kept_and_written_back(tmp_path):
    config = from_dict(my_note="hello", quantization_config={"bits": 4})
    assert config.extra == {"my_note": "hello", "quantization_config": {"bits": 4}}
    config.save_pretrained(tmp_path)
    again = StableLmConfig.from_pretrained(tmp_path)
    assert again.extra == config.extra and again.to_dict() == config.to_dict()


def test_missing_size_keys_take_the_3b_defaults_and_then_fail_against_the_weights(tmp_path):
    """A config without hidden_size is valid (3b-4e1t defaults), but not for these weights: the
    checkpoint's header shapes say so before any tensor is read."""
    tiny_model().save_pretrained(tmp_path)
    config = json.load(open(tmp_path / "config.json"))
    del config["hidden_size"], config["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has shape \\(101, 64\\) in the checkpoint but the config implies "
                                              "\\(101, 2560\\)"):
        StableLmForCausalLM.from_pretrained(tmp_path)


# ---- rope scaling was silently dropped by from_dict (found while fuzzing configs) -----------------------

@pytest.mark.parametrize("form", [
    {"rope_scaling": {"type": "linear", "factor": 2.0}},                     # legacy config.json
    {"rope_scaling": {"rope_type": "linear", "factor": 2}},
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.25}},                    # transformers 5.x
])
def test_linear_rope_scaling_is_honoured(form):
    """Linear scaling by 2 at positions 2p equals no scaling at positions p (theta_i / 2 * 2p = theta_i p):
    a property that fails when the scaling is dropped."""
    scaled = StableLmConfig.from_dict({**TINY, **form})
    assert scaled.rope_type == "linear" and scaled.rope_scaling["factor"] == 2.0
    plain = tiny_model(seed=21)
    model = StableLmForCausalLM(scaled, plain.params)
    ids, pos = [[5, 9, 2, 7]], np.array([[0, 3, 7, 12]])
    np.testing.assert_allclose(model(ids, position_ids=2 * pos).logits, plain(ids, position_ids=pos).logits,
                               rtol=0, atol=1e-12)
    assert not np.allclose(model(ids).logits, plain(ids).logits)
    assert StableLmConfig.from_dict(scaled.to_dict()).rope_scaling == scaled.rope_scaling


# ---- class: a key that transformers spells two ways must get the same check in each spelling -------------------

@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
@pytest.mark.parametrize("value", [[1], "torch.float16", 16, "", "float 16", {"name": "bfloat16"}])
def test_both_spellings_of_the_weights_dtype_are_checked_alike(key, value):
    """Before: "dtype" (transformers 5's spelling) went unchecked into extra, and [1] was written back on save.
    What is not a name at all is refused ("torch.float16", with its module, is not what transformers reads)."""
    with pytest.raises(ConfigError, match=f"config key '{key}' names the dtype the weights were saved in, a torch "
                                          "dtype's name such as \"bfloat16\".*; got"):
        from_dict(**{key: value})


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
@pytest.mark.parametrize("value", ["bfloat16", "float32", "int8", "float8_e4m3fn"])
def test_a_torch_dtype_name_is_kept_in_either_spelling(key, value):
    """Any torch dtype's name loads, as in transformers (getattr(torch, name)): a quantised checkpoint's "int8" or
    "float8_e4m3fn" was a ConfigError here. The value is bookkeeping (the safetensors' dtypes are what is read)."""
    config = from_dict(**{key: value})
    assert getattr(config, key) == value and config.to_dict()[key] == value


@pytest.mark.parametrize("places, match", [
    # the same number in two places, one of them malformed: the malformed one was dropped unchecked
    (dict(rope_theta=10000.0, rope_parameters={"rope_type": "default", "rope_theta": "abc"}),
     "'rope_theta in rope_parameters' must be a finite number"),
    (dict(partial_rotary_factor=0.25, rope_parameters={"rope_type": "default", "partial_rotary_factor": None}),
     "'partial_rotary_factor in rope_parameters' must be a finite number"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0, "rope_theta": -1.0}),
     "'rope_theta in rope_scaling' must be > 0"),
    # two valid values that differ: transformers 5 took rope_parameters' 20000, we took the top-level 500
    (dict(rope_theta=500.0, rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
     r"gives rope_theta in more than one place, with different values \(500.0 at the top level, 20000.0 in "
     r"rope_parameters\)"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0, "rope_theta": 10000.0},
          rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0}),
     "gives rope_theta in more than one place"),
    # the scaling in both rope_scaling and rope_parameters: each is checked, and they must agree
    (dict(rope_scaling={"type": "linear", "factor": 2.0}, rope_parameters={"rope_type": "yarn", "factor": "x"}),
     "rope scaling type 'yarn' is not supported"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}, rope_parameters={"rope_type": "linear", "factor": 0.5}),
     "needs a number 'factor' from 1"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}, rope_parameters={"rope_type": "dynamic", "factor": 4.0}),
     "gives the rope scaling twice.*which disagree"),
    # "type" and "rope_type" inside one object
    (dict(rope_scaling={"type": "yarn", "rope_type": "linear", "factor": 2.0}),
     "rope_scaling gives its type twice, \"rope_type\": 'linear' and \"type\": 'yarn'"),
    (dict(rope_parameters={"type": "linear", "rope_type": "default"}), "rope_parameters gives its type twice"),
    # a factor with no scaling type was read as "no scaling"
    (dict(rope_scaling={"factor": 2.0}), "rope_scaling gives a scaling 'factor' \\(2.0\\) but its type is 'default'"),
    (dict(rope_parameters={"rope_type": "default", "factor": 4.0}), "rope_parameters gives a scaling 'factor'"),
])
def test_a_rope_value_spelled_in_several_places_is_checked_in_each_and_must_agree(places, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(**places)


@pytest.mark.parametrize("places", [
    dict(rope_theta=10000, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    dict(rope_scaling={"type": "linear", "factor": 2.0},
         rope_parameters={"rope_type": "linear", "factor": 2, "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
    dict(rope_scaling={"type": "linear", "rope_type": "linear", "factor": 2.0}, rope_theta=10000.0),
])
def test_agreeing_spellings_load(places):
    config = from_dict(**places)
    assert config.rope_theta == 10000.0 and config.partial_rotary_factor == 0.25


def test_round_trip_of_every_variant(variant):
    from conftest import VARIANTS

    config = tiny_config(**VARIANTS[variant], id2label={"0": "A", "1": "B", "2": "C"})
    assert config.num_labels == 3
    again = StableLmConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.to_dict() == config.to_dict()
    assert os.fspath(config.model_type) == "stablelm"


@pytest.mark.parametrize("key, value", [("hidden_dropout", np.float32(0.25)), ("attention_dropout", np.float64(0.5)),
                                        ("layer_norm_eps", np.float32(1e-5)), ("rope_theta", np.int64(10000)),
                                        ("initializer_range", np.float16(0.02))])
def test_numpy_numbers_are_taken_as_the_integer_keys_are_and_stored_as_floats(tmp_path, key, value):
    """A NumPy number for a float key is accepted (errors.is_number, the integer keys' rule) and stored as a
    Python float, so the config can be written as JSON; a NumPy bool is still refused."""
    cfg = tiny_config(**{key: value})
    assert type(getattr(cfg, key)) is float and getattr(cfg, key) == float(value)
    cfg.save_pretrained(tmp_path)
    assert getattr(StableLmConfig.from_pretrained(tmp_path), key) == float(value)
    with pytest.raises(ConfigError, match=rf"config key '{key}' must be a finite number"):
        tiny_config(**{key: np.True_})


@pytest.mark.parametrize("saved_as, torch_dtype", [(None, None), ("float32", "bfloat16"), ("bfloat16", None),
                                                   ("float16", "float16")])
def test_a_saved_config_names_the_dtype_of_the_weights_written(tmp_path, saved_as, torch_dtype):
    """config.json's "dtype" (and "torch_dtype" when the config has one) says what model.safetensors holds: the
    model's own dtype (float64 here) or the dtype= of save_pretrained; before, a config loaded with "dtype":
    "bfloat16" said so over float32 weights."""
    model = tiny_model(seed=3, dtype="float64")
    model.config = tiny_config(dtype="bfloat16", torch_dtype=torch_dtype)
    model.save_pretrained(tmp_path, dtype=saved_as)
    written = json.loads((tmp_path / "config.json").read_text())
    header, _, _ = checkpoint.read_header(str(tmp_path / "model.safetensors"))
    stored = header["model.embed_tokens.weight"][0].name
    assert written["dtype"] == stored == (saved_as or "float64")
    assert written.get("torch_dtype") == (None if torch_dtype is None else stored)
    assert model.config.dtype == "bfloat16"                                       # the model's own config unchanged


@pytest.mark.parametrize("key", ["bos_token_id", "eos_token_id", "pad_token_id"])
def test_a_token_id_set_to_none_reads_back_as_none(key):
    """to_dict dropped bos/eos ids set to None, and from_dict then read the default 0: a model without an EOS
    saved and loaded stopped at token 0. (Found by the forward's new check that a config reads back the same.)"""
    config = tiny_config(**{key: None})
    assert getattr(StableLmConfig.from_dict(json.loads(json.dumps(config.to_dict()))), key) is None
