"""Self-attention with partial rotary, optional qk LayerNorm and grouped-query heads.

    q, k, v = x Wq^T + bq,  x Wk^T + bk,  x Wv^T + bv        (biases only when use_qkv_bias)
    q, k    = qk_layernorm(q), qk_layernorm(k)               (per head, only when qk_layernorm)
    q, k    = rot(q), rot(k)                                  (first rotary_ndims dims of each head)
    A       = softmax( q k^T / sqrt(head_dim) + mask )        (softmax in float32, or float64)
    out     = (A v) Wo^T                                      (o_proj has no bias)

Grouped-query attention: num_key_value_heads <= num_attention_heads; query head h reads kv head
h // (heads / kv_heads) (transformers' repeat_kv order). Here the queries are reshaped into
[B, kv_heads, group, T, D] so each kv head broadcasts over its group without being copied.

The mask: query i of the T new ones sits at position past + i (past = positions already in the KV
cache) and may see key j <= past + i that the attention mask marks as a token (causal_mask builds the
boolean [B, 1, T, S]). Masked scores are set to the dtype's minimum, as transformers' eager path adds
it. A query that sees no key at all (a left-padding position) gets an output of 0, as transformers'
default (sdpa) path gives with torch >= 2.5 (eager would give the mean of all values); the loss on a
left-padded batch then equals transformers' (tests/crosscheck/test_edges_vs_transformers.py).
The two attention products run in float32 for 16-bit inputs (GPU bfloat16/float16): the scores
then reach the float32 softmax unrounded, where transformers rounds them to 16 bits first.

One seam: `causal_attention(q, k, v, key_mask)` computes A v, by `scaled_dot_product_attention` below
(the equation, in array-API code) or, where kernels.py has an implementation for the arrays' library,
by that: for CuPy arrays the CUDA flash-attention kernel (stablelm_ref/cuda/flash_prefill.cu; on
Hopper GPUs its wgmma twin flash_hopper.cu, at the head dims flash_hopper.HOPPER_DEFAULT lists), which
never forms A, computes in tiles with an online softmax and is tested equal to the reference
(tests/gpu/test_flash_prefill.py, tests/gpu/test_gpu_model.py). Without A it has no attention
weights to give the trace: run_with_trace runs the reference (kernels.reference_only).

Config: num_attention_heads, num_key_value_heads, use_qkv_bias, qk_layernorm, layer_norm_eps,
partial_rotary_factor (via rotary_ndims).
Checkpoint tensors: model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}, ...o_proj.weight,
...{q,k}_layernorm.norms.{h}.weight.
"""

from . import kernels
from ._xp import array_namespace, dtype_min, linear, no_trace, softmax  # softmax in float32 (float64 in float64 mode)
from .layernorm import per_head_layer_norm
from .rotary import apply_rotary_qk


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


def causal_mask(attention_mask, batch, q_len, past, xp):
    """bool [B, 1, T, S] (S = past + T): query i (at position past + i) may attend key j <= past + i
    that the attention mask [B, S] marks as a token."""
    s = past + q_len
    q_pos = xp.arange(past, s)[:, None]                                  # [T, 1]
    k_pos = xp.arange(s)[None, :]                                        # [1, S]
    allowed = (k_pos <= q_pos)[None, None, :, :]                         # [1, 1, T, S]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :]              # [B, 1, T, S]
    return xp.broadcast_to(allowed, (batch, 1, q_len, s))


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
    attends = xp.any(mask, axis=-1, keepdims=True)[:, :, None, :, :]         # [B, 1, 1, T, 1]
    probs = xp.where(attends, probs, xp.zeros_like(probs))                  # fully masked row -> 0 (sdpa)
    out = xp.astype(probs @ v, dtype)                                        # [B, KVH, G, T, D]
    return xp.reshape(out, (b, heads, t, d)), xp.reshape(probs, (b, heads, t, s))


@kernels.seam("attention")
def causal_attention(q, k, v, key_mask=None):
    """The seam: softmax(q k^T / sqrt(D) + causal and padding mask) v by the implementation for q's library.

    q [B, H, T, D]; k, v [B, KVH, S, D], the T queries being the last T of the S positions; key_mask
    bool [B, S] (False = padding) or None -> (out [B, H, T, D], weights [B, H, T, S], or None where a
    fused kernel ran: it never forms them). The reference: the mask made dense, then the equation."""
    b, t, s = q.shape[0], q.shape[2], k.shape[2]
    mask = causal_mask(key_mask, b, t, s - t, array_namespace(q))      # [B, 1, T, S]
    return scaled_dot_product_attention(q, k, v, mask)


def attention(x, w, config, cos, sin, key_mask=None, cache=None, layer_idx=0, trace=no_trace):
    """x: [B, T, hidden] -> [B, T, hidden]. w: one layer's attention tensors by their checkpoint names
    after `model.layers.{i}.self_attn.` ("q_proj.weight", ...); key_mask: bool [B, S] or None; trace
    names are relative to the same prefix (the caller scopes it)."""
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    bias = w.get if config.use_qkv_bias else lambda name: None        # biases in params but not in the config: unused
    q = split_heads(linear(x, w["q_proj.weight"], bias("q_proj.bias")), heads, d)     # [B, H, T, D]
    k = split_heads(linear(x, w["k_proj.weight"], bias("k_proj.bias")), kv_heads, d)   # [B, KVH, T, D]
    v = split_heads(linear(x, w["v_proj.weight"], bias("v_proj.bias")), kv_heads, d)   # [B, KVH, T, D]
    trace("q_proj", q), trace("k_proj", k), trace("v_proj", v)
    if config.qk_layernorm:
        eps = config.layer_norm_eps
        q = per_head_layer_norm(q, [w[f"q_layernorm.norms.{h}.weight"] for h in range(heads)], eps)
        k = per_head_layer_norm(k, [w[f"k_layernorm.norms.{h}.weight"] for h in range(kv_heads)], eps)
        trace("q_layernorm", q), trace("k_layernorm", k)
    q, k = apply_rotary_qk(q, k, cos, sin, config.rotary_ndims)   # [B, H, T, D], [B, KVH, T, D]
    trace("rotary_q", q), trace("rotary_k", k)
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)                  # [B, KVH, S, D], S = cached + T
    out, weights = causal_attention(q, k, v, key_mask)        # [B, H, T, D], [B, H, T, S] or None
    trace("attn_weights", weights), trace("attn_output", out)
    return linear(merge_heads(out), w["o_proj.weight"])       # [B, T, H*D] -> [B, T, hidden]
