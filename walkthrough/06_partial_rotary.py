# %% [markdown]
# # 06 · Partial rotary position embedding
#
# Positions enter StableLM only through rotary embeddings (RoPE): each query and key vector is rotated by an
# angle proportional to its position, so the score $q_m \cdot k_n$ depends on $m - n$ alone. StableLM rotates
# only the first **25%** of each head (`partial_rotary_factor`): $d$ = `rotary_ndims` = 20 of the 80 dims of a
# stablelm-3b-4e1t head. The other 60 dims pass through untouched and carry position-free content.
#
# GPT-NeoX style: the $d$ rotated dims are split into two halves $x^{(1)}, x^{(2)}$ (not interleaved pairs), and
# dim $i$ is paired with dim $i + d/2$:
#
# $$\theta_i = \texttt{rope\_theta}^{-2i/d}\quad(i < d/2),\qquad
#   \mathrm{rot}(x, p) = x \odot \cos(p\,\theta) + \mathrm{rotate\_half}(x) \odot \sin(p\,\theta),\qquad
#   \mathrm{rotate\_half}([x^{(1)}, x^{(2)}]) = [-x^{(2)}, x^{(1)}]$$
#
# In complex numbers, with $z_i = x_i + \mathrm{i}\,x_{i+d/2}$: $\;\mathrm{rot}(z, p)_i = z_i\,e^{\mathrm{i} p\theta_i}$.
# Hence $\mathrm{Re}\sum_i \mathrm{rot}(q,m)_i\,\overline{\mathrm{rot}(k,n)_i} = \mathrm{Re}\sum_i q_i \bar k_i\, e^{\mathrm{i}(m-n)\theta_i}$:
# the score sees only the distance $m - n$.

# %%
import matplotlib.pyplot as plt
import numpy as np

from _common import family_config, savefig, show_source
from stablelm_ref.rotary import apply_rotary, inverse_frequencies, rotary_cos_sin, rotate_half

for f in (inverse_frequencies, rotary_cos_sin, rotate_half, apply_rotary):
    show_source(f)

# %% [markdown]
# ## Checks
#
# With the stablelm-3b-4e1t config (head_dim 80, rotary_ndims 20, rope_theta 10000), in float64:
# 1. the rotation equals complex multiplication by $e^{\mathrm{i}p\theta_i}$;
# 2. dims 20..79 are untouched and the norm of every pair $(x_i, x_{i+d/2})$ is preserved;
# 3. $\mathrm{rot}(q, m)\cdot\mathrm{rot}(k, n) = \mathrm{rot}(q, m+s)\cdot\mathrm{rot}(k, n+s)$ for any shift $s$.

# %%
cfg = family_config("stablelm-3b-4e1t")
hd, d, half = cfg.head_dim, cfg.rotary_ndims, cfg.rotary_ndims // 2
print(f"head_dim {hd}, rotary_ndims {d}, rope_theta {cfg.rope_theta}")
assert (hd, d) == (80, 20)

P = 4096
positions = np.arange(P)[None, :]                                    # [1, P]
cos, sin = rotary_cos_sin(positions, cfg, np.float64)                # [1, P, d] each
rng = np.random.default_rng(0)
x = rng.normal(size=(1, 1, 1, hd))
xs = np.broadcast_to(x, (1, 1, P, hd))                               # the same vector at every position
r = apply_rotary(xs, cos, sin, d)                                    # [1, 1, P, hd]

theta = cfg.rope_theta ** (-np.arange(half) * 2 / d)                 # [d/2]
np.testing.assert_allclose(inverse_frequencies(cfg, np, np.float64), theta, rtol=1e-15)
z = (x[0, 0, 0, :half] + 1j * x[0, 0, 0, half:d]) * np.exp(1j * np.arange(P)[:, None] * theta)  # [P, d/2]
np.testing.assert_allclose(r[0, 0, :, :half], z.real, rtol=0, atol=1e-12)
np.testing.assert_allclose(r[0, 0, :, half:d], z.imag, rtol=0, atol=1e-12)
assert np.array_equal(r[0, 0, :, d:], xs[0, 0, :, d:]), "the pass-through dims are not touched"
pair_norm = np.hypot(r[0, 0, :, :half], r[0, 0, :, half:d])
np.testing.assert_allclose(pair_norm, np.broadcast_to(np.hypot(x[0, 0, 0, :half], x[0, 0, 0, half:d]), pair_norm.shape),
                           rtol=1e-13)

q, k = rng.normal(size=(2, 1, 1, 1, hd))
rq = apply_rotary(np.broadcast_to(q, (1, 1, P, hd)), cos, sin, d)[0, 0]   # [P, hd]: q at every position
rk = apply_rotary(np.broadcast_to(k, (1, 1, P, hd)), cos, sin, d)[0, 0]   # [P, hd]
for m, n, s in [(5, 2, 1), (100, 37, 900), (3000, 3000, 1000), (0, 17, 4000)]:
    a, b = rq[m] @ rk[n], rq[m + s] @ rk[n + s]
    assert abs(a - b) <= 1e-9 * (abs(a) + 1), (m, n, s, a, b)
print("rotation == complex multiply; 60 dims untouched; pair norms kept; q.k depends only on m - n")

# %% [markdown]
# ## Figures: the rotation over positions, and the score as a function of distance
#
# Left: the rotated dims of one fixed vector at positions 0..127; the first pairs turn once every
# $2\pi/\theta_0 \approx 6.3$ positions, the last once every $2\pi/\theta_9 \approx 25{,}000$; dims 20..79 are
# constant. Middle: the pairs $(x_i, x_{i+10})$ as points in the plane: each walks around its own circle.
# Right: $\mathrm{rot}(q,m)\cdot\mathrm{rot}(k,n)$ against $m - n$ for two very different absolute
# positions $n$: the curves coincide.

# %%
fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [1.4, 1, 1.4]})
axes[0].imshow(r[0, 0, :128, :].T, aspect="auto", cmap="RdBu_r", interpolation="nearest")
axes[0].axhline(d - 0.5, color="k", lw=1)
axes[0].set(title="rot(x, p) for p = 0..127 (stablelm-3b-4e1t head)", xlabel="position p", ylabel="head dim")
axes[0].text(2, d + 3, "dims 20..79: not rotated", fontsize=8)
for i in range(0, half, 2):
    axes[1].plot(r[0, 0, :64, i], r[0, 0, :64, half + i], ".-", ms=3, lw=0.6,
                 label=f"i={i}, period {2 * np.pi / theta[i]:,.0f}")
axes[1].set(title="pairs (x_i, x_{i+d/2}), p = 0..63", aspect="equal")
axes[1].legend(fontsize=7, loc="lower left")
dist = np.arange(0, 1024)
for n0, style in [(0, "-"), (2048, "--")]:
    axes[2].plot(dist, [rq[n0 + t] @ rk[n0] for t in dist], style, lw=1, label=f"key at n = {n0}")
axes[2].axhline(q[0, 0, 0, d:] @ k[0, 0, 0, d:], ls=":", color="gray", label="pass-through dims' part (constant)")
axes[2].set(title="q.k against distance m - n", xlabel="m - n", ylabel="score (unscaled)")
axes[2].legend(fontsize=8)
savefig(fig, "06_partial_rotary")
