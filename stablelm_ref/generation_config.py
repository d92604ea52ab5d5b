"""generate's defaults for one model, as transformers keeps them: model.generation_config.

    model.generation_config = GenerationConfig.from_pretrained(directory, config)   generation_config.json
                            | GenerationConfig.from_model_config(config)   no file: config.json's token ids
    generate(model, ids, temperature=0.9)   argument > generation config > transformers' default

A GenerationConfig holds the fields generate reads (GENERATION_DEFAULTS: bos/eos/pad token ids, eos a list
or one id; max_length, max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty); a field is
a value or None ("not set"). An argument given to generate wins; else the generation config's value; else
transformers' default (GENERATION_DEFAULTS). Other keys of the file (transformers_version, num_beams, ...)
are ignored, as fields generate does not use. save_pretrained writes the fields that are set, and no
"transformers_version": transformers 5 keeps that key as metadata only (GenerationConfig pops it; nothing it
loads or generates reads it), so transformers loads the file as it is
(tests/crosscheck/test_saved_generation_config_in_transformers.py).

The value rules generate applies to its arguments (VALUE_RULES, check_values, token_ids) live here too, so
that a generation_config.json is checked by exactly the rules its values meet in generate: a hostile file
(wrong types, out-of-vocabulary ids, NaN) is a CheckpointError naming the file, the key and the value.
generation.py imports them from here (generation.check_values is this check_values).
"""

from __future__ import annotations

import json
import os

import numpy as np

from . import bounded_io
from .errors import CheckpointError, GenerationError, check_flag, is_int, is_number

DEFAULT_MAX_LENGTH = 20  # transformers' model-agnostic default
DEFAULT_TOP_K = 50       # transformers' default when sampling


# ---- the value rules of generate's arguments ----------------------------------------------------

def token_ids(name, value, vocab_size, allow_list, source=""):
    """`source` (" (config.json)") says where a default came from, for the message."""
    if value is None:
        return None
    values = list(value) if allow_list and isinstance(value, (list, tuple, np.ndarray)) else [value]
    if not values or not all(is_int(v) for v in values):
        kind = "an integer token id" + (" or a list of them" if allow_list else "")
        raise GenerationError(f"{name}{source} must be {kind}, got {value!r}")
    for v in values:
        if not 0 <= int(v) < vocab_size:
            raise GenerationError(f"{name}{source} {int(v)} is outside the vocabulary [0, {vocab_size})"
                                  + ("; fix the model's files or pass " + name + "=" if source else ""))
    return [int(v) for v in values]


# The value rules of generate's length and sampling arguments, in one place: generate checks its arguments
# with them, the CLI its options (before the model loads), each naming the offender in its own words.
VALUE_RULES = {                    # name -> (is the value acceptable, what the name must be)
    "max_new_tokens": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "max_length": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "top_k": (lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 turns it off)"),
    "top_p": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "repetition_penalty": (lambda v: is_number(v) and v > 0, "a number > 0 (1.0 turns it off)"),
    "seed": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
}


def check_values(values, names=None, greedy="for greedy decoding use do_sample=False"):
    """GenerationError for the first of values ({argument: value}; None is "not given") that breaks its rule
    in VALUE_RULES, naming it through names ({"top_k": "--top-k"} for the CLI; Python's own names by default)
    and, when the temperature is the offender, saying how to decode greedily (`greedy`)."""
    for key, value in values.items():
        ok, rule = VALUE_RULES[key]
        if value is not None and not ok(value):
            hint = f" ({greedy})" if key == "temperature" else ""
            raise GenerationError(f"{(names or {}).get(key, key)} must be {rule}, got {value!r}{hint}")


# ---- the generation config: generate's defaults, from generation_config.json ---------------------

GENERATION_CONFIG_NAME = "generation_config.json"
MAX_GENERATION_CONFIG_BYTES = 1024 * 1024   # generation_config.json (real: ~200 bytes)
# The fields generate reads, each with transformers' default: the value used when neither the argument nor
# the generation config sets it (the token ids have none: None means "no such token").
GENERATION_DEFAULTS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None,
                           max_length=DEFAULT_MAX_LENGTH, max_new_tokens=None, do_sample=False, temperature=1.0,
                           top_k=DEFAULT_TOP_K, top_p=1.0, repetition_penalty=1.0)


class GenerationConfig:
    """generate's defaults for one model (model.generation_config), as transformers' GenerationConfig holds
    them: each field is a value, or None for "not set" (generate then uses GENERATION_DEFAULTS).

    Read from the model directory's generation_config.json when there is one (only the fields above are
    kept: other keys, such as transformers_version or num_beams, are ignored, as fields generate does not
    use), else derived from config.json's bos/eos/pad token ids (transformers' from_model_config). Values
    are checked where they enter, with generate's own rules (check_values, token_ids): a hostile file is a
    CheckpointError naming the file, the key and the value."""

    def __init__(self, **fields):
        self.source = "model.generation_config"   # where a value generate refuses came from, for its message
        unknown = sorted(set(fields) - set(GENERATION_DEFAULTS))
        if unknown:
            raise GenerationError(f"GenerationConfig has no field {unknown[0]!r}; fields: "
                                  f"{', '.join(GENERATION_DEFAULTS)}")
        for name in GENERATION_DEFAULTS:
            setattr(self, name, fields.get(name))

    @classmethod
    def from_model_config(cls, config):
        """The token ids of config.json (a StableLmConfig), nothing else set."""
        gc = cls(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                 pad_token_id=config.pad_token_id)
        gc.source = "the model's config.json"     # not checked against the vocabulary here: generate does
        return gc

    @classmethod
    def from_dict(cls, d, vocab_size, where=GENERATION_CONFIG_NAME):
        """The known fields of d (a generation_config.json's object), checked; GenerationError naming `where`."""
        if not isinstance(d, dict):
            raise GenerationError(f"{where} must hold a JSON object, got {type(d).__name__}")
        fields = {k: v for k, v in d.items() if k in GENERATION_DEFAULTS}
        config = cls(**fields)
        try:
            config.check(vocab_size, json=True)
        except GenerationError as e:
            raise GenerationError(f"{where}: {e}") from None
        return config

    @classmethod
    def from_pretrained(cls, directory, model_config):
        """The directory's generation_config.json (bounded read; its token ids checked against the model
        config's vocabulary), or from_model_config(model_config) when the directory has none. CheckpointError
        for a file that is not valid."""
        path = os.path.join(os.fspath(directory), GENERATION_CONFIG_NAME)
        if not os.path.lexists(path):
            return cls.from_model_config(model_config)
        d = bounded_io.read_json(path, MAX_GENERATION_CONFIG_BYTES, CheckpointError, directory)
        try:
            return cls.from_dict(d, model_config.vocab_size, path)
        except GenerationError as e:
            raise CheckpointError(f"{e}; fix or remove the file") from None

    def check(self, vocab_size=None, json=False):
        """GenerationError for a field generate would refuse, naming the field and its value (the token ids
        only with a vocab_size: generate checks the eos / pad ids it uses itself, naming where they came from;
        json: the fields were read from generation_config.json, so a flag's message spells JSON's true/false)."""
        if self.do_sample is not None:
            check_flag(self.do_sample, "do_sample", GenerationError, json=json)
        check_values({k: getattr(self, k) for k in ("max_new_tokens", "max_length", "temperature", "top_k", "top_p",
                                                    "repetition_penalty")}, greedy="for greedy decoding set "
                                                                                   "do_sample to false")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id") if vocab_size is not None else ():
            token_ids(name, getattr(self, name), vocab_size, allow_list=name == "eos_token_id")

    def to_dict(self):
        """The fields that are set, as generation_config.json holds them (transformers' diff form): plain JSON
        values, also for a field set to a NumPy scalar or array (np.True_, np.int64(32), np.array([0, 2]))."""
        return {k: _json_value(getattr(self, k)) for k in GENERATION_DEFAULTS if getattr(self, k) is not None}

    def save_pretrained(self, directory, group=None):
        """Write generation_config.json atomically (`group`: see checkpoint.atomic_group)."""
        from .checkpoint import atomic_write, make_directory

        make_directory(directory)
        path = os.path.join(directory, GENERATION_CONFIG_NAME)
        atomic_write(path, (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode(), group)
        return path

    def __eq__(self, other):
        return isinstance(other, GenerationConfig) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"GenerationConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


def _json_value(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return [_json_value(v) for v in value] if isinstance(value, (list, tuple)) else value


def generation_config_of(model):
    """The model's generation config (a fast form's: its reference model's), or one from its config."""
    for m in (model, getattr(model, "model", None)):
        gc = getattr(m, "generation_config", None)
        if isinstance(gc, GenerationConfig):
            return gc
        if gc is not None:
            raise GenerationError("model.generation_config must be a GenerationConfig (stablelm_ref.generation_config"
                                  f"), got {type(gc).__name__}; set its fields instead, e.g. "
                                  "model.generation_config.max_new_tokens = 32")
    return GenerationConfig.from_model_config(model.config)
