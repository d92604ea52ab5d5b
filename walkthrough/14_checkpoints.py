# %% [markdown]
# # 14 · Checkpoints: safetensors, bfloat16, sharding
#
# A model directory holds `config.json` and the weights as **safetensors**: a format that is only bytes and a
# JSON table of contents, so loading never runs code (unlike pickled `pytorch_model.bin`, which this project
# refuses). The layout:
#
# $$\underbrace{N}_{\text{8 bytes, u64 LE}}\;\underbrace{\{\text{"name"}: \{\text{dtype}, \text{shape}, \text{data\_offsets}: [b, e]\},\ \dots\}}_{N \text{ bytes of JSON}}\;\underbrace{\text{tensor bytes, back to back}}_{\text{data}}$$
#
# Offsets count from the start of the data; tensors must tile it exactly (no gap, no overlap). The published
# StableLM weights are **bfloat16**: the top 16 bits of a float32 (1 sign, 8 exponent, 7 mantissa bits), so
# the same range as float32 with an 8-bit significand (7 stored bits and the implicit leading 1): about
# $8 \log_{10} 2 \approx 2.4$ significant decimal digits (float32: 24 bits, 7.2 digits). NumPy has no bfloat16; `ml_dtypes` provides it,
# and the weights are cast once to float32 (or float64) on load. Big models are split into shards listed in
# `model.safetensors.index.json`.

# %%
import json
import os
import tempfile

import matplotlib.pyplot as plt
import ml_dtypes
import numpy as np
import safetensors.numpy

from _common import show_source, savefig, tiny_model
from stablelm_ref import StableLmForCausalLM, checkpoint

show_source(checkpoint.save_file)
show_source(checkpoint.read_header, "raw_len = f.read(8)", "raw = f.read(n)")

# %% [markdown]
# ## The bytes of a file, read by hand
#
# We save a tiny model, then read the first 8 bytes and the JSON header ourselves and compare with the
# package's validated `read_header` and with the official `safetensors` library.

# %%
work = tempfile.mkdtemp(prefix="walk11-")
model = tiny_model(seed=11, dtype="float32")
model.save_pretrained(os.path.join(work, "f32"))
path = os.path.join(work, "f32", "model.safetensors")
with open(path, "rb") as f:
    raw = f.read()
n = int.from_bytes(raw[:8], "little")
header = json.loads(raw[8:8 + n])
print("first 8 bytes:", raw[:8].hex(" "), f"-> header length N = {n}")
print("header starts:", raw[8:8 + 160].decode())
entries, metadata, data_start = checkpoint.read_header(path)
assert data_start == 8 + n and metadata == header.pop("__metadata__")
for name, info in header.items():
    dtype, shape, begin, end = entries[name]
    assert (info["dtype"], tuple(info["shape"]), info["data_offsets"]) == ("F32", shape, [begin, end])
    by_hand = np.frombuffer(raw[data_start + begin:data_start + end], dtype="<f4").reshape(shape)
    assert np.array_equal(by_hand, model.params[name])
official = safetensors.numpy.load_file(path)
assert set(official) == set(model.params) and all(np.array_equal(official[k], model.params[k]) for k in official)
print(f"{len(header)} tensors; header by hand == read_header == safetensors library; file {len(raw):,} bytes")

# %% [markdown]
# ## bfloat16 and what rounding does
#
# Rounding float32 to bfloat16 keeps the top 16 bits, rounding to nearest with ties to even:
# `(u + 0x7FFF + ((u >> 16) & 1)) >> 16` on the bit pattern `u`. We check `ml_dtypes` does exactly that, and
# that the relative error is at most $2^{-8}$: half a unit in the last place of an 8-bit significand
# (7 stored bits and the implicit leading 1; float32 has 24, so its bound is $2^{-24}$).

# %%
rng = np.random.default_rng(0)
x = (rng.standard_normal(200_000) * np.exp(rng.uniform(-20, 20, 200_000))).astype(np.float32)
u = x.view(np.uint32).astype(np.uint64)
by_hand = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
bf = x.astype(ml_dtypes.bfloat16)
assert np.array_equal(bf.view(np.uint16), by_hand), "bfloat16 = round-to-nearest-even of the top 16 bits"
rel = np.abs(bf.astype(np.float32) - x) / np.abs(x)
assert rel.max() <= 2.0 ** -8
print(f"bfloat16 rounding: max relative error {rel.max():.3e} <= 2^-8 = {2.0 ** -8:.3e}")

# A whole model through bfloat16: save as bf16 (the header says BF16), load back as float32.
model.save_pretrained(os.path.join(work, "bf16"), dtype="bfloat16")
bf_entries, _, _ = checkpoint.read_header(os.path.join(work, "bf16", "model.safetensors"))
assert all(e[0] == np.dtype(ml_dtypes.bfloat16) for e in bf_entries.values())
back = StableLmForCausalLM.from_pretrained(os.path.join(work, "bf16"), dtype="float32")
for name, w in model.params.items():
    assert np.all(np.abs(back.params[name] - w) <= 2.0 ** -8 * np.abs(w)), name
ids = rng.integers(0, model.config.vocab_size, (1, 32))
full, rounded = model(ids).logits, back(ids).logits
agree = float((full.argmax(-1) == rounded.argmax(-1)).mean())
print(f"logits after bf16 rounding of the weights: max |diff| {np.abs(full - rounded).max():.2e} "
      f"(logit scale {np.abs(full).max():.1f}); argmax agrees at {agree:.0%} of positions")
assert np.abs(full - rounded).max() < 0.05 * np.abs(full).max()

# %% [markdown]
# ## Sharding with an index
#
# A sharded checkpoint is several safetensors files plus `model.safetensors.index.json`, whose `weight_map`
# says which file holds which tensor. We cut the tiny model in two shards by hand and load it back.

# %%
shard_dir = os.path.join(work, "sharded")
os.makedirs(shard_dir)
names = sorted(model.params)
halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
          "model-00002-of-00002.safetensors": names[len(names) // 2:]}
weight_map = {}
for file, part in halves.items():
    checkpoint.save_file({k: model.params[k] for k in part}, os.path.join(shard_dir, file), {"format": "pt"})
    weight_map.update({k: file for k in part})
total = sum(v.nbytes for v in model.params.values())
with open(os.path.join(shard_dir, checkpoint.INDEX_NAME), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
model.config.save_pretrained(shard_dir)
print(sorted(os.listdir(shard_dir)))
sharded = StableLmForCausalLM.from_pretrained(shard_dir, dtype="float32")
assert all(np.array_equal(sharded.params[k], model.params[k]) for k in model.params)
assert set(checkpoint.checkpoint_files(shard_dir).values()) == {os.path.join(shard_dir, f) for f in halves}
print("two shards + index load back bit for bit")

# %% [markdown]
# ## Figures: bfloat16 vs float16 rounding, and where the bytes of the file go
#
# float16 has more mantissa bits (10) but a 5-bit exponent: it overflows above 65504 and loses precision
# below $6\cdot10^{-5}$. bfloat16 trades precision for float32's whole range, which is why weights are
# published in it.

# %%
grid = np.logspace(-9, 9, 20001).astype(np.float32)
with np.errstate(over="ignore"):
    f16 = grid.astype(np.float16).astype(np.float32)
rel_bf = np.abs(grid.astype(ml_dtypes.bfloat16).astype(np.float32) - grid) / grid
rel_f16 = np.where(np.isfinite(f16), np.abs(f16 - grid) / grid, np.nan)
fig, axes = plt.subplots(1, 2, figsize=(14, 4.3))
axes[0].loglog(grid, rel_bf, lw=0.5, label="bfloat16 (8 exp, 7 mantissa bits)")
axes[0].loglog(grid, rel_f16, lw=0.5, label="float16 (5 exp, 10 mantissa bits)")
axes[0].axhline(2.0 ** -8, color="tab:blue", ls=":", label="2^-8")
axes[0].axhline(2.0 ** -11, color="tab:orange", ls=":", label="2^-11")
axes[0].axvline(65504, color="gray", ls="--", lw=0.8)
axes[0].text(70000, 1e-2, "float16\noverflows", fontsize=8)
axes[0].set(title="relative rounding error of float32 values", xlabel="|x|", ylim=(1e-9, 1.5))
axes[0].legend(fontsize=8, loc="lower left")
order = sorted(entries, key=lambda k: entries[k][2])
starts = [entries[k][2] for k in order]
sizes = [entries[k][3] - entries[k][2] for k in order]
axes[1].barh([0], [data_start], color="black", label=f"8 + header ({n:,} bytes)")
colors = plt.cm.tab20(np.arange(len(order)) % 20)
axes[1].barh([0] * len(order), sizes, left=np.array(starts) + data_start, color=colors)
for k, s, z in zip(order, starts, sizes):
    if z > 0.04 * sum(sizes):
        axes[1].text(data_start + s + z / 2, 0, k.replace("model.", ""), rotation=90, ha="center", va="center",
                     fontsize=6)
axes[1].set(title=f"model.safetensors of the tiny model ({len(raw):,} bytes)", xlabel="byte offset", yticks=[])
axes[1].legend(fontsize=8, loc="upper right")
savefig(fig, "14_checkpoints")

# %%
import shutil  # noqa: E402

shutil.rmtree(work)
