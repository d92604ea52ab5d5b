"""One decoder layer: a sequential or a parallel residual block.

    sequential (3b-4e1t, 2-1.6b):   h = x + attn(ln1(x));    y = h + mlp(ln2(h))
    parallel   (2-12b):             y = x + attn(ln1(x)) + mlp(ln1(x))     (one LayerNorm, GPT-NeoX style)

Config: use_parallel_residual, layer_norm_eps.
Checkpoint tensors: model.layers.{i}.input_layernorm.{weight,bias},
model.layers.{i}.post_attention_layernorm.{weight,bias} (sequential only), plus attention and mlp.
"""

from .attention import attention
from .layernorm import layer_norm
from .mlp import mlp


def decoder_layer(x, params, layer_idx, config, cos, sin, mask, cache=None, trace=None):
    """x: [B, T, hidden] -> [B, T, hidden]."""
    p = f"model.layers.{layer_idx}."
    eps = config.layer_norm_eps
    h = layer_norm(x, params[p + "input_layernorm.weight"], params[p + "input_layernorm.bias"], eps)
    if trace is not None:
        trace(p + "input_layernorm", h)
    attn = attention(h, params, p + "self_attn.", config, cos, sin, mask, cache, layer_idx, trace)
    if trace is not None:
        trace(p + "self_attn.o_proj", attn)
    if config.use_parallel_residual:
        out = mlp(h, params, p + "mlp.", config.hidden_act, trace)
        return x + attn + out
    x = x + attn
    h2 = layer_norm(x, params[p + "post_attention_layernorm.weight"], params[p + "post_attention_layernorm.bias"], eps)
    if trace is not None:
        trace(p + "post_attention_layernorm", h2)
    return x + mlp(h2, params, p + "mlp.", config.hidden_act, trace)
