"""Class: model state edited after loading is re-checked on every reference forward, not only on save.

model.params and model.config are plain attributes a user may edit. Before, an edit that broke their agreement
surfaced deep inside NumPy (an IndexError from fromnumeric.py for an embedding cut to 3 rows, a matmul's core
dimension for a cut projection) or, with an lm_head of other rows, as logits of the wrong width; save_pretrained
already refused the same edits. Now every reference forward names the tensor and both shapes (CheckpointError).
"""

import numpy as np
import pytest

from stablelm_ref import StableLmForCausalLM, StableLmForSequenceClassification, StableLmForTokenClassification
from stablelm_ref.errors import CheckpointError

from conftest import tiny_model

IDS = [[3, 1, 4, 1, 5]]


def cut(name, rows):
    return lambda m: m.params.__setitem__(name, m.params[name][:rows])


EDITS = {
    "embedding cut to 3 rows": (cut("model.embed_tokens.weight", 3),
                                r"tensor 'model.embed_tokens.weight' has shape \(3, 64\)"),
    "lm_head of other rows": (cut("lm_head.weight", 100), r"tensor 'lm_head.weight' has shape \(100, 64\)"),
    "a projection cut": (cut("model.layers.1.mlp.up_proj.weight", 5),
                         r"tensor 'model.layers.1.mlp.up_proj.weight' has shape"),
    "a tensor removed": (lambda m: m.params.pop("model.norm.bias"),
                         "tensor 'model.norm.bias' is missing from the model"),
    "a layer more in the config": (lambda m: setattr(m.config, "num_hidden_layers", 3),   # refused by the count
                                   r"model.config implies at least 36 tensors \(num_hidden_layers=3, 11 per "
                                   r"layer\) but model.params holds 26"),
    "a smaller vocabulary in the config": (lambda m: setattr(m.config, "vocab_size", 64),
                                           r"tensor 'model.embed_tokens.weight' has shape \(\d+, 64\) but the config "
                                           r"implies \(64, 64\)"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edit_that_breaks_params_against_config_is_named_by_the_forward(edit):
    change, match = EDITS[edit]
    model = tiny_model(seed=5)
    before = model(IDS).logits
    change(model)
    with pytest.raises(CheckpointError, match=f"model.params no longer match model.config: {match}"):
        model(IDS)
    with pytest.raises(CheckpointError, match="no longer match"):
        model.generate(IDS, max_new_tokens=2, engine="reference")
    with pytest.raises(CheckpointError, match=f"no longer match model.config: {match}"):
        model.fast()                                                # the fast form is built from the params
    fresh = tiny_model(seed=5)
    np.testing.assert_array_equal(fresh(IDS).logits, before)       # the check itself changes no number


@pytest.mark.parametrize("cls", [StableLmForSequenceClassification, StableLmForTokenClassification])
def test_the_classifiers_check_their_score_head(cls):
    model = tiny_model(seed=5, cls=cls, pad_token_id=0)
    model.params["score.weight"] = model.params["score.weight"][:1]
    with pytest.raises(CheckpointError, match=r"'score.weight' has shape \(1, 64\)"):
        model(IDS)


def test_edits_that_keep_the_shapes_are_the_users_business(tmp_path):
    """Values may change freely (that is what the tracing docs' perturbation does), a tied config may keep an
    lm_head copy, and tensors the model does not read may be there (a bare StableLmModel over a causal LM's
    params, as walkthrough 11 builds it): none is refused by the forward (the save refuses the unused ones, which
    from_pretrained would refuse)."""
    from stablelm_ref import StableLmModel
    model = tiny_model(seed=5)
    model.params["model.layers.0.self_attn.v_proj.weight"][3, 7] += 0.05
    model.params["model.norm.weight"] = model.params["model.norm.weight"] * 2
    assert np.isfinite(model(IDS).logits).all()
    tied = tiny_model(seed=5, tie_word_embeddings=True)
    tied.params["lm_head.weight"] = tied.params["model.embed_tokens.weight"].copy()
    assert np.isfinite(tied(IDS).logits).all()
    assert isinstance(tied, StableLmForCausalLM)
    model.params["model.extra"] = np.ones(3)
    assert np.isfinite(model(IDS).logits).all()
    with pytest.raises(CheckpointError, match="cannot save: tensor 'model.extra' is not implied by the config"):
        model.save_pretrained(tmp_path / "out")
    base = StableLmModel(model.config, model.params)
    np.testing.assert_array_equal(base(IDS).last_hidden_state, model(IDS, output_hidden_states=True).hidden_states[-1])


CONFIG_EDITS = {
    "a negative layer_norm_eps (NaN logits before)": (dict(layer_norm_eps=-1.0), "'layer_norm_eps' must be > 0"),
    "rope_scaling in its legacy spelling (a KeyError in rotary before)": (
        dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling = .* is not in the form the model reads"),
    "an unknown activation": (dict(hidden_act="gelu_42"), "hidden_act 'gelu_42' is not supported"),
    "id2label a list": (dict(id2label=["A", "B"]), "cannot be written as config.json"),
}


@pytest.mark.parametrize("edit", sorted(CONFIG_EDITS))
def test_a_config_edited_into_values_the_model_cannot_use_is_refused_by_forward_and_save(tmp_path, edit):
    """The same class for model.config's values: the forward gave NaN logits or failed inside rotary, and the save
    wrote a config.json that from_pretrained then refused. Now both name the key (the forward re-checks the
    config only when one of its fields changed)."""
    from stablelm_ref.errors import ConfigError

    changes, match = CONFIG_EDITS[edit]
    model = tiny_model(seed=5)
    model(IDS)
    for key, value in changes.items():
        setattr(model.config, key, value)
    with pytest.raises(ConfigError, match=f"model.config: .*{match}"):
        model(IDS)
    with pytest.raises(CheckpointError, match=f"cannot save: model.config: .*{match}.*Nothing was written"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_in_place_edit_of_a_config_dict_is_seen_too():
    model = tiny_model(seed=5, rope_scaling={"rope_type": "linear", "factor": 2.0})
    model(IDS)
    model.config.rope_scaling["factor"] = -3.0                    # the same dict object, changed in place
    from stablelm_ref.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a number 'factor' from 1"):
        model(IDS)


@pytest.mark.parametrize("layers", [10**5, 10**9])
def test_a_config_edited_to_absurdly_many_layers_is_refused_from_the_count(tmp_path, layers):
    """The check of params against config built every name the config implies before comparing: 8-12 s for the
    tiny model edited to 10**5 layers (then "tensor ... missing"), a forward or a save that never ended for 10**9.
    checkpoint.expected_shapes' limit (the number of tensors model.params holds) refuses it from a count, before
    a name is built: the message names that count, and every call returns. The per-layer count here comes from
    the names of a 1- and a 2-layer config, not from the closed form under test."""
    import dataclasses

    from stablelm_ref import checkpoint

    model = tiny_model(seed=5)
    before = model(IDS).logits
    names = [len(checkpoint.expected_shapes(dataclasses.replace(model.config, num_hidden_layers=n))) for n in (1, 2)]
    per_layer = names[1] - names[0]
    bound = names[0] - per_layer - 1 + layers * per_layer          # without the lm_head: "at least"
    held = len(model.params)
    model.config.num_hidden_layers = layers
    match = (f"model.config implies at least {bound} tensors \\(num_hidden_layers={layers}, {per_layer} per layer\\)"
             f" but model.params holds {held}")
    with pytest.raises(CheckpointError, match=f"model.params no longer match model.config: {match}"):
        model(IDS)
    for engine in ("reference", "fast"):   # the params check answers before generate's memory guard for the cache
        with pytest.raises(CheckpointError, match=f"model.params no longer match model.config: {match}"):
            model.generate(IDS, max_new_tokens=2, engine=engine)
    with pytest.raises(CheckpointError, match=f"cannot save: {match}"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model.config.num_hidden_layers = 2                              # the refusal is not remembered
    np.testing.assert_array_equal(model(IDS).logits, before)


def test_tensors_of_no_layer_of_the_config_are_unused_as_transformers_leaves_them():
    """A config edited to fewer layers than params hold, or a stray `model.layers.extra`, passes the forward's
    check (tensors the model does not read are allowed), then failed in layer_tensors with an IndexError or a
    ValueError. The forward now reads the layers the config names: the truth is a model built with one layer
    from the same first-layer tensors."""
    from dataclasses import replace
    model = tiny_model(seed=5)
    one = StableLmForCausalLM(replace(model.config, num_hidden_layers=1),
                              {k: v for k, v in model.params.items() if not k.startswith("model.layers.1.")})
    model.config.num_hidden_layers = 1
    model.params["model.layers.extra"] = np.ones(3)
    np.testing.assert_array_equal(model(IDS).logits, one(IDS).logits)


@pytest.mark.parametrize("bad", [None, [1, 2], "weights.safetensors"])
def test_params_that_are_not_a_mapping_are_refused_where_they_are_given(bad):
    """model.params and the constructor's params are a dict of tensors by checkpoint name (the model keeps a dict
    of its own of them): anything else failed inside dict() ('NoneType' object is not iterable, "dictionary update
    sequence element #0 has length 1"), or a string was taken for a sequence of pairs. Now both name it."""
    model = tiny_model(seed=1)
    with pytest.raises(CheckpointError, match=f"params must be a dict of tensors by checkpoint name, got "
                                              f"{type(bad).__name__}"):
        model.params = bad
    with pytest.raises(CheckpointError, match="params must be a dict"):
        StableLmForCausalLM(model.config, bad)
    assert np.isfinite(model(IDS).logits).all()


@pytest.mark.parametrize("params", [{}, {"model.embed_tokens.weight": [[0.5, 1.0]]}])
def test_params_without_an_embedding_array_are_refused_by_the_constructor_by_name(params):
    """The constructor reads the model's dtype off params' embedding: a dict without one failed with a bare
    KeyError: 'model.embed_tokens.weight', and one holding a list with "'list' object has no attribute 'dtype'".
    Both now name the tensor and what to give (CheckpointError, as for params that are not a mapping)."""
    with pytest.raises(CheckpointError, match="'model.embed_tokens.weight'.*give every tensor"):
        StableLmForCausalLM(tiny_model(seed=1).config, params)
