# %% [markdown]
# # 08 · Per-head qk LayerNorm
#
# stablelm-2-12b (`qk_layernorm: true`) normalises every query head and every key head over its own
# head_dim, **before** rotary, with one weight vector per head and no bias:
#
# $$\hat q_h = \frac{q_h - \mu(q_h)}{\sqrt{\sigma^2(q_h) + \varepsilon}} \odot w^{(q)}_h,\qquad
#   \hat k_j = \frac{k_j - \mu(k_j)}{\sqrt{\sigma^2(k_j) + \varepsilon}} \odot w^{(k)}_j$$
#
# (checkpoint tensors `self_attn.q_layernorm.norms.{h}.weight`, `self_attn.k_layernorm.norms.{j}.weight`).
# Why: with unit weights every normalised head has norm $\approx\sqrt{D}$, rotary keeps norms, so by
# Cauchy–Schwarz every scaled score obeys $|\hat q\cdot\hat k|/\sqrt D \le \sqrt D$ however large the
# q/k *projections* grow. With learned weights the bound becomes
# $|\hat q\cdot\hat k|/\sqrt D \le \sqrt D\,\max_i |w^{(q)}_{h,i}|\,\max_i |w^{(k)}_{j,i}|$: the logits are
# bounded by the qk-norm weights, not by the projections. Those weights are learned too and can grow, but they
# are $(H + H_{kv})\,D$ numbers per layer ($H$ query heads, $H_{kv}$ kv heads: stablelm-2-12b is GQA, chapter 07;
# $32 \cdot 160 + 8 \cdot 160 = 6400$) that the optimiser moves slowly, instead of the $d\,(H + H_{kv})\,D$
# entries of $W_q, W_k$ ($d$ the hidden size: 32.8 million) whose growth multiplies the scores. That removes the usual route to exploding attention logits
# and a softmax collapsed onto one key, a known instability of large-model training.

# %%
import matplotlib.pyplot as plt
import numpy as np

from _common import family_config, record, savefig, show_source, tiny_model
from stablelm_ref import checkpoint
from stablelm_ref.attention import attention
from stablelm_ref.layernorm import layer_norm, per_head_layer_norm

show_source(per_head_layer_norm)
show_source(attention, "if config.qk_layernorm", 'trace("q_layernorm"')

# %% [markdown]
# ## Checks
#
# 1. `per_head_layer_norm` equals a loop of plain LayerNorms, one per head with its own weight and no bias.
# 2. Inside a model (float64, tiny stablelm-2-12b-like config with 4 query and 2 kv heads) the traced
#    `q_layernorm` / `k_layernorm` equal that loop applied to the traced `q_proj` / `k_proj`.
# 3. With unit weights the scaled scores stay within $\pm\sqrt{D}$ even when the projections are multiplied by 1000;
#    with the weights scaled by $c$, within $c^2\sqrt D$: the bound moves with the qk-norm weights only.

# %%
rng = np.random.default_rng(0)
B, H, T, D, eps = 2, 4, 5, 16, 1e-5
x = rng.normal(2.0, 3.0, size=(B, H, T, D))
w = rng.normal(1.0, 0.3, size=(H, D))
loop = np.stack([layer_norm(x[:, h], w[h], None, eps) for h in range(H)], axis=1)
np.testing.assert_allclose(per_head_layer_norm(x, list(w), eps), loop, rtol=0, atol=1e-13)

model = tiny_model(seed=5, qk_layernorm=True, num_key_value_heads=2, use_parallel_residual=True)
cfg = model.config
ids = rng.integers(0, cfg.vocab_size, (1, 10))
seen, _ = record(model, ids, names=["self_attn."])
for i in range(cfg.num_hidden_layers):
    p = f"model.layers.{i}.self_attn."
    for which, heads in (("q", cfg.num_attention_heads), ("k", cfg.num_key_value_heads)):
        ws = [model.params[f"{p}{which}_layernorm.norms.{h}.weight"] for h in range(heads)]
        raw = seen[f"{p}{which}_proj"]                                # [B, heads, T, D]
        by_loop = np.stack([layer_norm(raw[:, h], ws[h], None, cfg.layer_norm_eps) for h in range(heads)], 1)
        np.testing.assert_allclose(seen[f"{p}{which}_layernorm"], by_loop, rtol=0, atol=1e-13)
print("per-head LayerNorm == loop of LayerNorms; the model's traced q/k_layernorm agree")

# The counts of the text, from the tensors the checkpoint of stablelm-2-12b holds (one layer)
shapes12 = checkpoint.expected_shapes(family_config("stablelm-2-12b"), "base")
c12 = family_config("stablelm-2-12b")
layer0 = {n: s for n, s in shapes12.items() if n.startswith("model.layers.0.self_attn.")}
norm_numbers = sum(int(np.prod(s)) for n, s in layer0.items() if "_layernorm.norms." in n)
proj_numbers = sum(int(np.prod(layer0[f"model.layers.0.self_attn.{w}_proj.weight"])) for w in "qk")
H12, Hkv12, D12, d12 = c12.num_attention_heads, c12.num_key_value_heads, c12.head_dim, c12.hidden_size
assert norm_numbers == (H12 + Hkv12) * D12 == 6400 and proj_numbers == d12 * (H12 + Hkv12) * D12
print(f"stablelm-2-12b, one layer: qk-norm weights (H + H_kv) D = ({H12} + {Hkv12}) * {D12} = {norm_numbers}; "
      f"W_q, W_k: d (H + H_kv) D = {proj_numbers:,}")


# %% [markdown]
# ## What it does to the attention logits as the projections grow
#
# We multiply `q_proj.weight` and `k_proj.weight` of a tiny model by a growing factor $s$ and look at the
# scaled scores $\mathrm{rot}(q)\cdot\mathrm{rot}(k)/\sqrt D$ (from the traced `rotary_q`, `rotary_k`) and at
# the entropy of each attention row. Without qk LayerNorm the largest score grows like $s^2$ and the
# attention collapses to one key (entropy → 0); with it (unit weights) nothing moves. With the qk-norm weights set
# to 3 the plateau sits 9 times higher: the weights, not the projections, set the bound.

# %%
def scaled_model(qk_norm, s, norm_weight=1.0):
    """the tiny model with its q and k projections scaled by s and every qk-norm weight set to norm_weight"""
    m = tiny_model(seed=6, qk_layernorm=qk_norm)
    for name in list(m.params):
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            m.params[name] = m.params[name] * s
        if "q_layernorm" in name or "k_layernorm" in name:
            m.params[name] = np.full_like(m.params[name], norm_weight)
    return m


def logits_and_entropy(qk_norm, s):
    m = scaled_model(qk_norm, s)
    seen, _ = record(m, ids, names=["layers.0.self_attn.rotary", "layers.0.self_attn.attn_weights"])
    rq, rk = seen["model.layers.0.self_attn.rotary_q"], seen["model.layers.0.self_attn.rotary_k"]
    scores = rq @ np.swapaxes(rk, -1, -2) / np.sqrt(m.config.head_dim)  # [B, H, T, T]
    visible = np.tril(np.ones(scores.shape[-2:], bool))
    a = seen["model.layers.0.self_attn.attn_weights"]
    entropy = max(0.0, float(-(a * np.log(np.where(a > 0, a, 1))).sum(-1).mean()))  # clip -0.0 from rounding
    return np.abs(scores[..., visible]).max(), entropy

scales = np.logspace(-1, 3, 13)
curves = {flag: np.array([logits_and_entropy(flag, s)[:2] for s in scales]) for flag in (False, True)}
Dm = tiny_model().config.head_dim


def max_score_with_norm_weights(c_w, s):
    """largest scaled score with qk-norm weights all equal to c_w and the projections scaled by s"""
    m = scaled_model(True, s, c_w)
    seen_, _ = record(m, ids, names=["layers.0.self_attn.rotary"])
    sc = seen_["model.layers.0.self_attn.rotary_q"] @ np.swapaxes(seen_["model.layers.0.self_attn.rotary_k"], -1, -2)
    return np.abs(sc / np.sqrt(Dm)).max()


for c_w in (1.0, 3.0):
    worst = max(max_score_with_norm_weights(c_w, s) for s in (1.0, 1000.0))
    assert worst <= c_w ** 2 * np.sqrt(Dm) + 1e-9, (c_w, worst)
    print(f"qk-norm weights = {c_w}: largest |score| {worst:.2f} <= {c_w ** 2:.0f} sqrt(D) = {c_w ** 2 * np.sqrt(Dm):.2f}")
assert curves[True][:, 0].max() <= np.sqrt(Dm) + 1e-9, "qk LayerNorm bounds every scaled score by sqrt(D)"
assert curves[False][-1, 0] > 100 * np.sqrt(Dm) and curves[False][-1, 1] < 0.05, "without it, the softmax collapses"
for s, (a0, e0), (a1, e1) in zip(scales, curves[False], curves[True]):
    print(f"s = {s:8.2f}: max |score| {a0:12.2f} -> {a1:6.2f} with qk LN;  row entropy {e0:5.3f} -> {e1:5.3f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
for flag, style in ((False, "o-"), (True, "s-")):
    label = "with qk LayerNorm" if flag else "without"
    axes[0].loglog(scales, curves[flag][:, 0], style, label=label)
    axes[1].semilogx(scales, curves[flag][:, 1], style, label=label)
weighted = [max_score_with_norm_weights(3.0, s) for s in scales]
axes[0].loglog(scales, weighted, "^-", color="tab:green", label="with qk LayerNorm, weights = 3")
axes[0].axhline(np.sqrt(Dm), color="gray", ls=":", label=f"sqrt(D) = {np.sqrt(Dm):.0f}")
axes[0].axhline(9 * np.sqrt(Dm), color="tab:green", ls=":", label="3^2 sqrt(D)")
axes[0].set(title="largest |q.k| / sqrt(D), layer 0", xlabel="scale s of q_proj, k_proj")
axes[1].axhline(np.log(np.arange(1, ids.shape[1] + 1)).mean(), color="gray", ls=":",
                label="uniform over the visible keys")
axes[1].set(title="mean entropy of an attention row (nats)", xlabel="scale s of q_proj, k_proj")
for ax in axes:
    ax.legend(fontsize=8)
savefig(fig, "08_qk_layernorm")
