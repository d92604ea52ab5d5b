"""Random small StableLM models and the engine-vs-transformers comparison (torch and transformers imported
by the functions that need them), shared by
test_decode_engine_emulated.py (CPU, kernels emulated) and gpu/test_decode_engine.py (the real kernels).

Tolerance: the engine keeps bf16 weights and rounds activations to bf16 where transformers' bf16 model
would (GEMV inputs, the K/V cache, attention output); the reference is transformers in float32 on the
same (bf16-representable) weights, so the logits agree to ||ours - ref|| / ||ref|| <= 2e-2 (seen: ~3e-3),
and greedy picks agree wherever the reference's top-2 margin exceeds twice our largest error.
"""

import numpy as np

from stablelm_ref.cuda import decode_engine as de


# ----------------------------------------------------------------------------- random StableLM models
CONFIGS = {
    # name: StableLmConfig overrides (all small; head dims cover the compiled kernels)
    "3b-like MHA, D=80": dict(hidden_size=320, num_attention_heads=4, num_key_value_heads=4, intermediate_size=864),
    "qkv bias, D=64": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, intermediate_size=704,
                           use_qkv_bias=True),
    "GQA + qk LayerNorm + parallel residual, D=160": dict(
        hidden_size=640, num_attention_heads=4, num_key_value_heads=1, intermediate_size=1728,
        qk_layernorm=True, use_parallel_residual=True),
    "GQA 2 groups, tied embeddings, D=128": dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=2,
                                                intermediate_size=1376, tie_word_embeddings=True),
}


def make_model(overrides, seed=0, layers=2, vocab=384):
    """A random StableLM in float32 whose weights are exactly bf16 values, with sharp logits."""
    import torch
    import transformers

    cfg = transformers.StableLmConfig(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=256,
                                      rope_theta=10000.0, partial_rotary_factor=0.25, **overrides)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.StableLmForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight") or ".norms." in name:
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith("bias"):
                v = 0.1 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in name:
                v = torch.randn(p.shape, generator=g)
            else:
                v = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
            p.copy_(v.to(torch.bfloat16).to(torch.float32))
    params = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    return de.config_from_transformers(cfg), params, model


def reference_logits(model, ids, mask):
    """transformers float32 logits for every position, positions from the mask as generate() does."""
    import torch

    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(pos))
    return out.logits.float().numpy()


def left_padded_batch(rng, vocab, lengths):
    T = max(lengths)
    ids = np.ones((len(lengths), T), np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = rng.integers(2, vocab, n)
        mask[b, T - n:] = 1
    return ids, mask


def engine_greedy(engine, ids, mask, new_tokens, use_graph=True):
    """The engine alone: its prefill, then new_tokens - 1 steps; the chosen ids [B, new_tokens]."""
    engine.prefill(ids, mask, logits=None)
    for _ in range(new_tokens - 1):
        engine.decode_step(use_graph=use_graph)
    return engine.generated()


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_argmax(ours, ref):
    """Greedy choices must agree wherever the reference's top-2 margin exceeds twice our error."""
    top2 = np.sort(ref, axis=-1)[..., -2:]
    margin = top2[..., 1] - top2[..., 0]
    err = np.abs(ours - ref).max(axis=-1)
    decided = margin > 2 * err
    agree = np.argmax(ours, -1) == np.argmax(ref, -1)
    assert agree[decided].all()
    return float(agree.mean())


def run_engine_against_transformers(name, steps=6, use_graph=True, kernels=None, tol=2e-2, autotune=False,
                                    lengths=(11, 6), megakernel=None):
    cfg, params, model = make_model(CONFIGS[name])
    rng = np.random.default_rng(1)
    ids, mask = left_padded_batch(rng, cfg.vocab_size, list(lengths))
    B = len(lengths)
    engine = de.GpuDecodeEngine(cfg, params, max_batch=B, max_len=32, kernels=kernels, autotune=autotune)
    engine.megakernel = megakernel                      # batch 1: the whole-step kernel (True), or not (False)
    pre = engine.prefill(ids, mask, logits="all")                           # [B, T, V]
    dec = []
    for _ in range(steps):
        engine.decode_step(use_graph=use_graph)
        dec.append(engine.get_logits())
    toks = engine.generated()                                               # [B, 1 + steps]
    full = np.concatenate([ids, toks[:, :steps]], axis=1)
    full_mask = np.concatenate([mask, np.ones((B, steps), np.int64)], axis=1)
    ref = reference_logits(model, full, full_mask)                          # [B, T + steps, V]
    T = ids.shape[1]
    valid = mask.astype(bool)
    e_pre = rel_err(pre[valid], ref[:, :T][valid])
    dec = np.stack(dec, axis=1)                                             # [B, steps, V]
    e_dec = rel_err(dec, ref[:, T:])
    assert e_pre < tol and e_dec < tol, (e_pre, e_dec)
    agree = check_argmax(np.concatenate([pre[:, -1:], dec], 1), ref[:, T - 1:])
    assert np.array_equal(toks[:, 1:], np.argmax(dec, -1))                 # the step's own greedy pick
    assert np.array_equal(toks[:, 0], np.argmax(pre[:, -1], -1))
    return engine, e_pre, e_dec, agree
