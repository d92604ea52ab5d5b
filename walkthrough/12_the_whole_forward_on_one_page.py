# %% [markdown]
# # 12 · The whole forward on one page
#
# Everything chapters 02-11 took apart, put back together in one function of plain NumPy: no import from
# `stablelm_ref`, only `config.json` read with `json` and `model.safetensors` read with the `safetensors`
# library into a dict `{checkpoint name: array}`. If you port StableLM to another framework, this is the page
# to hold your code against. It covers every variant of the family: qkv bias (stablelm-2-1.6b), grouped-query
# heads, per-head qk LayerNorm and the parallel block (stablelm-2-12b), tied embeddings.
#
# $$x_0 = E[\mathrm{ids}];\quad
#   x_l = x_{l-1} + \mathrm{attn}(\mathrm{LN}_1 x_{l-1}) + \mathrm{mlp}(\mathrm{LN}_2(\cdot));\quad
#   \mathrm{logits} = \mathrm{LN}(x_L)\,W^\top$$
#
# It is asserted equal to the package's float64 model to $10^{-12}$ of the logits' scale: both run in
# float64, where one rounding costs $2^{-53} \approx 1.1\cdot10^{-16}$ relative; the two implementations order
# their sums differently (BLAS blocks, a fused GQA reshape against a repeat), which over a few hundred
# accumulated roundings in eight layers stays near $10^{-14}$, while any real difference (a missing bias, a
# wrong rotary half, an off-by-one position) moves the logits by $10^{-3}$ or more.

# %%
import json

import ml_dtypes  # noqa: F401  (lets safetensors' NumPy loader read bfloat16 tensors)
import numpy as np
from safetensors.numpy import load_file


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)                           # biased variance
    y = (x - mu) / np.sqrt(var + eps) * w
    return y if b is None else y + b


def forward(P, c, ids):
    """P: {checkpoint name: float64 array}; c: config.json as a dict; ids: [T] ints -> logits [T, V]."""
    rope = c.get("rope_parameters") or c                                    # new or legacy config.json form
    d, H = c["hidden_size"], c["num_attention_heads"]
    KVH, D, eps = c.get("num_key_value_heads") or H, d // H, c["layer_norm_eps"]
    r = int(D * rope.get("partial_rotary_factor", 0.25))                    # rotary_ndims
    T = len(ids)
    inv = rope.get("rope_theta", 10000.0) ** (-np.arange(0, r, 2) / r)      # [r/2]
    ang = np.arange(T)[:, None] * inv                                       # [T, r/2]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))  # [T, r]
    mask = np.tril(np.ones((T, T), bool))                                   # causal: key s <= query t

    def rotary(x):                                                          # [h, T, D], GPT-NeoX rotate_half
        a, rest = x[..., :r], x[..., r:]
        turned = np.concatenate([-a[..., r // 2:], a[..., :r // 2]], -1)
        return np.concatenate([a * cos + turned * sin, rest], -1)

    x = P["model.embed_tokens.weight"][ids]                                 # [T, d]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = layer_norm(x, P[p + "input_layernorm.weight"], P[p + "input_layernorm.bias"], eps)
        q, k, v = (h @ P[f"{p}self_attn.{n}_proj.weight"].T + P.get(f"{p}self_attn.{n}_proj.bias", 0)
                   for n in "qkv")                                          # [T, H*D], [T, KVH*D] x2
        q = q.reshape(T, H, D).transpose(1, 0, 2)                           # [H, T, D]
        k, v = (a.reshape(T, KVH, D).transpose(1, 0, 2) for a in (k, v))    # [KVH, T, D]
        if c.get("qk_layernorm"):                                           # one bias-free LayerNorm per head
            q = np.stack([layer_norm(q[j], P[f"{p}self_attn.q_layernorm.norms.{j}.weight"], None, eps)
                          for j in range(H)])
            k = np.stack([layer_norm(k[j], P[f"{p}self_attn.k_layernorm.norms.{j}.weight"], None, eps)
                          for j in range(KVH)])
        q, k = rotary(q), rotary(k)
        k, v = np.repeat(k, H // KVH, 0), np.repeat(v, H // KVH, 0)         # GQA: head j reads kv head j // G
        s = np.where(mask, q @ k.transpose(0, 2, 1) / np.sqrt(D), -np.inf)  # [H, T, T]
        a = np.exp(s - s.max(-1, keepdims=True))
        o = (a / a.sum(-1, keepdims=True)) @ v                              # [H, T, D]
        attn = o.transpose(1, 0, 2).reshape(T, H * D) @ P[p + "self_attn.o_proj.weight"].T  # [T, d]
        if not c.get("use_parallel_residual"):
            x = x + attn
            h = layer_norm(x, P[p + "post_attention_layernorm.weight"], P[p + "post_attention_layernorm.bias"], eps)
        g, u = h @ P[p + "mlp.gate_proj.weight"].T, h @ P[p + "mlp.up_proj.weight"].T   # [T, F] each
        mlp = (g / (1 + np.exp(-g)) * u) @ P[p + "mlp.down_proj.weight"].T            # silu(g) * u -> [T, d]
        x = x + mlp + (attn if c.get("use_parallel_residual") else 0)
    x = layer_norm(x, P["model.norm.weight"], P["model.norm.bias"], eps)
    W = P["model.embed_tokens.weight"] if c.get("tie_word_embeddings") else P["lm_head.weight"]
    return x @ W.T                                                          # [T, V]


# %% [markdown]
# That is the model. (Not covered on this page: batches with padding, the KV cache, rope scaling and other
# activations than SiLU; chapters 01, 16 and 19 and the package cover them.)
#
# ## Checked against the package, on the trained default model
#
# The default model (`stablelm_ref/default_model/`: qkv bias, 6 query heads on 2 kv heads, qk LayerNorm,
# sequential blocks, tied embeddings) on a Python snippet.

# %%
from _common import DEFAULT_MODEL_DIR, SAMPLE_TEXT, tiny_model  # noqa: E402
from stablelm_ref import StableLmForCausalLM  # noqa: E402


def check(directory, ids, what):
    c = json.loads((directory / "config.json").read_text())
    P = {k: v.astype(np.float64) for k, v in load_file(str(directory / "model.safetensors")).items()}
    ours = forward(P, c, np.asarray(ids))
    package = StableLmForCausalLM.from_pretrained(str(directory), dtype="float64")(np.asarray(ids)[None]).logits[0]
    err = np.abs(ours - package).max() / np.abs(package).max()
    print(f"{what}: {len(ids)} tokens, logits {ours.shape}; max |one page - package| / max |logits| = {err:.1e}")
    assert err <= 1e-12, err
    return ours


from tokenizers import Tokenizer  # noqa: E402

tok = Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
ids = [0] + tok.encode(SAMPLE_TEXT).ids                                     # <|endoftext|> starts a file
logits = check(DEFAULT_MODEL_DIR, ids, "default model")
print("next token after the snippet:", repr(tok.decode([int(logits[-1].argmax())])))

# %% [markdown]
# ## And on the branches the default model does not take
#
# A tiny random stablelm-2-12b-like checkpoint (parallel block, no qkv bias, untied head, rope_theta 500, its
# config.json rewritten in the legacy form with the rope keys at the top level, as the published files have
# them) and a 3b-like one (multi-head, no qk LayerNorm, rotary on half of each head), saved to disk and read
# back the same way. Last, the check must be able to fail: the default model without its q/k/v biases is far
# from the package.

# %%
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    variants = {"12b-like": dict(num_key_value_heads=2, qk_layernorm=True, use_parallel_residual=True,
                                 rope_theta=500.0),
                "3b-like": dict(partial_rotary_factor=0.5)}
    for name, overrides in variants.items():
        model = tiny_model(seed=12, **overrides)
        model.save_pretrained(Path(tmp) / name)
        if name == "12b-like":
            path = Path(tmp) / name / "config.json"
            c = json.loads(path.read_text())
            rope = c.pop("rope_parameters")
            path.write_text(json.dumps({**c, "rope_theta": rope["rope_theta"],
                                        "partial_rotary_factor": rope["partial_rotary_factor"]}))
        check(Path(tmp) / name, np.random.default_rng(1).integers(0, 101, 17), name)

c = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
P = {k: v.astype(np.float64) for k, v in load_file(str(DEFAULT_MODEL_DIR / "model.safetensors")).items()
     if not k.endswith("_proj.bias")}
wrong = forward(P, c, np.asarray(ids))
err = np.abs(wrong - logits).max() / np.abs(logits).max()
print(f"without the q/k/v biases: {err:.1e} of the logits' scale")
assert err > 1e-3
