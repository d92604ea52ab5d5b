"""A faster CPU forward for StableLmForCausalLM: the same function, restructured for NumPy + BLAS.

    fast = model.fast()                      # or FastCpuModel(model); float32 or float64, NumPy only
    out = fast(ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
               logits_to_keep=0)             # -> ModelOutput(.logits, .past_key_values), as model(...)

The concept files (layernorm.py, attention.py, mlp.py, decoder_layer.py, model.py, heads.py) stay the
specification; this file computes exactly the same equations and is tested equal to them
(tests/test_fast_cpu.py). Nothing here is new mathematics; the speed comes from the structure:

- Fused weights, stored once, transposed for BLAS. Per layer
      W_qkv^T = [Wq; Wk; Wv]^T   [hidden, (H + 2 KVH) D]     one GEMM instead of three
      W_gu^T  = [Wgate; Wup]^T   [hidden, 2 I]               one GEMM instead of two
      W_o^T [H D, hidden],  W_down^T [I, hidden]
  as C-contiguous [in, out] matrices, so y = x W^T is a plain row-major GEMM (or GEMV while decoding);
  W_lm stays [vocab, hidden] (used transposed in place: copying the largest matrix would raise peak
  memory at load by its size).
  The model's `params` entries become views into these matrices: the weights are not held twice, and
  the reference model keeps working on the same numbers.
- Work buffers allocated once per (batch, new tokens) shape and written in place (`out=`): a decode
  step allocates nothing proportional to the model.
- The KV cache is the preallocated kv_cache.KVCache; new keys are rotated straight into it.
- q, k, v are never copied into separate head-major arrays except q (one transposed copy); the
  attention output is written by the matmul directly in [B, T, H, D] order, ready for o_proj.
- The final LayerNorm and the lm_head run only on the positions whose logits are kept
  (logits_to_keep=1 while decoding: one row of [vocab] per sequence, not T).
- No mask work when none is needed (one new token, no padding).

Rounding: float64 results agree with the reference to ~1e-15 relative (different BLAS calls sum in
different orders); float32 to a few ulp of the logits' scale (see the test's tolerance).
Requests the fast path does not cover (labels, output_hidden_states, trace) run the reference.
"""

from __future__ import annotations

import numpy as np

from .errors import GenerationError, StableLmError
from .fast_forms import register
from .mlp import ACTIVATIONS
from ._xp import to_host
from .model import ModelOutput, causal_mask
from .rotary import rotary_cos_sin


def _fuse_transposed(params, names):
    """[W_1; W_2; ...]^T as one C-contiguous [in, sum(out)] matrix; params[name] becomes a view of it."""
    weights = [params[n] for n in names]
    fused = np.empty((weights[0].shape[1], sum(w.shape[0] for w in weights)), dtype=weights[0].dtype)
    start = 0
    for name, w in zip(names, weights):
        stop = start + w.shape[0]
        fused[:, start:stop] = w.T                                   # [out, in] -> [in, out]
        params[name] = fused[:, start:stop].T                        # same numbers, no second copy
        start = stop
    del weights
    return fused


class _Layer:
    """The arrays of one decoder layer, fused and transposed."""

    def __init__(self, params, i, config):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        self.ln1 = (params[p + "input_layernorm.weight"], params[p + "input_layernorm.bias"])
        self.ln2 = None
        if not config.use_parallel_residual:
            self.ln2 = (params[p + "post_attention_layernorm.weight"], params[p + "post_attention_layernorm.bias"])
        self.qkv_t = _fuse_transposed(params, [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"])
        self.qkv_b = None
        if config.use_qkv_bias:
            self.qkv_b = np.concatenate([params[a + n + ".bias"] for n in ("q_proj", "k_proj", "v_proj")])
        self.q_norm = self.k_norm = None
        if config.qk_layernorm:                                          # [H, D] and [KVH, D]
            self.q_norm = np.stack([params[f"{a}q_layernorm.norms.{h}.weight"]
                                    for h in range(config.num_attention_heads)])
            self.k_norm = np.stack([params[f"{a}k_layernorm.norms.{h}.weight"]
                                    for h in range(config.num_key_value_heads)])
        self.o_t = _fuse_transposed(params, [a + "o_proj.weight"])       # [H D, hidden]
        self.gate_up_t = _fuse_transposed(params, [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
        self.down_t = _fuse_transposed(params, [p + "mlp.down_proj.weight"])  # [I, hidden]


class _Work:
    """Buffers for one (batch, new tokens) shape, reused by every layer and every call of that shape."""

    def __init__(self, b, t, config, dtype):
        h, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        e = lambda *shape: np.empty(shape, dtype=dtype)  # noqa: E731
        self.x = e(b * t, h)                       # the residual stream
        self.h = e(b * t, h)                       # LayerNorm output
        self.stat = e(b * t, 1)                    # LayerNorm mean / std
        self.qkv = e(b * t, (heads + 2 * kv) * d)
        self.q = e(b, heads, t, d)                 # rotated queries, head-major for the score GEMMs
        self.k = e(b, kv, t, d)                    # keys / values when no cache is used
        self.v = e(b, kv, t, d)
        rd = config.rotary_ndims // 2
        self.rot = e(b, t, heads, max(rd, 1))      # rotary scratch
        self.attn = e(b * t, heads * d)            # attention output, [B, T, H, D] order
        self.o = e(b * t, h)
        self.gu = e(b * t, 2 * inter)
        self.act = e(b * t, inter)
        self.den = e(b * t, inter)
        self.pos = np.empty((b * t, inter), dtype=bool)
        self.scores = e(0)                         # [B, KVH, G, T, S], grown as S grows


class FastCpuModel:
    """StableLmForCausalLM's forward for NumPy float32/float64, fused and preallocated (see module doc)."""

    _MAX_SHAPES = 4

    def __init__(self, model):
        from .heads import StableLmForCausalLM

        if not isinstance(model, StableLmForCausalLM):
            raise StableLmError(f"FastCpuModel takes a StableLmForCausalLM, got {type(model).__name__}")
        if model.xp is not np or model.dtype not in (np.float32, np.float64):
            raise StableLmError(f"FastCpuModel runs NumPy float32 or float64 models; this one is "
                                f"{model.device} {model.dtype}. Load it with device='cpu', dtype='float32'")
        self.model, self.config = model, model.config
        c, p = model.config, model.params
        self.layers = [_Layer(p, i, c) for i in range(c.num_hidden_layers)]
        self.embed = p["model.embed_tokens.weight"]                         # [vocab, hidden]
        self.norm = (p["model.norm.weight"], p["model.norm.bias"])
        # [hidden, vocab] as a view of the [vocab, hidden] matrix: a transposed copy would cost a second
        # vocab x hidden array at load (the largest one), for little gain in a GEMV of one row per sequence.
        self.lm_head_t = model.lm_head_weight.T
        self.act = None if c.hidden_act in ("silu", "swish") else ACTIVATIONS[c.hidden_act]
        self._work = {}

    # The attributes generate() and users read (config, xp, dtype, params, device, ...) are the model's.
    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name) if "model" in self.__dict__ else object.__getattribute__(self, name)

    def generate(self, input_ids, **kwargs):
        from .generation import generate

        return generate(self, input_ids, **kwargs)

    def _workspace(self, b, t):
        key = (b, t)
        if key not in self._work:
            if len(self._work) >= self._MAX_SHAPES:
                self._work.pop(next(iter(self._work)))
            self._work[key] = _Work(b, t, self.config, self.model.dtype)
        return self._work[key]

    # ---- the forward ------------------------------------------------------------------------
    def __call__(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                 logits_to_keep=0, labels=None, output_hidden_states=False, trace=None):
        if labels is not None or output_hidden_states or trace is not None:
            return self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache, labels,
                              logits_to_keep, output_hidden_states, trace)
        model, config = self.model, self.config
        ids, cache, past, mask2d, position_ids = model._prepare_inputs(input_ids, attention_mask, position_ids,
                                                                       past_key_values, use_cache)
        b, t = ids.shape                                                        # [B, T]
        if mask2d is not None and mask2d.all():
            mask2d = None                                                       # nothing to mask but causality
        rows = self._kept_rows(logits_to_keep, t)                                # positions whose logits we return

        w = self._workspace(b, t)
        np.take(self.embed, ids.reshape(-1), axis=0, out=w.x)                    # [B*T, hidden]
        cos, sin = rotary_cos_sin(position_ids, config, model.dtype)            # [B, T, d]
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]                        # [B, T, 1, d]
        blocked = None                                                           # [B, 1, 1, T, S] or None
        if mask2d is not None or t > 1:
            blocked = ~causal_mask(mask2d, b, t, past, np)[:, :, None, :, :]
        for i, layer in enumerate(self.layers):
            self._layer(w, layer, i, b, t, past, cos, sin, blocked, cache)
        if cache is not None:
            cache.advance(t)

        x = w.x.reshape(b, t, -1)
        x = x if rows is None else x[:, rows, :]                                 # [B, T', hidden]
        h = self._layer_norm(x, *self.norm, np.empty_like(x), np.empty(x.shape[:-1] + (1,), x.dtype), np.empty_like(x))
        logits = h @ self.lm_head_t                                              # [B, T', vocab]
        return ModelOutput(logits=logits, past_key_values=cache, last_hidden_state=h if rows is None else None)

    __call__.__doc__ = "Same arguments and result as StableLmForCausalLM.forward (logits, past_key_values)."

    @staticmethod
    def _kept_rows(logits_to_keep, t):
        if isinstance(logits_to_keep, (int, np.integer)) and not isinstance(logits_to_keep, bool):
            if logits_to_keep < 0:
                raise GenerationError(f"logits_to_keep must be >= 0, got {logits_to_keep}")
            return None if logits_to_keep == 0 or logits_to_keep >= t else slice(t - logits_to_keep, t)
        return np.asarray(to_host(logits_to_keep)).astype(np.int64)

    def _layer_norm(self, x, weight, bias, out, stat, sq):
        """layernorm.layer_norm with the same operations in the same order, written into `out`."""
        np.mean(x, axis=-1, keepdims=True, out=stat)
        np.subtract(x, stat, out=out)                                            # x - mean
        np.square(out, out=sq)
        np.mean(sq, axis=-1, keepdims=True, out=stat)                           # var
        np.add(stat, self.config.layer_norm_eps, out=stat)
        np.sqrt(stat, out=stat)
        np.divide(out, stat, out=out)
        np.multiply(out, weight, out=out)
        if bias is not None:
            np.add(out, bias, out=out)
        return out

    def _layer(self, w, layer, i, b, t, past, cos, sin, blocked, cache):
        c = self.config
        heads, kv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        group, rd = heads // kv, c.rotary_ndims

        # --- attention ------------------------------------------------------------------------
        self._layer_norm(w.x, *layer.ln1, w.h, w.stat, w.o)                           # [B*T, hidden]
        np.matmul(w.h, layer.qkv_t, out=w.qkv)                                   # [B*T, (H+2KVH) D]
        if layer.qkv_b is not None:
            np.add(w.qkv, layer.qkv_b, out=w.qkv)
        qkv = w.qkv.reshape(b, t, heads + 2 * kv, d)                             # [B, T, H+2KVH, D]
        q, k, v = qkv[:, :, :heads], qkv[:, :, heads:heads + kv], qkv[:, :, heads + kv:]
        if layer.q_norm is not None:                                             # per-head LayerNorm, in place
            self._head_norm(q, layer.q_norm)
            self._head_norm(k, layer.k_norm)
        if cache is not None:
            end = past + t
            k_all, v_all = cache.keys[i][:, :, :end], cache.values[i][:, :, :end]   # [B, KVH, S, D]
            k_new, v_new = cache.keys[i][:, :, past:end], cache.values[i][:, :, past:end]
        else:
            k_all = k_new = w.k
            v_all = v_new = w.v
        self._rotate_into(q, w.q.transpose(0, 2, 1, 3), cos, sin, rd, w.rot)    # [B, T, H, D] -> [B, H, T, D]
        self._rotate_into(k, k_new.transpose(0, 2, 1, 3), cos, sin, rd, w.rot[:, :, :kv])
        v_new[...] = v.transpose(0, 2, 1, 3)                                     # [B, T, KVH, D] -> [B, KVH, T, D]

        s = k_all.shape[2]
        n = b * heads * t * s
        if w.scores.size < n:
            w.scores = np.empty(max(n, 2 * w.scores.size), dtype=w.x.dtype)
        scores = w.scores[:n].reshape(b, kv, group, t, s)                        # [B, KVH, G, T, S]
        qg = w.q.reshape(b, kv, group, t, d)                                     # [B, KVH, G, T, D]
        np.matmul(qg, k_all[:, :, None].swapaxes(-1, -2), out=scores)            # q k^T
        np.multiply(scores, d ** -0.5, out=scores)
        if blocked is not None:
            np.copyto(scores, np.finfo(scores.dtype).min, where=blocked)
        np.subtract(scores, scores.max(axis=-1, keepdims=True), out=scores)      # softmax, in place
        np.exp(scores, out=scores)
        np.divide(scores, scores.sum(axis=-1, keepdims=True), out=scores)
        attn = w.attn.reshape(b, t, kv, group, d).transpose(0, 2, 3, 1, 4)       # [B, KVH, G, T, D] view
        np.matmul(scores, v_all[:, :, None], out=attn)                           # written in [B, T, H, D] order
        np.matmul(w.attn, layer.o_t, out=w.o)                                    # [B*T, H D] -> [B*T, hidden]

        # --- residual and MLP -------------------------------------------------------------------
        if layer.ln2 is None:                                                    # parallel: x + attn + mlp(h)
            np.add(w.x, w.o, out=w.x)
            self._mlp(w, layer, w.h)
        else:                                                                    # sequential
            np.add(w.x, w.o, out=w.x)
            self._layer_norm(w.x, *layer.ln2, w.h, w.stat, w.o)
            self._mlp(w, layer, w.h)
        np.add(w.x, w.o, out=w.x)

    def _mlp(self, w, layer, h):
        """down( act(h Wg^T) * (h Wu^T) ) into w.o."""
        inter = self.config.intermediate_size
        np.matmul(h, layer.gate_up_t, out=w.gu)                                  # [B*T, 2 I]
        gate, up = w.gu[:, :inter], w.gu[:, inter:]
        if self.act is None:                                                     # silu(z) = z * sigmoid(z)
            sig = w.act
            np.abs(gate, out=sig)
            np.negative(sig, out=sig)
            np.exp(sig, out=sig)                                                 # e = exp(-|z|) in (0, 1]
            np.greater_equal(gate, 0, out=w.pos)
            np.add(sig, 1.0, out=w.den)
            np.divide(sig, w.den, out=sig)                                       # e / (1 + e)
            np.divide(1.0, w.den, out=sig, where=w.pos)                          # 1 / (1 + e) where z >= 0
            np.multiply(gate, sig, out=sig)
        else:
            w.act[...] = self.act(gate)
        np.multiply(w.act, up, out=w.act)
        np.matmul(w.act, layer.down_t, out=w.o)                                  # [B*T, hidden]

    def _head_norm(self, x, weight):
        """Per-head LayerNorm (no bias) over D, in place on a [B, T, heads, D] view."""
        mean = x.mean(axis=-1, keepdims=True)
        np.subtract(x, mean, out=x)
        std = np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + self.config.layer_norm_eps)
        np.divide(x, std, out=x)
        np.multiply(x, weight, out=x)                                            # weight [heads, D]

    @staticmethod
    def _rotate_into(x, out, cos, sin, rd, tmp):
        """out = rot(x): the first rd dims of each head rotated (rotary.apply_rotary), the rest copied.
        x, out: [B, T, heads, D]; cos, sin: [B, T, 1, rd]; tmp: [B, T, heads, rd/2] scratch."""
        half = rd // 2
        if rd == 0:
            out[...] = x
            return
        x1, x2 = x[..., :half], x[..., half:rd]
        np.multiply(x[..., :rd], cos, out=out[..., :rd])                         # x cos
        np.multiply(x2, sin[..., :half], out=tmp)
        np.subtract(out[..., :half], tmp, out=out[..., :half])                   # - x2 sin
        np.multiply(x1, sin[..., half:], out=tmp)
        np.add(out[..., half:rd], tmp, out=out[..., half:rd])                    # + x1 sin
        out[..., rd:] = x[..., rd:]


register("cpu", FastCpuModel)
