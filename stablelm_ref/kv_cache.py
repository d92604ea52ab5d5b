"""The key/value cache: preallocated buffers per layer plus a length.

    keys[l], values[l]: [B, kv_heads, max_len, head_dim]        valid: [:, :, :length, :]

While decoding, the keys and values of past positions never change, so each layer keeps them and
the next step computes q, k, v for the new positions only. The buffers are allocated once, for the
whole prompt + generation (generate sizes them exactly), and written in place: no concatenation per
step, which is faster, is what a CUDA graph needs, and is easy to draw. A cache created implicitly
(`use_cache=True` without one) grows by doubling when it fills, so an unknown length still works.

Memory: 2 * layers * B * kv_heads * max_len * head_dim * bytes (stablelm-3b-4e1t, float32,
4096 positions: 2 * 32 * 32 * 4096 * 80 * 4 B = 2.7 GB per row; grouped-query attention divides it
by heads / kv_heads).

Config: num_hidden_layers, num_key_value_heads, head_dim.  Checkpoint tensors: none.
"""

from .errors import GenerationError, check_int


class KVCache:
    def __init__(self, config, batch_size, max_len, dtype, xp, growable=False):
        batch_size = check_int(batch_size, "KV cache batch_size", GenerationError, 1)
        max_len = check_int(max_len, "KV cache max_len", GenerationError, 1)
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [xp.zeros(shape, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [xp.zeros(shape, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.length = 0
        self.growable = growable
        self.xp = xp

    @classmethod
    def from_buffers(cls, keys, values, xp):
        """A cache over existing per-layer buffers [B, kv_heads, max_len, head_dim] (e.g. views of the GPU
        decode engine's cache, so that the model's own forward fills what the engine then reads)."""
        cache = cls.__new__(cls)
        cache.keys, cache.values = list(keys), list(values)
        cache.length, cache.growable, cache.xp = 0, False, xp
        return cache

    @property
    def max_len(self):
        return self.keys[0].shape[2]

    @property
    def batch_size(self):
        return self.keys[0].shape[0]

    def get_seq_length(self):
        """Number of positions already cached (transformers' name)."""
        return self.length

    def nbytes(self):
        def size(a):  # NumPy/CuPy arrays know their bytes; the array API only knows the dtype's bits
            return a.nbytes if hasattr(a, "nbytes") else int(a.size) * self.xp.finfo(a.dtype).bits // 8

        return sum(size(a) for a in self.keys + self.values)

    def reserve(self, new_tokens):
        """Make room for `new_tokens` more positions (grow by doubling if allowed), before a forward."""
        need = self.length + new_tokens
        if need <= self.max_len:
            return
        if not self.growable:
            raise GenerationError(
                f"the KV cache holds {self.max_len} positions; {self.length} are used and {new_tokens} more "
                "were given. Create it with a larger max_len"
            )
        xp = self.xp
        new_len = max(need, 2 * self.max_len)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                b, h, _, d = old.shape
                grown = xp.zeros((b, h, new_len, d), dtype=old.dtype)
                grown[:, :, : self.length, :] = old[:, :, : self.length, :]
                store[i] = grown

    def update(self, layer_idx, k, v):
        """Write k, v [B, kv_heads, T, D] after the cached positions; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.keys[layer_idx][:, :, self.length:end, :] = k
        self.values[layer_idx][:, :, self.length:end, :] = v
        return self.keys[layer_idx][:, :, :end, :], self.values[layer_idx][:, :, :end, :]  # [B, KVH, S, D]

    def advance(self, new_tokens):
        """Called once per forward, after every layer has written its new positions."""
        self.length += new_tokens
