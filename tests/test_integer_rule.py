"""One rule for every integer the package takes (errors.is_int / check_int): Python's int or a NumPy integer,
never a bool (Python's True or NumPy's np.True_), a float holding an integer, or a string of digits. Each entry
point (config.json's sizes and token ids, a generation config, generate's arguments, a KV cache, from_config's
seed) agrees, and a refusal says "must be an integer" and shows the value given."""

import json
import re

import numpy as np
import pytest

from conftest import TINY, tiny_config, tiny_model
from stablelm_ref import StableLmConfig, StableLmForCausalLM
from stablelm_ref.errors import StableLmError, check_int, is_int
from stablelm_ref.generation import generate
from stablelm_ref.generation_config import GenerationConfig
from stablelm_ref.kv_cache import KVCache

# an integer-looking value in the forms a caller might pass it: (value, whether it is an integer)
FORMS = {"int": (3, True), "np.int64": (np.int64(3), True), "np.uint8": (np.uint8(3), True),
         "True": (True, False), "np.True_": (np.True_, False), "2.0": (2.0, False),
         "np.float64(3)": (np.float64(3), False), "'3'": ("3", False)}


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3, dtype="float32", max_position_embeddings=512)


def _config_json(v):
    config = StableLmConfig.from_dict({**TINY, "num_hidden_layers": v, "bos_token_id": v, "eos_token_id": [1, v]})
    json.dumps(config.to_dict())                           # stored as int: config.json can be written
    got = config.num_hidden_layers, config.bos_token_id, config.eos_token_id[1]
    assert all(type(x) is int for x in got)
    return got


ENTRY_POINTS = {
    "config.json sizes and token ids": _config_json,
    "GenerationConfig lengths": lambda m, v: GenerationConfig(max_new_tokens=v, max_length=v, top_k=v).check(),
    "GenerationConfig token ids": lambda m, v: GenerationConfig(eos_token_id=v, pad_token_id=v).check(101),
    "generate lengths": lambda m, v: generate(m, [[1, 2]], max_new_tokens=v).shape,
    "generate max_length": lambda m, v: generate(m, [[1, 2]], max_length=v).shape,
    "generate sampling": lambda m, v: generate(m, [[1, 2]], do_sample=True, top_k=v, seed=v, max_new_tokens=2),
    "generate token ids": lambda m, v: generate(m, [[1, 2]], eos_token_id=v, pad_token_id=v, max_new_tokens=2),
    "KVCache sizes": lambda m, v: KVCache(m.config, v, v, np.float32, np).keys[0].shape,
    "from_config seed": lambda m, v: StableLmForCausalLM.from_config(tiny_config(), seed=v).params,
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_takes_integers_and_only_integers(model, entry, form):
    value, integer = FORMS[form]
    call = ENTRY_POINTS[entry]
    run = (lambda v: call(v)) if entry.startswith("config") else (lambda v: call(model, v))
    assert is_int(value) is integer
    if integer:                                            # the same result as the plain int 3
        got, want = run(value), run(3)
        if isinstance(want, dict):
            assert all(np.array_equal(got[k], want[k]) for k in want)
        else:
            np.testing.assert_array_equal(np.asarray(got, dtype=object), np.asarray(want, dtype=object))
    else:
        with pytest.raises(StableLmError, match="must be an integer") as info:
            run(value)
        assert repr(value) in str(info.value)


@pytest.mark.parametrize("form", FORMS)
def test_check_int_gives_a_plain_int_or_one_message_form(form):
    value, integer = FORMS[form]
    if integer:
        got = check_int(value, "n", StableLmError, 1)
        assert got == 3 and type(got) is int
    else:
        with pytest.raises(StableLmError, match=rf"^n must be an integer >= 1, got {re.escape(repr(value))}$"):
            check_int(value, "n", StableLmError, 1)
    with pytest.raises(StableLmError, match=r"^n must be an integer >= 4 or None, got "):
        check_int(value, "n", StableLmError, 4, also=" or None")


@pytest.mark.parametrize("argument", ["max_new_tokens", "max_length"])
def test_a_numpy_length_is_counted_as_an_int_not_in_its_own_dtype(model, argument):
    """generate added the prompt's length to max_new_tokens=np.uint8(255) in uint8: 2 + 255 wrapped to 1."""
    out = generate(model, [[1, 2]], eos_token_id=None, **{argument: np.uint8(255)})
    assert out.shape == (1, 257 if argument == "max_new_tokens" else 255)


@pytest.mark.parametrize("name", ["temperature", "top_p", "repetition_penalty"])
def test_an_integer_too_large_for_a_float_is_not_a_number(name):
    """is_number: 10**400 as an argument raised OverflowError from float(), a traceback from generate and
    from_config; it is refused by name. (generation_config.json cannot hold one: bounded_io reads at most 100
    digits.)"""
    from stablelm_ref.errors import GenerationError, is_number

    assert not is_number(10**400) and is_number(10**300) and not is_number(float("nan"))
    with pytest.raises(GenerationError, match=f"^{name} must be a number"):
        GenerationConfig(**{name: 10**400}).check()
    with pytest.raises(GenerationError, match=f"^{name} must be a number"):
        generate(tiny_model(seed=3, dtype="float32"), [[1, 2]], do_sample=True, max_new_tokens=1, **{name: 10**400})
    with pytest.raises(StableLmError, match="std must be a finite number"):
        StableLmForCausalLM.from_config(tiny_config(), std=10**400)
