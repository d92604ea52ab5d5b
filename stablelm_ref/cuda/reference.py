"""Reference attention in NumPy float64: the spec the CUDA attention kernels must equal.

    scores[b, h, i, j] = scale * q[b, h, i] . k[b, h // rep, j]          rep = H // KVH
    allowed[b, i, j]   = (j <= S - T + i  if causal)  and  key_mask[b, j] != 0
    out[b, h, i]       = sum_j softmax_j(scores | allowed) v[b, h // rep, j]

q [B, H, T, D]; k, v [B, KVH, S, D] with S >= T: the T queries are the LAST T of the S positions
(with a KV cache of S - T earlier tokens, query i sits at position S - T + i). Query head h reads
kv head h // rep, transformers' repeat_kv order. scale defaults to D ** -0.5.

A row with no allowed key at all (a left-padding query: every key it may see is padding) has no
softmax; we define its output as ZERO. The kernels do the same, and callers ignore those rows.
Masked keys get probability exactly 0 (their values must still be finite: 0 * NaN is NaN, here as
in the kernels).
"""

from __future__ import annotations

import numpy as np


def attention_reference(q, k, v, key_mask=None, causal=True, scale=None):
    """Float64 attention; accepts NumPy arrays of any float dtype (bfloat16 via ml_dtypes)."""
    q = np.asarray(q).astype(np.float64)                      # [B, H, T, D]
    k = np.asarray(k).astype(np.float64)                      # [B, KVH, S, D]
    v = np.asarray(v).astype(np.float64)                      # [B, KVH, S, D]
    B, H, T, D = q.shape
    _, KVH, S, _ = k.shape
    if S < T:
        raise ValueError(f"need at least as many keys as queries (S={S} < T={T})")
    if H % KVH:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({KVH})")
    if scale is None:
        scale = D ** -0.5
    rep = H // KVH
    k = np.repeat(k, rep, axis=1)                             # [B, KVH, S, D] -> [B, H, S, D]
    v = np.repeat(v, rep, axis=1)                             # kv head h // rep for query head h

    scores = scale * (q @ k.transpose(0, 1, 3, 2))            # [B, H, T, S]
    allowed = np.ones((B, 1, T, S), dtype=bool)               # [B, 1, T, S]
    if causal:
        i = np.arange(T)[:, None]
        j = np.arange(S)[None, :]
        allowed &= (j <= S - T + i)[None, None]               # query i at position S - T + i
    if key_mask is not None:
        key_mask = np.asarray(key_mask)
        if key_mask.shape != (B, S):
            raise ValueError(f"key_mask must have shape {(B, S)}, got {key_mask.shape}")
        allowed &= (key_mask != 0)[:, None, None, :]

    scores = np.where(allowed, scores, -np.inf)               # [B, H, T, S]
    row_max = scores.max(axis=-1, keepdims=True)              # [B, H, T, 1], -inf for empty rows
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    p = np.where(allowed, np.exp(scores - row_max), 0.0)      # exactly 0 where not allowed
    denom = p.sum(axis=-1, keepdims=True)                     # [B, H, T, 1], 0 for empty rows
    p = p / np.where(denom > 0, denom, 1.0)                   # empty rows stay all-zero
    return p @ v                                              # [B, H, T, D]
