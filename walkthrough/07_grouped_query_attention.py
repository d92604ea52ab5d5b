# %% [markdown]
# # 07 · Grouped-query attention
#
# In multi-head attention (MHA) every query head has its own key and value head. Grouped-query attention
# (GQA) lets $G = H / H_{kv}$ query heads share one key/value head: stablelm-2-12b has 32 query heads and
# 8 kv heads ($G = 4$). The query head $h$ reads kv head $\lfloor h / G \rfloor$ ($D$: the head size, head_dim):
#
# $$\mathrm{out}_h = \mathrm{softmax}\!\Big(\frac{q_h\,k_{\lfloor h/G\rfloor}^\top}{\sqrt{D}} + M\Big)\,v_{\lfloor h/G\rfloor}$$
#
# So GQA **is** MHA with each kv head repeated $G$ times (transformers' `repeat_kv`). What it buys is
# memory: `k_proj`/`v_proj` are $G$ times smaller, and so is the KV cache (chapter 16), which is what limits
# long contexts and large batches. Here the queries are reshaped to $[B, H_{kv}, G, T, D]$ so that each
# kv head broadcasts over its group without being copied.

# %%
import matplotlib.pyplot as plt
import numpy as np

from _common import FAMILY, family_config, savefig, show_source, tiny_model
from stablelm_ref.attention import scaled_dot_product_attention
from stablelm_ref.kv_cache import KVCache
from stablelm_ref.attention import causal_mask

show_source(scaled_dot_product_attention, "group = heads", "scores = ")

# %% [markdown]
# ## Check 1: GQA == MHA with repeated kv heads (one attention call)

# %%
rng = np.random.default_rng(0)
B, H, KVH, T, D = 2, 8, 2, 7, 16
G = H // KVH
q = rng.normal(size=(B, H, T, D))
k, v = rng.normal(size=(2, B, KVH, T, D))
mask = causal_mask(None, B, T, 0, np)
gqa, _ = scaled_dot_product_attention(q, k, v, mask)
mha, _ = scaled_dot_product_attention(q, np.repeat(k, G, axis=1), np.repeat(v, G, axis=1), mask)  # repeat_kv
np.testing.assert_allclose(gqa, mha, rtol=0, atol=1e-13)
# and head h really reads kv head h // G:
for h in range(H):
    one, _ = scaled_dot_product_attention(q[:, h:h + 1], k[:, h // G: h // G + 1], v[:, h // G: h // G + 1], mask)
    np.testing.assert_allclose(gqa[:, h:h + 1], one, rtol=0, atol=1e-13)
print(f"GQA ({H} q heads, {KVH} kv heads) == MHA on repeated kv heads; head h reads kv head h // {G}")

# %% [markdown]
# ## Check 2: a whole GQA model == an MHA model whose k_proj / v_proj rows are repeated per head
#
# `k_proj.weight` is $[H_{kv} D, d_{model}]$: $H_{kv}$ blocks of $D$ rows. Repeating each block $G$ times
# gives an MHA checkpoint that computes exactly the same function.

# %%
gqa_model = tiny_model(seed=3, num_key_value_heads=2)                # 4 query heads, 2 kv heads, float64
mha_model = tiny_model(seed=3, num_key_value_heads=4)
c = gqa_model.config
for name, w in gqa_model.params.items():
    if ".k_proj." in name or ".v_proj." in name:
        blocks = w.reshape(c.num_key_value_heads, c.head_dim, *w.shape[1:])   # [KVH, D, (hidden)]
        w = np.repeat(blocks, c.num_key_value_groups, axis=0).reshape(-1, *w.shape[1:])
    mha_model.params[name] = w
ids = rng.integers(0, c.vocab_size, (2, 12))
np.testing.assert_allclose(gqa_model(ids).logits, mha_model(ids).logits, rtol=0, atol=1e-12)
print("tiny GQA model == MHA model with repeated kv weights (logits to 1e-12)")

# %% [markdown]
# ## Memory: the KV cache shrinks by G
#
# Per token, the cache keeps $2 \cdot L \cdot H_{kv} \cdot D$ numbers. We check `KVCache.nbytes()` against that
# formula on small shapes, then use the formula for the published models (bfloat16, 2 bytes).

# %%
def kv_bytes_per_token(cfg, itemsize=2):
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize

for kvh in (4, 2, 1):
    cfg = tiny_model(num_key_value_heads=kvh).config
    cache = KVCache(cfg, batch_size=3, max_len=50, dtype=np.float32, xp=np)
    assert cache.nbytes() == 3 * 50 * kv_bytes_per_token(cfg, 4), kvh
    print(f"tiny, kv heads {kvh}: cache of 3 x 50 positions = {cache.nbytes():,} bytes")

rows = []
for name in FAMILY:
    cfg = family_config(name)
    mha_cfg = family_config(name)
    mha_cfg.num_key_value_heads = mha_cfg.num_attention_heads
    rows.append((name, kv_bytes_per_token(cfg), kv_bytes_per_token(mha_cfg), cfg))
    print(f"{name:18s} {cfg.num_attention_heads} q heads, {cfg.num_key_value_heads:2d} kv heads: "
          f"{kv_bytes_per_token(cfg) / 1024:6.0f} KiB per token (bf16); "
          f"4096-token context: {4096 * kv_bytes_per_token(cfg) / 2**30:.2f} GiB per sequence")
assert rows[2][2] == 4 * rows[2][1], "stablelm-2-12b: 8 kv heads for 32 query heads saves 4x"

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1.2, 1]})
x = np.arange(len(rows))
axes[0].bar(x - 0.2, [r[2] / 1024 for r in rows], 0.4, label="if every head had its own k, v (MHA)", color="lightgray")
axes[0].bar(x + 0.2, [r[1] / 1024 for r in rows], 0.4, label="as published", color="tab:blue")
axes[0].set_xticks(x, [f"{r[0].replace('stablelm-', '')}\n{r[3].num_attention_heads}q / {r[3].num_key_value_heads}kv"
                       for r in rows])
axes[0].set(ylabel="KV cache per token (KiB, bf16)", title="KV cache per token")
axes[0].legend(fontsize=8)
cfg12 = family_config("stablelm-2-12b")
Hq, Hk = cfg12.num_attention_heads, cfg12.num_key_value_heads
assign = np.zeros((Hk, Hq))
assign[np.arange(Hq) // (Hq // Hk), np.arange(Hq)] = 1
axes[1].imshow(assign, cmap="Blues", aspect="auto")
axes[1].set(title="stablelm-2-12b: which kv head each query head reads", xlabel="query head h",
            ylabel="kv head h // 4")
savefig(fig, "07_grouped_query_attention")
