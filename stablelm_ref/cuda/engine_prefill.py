"""The decode engine's own prompt pass (GpuDecodeEngine.prefill): the model's forward over a prompt as CuPy
float32 operations and cuBLAS, the activations rounded to bf16 where the decode kernels round (h, q/k/v in
the cache, the attention output, the MLP's product), filling the engine's KV cache and device state and
picking the first new token.

model.generate does not use it: there the model's own forward fills the engine's cache through its views
(GpuDecodeEngine.kv_cache, fast_gpu.py). The engine's tests and probes use it where there is no
StableLmForCausalLM (transformers' weights, random weights in tools/).
"""

from __future__ import annotations

import numpy as np

from ..errors import GenerationError
from . import xp
from .bf16 import bf16_bits_to_f32, f32_to_bf16_bits, round_bf16


def _layernorm(x, w, b, eps):
    cp = xp.cupy()
    mean = x.mean(axis=-1, keepdims=True)
    var = cp.square(x - mean).mean(axis=-1, keepdims=True)
    y = (x - mean) / cp.sqrt(var + eps) * w
    return y if b is None else y + b


def _rope(x, cos, sin, rot):
    """GPT-NeoX rotary on the first rot dims: x1 cos - x2 sin | x2 cos + x1 sin | untouched rest."""
    cp = xp.cupy()
    if rot == 0:
        return x
    half = rot // 2
    x1, x2 = x[..., :half], x[..., half:rot]
    return cp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]], axis=-1)


def prefill(engine, input_ids, attention_mask=None, *, logits: str | None = "last"):
    """GpuDecodeEngine.prefill (its docstring says what it returns)."""
    cp = engine.cp
    ids = np.asarray(cp.asnumpy(input_ids) if isinstance(input_ids, cp.ndarray) else input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise GenerationError(f"input_ids must have shape [batch, seq_len], got {ids.shape}")
    B, T = ids.shape
    if attention_mask is None:
        mask = np.ones((B, T), np.int32)
    else:
        mask = np.asarray(cp.asnumpy(attention_mask) if isinstance(attention_mask, cp.ndarray)
                          else attention_mask).astype(np.int32).reshape(B, T)
    if B > engine.max_batch:
        raise GenerationError(f"batch {B} is larger than max_batch={engine.max_batch} of this engine")
    if T >= engine.max_len:
        raise GenerationError(f"prompt of {T} tokens leaves no room in the cache (max_len={engine.max_len})")
    if ids.min() < 0 or ids.max() >= engine.vocab:
        raise GenerationError(f"input ids must lie in [0, {engine.vocab})")
    if not np.all(mask.sum(1) > 0) or not np.all((mask == 0) | (mask == 1)):
        raise GenerationError("attention_mask must be 0/1 with at least one 1 per row")
    H, KVH, D, G, rot = engine.H, engine.KVH, engine.D, engine.G, engine.rot
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)            # generate(): positions from the mask
    with engine.stream:
        ids_d = cp.asarray(ids.astype(np.int32))
        mask_d = cp.asarray(mask.astype(bool))
        x = bf16_bits_to_f32(engine.embed[ids_d])                                   # [B, T, hidden]
        allowed = cp.tril(cp.ones((T, T), dtype=bool))[None] & mask_d[:, None, :]  # [B, T(q), T(k)]
        allowed |= cp.eye(T, dtype=bool)[None]                  # a pad query sees itself: finite, unused
        allowed = allowed[:, None]                                                 # [B, 1, T, T]
        ang = cp.asarray(pos.astype(np.float32))[..., None] * engine.inv_freq[: max(rot // 2, 1)]
        cos, sin = cp.cos(ang)[:, None], cp.sin(ang)[:, None]                      # [B, 1, T, rot/2]
        scale = np.float32(D ** -0.5)
        for i, L in enumerate(engine.layers):
            h = round_bf16(_layernorm(x, L.ln1_w, L.ln1_b, engine.eps))             # [B, T, hidden]
            qkv = h @ bf16_bits_to_f32(L.wqkv).T                                   # [B, T, (H+2KVH) D]
            if L.bqkv is not None:
                qkv += L.bqkv
            q = qkv[..., : H * D].reshape(B, T, H, D).transpose(0, 2, 1, 3)       # [B, H, T, D]
            k = qkv[..., H * D:(H + KVH) * D].reshape(B, T, KVH, D).transpose(0, 2, 1, 3)
            v = qkv[..., (H + KVH) * D:].reshape(B, T, KVH, D).transpose(0, 2, 1, 3)
            if engine.qk_ln:
                q = _layernorm(q, L.qn[None, :, None, :], None, engine.eps)
                k = _layernorm(k, L.kn[None, :, None, :], None, engine.eps)
            q, k = _rope(q, cos, sin, rot), _rope(k, cos, sin, rot)
            k, v = round_bf16(k), round_bf16(v)                                     # the cache is bf16
            engine.kc[i, :B, :, :T] = f32_to_bf16_bits(k)
            engine.vc[i, :B, :, :T] = f32_to_bf16_bits(v)
            kk, vv = cp.repeat(k, G, axis=1), cp.repeat(v, G, axis=1)               # [B, H, T, D]
            s = (q * scale) @ kk.transpose(0, 1, 3, 2)                              # [B, H, T, T]
            s = cp.where(allowed, s, cp.float32(-np.inf))
            p = cp.exp(s - s.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            a = round_bf16((p @ vv).transpose(0, 2, 1, 3).reshape(B, T, H * D))    # [B, T, H D]
            x = x + a @ bf16_bits_to_f32(L.wo).T
            h2 = h if engine.parallel else round_bf16(_layernorm(x, L.ln2_w, L.ln2_b, engine.eps))
            gu = h2 @ bf16_bits_to_f32(L.wgu).T                                     # [B, T, 2I]
            g, u = gu[..., 0::2], gu[..., 1::2]
            x = x + round_bf16(g / (1 + cp.exp(-g)) * u) @ bf16_bits_to_f32(L.wd).T
        hf = round_bf16(_layernorm(x, engine.norm_w, engine.norm_b, engine.eps))
        wl = bf16_bits_to_f32(engine.lm)
        out = (hf if logits == "all" else hf[:, -1:]) @ wl.T                        # [B, T or 1, V]
        last = out[:, -1]
        del wl
        engine.start(mask)                                  # device state for decode_step()
        first = cp.argmax(last, axis=1).astype(cp.int32)
        engine.tok[:B] = first
        engine.history[0, :B] = first
        engine.logits_buf[:B] = last
        result = None if logits is None else cp.asnumpy(out if logits == "all" else last, stream=engine.stream)
    engine.stream.synchronize()
    return result
