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

from stablelm_ref import StableLmConfig, StableLmForCausalLM  # noqa: E402
from stablelm_ref.hub import DEFAULT_MODEL_DIR as _DEFAULT_MODEL_DIR  # noqa: E402

FIGURES = HERE / "figures"
DEFAULT_MODEL_DIR = Path(_DEFAULT_MODEL_DIR)  # where the package keeps the embedded default model

# The family's shapes in miniature (as tests/conftest.py): small enough that a forward takes milliseconds.
TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, model_type="stablelm")

# The published shapes (docs/facts.md restates them with their sources), for figures that only need a config (no weights are allocated).
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


# ---- figures: small committed PNGs, redrawn only when what they draw has changed -------------------------
#
# matplotlib's PNG bytes change with its version, fonts and FreeType, so a byte comparison would call every
# figure stale on another machine. What a reader needs to be current is what the figure *draws*: the numbers
# behind its lines, images, bars and points, its texts, and its layout and colours. `fingerprint` reads those
# back from the figure's artists; walkthrough/figures/<name>.json, committed beside <name>.png, records them.
# A figure is stale when a number differs by more than 1e-3 of its array's largest magnitude (float32 rounding
# and BLAS summation order stay far below that; a different layer, token or model moves it by far more) or a
# text, colour or layout entry differs. Axes whose gid is "measured" (timings) are compared by their texts and
# layout only: their numbers change on every run. Axes whose gid is "rounding" draw quantities that bfloat16
# rounding makes follow the BLAS library's summation order (chapter 15's logits errors: a value near a rounding
# boundary lands on either side, and the max error of a run moves by up to ~20% between an AVX2 and an AVX-512
# OpenBLAS kernel): their numbers are compared within ROUNDING_RTOL of their scale.
#
#   STABLELM_FIGURES=check    do not write; report stale or missing figures (tools/run_walkthrough.py --check)
#   STABLELM_FIGURES=redraw   write every figure, stale or not
#
# tools/run_walkthrough.py sets STABLELM_FIGURE_LOG to a file where savefig notes each figure's status.

FINGERPRINT_VERSION = 1
STALE_RTOL = 1e-3
ROUNDING_RTOL = 0.35


def _numbers(a):
    """An array's summary for the fingerprint: shape, NaN count, min, max, mean, mean |a|, and a mean with
    fixed pseudo-random weights (which moves when values move between positions)."""
    a = np.ma.filled(np.ma.masked_invalid(np.ma.asarray(a, dtype=np.float64)), np.nan)
    finite = a[np.isfinite(a)]
    w = np.random.default_rng(a.size).random(a.size).reshape(a.shape)
    stats = [float(finite.min()), float(finite.max()), float(finite.mean()), float(np.abs(finite).mean()),
             float(np.nanmean(a * w))] if finite.size else []
    return {"shape": list(a.shape), "nan": int(a.size - finite.size), "stats": [float(f"{v:.7g}") for v in stats]}


def fingerprint(fig):
    """What a figure draws, read back from its artists: {"size", "suptitle", "axes": [...]}, JSON-ready."""
    from matplotlib.colors import to_hex
    from matplotlib.ticker import FixedLocator

    def colour(c):
        try:
            return to_hex(c, keep_alpha=True)
        except (ValueError, TypeError):
            return str(c)

    out = {"version": FINGERPRINT_VERSION, "size": [round(float(v), 2) for v in fig.get_size_inches()],
           "suptitle": fig._suptitle.get_text() if fig._suptitle is not None else "", "axes": []}
    for ax in fig.axes:
        measured = ax.get_gid() == "measured"
        entry = {"texts": [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()] + [t.get_text() for t in ax.texts],
                 "position": [round(float(v), 2) for v in ax.get_position().bounds],
                 "scales": [ax.get_xscale(), ax.get_yscale()], "style": [], "data": []}
        legend = ax.get_legend()
        if legend is not None:
            entry["texts"] += [t.get_text() for t in legend.get_texts()]
        for axis in (ax.xaxis, ax.yaxis):
            if isinstance(axis.get_major_locator(), FixedLocator):   # ticks set by the chapter, not by matplotlib
                entry["texts"] += [t.get_text() for t in axis.get_ticklabels()]
                entry["data"].append(_numbers(axis.get_major_locator().locs))
        for line in ax.lines:
            entry["style"].append([colour(line.get_color()), str(line.get_linestyle()), str(line.get_marker())])
            entry["data"].append(_numbers(line.get_xydata()))
        for im in ax.images:
            entry["style"].append([im.get_cmap().name])
            entry["data"] += [_numbers(im.get_array()), _numbers(im.get_clim())]   # autoscaled limits: data
        for patch in ax.patches:
            entry["style"].append([colour(patch.get_facecolor())])
            entry["data"].append(_numbers(patch.get_patch_transform().transform(patch.get_path().vertices)))
        for coll in ax.collections:
            entry["style"].append([colour(c) for c in coll.get_facecolors()[:4]])
            entry["data"].append(_numbers(coll.get_offsets()))
            if coll.get_array() is not None:
                entry["data"].append(_numbers(coll.get_array()))
        if measured:
            entry["data"] = [{"shape": d["shape"]} for d in entry["data"]]
        elif ax.get_gid() == "rounding":
            entry["rtol"] = ROUNDING_RTOL
        out["axes"].append(entry)
    return out


def fingerprint_differences(old, new):
    """Human-readable differences between two fingerprints; [] when the figure is current."""
    if old.get("version") != new["version"]:
        return ["fingerprint format changed"]
    diffs = []
    for key in ("size", "suptitle"):
        if old.get(key) != new[key]:
            diffs.append(f"{key}: {old.get(key)!r} -> {new[key]!r}")
    if len(old["axes"]) != len(new["axes"]):
        return diffs + [f"{len(old['axes'])} axes -> {len(new['axes'])}"]
    for i, (a, b) in enumerate(zip(old["axes"], new["axes"])):
        for key in ("texts", "position", "scales", "style"):
            if a[key] != b[key]:
                changed = [f"{x!r} -> {y!r}" for x, y in zip(a[key], b[key]) if x != y][:2] if key == "texts" else []
                diffs.append(f"axes {i} {key}" + (": " + "; ".join(changed) if changed else ""))
        if len(a["data"]) != len(b["data"]):
            diffs.append(f"axes {i}: {len(a['data'])} drawn arrays -> {len(b['data'])}")
            continue
        for j, (x, y) in enumerate(zip(a["data"], b["data"])):
            if x.get("shape") != y.get("shape") or x.get("nan") != y.get("nan"):
                diffs.append(f"axes {i} array {j}: shape {x.get('shape')} -> {y.get('shape')}")
            elif "stats" in y:
                scale = max([abs(v) for v in x["stats"][:2] + y["stats"][:2]] + [1e-30])
                rtol = b.get("rtol", STALE_RTOL)              # the code's current intent decides (the new figure)
                if len(x["stats"]) != len(y["stats"]) or any(
                        abs(u - v) > rtol * scale for u, v in zip(x["stats"], y["stats"])):
                    diffs.append(f"axes {i} array {j}: values moved (beyond {rtol:g} of their scale)")
    return diffs


def _write_png(fig, path):
    """A small PNG: 90 dpi, quantised to a 256-colour palette (plots have few colours), optimised."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=90, format="png")
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE,
                                          dither=Image.Dither.NONE).save(path, optimize=True)


def savefig(fig, name):
    """Save walkthrough/figures/<name>.png and its fingerprint <name>.json, unless the committed figure already
    draws the same data (then the PNG is left alone); print and log which it was. Close the figure under Agg."""
    import json

    import matplotlib
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    path, record_path = FIGURES / f"{name}.png", FIGURES / f"{name}.json"
    fig.tight_layout()
    new = fingerprint(fig)
    mode = os.environ.get("STABLELM_FIGURES", "update")
    if record_path.exists() and path.exists():
        diffs = fingerprint_differences(json.loads(record_path.read_text()), new)
        status = "stale" if diffs else "current"
    else:
        diffs, status = ["no committed figure"], "missing"
    if mode == "redraw" or (mode != "check" and status != "current"):
        _write_png(fig, path)
        record_path.write_text(json.dumps(new, indent=None, separators=(",", ":")) + "\n")
        written = "redrawn" if status == "current" else "written"
    else:
        written = "left as committed"
    rel = path.relative_to(ROOT)
    print(f"figure: {rel} ({status}; {written})" + ("" if status == "current" else ": " + "; ".join(diffs[:3])))
    log = os.environ.get("STABLELM_FIGURE_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{rel}\t{status}\t{written}\t{'; '.join(diffs[:3])}\n")
    if matplotlib.get_backend().lower() == "agg":
        plt.close(fig)
    return path
