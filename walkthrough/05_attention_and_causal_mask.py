# %% [markdown]
# # 05 · Attention scores and the causal mask
#
# Each head compares every query with every key, turns the scores into weights with a softmax and
# averages the values with them:
#
# $$A = \mathrm{softmax}\!\Big(\frac{q\,k^\top}{\sqrt{d_{\mathrm{head}}}} + M\Big),\qquad
#   \mathrm{out} = A\,v,\qquad M_{ts} = \begin{cases}0 & s \le \mathrm{past} + t \text{ and key } s \text{ is a token}\\
#   \min(\text{dtype}) & \text{otherwise}\end{cases}$$
#
# The mask makes the model causal (a token never sees the future) and hides padding. Like transformers'
# eager path, masked scores get the dtype's most negative finite value (not $-\infty$, whose softmax would be
# NaN in a row with no visible key), and the softmax runs in float32 (float64 in float64 mode). A query with
# no visible key at all (a left pad before the row's first token) then gets weights 0 and output 0, as
# transformers' default sdpa path gives it (`attends` in the code below); nothing downstream reads it.
# The scale is $1/\sqrt{d_{\mathrm{head}}}$: $1/\sqrt{80}$ for stablelm-3b-4e1t.

# %%
import matplotlib.pyplot as plt
import numpy as np

from _common import load_default_or_tiny, record, savefig, show_source
from stablelm_ref.attention import scaled_dot_product_attention, softmax
from stablelm_ref.attention import causal_mask

show_source(causal_mask)
show_source(softmax)
show_source(scaled_dot_product_attention)

# %% [markdown]
# ## Checks against the equation written per head with NumPy
#
# A batch of two rows, the second left-padded by 3, with 2 cached positions before 6 new ones
# (so $S = 8$ keys, $T = 6$ queries).

# %%
rng = np.random.default_rng(0)
B, H, T, past, D = 2, 3, 6, 2, 16
S = past + T
q = rng.normal(size=(B, H, T, D))
k, v = rng.normal(size=(2, B, H, S, D))
pad = np.ones((B, S), dtype=bool)
pad[1, :3] = False                                                   # row 1: 3 pads on the left
mask = causal_mask(pad, B, T, past, np)                              # [B, 1, T, S]
out, probs = scaled_dot_product_attention(q, k, v, mask)

expected_out = np.zeros_like(out)
for b in range(B):
    for h in range(H):
        for t in range(T):
            visible = [s for s in range(S) if s <= past + t and pad[b, s]]
            if not visible:  # a pad query with no visible key: weights 0 and output 0 (as sdpa)
                assert (probs[b, h, t] == 0).all() and (out[b, h, t] == 0).all()
                continue     # expected_out[b, h, t] stays 0
            scores = np.array([q[b, h, t] @ k[b, h, s] / np.sqrt(D) for s in visible])
            w = np.exp(scores - scores.max())
            w /= w.sum()
            np.testing.assert_allclose(probs[b, h, t, visible], w, rtol=1e-13)
            assert np.all(np.delete(probs[b, h, t], visible) == 0)
            expected_out[b, h, t] = w @ v[b, h, visible]
np.testing.assert_allclose(out, expected_out, rtol=0, atol=1e-13)
no_key = [(b, t) for b in range(B) for t in range(T) if not any(s <= past + t and pad[b, s] for s in range(S))]
assert no_key == [(1, 0)]                                             # the check above met such a query
print("scaled_dot_product_attention == per-head softmax(q k^T / sqrt(D)) v; masked weights are exactly 0;")
print(f"queries with no visible key (batch row, t) {no_key}: weights and output exactly 0")

# %% [markdown]
# ## Attention maps of a model
#
# With a `trace` callback the model hands over `model.layers.{i}.self_attn.attn_weights`, $[B, H, T, S]$.
# Every row is a probability distribution over the keys at or before it. With the trained default model
# the heads show structure (below: heads that attend to the previous token, or to the first); a random model
# shows only noise shaped by the mask, which is why the figure says which model drew it.

# %%
run = load_default_or_tiny(dtype="float32")
cfg = run.model.config
seen, _ = record(run.model, run.ids, names=["attn_weights"])
L, Hm = cfg.num_hidden_layers, cfg.num_attention_heads
Tm = run.ids.shape[1]
for i in range(L):
    a = seen[f"model.layers.{i}.self_attn.attn_weights"][0]         # [H, T, T]
    np.testing.assert_allclose(a.sum(-1), 1, atol=1e-5)
    assert np.all(np.triu(a, k=1) == 0), "no weight on the future"
print(run, f"{L} layers x {Hm} heads: every row sums to 1, nothing above the diagonal")

# %% [markdown]
# ## Figures: the masks, and what some heads do
#
# The masks: white = the query may attend to that key, black = masked (its weight is exactly 0).
#
# The heads: two simple scores per head, averaged over the queries that have a previous token, point at what
# a head does: the weight on the **previous token** $A[t, t-1]$ and on the **first token** $A[t, 0]$ (many
# heads park their weight there when nothing else matches: an "attention sink"). The figure shows the
# scores for every head, then the maps of the two heads with the highest scores, at a size where the tokens
# can be read.

# %%
from matplotlib.patches import Patch  # noqa: E402

fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
for ax, (m, title) in zip(axes, [(causal_mask(None, 1, T, past, np)[0, 0], "causal (2 cached + 6 new)"),
                                  (np.broadcast_to(pad[1], (T, S)), "padding of row 1 (3 left pads)"),
                                  (mask[1, 0], "combined: mask[1, 0]")]):
    ax.imshow(m, cmap="Greys_r", vmin=0, vmax=1)
    ax.set(title=title, xlabel="key position s", ylabel="query t")
    ax.set_xticks(range(S)), ax.set_yticks(range(T))
fig.legend(handles=[Patch(facecolor="white", edgecolor="black", label="may attend (True)"),
                    Patch(facecolor="black", label="masked (False): weight 0")], loc="lower center", ncol=2, fontsize=9)
fig.subplots_adjust(bottom=0.2)
savefig(fig, "05_masks")

prev_score = np.zeros((L, Hm))
first_score = np.zeros((L, Hm))
for i in range(L):
    a = seen[f"model.layers.{i}.self_attn.attn_weights"][0]         # [H, T, T]
    prev_score[i] = a[:, np.arange(1, Tm), np.arange(Tm - 1)].mean(-1)   # A[t, t-1], t >= 1
    first_score[i] = a[:, 2:, 0].mean(-1)                                # A[t, 0], t >= 2 (t = 1: same as t-1)
best_prev = np.unravel_index(prev_score.argmax(), prev_score.shape)
best_first = np.unravel_index(first_score.argmax(), first_score.shape)
print(f"strongest previous-token head: layer {best_prev[0]} head {best_prev[1]} "
      f"({prev_score[best_prev]:.2f} of its weight on t-1); strongest first-token head: layer {best_first[0]} "
      f"head {best_first[1]} ({first_score[best_first]:.2f} on token 0)")

fig = plt.figure(figsize=(16, 7.5))
grid = fig.add_gridspec(2, 3, width_ratios=[0.55, 1, 1])
for r_, (score, name) in enumerate(((prev_score, "weight on the previous token"), (first_score, "weight on the first token"))):
    ax = fig.add_subplot(grid[r_, 0])
    im = ax.imshow(score, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set(title=name, xlabel="head", ylabel="layer")
    fig.colorbar(im, ax=ax, fraction=0.08)
for c_, ((i, h), what) in enumerate(((best_prev, "previous-token head"), (best_first, "head with the most weight on the first token"))):
    ax = fig.add_subplot(grid[:, 1 + c_])
    ax.imshow(seen[f"model.layers.{i}.self_attn.attn_weights"][0, h], cmap="magma", vmin=0, vmax=1)
    ax.set_title(f"layer {i}, head {h}: the {what}", fontsize=10)
    if Tm <= 64:
        ax.set_yticks(range(Tm), run.labels, fontsize=7.5)
        ax.set_xticks(range(Tm), run.labels, fontsize=7.5, rotation=90)
    ax.set(xlabel="key s", ylabel="query t")
fig.suptitle(f"attention weights A[t, s] of the {run.name} (rows: queries; bright: weight near 1)")
savefig(fig, "05_attention_maps")
