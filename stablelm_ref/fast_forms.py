"""The fast forms of a model, one per device: what `model.fast()` returns.

The reference model (model.py, heads.py) is the specification and imports none of its fast forms.
Each fast form registers a factory here when its module is imported (stablelm_ref/__init__.py
imports them), and `StableLmForCausalLM.fast()` asks for the one of the model's device:

    register("cpu", FastCpuModel)        # fast_cpu.py: fused NumPy + BLAS, the same function
    fast_form(model)                     # -> the registered factory(model), or a clear error

Both forms hold copies made from model.params and model.config (fused matrices, float32 vectors on the GPU);
`Source(model)` records what they were made from, and `source.same(model)` says whether the model still holds
that (each form rebuilds when it does not). Which tensors of a layer each joins into one array is written once,
`layer_tensors(config, i)`; each form lays the group out for its own kernels (fast_cpu.py: the matrices
transposed side by side, [hidden, out_1 + out_2 + ...]; the GPU engine: bfloat16 rows, q|k|v stacked and gate/up
interleaved row by row for its SwiGLU epilogue).

This module imports nothing from the package, so any module may import it without a cycle.
"""

from __future__ import annotations

import copy
import logging
import operator
import threading
from typing import NamedTuple

from .errors import StableLmError

logger = logging.getLogger(__name__)

_FACTORIES: dict = {}
MAKING = threading.RLock()    # held while a form is made (model.fast(), fast_cpu.FastCpuModel(model)): one at a time,
                              # as a build rewrites model.params (two at once on one model failed, see fast_form)


def register(device: str, factory) -> None:
    """Make `factory(model)` the fast form of models on `device` ("cpu" or "gpu")."""
    _FACTORIES[device] = factory


def fast_form(model):
    """The fast form registered for model.device, built from the model. The caller holds MAKING, so that threads
    asking one model for its form at once get one form: the CPU form's build replaces model.params' tensors and
    transposes lm_head in place (popped from params meanwhile), and a second build beside it failed with a
    KeyError from inside, or could have transposed the same memory twice."""
    factory = _FACTORIES.get(model.device)
    if factory is None:
        known = ", ".join(sorted(_FACTORIES)) or "none"
        raise StableLmError(f"no fast form is registered for device {model.device!r} (registered: {known}); "
                            "use the model itself")
    return factory(model)


class Source:
    """What a fast form's copies were made from: model.params (the dict, each tensor by identity, the names in
    order), model.config (the object and its fields' values) and model.dtype. same(model) is False once any of
    them changed: an entry of params replaced (a tensor cut, cast, swapped for other values), a name changed (the
    dict refilled in place with the same tensors in the same order under other names: q_proj's and k_proj's
    swapped), the dict or the config replaced, a field of the config edited, model.dtype set. An edit in place of
    a tensor's values is not seen here (an array's .shape or .dtype assigned in place neither): the CPU form's
    params are views of its copies, so it needs nothing. The test costs ~9 us for the default model's 179
    tensors, the names ~3 us of it (tools/ab_params_check.py's "the checks alone")."""

    __slots__ = ("params", "tensors", "names", "config", "fields", "dtype")

    def __init__(self, model):
        self.params, self.config, self.dtype = model.params, model.config, model.dtype
        self.tensors, self.names = tuple(self.params.values()), tuple(self.params)
        self.fields = copy.deepcopy(tuple(vars(self.config).values()))

    def same(self, model) -> bool:
        p = self.params
        return (model.params is p and model.config is self.config and model.dtype is self.dtype
                and len(p) == len(self.tensors) and all(map(operator.is_, p.values(), self.tensors))
                and tuple(p) == self.names and tuple(vars(self.config).values()) == self.fields)


class LayerTensors(NamedTuple):
    """The checkpoint names of one decoder layer's tensors, grouped as the fast forms join them."""
    ln1: tuple          # input_layernorm (weight, bias)
    ln2: tuple | None   # post_attention_layernorm (weight, bias); None with a parallel residual (one LayerNorm)
    qkv: list           # q_proj, k_proj, v_proj weights: one product  [(H + 2 KVH) D, hidden]
    qkv_bias: list | None   # their biases, one vector (use_qkv_bias), else None
    o: str              # o_proj weight
    gate_up: list       # gate_proj, up_proj weights: one product  [2 I, hidden]
    down: str           # down_proj weight
    qk_norms: list | None   # the per-head LayerNorm weights (qk_layernorm): H q heads, then KVH k heads, else None


def layer_tensors(config, i: int) -> LayerTensors:
    """Layer i's tensor names, grouped as both fast forms join them (see the module's docstring)."""
    p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    return LayerTensors(
        ln1=(p + "input_layernorm.weight", p + "input_layernorm.bias"),
        ln2=None if config.use_parallel_residual else (p + "post_attention_layernorm.weight",
                                                       p + "post_attention_layernorm.bias"),
        qkv=[a + f"{x}_proj.weight" for x in "qkv"],
        qkv_bias=[a + f"{x}_proj.bias" for x in "qkv"] if config.use_qkv_bias else None,
        o=a + "o_proj.weight",
        gate_up=[m + "gate_proj.weight", m + "up_proj.weight"],
        down=m + "down_proj.weight",
        qk_norms=([a + f"q_layernorm.norms.{h}.weight" for h in range(config.num_attention_heads)]
                  + [a + f"k_layernorm.norms.{h}.weight" for h in range(config.num_key_value_heads)])
        if config.qk_layernorm else None)


def ties(params, names) -> list:
    """The groups of `names` whose tensors in params are one array (a tie a user made: params[b] = params[a])."""
    arrays = {}
    for name in names:
        arrays.setdefault(id(params[name]), []).append(name)
    return [group for group in arrays.values() if len(group) > 1]


def warn_split(groups, params, form: str) -> None:
    """A warning for each group of ties(...) that a build split: each tensor became a view of its own copy (inside a
    fused matrix, or a joined vector of biases or norm weights), so an edit in place of one no longer reaches the
    other. It cannot be kept (the copies live in different fused arrays); the forward and the form still compute one
    function."""
    for group in groups:
        if len({id(params[name]) for name in group}) > 1:
            logger.warning("%s of model.params were one array; %s copied each into its own fused arrays, so an "
                           "edit in place of one no longer reaches the other: edit both, or assign the edited tensor "
                           "to each name (the next call builds again)", " and ".join(map(repr, group)), form)
