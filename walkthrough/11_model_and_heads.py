# %% [markdown]
# # 11 · The whole model and its heads
#
# `StableLmModel` is embeddings → decoder layers → final LayerNorm (`model.norm`), giving $h \in \mathbb{R}^{B\times T\times d}$:
#
# $$x_0 = E[\mathrm{ids}],\qquad x_l = \mathrm{layer}_l(x_{l-1}),\qquad h = \mathrm{LN}(x_L),\qquad
#   \mathrm{logits} = h\,W_{\mathrm{lm}}^\top$$
#
# First we compose it by hand from the pieces of chapters 02-10, then look at the heads. A head turns $h$ into
# task outputs, and a loss compares them with labels:
#
# | class | logits | loss |
# |---|---|---|
# | `StableLmForCausalLM` | $h\,W_{\mathrm{lm}}^\top$, $[B, T, V]$ | $\frac1N\sum_{t:\,y_{t+1}\ne-100} -\log \mathrm{softmax}(\mathrm{logits}_t)[y_{t+1}]$ (shifted by one) |
# | `StableLmForSequenceClassification` | $h\,W_{\mathrm{score}}^\top$ pooled at the rightmost non-pad token, $[B, C]$ | cross-entropy; MSE if `num_labels == 1`; BCE for float multi-labels |
# | `StableLmForTokenClassification` | $h\,W_{\mathrm{score}}^\top + b$, $[B, T, C]$ | cross-entropy over tokens whose label $\ne -100$ |
#
# Losses are computed in float32 (float64 in float64 mode), from the logits.

# %%
import matplotlib.pyplot as plt
import numpy as np

from _common import load_default_or_tiny, savefig, show_source, tiny_model
from stablelm_ref import StableLmForSequenceClassification, StableLmForTokenClassification, StableLmModel
from stablelm_ref.heads import causal_lm_loss, cross_entropy, log_softmax

show_source(causal_lm_loss)
show_source(cross_entropy)
show_source(StableLmForSequenceClassification.forward, "if config.pad_token_id is None", "pooled = ")


def log_softmax_by_hand(z):                                          # float64, written out
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# %% [markdown]
# ## The model composed by hand
#
# The row lookup (02), the rotary tables for positions $0..T-1$ (06), the causal mask (05), `decoder_layer`
# (10) once per layer with its own weights, the final LayerNorm (03), the head: on the trained default model
# (sequential blocks, GQA, qk LayerNorm, qkv bias, tied head) and on a tiny 12b-like model (parallel blocks),
# both in float64, against the model's own forward. The only difference allowed is rounding: the same
# operations in the same order give the same bits, so the bound is $10^{-12}$ of the logits' scale. This checks
# the composition (the order of the pieces, the positions, the mask, the head); chapter 12 checks the whole
# forward against plain NumPy written without any of the package's functions.

# %%
from stablelm_ref._xp import subtree  # noqa: E402
from stablelm_ref.decoder_layer import decoder_layer  # noqa: E402
from stablelm_ref.layernorm import layer_norm  # noqa: E402
from stablelm_ref.rotary import rotary_cos_sin  # noqa: E402


def compose_by_hand(m, ids):
    c, P = m.config, m.params
    B, T = ids.shape
    x = P["model.embed_tokens.weight"][ids]                               # [B, T, d]
    cos, sin = rotary_cos_sin(np.broadcast_to(np.arange(T), (B, T)), c, np.float64)  # [B, T, rotary_ndims]
    for i in range(c.num_hidden_layers):   # no padding: attention builds the causal mask itself (05)
        x = decoder_layer(x, subtree(P, f"model.layers.{i}."), c, cos, sin)   # [B, T, d]
    h = layer_norm(x, P["model.norm.weight"], P["model.norm.bias"], c.layer_norm_eps)
    return h @ m.lm_head_weight.T                                         # [B, T, V]


run = load_default_or_tiny(dtype="float64")
for m, ids_, what in ((run.model, run.ids, run.name),
                      (tiny_model(seed=10, num_key_value_heads=2, qk_layernorm=True, use_parallel_residual=True),
                       np.random.default_rng(2).integers(0, 101, (2, 9)), "tiny 12b-like model")):
    ref = m(ids_).logits
    err = np.abs(compose_by_hand(m, ids_) - ref).max() / np.abs(ref).max()
    assert err <= 1e-12, (what, err)
    print(f"{what}: embedding -> {m.config.num_hidden_layers} x decoder_layer -> norm -> lm_head == model(ids) "
          f"({err:.1e} of the logits' scale)")

# %% [markdown]
# ## Causal LM: shifted cross-entropy, and the loss of a model that knows nothing
#
# Position $t$ predicts token $t+1$; labels of $-100$ are ignored. A model with tiny random weights predicts
# an almost uniform distribution, so its loss is close to $\log V$ ($\log 101 = 4.615$ nats here).

# %%
rng = np.random.default_rng(0)
model = tiny_model(seed=10, std=0.02)
V = model.config.vocab_size
ids = rng.integers(0, V, (2, 9))
labels = ids.copy()
labels[1, :4] = -100                                                 # e.g. a prompt we do not train on
out = model(ids, labels=labels)
logp = log_softmax_by_hand(out.logits)
terms = [-logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(8) if labels[b, t + 1] != -100]
assert len(terms) == 8 + 5                                          # label 0 is never predicted
np.testing.assert_allclose(out.loss, np.mean(terms), rtol=1e-12)
print(f"causal LM loss {out.loss:.4f} == mean of {len(terms)} shifted -log p; log V = {np.log(V):.4f}")
assert abs(out.loss - np.log(V)) < 0.1

base = StableLmModel(model.config, model.params)                     # the same weights, no head
h = base(ids).last_hidden_state
np.testing.assert_allclose(out.logits, h @ model.params["lm_head.weight"].T, rtol=0, atol=1e-12)
np.testing.assert_allclose(model(ids, logits_to_keep=1).logits, out.logits[:, -1:], rtol=0, atol=1e-12)
print("logits == h @ lm_head.weight^T; logits_to_keep=1 == the last position")

# %% [markdown]
# ## Sequence classification: pooling at the rightmost non-pad token
#
# A batch with one right-padded and one left-padded row (`pad_token_id` = 1). The first row is pooled at its
# last real token (position 5), the second at the last position.

# %%
seq = tiny_model(seed=11, cls=StableLmForSequenceClassification, num_labels=3, pad_token_id=1)
ids = rng.integers(2, V, (2, 8))
ids[0, 6:] = 1                                                        # right padding
ids[1, :3] = 1                                                        # left padding
y = np.array([2, 0])
out = seq(ids, attention_mask=(ids != 1).astype(int), labels=y)
h = StableLmModel(seq.config, seq.params)(ids, attention_mask=(ids != 1).astype(int)).last_hidden_state
per_token = h @ seq.params["score.weight"].T                          # [B, T, 3]
np.testing.assert_allclose(out.logits, per_token[[0, 1], [5, 7]], rtol=0, atol=1e-12)
np.testing.assert_allclose(out.loss, -np.mean(log_softmax_by_hand(out.logits)[[0, 1], y]), rtol=1e-12)
print(f"sequence classification: pooled at positions [5, 7]; cross-entropy {out.loss:.4f}")

reg = tiny_model(seed=12, cls=StableLmForSequenceClassification, num_labels=1, pad_token_id=1)
target = np.array([[0.5], [-1.0]])
r = reg(ids, labels=target)
np.testing.assert_allclose(r.loss, np.mean((r.logits - target) ** 2), rtol=1e-12)
print(f"num_labels = 1: regression, MSE {r.loss:.4f}")

# %% [markdown]
# ## Token classification: one label per token, -100 ignored

# %%
tok = tiny_model(seed=13, cls=StableLmForTokenClassification, num_labels=5)
ids = rng.integers(0, V, (2, 7))
y = rng.integers(0, 5, (2, 7))
y[:, 0] = -100
out = tok(ids, labels=y)
h = StableLmModel(tok.config, tok.params)(ids).last_hidden_state
np.testing.assert_allclose(out.logits, h @ tok.params["score.weight"].T + tok.params["score.bias"], rtol=0, atol=1e-12)
keep = y != -100
np.testing.assert_allclose(out.loss, -np.mean(log_softmax_by_hand(out.logits)[keep, y[keep]]), rtol=1e-12)
print(f"token classification: {int(keep.sum())} labelled tokens, cross-entropy {out.loss:.4f}")

# %% [markdown]
# ## Figure: what the causal LM predicts
#
# Left: the loss at each position of the sample (how surprised the model is by the next token). Right: the
# next-token distribution after the whole sample. With the trained default model the loss drops where the
# code is predictable (indentation, the second `a, b`), and the top tokens make sense; a random model is
# surprised everywhere ($\approx \log V$) and spreads its probability thinly.

# %%
out = run.model(run.ids, labels=run.ids)
logp = np.asarray(log_softmax(out.logits))[0]                         # [T, V]
per_pos = -logp[np.arange(run.ids.shape[1] - 1), run.ids[0, 1:]]     # [T-1]
np.testing.assert_allclose(per_pos.mean(), out.loss, rtol=1e-12)
V = run.model.config.vocab_size
p_last = np.exp(logp[-1])
top = np.argsort(p_last)[::-1][:15]
names = [run.tokenizer.decode([int(i)]).replace("\n", "\\n").replace(" ", "·") if run.tokenizer else f"#{i}" for i in top]
fig, axes = plt.subplots(1, 2, figsize=(15, 4.5), gridspec_kw={"width_ratios": [1.6, 1]})
axes[0].bar(range(len(per_pos)), per_pos, color="tab:blue")
axes[0].axhline(np.log(V), color="gray", ls=":", label=f"log V = {np.log(V):.2f} (uniform guess)")
axes[0].set_xticks(range(len(per_pos)), run.labels[1:], rotation=90, fontsize=7)
axes[0].set(title=f"-log p(next token), mean = loss = {out.loss:.3f}  ({run.name})", ylabel="nats")
axes[0].legend(fontsize=8)
axes[1].barh(range(len(top))[::-1], p_last[top], color="tab:orange")
axes[1].set_yticks(range(len(top))[::-1], names, fontsize=8)
axes[1].set(title="next-token probabilities after the sample (top 15)", xlabel="p")
savefig(fig, "11_causal_lm")
