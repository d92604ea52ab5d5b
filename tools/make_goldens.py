"""Build tests/goldens/: small random StableLM checkpoints and transformers' outputs for them.

One folder per configuration the family uses (docs/facts.md), each with config.json, model.safetensors
(float32 weights) and golden.safetensors (transformers' outputs, float64 and float32 runs):

    3b            MHA (stablelm-3b-4e1t)            1_6b          qkv bias (stablelm-2-1.6b)
    12b           GQA + per-head qk LayerNorm + parallel residual (stablelm-2-12b)
    tied          tied embeddings                    rotary_half   partial_rotary_factor 0.5
    rotary_full   partial_rotary_factor 1.0          rope_linear   linear scaling (legacy config.json form)
    rope_dynamic  dynamic NTK scaling, run past max_position_embeddings
    theta_eps     rope_theta 500000, layer_norm_eps 1e-3                gelu   hidden_act gelu

LayerNorm weights and every bias are moved away from (1, 0) so each parameter matters. Inputs: a
right-padded and a left-padded batch (pad id 1); the left-padded one runs with position ids from the
mask (cumsum - 1), as generate does.

    python tools/make_goldens.py --out tests/goldens          (make goldens; needs torch + transformers)
"""

import argparse
import json
import os
import shutil

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=0,
            num_labels=3)
VARIANTS = {
    "3b": {},
    "1_6b": dict(use_qkv_bias=True),
    "12b": dict(num_key_value_heads=2, qk_layernorm=True, use_parallel_residual=True),
    "tied": dict(tie_word_embeddings=True),
    "rotary_half": dict(partial_rotary_factor=0.5),
    "rotary_full": dict(partial_rotary_factor=1.0),
    "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "rope_dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=8),
    "theta_eps": dict(rope_theta=500000.0, layer_norm_eps=1e-3),
    "gelu": dict(hidden_act="gelu"),
}
LEGACY_FORM = {"rope_linear"}  # written with top-level rope_theta / partial_rotary_factor / rope_scaling


def make_config(overrides):
    kw = {**BASE, **overrides}
    rope = {"rope_type": "default", "rope_theta": kw.pop("rope_theta", 10000.0),
            "partial_rotary_factor": kw.pop("partial_rotary_factor", 0.25)}
    scaling = kw.pop("rope_scaling", None)
    if scaling:
        rope.update(scaling)
    return transformers.StableLmConfig(rope_parameters=rope, **kw)


def perturb(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.2 * noise)
        # round to float32 so the float32 checkpoint holds the float64 model's weights exactly
        for p in model.parameters():
            p.copy_(p.to(torch.float32).to(p.dtype))


def inputs(vocab, seed, rope_dynamic):
    rng = np.random.default_rng(seed)
    t = 12 if rope_dynamic else 9           # rope_dynamic: past max_position_embeddings (8)
    ids = rng.integers(2, vocab, (2, t))
    right_mask = np.ones((2, t), np.int64)
    right_mask[1, t - 3:] = 0
    right = np.where(right_mask == 1, ids, 1)
    left_mask = np.ones((2, t), np.int64)
    left_mask[1, :4] = 0
    left = np.where(left_mask == 1, ids, 1)
    left_pos = np.maximum(np.cumsum(left_mask, axis=1) - 1, 0)
    return right, right_mask, left, left_mask, left_pos


def run(model, ids, mask, pos=None, **kw):
    t = lambda a: None if a is None else torch.tensor(a)  # noqa: E731
    with torch.no_grad():
        return model(input_ids=t(ids), attention_mask=t(mask), position_ids=t(pos), **kw)


def build(name, overrides, out, seed):
    config = make_config(overrides)
    torch.manual_seed(seed)
    lm = transformers.StableLmForCausalLM(config).to(torch.float64).eval()
    perturb(lm, seed)
    folder = os.path.join(out, name)
    shutil.rmtree(folder, ignore_errors=True)
    lm.to(torch.float32).save_pretrained(folder, safe_serialization=True)
    lm.to(torch.float64)
    if name in LEGACY_FORM:
        write_legacy_config(folder)
    right, right_mask, left, left_mask, left_pos = inputs(config.vocab_size, seed, "dynamic" in name)
    g = {"right_ids": right, "right_mask": right_mask, "left_ids": left, "left_mask": left_mask,
         "left_pos": left_pos}
    labels = np.where(right_mask == 1, right, -100)
    o = run(lm, right, right_mask, labels=torch.tensor(labels), output_hidden_states=True)
    g["right_logits"] = o.logits.numpy()
    g["right_loss"] = np.array(o.loss.item())
    g["right_labels"] = labels
    for i, h in enumerate(o.hidden_states):
        g[f"right_hidden_{i}"] = h.numpy()
    g["left_logits"] = run(lm, left, left_mask, left_pos).logits.numpy()
    lm32 = transformers.StableLmForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    g["right_logits_f32"] = run(lm32, right, right_mask).logits.numpy()
    g["left_logits_f32"] = run(lm32, left, left_mask, left_pos).logits.numpy()

    # classification heads on the same body, with a random score layer
    gen = torch.Generator().manual_seed(seed + 1)
    seq = transformers.StableLmForSequenceClassification(config).to(torch.float64).eval()
    seq.model.load_state_dict(lm.model.state_dict())
    seq.score.weight.data = (0.2 * torch.randn(seq.score.weight.shape, generator=gen, dtype=torch.float64))
    seq.score.weight.data = seq.score.weight.data.float().double()
    seq_labels = np.array([2, 0])
    g["score_weight"] = seq.score.weight.data.float().numpy()
    g["seq_labels"] = seq_labels
    o = run(seq, right, right_mask, labels=torch.tensor(seq_labels))
    g["seq_right_logits"], g["seq_right_loss"] = o.logits.numpy(), np.array(o.loss.item())
    g["seq_left_logits"] = run(seq, left, left_mask, left_pos).logits.numpy()

    tok = transformers.StableLmForTokenClassification(config).to(torch.float64).eval()
    tok.model.load_state_dict(lm.model.state_dict())
    tok.score.weight.data = (0.2 * torch.randn(tok.score.weight.shape, generator=gen, dtype=torch.float64)).float().double()
    tok.score.bias.data = (0.2 * torch.randn(tok.score.bias.shape, generator=gen, dtype=torch.float64)).float().double()
    g["token_score_weight"] = tok.score.weight.data.float().numpy()
    g["token_score_bias"] = tok.score.bias.data.float().numpy()
    tok_labels = np.where(right_mask == 1, np.random.default_rng(seed).integers(0, 3, right.shape), -100)
    g["token_labels"] = tok_labels
    o = run(tok, right, right_mask, labels=torch.tensor(tok_labels))
    g["token_logits"], g["token_loss"] = o.logits.numpy(), np.array(o.loss.item())

    save_file({k: np.ascontiguousarray(v) for k, v in g.items()}, os.path.join(folder, "golden.safetensors"),
              metadata={"transformers": transformers.__version__, "torch": torch.__version__})
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(folder, extra)):
            os.remove(os.path.join(folder, extra))
    return folder


def write_legacy_config(folder):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        d = json.load(f)
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    d["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    rope_type = rope.pop("rope_type")
    d["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    with open(path, "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--out", default="tests/goldens")
    ap.add_argument("--only", nargs="*", help="variant names (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        if args.only and name not in args.only:
            continue
        print("wrote", build(name, overrides, args.out, seed=100 + i))


if __name__ == "__main__":
    main()
