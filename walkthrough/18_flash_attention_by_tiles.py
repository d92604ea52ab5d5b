# %% [markdown]
# # 18 · Flash attention: the softmax by tiles
#
# The reference attention (chapter 05) builds the whole score matrix $[T, S]$ for every head, takes a
# softmax over each row, then multiplies by $V$. For a 4096-token prompt that is 64 MiB of float32 scores
# per head, written to memory and read back twice. **Flash attention** never builds it: it walks over the
# keys in tiles of $B_c$ columns, for a block of $B_r$ query rows held on chip, and keeps for each row only a
# running maximum $m$, a running sum $\ell$ and an unnormalised output $O$ (the *online softmax*):
#
# $$S_j = \frac{Q_i K_j^\top}{\sqrt D}\ (\text{masked}),\qquad m_j = \max\big(m_{j-1},\ \mathrm{rowmax}(S_j)\big),\qquad
#   P_j = e^{S_j - m_j}$$
# $$\ell_j = e^{m_{j-1} - m_j}\,\ell_{j-1} + \mathrm{rowsum}(P_j),\qquad O_j = e^{m_{j-1} - m_j}\,O_{j-1} + P_j V_j,
#   \qquad \mathrm{out} = O_{\mathrm{last}} / \ell_{\mathrm{last}}$$
#
# Each time the maximum grows, everything accumulated so far is rescaled by $e^{m_{\mathrm{old}} - m_{\mathrm{new}}} \le 1$,
# so nothing overflows and the result is exactly $\mathrm{softmax}(S)\,V$: by induction
# $\ell_j = \sum_{s \le j} e^{S_s - m_j}$ and $O_j = \sum_{s \le j} e^{S_s - m_j} V_s$, and the $e^{-m_j}$ cancels in the
# ratio ($D$ is the head size, as in chapter 07). With a causal mask, the key tiles entirely to the right of a
# block's last query are skipped (about half the work), and only tiles crossing the diagonal need the mask.
#
# Below, a NumPy emulation of the algorithm (it runs on a CPU; it is for reading, not for speed), checked
# against the package's reference attention. The CUDA kernel that does this on the GPU is
# `stablelm_ref/cuda/flash_prefill.cu` (FlashAttention-2 style: tensor-core `mma` for $QK^\top$ and $PV$,
# online softmax in base 2, i.e. $e^x = 2^{x \log_2 e}$ with $\log_2 e$ folded into the scale).

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from _common import load_default_or_tiny, record, savefig, show_source  # first: puts the checkout on sys.path
import stablelm_ref
from stablelm_ref.attention import scaled_dot_product_attention
from stablelm_ref.attention import causal_mask

show_source(scaled_dot_product_attention)

# %%
def flash_attention(q, k, v, block_rows=16, block_cols=16, log=None):
    """Causal attention by tiles with the online softmax. q: [H, T, D]; k, v: [KVH, S, D], S >= T; the T
    queries are the last T positions. log, if a list, receives (head, row block, key tile, m, l) per step."""
    heads, t, D = q.shape                                               # D: the head size
    kv_heads, s, _ = k.shape
    group, past = heads // kv_heads, s - t
    out = np.zeros_like(q)
    for h in range(heads):
        kh, vh = k[h // group], v[h // group]                           # GQA: query head h reads kv head h // G
        for r0 in range(0, t, block_rows):
            qi = q[h, r0:r0 + block_rows] * D ** -0.5                  # [Br, D], scale folded into q
            rows = qi.shape[0]
            q_pos = past + r0 + np.arange(rows)                         # positions of these queries
            m = np.full(rows, -np.inf)                                  # running max
            l = np.zeros(rows)                                          # running sum of exp
            acc = np.zeros((rows, D), dtype=q.dtype)                    # running unnormalised output
            for c0 in range(0, q_pos[-1] + 1, block_cols):               # tiles right of the diagonal: skipped
                k_pos = c0 + np.arange(min(block_cols, s - c0))
                scores = qi @ kh[k_pos].T                                # [Br, Bc]
                if k_pos[-1] > q_pos[0]:                                 # the tile crosses the diagonal
                    scores = np.where(k_pos[None, :] <= q_pos[:, None], scores, -np.inf)
                m_new = np.maximum(m, scores.max(axis=1))
                p = np.exp(scores - m_new[:, None])                      # [Br, Bc], masked -> 0
                alpha = np.exp(m - m_new)                                # rescale what came before (<= 1)
                l = alpha * l + p.sum(axis=1)
                acc = alpha[:, None] * acc + p @ vh[k_pos]
                m = m_new
                if log is not None:
                    log.append((h, r0 // block_rows, c0 // block_cols, m.copy(), l.copy()))
            out[h, r0:r0 + rows] = acc / l[:, None]
    return out


# %% [markdown]
# ## Checks: equal to the reference softmax attention
#
# In float64, for several shapes: tiles that do not divide the length, queries after cached keys
# ($S > T$), grouped-query heads, tiles of one element and tiles larger than the sequence. The difference
# is rounding only (summation order), so the tolerance is 1e-12.

# %%
rng = np.random.default_rng(0)
cases = [(4, 4, 37, 37, 16, 16), (4, 2, 50, 50, 8, 32), (6, 2, 9, 40, 4, 16), (2, 1, 13, 13, 1, 1),
         (2, 2, 20, 20, 64, 64)]
for heads, kv_heads, t, s, br, bc in cases:
    q = rng.normal(size=(heads, t, 16)) * 3
    k, v = rng.normal(size=(2, kv_heads, s, 16))
    ref, _ = scaled_dot_product_attention(q[None], k[None], v[None], causal_mask(None, 1, t, s - t, np))
    got = flash_attention(q, k, v, br, bc)
    np.testing.assert_allclose(got, ref[0], rtol=0, atol=1e-12)
    print(f"H={heads} KVH={kv_heads} T={t} S={s} tiles {br}x{bc}: max |flash - reference| "
          f"{np.abs(got - ref[0]).max():.1e}")

# %% [markdown]
# And on a real forward: feeding the traced `rotary_q`, `rotary_k` and `v_proj` of every layer to the
# emulation reproduces the traced `attn_output` of the model.

# %%
run = load_default_or_tiny(dtype="float64")
seen, _ = record(run.model, run.ids, names=["rotary_q", "rotary_k", "v_proj", "attn_output"])
for layer in range(run.model.config.num_hidden_layers):
    p = f"model.layers.{layer}.self_attn."
    got = flash_attention(seen[p + "rotary_q"][0], seen[p + "rotary_k"][0], seen[p + "v_proj"][0], 8, 8)
    np.testing.assert_allclose(got, seen[p + "attn_output"][0], rtol=0, atol=1e-12)
print(run, "flash emulation == the model's attn_output in every layer")

# %% [markdown]
# ## Figures: the tile schedule, and the running max and sum of a few rows
#
# Left: for $T = S = 256$ and $64 \times 32$ tiles, which (row block, key tile) pairs are computed without a
# mask, computed with the mask (crossing the diagonal), or skipped. Middle and right: $m$ and $\ell$ of four
# query rows after each key tile (keys are drawn larger towards the end, so the maximum keeps moving).
# $\ell$ drops whenever $m$ jumps (everything is rescaled by
# $e^{m_{\mathrm{old}} - m_{\mathrm{new}}}$), then grows again; at the end $\ell = \sum_s e^{S_s - \max S}$.

# %%
T, BR, BC = 256, 64, 32
q = rng.normal(size=(1, T, 32)) * 2
k, v = rng.normal(size=(2, 1, T, 32))
k = k * np.linspace(0.3, 1.5, T)[:, None]                               # later keys larger: the max keeps moving
log = []
out = flash_attention(q, k, v, BR, BC, log=log)
ref, probs = scaled_dot_product_attention(q[None], k[None], v[None], causal_mask(None, 1, T, 0, np))
np.testing.assert_allclose(out, ref[0], rtol=0, atol=1e-12)

n_r, n_c = T // BR, T // BC
state = np.zeros((n_r, n_c))                                            # 0 skipped, 1 full, 2 masked
for r in range(n_r):
    for c in range(n_c):
        first_q, last_q, first_k, last_k = r * BR, (r + 1) * BR - 1, c * BC, (c + 1) * BC - 1
        state[r, c] = 0 if first_k > last_q else (2 if last_k > first_q else 1)
done = sum(1 for _ in log)
assert done == int((state > 0).sum()), "the emulation computes exactly the non-skipped tiles"
print(f"{done} of {n_r * n_c} tiles computed ({1 - done / (n_r * n_c):.0%} skipped by causality); "
      f"a [T, S] float32 score matrix at T = S = 4096 is {4096 * 4096 * 4 / 2**20:.0f} MiB per head, "
      f"one {BR}x{BC} tile {BR * BC * 4 / 1024:.0f} KiB")

fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [1, 1.2, 1.2]})
cmap = plt.matplotlib.colors.ListedColormap(["#eeeeee", "tab:blue", "tab:orange"])
axes[0].imshow(state, cmap=cmap, vmin=0, vmax=2, extent=(0, T, T, 0))
axes[0].plot([0, T], [0, T], "k--", lw=0.8)
for x_ in range(0, T + 1, BC):
    axes[0].axvline(x_, color="white", lw=0.8)
for y_ in range(0, T + 1, BR):
    axes[0].axhline(y_, color="white", lw=0.8)
axes[0].set(title=f"tiles {BR} queries x {BC} keys: blue full, orange masked, grey skipped",
            xlabel="key position", ylabel="query position")
axes[0].title.set_fontsize(9)
rows = [40, 100, 180, 250]
for row in rows:
    r, i = divmod(row, BR)
    steps = [(c, m[i], l[i]) for (_, rb, c, m, l) in log if rb == r]
    cs = [(c + 1) * BC for c, _, _ in steps]
    axes[1].step(cs, [m_ for _, m_, _ in steps], where="post", marker="o", ms=3, label=f"query {row}")
    axes[2].step(cs, [l_ for _, _, l_ in steps], where="post", marker="o", ms=3, label=f"query {row}")
    s_row = (q[0, row] * 32 ** -0.5) @ k[0, : row + 1].T
    assert np.isclose(steps[-1][1], s_row.max()) and np.isclose(steps[-1][2], np.exp(s_row - s_row.max()).sum())
axes[1].set(title="running max m after each key tile", xlabel="keys seen (end of tile)")
axes[2].set(title="running sum l after each key tile", xlabel="keys seen (end of tile)", yscale="log")
for ax in axes[1:]:
    ax.legend(fontsize=8)
savefig(fig, "18_flash_tiles")

# %% [markdown]
# ## The CUDA kernel
#
# On the GPU the same loop runs with one thread block per $B_r$ query rows of one head: the Q tile stays in
# shared memory and registers, K and V tiles stream through shared memory, $S$ and $O$ live in registers
# (tensor-core accumulators), and only `out` is written to global memory. Its header comment, when the kernel
# is in this checkout:

# %%
cu = Path(stablelm_ref.__file__).parent / "cuda" / "flash_prefill.cu"
if cu.exists():
    head = []
    for line in cu.read_text().splitlines():
        if not line.startswith("//"):
            break
        head.append(line)
    print(f"# --- {cu.relative_to(Path(stablelm_ref.__file__).parent.parent)}")
    print("\n".join(head))
else:
    print("stablelm_ref/cuda/flash_prefill.cu is not in this checkout yet (it lands with the CUDA kernels).")
