"""LayerNorm, and the per-head LayerNorm that StableLM 2 12B applies to queries and keys.

    mean = sum_i x_i / n,      var = sum_i (x_i - mean)^2 / n         (biased variance)
    y    = (x - mean) / sqrt(var + eps) * weight + bias

StableLM uses LayerNorm with a bias (not LLaMA's RMSNorm) before attention, before the MLP
(sequential blocks only) and after the last layer. The statistics are computed in float32 (float64
in float64 mode), as torch does, and the result is cast back to the input dtype. On CuPy arrays a
fused CUDA kernel computes the same in one pass (kernels.py, stablelm_ref/cuda/fused.cu); another
takes the residual add before a LayerNorm into the same pass (add_layer_norm: one launch and one
trip through device memory fewer per layer).

qk LayerNorm (`qk_layernorm: true`, stablelm-2-12b) normalises each head of q and k separately
over its head_dim, with one weight vector per head and no bias, before rotary.

Config: layer_norm_eps, qk_layernorm.
Checkpoint tensors: model.layers.{i}.input_layernorm.{weight,bias},
model.layers.{i}.post_attention_layernorm.{weight,bias}, model.norm.{weight,bias},
model.layers.{i}.self_attn.{q,k}_layernorm.norms.{h}.weight.
"""

from . import kernels
from ._xp import array_namespace, wide_dtype


@kernels.seam("layer_norm")
def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last axis. x: [..., n], weight/bias: [n] (bias may be None)."""
    xp = array_namespace(x)
    wide = wide_dtype(xp, x.dtype)
    h = xp.astype(x, wide)
    mean = xp.mean(h, axis=-1, keepdims=True)                       # [..., 1]
    var = xp.mean((h - mean) ** 2, axis=-1, keepdims=True)          # [..., 1]
    y = (h - mean) / xp.sqrt(var + eps) * xp.astype(weight, wide)  # [..., n]
    if bias is not None:
        y = y + xp.astype(bias, wide)
    return xp.astype(y, x.dtype)


@kernels.seam("add_layer_norm")
def add_layer_norm(x, delta, weight, bias, eps):
    """A residual add and the LayerNorm after it: (s, layer_norm(s)) with s = x + delta (one pass on CuPy)."""
    s = x + delta
    return s, layer_norm(s, weight, bias, eps)


def per_head_layer_norm(x, weights, eps):
    """qk LayerNorm: x [B, heads, T, head_dim], weights: one [head_dim] vector per head (no bias)."""
    xp = array_namespace(x)
    w = xp.stack(list(weights))[None, :, None, :]                    # heads x [D] -> [1, heads, 1, D]
    return layer_norm(x, w, None, eps)
