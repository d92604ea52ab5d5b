"""StableLmConfig: every key of a StableLM config.json, validated.

A StableLM checkpoint directory holds a `config.json`. Two forms exist in the wild:

    current (transformers >= 4.56 / 5.x):   "rope_parameters": {"rope_type": "default",
                                                                "rope_theta": 10000,
                                                                "partial_rotary_factor": 0.25}
    legacy (the published checkpoints):     "rope_theta": 10000, "partial_rotary_factor": 0.25,
                                            "rope_scaling": null | {"type": "linear", "factor": 2.0}

Both load into the same flat attributes (`rope_theta`, `partial_rotary_factor`, `rope_scaling`). A value
that config.json spells in more than one place (rope_theta at the top level and inside rope_parameters or
rope_scaling, the scaling in rope_scaling and in rope_parameters, "type" and "rope_type") is checked in every
place it appears, and the places must agree: transformers 5 reads rope_scaling before rope_parameters and
rope_parameters' rope_theta before the top-level one, older releases the other way round, so a config whose
spellings disagree means different models to different readers (ConfigError, naming both). "dtype" and its older
spelling "torch_dtype" (the dtype the weights were saved in, a torch dtype's name) are each checked but not
compared: they are bookkeeping (the safetensors' own dtypes are what is read, and save_pretrained writes the
dtype it wrote in "dtype", and in "torch_dtype" when the config has one).
Derived sizes:

    head_dim     = hidden_size // num_attention_heads          (80 in stablelm-3b-4e1t)
    rotary_ndims = int(head_dim * partial_rotary_factor)       (20 in stablelm-3b-4e1t)

Every invalid value raises ConfigError naming the key, the value and what to do; that includes values
that would overflow in use (floats beyond float32's range, a rope_theta or scaling factor whose
rotary frequencies overflow or vanish in float32). config.json is read through bounded_io (a regular
file of at most MAX_CONFIG_BYTES inside the model directory, JSON within bounds).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

from . import bounded_io
from .errors import ConfigError, check_int, is_number

# Activations the MLP implements (mlp.ACTIVATIONS); the names transformers' ACT2FN uses.
SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "tanh", "sigmoid")
# Rope scaling types transformers accepts for StableLM that this project implements.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic")
MAX_CONFIG_BYTES = 4 * 1024 * 1024  # config.json (real: ~1 KB; id2label of many classes: more)
FLOAT32_MAX = 3.4028234663852886e38
MAX_POSITIONS = 2**53  # positions beyond are not exact in float64 (model.py refuses larger position ids)
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


@dataclass
class StableLmConfig:
    """The configuration of a StableLM model (defaults: stabilityai/stablelm-3b-4e1t)."""

    vocab_size: int = 50304
    hidden_size: int = 2560
    intermediate_size: int = 6912
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    rope_scaling: dict | None = None  # None (default) or {"rope_type": "linear"|"dynamic", "factor": f}
    use_qkv_bias: bool = False
    qk_layernorm: bool = False
    use_parallel_residual: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = None
    # classification heads
    num_labels: int = 2
    problem_type: str | None = None
    id2label: dict | None = None
    label2id: dict | None = None
    classifier_dropout: float | None = None
    token_classification_bias: bool = True
    # bookkeeping carried through from config.json
    model_type: str = "stablelm"
    architectures: list | None = None
    dtype: str | None = None          # the weights' dtype as saved (transformers 5's key) ...
    torch_dtype: str | None = None    # ... and its older spelling; each, when present, a torch dtype's name
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.id2label is not None:
            self.id2label = _label_map(self.id2label)
            self.num_labels = len(self.id2label)
        self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first invalid key, in the order of the checks below (within the dropout
        keys, all of one key's checks run before the next key's, so several bad dropouts name the earlier key
        whichever check each fails). Stores NumPy integers and floats given for the number keys as plain int
        and float, so that the config can be written as JSON."""
        if self.model_type != "stablelm":
            raise ConfigError(
                f"model_type is {self.model_type!r}, not 'stablelm': this project implements StableLM only "
                "(stabilityai/stablelm-3b-4e1t, stablelm-2-1_6b, stablelm-2-12b, their zephyr variants)"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "num_labels"):
            setattr(self, key, _check_int(key, getattr(self, key), minimum=1))   # np.int64 -> int (JSON)
        if self.max_position_embeddings > MAX_POSITIONS:
            raise ConfigError(f"config key 'max_position_embeddings' must be at most {MAX_POSITIONS} (2**53, the "
                              f"largest position id used exactly), got {self.max_position_embeddings}")
        for key in ("use_cache", "tie_word_embeddings", "use_qkv_bias", "qk_layernorm",
                    "use_parallel_residual", "token_classification_bias"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"config key {key!r} must be true or false, got {getattr(self, key)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}): each head gets hidden_size / num_attention_heads dims"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"hidden_act {self.hidden_act!r} is not supported; use one of {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        self.layer_norm_eps = _check_float("layer_norm_eps", self.layer_norm_eps, positive=True)
        self.rope_theta = _check_float("rope_theta", self.rope_theta, positive=True)
        self.partial_rotary_factor = _check_float("partial_rotary_factor", self.partial_rotary_factor)
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        if self.rotary_ndims % 2 or self.rotary_ndims == 0:
            raise ConfigError(
                f"rotary dims = int(head_dim {self.head_dim} * partial_rotary_factor {self.partial_rotary_factor})"
                f" = {self.rotary_ndims} must be even and positive (rotate_half splits them in two halves)"
            )
        self.initializer_range = _check_float("initializer_range", self.initializer_range)
        for key in ("hidden_dropout", "attention_dropout", "classifier_dropout"):   # classifier's: None is "unset"
            if key != "classifier_dropout" or self.classifier_dropout is not None:
                setattr(self, key, _check_float(key, getattr(self, key), probability=True))
        if not isinstance(self.extra, dict):
            raise ConfigError(f"StableLmConfig's extra must be a dict of further config.json keys, got {self.extra!r}")
        for key in ("bos_token_id", "pad_token_id"):
            if getattr(self, key) is not None:
                setattr(self, key, _check_int(key, getattr(self, key), minimum=0))
        eos = self.eos_token_id
        ids = [None if v is None else _check_int("eos_token_id", v, minimum=0) for v in
               (eos if isinstance(eos, list) else [eos])]
        self.eos_token_id = ids if isinstance(eos, list) else ids[0]
        if self.rope_type == "dynamic" and self.rotary_ndims <= 2:
            raise ConfigError(f"dynamic rope scaling needs more than 2 rotary dims (its base exponent is d / (d - 2)),"
                              f" got {self.rotary_ndims}; use linear scaling or a larger partial_rotary_factor")
        self._check_rotary_numbers()
        for key, kind, example in (("architectures", list, '["StableLmForCausalLM"]'),
                                   ("label2id", dict, '{"NEGATIVE": 0}')):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), kind):
                raise ConfigError(f"config key {key!r} must look like {example}, got {getattr(self, key)!r}")
        for key in ("dtype", "torch_dtype"):             # the two spellings, one check; bookkeeping: the weights'
            value = getattr(self, key)                   # dtypes are read from the safetensors, save rewrites it
            if value is not None and not (isinstance(value, str) and value.isidentifier()):
                raise ConfigError(f"config key {key!r} names the dtype the weights were saved in, a torch dtype's "
                                  f"name such as \"bfloat16\" (transformers reads it as getattr(torch, name)); got "
                                  f"{value!r}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"problem_type {self.problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}")

    def _check_rotary_numbers(self):
        """rope_theta and the scaling factor must give rotary frequencies that are finite and non-zero in
        float32 (the tables' dtype outside float64 mode), with finite angles up to twice the context (the
        dynamic base is evaluated there): values that overflow in use are refused here, by key."""
        import numpy as np

        from .rotary import inverse_frequencies

        span = np.float32(2 * self.max_position_embeddings)
        for key, scaled in (("rope_theta", False), ("rope scaling 'factor'", True)):
            if scaled and self.rope_scaling is None:
                continue
            config = self if scaled else SimpleNamespace(
                rotary_ndims=self.rotary_ndims, rope_theta=self.rope_theta, rope_scaling=None, rope_type="default",
                max_position_embeddings=self.max_position_embeddings)
            try:
                with np.errstate(all="ignore"):
                    inv = inverse_frequencies(config, np, np.float32, seq_len=int(span))   # [d/2] float32
                    ok = bool(np.isfinite(inv).all() and (inv >= np.finfo(np.float32).tiny).all()
                              and np.isfinite(span * inv).all())
            except (OverflowError, ZeroDivisionError):                     # the dynamic base, in Python floats
                ok = False
            if not ok:
                value = self.rope_theta if not scaled else self.rope_scaling["factor"]
                raise ConfigError(f"config key {key} = {value!r} makes the rotary frequencies overflow or vanish in "
                                  "float32 (theta_i = rope_theta ** (-2i/d), scaled); use a value like 10000 for "
                                  "rope_theta and a factor of a few")

    # ---- reading and writing -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "StableLmConfig":
        """Build from a config.json dictionary in either the current or the legacy form."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        if "model_type" not in d:
            raise ConfigError("config.json has no 'model_type'; a StableLM config says \"model_type\": \"stablelm\"")
        rope = d.pop("rope_parameters", None)
        scaling = d.pop("rope_scaling", None)
        if rope is not None and not isinstance(rope, dict):
            raise ConfigError(f"rope_parameters must be an object, got {rope!r}")
        if scaling is not None and not isinstance(scaling, dict):
            raise ConfigError(f"rope_scaling must be an object like {{'rope_type': 'linear', 'factor': 2.0}}, "
                              f"got {scaling!r}")
        for key, positive in (("rope_theta", True), ("partial_rotary_factor", False)):   # 1, 2 or 3 places
            places = {where: _check_float(f"{key} {where}" if where != "at the top level" else key, source[key],
                                          positive=positive)
                      for where, source in (("at the top level", d), ("in rope_parameters", rope),
                                            ("in rope_scaling", scaling))
                      if source is not None and key in source}
            if len(set(places.values())) > 1:
                raise ConfigError(f"config.json gives {key} in more than one place, with different values ("
                                  + ", ".join(f"{v!r} {w}" for w, v in places.items()) + "): transformers 5 "
                                  "and earlier releases read different ones; keep one")
            if places:
                d[key] = next(iter(places.values()))
        if rope is not None and scaling is not None:
            ours, theirs = _normalise_rope_scaling(scaling), _normalise_rope_scaling(rope, "rope_parameters")
            if ours != theirs:
                raise ConfigError(f"config.json gives the rope scaling twice, rope_scaling {scaling!r} and "
                                  f"rope_parameters {rope!r}, which disagree (transformers 5 uses rope_scaling's); "
                                  "keep one")
        elif rope is not None:
            scaling = rope
            _normalise_rope_scaling(rope, "rope_parameters")
        d["rope_scaling"] = scaling
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["rope_scaling"] = scaling
        kwargs["extra"] = {k: v for k, v in d.items() if k not in known}
        try:
            return cls(**kwargs)
        except TypeError as e:  # pragma: no cover - dataclass signature errors
            raise ConfigError(f"invalid config: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, root=None) -> "StableLmConfig":
        """Read a config.json: a regular file of at most MAX_CONFIG_BYTES (inside `root` when given),
        parsed with bounded_io's bounds."""
        path = os.fspath(path)
        if not os.path.lexists(path):
            raise ConfigError(f"{path}: no such file; a model directory needs a config.json")
        d = bounded_io.read_json(path, MAX_CONFIG_BYTES, ConfigError, root)
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **hub_kwargs) -> "StableLmConfig":
        """Read `config.json` from the path of the file itself, or from a model named as the models'
        from_pretrained accepts it (a directory, a Hub repo id, "stablelm-ref:default"; hub.model_directory),
        where it must lie inside the model directory (bounded_io)."""
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"give a model directory, a Hub repo id or the path of a config.json, got {path!r}")
        path = os.fspath(path)
        if os.path.isfile(path):
            return cls.from_json_file(path)
        from . import hub

        directory = hub.model_directory(path, error=ConfigError, **hub_kwargs)
        return cls.from_json_file(os.path.join(directory, "config.json"), root=directory)

    def to_dict(self) -> dict:
        """The current (transformers 5.x) config.json form, which transformers loads."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor}
        if self.rope_scaling is not None:
            rope.update({k: v for k, v in self.rope_scaling.items() if k != "rope_type"})
        for key in ("rope_theta", "partial_rotary_factor", "rope_scaling"):
            d.pop(key)
        d["rope_parameters"] = rope
        if d["id2label"] is not None:
            d["id2label"] = {str(k): v for k, v in d["id2label"].items()}
        # None is written where it differs from the default (bos/eos: 0), so that it reads back as None
        d = {k: v for k, v in d.items() if v is not None or k in ("pad_token_id", "bos_token_id", "eos_token_id")}
        d["architectures"] = self.architectures or ["StableLmForCausalLM"]
        return d

    def save_pretrained(self, directory: str | os.PathLike, group=None) -> str:
        """Write config.json atomically (`group`: see checkpoint.atomic_group)."""
        from .checkpoint import atomic_write, make_directory

        make_directory(directory)
        path = os.path.join(directory, "config.json")
        atomic_write(path, (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode(), group)
        return path


def edit_problem(config):
    """Why a StableLmConfig edited after it was built (model.config.layer_norm_eps = -1) would not load back, or
    is not in the form the model reads (a rope_scaling written {"type": "linear", ...}), in words; None when it
    is fine. The check: config.json written from it and read again must succeed and give the same values."""
    try:
        scaling = _normalise_rope_scaling(config.rope_scaling)
        if scaling != config.rope_scaling:
            return f"rope_scaling = {config.rope_scaling!r} is not in the form the model reads ({scaling!r})"
        written = config.to_dict()
    except ConfigError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - a field edited into something to_dict cannot write (id2label a list)
        return f"it cannot be written as config.json ({type(e).__name__}: {e}); a field holds a value of the wrong type"
    try:
        again = StableLmConfig.from_dict(written)
    except ConfigError as e:
        return str(e)
    for f in dataclasses.fields(config):
        if f.name not in ("architectures", "extra", "dtype", "torch_dtype") and \
                getattr(again, f.name) != getattr(config, f.name):
            return (f"{f.name} = {getattr(config, f.name)!r} is not in the form the model reads (read back from "
                    f"config.json it is {getattr(again, f.name)!r})")
    return None


def _normalise_rope_scaling(scaling, key="rope_scaling"):
    """None, or {"rope_type": "linear"|"dynamic", "factor": float>=1, ...}, from config.json's `key` (rope_scaling or
    rope_parameters: their rope_theta and partial_rotary_factor are read by from_dict). The type may be spelled
    "rope_type" or "type" (older); both, when present, must agree."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"{key} must be an object like {{'rope_type': 'linear', 'factor': 2.0}}, got {scaling!r}")
    scaling = dict(scaling)
    if "rope_type" in scaling and "type" in scaling and scaling["rope_type"] != scaling["type"]:
        raise ConfigError(f"{key} gives its type twice, \"rope_type\": {scaling['rope_type']!r} and \"type\": "
                          f"{scaling['type']!r}; keep one (\"type\" is the older spelling)")
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    scaling.pop("partial_rotary_factor", None)
    if rope_type == "default":
        if "factor" in scaling:           # present but meaningless: not read as absent, silently
            raise ConfigError(f"{key} gives a scaling 'factor' ({scaling['factor']!r}) but its type is 'default' (or "
                              "not given), which has no factor: set \"rope_type\": \"linear\" or \"dynamic\", or "
                              "remove it")
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope scaling type {rope_type!r} is not supported; use one of {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    factor = scaling.get("factor")
    if not is_number(factor) or not 1.0 <= factor <= FLOAT32_MAX:
        raise ConfigError(f"rope scaling {rope_type!r} needs a number 'factor' from 1 to {FLOAT32_MAX:.3g}, got "
                          f"{factor!r}")
    scaling["factor"] = float(factor)
    return {"rope_type": rope_type, **scaling}


def _label_map(id2label):
    """{"0": "NEGATIVE", ...} -> {0: "NEGATIVE", ...}: keys must be integers, written as strings in JSON."""
    if not isinstance(id2label, dict):
        raise ConfigError(f"config key 'id2label' must be an object like {{\"0\": \"NEGATIVE\"}}, got {id2label!r}")
    try:
        return {int(k): v for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"config key 'id2label' must have integer keys, got {list(id2label)!r}") from None


def _check_int(key, value, minimum):
    """int(value) (errors.check_int: np.int64 too, not a bool), naming the config key."""
    return check_int(value, f"config key {key!r}", ConfigError, minimum)


def _check_float(key, value, positive=False, probability=False):
    """value, a finite number (errors.is_number: a NumPy number too, returned as a Python float) that float32 (the
    default compute dtype) also holds (> 0 if positive, else >= 0; at most 1 if a probability)."""
    if not is_number(value) or not abs(float(value)) <= FLOAT32_MAX:    # float(): np.float16 vs 3.4e38 overflowed
        raise ConfigError(f"config key {key!r} must be a finite number (within float32's range), got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"config key {key!r} must be > 0, got {value!r}")
    if not positive and value < 0:
        raise ConfigError(f"config key {key!r} must be >= 0, got {value!r}")
    if probability and value > 1:
        raise ConfigError(f"config key {key!r} is a probability, from 0 to 1; got {value!r}")
    return value if type(value) in (int, float) else float(value)
