# %% [markdown]
# # 17 · Sampling: temperature, top-k, top-p and the repetition penalty
#
# At each step the model gives one logit $z_v$ per vocabulary entry; the next token is chosen from them.
# **Greedy** decoding takes $\arg\max_v z_v$. **Sampling** draws $v \sim \mathrm{softmax}(z)$ after the
# *logits processors* reshape $z$, in transformers' order:
#
# $$\text{repetition penalty:}\quad z_v \leftarrow \begin{cases} z_v / \rho & z_v > 0 \\ z_v\,\rho & z_v \le 0\end{cases}
#   \quad\text{for every } v \text{ already in the sequence}$$
# $$\text{temperature:}\quad z \leftarrow z / T \qquad (T \to 0:\ \text{greedy};\ T > 1:\ \text{flatter})$$
# $$\text{top-}k:\quad z_v \leftarrow -\infty \ \text{ unless } z_v \ge z_{(k)} \ \ (\text{the } k\text{-th largest})$$
# $$\text{top-}p:\quad \text{keep the smallest set } S \text{ of most likely tokens with } \textstyle\sum_{v \in S} \pi_v \ge p,\ \
#   \pi = \mathrm{softmax}(z);\ \text{the rest} \leftarrow -\infty$$
#
# then $\pi = \mathrm{softmax}(z)$ and one draw $u \sim U[0, 1)$ per row picks the first $v$ with
# $\sum_{w \le v} \pi_w > u$ (a filtered token has $\pi_v = 0$ exactly and can never be drawn). The random
# numbers come from `numpy.random.default_rng(seed)`: the same seed gives the same text.

# %%
import warnings

import matplotlib.pyplot as plt
import numpy as np

from _common import load_default_or_tiny, savefig, show_source
from stablelm_ref import generation
from stablelm_ref.generation import (apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p,
                                     process_logits, sample, softmax)

for fn in (apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p, sample, process_logits):
    show_source(fn)
show_source(generation.generate, "scores = process_logits(", "next_dev = xp.argmax(")

# %% [markdown]
# ## One real distribution
#
# The next-token logits of the model (the trained default model when it is there, else a tiny random
# model) after a prompt, in float64 as `generate` processes them for a float64 model.

# %%
run = load_default_or_tiny(dtype="float64")
model = run.model
prompt = run.ids[:, : max(4, run.ids.shape[1] * 2 // 3)]
z = np.asarray(model(prompt, logits_to_keep=1).logits[:, -1, :], dtype=np.float64)   # [1, V]
V = z.shape[-1]


def label(v):
    if run.tokenizer is None:
        return f"#{v}"
    return run.tokenizer.decode([int(v)]).replace("\n", "\\n").replace(" ", "·") or f"#{v}"


top = np.argsort(-z[0])[:8]
print(run, "| prompt ends:", " ".join(run.labels[prompt.shape[1] - 6: prompt.shape[1]]))
print("most likely next tokens:", [(label(v), round(float(softmax(z)[0, v]), 3)) for v in top])

# %% [markdown]
# ## Checks: each processor against its definition
#
# **top-k**: at most (here, with no ties, exactly) the $k$ largest logits keep a non-zero probability.
# **top-p**: the kept set is the $n$ most likely tokens, where $n$ is the *smallest* count whose probability
# reaches $p$: the kept mass is $\ge p$ and without its least likely member it is $< p$. **Temperature**:
# $\mathrm{softmax}(z/T)$ tends to the one-hot of the argmax. **Repetition penalty**: exactly the two-case
# formula on the ids present, nothing elsewhere.

# %%
order = np.argsort(-z[0], kind="stable")                          # most likely first
for k in (1, 5, 40):
    support = np.flatnonzero(softmax(apply_top_k(z, k))[0] > 0)
    assert set(support) <= set(order[:k]) and len(support) == k, k
for p in (0.1, 0.5, 0.9, 0.99):
    pi = softmax(z)[0]
    kept = np.flatnonzero(softmax(apply_top_p(z, p))[0] > 0)
    n = len(kept)
    assert set(kept) == set(order[:n]), "top-p keeps the most likely tokens"
    assert pi[kept].sum() >= p - 1e-12 and (n == 1 or pi[order[:n - 1]].sum() < p), "the smallest such set"
    print(f"top-p {p:4}: keeps {n:5d} tokens holding {pi[kept].sum():.4f} of the probability")
for T in (1.0, 0.5, 0.2, 0.1, 0.05, 1e-6):
    print(f"T = {T:g}: 1 - probability of the argmax = {1 - softmax(apply_temperature(z, T))[0].max():.1e}")
assert softmax(apply_temperature(z, 1e-6))[0, order[0]] > 1 - 1e-12

seen = np.array([[order[0], order[3], order[-1]]])                # a most likely, a likely and the least likely id
pen = apply_repetition_penalty(z, seen, 1.3)
expected = z.copy()
for v in set(seen[0].tolist()):
    expected[0, v] = z[0, v] / 1.3 if z[0, v] > 0 else z[0, v] * 1.3
np.testing.assert_array_equal(pen, expected)
assert (pen[0, seen[0]] < z[0, seen[0]]).all(), "a penalty always lowers the logit, whatever its sign"

settings = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2)
by_hand = apply_top_p(apply_top_k(apply_temperature(apply_repetition_penalty(z, seen, 1.2), 0.7), 20), 0.9)
np.testing.assert_array_equal(process_logits(z, seen, settings), by_hand)
print("processors == their definitions; process_logits == penalty -> temperature -> top-k -> top-p")

# %% [markdown]
# ## Check: the draws follow the distribution, and the seed fixes them
#
# `sample` inverts the cumulative distribution. 40,000 draws from the top-10 distribution (one row per
# draw) must give each token a frequency within 5 standard deviations $\sqrt{\pi(1-\pi)/N}$ of $\pi$, no
# filtered token, and the same draws again from the same seed.

# %%
N = 40_000
probs = softmax(apply_top_k(z, 10))                               # [1, V]
draws = sample(np.repeat(probs, N, axis=0), np.random.default_rng(0))
freq = np.bincount(draws, minlength=V) / N
sigma = np.sqrt(probs[0] * (1 - probs[0]) / N)
assert set(np.unique(draws)) <= set(order[:10])
assert (np.abs(freq - probs[0]) <= 5 * sigma + 1e-12).all(), np.abs(freq - probs[0]).max()
assert (sample(np.repeat(probs, N, axis=0), np.random.default_rng(0)) == draws).all()
print(f"{N} draws: max |frequency - probability| = {np.abs(freq - probs[0]).max():.4f} "
      f"(5 sigma of the largest: {5 * sigma.max():.4f})")

# %% [markdown]
# ## Figure: one distribution under several settings
#
# The probabilities of the 30 most likely next tokens (by the raw logits) after the prompt, as `generate`
# would sample them. Temperature reshapes the whole distribution; top-k and top-p cut its tail (and
# renormalise what stays); the repetition penalty pushes down the tokens already in the prompt.

# %%
prompt_ids = np.asarray(prompt)
panels = [("raw: T = 1", z),
          ("T = 0.5 (sharper)", apply_temperature(z, 0.5)),
          ("T = 1.5 (flatter)", apply_temperature(z, 1.5)),
          ("top-k = 10", apply_top_k(z, 10)),
          ("top-p = 0.9", apply_top_p(z, 0.9)),
          ("repetition penalty 1.5 (prompt ids)", apply_repetition_penalty(z, prompt_ids, 1.5))]
shown = order[:30]
in_prompt = np.isin(shown, prompt_ids)
fig, axes = plt.subplots(2, 3, figsize=(16, 7.5), sharey=True)
for ax, (title, scores) in zip(axes.flat, panels):
    pi = softmax(scores)[0]
    colours = np.where(in_prompt, "tab:red", "tab:blue")
    ax.bar(np.arange(30), pi[shown], color=colours)
    ax.plot(np.arange(30), softmax(z)[0, shown], "k_", ms=8, label="raw")
    with np.errstate(divide="ignore"):
        entropy = float(-(pi[pi > 0] * np.log(pi[pi > 0])).sum())
    ax.set_title(f"{title}\n{int((pi > 0).sum())} tokens possible, entropy {entropy:.2f} nats", fontsize=9)
    ax.set_xticks(np.arange(30), [label(v) for v in shown], rotation=90, fontsize=7)
axes[0, 0].set_ylabel("probability")
axes[1, 0].set_ylabel("probability")
axes[0, 0].legend(fontsize=8)
fig.suptitle(f"next-token distribution ({run.name}); red: token already in the prompt", fontsize=10)
savefig(fig, "17_sampling")

# %% [markdown]
# ## `model.generate`: greedy and sampled
#
# Greedy decoding is deterministic; sampling with $T \to 0$ gives the greedy tokens; the same seed gives
# the same sample, other seeds (usually) other ones.

# %%
n_new = min(16, model.config.max_position_embeddings - prompt.shape[1])
common = dict(max_new_tokens=n_new)
greedy = model.generate(prompt, **common)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    cold = model.generate(prompt, do_sample=True, temperature=1e-6, top_k=0, seed=1, **common)
assert (cold == greedy).all(), "temperature -> 0 is greedy"
sampled = {s: model.generate(prompt, do_sample=True, temperature=0.8, top_k=50, top_p=0.95, seed=s, **common)
           for s in (0, 1, 2, 3)}
again = model.generate(prompt, do_sample=True, temperature=0.8, top_k=50, top_p=0.95, seed=0, **common)
assert (again == sampled[0]).all(), "same seed, same tokens"
assert len({tuple(s[0].tolist()) for s in sampled.values()}) > 1, "different seeds sample differently"
assert greedy.shape[1] <= prompt.shape[1] + n_new and (greedy[:, :prompt.shape[1]] == prompt).all()


def show(ids):
    new = ids[0, prompt.shape[1]:]
    return repr(run.tokenizer.decode(new.tolist())) if run.tokenizer is not None else new.tolist()


print("greedy:          ", show(greedy))
for s, ids in sampled.items():
    print(f"sampled, seed {s}: ", show(ids))
