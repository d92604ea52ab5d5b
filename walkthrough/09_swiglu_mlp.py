# %% [markdown]
# # 09 · The SwiGLU MLP
#
# After attention mixes information *between* tokens, the MLP transforms each token on its own. StableLM
# uses a gated linear unit with the SiLU ("swish") activation, three bias-free matrices:
#
# $$\mathrm{mlp}(x) = W_{\mathrm{down}}\big(\,\mathrm{silu}(W_{\mathrm{gate}}\,x) \odot W_{\mathrm{up}}\,x\,\big),\qquad
#   \mathrm{silu}(z) = z\,\sigma(z) = \frac{z}{1 + e^{-z}}$$
#
# $W_{\mathrm{gate}}, W_{\mathrm{up}}$: hidden → intermediate (2560 → 6912 in stablelm-3b-4e1t), $W_{\mathrm{down}}$
# back. The gate decides, per intermediate feature, how much of the `up` projection passes; SiLU is a smooth
# ReLU that dips slightly below zero: its minimum is where $\mathrm{silu}'(z) = \sigma(z)\,(1 + z(1 - \sigma(z))) = 0$,
# at $z^* \approx -1.2785$, and there $\sigma(z^*) = 1 + 1/z^*$, so $\mathrm{silu}(z^*) = z^* + 1 \approx -0.2785$.

# %%
import warnings

import matplotlib.pyplot as plt
import numpy as np

from _common import load_default_or_tiny, record, savefig, show_source, tiny_model
from stablelm_ref._xp import subtree
from stablelm_ref.mlp import ACTIVATIONS, mlp, sigmoid, silu

show_source(sigmoid)
show_source(silu)
show_source(mlp)

# %% [markdown]
# ## Checks
#
# 1. `silu` equals $z/(1+e^{-z})$, and `sigmoid` never overflows: at $z = \pm 1000$ it returns 0 and 1
#    without a warning (the naive $1/(1+e^{-z})$ overflows `exp` at $z = -1000$).
# 2. The traced `gate_proj`, `up_proj`, `act`, `down_proj` of a model equal the equation written with NumPy.
# 3. Two facts of the shape of the function: $\mathrm{mlp}(0) = 0$ (no biases) and it is not linear.
# 4. The minimum of the text: $z^*$ by bisection on $1 + z(1 - \sigma(z)) = 0$, and $\mathrm{silu}(z^*) = z^* + 1$;
#    the grid of check 1 (step 0.03) finds it within one step.

# %%
z = np.linspace(-30, 30, 2001)
np.testing.assert_allclose(silu(z), z / (1 + np.exp(-z)), rtol=1e-14, atol=1e-300)
with warnings.catch_warnings():
    warnings.simplefilter("error")                                  # any overflow warning fails the check
    extreme = sigmoid(np.array([-1000.0, 1000.0]))
assert extreme[0] == 0.0 and extreme[1] == 1.0
lo, hi = -2.0, -1.0                                                 # 1 + z (1 - sigma(z)): < 0 at -2, > 0 at -1
for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if 1 + mid * (1 - sigmoid(np.array(mid))) < 0 else (lo, mid)
z_min = (lo + hi) / 2
assert abs(z_min + 1.2785) < 5e-5 and abs(silu(np.array(z_min)) - (z_min + 1)) < 1e-12
i = np.argmin(silu(z))
print(f"silu minimum {float(silu(np.array(z_min))):.5f} at z* = {z_min:.5f} (bisection); the grid of step "
      f"{z[1] - z[0]:.2f} puts it at z = {z[i]:.3f}")
assert abs(z[i] - z_min) <= z[1] - z[0]

model = tiny_model(seed=7)
cfg = model.config
ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 9))
seen, _ = record(model, ids)
p = "model.layers.0."
h = seen[p + "post_attention_layernorm"]                             # the MLP's input, [1, T, hidden]
Wg, Wu, Wd = (model.params[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
g, u = h @ Wg.T, h @ Wu.T                                           # [1, T, inter] each
by_hand = (g / (1 + np.exp(-g)) * u) @ Wd.T                          # [1, T, hidden]
for name, value in (("gate_proj", g), ("up_proj", u), ("act", g / (1 + np.exp(-g)) * u), ("down_proj", by_hand)):
    np.testing.assert_allclose(seen[p + "mlp." + name], value, rtol=0, atol=1e-12)
np.testing.assert_allclose(mlp(h, subtree(model.params, p + "mlp."), "silu"), by_hand, rtol=0, atol=1e-12)
zero = mlp(np.zeros_like(h), subtree(model.params, p + "mlp."), "silu")
assert np.all(zero == 0)
assert not np.allclose(mlp(2 * h, subtree(model.params, p + "mlp."), "silu"), 2 * by_hand), "SwiGLU is not linear"
print(f"mlp == W_down(silu(W_gate x) * W_up x); hidden {cfg.hidden_size} -> intermediate {cfg.intermediate_size}")

# %% [markdown]
# ## Figures
#
# Left: SiLU next to the other activations transformers knows (all in `ACTIVATIONS`). Middle: the gated unit
# $\mathrm{silu}(g)\cdot u$ for one intermediate feature, as a function of its two inputs: zero along
# $u = 0$ and for $g \ll 0$, linear in $u$. Right: the values of $g$, $u$ and $\mathrm{silu}(g)\,u$ inside a
# model on real input.

# %%
run = load_default_or_tiny(dtype="float32")
seen_m, _ = record(run.model, run.ids, names=["mlp."])
last = run.model.config.num_hidden_layers - 1
fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
zz = np.linspace(-5, 5, 401)
for name in ("silu", "relu", "gelu", "gelu_new", "sigmoid"):
    axes[0].plot(zz, ACTIVATIONS[name](zz), label=name, lw=2 if name == "silu" else 1)
axes[0].set(title="activations", xlabel="z", ylim=(-1.5, 5))
axes[0].axhline(0, color="k", lw=0.5)
axes[0].legend(fontsize=8)
G, U = np.meshgrid(np.linspace(-6, 6, 241), np.linspace(-3, 3, 121))
im = axes[1].contourf(G, U, silu(G) * U, levels=21, cmap="RdBu_r")
fig.colorbar(im, ax=axes[1])
axes[1].set(title="silu(g) * u", xlabel="gate g", ylabel="up u")
for name in ("gate_proj", "up_proj", "act"):
    values = seen_m[f"model.layers.{last}.mlp.{name}"].ravel()
    axes[2].hist(values, bins=120, histtype="step", density=True, label=name)
axes[2].set(title=f"layer {last} of the {run.name}", yscale="log", xlabel="value")
axes[2].legend(fontsize=8)
savefig(fig, "09_swiglu_mlp")
