# %% [markdown]
# # 01 · Tokens and the tokenizer
#
# The model never sees text: it sees integers. StableLM 3b-4e1t uses the GPT-NeoX-20B tokenizer, a
# **byte-level BPE** (byte-pair encoding) with 50,277 tokens (StableLM 2 uses Arcade100k, built the same
# way). Text becomes ids in four steps:
#
# 1. **bytes → symbols.** The text is encoded as UTF-8 and every byte $b \in \{0..255\}$ is mapped to one
#    printable character $\beta(b)$ (the GPT-2 table: printable bytes map to themselves, the others to
#    $\mathrm{chr}(256 + n)$, so a space is `Ġ` and a newline `Ċ`). Any string is representable: there
#    is no unknown token.
# 2. **pre-tokenize.** A regular expression cuts the text into words (a leading space stays with its word,
#    digits and punctuation apart); merges never cross these cuts. Before that, the *added tokens*
#    (`<|endoftext|>`, and in NeoX runs of 2-24 spaces) are cut out whole.
# 3. **merge.** Each word starts as its list of symbols; the merge table is a ranked list of pairs. Repeat:
#
#    $$ (a, b)^\star = \arg\min_{(a,b)\ \text{adjacent in the word}} \mathrm{rank}(a, b), \qquad
#       \ldots a\ b \ldots \;\to\; \ldots ab \ldots \quad\text{(every occurrence, left to right)} $$
#
#    until no adjacent pair is in the table.
# 4. **look up** each final symbol string in the vocabulary: $\mathrm{id} = \mathrm{vocab}[ab\ldots]$.
#
# Decoding concatenates the token strings and maps the symbols back to bytes: $\mathrm{decode}(\mathrm{encode}(s)) = s$.
# The project does not re-implement the BPE (the `tokenizers` library reads the model's `tokenizer.json`):
# `stablelm_ref.tokenizer.Tokenizer` wraps it with the special tokens and, for batches, **left padding** and
# the attention mask. Below we write steps 1-4 by hand and check them against the library, token for token.

# %%
import json
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from _common import DEFAULT_MODEL_DIR, ROOT, SAMPLE_TEXT, savefig, show_source
import stablelm_ref
from stablelm_ref.tokenizer import Tokenizer

show_source(Tokenizer.encode)
show_source(Tokenizer.__call__, "rows = [self.encode")   # after the keyword checks: the padding

# %% [markdown]
# ## Which tokenizer
#
# The real GPT-NeoX-20B `tokenizer.json` when it is available, else the default model's tokenizer
# (`stablelm_ref/default_model/tokenizer.json`), else a small byte-level BPE trained here, in a second, on the
# package's own source code. Everything below runs with any of the three; the published ids are checked only with
# the first. The GPT-NeoX file is not committed (it is 2 MB of someone else's data): download `tokenizer.json`
# from https://huggingface.co/EleutherAI/gpt-neox-20b and put it at `../shared/data/gpt-neox-20b-tokenizer.json`
# beside the checkout, or point `$STABLELM_SHARED` at the folder that holds `data/`. CI has it there; with
# `STABLELM_CI=1` (set by `.ci/run`) a missing file fails the chapter instead of skipping the checks.

# %%
SHARED = Path(os.environ.get("STABLELM_SHARED", ROOT.parent / "shared"))
NEOX_FILE = SHARED / "data" / "gpt-neox-20b-tokenizer.json"
workdir = Path(tempfile.mkdtemp(prefix="walk01_"))

if NEOX_FILE.exists():
    source, tok_file = "GPT-NeoX-20B", NEOX_FILE
    tok = Tokenizer.from_file(tok_file)
elif os.environ.get("STABLELM_CI") == "1":
    raise SystemExit(f"STABLELM_CI=1 but {NEOX_FILE} is missing: CI must run the published-id checks")
elif (DEFAULT_MODEL_DIR / "tokenizer.json").exists():
    source, tok_file = "default model", DEFAULT_MODEL_DIR / "tokenizer.json"
    tok = Tokenizer.from_pretrained(DEFAULT_MODEL_DIR)
else:
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [p.read_text() for p in sorted(Path(stablelm_ref.__file__).parent.glob("*.py"))]
    backend.train_from_iterator(corpus, trainer)
    source, tok_file = "tiny BPE trained here", workdir / "tokenizer.json"
    backend.save(str(tok_file))
    tok = Tokenizer.from_file(tok_file)             # GPT-NeoX defaults: <|endoftext|> is bos, eos and unk
if source != "GPT-NeoX-20B":
    print(f"*** SKIPPING the published GPT-NeoX-20B checks: {NEOX_FILE} is not there. Download tokenizer.json "
          "from https://huggingface.co/EleutherAI/gpt-neox-20b to that path (or set STABLELM_SHARED) to run them. ***")
spec = json.loads(Path(tok_file).read_text(encoding="utf-8"))
print(f"tokenizer: {source} ({tok_file.name}), {tok.vocab_size:,} ids, "
      f"{len(spec['model'].get('merges', [])):,} merges, eos {tok.eos_token!r} = {tok.eos_token_id}")

# %% [markdown]
# ## Step 1 by hand: the byte → symbol table
#
# The 188 printable bytes (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) stand for themselves; the other 68 (control
# bytes, space, ...) are moved to $256, 257, \ldots$ in byte order. The table must be exactly the library's
# byte-level alphabet, and the library's pre-tokenizer must produce exactly these symbols.

# %%
def bytes_to_symbols():
    """GPT-2's byte -> printable character table (a bijection of 256 bytes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_SYMBOL = bytes_to_symbols()
SYMBOL_TO_BYTE = {s: b for b, s in BYTE_TO_SYMBOL.items()}
from tokenizers.pre_tokenizers import ByteLevel  # noqa: E402  (the library's own alphabet, to check against)

assert set(BYTE_TO_SYMBOL.values()) == set(ByteLevel.alphabet()) and len(SYMBOL_TO_BYTE) == 256
print("space ->", BYTE_TO_SYMBOL[32], " newline ->", BYTE_TO_SYMBOL[10], " 'é' (2 bytes) ->",
      "".join(BYTE_TO_SYMBOL[b] for b in "é".encode()))

# %% [markdown]
# ## Steps 2-4 by hand, checked against the library
#
# `bpe_by_hand` cuts out the added tokens, lets the tokenizer's own pre-tokenizer split the words (its
# regex; we check its symbols against our table), then runs the merge loop above and looks the pieces up.
# On prose, code and non-ASCII text it must give the library's ids exactly.

# %%
def bpe_by_hand(text, spec, backend):
    model = spec["model"]
    vocab = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    rank = {pair: i for i, pair in enumerate(merges)}
    added = sorted((t["content"] for t in spec["added_tokens"]), key=len, reverse=True)
    added_ids = {t["content"]: t["id"] for t in spec["added_tokens"]}
    ids, i, start = [], 0, 0
    pieces = []                                                  # (is_added, text)
    while i < len(text):                                         # leftmost-longest match of added tokens
        hit = next((a for a in added if text.startswith(a, i)), None)
        if hit is None:
            i += 1
            continue
        pieces += [(False, text[start:i]), (True, hit)]
        i = start = i + len(hit)
    pieces.append((False, text[start:]))
    for is_added, piece in pieces:
        if is_added:
            ids.append(added_ids[piece])
            continue
        if not piece:
            continue
        if backend.normalizer is not None:
            piece = backend.normalizer.normalize_str(piece)
        for word, (a, b) in backend.pre_tokenizer.pre_tokenize_str(piece):
            assert word == "".join(BYTE_TO_SYMBOL[x] for x in piece[a:b].encode()), (word, piece[a:b])
            if model.get("ignore_merges") and word in vocab:
                ids.append(vocab[word])
                continue
            symbols = list(word)
            while len(symbols) > 1:
                pairs = [(rank.get((x, y), np.inf), n) for n, (x, y) in enumerate(zip(symbols, symbols[1:]))]
                best = min(pairs)[0]
                if best == np.inf:
                    break
                x, y = merges[best]
                merged, n = [], 0
                while n < len(symbols):                          # merge every occurrence, left to right
                    if n + 1 < len(symbols) and symbols[n] == x and symbols[n + 1] == y:
                        merged.append(x + y)
                        n += 2
                    else:
                        merged.append(symbols[n])
                        n += 1
                symbols = merged
            ids += [vocab[s] for s in symbols]
    return ids


texts = ["The weather is always wonderful", "My favorite food has always been pizza, but lately",
         SAMPLE_TEXT, "naïve café, 東京 🙂 -- 3.14159 <|endoftext|>"]
byte_level_bpe = (spec["model"]["type"] == "BPE" and not spec["model"].get("continuing_subword_prefix")
                  and not spec["model"].get("byte_fallback") and "ByteLevel" in json.dumps(spec["pre_tokenizer"]))
for text in texts:
    ids = tok.encode(text, add_special_tokens=False)
    if byte_level_bpe:
        assert bpe_by_hand(text, spec, tok.backend) == ids, text
        assert tok.decode(ids) == text, "byte-level: decode(encode(s)) == s"
    print(f"{len(text.encode()):3d} bytes -> {len(ids):3d} tokens  {text[:40]!r}")
print("hand-written byte-level BPE == the tokenizers library" if byte_level_bpe else
      f"({source} is not a plain byte-level BPE: the hand-written check is skipped)")

# %% [markdown]
# ## The published prompt ids
#
# transformers' integration tests for StableLM (`tests/models/stablelm/test_modeling_stablelm.py`; restated in
# docs/facts.md) feed stablelm-3b-4e1t these ids for two prompts; they are the inputs of the published logit
# and generation figures. Note that `Tokenizer` adds no `<|endoftext|>` in front: StableLM 3b-4e1t's
# `tokenizer_config.json` does not ask for a bos token.

# %%
PUBLISHED = {"The weather is always wonderful": [510, 8588, 310, 1900, 9386],
             "My favorite food has always been pizza, but lately":
                 [3220, 7583, 2739, 556, 1900, 644, 22534, 13, 533, 21403]}
for text, expected in PUBLISHED.items():
    got = tok.encode(text)
    if source == "GPT-NeoX-20B":
        assert got == expected, (text, got)
    print(f"{text!r}: {got}" + ("  == the published ids" if source == "GPT-NeoX-20B" else ""))
if source == "GPT-NeoX-20B":
    print("pieces:", [tok.decode([i]) for i in PUBLISHED["The weather is always wonderful"]])
else:
    print(f"*** SKIPPED: the published ids are GPT-NeoX-20B's, not checked with the {source} (see above) ***")

# %% [markdown]
# ## Batches: left padding and the attention mask
#
# A batch is a rectangle $[B, T]$, so shorter rows are padded. A decoder continues from the **last**
# position of each row, so the padding goes on the **left**, and the attention mask says which slots are
# real: $m_{b,t} = 1$ for a token, $0$ for padding. GPT-NeoX's vocabulary has a padding token (`<|padding|>`,
# id 1), but stablelm-3b-4e1t's tokenizer configuration names no pad token, so `Tokenizer` pads with the eos
# token `<|endoftext|>` (id 0); the mask hides the pad slots, so which id fills them never matters.
#
# Positions: a plain forward, `model(ids, attention_mask=mask)`, numbers the columns $0 \dots T-1$ whatever
# the mask (as transformers does), so a row padded by $n$ starts at position $n$. `generate` instead derives
# them from the mask, $p_{b,t} = \sum_{s \le t} m_{b,s} - 1$, so that a padded row sees the positions of the
# row alone (the `position_ids` printed below); pass those to a forward to do the same. Rotary attention scores
# depend only on the distance between two positions (chapter 06), so both give the same logits for the real
# tokens, to rounding: the last cell of this section checks it.

# %%
batch = tok(list(PUBLISHED))
ids, mask = batch["input_ids"], batch["attention_mask"]
positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0)
for name, arr in (("input_ids", ids), ("attention_mask", mask), ("position_ids", positions)):
    print(f"{name:15s}", arr.tolist())
pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
if source == "GPT-NeoX-20B":
    assert tok.backend.token_to_id("<|padding|>") == 1 and tok.pad_token_id is None and pad_id == 0
for row, text in enumerate(PUBLISHED):
    alone = tok.encode(text)
    n_pad = ids.shape[1] - len(alone)
    assert ids[row, n_pad:].tolist() == alone and mask[row].tolist() == [0] * n_pad + [1] * len(alone)
    assert (ids[row, :n_pad] == pad_id).all() and positions[row, n_pad:].tolist() == list(range(len(alone)))
assert (mask[:, -1] == 1).all(), "left padding: the last column is a real token in every row"

# %%
# A plain forward (positions 0..T-1) against positions from the mask, on the default model and its own
# tokenizer, in float64: the logits of the real tokens agree to float64 rounding (~1e-16 relative per
# operation, a few hundred operations deep: 1e-12 leaves room), while a model whose scores depended on absolute
# positions would differ at O(1).
model64 = stablelm_ref.StableLmForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype="float64")
own = Tokenizer.from_pretrained(DEFAULT_MODEL_DIR)
enc = own(["The weather is always wonderful", "Hello world", "def f(x): return x"])
m = enc["attention_mask"]
assert (m == 0).any(), "the check needs a padded row"
plain = model64(enc["input_ids"], attention_mask=m).logits                            # positions 0..T-1
from_mask = model64(enc["input_ids"], attention_mask=m, position_ids=np.where(m == 1, np.cumsum(m, 1) - 1, 0)).logits
gap = float(np.abs(plain - from_mask)[m == 1].max() / np.abs(from_mask[m == 1]).max())
assert gap < 1e-12, gap
print(f"real tokens' logits, plain forward vs positions from the mask: max relative difference {gap:.1e}")

# %% [markdown]
# ## Figure: how text is cut, and how long the tokens are
#
# Top: the segmentation of a Python snippet and a prose prompt, one colour per token (`·` a space, `↵` a
# newline). Bottom left: the length in bytes of every token of the vocabulary (the last bar gathers every
# token longer than 32 bytes: runs of spaces and of `=` or `-` in GPT-NeoX). Bottom right: bytes per token
# on a few texts (more bytes per token = fewer positions for the model to process).

# %%
def draw_segmentation(ax, text, y0):
    """Draw `text` cut into tokens as coloured boxes, one line per text line; return the next free row."""
    x, y = 0, y0
    colours = plt.get_cmap("tab20").colors
    for n, i in enumerate(tok.encode(text, add_special_tokens=False)):
        piece = tok.decode([i])
        for ch in piece:
            ax.add_patch(plt.Rectangle((x, -y - 0.45), 1, 0.9, color=colours[n % 20], alpha=0.55, lw=0))
            ax.text(x + 0.5, -y, {" ": "·", "\n": "↵"}.get(ch, ch), ha="center", va="center", family="monospace",
                    fontsize=8)
            x += 1
            if ch == "\n":
                x, y = 0, y + 1
    return y + 2


sym_to_len = {}
for token, i in tok.backend.get_vocab(with_added_tokens=False).items():
    sym_to_len[i] = len(token) if byte_level_bpe else len(tok.decode([i]).encode())
lengths = np.array(list(sym_to_len.values()))

fig = plt.figure(figsize=(13, 8))
ax = fig.add_subplot(2, 1, 1)
row = draw_segmentation(ax, SAMPLE_TEXT, 0)
row = draw_segmentation(ax, "My favorite food has always been pizza, but lately I've been craving something else.", row)
ax.set(xlim=(-0.5, 90), ylim=(-row + 1, 1), title=f"token segmentation ({source})")
ax.axis("off")
ax = fig.add_subplot(2, 2, 3)
CAP = 32                                                          # longer tokens go into one last bar
ax.hist(np.minimum(lengths, CAP + 1), bins=np.arange(0.5, CAP + 2.5), color="tab:blue")
n_long = int((lengths > CAP).sum())
assert np.histogram(np.minimum(lengths, CAP + 1), bins=np.arange(0.5, CAP + 2.5))[0].sum() == len(lengths)
ax.set_xticks([1, 8, 16, 24, CAP + 1], ["1", "8", "16", "24", f">{CAP}"])
if n_long:
    ax.annotate(f"{n_long} tokens longer than {CAP} bytes\n(longest: {lengths.max()} bytes)", (CAP + 1, n_long),
                xytext=(-150, 40), textcoords="offset points", fontsize=8, arrowprops=dict(arrowstyle="->"))
ax.set(title=f"vocabulary: length of each token in bytes (mean {lengths.mean():.1f})", xlabel="bytes",
       ylabel="tokens", yscale="log")
ax = fig.add_subplot(2, 2, 4)
samples = {"prose": texts[0] + ". " + texts[1], "python": SAMPLE_TEXT, "non-ASCII": texts[3].split(" <")[0],
           "digits": "3.14159265358979323846"}
ratios = [len(t.encode()) / len(tok.encode(t, add_special_tokens=False)) for t in samples.values()]
ax.bar(list(samples), ratios, color="tab:orange")
ax.set(title="bytes per token", ylabel="bytes / token")
# The committed figure is GPT-NeoX-20B's; with another tokenizer it goes to a local file (not committed).
savefig(fig, "01_tokens" if source == "GPT-NeoX-20B" else "01_tokens_local")
