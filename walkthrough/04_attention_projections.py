# %% [markdown]
# # 04 · Attention projections: q, k, v, the heads, and o
#
# Attention starts and ends with plain matrix products. From the normalised residual stream $h \in \mathbb{R}^{T\times d}$
# of one row, every layer computes
#
# $$q = h W_q^\top + b_q,\qquad k = h W_k^\top + b_k,\qquad v = h W_v^\top + b_v
#   \qquad (W_q: [H D, d],\ \ W_k, W_v: [H_{kv} D, d])$$
#
# and **splits** them into heads: columns $jD .. (j+1)D$ of $q$ are head $j$, so `q_proj.weight`'s rows
# $jD .. (j+1)D$ belong to head $j$ alone; $[T, HD] \to [H, T, D]$ is a reshape and a transpose. The heads attend
# independently (chapters 05-08), then are **merged** back, $[H, T, D] \to [T, HD]$, and projected by
# $W_o: [d, HD]$ (`o_proj`, no bias). Because the merge is a concatenation, the output is a *sum over heads*,
# each writing into the residual stream through its own slice of $W_o$:
#
# $$\mathrm{attn}(h) = \mathrm{concat}_j(o_j)\,W_o^\top = \sum_{j=1}^{H} o_j\,W_o[:, jD:(j+1)D]^\top$$
#
# The biases $b_q, b_k, b_v$ exist only with `use_qkv_bias` (stablelm-2-1.6b, and the default model here).
# Checkpoint tensors: `model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}`, `...o_proj.weight`.

# %%
import matplotlib.pyplot as plt
import numpy as np

from _common import load_default_or_tiny, record, savefig, show_source, tiny_model
from stablelm_ref.attention import merge_heads, split_heads

show_source(split_heads)
show_source(merge_heads)

# %% [markdown]
# ## On the default model: every head by hand
#
# The trained default model has $d$ = 384, $H$ = 6 query heads and $H_{kv}$ = 2 key/value heads of $D$ = 64, with
# q/k/v biases. From the traced input of layer 0's attention (`input_layernorm`) we recompute each head from its
# own rows of the weights, and the layer's attention output as the sum of six per-head writes; they must equal
# the traced `q_proj`, `k_proj`, `v_proj` (already split, $[B, H, T, D]$) and `self_attn.o_proj`.

# %%
run = load_default_or_tiny(dtype="float64")
model, cfg = run.model, run.model.config
P = model.params
H, KVH, D, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
print(run, f"| d={d}, H={H}, H_kv={KVH}, D={D}, qkv bias: {cfg.use_qkv_bias}")
seen, _ = record(model, run.ids)
pre = "model.layers.0.self_attn."
h = seen["model.layers.0.input_layernorm"][0]                            # [T, d]
for name, heads in (("q", H), ("k", KVH), ("v", KVH)):
    W, b = P[f"{pre}{name}_proj.weight"], P.get(f"{pre}{name}_proj.bias", np.zeros(heads * D))
    assert W.shape == (heads * D, d)
    for j in range(heads):
        by_hand = h @ W[j * D:(j + 1) * D].T + b[j * D:(j + 1) * D]     # [T, D]: head j from its own rows
        np.testing.assert_allclose(seen[f"{pre}{name}_proj"][0, j], by_hand, rtol=0, atol=1e-12)
o = seen[f"{pre}attn_output"][0]                                         # [H, T, D]
Wo = P[pre + "o_proj.weight"]                                            # [d, H*D]
writes = np.stack([o[j] @ Wo[:, j * D:(j + 1) * D].T for j in range(H)])  # [H, T, d]: what each head adds
np.testing.assert_allclose(writes.sum(0), seen[pre + "o_proj"][0], rtol=0, atol=1e-12)
print("q, k, v of every head == its own rows of W (+ b); o_proj(merge(heads)) == the sum of per-head writes")

# split then merge is the identity, and the split is a reshape: head j = columns jD..(j+1)D
x = np.random.default_rng(0).normal(size=(2, 5, H * D))
assert np.array_equal(merge_heads(split_heads(x, H, D)), x)
assert np.array_equal(split_heads(x, H, D)[:, 2], x[:, :, 2 * D:3 * D])

# %% [markdown]
# ## What the biases do
#
# A bias adds the same vector to every position. For the values that is simple: the attention weights of a query
# sum to 1, so $\sum_s a_{ts}(v_s + b_v) = \sum_s a_{ts} v_s + b_v$: $b_v$ passes straight to the output, a
# constant per layer. For the keys it is subtler. The score is $q_t\cdot(k_s + b_k)$, and $q_t \cdot b_k$ is the
# same for every key $s$: a softmax ignores a constant added to all its inputs, so $b_k$ would do nothing,
# except that rotary turns the first `rotary_ndims` dims of each key by its position (chapter 06), so there
# $b_k$ is no longer the same for every key. We check both on a tiny qkv-bias model (no qk LayerNorm, which would
# mix the dims): zeroing the pass-through part of $b_k$ leaves the attention weights unchanged to rounding;
# zeroing its rotated part does not. ($b_q$ is not constant across *queries* in that sense: it shifts each
# query's scores by $b_q\cdot k_s$, which differs per key.)

# %%
tiny = tiny_model(seed=4, use_qkv_bias=True)
tc = tiny.config
ids = np.random.default_rng(1).integers(0, tc.vocab_size, (1, 12))
base, _ = record(tiny, ids, names=["attn_weights", "attn_output", "v_proj"])


def weights_with(bias_edit):
    m = tiny_model(seed=4, use_qkv_bias=True)
    m.params = dict(tiny.params)
    for i in range(tc.num_hidden_layers):
        name = f"model.layers.{i}.self_attn.k_proj.bias"
        b = m.params[name].reshape(tc.num_key_value_heads, tc.head_dim).copy()
        bias_edit(b)
        m.params[name] = b.reshape(-1)
    seen_, _ = record(m, ids, names=["layers.0.self_attn.attn_weights"])
    return seen_["model.layers.0.self_attn.attn_weights"]


r = tc.rotary_ndims
a0 = base["model.layers.0.self_attn.attn_weights"]
no_pass = weights_with(lambda b: b.__setitem__((slice(None), slice(r, None)), 0))
no_rot = weights_with(lambda b: b.__setitem__((slice(None), slice(0, r)), 0))
print(f"attention weights change by {np.abs(no_pass - a0).max():.1e} without the pass-through part of b_k, "
      f"by {np.abs(no_rot - a0).max():.1e} without its rotated part")
assert np.abs(no_pass - a0).max() < 1e-13 and np.abs(no_rot - a0).max() > 1e-4

# b_v passes through: attention over (v + b_v) == attention over v, plus b_v
bv = tiny.params["model.layers.0.self_attn.v_proj.bias"].reshape(tc.num_key_value_heads, 1, tc.head_dim)
v_no_bias = base["model.layers.0.self_attn.v_proj"][0] - bv              # [KVH, T, D]
a = base["model.layers.0.self_attn.attn_weights"][0]                    # [H, T, T]
G = tc.num_attention_heads // tc.num_key_value_heads
out_no_bias = np.stack([a[j] @ v_no_bias[j // G] for j in range(tc.num_attention_heads)])
np.testing.assert_allclose(base["model.layers.0.self_attn.attn_output"][0],
                           out_no_bias + np.repeat(bv, G, axis=0), rtol=0, atol=1e-12)
print("attention(v + b_v) == attention(v) + b_v (the weights sum to 1)")

# %% [markdown]
# ## Figures
#
# Left: layer 0's q/k/v weight rows of the default model, as the size $\lVert W_{r,:}\rVert$ of each row, with
# the head boundaries: 6 query heads and 2 kv heads of 64 rows. Middle: the biases of layer 0, by head.
# Right: how much each head writes into the residual stream (rms of $o_j W_o[:, j]^\top$) in every layer.
# In the trained model the largest q and k biases sit at the start of each head: in the rotated dims, where a
# bias is not simply a constant that the softmax cancels (this model also has qk LayerNorm, which mixes that
# argument a little: the observation is the figure's, not a proof).

# %%
all_writes = np.zeros((cfg.num_hidden_layers, H))
for i in range(cfg.num_hidden_layers):
    p = f"model.layers.{i}.self_attn."
    o_i, Wo_i = seen[p + "attn_output"][0], P[p + "o_proj.weight"]
    all_writes[i] = [np.sqrt(np.mean((o_i[j] @ Wo_i[:, j * D:(j + 1) * D].T) ** 2)) for j in range(H)]
fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [1.5, 1.5, 1]})
offset = 0
for name, heads, colour in (("q", H, "tab:blue"), ("k", KVH, "tab:orange"), ("v", KVH, "tab:green")):
    norms = np.linalg.norm(P[f"{pre}{name}_proj.weight"], axis=1)
    axes[0].plot(np.arange(offset, offset + heads * D), norms, lw=0.8, color=colour, label=f"{name}_proj ({heads} heads)")
    if cfg.use_qkv_bias:
        axes[1].plot(np.arange(offset, offset + heads * D), P[f"{pre}{name}_proj.bias"], lw=0.8, color=colour,
                     label=f"{name}_proj.bias")
    for j in range(heads + 1):
        for ax in axes[:2]:
            ax.axvline(offset + j * D, color="gray", lw=0.4)
    offset += heads * D
axes[0].set(title=f"layer 0: norm of each weight row ({run.name})", xlabel="row (q rows | k rows | v rows)",
            ylabel="||W[row, :]||")
axes[1].set(title="layer 0: the q/k/v biases", xlabel="row (q rows | k rows | v rows)", ylabel="bias")
for ax in axes[:2]:
    ax.legend(fontsize=8)
im = axes[2].imshow(all_writes, cmap="viridis", aspect="auto")
axes[2].set(title="rms of each head's write into the stream", xlabel="head j", ylabel="layer")
fig.colorbar(im, ax=axes[2], fraction=0.05)
savefig(fig, "04_attention_projections")
