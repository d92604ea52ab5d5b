"""The specification of every kernel in decode.cu, in NumPy float64 (bf16 values as raw bits in and out).

    ref_gemv(x, W, mode, bias, y0)            store: x W^T + b | add: y0 + x W^T | swiglu: silu(g) * u
    ref_layernorm(x, w, b, eps)               (x - mean) / sqrt(var + eps) * w + b
    ref_layernorm_from_stats(x, w, b, st, eps)   the same, mean and var from st = ref_row_stats(x) = (sum, sum sq)
    ref_decode_attention(qkv, kc, vc, ...)    q/k LayerNorm, rotary, new k/v at cache[len], softmax(q K^T) V

tests/gpu/test_decode_engine.py compares each kernel with these; tests/test_decode_engine_emulated.py runs
the whole engine on the CPU with each kernel replaced by its spec.
"""

from __future__ import annotations

import numpy as np

from .decode_kernels import MODE_ADD, MODE_STORE


def ref_bf16_to_f64(bits) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def ref_f64_to_bf16(a) -> np.ndarray:
    """Round to bfloat16 (through float32, as the kernels do) and return the raw bits."""
    import ml_dtypes
    return np.asarray(a, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def ref_round_bf16(a) -> np.ndarray:
    return ref_bf16_to_f64(ref_f64_to_bf16(a))


def ref_gemv(x, W, mode=MODE_STORE, bias=None, y0=None) -> np.ndarray:
    """x [nb, K], W [N, K] (values, float64): store -> x W^T + bias; add -> y0 + x W^T;
    swiglu (rows interleaved gate0, up0, gate1, ...) -> silu(gate) * up  [nb, N/2]."""
    acc = np.asarray(x, np.float64) @ np.asarray(W, np.float64).T
    if mode == MODE_STORE:
        return acc if bias is None else acc + bias
    if mode == MODE_ADD:
        return y0 + acc
    g, u = acc[:, 0::2], acc[:, 1::2]
    return g / (1.0 + np.exp(-g)) * u


def ref_row_stats(x) -> np.ndarray:
    """(sum_k x_k, sum_k x_k^2) per row [.., 2]: what a folded LayerNorm's producers accumulate."""
    x = np.asarray(x, np.float64)
    return np.stack([x.sum(axis=-1), np.square(x).sum(axis=-1)], axis=-1)


def ref_layernorm_from_stats(x, w, b, stats, eps) -> np.ndarray:
    """LayerNorm with mean = S1 / K and var = S2 / K - mean^2 from stats = (S1, S2) (gemv_ln_b1_r*'s input)."""
    x = np.asarray(x, np.float64)
    mean = stats[..., :1] / x.shape[-1]
    var = np.maximum(stats[..., 1:] / x.shape[-1] - mean ** 2, 0.0)
    return (x - mean) / np.sqrt(var + eps) * w + b


def ref_layernorm(x, w, b, eps) -> np.ndarray:
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mean).mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * w
    return y if b is None else y + b


def ref_decode_attention(qkv, kc, vc, cache_len, pos, kmask, inv_freq, rot, H, KVH, D,
                         qn=None, kn=None, eps=1e-5, scale=None, k_new=None):
    """One decode step of attention for nb rows.

    qkv [nb, (H + 2 KVH) D] (new token, float), kc/vc [nb, KVH, >= cache_len, D] (cached bf16 values;
    slots with kmask 0 may hold anything), kmask [nb, >= cache_len] (1 = attend), pos [nb] rotary
    positions. Returns (out [nb, H D], k_new [nb, KVH, D], v_new [nb, KVH, D]) with k_new/v_new the
    bf16-rounded values the kernel writes at cache[cache_len]. Query head h reads kv head h // (H / KVH).
    k_new (optional, [nb, KVH, D]) replaces the computed new keys (to test with a kernel's own rounding).
    """
    qkv = np.asarray(qkv, np.float64)
    nb, G, L = qkv.shape[0], H // KVH, int(cache_len)
    scale = D ** -0.5 if scale is None else scale
    out = np.zeros((nb, H, D))
    given_k = k_new
    k_new, v_new = np.zeros((nb, KVH, D)), np.zeros((nb, KVH, D))
    half = rot // 2
    for b in range(nb):
        q = qkv[b, : H * D].reshape(H, D)
        k = qkv[b, H * D:(H + KVH) * D].reshape(KVH, D)
        v = qkv[b, (H + KVH) * D:].reshape(KVH, D)
        if qn is not None:
            q = ref_layernorm(q, qn, None, eps)
            k = ref_layernorm(k, kn, None, eps)
        ang = (np.float32(pos[b]) * np.asarray(inv_freq[:half], np.float32)).astype(np.float64)
        cos, sin = np.cos(ang), np.sin(ang)

        def rope(t):
            t = t.copy()
            x1, x2 = t[:, :half].copy(), t[:, half:rot].copy()
            t[:, :half], t[:, half:rot] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
            return t

        q, k = rope(q) * scale, ref_round_bf16(rope(k))
        if given_k is not None:
            k = np.asarray(given_k[b], np.float64)
        v = ref_round_bf16(v)
        k_new[b], v_new[b] = k, v
        valid = np.concatenate([np.asarray(kmask[b, :L], bool), [True]])
        for h in range(H):
            j = h // G
            keys = np.concatenate([np.asarray(kc[b, j, :L], np.float64), k[j][None]])[valid]
            vals = np.concatenate([np.asarray(vc[b, j, :L], np.float64), v[j][None]])[valid]
            s = keys @ q[h]
            p = np.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ vals
    return out.reshape(nb, H * D), k_new, v_new


class _Draws:
    """A stand-in for numpy's Generator that hands out given uniform draws (for sample())."""

    def __init__(self, u):
        self.u = np.asarray(u, np.float64)

    def random(self, n):
        return self.u[:n]


def ref_sample_step(logits, present, settings, u) -> np.ndarray:
    """sample_step's specification: generation.py's own processors and sampler, row by row.

    logits [nb, V] float32; present [nb, V] (ids already in the row; None without a penalty); settings as
    generation._settings returns; u [nb] the uniform draws. Returns the chosen ids [nb]."""
    from ..generation import process_logits, sample, softmax

    out = []
    for b in range(logits.shape[0]):
        z = np.asarray(logits[b:b + 1], np.float32)
        history = np.nonzero(present[b])[0][None] if present is not None else np.zeros((1, 0), np.int64)
        z = process_logits(z, history, settings)
        if settings["do_sample"]:
            out.append(int(sample(softmax(z.astype(np.float64)), _Draws(u[b:b + 1]))[0]))
        else:
            out.append(int(np.argmax(z[0])))
    return np.array(out, np.int64)
