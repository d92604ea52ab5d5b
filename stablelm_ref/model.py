"""The StableLM transformer: embeddings -> decoder layers -> final LayerNorm (StableLmModel).

    x_0 = embed_tokens[input_ids]                                  [B, T] -> [B, T, hidden]
    x_l = decoder_layer_l(x_{l-1}, cos, sin, attention_mask)       l = 1 .. num_hidden_layers
    h   = LayerNorm(x_L)                                           model.norm

Positions default to 0..T-1 after the cached length (padding ignored, as in transformers); pass
position_ids = cumsum(attention_mask) - 1 to make left-padded rows equal unpadded ones (generate
does). Attention combines causality with the attention mask's padding (attention.py).
Each layer gets its own tensors (names after `model.layers.{i}.`), and a trace callback scoped to them.

This file also holds what every model class shares: `from_pretrained` / `save_pretrained`, input
checking (ids, masks, positions, and the memory guard: a forward whose attention scores, activations
or new cache cannot fit in free memory is refused before anything is allocated), the check of
model.params against model.config that every reference forward and every save makes (names and
shapes: an edit after loading is named, not an IndexError deep in NumPy), and the output record.
The heads (causal LM, sequence and token classification) are in heads.py.

Config: vocab_size, hidden_size, num_hidden_layers, max_position_embeddings, layer_norm_eps.
Checkpoint tensors: model.embed_tokens.weight, model.norm.{weight,bias}, model.layers.*.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from . import checkpoint, hub
from ._xp import host_array, no_trace, refuse_masked, scoped, to_host
from .config import MAX_POSITIONS, StableLmConfig, edit_problem
from .decoder_layer import decoder_layer
from .errors import (CheckpointError, ConfigError, GenerationError, StableLmError, check_flag, check_int, is_int,
                     is_number)
from .generation_config import GENERATION_CONFIG_NAME, GenerationConfig
from .kv_cache import KVCache
from .layernorm import layer_norm
from .rotary import rotary_cos_sin

DTYPES = ("float64", "float32", "float16", "bfloat16")


@dataclass
class ModelOutput:
    """What a forward returns (transformers' field names); unused fields stay None."""

    logits: object = None
    loss: object = None
    past_key_values: KVCache | None = None
    hidden_states: tuple | None = None
    last_hidden_state: object = None

    def __getitem__(self, key):
        return getattr(self, key)


def _floating(dtype):
    """Whether `dtype` (an array's .dtype, or None) is a floating-point dtype NumPy knows (checkpoint.is_floating);
    False for anything np.dtype cannot read (a torch dtype, None). NumPy's float dtypes answer at once: the forward
    asks this of every tensor (~0.06 ms for the default model's 179 through is_floating alone, ~0.01 ms so)."""
    if getattr(dtype, "kind", None) == "f":
        return True
    try:
        return dtype is not None and checkpoint.is_floating(dtype)
    except TypeError:
        return False


def _dtype_problem(params, names):
    """Which of params[name] for `names` is not floating point, in words, or None: an int or bool tensor saved but
    did not load; object failed deep in NumPy; complex gave complex logits."""
    for name in names:
        dtype = getattr(params[name], "dtype", None)
        if not _floating(dtype):
            return (f"tensor {name!r} has dtype {dtype}; model weights must be floating point (float64, "
                    "float32, float16 or bfloat16): cast it back, e.g. .astype(np.float32)")
    return None


def array_module(device):
    """NumPy for device="cpu", CuPy for device="gpu" (imported only then)."""
    if device == "cpu":
        return np
    if device == "gpu":
        try:
            import cupy
        except ImportError:
            raise StableLmError("device='gpu' needs CuPy, on a machine with an NVIDIA GPU: in a checkout, "
                                ".venv/bin/pip install -e '.[gpu]' (after make install); where stablelm-ref is "
                                "installed as a package, pip install 'stablelm-ref[gpu]'") from None
        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception:
            raise StableLmError("device='gpu': CuPy finds no usable NVIDIA GPU; use device='cpu'") from None
        return cupy
    raise StableLmError(f"device must be 'cpu' or 'gpu', got {device!r}")


def resolve_dtype(dtype, device):
    if dtype is None:
        dtype = "bfloat16" if device == "gpu" else "float32"
    try:
        name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    except (TypeError, ValueError):
        name = None
    if name not in DTYPES:
        raise StableLmError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device == "cpu" and name in ("float16", "bfloat16"):
        raise StableLmError(f"dtype {name} is for the GPU: NumPy has no fast {name} matmul. On the CPU use "
                            "float32 (default) or float64; bfloat16 checkpoints are cast on load")
    return np.dtype(checkpoint.SAFETENSORS_DTYPES["BF16"]) if name == "bfloat16" else np.dtype(name)


class StableLmPreTrainedModel:
    """Holds a config and the parameters, by checkpoint name; loads and saves them.

    The model keeps a dict of its own of the tensors it is given, at construction or assigned (model.params = d), as
    copy.copy does: model.params is not the dict passed, so that two models given one dict
    (StableLmForCausalLM(config, other.params), m2.params = m1.params) do not see each other's fast form replace its
    entries (each form then took the other's build for an edit and built again, on every call). The tensors are the
    same objects: an edit in place reaches both until a fast form is built, which makes its own model's params views
    of its copies (fast_cpu.py, fast_gpu.py). The dict passed is left as it was: while the caller keeps it, it keeps
    the tensors it holds, beside a fast form's copies (StableLmForCausalLM(config, params) then .fast(): the fused
    weights are held twice, and the CPU form reads the lm_head transposed where it is, until `del params`)."""

    head = "base"

    def __init__(self, config: StableLmConfig, params: dict, device: str = "cpu"):
        self.config = config
        self.params = params
        self.device = device
        self.xp = array_module(device)
        self.dtype = getattr(self.params.get("model.embed_tokens.weight"), "dtype", None)   # the model's dtype
        if self.dtype is None:
            raise CheckpointError("params hold no array 'model.embed_tokens.weight' (the embedding, whose dtype is the "
                                  "model's): give every tensor the config implies, e.g. "
                                  "checkpoint.load_state_dict(directory), or another model's params")
        # generate's defaults (generation_config.GenerationConfig); from_pretrained replaces it with the directory's
        # generation_config.json when there is one
        self.generation_config = GenerationConfig.from_model_config(config)

    @property
    def params(self) -> dict:
        """The tensors by checkpoint name: a dict of the model's own (see the class). AttributeError, as for any
        attribute, on a model that has none yet (made by object.__new__): a KeyError broke hasattr and getattr."""
        try:
            return self.__dict__["params"]
        except KeyError:
            raise AttributeError(f"this {type(self).__name__} has no params yet (its __init__ sets them)") from None

    @params.setter
    def params(self, params):
        if not isinstance(params, Mapping):
            raise CheckpointError(f"params must be a dict of tensors by checkpoint name, got {type(params).__name__}; "
                                  "e.g. checkpoint.load_state_dict(directory), or another model's params")
        self.__dict__["params"] = dict(params)

    def __copy__(self):
        """copy.copy(model): the same attributes, but a params dict of its own (of the same tensors, so an edit in
        place of one reaches both until either builds a fast form; a tensor replaced in one is not seen by the
        other). A fast form makes its model's params views of its fused copies: two on one dict each saw the other's
        build as tensors replaced and rebuilt every fused copy on every call alternating between them."""
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.params = self.params                    # (a dict of its own: the setter)
        return twin

    def __getstate__(self):
        """pickle and copy.deepcopy carry a model without its array module (model.xp, a module: they failed with
        "cannot pickle 'module' object"; __setstate__ sets it again from model.device) and without its fast form
        (made again when asked: a copied form is the form of the copied model, fast_cpu.FastCpuModel.__reduce__)."""
        state = dict(self.__dict__)
        del state["xp"]
        state.pop("_fast", None)
        return state

    def __setstate__(self, state):
        """The state as __getstate__ left it, with a params dict of the model's own (the setter): a pickle of two
        models on one dict (made before a model kept its own) came back sharing it, and their fast forms rebuilt."""
        self.__dict__.update(state)
        self.params = state["params"]
        self.xp = array_module(self.device)

    # ---- loading and saving -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu", revision=None, cache_dir=None, **hub_kwargs):
        """Load a model directory, a Hugging Face Hub repo id (downloaded or taken from the cache), or
        "stablelm-ref:default" (stablelm_ref.DEFAULT_MODEL), the small model shipped inside the package.

        dtype: "float32" (CPU default), "float64" (golden work), or on the GPU "bfloat16" (default),
        "float16", "float32". Weights stored in any of float32/float16/bfloat16 are cast once on load.
        """
        if device not in ("cpu", "gpu"):
            raise StableLmError(f"device must be 'cpu' or 'gpu', got {device!r}")
        np_dtype = resolve_dtype(dtype, device)                            # argument errors before any file
        directory = hub.model_directory(path, revision=revision, cache_dir=cache_dir, **hub_kwargs)
        config = StableLmConfig.from_pretrained(directory)
        generation_config = GenerationConfig.from_pretrained(directory, config)  # or config's
        host_dtype = np_dtype if device == "cpu" else np.dtype(np.float32) if np_dtype.itemsize == 2 else np_dtype
        headers = {}                                                       # each file's header, parsed once
        files = checkpoint.checkpoint_files(directory, headers)            # {tensor name: file}, found once
        expected = checkpoint.expected_shapes(config, cls.head, limit=len(files), where=directory)  # bounded
        expected, ignore = _lm_head_rule(cls.head, expected, files)
        params = checkpoint.load_state_dict(directory, host_dtype, _with_prefix(files, expected), ignore, files,
                                            headers)
        params = _strip_or_add_prefix(params)
        if "lm_head.weight" in params and config.tie_word_embeddings:
            _check_tied_copy(params.pop("lm_head.weight"), params["model.embed_tokens.weight"], directory)
        if device != "cpu":
            xp = array_module(device)
            params = {k: xp.asarray(_narrowed(k, v, np_dtype, directory)) for k, v in params.items()}
        model = cls(config, params, device)
        model.generation_config = generation_config
        return model

    @classmethod
    def from_config(cls, config: StableLmConfig, seed=0, dtype="float32", std=None):
        """A model with random weights (normal(0, initializer_range); LayerNorm weight 1, biases 0)."""
        if not isinstance(config, StableLmConfig):
            raise StableLmError(f"from_config takes a StableLmConfig (StableLmConfig.from_dict(d) for a dict, "
                                f"StableLmConfig.from_pretrained(dir) for a model), got {type(config).__name__}")
        if seed is not None:
            check_int(seed, "seed", StableLmError, 0, also=" or None")
        if std is not None and not (is_number(std) and std >= 0):
            raise StableLmError(f"std must be a finite number >= 0 or None (config.initializer_range), got {std!r}")
        rng = np.random.default_rng(seed)
        std = config.initializer_range if std is None else std
        np_dtype = resolve_dtype(dtype, "cpu")
        from .bounded_io import check_memory

        c, item = config, np_dtype.itemsize                                # the guard, before building anything
        per_layer = 4 * c.hidden_size * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
        check_memory((2 * c.vocab_size * c.hidden_size + c.num_hidden_layers * per_layer) * item * 2,
                     f"random weights for this config ({c.num_hidden_layers} layers, hidden {c.hidden_size})",
                     StableLmError, "use a smaller config")
        params = {}
        for name, shape in checkpoint.expected_shapes(config, cls.head).items():
            if "layernorm" in name or name.startswith("model.norm"):
                value = np.ones(shape) if name.endswith("weight") else np.zeros(shape)
            elif name.endswith("bias"):
                value = np.zeros(shape)
            else:
                value = rng.normal(0.0, std, size=shape)
            params[name] = value.astype(np_dtype)
        return cls(config, params)

    def save_pretrained(self, directory, dtype=None):
        """Write config.json + generation_config.json + model.safetensors (names and layout transformers loads).

        What is written must load again: the tensors must be the ones the config implies (names and
        shapes) and finite in the dtype written (float16 holds at most 65504), and model.generation_config must
        pass generate's checks; otherwise CheckpointError names the tensor or field and nothing is written.
        config.json's "dtype" names the dtype written. generation_config.json holds the generation config's fields
        that are set (model.generation_config: the one loaded, or config.json's token ids). The files are written
        under temporary names and renamed together at the end, all or nothing (checkpoint.atomic_group): a failed
        or interrupted save, a directory in the way of one of the files included, leaves no partial file and every
        existing file byte-identical (only a power loss between two renames leaves a mix, the old files kept as
        `.old-*` beside them). A shard index (model.safetensors.index.json) of an earlier checkpoint in the
        directory is removed with the same renames, since from_pretrained would read it instead of the new file;
        its shard files are left."""
        checkpoint.check_directory_name(directory)
        host = {k: to_host(v) for k, v in self.params.items()}
        host = self._check_savable(host, None if dtype is None else resolve_dtype(dtype, "gpu"))
        checkpoint.make_directory(directory)
        names = (checkpoint.SINGLE_NAME, "config.json", GENERATION_CONFIG_NAME)
        checkpoint.check_no_directory_at([os.path.join(directory, n) for n in names])   # before any weight is written
        with checkpoint.atomic_group() as group:
            checkpoint.save_file(host, os.path.join(directory, checkpoint.SINGLE_NAME), {"format": "pt"}, group)
            self._saved_config(host).save_pretrained(directory, group)
            self.generation_config.save_pretrained(directory, group)
            if os.path.lexists(os.path.join(directory, checkpoint.INDEX_NAME)):
                group.delete(os.path.join(directory, checkpoint.INDEX_NAME))

    def _saved_config(self, host):
        """model.config with its "dtype" (and "torch_dtype", when set) naming the dtype of the weights written, as
        transformers writes it: a bfloat16 model saved with dtype="float32" does not say "bfloat16"."""
        name = np.dtype(host["model.embed_tokens.weight"].dtype).name
        return dataclasses.replace(self.config, dtype=name,
                                   torch_dtype=None if self.config.torch_dtype is None else name)

    def _check_savable(self, host, dtype):
        """The host tensors cast to `dtype` (None: as they are), or CheckpointError, before anything is written,
        for a save that from_pretrained would refuse: tensors that do not match the config (a config edited after
        loading) or values that are not finite in the dtype written."""
        if not isinstance(self.generation_config, GenerationConfig):
            raise CheckpointError(f"cannot save: model.generation_config must be a generation_config.GenerationConfig, "
                                  f"got {type(self.generation_config).__name__}")
        try:                                  # first: the generation config's check reads the config
            problem = self._params_problem(host)
        except ConfigError as e:
            raise CheckpointError(f"cannot save: {e}; from_pretrained would refuse the config.json. Nothing was "
                                  "written") from None
        if problem is not None:
            raise CheckpointError(f"cannot save: {problem}: from_pretrained would refuse the files; was model.config "
                                  "or model.params edited after loading?")
        try:
            self.generation_config.check(self.config.vocab_size)
        except GenerationError as e:
            raise CheckpointError(f"cannot save: model.generation_config: {e}; from_pretrained would refuse the "
                                  "generation_config.json. Nothing was written") from None
        tied_copy = "lm_head.weight" in host and "lm_head.weight" not in self._shapes()  # tied, with a copy
        refused = ": from_pretrained refuses non-finite weights. Nothing was written"
        host = {name: checkpoint.cast_finite(value, dtype, f"cannot save: tensor {name!r}", not_finite=refused,
                                             beyond_range="; save with a wider dtype (float32 or bfloat16)" + refused)
                for name, value in host.items()}
        if tied_copy and not np.array_equal(host["lm_head.weight"], host["model.embed_tokens.weight"]):  # as written
            raise CheckpointError("cannot save: model.config.tie_word_embeddings is true but lm_head.weight "
                                  "differs from model.embed_tokens.weight: from_pretrained would refuse the "
                                  "files (the logits would ignore lm_head); set model.config.tie_word_embeddings "
                                  "= False, or make the two equal. Nothing was written")
        return host                                        # with an equal tied copy, which from_pretrained allows

    def _params_problem(self, params, unused_ok=False):
        """What makes `params` ({name: array}) differ from the tensors model.config implies (names and shapes), in
        words, or None. A tied config may also hold an lm_head.weight (a copy of the embedding: save compares it);
        unused_ok allows any tensor the model does not read (the forward's rule: StableLmModel(config,
        causal_lm.params) leaves the lm_head unused), where the save refuses them, as from_pretrained would.
        The save checks it and so does every reference forward: params or config edited after loading failed
        deep inside NumPy (an IndexError from the embedding's take, a matmul's core dimension) or, with an
        lm_head of other rows, gave logits of the wrong width. Every tensor must also be floating point
        (_dtype_problem). The forward's cost, measured on the default model (179 tensors, 2 CPU cores):
        tools/ab_params_check.py. ConfigError from _shapes when model.config itself is unusable."""
        return self._layout_problem(params, unused_ok) or _dtype_problem(params, self._shapes())

    def _layout_problem(self, params, unused_ok):
        """_params_problem's names and shapes: what makes `params` differ from model.config, or None."""
        try:
            expected = self._shapes()                                        # tied: no lm_head.weight
        except CheckpointError as e:                                         # more tensors than params holds
            return str(e)
        names = set(params)
        if unused_ok:
            names &= set(expected)                                           # tensors the model does not read
        elif "lm_head.weight" in names and "lm_head.weight" not in expected:
            names.discard("lm_head.weight")                                  # a tied config with an lm_head copy
        for name in sorted(set(expected) ^ names):
            where = "is missing from the model" if name in expected else "is not implied by the config"
            return (f"tensor {name!r} {where} (config: num_hidden_layers={self.config.num_hidden_layers}, "
                    f"hidden_size={self.config.hidden_size}, ...)")
        for name, shape in expected.items():
            got = tuple(getattr(params[name], "shape", ()))
            if got != shape:
                return f"tensor {name!r} has shape {got} but the config implies {shape}"
        return None

    def _shapes(self):
        """{name: shape} of the tensors model.config implies for this head (checkpoint.expected_shapes; a tied
        config: no lm_head.weight), after config.edit_problem has found the config usable (ConfigError otherwise:
        an edit to num_attention_heads = 0 would fail inside the shapes). Both run again only when a field of
        model.config changed since the last call (~1 us otherwise); the answer is kept on the model.
        expected_shapes' limit, the number of tensors model.params holds, refuses a config that implies more
        (CheckpointError) before a name is built: a config edited to a billion layers fails at once, where
        building its names took seconds (10**5 layers) or never ended."""
        if not isinstance(self.config, StableLmConfig):                   # model.config = None: vars() failed
            raise ConfigError(f"model.config must be a StableLmConfig, got {type(self.config).__name__}; was it "
                              "replaced after loading? Load the model again, or build the config with "
                              "StableLmConfig.from_dict")
        fields = tuple(vars(self.config).values())
        seen = getattr(self, "_seen_config", None)
        if seen is None or fields != seen[0]:
            problem = edit_problem(self.config)
            if problem is not None:
                raise ConfigError(f"model.config: {problem}; was it edited after loading? Fix the value, or build "
                                  "the config with StableLmConfig.from_dict")
            shapes = checkpoint.expected_shapes(self.config, self.head, limit=len(self.params), where="model.params",
                                                config_name="model.config")
            self._seen_config = (copy.deepcopy(fields), shapes)
        return self._seen_config[1]

    def _check_params(self):
        """ConfigError when model.config was edited into values the model cannot use, CheckpointError naming the
        tensor when model.params do not match model.config (_layout_problem, _shapes) or one is not floating point
        (_dtype_problem)."""
        problem = self._layout_problem(self.params, unused_ok=True)
        if problem is not None:
            raise CheckpointError(f"model.params no longer match model.config: {problem}; were they edited after "
                                  "loading? Restore them (or the config), or load the model again")
        problem = _dtype_problem(self.params, self._shapes())
        if problem is not None:       # not a mismatch with the config: the prefix above read off for it
            raise CheckpointError(f"model.params hold a tensor the model cannot compute with: {problem}")

    def num_parameters(self):
        return sum(int(v.size) for v in self.params.values())

    # ---- inputs -------------------------------------------------------------------------------
    def _ids(self, input_ids):
        """Lists or arrays of ints -> [B, T] integer array, checked against the vocabulary."""
        xp = self.xp
        if input_ids is None:
            raise GenerationError("input_ids is required")
        if isinstance(input_ids, (str, bytes)):
            raise GenerationError("input_ids must be token ids, not text: tokenize the prompt first")
        if isinstance(input_ids, Mapping):
            raise GenerationError(f"input_ids is a {type(input_ids).__name__} with keys {list(input_ids)[:4]} (the "
                                  "tokenizer's output?): pass enc['input_ids'] as input_ids and enc['attention_mask'] "
                                  "as attention_mask, or call model(**enc)")
        refuse_masked(input_ids, "input_ids", "the ids as a plain array and their mask as attention_mask (1 for a "
                      "token, 0 for padding): input_ids=ids.filled(0), attention_mask=1 - np.ma.getmaskarray(ids)",
                      GenerationError)
        host = host_array(input_ids)
        if host is None:
            raise GenerationError("input_ids must be a list of lists of ints or an integer array (rows of "
                                  "equal length; pad shorter rows and pass an attention_mask)")
        if host.size == 0:
            raise GenerationError(f"input_ids is empty (shape {host.shape}); give at least one token")
        if host.ndim == 1:
            host = host[None, :]
        if host.dtype == object and host.ndim == 2 and all(is_int(v) for v in host.flat):   # ints beyond int64
            self._in_vocabulary(int(min(host.flat)), int(max(host.flat)))
        if host.dtype == object and not hasattr(input_ids, "dtype"):   # a generator, a set... (not an array)
            shown = f" {reprlib.repr(input_ids)}" if isinstance(input_ids, (list, tuple, set)) else ""
            raise GenerationError(f"input_ids must be a list of lists of ints or an integer array, got "
                                  f"a {type(input_ids).__name__}{shown}")
        if host.ndim != 2 or host.dtype.kind not in "iu":
            raise GenerationError(f"input_ids must be a [batch, seq_len] array of integers, got shape "
                                  f"{host.shape} of {host.dtype}")
        self._in_vocabulary(int(host.min()), int(host.max()))
        return xp.asarray(host.astype(np.int64))

    def _in_vocabulary(self, lo, hi):
        """GenerationError naming an id outside [0, vocab_size), given the smallest and largest id."""
        if lo < 0 or hi >= self.config.vocab_size:
            raise GenerationError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, "
                                  f"{self.config.vocab_size}) of this model (config.json's vocab_size)")

    def _mask_2d(self, attention_mask, batch, total):
        """[B, S] of 0/1 (ints, floats or bools) -> bool, S = cached + new positions."""
        if attention_mask is None:
            return None
        host = mask_array(attention_mask, (batch, total), "(batch, cached + new positions)")
        return self.xp.asarray(host.astype(bool))

    def _positions(self, position_ids, batch, t):
        """[B, T], [1, T] or [T] non-negative integer positions -> [B, T] int64.

        Positions past max_position_embeddings are allowed, as in transformers: generation may run past
        the context through the cache (rotary extrapolates; the model was not trained there)."""
        host = _host_numbers(position_ids, "position_ids")
        if host.dtype.kind not in "iu":
            raise GenerationError(f"position_ids must be integers, got {host.dtype}")
        if host.shape not in ((batch, t), (1, t), (t,)):
            raise GenerationError(f"position_ids has shape {host.shape}, expected {(batch, t)} (batch, new tokens)")
        if host.size and host.min() < 0:
            raise GenerationError(f"position id {int(host.min())} is negative; positions count from 0")
        if host.size and int(host.max()) > MAX_POSITIONS:  # uint64 would wrap to negative as int64
            raise GenerationError(f"position id {int(host.max())} is too large (at most {MAX_POSITIONS}: "
                                  "rotary angles are computed in floating point)")
        return self.xp.asarray(np.broadcast_to(host.reshape(-1, t), (batch, t)).astype(np.int64))

    def _check_cache(self, cache):
        """A KVCache made for another model (layers, kv heads, head size) or dtype is refused: its buffers
        would fail deep inside a layer, or, with more layers or another dtype, be used silently."""
        c = self.config
        want = (c.num_hidden_layers, c.num_key_value_heads, c.head_dim, np.dtype(self.dtype))
        k = cache.keys[0] if cache.keys else None
        got = (len(cache.keys), k.shape[1], k.shape[3], np.dtype(k.dtype)) if k is not None else (0, None, None, None)
        if got != want or len(cache.values) != len(cache.keys):
            raise GenerationError(
                f"past_key_values was made for another model: {got[0]} layers, {got[1]} kv heads of size {got[2]}, "
                f"{got[3]}; this model has {want[0]} layers, {want[1]} kv heads of size {want[2]}, {want[3]}. Pass the "
                "cache this model returned, or KVCache(model.config, batch, max_len, model.dtype, model.xp)")

    def _check_memory(self, batch, t, past, new_cache):
        """The memory guard for one forward, before anything is allocated: the attention scores
        [B, H, T, S] (a few copies, in the softmax's float32/float64), the activations [B, T, ...] and a
        cache made for this call. Small forwards (< 64 MiB) skip asking the system."""
        c = self.config
        item, wide = np.dtype(self.dtype).itemsize, max(4, np.dtype(self.dtype).itemsize)
        s = past + t
        need = (3 * batch * c.num_attention_heads * t * s * wide
                + batch * t * (4 * c.hidden_size + 3 * c.intermediate_size + c.vocab_size) * item)
        if new_cache:
            need += 2 * c.num_hidden_layers * batch * c.num_key_value_heads * t * c.head_dim * item
        if need < 64 * 2**20:
            return
        from .bounded_io import check_memory

        check_memory(need, f"a forward over {batch} row(s) of {t} tokens ({s} positions with the cache)",
                     GenerationError, "use a smaller batch or shorter input", xp=self.xp)

    def _prepare_inputs(self, input_ids, attention_mask, position_ids, past_key_values, use_cache):
        """Check and convert one forward's inputs (shared by the reference and fast_cpu):
        ids [B, T], the cache (made when use_cache asks for one, room reserved), the cached length,
        the padding mask [B, S] or None, position ids [B, T]."""
        xp, config = self.xp, self.config
        check_flag(use_cache, "use_cache", GenerationError)
        ids = self._ids(input_ids)                                        # [B, T]
        batch, t = ids.shape
        cache = past_key_values
        if cache is not None and not isinstance(cache, KVCache):
            raise GenerationError(f"past_key_values must be the KVCache a previous call returned (or a new "
                                  f"stablelm_ref.KVCache), got {type(cache).__name__}")
        if cache is not None:
            self._check_cache(cache)
        self._check_memory(batch, t, (cache.length if cache is not None else 0), cache is None and use_cache)
        if cache is None and use_cache:
            cache = KVCache(config, batch, t, self.dtype, xp, growable=True)
        past = cache.length if cache is not None else 0
        if cache is not None:
            if cache.batch_size != batch:
                raise GenerationError(f"the KV cache was made for batch {cache.batch_size}, input_ids has {batch}")
            cache.reserve(t)
        if past == 0:          # decoding past the context through the cache is allowed (see check_context)
            check_context(config, t)
        mask2d = self._mask_2d(attention_mask, batch, past + t)           # [B, S] or None
        if position_ids is None:
            position_ids = xp.broadcast_to(xp.arange(past, past + t)[None, :], (batch, t))  # [B, T]
        else:
            position_ids = self._positions(position_ids, batch, t)         # [B, T]
        return ids, cache, past, mask2d, position_ids

    # ---- the transformer ----------------------------------------------------------------------
    def _forward_base(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                      use_cache=False, output_hidden_states=False, trace=None):
        xp, config, p = self.xp, self.config, self.params
        check_flag(output_hidden_states, "output_hidden_states", GenerationError)
        if trace is not None and not callable(trace):
            raise GenerationError(f"trace must be a function trace(name, array), got {type(trace).__name__}")
        trace = no_trace if trace is None else trace
        self._check_params()
        ids, cache, past, mask2d, position_ids = self._prepare_inputs(input_ids, attention_mask, position_ids,
                                                                      past_key_values, use_cache)
        batch, t = ids.shape

        embed = p["model.embed_tokens.weight"]                            # [vocab, hidden]
        # the rows by indexing: NumPy's take copies a non-contiguous matrix whole first (a tied embedding is a view of
        # the lm_head the CPU fast form transposed in place: every call copied the embedding)
        x = xp.reshape(embed[xp.reshape(ids, (-1,))], (batch, t, -1))     # [B, T, hidden]
        trace("model.embed_tokens", x)
        cos, sin = rotary_cos_sin(position_ids, config, self.dtype)      # [B, T, rotary_ndims] each
        hidden = [x] if output_hidden_states else None
        for i, w in enumerate(layer_tensors(p, config.num_hidden_layers)):
            x = decoder_layer(x, w, config, cos, sin, mask2d, cache, i,
                              scoped(trace, f"model.layers.{i}."))        # [B, T, hidden]
            trace(f"model.layers.{i}", x)
            if hidden is not None:
                hidden.append(x)
        x = layer_norm(x, p["model.norm.weight"], p["model.norm.bias"], config.layer_norm_eps)
        trace("model.norm", x)
        if hidden is not None:
            hidden[-1] = x  # transformers ties the last hidden state to the normalised output
        if cache is not None:
            cache.advance(t)
        return ModelOutput(last_hidden_state=x, past_key_values=cache,
                           hidden_states=tuple(hidden) if hidden is not None else None)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class StableLmModel(StableLmPreTrainedModel):
    """The bare transformer: returns last_hidden_state [B, T, hidden] (no head)."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                output_hidden_states=False):
        return self._forward_base(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                                  output_hidden_states)


def layer_tensors(params, num_layers):
    """[{name after `model.layers.{i}.`: tensor} for each layer i], in one pass over the names.

    Rebuilt on every forward (the arrays can be swapped: fast(), trace, .to()). Measured with subtree's
    calls in decoder_layer (2 CPU cores): 0.3 ms of a 64 ms reference decode step of the default model,
    0.6 ms of 22-35 ms at 32 layers of width 64; too little to be worth a cache. Names of no layer below
    num_layers (`model.layers.7.` with a config edited to 2 layers, `model.layers.extra`) are left out: the
    forward reads only the tensors the config implies (_params_problem's unused_ok), as transformers loads a
    checkpoint into a config of fewer layers; they failed here with an IndexError or a ValueError."""
    layers = [{} for _ in range(num_layers)]
    index = {str(i): layer for i, layer in enumerate(layers)}
    for name, value in params.items():
        if name.startswith("model.layers."):
            i, _, rest = name[len("model.layers."):].partition(".")
            if i in index:
                index[i][rest] = value
    return layers


def _lm_head_rule(head, expected, files):
    """(expected, ignore) for load_state_dict: what to do with a checkpoint's lm_head.weight. A model without
    that head (the bare model, the classifiers) skips it: a causal LM's checkpoint loads into them. A tied
    causal LM (config.json's tie_word_embeddings) uses the embedding for its logits; the lm_head.weight a tied
    checkpoint may hold as a copy of it is read, with the checks of every tensor, to be compared
    (_check_tied_copy) and dropped."""
    ignore = checkpoint.IGNORED
    if head != "causal_lm":
        return expected, ignore + ("lm_head.weight",)
    if "lm_head.weight" in files and "lm_head.weight" not in expected:            # tied, with a copy
        expected = {**expected, "lm_head.weight": expected["model.embed_tokens.weight"]}
    return expected, ignore


def _check_tied_copy(lm_head, embed, directory):
    """The lm_head.weight of a checkpoint whose config.json says tie_word_embeddings must equal the embedding
    (both as loaded): a copy that differs means config.json and the weights disagree (an untied model with a
    wrong config would give other logits, silently): refused."""
    if not np.array_equal(lm_head, embed):
        raise CheckpointError(f"{directory}: config.json says tie_word_embeddings: true, but lm_head.weight differs "
                              "from model.embed_tokens.weight: the model's logits would ignore its own lm_head. Set "
                              "tie_word_embeddings to false in config.json (or remove the stale lm_head.weight)")


def _narrowed(name, value, dtype, directory):
    """value (host, float32/float64) cast to the device dtype, refused where float16 cannot hold it."""
    return checkpoint.cast_finite(value, dtype, f"{directory}: tensor {name!r}",
                                  beyond_range="; load it with dtype='bfloat16' or 'float32'", not_finite="")


def check_context(config, length, subject="the input has", advice="shorten the prompt"):
    """The one context check (the forward's, generate's, the chat command's): GenerationError when a prompt of
    `length` tokens is longer than the model's context, max_position_embeddings (past_context: with dynamic rope
    scaling there is no limit); `subject` and `advice` speak to the caller's audience. Only the prompt is refused:
    decoding past the context through the cache is allowed, as in transformers (rotary extrapolates; the model was
    not trained there), and generate warns when prompt + new tokens go past it."""
    if past_context(config, length):
        raise GenerationError(f"{subject} {length} tokens, more than the model's context (max_position_embeddings "
                              f"= {config.max_position_embeddings}); {advice}")


def past_context(config, length):
    """Whether `length` positions go past the model's context: more than max_position_embeddings, unless the
    rope scaling is dynamic (its frequencies are rescaled to the length: no limit). check_context refuses a
    prompt past it; generate warns when prompt + new tokens go past it."""
    return length > config.max_position_embeddings and config.rope_type != "dynamic"


def mask_array(attention_mask, shape, meaning):
    """The one check of an attention mask (the forward's and generate's): a host array of `shape` holding only
    0 and 1 (ints, floats or bools); `meaning` says what the shape is, for the message."""
    host = _host_numbers(attention_mask, "attention_mask")
    if host.shape != tuple(shape):
        raise GenerationError(f"attention_mask has shape {host.shape}, expected {tuple(shape)} {meaning}")
    if host.size and not ((host == 0) | (host == 1)).all():
        bad = host[(host != 0) & (host != 1)].flat[0]
        raise GenerationError(f"attention_mask may only hold 0 (padding) and 1 (token), found {bad}")
    return host


def _host_numbers(a, name):
    """A NumPy array of numbers or bools from a list or array; GenerationError for anything else."""
    refuse_masked(a, name, f"a plain array (e.g. {name}.filled(0))", GenerationError)
    host = host_array(a)
    if host is None:
        raise GenerationError(f"{name} must be a rectangular list or array of numbers (rows of equal length)")
    if host.dtype.kind not in "biuf":
        raise GenerationError(f"{name} must hold numbers (integers, 0/1 floats or bools), got an array of "
                              f"{host.dtype}")
    return host


def _with_prefix(names, expected):
    """A checkpoint of a bare StableLmModel has no 'model.' prefix: expect its names as stored."""
    if "model.embed_tokens.weight" not in names and "embed_tokens.weight" in names:
        return {k.removeprefix("model."): v for k, v in expected.items()}
    return expected


def _strip_or_add_prefix(params):
    if "model.embed_tokens.weight" in params:
        return params
    return {("model." + k if not k.startswith(("lm_head", "score")) else k): v for k, v in params.items()}
