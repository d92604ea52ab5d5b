"""Self-attention with partial rotary, optional qk LayerNorm and grouped-query heads.

    q, k, v = x Wq^T + bq,  x Wk^T + bk,  x Wv^T + bv        (biases only when use_qkv_bias)
    q, k    = qk_layernorm(q), qk_layernorm(k)               (per head, only when qk_layernorm)
    q, k    = rot(q), rot(k)                                  (first rotary_ndims dims of each head)
    A       = softmax( q k^T / sqrt(head_dim) + mask )        (softmax in float32, or float64)
    out     = (A v) Wo^T                                      (o_proj has no bias)

Grouped-query attention: num_key_value_heads <= num_attention_heads; query head h reads kv head
h // (heads / kv_heads) (transformers' repeat_kv order). Here the queries are reshaped into
[B, kv_heads, group, T, D] so each kv head broadcasts over its group without being copied.

The mask is boolean [B, 1, T, S] (True = may attend): causal, and padding from the attention mask.
Masked scores are set to the dtype's minimum, as transformers' eager path adds it.
The two attention products run in float32 for 16-bit inputs (GPU bfloat16/float16): the scores
then reach the float32 softmax unrounded, where transformers rounds them to 16 bits first.

Config: num_attention_heads, num_key_value_heads, use_qkv_bias, qk_layernorm, layer_norm_eps,
partial_rotary_factor (via rotary_ndims).
Checkpoint tensors: model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}, ...o_proj.weight,
...{q,k}_layernorm.norms.{h}.weight.
"""

from ._xp import array_namespace, dtype_min, linear, softmax  # softmax in float32 (float64 in float64 mode)
from .layernorm import per_head_layer_norm
from .rotary import apply_rotary


def split_heads(x, heads, head_dim):
    """[B, T, heads*D] -> [B, heads, T, D]."""
    xp = array_namespace(x)
    b, t, _ = x.shape
    return xp.permute_dims(xp.reshape(x, (b, t, heads, head_dim)), (0, 2, 1, 3))


def merge_heads(x):
    """[B, heads, T, D] -> [B, T, heads*D]."""
    xp = array_namespace(x)
    b, h, t, d = x.shape
    return xp.reshape(xp.permute_dims(x, (0, 2, 1, 3)), (b, t, h * d))


def scaled_dot_product_attention(q, k, v, mask):
    """q: [B, H, T, D]; k, v: [B, KVH, S, D]; mask: bool [B, 1, T, S] -> ([B, H, T, D], probs [B, H, T, S])."""
    xp = array_namespace(q)
    dtype = q.dtype
    b, heads, t, d = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    group = heads // kv_heads
    if dtype not in (xp.float32, xp.float64):                               # 16-bit: products in float32
        q, k, v = (xp.astype(a, xp.float32) for a in (q, k, v))
    q = xp.reshape(q, (b, kv_heads, group, t, d))                           # [B, KVH, G, T, D]
    k, v = k[:, :, None, :, :], v[:, :, None, :, :]                           # [B, KVH, 1, S, D]
    scores = (q @ xp.matrix_transpose(k)) * (d ** -0.5)                      # [B, KVH, G, T, S]
    scores = xp.where(mask[:, :, None, :, :], scores, dtype_min(xp, q.dtype))  # mask: [B, 1, 1, T, S]
    probs = softmax(scores, q.dtype)                                         # [B, KVH, G, T, S]
    out = xp.astype(probs @ v, dtype)                                        # [B, KVH, G, T, D]
    return xp.reshape(out, (b, heads, t, d)), xp.reshape(probs, (b, heads, t, s))


def attention(x, params, prefix, config, cos, sin, mask, cache=None, layer_idx=0, trace=None):
    """x: [B, T, hidden] -> [B, T, hidden]. params holds the `{prefix}...` tensors of one layer."""
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def proj(name):
        return linear(x, params[f"{prefix}{name}.weight"], params.get(f"{prefix}{name}.bias"))

    q = split_heads(proj("q_proj"), heads, d)                 # [B, T, H*D]   -> [B, H, T, D]
    k = split_heads(proj("k_proj"), kv_heads, d)              # [B, T, KVH*D] -> [B, KVH, T, D]
    v = split_heads(proj("v_proj"), kv_heads, d)              # [B, T, KVH*D] -> [B, KVH, T, D]
    if trace is not None:
        trace(prefix + "q_proj", q), trace(prefix + "k_proj", k), trace(prefix + "v_proj", v)
    if config.qk_layernorm:
        q = per_head_layer_norm(q, [params[f"{prefix}q_layernorm.norms.{h}.weight"] for h in range(heads)],
                                config.layer_norm_eps)
        k = per_head_layer_norm(k, [params[f"{prefix}k_layernorm.norms.{h}.weight"] for h in range(kv_heads)],
                                config.layer_norm_eps)
        if trace is not None:
            trace(prefix + "q_layernorm", q), trace(prefix + "k_layernorm", k)
    q = apply_rotary(q, cos, sin, config.rotary_ndims)        # [B, H, T, D]
    k = apply_rotary(k, cos, sin, config.rotary_ndims)        # [B, KVH, T, D]
    if trace is not None:
        trace(prefix + "rotary_q", q), trace(prefix + "rotary_k", k)
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)                  # [B, KVH, S, D], S = cached + T
    out, probs = scaled_dot_product_attention(q, k, v, mask)  # [B, H, T, D]
    if trace is not None:
        trace(prefix + "attn_weights", probs), trace(prefix + "attn_output", out)
    return linear(merge_heads(out), params[prefix + "o_proj.weight"])  # [B, T, H*D] -> [B, T, hidden]
