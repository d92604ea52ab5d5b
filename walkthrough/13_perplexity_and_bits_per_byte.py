# %% [markdown]
# # 13 · Perplexity and bits per byte
#
# The causal-LM loss (chapter 11) is the mean surprise of the model at each next token, in **nats** (natural
# logarithm):
#
# $$\mathcal L = -\frac1N \sum_{t} \ln p(y_{t+1} \mid y_{\le t}) \quad\text{nats per token},\qquad
#   \mathrm{PPL} = e^{\mathcal L},\qquad \frac{\mathcal L}{\ln 2}\ \text{bits per token},\qquad
#   \mathrm{bpb} = \frac{N\,\mathcal L}{\ln 2 \cdot \text{bytes}}$$
#
# - **Perplexity** $e^{\mathcal L}$: the model is, on average, as unsure as a uniform choice among that many tokens.
# - **Bits per token**: the same number in base 2, $\log_2 x = \ln x / \ln 2$. An ideal arithmetic coder driven
#   by the model would spend that many bits per token to compress the text.
# - **Bits per byte** divides the total bits by the UTF-8 bytes of the text the predicted tokens spell. Bits per
#   token depend on the tokenizer (longer tokens: fewer, harder predictions); bits per byte do not, so they
#   compare models with different vocabularies. Plain 8-bit text costs 8 bits per byte.
#
# The default model's card gives **3.2428 nats per token = 1.4462 bits per byte** on ten held-out modules of
# the Python standard library (`stablelm_ref/default_model/heldout.safetensors`: 194 windows of 512 tokens,
# never trained on; measured on the GPU that trained it). Here we recount the bytes, recompute the loss with the
# NumPy model and redo the conversion.

# %%
import json
import math
import os

import matplotlib.pyplot as plt
import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from _common import DEFAULT_MODEL_DIR, savefig
from stablelm_ref import StableLmForCausalLM

card = json.loads((DEFAULT_MODEL_DIR / "eval.json").read_text())
windows = load_file(str(DEFAULT_MODEL_DIR / "heldout.safetensors"))["input_ids"].astype(np.int64)   # [194, 512]
tok = Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
n_win, length = windows.shape
print(f"held-out: {n_win} windows x {length} tokens; the card: {card['heldout_loss_nats']:.4f} nats/token, "
      f"{card['heldout_bits_per_byte']:.4f} bits/byte")

# %% [markdown]
# ## The bytes: what the predicted tokens spell
#
# Each window predicts its tokens 1..511 (token 0 has no context). A token's bytes come from the byte-level
# vocabulary: one symbol per byte (chapter 01), so the length of its symbol string; the two special tokens
# (`<|endoftext|>`, `<|padding|>`) spell nothing. Counted here from the tokenizer alone; it must give the card's
# byte count.

# %%
n_bytes = np.zeros(tok.get_vocab_size(), dtype=np.int64)
specials = {t.content for t in tok.get_added_tokens_decoder().values()}
for symbols, i in tok.get_vocab(with_added_tokens=True).items():
    n_bytes[i] = 0 if symbols in specials else len(symbols)
predicted = windows[:, 1:]                                                        # [194, 511]
total_bytes, total_tokens = int(n_bytes[predicted].sum()), predicted.size
assert (total_tokens, total_bytes) == (card["heldout_predicted_tokens"], card["heldout_predicted_bytes"])
print(f"{total_tokens:,} predicted tokens spell {total_bytes:,} bytes: {total_bytes / total_tokens:.3f} bytes per token")

# %% [markdown]
# ## The loss, recomputed: nats → bits → bytes
#
# By default the first 16 windows (8% of the tokens; about half a minute on two cores); `STABLELM_WALK_FULL=1`
# runs all 194 (about two minutes of one core: 113 s measured, reproducing 3.2428 nats and 1.4462 bits per
# byte) and then checks the card's figure itself. The loss is taken from the logits by
# hand (log-softmax written out in float64), not from the package's loss function, and compared with both the
# model's own `loss` and the card. The bound is the one of tests/test_default_model.py: the card was measured in
# float32 on a GPU, a float32 recomputation on a CPU differs only by summation order (~1e-6 relative on a mean
# loss), while a real error (a wrong rotary width, a dropped bias, an off-by-one shift) moves it by 1e-2 or more.

# %%
full = os.environ.get("STABLELM_WALK_FULL") == "1"
n_eval = n_win if full else 16
model = StableLmForCausalLM.from_pretrained(str(DEFAULT_MODEL_DIR), dtype="float32")
nats = np.zeros((n_eval, length - 1))                                            # -ln p of every predicted token
for w in range(0, n_eval, 4):
    ids = windows[w: w + 4]
    out = model(ids, labels=ids)
    z = out.logits[:, :-1].astype(np.float64)                                    # [4, 511, V]
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nats[w: w + 4] = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    assert abs(nats[w: w + 4].mean() - out.loss) <= 1e-5 * out.loss, (nats[w: w + 4].mean(), out.loss)
RTOL = 1e-4
subset = nats[: card["heldout_subset_windows"]].mean()
assert abs(subset - card["heldout_subset_loss_nats"]) <= RTOL * card["heldout_subset_loss_nats"], subset
print(f"first {card['heldout_subset_windows']} windows: {subset:.6f} nats/token (card: "
      f"{card['heldout_subset_loss_nats']:.6f})")

loss = nats.mean()
bits = nats.sum() / math.log(2)
bpb = bits / n_bytes[windows[:n_eval, 1:]].sum()
print(f"first {n_eval} windows: {loss:.4f} nats/token = perplexity {math.exp(loss):.1f} = {loss / math.log(2):.3f} "
      f"bits/token; {n_bytes[windows[:n_eval, 1:]].sum() / nats.size:.3f} bytes/token -> {bpb:.4f} bits/byte")
if full:
    assert abs(loss - card["heldout_loss_nats"]) <= RTOL * card["heldout_loss_nats"], loss
    assert abs(bpb - card["heldout_bits_per_byte"]) <= RTOL * card["heldout_bits_per_byte"], bpb
    print(f"all {n_win} windows: the card's {card['heldout_bits_per_byte']:.4f} bits/byte reproduced")
else:
    card_bpb = card["heldout_loss_nats"] * total_tokens / math.log(2) / total_bytes
    assert abs(card_bpb - card["heldout_bits_per_byte"]) <= 1e-12 * card_bpb
    print(f"all {n_win} windows, from the card's loss and the bytes counted above: {card['heldout_loss_nats']:.4f} "
          f"nats x {total_tokens:,} tokens / ln 2 / {total_bytes:,} bytes = {card_bpb:.4f} bits/byte "
          f"(STABLELM_WALK_FULL=1 recomputes the loss too)")

# %% [markdown]
# ## What the numbers mean
#
# For scale: a model that knows nothing but the vocabulary spends $\log_2 4096 = 12$ bits per token; the
# held-out text's own token frequencies (a unigram model fitted to the very text it scores, an optimistic
# baseline) give its entropy; plain bytes cost 8 bits each. The trained model's context is worth the rest.

# %%
V = model.config.vocab_size
counts = np.bincount(predicted.ravel(), minlength=V)
p_uni = counts[counts > 0] / counts.sum()
unigram_bits = float(-(p_uni * np.log2(p_uni)).sum())
per_token_bytes = total_bytes / total_tokens
baselines = {"raw bytes": 8.0, "uniform over 4096 tokens": math.log2(V) / per_token_bytes,
             "unigram (fitted on the held-out text)": unigram_bits / per_token_bytes,
             f"the default model ({n_eval} windows)": float(bpb)}
for name, value in baselines.items():
    print(f"{name:40s} {value:5.2f} bits/byte")
assert bpb < baselines["unigram (fitted on the held-out text)"] < baselines["raw bytes"]

# %% [markdown]
# ## Figures
#
# Left: the bits per byte of the baselines and of the model. Middle: the loss by position in the window,
# averaged over the windows: the first tokens of a window have little context and cost most. Right: a stretch
# of held-out code, each token shaded by what it cost in bits (dark: surprising).

# %%
fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1, 1.1, 1.6]})
axes[0].barh(range(len(baselines))[::-1], list(baselines.values()), color=["gray", "gray", "gray", "tab:blue"])
axes[0].set_yticks(range(len(baselines))[::-1], [n.replace(" (", "\n(") for n in baselines], fontsize=8)
for y, v in zip(range(len(baselines))[::-1], baselines.values()):
    axes[0].text(v + 0.1, y, f"{v:.2f}", va="center", fontsize=8)
axes[0].set(title="bits per byte of the held-out modules", xlabel="bits / byte", xlim=(0, 9.5))
pos = np.arange(1, length)
by_pos = nats.mean(0) / math.log(2)
smooth = np.convolve(by_pos, np.ones(16) / 16, mode="valid")
axes[1].plot(pos, by_pos, color="lightgray", lw=0.5, label="mean over windows")
axes[1].plot(pos[15:], smooth, color="tab:blue", label="running mean of 16")
axes[1].axhline(loss / math.log(2), color="tab:orange", ls=":", label=f"mean {loss / math.log(2):.2f} bits/token")
axes[1].set(title="loss by position in the 512-token window", xlabel="position of the predicted token",
            ylabel="bits / token", xscale="log", ylim=(0, 14))
axes[1].legend(fontsize=8)
ax = axes[2]
w, start, n_show = 0, 186, 84
x, y = 0, 0
cmap = plt.get_cmap("Reds")
for t in range(start, start + n_show):
    piece = tok.decode([int(windows[w, t + 1])])
    cost = nats[w, t] / math.log(2)
    for ch in piece:
        if ch == "\n":
            x, y = 0, y + 1
            continue
        ax.add_patch(plt.Rectangle((x, -y - 0.5), 1, 1, color=cmap(min(cost / 12, 1.0) * 0.75), lw=0))
        ax.text(x + 0.5, -y, ch, ha="center", va="center", family="monospace", fontsize=7)
        x += 1
ax.set(xlim=(0, 78), ylim=(-y - 1, 1), title=f"held-out window {w}, tokens {start + 1}..{start + n_show}: "
       "shade = bits spent on the token (white 0, red >= 12)")
ax.title.set_fontsize(9)
ax.axis("off")
savefig(fig, "13_bits_per_byte")
