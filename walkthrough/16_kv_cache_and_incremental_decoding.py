# %% [markdown]
# # 16 · The KV cache and incremental decoding
#
# Generating text is a loop: run the model, pick the next token, append it, run again. Because attention is
# causal, the keys and values of earlier positions never change when tokens are appended. So each layer keeps
# them in a cache, and a decoding step computes $q, k, v$ for the **new** position only:
#
# $$K^{(l)}_{0..t} = [\,K^{(l)}_{0..t-1};\ k^{(l)}_t\,],\qquad V^{(l)}_{0..t} = [\,V^{(l)}_{0..t-1};\ v^{(l)}_t\,],\qquad
#   \mathrm{out}_t = \mathrm{softmax}\big(q_t K_{0..t}^\top/\sqrt{d_{\mathrm{head}}}\big)\,V_{0..t}$$
#
# A step then costs $O(t)$ attention work instead of re-running all $t$ positions through every matrix.
# The price is memory: $2 \cdot L \cdot H_{kv} \cdot d_{\mathrm{head}}$ numbers per token and sequence.
# `KVCache` preallocates `[B, kv_heads, max_len, head_dim]` per layer and writes in place (no concatenation:
# fixed shapes, which a CUDA graph needs); the keys are stored **after** rotary, with their own positions.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

from _common import (FAMILY, family_config, load_default_or_tiny, record, savefig, show_source, tiny_config,
                     tiny_model)
from stablelm_ref import KVCache, StableLmForCausalLM
from stablelm_ref.model import StableLmPreTrainedModel

show_source(KVCache.reserve)
show_source(KVCache.update)
show_source(StableLmPreTrainedModel._prepare_inputs, "cache = past_key_values", "cache.reserve(t)")

# %% [markdown]
# ## Check 1: incremental == full forward
#
# For each StableLM variant (3b-like; 1.6b-like with qkv bias; 12b-like with GQA, qk LayerNorm and the
# parallel block), in float64: a prompt of 5 tokens, then 3 tokens, then one at a time, through one cache,
# must give the logits of a single forward over the whole sequence (rounding only: 1e-10).

# %%
variants = {"3b": {}, "1_6b": dict(use_qkv_bias=True),
            "12b": dict(num_key_value_heads=2, qk_layernorm=True, use_parallel_residual=True)}
rng = np.random.default_rng(0)
ids = rng.integers(0, 101, (2, 16))
for name, overrides in variants.items():
    model = tiny_model(seed=12, **overrides)
    full = model(ids).logits                                          # [2, 16, V]
    cache = KVCache(model.config, 2, 16, model.dtype, np)
    pieces, start = [], 0
    for size in [5, 3] + [1] * 8:
        out = model(ids[:, start:start + size], past_key_values=cache, use_cache=True)
        pieces.append(out.logits)
        start += size
    assert cache.length == 16
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=0, atol=1e-10)
    seen, _ = record(model, ids, names=["rotary_k", "v_proj"])
    for layer in range(model.config.num_hidden_layers):                # the cache holds the rotated keys
        np.testing.assert_allclose(cache.keys[layer], seen[f"model.layers.{layer}.self_attn.rotary_k"], atol=1e-12)
        np.testing.assert_allclose(cache.values[layer], seen[f"model.layers.{layer}.self_attn.v_proj"], atol=1e-12)
    print(f"{name:5s}: 5 + 3 + 8x1 tokens through the cache == one full forward; cache == traced rotary_k, v_proj")

# %% [markdown]
# ## Check 2: a greedy decoding loop with the cache
#
# The whole of greedy generation, written with the model's own API: one forward over the prompt (prefill),
# then one token per forward (decode). It must choose the same tokens as the naive loop that re-runs the whole
# sequence every step. (The project's `generate` adds sampling, stopping and streaming: chapter 17.)

# %%
def greedy_with_cache(model, prompt, new_tokens):
    cache = KVCache(model.config, 1, prompt.shape[1] + new_tokens, model.dtype, model.xp)
    out = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)  # prefill
    tokens = []
    for _ in range(new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        out = model([[nxt]], past_key_values=cache, use_cache=True)   # decode: one position
    return tokens


def greedy_without_cache(model, prompt, new_tokens):
    seq = prompt.copy()
    for _ in range(new_tokens):
        nxt = int(model(seq, logits_to_keep=1).logits[0, -1].argmax())
        seq = np.concatenate([seq, [[nxt]]], axis=1)
    return seq[0, prompt.shape[1]:].tolist()


run = load_default_or_tiny(dtype="float64")  # float64: no near-tie of two logits can flip an argmax
prompt = run.ids[:, : max(4, run.ids.shape[1] // 2)]
n_new = min(24, run.model.config.max_position_embeddings - prompt.shape[1])
fast = greedy_with_cache(run.model, prompt, n_new)
slow = greedy_without_cache(run.model, prompt, n_new)
assert fast == slow, (fast, slow)
print(run, f"greedy, {n_new} new tokens, with cache == without:", fast)
if run.tokenizer is not None:
    print("prompt:", repr(run.tokenizer.decode(prompt[0].tolist())))
    print("continuation:", repr(run.tokenizer.decode(fast)))

# %% [markdown]
# ## Memory and time as the sequence grows
#
# Left: the cache of the published models in bfloat16 for one sequence, by length. Middle: the actual
# `nbytes()` of a growable cache (created implicitly by `use_cache=True` without a cache: it doubles when
# full) against what the tokens need and a cache preallocated for the final length (what `generate` makes).
# Right: wall time of one decoding step on this CPU, with the cache and by re-running the sequence, for a
# small random model (hidden 256, 4 layers): the naive step grows with the length, the cached one barely.

# %%
lengths = np.arange(1, 4097)
growable = KVCache(tiny_model().config, 1, 1, np.float32, np, growable=True)
need, held = [], []
for t in range(1, 201):
    growable.reserve(1)
    growable.advance(1)
    need.append(t * growable.nbytes() // growable.max_len)
    held.append(growable.nbytes())
assert growable.max_len == 256 and held[-1] == 256 * need[0], "doubling: 1, 2, 4, ..., 256 positions"

medium = StableLmForCausalLM.from_config(
    tiny_config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, max_position_embeddings=320),
    seed=0, dtype="float32")
seq = rng.integers(0, 512, (1, 257))
steps = list(range(32, 257, 32))
cached_t, naive_t = [], []
for t in steps:
    cache = KVCache(medium.config, 1, t + 1, np.float32, np)
    medium(seq[:, :t], past_key_values=cache, use_cache=True, logits_to_keep=1)
    best_c = best_n = np.inf
    for _ in range(2):
        c = KVCache(medium.config, 1, t + 1, np.float32, np)           # same prefix, fresh copy per repeat
        for layer in range(medium.config.num_hidden_layers):
            c.keys[layer][:] = cache.keys[layer]
            c.values[layer][:] = cache.values[layer]
        c.length = t
        t0 = time.perf_counter()
        medium(seq[:, t:t + 1], past_key_values=c, use_cache=True)
        best_c = min(best_c, time.perf_counter() - t0)
        t0 = time.perf_counter()
        medium(seq[:, :t + 1], logits_to_keep=1)
        best_n = min(best_n, time.perf_counter() - t0)
    cached_t.append(best_c * 1e3)
    naive_t.append(best_n * 1e3)
print(f"decode step at length 256: {cached_t[-1]:.2f} ms with the cache, {naive_t[-1]:.2f} ms re-running "
      f"({naive_t[-1] / cached_t[-1]:.0f}x)")

fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
for name in FAMILY:
    cfg = family_config(name)
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    axes[0].plot(lengths, lengths * per_token / 2**30, label=f"{name} ({cfg.num_key_value_heads} kv heads)")
axes[0].set(title="KV cache of one sequence (bfloat16)", xlabel="sequence length", ylabel="GiB")
axes[0].legend(fontsize=8)
ts = np.arange(1, 201)
axes[1].plot(ts, np.array(need) / 1024, label="needed by t tokens")
axes[1].step(ts, np.array(held) / 1024, where="post", label="growable cache (doubles when full)")
axes[1].axhline(200 * need[0] / 1024, color="gray", ls=":", label="preallocated for 200 (generate)")
axes[1].set(title="tiny model, float32: KVCache.nbytes()", xlabel="tokens so far", ylabel="KiB")
axes[1].legend(fontsize=8)
axes[2].plot(steps, naive_t, "o-", label="re-run the whole sequence")
axes[2].plot(steps, cached_t, "s-", label="one position + KV cache")
axes[2].set_gid("measured")                      # timings: the figure record compares this panel's texts only
axes[2].set(title="time of one decoding step (hidden 256, 4 layers, CPU)", xlabel="sequence length", ylabel="ms")
axes[2].legend(fontsize=8)
savefig(fig, "16_kv_cache")
