"""One decoder layer: a sequential or a parallel residual block.

    sequential (3b-4e1t, 2-1.6b):   h = x + attn(ln1(x));    y = h + mlp(ln2(h))
    parallel   (2-12b):             y = x + attn(ln1(x)) + mlp(ln1(x))     (one LayerNorm: GPT-J's form;
                                    GPT-NeoX's parallel residual has two)

Config: use_parallel_residual, layer_norm_eps.
Checkpoint tensors: model.layers.{i}.input_layernorm.{weight,bias},
model.layers.{i}.post_attention_layernorm.{weight,bias} (sequential only), plus attention and mlp.
"""

from ._xp import no_trace, scoped, subtree
from .attention import attention
from .layernorm import add_layer_norm, layer_norm
from .mlp import mlp


def decoder_layer(x, w, config, cos, sin, key_mask=None, cache=None, layer_idx=0, trace=no_trace):
    """x: [B, T, hidden] -> [B, T, hidden]. w: layer `layer_idx`'s tensors by their checkpoint names after
    `model.layers.{i}.` ("input_layernorm.weight", "self_attn.q_proj.weight", ...); trace names likewise."""
    eps = config.layer_norm_eps
    h = layer_norm(x, w["input_layernorm.weight"], w["input_layernorm.bias"], eps)
    trace("input_layernorm", h)
    attn = attention(h, subtree(w, "self_attn."), config, cos, sin, key_mask, cache, layer_idx,
                     scoped(trace, "self_attn."))
    trace("self_attn.o_proj", attn)
    if config.use_parallel_residual:
        return x + attn + mlp(h, subtree(w, "mlp."), config.hidden_act, scoped(trace, "mlp."))
    x, h2 = add_layer_norm(x, attn, w["post_attention_layernorm.weight"], w["post_attention_layernorm.bias"],
                           eps)                                   # x = x + attn; h2 = ln2(x)
    trace("post_attention_layernorm", h2)
    return x + mlp(h2, subtree(w, "mlp."), config.hidden_act, scoped(trace, "mlp."))
