# %% [markdown]
# # 03 · LayerNorm
#
# StableLM normalises with LayerNorm **with a bias** (not LLaMA's RMSNorm): before attention, before the
# MLP (sequential blocks) and once after the last layer. Over the $n$ = `hidden_size` features of one token:
#
# $$\mu = \frac1n\sum_i x_i,\qquad \sigma^2 = \frac1n\sum_i (x_i-\mu)^2,\qquad
#   y_i = \frac{x_i-\mu}{\sqrt{\sigma^2+\varepsilon}}\;w_i + b_i \qquad(\varepsilon = \texttt{layer\_norm\_eps} = 10^{-5})$$
#
# The variance is the biased one ($1/n$), and the statistics are computed in float32 even for a
# bfloat16 model (float64 in float64 mode), as torch does.

# %%
import matplotlib.pyplot as plt
import numpy as np

from _common import load_default_or_tiny, record, savefig, show_source
from stablelm_ref.layernorm import layer_norm

show_source(layer_norm)

# %% [markdown]
# ## Checks: the equation, and what normalising means
#
# 1. `layer_norm` equals the formula written with NumPy in float64.
# 2. Before the affine part ($w = 1, b = 0$) every row has mean 0 and (biased) variance $1 - \varepsilon/(\sigma^2+\varepsilon) \approx 1$.
# 3. It ignores the scale and the offset of its input: $\mathrm{LN}(a x + c) = \mathrm{LN}(x)$ for $a > 0$ (up to $\varepsilon$).

# %%
rng = np.random.default_rng(0)
n, eps = 64, 1e-5
x = rng.normal(3.0, 5.0, size=(8, n))
w, b = rng.normal(1.0, 0.3, n), rng.normal(0.0, 0.3, n)
by_hand = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b  # np.var is biased
np.testing.assert_allclose(layer_norm(x, w, b, eps), by_hand, rtol=0, atol=1e-13)

z = layer_norm(x, np.ones(n), np.zeros(n), eps)
np.testing.assert_allclose(z.mean(-1), 0, atol=1e-13)
np.testing.assert_allclose(z.var(-1), 1 - eps / (x.var(-1) + eps), rtol=1e-12)
np.testing.assert_allclose(layer_norm(1e3 * x - 7.0, w, b, 0.0), layer_norm(x, w, b, 0.0), rtol=0, atol=1e-12)

# float32 input: the statistics are taken in float32, the result comes back as float32.
y32 = layer_norm(x.astype(np.float32), w.astype(np.float32), b.astype(np.float32), eps)
assert y32.dtype == np.float32
np.testing.assert_allclose(y32, by_hand, rtol=0, atol=1e-5)
print("layer_norm == formula (1e-13); mean 0, var ~1; scale/offset invariant; float32 in -> float32 out")

# %% [markdown]
# ## In the model: the residual stream before and after `input_layernorm`
#
# (The residual stream and the layers that read it are drawn in chapter 00; chapter 10 builds the blocks.)
# The trace gives the residual stream entering each layer (`model.embed_tokens`, then `model.layers.{i}`)
# and the normalised input to its attention (`model.layers.{i}.input_layernorm`). Across layers the
# residual stream grows in scale; LayerNorm hands every sub-block inputs of a fixed scale, then $w$ and $b$
# (learned per feature) reshape them. The figure shows layer 0, where the stream is the raw embedding and
# LayerNorm changes it most.

# %%
run = load_default_or_tiny(dtype="float64")
model, cfg = run.model, run.model.config
seen, _ = record(model, run.ids)
before = seen["model.embed_tokens"]                                  # the stream entering layer 0
after = seen["model.layers.0.input_layernorm"]
p = "model.layers.0.input_layernorm."
np.testing.assert_allclose(after, layer_norm(before, model.params[p + "weight"], model.params[p + "bias"],
                                              cfg.layer_norm_eps), rtol=0, atol=1e-12)
inputs = [seen["model.embed_tokens"]] + [seen[f"model.layers.{i}"] for i in range(cfg.num_hidden_layers - 1)]
rms_in = [float(np.sqrt((v ** 2).mean())) for v in inputs]
rms_ln = [float(np.sqrt((seen[f"model.layers.{i}.input_layernorm"] ** 2).mean())) for i in range(cfg.num_hidden_layers)]
for i, (a, c) in enumerate(zip(rms_in, rms_ln)):
    print(f"layer {i}: rms of residual stream {a:8.3f} -> after input_layernorm {c:6.3f}")

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
t = before.shape[1] // 2
axes[0].hist(before[0, t], bins=40, alpha=0.6, label="residual stream x")
axes[0].hist(after[0, t], bins=40, alpha=0.6, label="LayerNorm(x)")
axes[0].set(title=f"one token (t={t}) entering layer 0  ({run.name})", xlabel="value", ylabel="features")
axes[0].legend()
axes[1].plot(before[0].mean(-1), "o-", label="mean of x")
axes[1].plot(before[0].std(-1), "s-", label="std of x")
axes[1].plot(after[0].mean(-1), "o--", label="mean of LN(x)")
axes[1].plot(after[0].std(-1), "s--", label="std of LN(x)")
axes[1].set(title="layer 0: per-token statistics, before and after", xlabel="token position")
axes[1].legend(fontsize=8)
axes[2].plot(rms_in, "o-", label="residual stream entering layer i")
axes[2].plot(rms_ln, "s-", label="after input_layernorm")
axes[2].set(title="scale across layers", xlabel="layer i", ylabel="rms", yscale="log")
axes[2].legend(fontsize=8)
savefig(fig, "03_layernorm")
