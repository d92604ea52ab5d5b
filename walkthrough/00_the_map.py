# %% [markdown]
# # 00 · The map: the whole model, its shapes, and the three published configurations
#
# Read this first: it names every piece the later chapters open, in the order the data flows.
#
# StableLM is a **decoder-only transformer**. Token ids go in; for every position, a score (logit) for every
# possible next token comes out. In between, each token is a vector of `hidden_size` = $d$ numbers, the
# **residual stream**. Every layer *reads* the stream through a LayerNorm and *adds* what it computed back into
# it; nothing else ever writes to it:
#
# $$x_0 = E[\mathrm{ids}],\qquad
#   x_{l} = x_{l-1} + \mathrm{attn}_l(\mathrm{LN}(x_{l-1})) + \mathrm{mlp}_l(\mathrm{LN}(\cdot))\quad(l = 1..L),\qquad
#   \mathrm{logits} = \mathrm{LN}(x_L)\,W_{\mathrm{lm}}^\top$$
#
# - **attention** is the only place where positions exchange information. Each of $H$ heads projects the
#   stream to a query $q$, a key $k$ and a value $v$ of `head_dim` = $D$ numbers per position; position $t$
#   scores every earlier position $s$ by the dot product $q_t \cdot k_s / \sqrt D$, turns the scores into
#   weights with a softmax, and takes the weighted mean of the values. Positions enter only here, by rotating
#   part of $q$ and $k$ (rotary). With grouped-query attention several query heads share one $k, v$ head.
# - the **MLP** (SwiGLU) transforms each position on its own.
# - a **decoder layer** (block) is LayerNorm → attention → add, then LayerNorm → MLP → add (*sequential*); or
#   both branches from one LayerNorm, added together (*parallel*, stablelm-2-12b).
#
# The figure below draws it with the shape at every arrow ($B$ rows, $T$ new positions, $S$ = cached + new
# positions, $V$ vocabulary, $F$ = `intermediate_size`), and the numbers for the trained default model that ships
# in `stablelm_ref/default_model/`. Below it: the chapters in reading order, and the three published
# configurations side by side, printed from the package's own `StableLmConfig`.

# %%
import matplotlib.pyplot as plt
import numpy as np

from _common import FAMILY, family_config, load_default_or_tiny, record, savefig
from stablelm_ref.checkpoint import expected_shapes

run = load_default_or_tiny(dtype="float32")
cfg = run.model.config
B, T = run.ids.shape
d, H, KVH, D, F, V, L = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                         cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers)
print(run, f"| B={B}, T={T}, d={d}, H={H}, H_kv={KVH}, D={D}, F={F}, V={V}, L={L}")

# %% [markdown]
# ## The shapes at every arrow, checked against a real forward
#
# The shapes are written here from the equations alone (nothing read from the package), then compared with
# every intermediate a traced forward of the model hands out (`trace(name, array)`, chapter 19).

# %%
S = T                                                       # no cache: the keys are the new positions
shapes = {
    "model.embed_tokens": (B, T, d),                        # E[ids]: one row of E per token
    "input_layernorm": (B, T, d),
    "self_attn.q_proj": (B, H, T, D),                       # x W_q^T split into H heads
    "self_attn.k_proj": (B, KVH, T, D),                     # H_kv heads (GQA: fewer than H)
    "self_attn.v_proj": (B, KVH, T, D),
    "self_attn.rotary_q": (B, H, T, D),                     # rotary keeps the shape
    "self_attn.rotary_k": (B, KVH, T, D),
    "self_attn.attn_weights": (B, H, T, S),                 # one softmax row per query over the keys
    "self_attn.attn_output": (B, H, T, D),                  # weights @ v
    "self_attn.o_proj": (B, T, d),                          # heads merged [B, T, H*D], projected to d
    "post_attention_layernorm": (B, T, d),
    "mlp.gate_proj": (B, T, F), "mlp.up_proj": (B, T, F), "mlp.act": (B, T, F),
    "mlp.down_proj": (B, T, d),
    "model.layers.0": (B, T, d),                            # the residual stream after layer 0
    "model.norm": (B, T, d),
    "lm_head": (B, T, V),                                   # one logit per vocabulary entry per position
}
if cfg.qk_layernorm:
    shapes.update({"self_attn.q_layernorm": (B, H, T, D), "self_attn.k_layernorm": (B, KVH, T, D)})
seen, out = record(run.model, run.ids)
for short, shape in shapes.items():
    name = short if short.startswith(("model.", "lm_head")) else f"model.layers.0.{short}"
    if name.endswith("post_attention_layernorm") and cfg.use_parallel_residual:
        continue
    assert seen[name].shape == shape, (name, seen[name].shape, shape)
assert out.logits.shape == (B, T, V)
print(f"all {len(shapes)} shapes of the map == the traced shapes of the {run.name}")

# %% [markdown]
# ## Figure: the map
#
# Left: the whole model. Right: one decoder layer opened up (sequential form; in the parallel form the MLP
# reads the same `input_layernorm` output as attention, and both outputs are added to $x$ at once).

# %%
def box(ax, x, y, text, colour, w=3.2, h=0.62):
    ax.add_patch(plt.Rectangle((x - w / 2, y - h / 2), w, h, facecolor=colour, edgecolor="black", lw=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=8.5)


def arrow(ax, x, y0, y1, label="", dx=0.15):
    ax.annotate("", (x, y1), (x, y0), arrowprops=dict(arrowstyle="->", lw=1))
    if label:
        ax.text(x + dx, (y0 + y1) / 2, label, fontsize=7.5, va="center", color="tab:blue", family="monospace")


def dims(*names):
    values = dict(B=B, T=T, S=S, d=d, H=H, Hkv=KVH, D=D, F=F, V=V)
    return f"[{', '.join(names)}] = [{', '.join(str(values[n]) for n in names)}]"


fig, (left, right) = plt.subplots(1, 2, figsize=(14, 9.5), gridspec_kw={"width_ratios": [1, 1.35]})
for ax in (left, right):
    ax.set(xlim=(-3, 5), ylim=(-0.7, 11.2))
    ax.axis("off")
steps = [("token ids", "#eeeeee", dims("B", "T")),
         ("embed_tokens: x0 = E[ids]   (02)", "#d9ead3", dims("B", "T", "d")),
         (f"{L} x decoder layer   (03-10)\nx <- x + attn(LN x) + mlp(LN x)", "#fce5cd", dims("B", "T", "d")),
         ("model.norm: LayerNorm   (03)", "#d9ead3", dims("B", "T", "d")),
         ("lm_head: h W_lm^T   (11)", "#d9ead3", dims("B", "T", "V")),
         ("softmax -> next token   (17)", "#eeeeee", "")]
ys = np.linspace(10.4, 0.4, len(steps))
for (text, colour, _), y in zip(steps, ys):
    box(left, 0, y, text, colour, w=4.6, h=0.9 if "\n" in text else 0.62)
for (_, _, label), y0, y1 in zip(steps, ys[:-1], ys[1:]):
    arrow(left, 0, y0 - 0.45, y1 + 0.45, label, dx=0.12)
left.set_title(f"the whole model ({run.name}: B={B}, T={T})", fontsize=10)

layer = [("x: residual stream in", "#eeeeee", 10.6, 0),
         ("input_layernorm", "#d9ead3", 9.5, 0),
         ("q_proj | k_proj | v_proj (+ bias)   (04)", "#cfe2f3", 8.4, 0),
         ("qk LayerNorm per head (08) · rotary (06)", "#cfe2f3", 7.3, 0),
         ("softmax(q k^T / sqrt(D) + mask) v   (05, 07)", "#cfe2f3", 6.2, 0),
         ("merge heads · o_proj   (04)", "#cfe2f3", 5.1, 0),
         ("post_attention_layernorm", "#d9ead3", 3.6, 0),
         ("gate_proj | up_proj · silu(g) * u   (09)", "#fff2cc", 2.5, 0),
         ("down_proj", "#fff2cc", 1.4, 0),
         ("x: residual stream out", "#eeeeee", 0.1, 0)]
labels = [dims("B", "T", "d"), dims("B", "T", "d"), f"q {dims('B', 'H', 'T', 'D')}\nk, v {dims('B', 'Hkv', 'T', 'D')}",
          f"q {dims('B', 'H', 'T', 'D')}\nk {dims('B', 'Hkv', 'T', 'D')}", dims("B", "H", "T", "D") + f"\n(weights {dims('B', 'H', 'T', 'S')})",
          dims("B", "T", "d") + "  -> + x", dims("B", "T", "d"), dims("B", "T", "F"), dims("B", "T", "d") + "  -> + x"]
for text, colour, y, _ in layer:
    box(right, -0.2, y, text, colour, w=5.0)
for (_, _, y0, _), (_, _, y1, _), label in zip(layer[:-1], layer[1:], labels):
    arrow(right, -0.2, y0 - 0.31, y1 + 0.31, label)
for y_from, y_to in ((10.6, 4.35), (4.35, 0.1)):                    # the two residual adds
    right.annotate("", (-3.0, y_to), (-3.0, y_from), arrowprops=dict(arrowstyle="->", lw=1.2, color="tab:red",
                                                                    connectionstyle="arc3,rad=0"))
right.text(-2.95, 7.4, "residual\n(skip)", color="tab:red", fontsize=8)
right.text(-2.95, 2.2, "residual\n(skip)", color="tab:red", fontsize=8)
right.plot([-3.0, -2.7], [4.35, 4.35], color="tab:red", lw=1.2)
right.text(-2.65, 4.35, "+ attention output", color="tab:red", fontsize=8, va="center")
right.set_title("one decoder layer, sequential form (numbers in brackets: the chapters)", fontsize=10)
savefig(fig, "00_the_map")

# %% [markdown]
# ## The chapters, in reading order
#
# | | |
# |---|---|
# | 00 | this map |
# | 01-02 | text → token ids → vectors: the tokenizer, the embedding |
# | 03 | LayerNorm, which every sub-block reads the stream through |
# | 04-08 | attention: the projections, scores and the mask, rotary positions, grouped-query heads, qk LayerNorm |
# | 09 | the SwiGLU MLP |
# | 10 | residual blocks: sequential and parallel |
# | 11 | the model composed by hand from those pieces, and its heads (causal LM, classification) |
# | 12 | **the whole forward on one page**: plain NumPy from the checkpoint dict, equal to the package |
# | 13 | perplexity and bits per byte: what the loss means, on the default model's held-out data |
# | 14-15 | checkpoints and bfloat16 storage; where bfloat16 *compute* loses precision |
# | 16-18 | generating: the KV cache, sampling, attention by tiles (flash attention) |
# | 19 | golden checks against transformers, and tracing to find where two runs part |
#
# ## The three published configurations, from the package's config class
#
# `StableLmConfig` derives `head_dim` and `rotary_ndims` from the keys of `config.json`; the values must be the
# published ones (docs/facts.md restates them with their sources: the `config.json` of each checkpoint on the
# Hugging Face Hub).

# %%
PUBLISHED = {"stablelm-3b-4e1t": dict(head_dim=80, rotary_ndims=20, params=2_795_443_200),
             "stablelm-2-1_6b": dict(head_dim=64, rotary_ndims=16),
             "stablelm-2-12b": dict(head_dim=160, rotary_ndims=40)}
rows = {}
for name in FAMILY:
    c = family_config(name)
    n_params = sum(int(np.prod(s)) for s in expected_shapes(c, "causal_lm").values())
    rows[name] = {"vocab_size": c.vocab_size, "hidden_size d": c.hidden_size, "intermediate_size F": c.intermediate_size,
                  "layers L": c.num_hidden_layers, "heads H": c.num_attention_heads,
                  "kv heads H_kv (GQA)": c.num_key_value_heads, "head_dim D": c.head_dim,
                  "rotary_ndims (25%)": c.rotary_ndims, "qkv bias": c.use_qkv_bias, "qk LayerNorm": c.qk_layernorm,
                  "parallel residual": c.use_parallel_residual, "tied embeddings": c.tie_word_embeddings,
                  "parameters": f"{n_params / 1e9:.2f} B"}
    assert c.head_dim == PUBLISHED[name]["head_dim"] and c.rotary_ndims == PUBLISHED[name]["rotary_ndims"], name
    if "params" in PUBLISHED[name]:
        assert n_params == PUBLISHED[name]["params"], n_params      # the model card's figure
keys = list(next(iter(rows.values())))
print(f"{'':22s}" + "".join(f"{n:>18s}" for n in rows))
for k in keys:
    print(f"{k:22s}" + "".join(f"{str(rows[n][k]):>18s}" for n in rows))
