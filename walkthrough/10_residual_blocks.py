# %% [markdown]
# # 10 · Residual blocks: sequential or parallel
#
# A decoder layer adds the outputs of attention and the MLP to the residual stream $x$. StableLM has both
# arrangements:
#
# $$\text{sequential (3b-4e1t, 2-1.6b):}\quad h = x + \mathrm{attn}(\mathrm{LN}_1(x)),\qquad y = h + \mathrm{mlp}(\mathrm{LN}_2(h))$$
# $$\text{parallel (2-12b):}\quad y = x + \mathrm{attn}(\mathrm{LN}_1(x)) + \mathrm{mlp}(\mathrm{LN}_1(x))$$
#
# The parallel block has one LayerNorm shared by both branches (no `post_attention_layernorm` tensors), which
# is GPT-J's form. GPT-NeoX's parallel residual is different: it normalises the two branches with two
# LayerNorms, $x + \mathrm{attn}(\mathrm{LN}_1 x) + \mathrm{mlp}(\mathrm{LN}_2 x)$ (transformers' `modeling_gptj.py`
# and `modeling_gpt_neox.py`; docs/facts.md). Either way attention and MLP can run side by side (one fused
# input matmul on a GPU), and the MLP no longer sees what attention just wrote.
# Config key: `use_parallel_residual`.

# %%
import matplotlib.pyplot as plt
import numpy as np

from _common import load_default_or_tiny, record, savefig, show_source, tiny_model
from stablelm_ref._xp import subtree
from stablelm_ref.attention import attention
from stablelm_ref.checkpoint import expected_shapes
from stablelm_ref.decoder_layer import decoder_layer
from stablelm_ref.layernorm import layer_norm
from stablelm_ref.mlp import mlp
from stablelm_ref.rotary import rotary_cos_sin

show_source(decoder_layer)

# %% [markdown]
# ## Checks: both equations, composed by hand from the package's pieces
#
# For each arrangement we take the traced residual stream entering layer 0 (`model.embed_tokens`) and
# rebuild the layer's output from `layer_norm`, `attention` and `mlp` following the equation above; it must
# equal the traced `model.layers.0`. And the residual decomposition holds exactly in both:
# `model.layers.i` = input + `self_attn.o_proj` + `mlp.down_proj`.

# %%
ids = np.random.default_rng(0).integers(0, 101, (1, 11))
for parallel in (False, True):
    model = tiny_model(seed=9, use_parallel_residual=parallel)
    cfg, P = model.config, model.params
    names = expected_shapes(cfg)
    assert ("model.layers.0.post_attention_layernorm.weight" in names) == (not parallel)
    seen, _ = record(model, ids)
    x = seen["model.embed_tokens"]
    cos, sin = rotary_cos_sin(np.arange(ids.shape[1])[None, :], cfg, np.float64)
    eps, p = cfg.layer_norm_eps, "model.layers.0."

    def ln(v, name):
        return layer_norm(v, P[p + name + ".weight"], P[p + name + ".bias"], eps)

    a = attention(ln(x, "input_layernorm"), subtree(P, p + "self_attn."), cfg, cos, sin)  # causal, no padding
    if parallel:
        y = x + a + mlp(ln(x, "input_layernorm"), subtree(P, p + "mlp."), "silu")
    else:
        h = x + a
        y = h + mlp(ln(h, "post_attention_layernorm"), subtree(P, p + "mlp."), "silu")
    np.testing.assert_allclose(seen["model.layers.0"], y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(decoder_layer(x, subtree(P, p), cfg, cos, sin), y, rtol=0, atol=1e-12)
    for i in range(cfg.num_hidden_layers):
        inp = seen["model.embed_tokens"] if i == 0 else seen[f"model.layers.{i - 1}"]
        out = inp + seen[f"model.layers.{i}.self_attn.o_proj"] + seen[f"model.layers.{i}.mlp.down_proj"]
        np.testing.assert_allclose(seen[f"model.layers.{i}"], out, rtol=0, atol=1e-12)
    print(f"{'parallel' if parallel else 'sequential'}: decoder_layer == the equation; "
          "layer out == in + attn + mlp")

# %% [markdown]
# ## The residual stream through a model
#
# Every layer only *adds* to the stream. Plotted per layer: the size (rms) of the stream entering the layer
# and of what attention and the MLP add to it, for the default model if present (a tiny random one otherwise).

# %%
run = load_default_or_tiny(dtype="float64")
cfg = run.model.config
seen, _ = record(run.model, run.ids)

def rms(v):
    return float(np.sqrt(np.mean(v ** 2)))

L = cfg.num_hidden_layers
stream = [rms(seen["model.embed_tokens"])] + [rms(seen[f"model.layers.{i}"]) for i in range(L - 1)]
attn_add = [rms(seen[f"model.layers.{i}.self_attn.o_proj"]) for i in range(L)]
mlp_add = [rms(seen[f"model.layers.{i}.mlp.down_proj"]) for i in range(L)]
def flow(ax, parallel):
    """The block as a data-flow diagram: boxes for the sub-blocks, the residual stream as the vertical line."""
    ax.set(xlim=(0, 10), ylim=(0, 10))
    ax.axis("off")
    ax.annotate("", (1.2, 0.4), (1.2, 9.6), arrowprops=dict(arrowstyle="->", color="tab:red", lw=2))
    ax.text(0.2, 9.75, "x (residual stream)", color="tab:red", fontsize=9)

    def box(x, y, text, colour, w=4.4):
        ax.add_patch(plt.Rectangle((x - w / 2, y - 0.4), w, 0.8, facecolor=colour, edgecolor="black", lw=0.8))
        ax.text(x, y, text, ha="center", va="center", fontsize=8.5)

    def arrow(x0, y0, x1, y1):
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", lw=1))

    if parallel:
        box(4.2, 8.0, "input_layernorm", "#d9ead3")
        box(3.4, 5.0, "attention", "#cfe2f3", w=2.8)
        box(7.2, 5.0, "MLP", "#fff2cc", w=2.8)
        arrow(1.2, 8.6, 2.0, 8.05), arrow(3.9, 7.6, 3.4, 5.4), arrow(4.6, 7.6, 7.2, 5.4)
        arrow(3.4, 4.6, 1.3, 2.2), arrow(7.2, 4.6, 1.3, 2.0)
        ax.text(1.45, 1.6, "+ attn + mlp  (one add)", fontsize=8.5, color="tab:red")
        ax.set_title("parallel (stablelm-2-12b; GPT-J's form):\none LayerNorm, both branches read the same input",
                     fontsize=9)
    else:
        box(4.2, 8.4, "input_layernorm", "#d9ead3")
        box(4.2, 6.6, "attention", "#cfe2f3")
        box(4.2, 4.0, "post_attention_layernorm", "#d9ead3", w=5.0)
        box(4.2, 2.2, "MLP", "#fff2cc")
        arrow(1.2, 9.0, 2.0, 8.45), arrow(4.2, 8.0, 4.2, 7.0), arrow(4.2, 6.2, 1.3, 5.4)
        ax.text(1.5, 5.75, "+ attn", fontsize=8.5, color="tab:red")
        arrow(1.2, 5.0, 2.0, 4.05), arrow(4.2, 3.6, 4.2, 2.6), arrow(4.2, 1.8, 1.3, 0.9)
        ax.text(1.5, 1.25, "+ mlp", fontsize=8.5, color="tab:red")
        ax.set_title("sequential (3b-4e1t, 2-1.6b):\nthe MLP reads the stream after attention has written", fontsize=9)


fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1, 1, 1.5]})
flow(axes[0], parallel=False)
flow(axes[1], parallel=True)
ax = axes[2]
ax.plot(stream, "o-", label="residual stream entering layer i")
ax.plot(attn_add, "s-", label="attention adds (o_proj)")
ax.plot(mlp_add, "^-", label="MLP adds (down_proj)")
kind = "parallel" if cfg.use_parallel_residual else "sequential"
ax.set(title=f"{run.name} ({kind} residual, {L} layers)", xlabel="layer i", ylabel="rms", yscale="log")
ax.set_xticks(range(L))
ax.legend(fontsize=8)
savefig(fig, "10_residual_blocks")
