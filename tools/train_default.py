#!/usr/bin/env python3
"""Train the small StableLM that ships inside stablelm_ref as its default model.

    python3 tools/train_default.py --out DIR [--minutes 6] [--seed 0] [--variants base,qkln,qkln_par]

Steps, all in this one file, in the order they run:

1. Corpus: the ``*.py`` files of the standard library of the Python that runs this script
   (``sysconfig.get_paths()["stdlib"]``), test suites and site-packages excluded. Every file is
   listed and hashed in ``corpus_manifest.json``. Ten ordinary modules (HELD_OUT) are held out
   for the final evaluation; about 2% of the remaining bytes (VAL) are held out too, for choosing
   among the trained variants and checkpoints, so the held-out modules are never used for a choice.
2. Tokenizer: byte-level BPE (``tokenizers``) trained on the training part only, for each size in
   ``--vocab-candidates``; bytes per token on the held-out modules is measured for each, and the
   ``--vocab`` size is kept. ``<|endoftext|>`` (id 0) is bos/eos and the separator put before
   every file; ``<|padding|>`` (id 1) is pad.
3. Model: transformers' StableLmForCausalLM with the family's features (partial rotary 25%,
   grouped-query attention, LayerNorm with bias, SwiGLU). Each variant of ``--variants`` (they
   differ only in qk_layernorm / use_parallel_residual) trains in its own process, all at once on
   the one GPU, for ``--minutes`` of wall-clock time (or ``--steps``): bf16 autocast, AdamW,
   linear warm-up then cosine decay over the time budget, random 512-token windows of the training
   stream. Each keeps the checkpoint with the lowest validation loss.
4. The variant with the lowest validation loss is cast to bfloat16 and saved; the saved file is
   loaded back in float32 and evaluated on the held-out windows (TF32 off): mean cross-entropy per
   predicted token (nats) and bits per byte. Greedy samples, a training curve and MODEL_CARD.md
   are written beside it.

The tokenizer measurement, the variants and the final evaluation are reported in MODEL_CARD.md.

How the shipped stablelm_ref/default_model was made (one H100, Python 3.12.3, torch 2.11, transformers 5.17):

    python3 tools/train_default.py --out DIR --minutes 4                    # run 1: the 3 variants; qkln won
    python3 tools/train_default.py --out DIR --variants qkln --steps 1000   # run 2: shipped (1.446 bits/byte)

Run 1 showed every variant overfitting the 2.8 M training tokens after ~700 steps, so run 2 fits the
cosine schedule to 1,000 steps. A wall-clock budget keeps the run's length fixed in time but not in
steps (so not bit-reproducible across machines); --steps is.

Output (flat, --out): config.json, model.safetensors (bfloat16), generation_config.json, tokenizer.json,
tokenizer_config.json, special_tokens_map.json, corpus_manifest.json, heldout.safetensors, eval.json,
training_curve.png, MODEL_CARD.md. Needs torch (a GPU for real runs), transformers, tokenizers,
safetensors, matplotlib.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

# Held out for the final evaluation: ordinary, self-contained modules present in 3.11 and 3.12.
HELD_OUT = (
    "bisect.py", "calendar.py", "colorsys.py", "dataclasses.py", "difflib.py",
    "fractions.py", "heapq.py", "shlex.py", "statistics.py", "textwrap.py",
)
VAL_FRACTION = 0.02          # of the training bytes, for model selection (never trained on)
VAL_MAX_FILE_BYTES = 100_000  # keep single huge files out of the validation split
EOT, PAD = "<|endoftext|>", "<|padding|>"
VARIANTS = {  # name -> (qk_layernorm, use_parallel_residual)
    "base": (False, False),      # as stablelm-3b-4e1t
    "qkln": (True, False),
    "qkln_par": (True, True),    # as stablelm-2-12b
}
SAMPLE_PROMPTS = ("def fibonacci(n):", "class Stack:")
SUBSET_WINDOWS = 4
MAX_MODEL_BYTES = 25_000_000


# ---------------------------------------------------------------------------------------------
# 1. corpus


def is_excluded(rel: str) -> bool:
    """Test suites and site-packages are not part of the corpus."""
    parts = rel.split("/")
    dirs, name = parts[:-1], parts[-1]
    if "site-packages" in dirs or "test" in dirs or "tests" in dirs or "idle_test" in dirs:
        return True  # test/, */test/, */tests/ (lib2to3/tests), idlelib/idle_test/
    return name.startswith("test_")


def build_corpus(stdlib: Path) -> dict:
    files, skipped = [], []
    for p in sorted(stdlib.rglob("*.py")):
        rel = p.relative_to(stdlib).as_posix()
        if is_excluded(rel) or not p.is_file():
            continue
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        files.append({"path": rel, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "text": text})
    missing = [h for h in HELD_OUT if h not in {f["path"] for f in files}]
    if missing:
        sys.exit(f"held-out modules missing from {stdlib}: {missing}")
    # Validation split: training files in the order of the hash of their path, until VAL_FRACTION.
    train_bytes = sum(f["bytes"] for f in files if f["path"] not in HELD_OUT)
    order = sorted((f for f in files if f["path"] not in HELD_OUT and f["bytes"] <= VAL_MAX_FILE_BYTES),
                   key=lambda f: hashlib.sha256(f["path"].encode()).hexdigest())
    val, acc = set(), 0
    for f in order:
        if acc >= VAL_FRACTION * train_bytes:
            break
        val.add(f["path"])
        acc += f["bytes"]
    for f in files:
        f["split"] = "heldout" if f["path"] in HELD_OUT else "val" if f["path"] in val else "train"
    listing = "".join(f"{f['path']}\t{f['sha256']}\n" for f in files)  # files are sorted by path
    manifest = {
        "python_version": platform.python_version(),
        "stdlib": str(stdlib),
        "licence": "PSF-2.0 (Python Software Foundation License Version 2)",
        "selection": "*.py under stdlib; excluded: site-packages, test/, tests/, idle_test/, test_*.py; "
                     "files that are not UTF-8 are skipped",
        "file_count": len(files),
        "bytes": sum(f["bytes"] for f in files),
        "corpus_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "corpus_sha256_of": "sha256 of the lines 'path<TAB>sha256<LF>' over the files sorted by path",
        "heldout_modules": list(HELD_OUT),
        "split_bytes": {s: sum(f["bytes"] for f in files if f["split"] == s) for s in ("train", "val", "heldout")},
        "split_files": {s: sum(f["split"] == s for f in files) for s in ("train", "val", "heldout")},
        "skipped_not_utf8": skipped,
        "files": [{k: f[k] for k in ("path", "bytes", "sha256", "split")} for f in files],
    }
    return {"files": files, "manifest": manifest}


# ---------------------------------------------------------------------------------------------
# 2. tokenizer


def train_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    assert tok.token_to_id(EOT) == 0 and tok.token_to_id(PAD) == 1, "special token ids must be 0 and 1"
    return tok


def token_byte_lengths(tok) -> np.ndarray:
    """UTF-8 bytes each token id spells (0 for the special tokens): each character of a byte-level
    token stands for exactly one byte (GPT-2's bytes_to_unicode table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_chars = {chr(c) for c in cs}
    out = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for token, i in tok.get_vocab().items():
        if token in (EOT, PAD):
            continue
        assert all(ch in byte_chars for ch in token), token
        out[i] = len(token)
    return out


def encode_stream(tok, texts) -> np.ndarray:
    """<|endoftext|> before every file, then the file's tokens."""
    parts = []
    for enc in tok.encode_batch(list(texts)):
        parts.append(np.array([0] + enc.ids, dtype=np.int32))
    return np.concatenate(parts)


def windows(stream: np.ndarray, length: int) -> np.ndarray:
    n = len(stream) // length
    return stream[: n * length].reshape(n, length)                     # [N, L], tail dropped


def write_tokenizer_files(tok, out: Path, context: int):
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": PAD}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": context,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            "0": {"content": EOT, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True},
            "1": {"content": PAD, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True},
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# 3. model and training (one process per variant)


def make_config(args, vocab_size, variant):
    from transformers import StableLmConfig

    qk_ln, parallel = VARIANTS[variant]
    return StableLmConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        hidden_act="silu", max_position_embeddings=args.context, initializer_range=0.02, layer_norm_eps=1e-5,
        tie_word_embeddings=True, use_qkv_bias=True, qk_layernorm=qk_ln, use_parallel_residual=parallel,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        partial_rotary_factor=0.25,  # older transformers 5.x read it from the top level
        hidden_dropout=args.dropout, attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )


def count_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@functools.lru_cache(None)
def _torch():
    import torch
    return torch


def eval_loss(model, wins, device, batch, amp):
    """Mean causal-LM cross-entropy (nats) over all predicted tokens of the windows [N, L]."""
    torch = _torch()
    F = torch.nn.functional
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(wins), batch):
            x = wins[i: i + batch].to(device=device, dtype=torch.long)  # [b, L]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(input_ids=x).logits                           # [b, L, V]
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                  x[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += x[:, 1:].numel()
    model.train()
    return total / count


def train_variant(args):
    """Child process: train one variant, keep the checkpoint with the lowest validation loss."""
    torch = _torch()
    from safetensors.torch import save_file
    from transformers import StableLmForCausalLM

    work = Path(args.work)
    meta = json.loads((work / "data.json").read_text())
    device = torch.device(args.device)
    amp = device.type == "cuda"
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(args.seed)
        torch.backends.cuda.matmul.allow_tf32 = True
    train = torch.from_numpy(np.load(work / "train.npy").astype(np.int64)).to(device)  # [T]
    val = torch.from_numpy(np.load(work / "val_windows.npy"))                         # [Nv, L]
    held = torch.from_numpy(np.load(work / "heldout_windows.npy"))                    # [Nh, L]

    config = make_config(args, meta["vocab_size"], args.child)
    model = StableLmForCausalLM._from_config(config, attn_implementation="sdpa").to(device)
    head_dim = args.hidden // args.heads
    assert model.model.layers[0].self_attn.rotary_ndims == int(head_dim * 0.25), "partial rotary must be 25%"
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    L, B = args.context, args.batch
    offs = torch.arange(L + 1, device=device)                                            # [L+1]
    budget = args.minutes * 60.0
    eval_every = budget / args.evals if args.steps == 0 else None
    eval_every_steps = max(1, args.steps // args.evals) if args.steps else None

    hist = {"variant": args.child, "params": count_params(model), "steps": [], "train_loss": [],
            "evals": [], "batch_tokens": B * L}
    best = {"val": float("inf"), "step": -1, "state": None}

    def do_eval(step, elapsed):
        v = eval_loss(model, val, device, 64, amp)
        h = eval_loss(model, held, device, 64, amp)
        hist["evals"].append({"step": step, "time_s": elapsed, "val_loss": v, "heldout_loss": h})
        print(f"[{args.child}] step {step} {elapsed:.0f}s val {v:.4f} heldout {h:.4f}", flush=True)
        if v < best["val"]:
            best.update(val=v, step=step,
                        state={k: t.detach().to(torch.bfloat16).clone() for k, t in model.state_dict().items()})

    def lr_at(step, progress):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    t0 = time.time()
    next_eval, step, acc, acc_n, progress = 0.0, 0, torch.zeros((), device=device), 0, 0.0
    while True:
        elapsed = time.time() - t0
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1.0:
            break
        if (eval_every is not None and elapsed >= next_eval) or (eval_every_steps and step % eval_every_steps == 0):
            do_eval(step, elapsed)
            next_eval = elapsed + (eval_every or 0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, progress)
        starts = torch.randint(0, len(train) - L - 1, (B,), device=device, generator=gen)  # [B]
        w = train[starts[:, None] + offs]                                                 # [B, L+1]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=w[:, :-1]).logits                                   # [B, L, V]
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        acc += loss.detach()
        acc_n += 1
        step += 1
        if step % 10 == 0:  # one host sync every 10 steps
            hist["steps"].append(step)
            hist["train_loss"].append(float(acc) / acc_n)
            acc.zero_()
            acc_n = 0
            if step == 50 or step % 1000 == 0:
                print(f"[{args.child}] step {step} loss {hist['train_loss'][-1]:.4f} "
                      f"{step * B * L / (time.time() - t0) / 1e3:.0f}k tok/s", flush=True)
    if acc_n:
        hist["steps"].append(step)
        hist["train_loss"].append(float(acc) / acc_n)
    wall = time.time() - t0
    do_eval(step, wall)
    hist.update(total_steps=step, tokens_seen=step * B * L, train_wall_s=wall, best_val=best["val"],
                best_step=best["step"], final_train_loss=hist["train_loss"][-1] if hist["train_loss"] else None)
    state = best["state"]
    state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(work / f"{args.child}.safetensors"))
    config.save_pretrained(work / args.child)
    (work / f"{args.child}.json").write_text(json.dumps(hist))
    print(f"[{args.child}] done: {step} steps, {wall:.0f}s, best val {best['val']:.4f} at step {best['step']}", flush=True)


# ---------------------------------------------------------------------------------------------
# 4. final evaluation, samples, curve, model card


def final_eval(model_dir: Path, held: np.ndarray, byte_len: np.ndarray, device):
    """Load the shipped file in float32 and evaluate each window as transformers' labels=input_ids."""
    torch = _torch()
    from transformers import StableLmForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    model = StableLmForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").to(device)
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(len(held)):
            x = torch.from_numpy(held[i: i + 1].astype(np.int64)).to(device)             # [1, L]
            losses.append(float(model(input_ids=x, labels=x).loss))
        sub = torch.from_numpy(held[:SUBSET_WINDOWS].astype(np.int64)).to(device)        # [4, L]
        subset_batched = float(model(input_ids=sub, labels=sub).loss)
    L = held.shape[1]
    pred_tokens = len(held) * (L - 1)
    total_nats = float(np.sum(np.array(losses, dtype=np.float64) * (L - 1)))
    pred_bytes = int(byte_len[held[:, 1:]].sum())
    return model, {
        "heldout_windows": int(len(held)),
        "window_length": int(L),
        "heldout_predicted_tokens": int(pred_tokens),
        "heldout_predicted_bytes": pred_bytes,
        "heldout_loss_nats": total_nats / pred_tokens,
        "heldout_bits_per_byte": total_nats / math.log(2) / pred_bytes,
        "heldout_subset_windows": SUBSET_WINDOWS,
        "heldout_subset_loss_nats": float(np.mean(losses[:SUBSET_WINDOWS])),
        "heldout_subset_loss_nats_batched": subset_batched,
        "dtype_shipped": "bfloat16",
        "dtype_evaluated": "float32 (bfloat16 weights upcast exactly), TF32 off, eager attention",
        "device": str(device),
    }


def greedy_samples(model, tok, device, n_new=96):
    torch = _torch()
    out = {}
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([[0] + tok.encode(prompt).ids], device=device)
        n_new = min(n_new, model.config.max_position_embeddings - ids.shape[1])
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=n_new, do_sample=False, eos_token_id=0, pad_token_id=1)
        out[prompt] = tok.decode(g[0, 1:].tolist())
    return out


def plot_curve(histories, chosen, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    h = histories[chosen]
    if h["steps"]:
        ax.plot(h["steps"], h["train_loss"], color="C0", lw=0.8, alpha=0.8, label=f"train ({chosen}, dropout on)")
    ev = h["evals"]
    ax.plot([e["step"] for e in ev], [e["heldout_loss"] for e in ev], "o-", color="C1", ms=3, label=f"held-out modules ({chosen})")
    ax.plot([e["step"] for e in ev], [e["val_loss"] for e in ev], "s--", color="C2", ms=2.5, lw=0.8, label=f"validation split ({chosen})")
    for i, (name, o) in enumerate(sorted(histories.items())):
        if name != chosen:
            ax.plot([e["step"] for e in o["evals"]], [e["heldout_loss"] for e in o["evals"]], ":", lw=1,
                    color=f"C{3 + i}", label=f"held-out ({name})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ev_h = [e["heldout_loss"] for e in ev]
    ax.set_ylim(min(min(h["train_loss"] or ev_h), min(ev_h)) * 0.9, max(ev_h[min(1, len(ev_h) - 1)], 2.0) * 1.1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("stablelm-ref default model: training on the Python standard library")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def human(n):
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def write_model_card(out, info):
    m, ev, cfg = info["manifest"], info["eval"], info["config"]
    vocab_rows = "\n".join(
        f"| {r['vocab_size']} | {r['heldout_bytes_per_token']:.3f} | {r['train_tokens']:,} | {r['embedding_params']:,} |"
        f" {'**chosen**' if r['vocab_size'] == cfg['vocab_size'] else ''} |" for r in info["vocab_measure"])
    var_rows = "\n".join(
        f"| {name} | {VARIANTS[name][0]} | {VARIANTS[name][1]} | {r['params']:,} | {r['total_steps']:,} | "
        f"{r['tokens_seen'] / 1e6:.1f} M | {r['final_train_loss']:.4f} | {r['fp32_val_loss']:.4f} | {r['fp32_heldout_loss']:.4f} |"
        f" {'**shipped**' if name == info['chosen'] else ''} |" for name, r in sorted(info["variants"].items()))
    ch = info["variants"][info["chosen"]]
    samples = "\n\n".join(f"Prompt `{p}` (after `<|endoftext|>`), greedy, 96 new tokens:\n\n```python\n{s}\n```"
                          for p, s in info["samples"].items())
    epochs = ch["tokens_seen"] / info["train_tokens"]
    batch_tokens = info["args"]["batch"] * info["args"]["context"]
    schedule = (f"{info['args']['steps']:,} steps" if info["args"]["steps"]
                else f"a wall-clock budget of {info['args']['minutes']} min")
    last_evals = info["histories"][info["chosen"]]["evals"]
    h_first_half = min(e["heldout_loss"] for e in last_evals[: max(1, len(last_evals) // 2)])
    card = f"""# stablelm-ref default model

A small StableLM (transformers `model_type` "stablelm") trained from scratch by `tools/train_default.py`
on the Python standard library's own source, so that `stablelm-ref generate` and `make demo` run
offline. It continues Python source with Python-shaped text (names, indentation, docstrings, licence
headers), often repeating itself under greedy decoding; it knows nothing else. It is a test and
teaching model, not a useful assistant.

## Key figures

| | |
|---|---|
| held-out loss (10 held-out modules, float32 eval of the shipped bf16 weights) | **{ev['heldout_loss_nats']:.4f} nats / token** |
| held-out bits per byte | **{ev['heldout_bits_per_byte']:.4f}** (target was <= 1.5) |
| parameters | {info['params']:,} (embeddings tied with the LM head) |
| tokens seen | {ch['best_step'] * batch_tokens:,} by the shipped checkpoint (step {ch['best_step']:,}; {ch['best_step'] * batch_tokens / info['train_tokens']:.1f} passes over the {info['train_tokens']:,} training tokens); {ch['tokens_seen']:,} in the whole run |
| steps x batch | {ch['total_steps']:,} steps x {info['args']['batch']} windows x {info['args']['context']} tokens ({batch_tokens:,} tokens per step) |
| final train loss (mean of the last 10 steps, dropout on) | {ch['final_train_loss']:.4f} nats / token |
| wall time | {ch['train_wall_s']:.0f} s of training{f" ({len(info['variants'])} variants at once on the one GPU)" if len(info['variants']) > 1 else ""}; {info['total_wall_s']:.0f} s for the whole script |
| hardware | {info['gpu']} |
| software | Python {m['python_version']}, torch {info['versions']['torch']}, transformers {info['versions']['transformers']}, tokenizers {info['versions']['tokenizers']} |

## Corpus

The `*.py` files of the standard library of Python {m['python_version']} (`Lib/`), excluding test suites
(`test/`, `tests/`, `idlelib/idle_test/`, `test_*.py`) and `site-packages`: {m['file_count']} files,
{m['bytes']:,} bytes. Every file is listed with its sha256 in `corpus_manifest.json`;
corpus hash (sha256 over the sorted `path<TAB>sha256` lines): `{m['corpus_sha256']}`.

- training: {m['split_files']['train']} files, {m['split_bytes']['train']:,} bytes, {info['train_tokens']:,} tokens
  (each file preceded by `<|endoftext|>`).
- validation: {m['split_files']['val']} files, {m['split_bytes']['val']:,} bytes (about 2% of the training bytes, chosen
  by the hash of the path). Used to pick the variant and the checkpoint; never trained on.
- held-out (evaluation only, never trained on, never used for a choice): {', '.join('`' + h + '`' for h in m['heldout_modules'])};
  {m['split_bytes']['heldout']:,} bytes.

Licence of the corpus: **PSF License Version 2** (Python Software Foundation License); the weights are
a derivative of that text.

## Tokenizer

Byte-level BPE trained with `tokenizers` on the training split: ByteLevel pre-tokenizer
(add_prefix_space=False, GPT-2 regex), ByteLevel decoder, `<|endoftext|>` = 0 (bos, eos, unk, and the
separator put before every file), `<|padding|>` = 1 (pad). Loads with `tokenizers.Tokenizer.from_file`
and with transformers' `AutoTokenizer` (PreTrainedTokenizerFast). No bos is added automatically:
prepend `<|endoftext|>` to a prompt that starts a file, as the samples below do.

Vocabulary size, measured on the held-out modules (each vocabulary trained on the same training split):

| vocab | held-out bytes / token | training tokens | embedding params (hidden {cfg['hidden_size']}) | |
|---|---|---|---|---|
{vocab_rows}

Chosen: {cfg['vocab_size']}. Going from {cfg['vocab_size']} to {2 * cfg['vocab_size']} tokens would give {info['vocab_gain_next']:+.1%} bytes per
token on the held-out modules for {cfg['vocab_size'] * cfg['hidden_size']:,} more embedding parameters
({cfg['vocab_size'] * cfg['hidden_size'] / info['params']:.0%} of this model, which must fit in 25 MB); those parameters are spent on
transformer layers instead. (The vocabulary was not chosen by training a model per size: that would have cost
device time this run did not have.)

## Architecture

transformers `StableLmForCausalLM`, shipped in bfloat16 (`model.safetensors`, {info['model_bytes']:,} bytes):
hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads of {cfg['hidden_size'] // cfg['num_attention_heads']} dims, {cfg['num_key_value_heads']} key/value heads
(grouped-query attention), partial rotary embedding on 25% of each head ({int(cfg['hidden_size'] // cfg['num_attention_heads'] * 0.25)} dims, theta 10000),
LayerNorm with bias (eps 1e-5), SwiGLU MLP (silu, intermediate {cfg['intermediate_size']}), q/k/v biases (as stablelm-2-1_6b),
qk_layernorm = {cfg['qk_layernorm']}, use_parallel_residual = {cfg['use_parallel_residual']}, tied input/output embeddings,
context {cfg['max_position_embeddings']}, hidden_dropout {cfg['hidden_dropout']} in training (inactive at inference).

qk_layernorm and the parallel residual are kept only if they pay: the variants of a run train at once on the
same GPU, with the same seed, data order and budget, and the one with the lowest validation loss is shipped
(float32 losses of each variant's kept checkpoint; {len(info['variants'])} variant(s) in this run):

| variant | qk_layernorm | parallel residual | params | steps | tokens | final train loss | val loss | held-out loss | |
|---|---|---|---|---|---|---|---|---|---|
{var_rows}

## Training

torch on the GPU, bf16 autocast, AdamW (betas 0.9/0.95, weight decay {info['args']['weight_decay']} on matrices, fused),
peak lr {info['args']['lr']} after {info['args']['warmup']} warm-up steps, cosine decay to {info['args']['min_lr']} over {schedule},
gradient clipping 1.0, random {info['args']['context']}-token windows of the training stream,
`torch.manual_seed({info['args']['seed']})`. The checkpoint with the lowest validation loss among {info['args']['evals']}+ evaluations
is kept (step {ch['best_step']:,} of {ch['total_steps']:,}). Curve: `training_curve.png`.

## Evaluation

`heldout.safetensors` holds the held-out token stream (the ten modules, each preceded by `<|endoftext|>`) cut
into {ev['heldout_windows']} non-overlapping windows of {ev['window_length']} tokens (`input_ids`, int32; the tail is dropped).
Each window is evaluated independently, exactly as transformers' `labels=input_ids` loss, on the shipped bf16
weights upcast to float32 (TF32 off): {ev['heldout_predicted_tokens']:,} predicted tokens, {ev['heldout_predicted_bytes']:,} UTF-8 bytes.

- held-out loss: {ev['heldout_loss_nats']:.6f} nats / token
- bits per byte: {ev['heldout_bits_per_byte']:.6f} (= total nats / ln 2 / UTF-8 bytes of the predicted tokens)
- first {SUBSET_WINDOWS} windows only (what CI recomputes with the NumPy model): {ev['heldout_subset_loss_nats']:.6f} nats / token

## Samples (greedy)

{samples}

## Where the run stands

- passes over the training tokens in the whole run: {epochs:.1f}
- held-out loss (bf16-autocast evaluations during training, same windows) at the last evaluation {last_evals[-1]['heldout_loss']:.4f}; lowest during the run {min(e['heldout_loss'] for e in last_evals):.4f};
  lowest in the first half {h_first_half:.4f}; at the evaluation a quarter of the run before the end {last_evals[max(0, len(last_evals) - 1 - max(1, len(last_evals) // 4))]['heldout_loss']:.4f}
- validation loss at the kept checkpoint {ch['fp32_val_loss']:.4f} vs final train loss {ch['final_train_loss']:.4f} (train loss measured with dropout on)
"""
    (out / "MODEL_CARD.md").write_text(card)


# ---------------------------------------------------------------------------------------------
# driver


def main():
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (flat)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--minutes", type=float, default=6.0, help="wall-clock training budget per variant")
    ap.add_argument("--steps", type=int, default=0, help="train for this many steps instead of --minutes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--variants", default="base,qkln,qkln_par", help=f"comma list of {list(VARIANTS)}")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--vocab-candidates", default="2048,4096,8192")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--min-lr", type=float, default=1.5e-4)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--evals", type=int, default=24, help="evaluations during training (time-spaced)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device is None:
        args.device = "cuda" if _torch().cuda.is_available() else "cpu"
    if args.child:
        return train_variant(args)
    if args.work is not None:                                           # kept, as asked
        Path(args.work).mkdir(parents=True, exist_ok=True)
        return build(args, Path(args.work))
    with tempfile.TemporaryDirectory(prefix="train_default_") as work:  # removed at the end, even on a failure
        return build(args, Path(work))


def build(args, work):
    """Corpus, tokenizer, the variants trained in child processes (scratch files in `work`), the chosen model
    and its card written to --out."""
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",")
    assert all(v in VARIANTS for v in variants), variants

    # 1. corpus
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = build_corpus(stdlib)
    m = corpus["manifest"]
    (out / "corpus_manifest.json").write_text(json.dumps(m, indent=1) + "\n")
    texts = {s: [f["text"] for f in corpus["files"] if f["split"] == s] for s in ("train", "val")}
    texts["heldout"] = [next(f["text"] for f in corpus["files"] if f["path"] == h) for h in HELD_OUT]
    print(f"corpus: Python {m['python_version']}, {m['file_count']} files, {m['bytes']:,} bytes, "
          f"sha256 {m['corpus_sha256'][:16]}..., split {m['split_bytes']}", flush=True)

    # 2. tokenizer: measure the candidates, keep --vocab
    held_bytes = sum(len(t.encode()) for t in texts["heldout"])
    sizes = sorted({int(v) for v in args.vocab_candidates.split(",")} | {args.vocab})
    measure, tok = [], None
    for v in sizes:
        t = train_tokenizer(texts["train"], v)
        n_held = sum(len(e.ids) for e in t.encode_batch(texts["heldout"]))
        n_train = sum(len(e.ids) + 1 for e in t.encode_batch(texts["train"]))
        measure.append({"vocab_size": v, "heldout_bytes_per_token": held_bytes / n_held, "train_tokens": n_train,
                        "embedding_params": v * args.hidden})
        print(f"vocab {v}: held-out {held_bytes / n_held:.3f} bytes/token, {n_train:,} training tokens", flush=True)
        if v == args.vocab:
            tok = t
    by_v = {r["vocab_size"]: r for r in measure}
    nxt = by_v.get(2 * args.vocab)
    vocab_gain_next = nxt["heldout_bytes_per_token"] / by_v[args.vocab]["heldout_bytes_per_token"] - 1 if nxt else float("nan")
    write_tokenizer_files(tok, out, args.context)
    byte_len = token_byte_lengths(tok)
    print(f"tokenizers done at {time.time() - t_start:.0f}s", flush=True)

    streams = {s: encode_stream(tok, texts[s]) for s in ("train", "val", "heldout")}
    held = windows(streams["heldout"], args.context)                                # [N, L] int32
    np.save(work / "train.npy", streams["train"])
    np.save(work / "val_windows.npy", windows(streams["val"], args.context))
    np.save(work / "heldout_windows.npy", held)
    (work / "data.json").write_text(json.dumps({"vocab_size": tok.get_vocab_size()}))
    assert byte_len[streams["heldout"]].sum() == held_bytes, "token byte lengths must add up to the text"

    # 3. train the variants at once, one process each
    print(f"data ready at {time.time() - t_start:.0f}s: {len(streams['train']):,} training tokens, "
          f"{len(held)} held-out windows", flush=True)
    child_args = [a for a in sys.argv[1:]]
    procs = {}
    for v in variants:
        cmd = [sys.executable, os.path.abspath(__file__), *child_args, "--child", v, "--work", str(work),
               "--device", args.device]
        procs[v] = subprocess.Popen(cmd)
    failed = [v for v, p in procs.items() if p.wait() != 0]
    if failed:
        sys.exit(f"variant(s) failed: {failed}")

    # 4. choose by validation loss (float32, on each variant's kept checkpoint), ship, evaluate
    torch = _torch()
    from safetensors.numpy import save_file as save_np
    from safetensors.torch import load_file
    from transformers import GenerationConfig, StableLmConfig, StableLmForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device(args.device)
    histories, results = {}, {}
    val_w = torch.from_numpy(np.load(work / "val_windows.npy"))
    held_w = torch.from_numpy(held)
    for v in variants:
        histories[v] = h = json.loads((work / f"{v}.json").read_text())
        cfg = StableLmConfig.from_pretrained(work / v)
        mdl = StableLmForCausalLM._from_config(cfg, attn_implementation="eager")
        missing, unexpected = mdl.load_state_dict({k: t.float() for k, t in load_file(work / f"{v}.safetensors").items()}, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        mdl.tie_weights()
        mdl.to(device)
        results[v] = {**{k: h[k] for k in ("params", "total_steps", "tokens_seen", "train_wall_s", "best_step", "final_train_loss")},
                      "fp32_val_loss": eval_loss(mdl, val_w, device, 16, False),
                      "fp32_heldout_loss": eval_loss(mdl, held_w, device, 16, False)}
        print(f"variant {v}: {results[v]}", flush=True)
        del mdl
    chosen = min(variants, key=lambda x: results[x]["fp32_val_loss"])

    cfg = StableLmConfig.from_pretrained(work / chosen)
    model = StableLmForCausalLM._from_config(cfg)
    model.load_state_dict({k: t.float() for k, t in load_file(work / f"{chosen}.safetensors").items()}, strict=False)
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    model_bytes = (out / "model.safetensors").stat().st_size
    assert model_bytes <= MAX_MODEL_BYTES, f"model.safetensors is {model_bytes} bytes > {MAX_MODEL_BYTES}"

    fmodel, ev = final_eval(out, held, byte_len, device)
    print(f"final (shipped weights, float32): {ev}", flush=True)
    save_np({"input_ids": held.astype(np.int32)}, str(out / "heldout.safetensors"), metadata={
        "description": "held-out modules, each preceded by <|endoftext|>, non-overlapping windows",
        "heldout_modules": ",".join(HELD_OUT),
        "heldout_subset_windows": str(SUBSET_WINDOWS),
        "heldout_subset_loss_nats": repr(ev["heldout_subset_loss_nats"]),
        "heldout_loss_nats": repr(ev["heldout_loss_nats"]),
    })
    samples = greedy_samples(fmodel, tok, device)
    for p, s in samples.items():
        print(f"--- sample {p!r}\n{s}", flush=True)
    plot_curve(histories, chosen, out / "training_curve.png")

    # loads with both tokenizer front ends?
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    probe = "def f(x):\n    return x  # ok\n"
    assert Tokenizer.from_file(str(out / "tokenizer.json")).decode(tok.encode(probe).ids) == probe
    at = AutoTokenizer.from_pretrained(str(out))
    assert at(probe)["input_ids"] == tok.encode(probe).ids and at.eos_token_id == 0 and at.pad_token_id == 1

    import tokenizers
    import transformers
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    info = {
        "manifest": m, "eval": ev, "config": cfg.to_dict(),
        "vocab_measure": measure, "vocab_gain_next": vocab_gain_next, "variants": results, "chosen": chosen,
        "histories": histories, "samples": samples, "params": count_params(model), "model_bytes": model_bytes,
        "train_tokens": int(len(streams["train"])), "args": vars(args), "gpu": gpu,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "total_wall_s": time.time() - t_start,
    }
    eval_json = {**ev, "model": "stablelm_ref/default_model", "chosen_variant": chosen, "variants": results,
                 "params": info["params"], "tokens_seen": results[chosen]["tokens_seen"],
                 "steps": results[chosen]["total_steps"], "train_wall_s": results[chosen]["train_wall_s"],
                 "gpu": gpu, "vocab_measure": measure, "corpus_sha256": m["corpus_sha256"],
                 "versions": info["versions"]}
    (out / "eval.json").write_text(json.dumps(eval_json, indent=2) + "\n")
    (work / "histories.json").write_text(json.dumps(histories))
    write_model_card(out, info)
    print(f"done in {time.time() - t_start:.0f}s: held-out {ev['heldout_loss_nats']:.4f} nats/token, "
          f"{ev['heldout_bits_per_byte']:.4f} bits/byte, variant {chosen}, {model_bytes:,} bytes -> {out}", flush=True)


if __name__ == "__main__":
    main()
