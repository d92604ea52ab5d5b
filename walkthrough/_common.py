"""Small helpers shared by the walkthrough chapters: figures, source listings, tiny models.

Nothing here implements a piece of StableLM: the chapters import that from `stablelm_ref` itself.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import stablelm_ref  # noqa: E402
from stablelm_ref import StableLmConfig, StableLmForCausalLM  # noqa: E402

FIGURES = HERE / "figures"
DEFAULT_MODEL_DIR = Path(stablelm_ref.__file__).resolve().parent / "default_model"

# The family's shapes in miniature (as tests/conftest.py): small enough that a forward takes milliseconds.
TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, model_type="stablelm")

# The published shapes (FACTS.md), for figures that only need a config (no weights are allocated).
FAMILY = {
    "stablelm-3b-4e1t": dict(vocab_size=50304, hidden_size=2560, intermediate_size=6912, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32),
    "stablelm-2-1_6b": dict(vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                            num_attention_heads=32, num_key_value_heads=32, use_qkv_bias=True),
    "stablelm-2-12b": dict(vocab_size=100352, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                           num_attention_heads=32, num_key_value_heads=8, qk_layernorm=True,
                           use_parallel_residual=True),
}

# A short Python snippet: the default model was trained on Python source.
SAMPLE_TEXT = "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"


def family_config(name: str) -> StableLmConfig:
    return StableLmConfig.from_dict({**FAMILY[name], "model_type": "stablelm"})


def tiny_config(**overrides) -> StableLmConfig:
    return StableLmConfig.from_dict({**TINY, **overrides})


def tiny_model(seed=0, dtype="float64", cls=StableLmForCausalLM, std=0.2, **overrides):
    """A random tiny model; LayerNorm weights and biases are perturbed too, so every parameter matters."""
    model = cls.from_config(tiny_config(**overrides), seed=seed, dtype=dtype, std=std)
    rng = np.random.default_rng(seed + 1000)
    for name, value in model.params.items():
        noise = rng.normal(0.0, std, size=value.shape).astype(value.dtype)
        if "layernorm" in name or name.startswith("model.norm"):
            model.params[name] = value + noise if name.endswith("weight") else noise
        elif name.endswith("bias"):
            model.params[name] = noise
    return model


class Loaded:
    """What load_default_or_tiny returns: the model, a tokenizer (or None), the ids and a label per token."""

    def __init__(self, model, tokenizer, ids, labels, trained, name):
        self.model, self.tokenizer, self.ids, self.labels = model, tokenizer, ids, labels
        self.trained, self.name = trained, name

    def __repr__(self):
        return f"<{self.name}: {self.model.num_parameters():,} parameters, {self.ids.shape[1]} tokens>"


def load_default_or_tiny(dtype="float32", text=SAMPLE_TEXT, seed=0):
    """The trained default model (stablelm_ref/default_model/) on `text` when it is there; a tiny random
    model (4 heads, 2 kv heads, qk LayerNorm off) on 24 random token ids otherwise."""
    if (DEFAULT_MODEL_DIR / "config.json").exists():
        model = StableLmForCausalLM.from_pretrained(str(DEFAULT_MODEL_DIR), dtype=dtype)
        tokenizer = None
        if (DEFAULT_MODEL_DIR / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
        if tokenizer is not None:
            ids = np.array([tokenizer.encode(text).ids], dtype=np.int64)
            labels = [tokenizer.decode([int(i)]).replace("\n", "\\n").replace(" ", "·") for i in ids[0]]
        else:
            ids = np.random.default_rng(seed).integers(2, model.config.vocab_size, (1, 24))
            labels = [str(i) for i in ids[0]]
        return Loaded(model, tokenizer, ids, labels, True, "trained default model")
    model = tiny_model(seed=seed, dtype=dtype, std=0.3, num_key_value_heads=2)
    ids = np.random.default_rng(seed).integers(2, model.config.vocab_size, (1, 24))
    return Loaded(model, None, ids, [f"#{i}" for i in ids[0]], False, "tiny random model")


def record(model, ids, names=None, **kwargs):
    """Run a forward with a trace callback; return ({trace name: array}, output)."""
    seen = {}

    def trace(name, array):
        if names is None or any(n in name for n in names):
            seen[name] = np.array(array, copy=True)

    out = model(ids, trace=trace, **kwargs)
    return seen, out


def show_source(obj, start=None, stop=None):
    """Print the source of a function or class of stablelm_ref, or the lines from the first one holding
    `start` to the first one after it holding `stop` (both included)."""
    lines = inspect.getsource(obj).splitlines()
    if start is not None:
        i = next(n for n, line in enumerate(lines) if start in line)
        j = next((n for n in range(i, len(lines)) if stop is not None and stop in lines[n]), len(lines) - 1)
        lines = lines[i: j + 1]
    where = f"{inspect.getsourcefile(inspect.unwrap(obj))}".replace(str(ROOT) + os.sep, "")  # seams wrap their reference
    print(f"# --- {where} :: {getattr(obj, '__qualname__', obj)}")
    print("\n".join(lines))


def savefig(fig, name):
    """Save a figure as walkthrough/figures/<name>.png (and close it when nothing can display it)."""
    import matplotlib
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure: {path.relative_to(ROOT)}")
    if matplotlib.get_backend().lower() == "agg":
        plt.close(fig)
    return path
