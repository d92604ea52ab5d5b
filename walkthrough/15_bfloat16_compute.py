# %% [markdown]
# # 15 · bfloat16 compute: where the error enters a forward pass
#
# Chapter 14 rounded the *weights* to bfloat16 and computed in float32. A GPU runs the whole forward in
# bfloat16: every tensor it stores (activations included) has an 8-bit significand, so each store rounds with
# a relative error up to the unit roundoff
#
# $$u_{\mathrm{bf16}} = 2^{-8} \approx 3.9\cdot10^{-3},\qquad u_{\mathrm{f32}} = 2^{-24} \approx 6.0\cdot10^{-8},\qquad
#   u_{\mathrm{f64}} = 2^{-53} \approx 1.1\cdot10^{-16}$$
#
# while the matrix products accumulate in float32 inside the tensor cores (their inputs are bfloat16, the sum
# is not rounded until it is stored). NumPy has no bfloat16 arithmetic, so this chapter **emulates** it: a
# forward in float32 where every stored tensor is rounded to bfloat16 (`ml_dtypes`), the products of rounded
# operands summed in float32. Two things stay wide in this project (and in transformers' eager path):
# LayerNorm's mean and variance, and the softmax, both in float32. We trace the error of every intermediate
# against float64 to see where it enters, then narrow the statistics to see why they are kept wide.

# %%
import matplotlib.pyplot as plt
import ml_dtypes
import numpy as np

from _common import load_default_or_tiny, record, savefig
from stablelm_ref.trace import compare_traces

BF16 = np.dtype(ml_dtypes.bfloat16)


def to_bf16(a):
    """Round to bfloat16 (nearest, ties to even) and keep the values in float32."""
    return np.asarray(a, np.float32).astype(BF16).astype(np.float32)


def make_precision(name, ln_stats="wide", softmax_in="wide"):
    """store: rounding of every stored tensor; narrow(): rounding inside LayerNorm / softmax when narrowed."""
    if name == "float64":
        return dict(name=name, dtype=np.float64, store=lambda a: a, ln=lambda a: a, sm=lambda a: a)
    if name == "float32":
        return dict(name=name, dtype=np.float32, store=lambda a: a.astype(np.float32), ln=lambda a: a, sm=lambda a: a)
    return dict(name=name, dtype=np.float32, store=to_bf16, ln=to_bf16 if ln_stats == "narrow" else (lambda a: a),
                sm=to_bf16 if softmax_in == "narrow" else (lambda a: a))


# %% [markdown]
# ## The forward, with a rounding after every stored tensor
#
# The same computation as chapter 12's page, for the default model's variant (qkv bias, qk LayerNorm, GQA,
# sequential blocks, tied head), written so that `st` rounds what a GPU would store, `ln` rounds inside
# LayerNorm and `sm` inside the softmax (identity when they are kept wide). It records every tensor under the
# package's trace names. First check: in float64 it is the package's float64 model (to 1e-12 of each tensor's
# scale), so what follows measures rounding, not a different model.

# %%
def emulated_forward(model, ids, prec):
    c, dt, st, ln_r, sm_r = model.config, prec["dtype"], prec["store"], prec["ln"], prec["sm"]
    P = {k: st(np.asarray(v, dt)) for k, v in model.params.items()}        # the weights, as stored
    H, KVH, D, eps, r = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.layer_norm_eps, c.rotary_ndims
    T = ids.shape[1]
    tr = {}

    def rec(name, a):
        tr[name] = a[None] if a.ndim in (2, 3) and name != "lm_head" and not name.endswith(("proj", "norm")) else a
        return a

    def layer_norm(x, w, b):                       # statistics: float32 (wide), or rounded to bf16 (narrow)
        mu = ln_r(x.mean(-1, keepdims=True))
        xc = ln_r(x - mu)
        var = ln_r((xc * xc).mean(-1, keepdims=True))
        y = xc / np.sqrt(var + eps) * w
        return st(y if b is None else y + b)

    inv = (c.rope_theta ** (-np.arange(0, r, 2) / r)).astype(dt)
    ang = np.arange(T)[:, None] * inv
    cos, sin = np.cos(np.concatenate([ang] * 2, -1)), np.sin(np.concatenate([ang] * 2, -1))

    def rotary(x):
        a, rest = x[..., :r], x[..., r:]
        return st(np.concatenate([a * cos + np.concatenate([-a[..., r // 2:], a[..., :r // 2]], -1) * sin, rest], -1))

    x = rec("model.embed_tokens", P["model.embed_tokens.weight"][ids[0]])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rec(p + "input_layernorm", layer_norm(x, P[p + "input_layernorm.weight"], P[p + "input_layernorm.bias"]))
        qkv = {}
        for n, heads in (("q", H), ("k", KVH), ("v", KVH)):
            y = st(h @ P[f"{p}self_attn.{n}_proj.weight"].T + P.get(f"{p}self_attn.{n}_proj.bias", 0))
            qkv[n] = rec(f"{p}self_attn.{n}_proj", y.reshape(T, heads, D).transpose(1, 0, 2)[None])[0]
        q, k, v = qkv["q"], qkv["k"], qkv["v"]
        if c.qk_layernorm:
            q = np.stack([layer_norm(q[j], P[f"{p}self_attn.q_layernorm.norms.{j}.weight"], None) for j in range(H)])
            k = np.stack([layer_norm(k[j], P[f"{p}self_attn.k_layernorm.norms.{j}.weight"], None) for j in range(KVH)])
            rec(p + "self_attn.q_layernorm", q[None]), rec(p + "self_attn.k_layernorm", k[None])
        q, k = rotary(q), rotary(k)
        rec(p + "self_attn.rotary_q", q[None]), rec(p + "self_attn.rotary_k", k[None])
        k, v = np.repeat(k, H // KVH, 0), np.repeat(v, H // KVH, 0)
        s = sm_r(q @ k.transpose(0, 2, 1) * D ** -0.5)                       # scores: float32 sums
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        e = sm_r(np.exp(s - s.max(-1, keepdims=True)))
        a = rec(p + "self_attn.attn_weights", st(e / sm_r(e.sum(-1, keepdims=True)))[None])[0]
        o = rec(p + "self_attn.attn_output", st(a @ v)[None])[0]
        attn = rec(p + "self_attn.o_proj", st(o.transpose(1, 0, 2).reshape(T, H * D) @ P[p + "self_attn.o_proj.weight"].T))
        x = st(x + attn)
        h2 = rec(p + "post_attention_layernorm", layer_norm(x, P[p + "post_attention_layernorm.weight"],
                                                           P[p + "post_attention_layernorm.bias"]))
        g = rec(p + "mlp.gate_proj", st(h2 @ P[p + "mlp.gate_proj.weight"].T))
        u = rec(p + "mlp.up_proj", st(h2 @ P[p + "mlp.up_proj.weight"].T))
        act = rec(p + "mlp.act", st(st(g / (1 + np.exp(-g))) * u))
        x = rec(p[:-1], st(x + rec(p + "mlp.down_proj", st(act @ P[p + "mlp.down_proj.weight"].T))))
    x = rec("model.norm", layer_norm(x, P["model.norm.weight"], P["model.norm.bias"]))
    W = P["model.embed_tokens.weight"] if c.tie_word_embeddings else P["lm_head.weight"]
    return rec("lm_head", st(x @ W.T)[None]), tr


run = load_default_or_tiny(dtype="float64")
model, ids = run.model, run.ids
assert not model.config.use_parallel_residual                              # the variant written above
ref_trace, ref = record(model, ids)
logits64, trace64 = emulated_forward(model, ids, make_precision("float64"))
assert set(trace64) <= set(ref_trace) and len(trace64) == len(ref_trace), set(ref_trace) - set(trace64)
for name, a in trace64.items():
    scale = np.abs(ref_trace[name]).max()
    assert np.abs(a.reshape(ref_trace[name].shape) - ref_trace[name]).max() <= 1e-12 * scale, name
print(run, f"| the emulation in float64 == the package in float64 on all {len(trace64)} traced tensors")

# %% [markdown]
# ## Where the error enters
#
# Each intermediate of a float32 and of a bfloat16 run against float64, with the normwise error
# $\max|a-b| / \max(\max|a|, \max|b|)$ (chapter 19; `compare_traces` computes it, checked by hand on the logits). The bounds asserted: float32 stays within
# $10^{3}\,u_{\mathrm{f32}}$ everywhere (a few hundred roundings in sequence, each $\le u$, add up to at most
# that, and random signs to far less); bfloat16 starts at the first store ($\le u_{\mathrm{bf16}}$; the
# default model's weights are bfloat16 already, so its embedding rows are exact and the error enters at the first
# LayerNorm) and must stay within $30\,u_{\mathrm{bf16}}$ of the logits' scale at the
# end: about 10 stored roundings per layer over 8 layers grow like their square root ($\sqrt{80}\,u \approx 9u$)
# when their signs are random, and LayerNorm re-scales the stream before every sub-block so no error is
# amplified from layer to layer.

# %%
runs = {}
for prec in (make_precision("float32"), make_precision("bfloat16")):
    logits, tr = emulated_forward(model, ids, prec)
    rows = compare_traces({k: np.asarray(v, np.float64).reshape(ref_trace[k].shape) for k, v in tr.items()},
                          ref_trace, rtol=1.0, atol=0.0)
    runs[prec["name"]] = (logits, {r_.name: r_.max_rel for r_ in rows})
names = list(runs["float32"][1])
U32, U16 = 2.0 ** -24, 2.0 ** -8
err = {k: np.array([runs[k][1][n] for n in names]) for k in runs}
for k in runs:
    by_hand = np.abs(runs[k][0][0] - ref.logits[0]).max() / max(np.abs(runs[k][0]).max(), np.abs(ref.logits).max())
    assert np.isclose(by_hand, err[k][-1], rtol=1e-6), (by_hand, err[k][-1])
    print(f"{k:9s}: embedding {err[k][0]:.1e}, layer 0 out {runs[k][1]['model.layers.0']:.1e}, "
          f"logits {err[k][-1]:.1e} = {err[k][-1] / (U32 if k == 'float32' else U16):.1f} u")
assert err["float32"].max() <= 1e3 * U32
assert err["bfloat16"][0] <= U16 and err["bfloat16"][-1] <= 30 * U16 and err["bfloat16"][-1] >= U16 / 4

# %% [markdown]
# ## Why the statistics are kept wide
#
# Narrow LayerNorm's statistics to bfloat16 (the mean, the centred values, the variance rounded as they are
# stored) and, separately, the softmax (scores, exponentials and their sum). $x - \mu$ with $\mu$ rounded to
# 8 bits is off by up to $u|\mu|$, which LayerNorm then divides by $\sigma$: the damage grows with $|\mu|/\sigma$:
# small in this model's residual stream (printed below), large wherever a row's features share a big offset. A softmax score $s$ rounded to 8 bits moves by up to $u|s|$, which scales its weight $e^{s}$ by
# $e^{\pm u|s|}$: 4% at $|s| = 10$. In this model both effects are small ($|\mu|/\sigma$ is printed below), so on
# its logits the three runs land within the spread of bfloat16 rounding itself: we assert only that their errors
# are of one size (within a factor of 2 of each other). Which of the three is smallest is not a property of the
# model: it follows the BLAS library's summation order (an AVX2 and an AVX-512 OpenBLAS kernel order them
# differently, and the narrowed LayerNorm came out smallest on the second). The case for wide statistics is the
# single LayerNorm row measured next, as $|\mu|/\sigma$ grows.

# %%
variants = {"bf16, statistics wide (this package, transformers)": make_precision("bfloat16"),
            "bf16, LayerNorm statistics in bf16": make_precision("bfloat16", ln_stats="narrow"),
            "bf16, softmax in bf16": make_precision("bfloat16", softmax_in="narrow")}
final = {}
for label, prec in variants.items():
    logits, tr = emulated_forward(model, ids, prec)
    final[label] = np.abs(logits[0] - ref.logits[0]).max() / np.abs(ref.logits[0]).max()
    agree = float((logits[0].argmax(-1) == ref.logits[0].argmax(-1)).mean())
    print(f"{label:52s} logits error {final[label]:.2e} ({final[label] / U16:5.1f} u), argmax agrees {agree:.0%}")
assert max(final.values()) <= 2 * min(final.values()), final    # one size: bf16 rounding's own spread
stream = [ref_trace[f"model.layers.{i}"][0] for i in range(model.config.num_hidden_layers - 1)]
ratio = max(float((np.abs(s_.mean(-1)) / s_.std(-1)).max()) for s_ in stream)
print(f"largest |mean| / std of a residual-stream row in this model: {ratio:.2f}")

# One LayerNorm row of 384 features, mean mu and spread 1, the input already bfloat16 (as stored): statistics
# wide (float32) or rounded to bfloat16, against float64 on the same input.
rng = np.random.default_rng(0)
offsets = np.logspace(-1, 2, 13)
ln_err = {"wide": [], "narrow": []}
for mu in offsets:
    xr = to_bf16(mu + rng.normal(size=(64, 384)))                          # 64 rows, stored in bf16
    exact = (xr - xr.mean(-1, keepdims=True)) / np.sqrt(xr.astype(np.float64).var(-1, keepdims=True) + 1e-5)
    for kind, rnd in (("wide", lambda a: a), ("narrow", to_bf16)):
        m_ = rnd(xr.mean(-1, keepdims=True))
        xc = rnd(xr - m_)
        y = to_bf16(xc / np.sqrt(rnd((xc * xc).mean(-1, keepdims=True)) + 1e-5))
        ln_err[kind].append(float(np.abs(y - exact).max() / np.abs(exact).max()))
for mu, a, b in list(zip(offsets, ln_err["wide"], ln_err["narrow"]))[::4]:
    print(f"LayerNorm row, |mean|/std = {mu:7.1f}: error {a:.1e} with wide statistics, {b:.1e} with bf16 statistics")
assert max(ln_err["wide"]) <= 2 * U16, "wide statistics: only the final store rounds"
assert ln_err["narrow"][-1] > 10 * ln_err["wide"][-1], "narrow statistics fail once the mean dominates"

# %% [markdown]
# ## Figure
#
# The error of every traced tensor in execution order, float32 and bfloat16 against float64, with the unit
# roundoffs drawn in. The float32 curve sits near $u_{\mathrm{f32}}$ throughout; the bfloat16 curve starts at the
# first rounding and grows slowly through the layers. Middle: the final logits error with the statistics kept
# wide or narrowed. Right: one LayerNorm row as its mean grows against its spread.

# %%
fig, axes = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [2.4, 1, 1]})
x = np.arange(len(names))
for k, colour in (("float32", "tab:blue"), ("bfloat16", "tab:orange")):
    axes[0].plot(x, np.maximum(err[k], 1e-12), ".-", ms=3, lw=0.8, color=colour, label=f"{k} vs float64")
axes[0].axhline(U32, color="tab:blue", ls=":", label="u float32 = 2^-24")
axes[0].axhline(U16, color="tab:orange", ls=":", label="u bfloat16 = 2^-8")
layer_starts = [names.index(f"model.layers.{i}.input_layernorm") for i in range(model.config.num_hidden_layers)]
axes[0].set_xticks(layer_starts + [len(names) - 1], [f"layer {i}" for i in range(len(layer_starts))] + ["logits"],
                   fontsize=8)
axes[0].set(yscale="log", title=f"error of each traced tensor, in execution order ({run.name})",
            ylabel="max |a - b| / max |b|")
axes[0].legend(fontsize=8, loc="center right")
labels = [k.replace("bf16, ", "").replace(" (this package, transformers)", "\n(this package)") for k in final]
axes[1].barh(range(len(final))[::-1], [v / U16 for v in final.values()], color=["tab:green", "tab:red", "tab:red"])
axes[1].set_yticks(range(len(final))[::-1], labels, fontsize=8)
axes[1].set(title="bfloat16 logits error, in units of u = 2^-8", xlabel="max |error| / max |logits| / u")
axes[1].set_gid("rounding")    # these errors follow BLAS's summation order (see above): the stale check allows it
axes[2].loglog(offsets, ln_err["wide"], "o-", ms=3, color="tab:green", label="statistics in float32")
axes[2].loglog(offsets, ln_err["narrow"], "s-", ms=3, color="tab:red", label="statistics in bfloat16")
axes[2].axhline(U16, color="tab:orange", ls=":", label="u bfloat16")
axes[2].axvline(ratio, color="gray", ls="--", lw=0.8, label="largest in this model")
axes[2].set(title="one LayerNorm row (bf16 input)", xlabel="|mean| / std of the row", ylabel="error of LN(x)")
axes[2].legend(fontsize=8)
savefig(fig, "15_bfloat16_compute")
