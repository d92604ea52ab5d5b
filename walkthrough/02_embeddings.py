# %% [markdown]
# # 02 · Token embeddings
#
# A token id is an index into a table. The first thing StableLM does is look up one row per token:
#
# $$x_0[b, t, :] \;=\; E[\,\mathrm{ids}[b, t],\; :\,], \qquad E \in \mathbb{R}^{V \times d}\quad(\texttt{model.embed\_tokens.weight})$$
#
# which is the same as multiplying a one-hot row by the table, $x_0 = \mathrm{onehot}(\mathrm{ids})\,E$,
# only without the $V$-wide multiplication. There is no position embedding here: positions enter later,
# inside attention, by rotating queries and keys (chapter 06).
#
# At the other end, the causal-LM head maps the last hidden state back onto the vocabulary,
# $\mathrm{logits} = h\,W_{\mathrm{lm}}^\top$. With `tie_word_embeddings` $W_{\mathrm{lm}} = E$ (the
# project's small default model ties them); the published StableLM checkpoints do not tie.

# %%
import matplotlib.pyplot as plt
import numpy as np

from _common import FAMILY, family_config, load_default_or_tiny, record, savefig, show_source
from stablelm_ref.checkpoint import expected_shapes
from stablelm_ref.model import StableLmPreTrainedModel

show_source(StableLmPreTrainedModel._forward_base, "embed = p[", 'trace("model.embed_tokens"')

# %% [markdown]
# ## The lookup, checked
#
# We run a model with a `trace` callback, which receives every intermediate by name, and compare
# `model.embed_tokens` against the row lookup and the one-hot product written out by hand.

# %%
run = load_default_or_tiny(dtype="float64")
model, ids = run.model, run.ids
print(run, "| tokens:", run.labels)
seen, out = record(model, ids, names=["model.embed_tokens"])
E = model.params["model.embed_tokens.weight"]                       # [V, d]
x0 = seen["model.embed_tokens"]                                     # [1, T, d]
onehot = np.eye(model.config.vocab_size)[ids[0]]                    # [T, V]
assert np.array_equal(x0[0], E[ids[0]]), "the embedding is a row lookup"
np.testing.assert_allclose(x0[0], onehot @ E, rtol=0, atol=1e-12)
print("x0 == E[ids] exactly, and == onehot(ids) @ E to 1e-12")
print("tied lm_head:", model.config.tie_word_embeddings,
      "-> lm_head weight is E" if model.lm_head_weight is E else "-> a separate lm_head.weight")

# %% [markdown]
# ## How much of the model is the vocabulary?
#
# `expected_shapes(config)` lists every checkpoint tensor a config implies. For stablelm-3b-4e1t the
# sum is the published 2,795,443,200 parameters; we derive that figure independently from the layer
# formula $L\,(4d^2 + 3 d\,d_{ff} + 4d) + 2Vd + 2d$ (attention, SwiGLU, two LayerNorms per layer,
# untied embedding and head, final LayerNorm).

# %%
shares = {}
for name in FAMILY:
    cfg = family_config(name)
    shapes = expected_shapes(cfg, "causal_lm")
    total = sum(int(np.prod(s)) for s in shapes.values())
    vocab = sum(int(np.prod(shapes[k])) for k in ("model.embed_tokens.weight", "lm_head.weight"))
    shares[name] = (total, vocab)
    print(f"{name:18s} {total:>14,d} parameters, embed_tokens + lm_head {vocab / total:5.1%}")
c = family_config("stablelm-3b-4e1t")
d, dff, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
by_hand = L * (4 * d * d + 3 * d * dff + 4 * d) + 2 * V * d + 2 * d
assert shares["stablelm-3b-4e1t"][0] == by_hand == 2_795_443_200

# %% [markdown]
# ## Figure: the embedded sequence and how similar its tokens are
#
# Left: the embedding vectors of the sequence (one row per token). Middle: the cosine similarity between
# them. Read it with care: the brightest off-diagonal cells are the *same token id* at two positions (the
# lookup returns the same row, so their similarity is exactly 1; marked ×), not related tokens. Different ids
# stay well below that (printed: the largest similarity between two different ids). With random weights
# every pair of different ids is nearly orthogonal.

# %%
unit = E[ids[0]] / np.linalg.norm(E[ids[0]], axis=1, keepdims=True)
cos = unit @ unit.T                                                 # [T, T]
same = ids[0][:, None] == ids[0][None, :]                           # the same id at positions t and s
np.testing.assert_allclose(cos[same], 1.0, rtol=0, atol=1e-12)
off = ~np.eye(len(cos), dtype=bool)
different = cos[~same]
print(f"{int((same & off).sum()) // 2} pairs of positions hold the same id (cosine 1); between different ids the "
      f"cosine is at most {different.max():.2f} (mean {different.mean():.2f})")
fig, axes = plt.subplots(1, 3, figsize=(15, 5), gridspec_kw={"width_ratios": [1.3, 1, 0.8]})
axes[0].imshow(x0[0], aspect="auto", cmap="RdBu_r")
axes[0].set(title=f"x0 = E[ids]  ({run.name})", xlabel="hidden dim", ylabel="token")
axes[0].set_yticks(range(len(run.labels)), run.labels, fontsize=6)
im = axes[1].imshow(cos, cmap="viridis", vmin=-0.2, vmax=1)
rows_, cols_ = np.nonzero(same & off)
axes[1].plot(cols_, rows_, "x", color="red", ms=4, lw=0.5, label="same token id")
axes[1].set(title=f"cosine similarity (× same id; different ids <= {different.max():.2f})")
axes[1].legend(fontsize=7, loc="lower left")
axes[1].set_xticks(range(len(run.labels)), run.labels, rotation=90, fontsize=6)
axes[1].set_yticks(range(len(run.labels)), run.labels, fontsize=6)
fig.colorbar(im, ax=axes[1], fraction=0.046)
names = list(shares)
axes[2].bar(range(len(names)), [v / t for t, v in shares.values()], color="tab:orange")
axes[2].set_xticks(range(len(names)), [n.replace("stablelm-", "") for n in names])
axes[2].set(title="share of parameters in\nembed_tokens + lm_head", ylabel="fraction")
savefig(fig, "02_embeddings")
