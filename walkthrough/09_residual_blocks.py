# %% [markdown]
# # 09 · Residual blocks: sequential or parallel
#
# A decoder layer adds the outputs of attention and the MLP to the residual stream $x$. StableLM has both
# arrangements:
#
# $$\text{sequential (3b-4e1t, 2-1.6b):}\quad h = x + \mathrm{attn}(\mathrm{LN}_1(x)),\qquad y = h + \mathrm{mlp}(\mathrm{LN}_2(h))$$
# $$\text{parallel (2-12b, GPT-NeoX/GPT-J style):}\quad y = x + \mathrm{attn}(\mathrm{LN}_1(x)) + \mathrm{mlp}(\mathrm{LN}_1(x))$$
#
# The parallel block has one LayerNorm (no `post_attention_layernorm` tensors) and lets attention and MLP
# run side by side (one fused input matmul on a GPU); the MLP no longer sees what attention just wrote.
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
fig, ax = plt.subplots(figsize=(7.5, 4.2))
ax.plot(stream, "o-", label="residual stream entering layer i")
ax.plot(attn_add, "s-", label="attention adds (o_proj)")
ax.plot(mlp_add, "^-", label="MLP adds (down_proj)")
kind = "parallel" if cfg.use_parallel_residual else "sequential"
ax.set(title=f"{run.name} ({kind} residual, {L} layers)", xlabel="layer i", ylabel="rms", yscale="log")
ax.set_xticks(range(L))
ax.legend(fontsize=8)
savefig(fig, "09_residual_stream")
