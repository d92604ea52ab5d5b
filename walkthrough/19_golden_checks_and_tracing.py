# %% [markdown]
# # 19 · Golden checks and tracing
#
# How do we know the NumPy model is StableLM? By comparing it with transformers' implementation, number by
# number. `tools/make_goldens.py` builds small random checkpoints, one per configuration the family uses
# (MHA, qkv bias, GQA + qk LayerNorm + parallel residual, tied embeddings, other rotary fractions, RoPE
# scaling, GELU, ...), runs transformers on a right-padded and a left-padded batch in float64 and float32,
# and stores its outputs in `tests/goldens/<variant>/golden.safetensors`. The check is one number per run:
#
# $$\varepsilon = \frac{\lVert \ell_{\text{ours}} - \ell_{\text{transformers}} \rVert_2}{\lVert \ell_{\text{transformers}} \rVert_2}
#   \quad\text{over the real (unpadded) token positions,}\qquad \varepsilon_{64} < 10^{-7},\quad \varepsilon_{32} < 10^{-4}$$
#
# (float64 is not at $10^{-15}$ because transformers builds the RoPE tables in float32 even for a float64
# model; a real bug shows at $10^{-2}$ or more). When a check fails, one number says *that* something
# differs, not *where*. **Tracing** answers where: the model calls `trace(name, array)` with every
# intermediate in execution order; two traces are compared tensor by tensor, each with the normwise error
#
# $$\mathrm{rel}(a, b) = \frac{\max |a - b|}{\max(\max|a|, \max|b|)}, \qquad
#   \text{ok} \iff \max|a-b| \le \mathrm{atol} + \mathrm{rtol} \cdot \max(\max|a|, \max|b|)$$
#
# and the **first divergence** (the first tensor, in execution order, that is not ok) points at the
# operation that went wrong: everything before it agreed.

# %%
import ast
import importlib.util
import os
import tempfile

import matplotlib.pyplot as plt
import numpy as np
from safetensors.numpy import load_file

from _common import ROOT, savefig, show_source
from stablelm_ref import StableLmForCausalLM, trace as tracing
from stablelm_ref.trace import compare_traces, first_divergence, format_table, run_with_trace

spec = importlib.util.spec_from_file_location("golden_report", ROOT / "tools" / "golden_report.py")
golden_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(golden_report)
show_source(golden_report.rel)
show_source(run_with_trace)
show_source(compare_traces, "rows = []", "return rows")

# %% [markdown]
# ## The goldens
#
# One folder per variant: `config.json`, `model.safetensors` (the random float32 weights) and
# `golden.safetensors` (transformers' inputs and outputs). The bounds are read from
# `tests/test_goldens.py`, so this chapter and the test suite cannot drift apart.

# %%
def module_constants(path, names):
    """Top-level `A, B = 1e-7, 1e-4`-style constants of a Python file, without importing it."""
    found = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                targets = target.elts if isinstance(target, ast.Tuple) else [target]
                values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
                for t, v in zip(targets, values):
                    if isinstance(t, ast.Name) and t.id in names:
                        found[t.id] = ast.literal_eval(v)
    return found


bounds = module_constants(ROOT / "tests" / "test_goldens.py", {"F64", "F32"})
F64, F32 = bounds["F64"], bounds["F32"]
GOLDENS = ROOT / "tests" / "goldens"
folders = sorted(p for p in GOLDENS.iterdir() if (p / "golden.safetensors").exists())
g = load_file(str(GOLDENS / "3b" / "golden.safetensors"))
print(f"bounds from tests/test_goldens.py: float64 {F64:g}, float32 {F32:g}; {len(folders)} variants")
print("3b/golden.safetensors:", {k: tuple(v.shape) for k, v in sorted(g.items())})
print("left-padded ids:\n", g["left_ids"], "\nmask:\n", g["left_mask"], "\npositions:\n", g["left_pos"])

# %% [markdown]
# ## The check, for every variant (as `tools/golden_report.py` prints it)

# %%
report = {}
print(f"{'variant':14s} {'float64':>9s} {'float32':>9s} {'f64 left-pad':>12s} {'f32 left-pad':>12s}")
for folder in folders:
    g = load_file(str(folder / "golden.safetensors"))
    row = []
    for dtype, suffix in (("float64", ""), ("float32", "_f32")):
        m = StableLmForCausalLM.from_pretrained(str(folder), dtype=dtype)
        right = m(g["right_ids"], attention_mask=g["right_mask"]).logits
        left = m(g["left_ids"], attention_mask=g["left_mask"], position_ids=g["left_pos"]).logits
        row += [golden_report.rel(right, g["right_logits" + suffix], g["right_mask"] == 1),
                golden_report.rel(left, g["left_logits" + suffix], g["left_mask"] == 1)]
    report[folder.name] = row
    print(f"{folder.name:14s} {row[0]:9.2e} {row[2]:9.2e} {row[1]:12.2e} {row[3]:12.2e}")
    assert max(row[:2]) < F64 and max(row[2:]) < F32, (folder.name, row)

# The check can fail: one wrong sign in a LayerNorm bias is far beyond the bound.
broken = StableLmForCausalLM.from_pretrained(str(GOLDENS / "3b"), dtype="float64")
g = load_file(str(GOLDENS / "3b" / "golden.safetensors"))
name = "model.layers.0.input_layernorm.bias"
broken.params[name] = -broken.params[name]
err = golden_report.rel(broken(g["right_ids"], attention_mask=g["right_mask"]).logits, g["right_logits"],
                        g["right_mask"] == 1)
assert err > 1e3 * F64
print(f"with {name} negated: {err:.2e} (bound {F64:g})")

# %% [markdown]
# ## Tracing: float32 against float64
#
# `run_with_trace` runs one forward and returns the logits and `{name: array}` in execution order. The
# float32 run of the same checkpoint must agree with the float64 run everywhere within float32's default
# tolerances (`rtol` 1e-4, `atol` 1e-5): only rounding separates them.

# %%
folder = str(GOLDENS / "3b")
ids = g["right_ids"][:1]                                            # [1, 9]
m64 = StableLmForCausalLM.from_pretrained(folder, dtype="float64")
m32 = StableLmForCausalLM.from_pretrained(folder, dtype="float32")
logits64, t64 = run_with_trace(m64, ids)
logits32, t32 = run_with_trace(m32, ids)
np.testing.assert_array_equal(logits64, m64(ids).logits)           # tracing changes nothing
assert list(t64)[0] == "model.embed_tokens" and list(t64)[-1] == "lm_head"
print(f"{len(t64)} traced tensors; tolerances float32 vs float64: {tracing.default_tolerances(np.float32, np.float64)}")
rows_rounding = compare_traces(t32, t64)
print(format_table(rows_rounding))
assert first_divergence(rows_rounding) is None and all(r.max_rel < 1e-5 for r in rows_rounding)

# %% [markdown]
# ## Finding a bug: one perturbed weight in layer 1
#
# Move one element of layer 1's value projection by 0.05 (the weights' scale is ~0.02-0.2) and trace the
# float32 model again. Layer 0 still agrees to rounding; the first tensor beyond tolerance is exactly the one
# the weight produces, `model.layers.1.self_attn.v_proj`, and the error spreads from there to the logits.
# The same comparison through the command line, `stablelm-ref compare bad.safetensors good.safetensors`,
# prints the table with the first divergence marked `>>` and exits with status 1.

# %%
bad = StableLmForCausalLM.from_pretrained(folder, dtype="float32")
weight = "model.layers.1.self_attn.v_proj.weight"
bad.params[weight] = bad.params[weight].copy()
bad.params[weight][3, 7] += 0.05
_, t_bad = run_with_trace(bad, ids)
rows_bug = compare_traces(t_bad, t64)
first = first_divergence(rows_bug)
assert first.name == "model.layers.1.self_attn.v_proj", first
assert all(r.ok for r in rows_bug[: [r.name for r in rows_bug].index(first.name)])
assert not rows_bug[-1].ok, "the error reaches the logits"

with tempfile.TemporaryDirectory() as tmp:
    good_file, bad_file = os.path.join(tmp, "good.safetensors"), os.path.join(tmp, "bad.safetensors")
    meta = {"model": "tests/goldens/3b", "device": "cpu", "producer": "walkthrough 15", "ids": ids.tolist()}
    tracing.write_trace(good_file, t64, {**meta, "dtype": "float64"})
    tracing.write_trace(bad_file, t_bad, {**meta, "dtype": "float32", "model": "tests/goldens/3b, perturbed"})
    back, meta = tracing.read_trace(good_file)
    assert meta["order"] == list(t64) and all((back[k] == t64[k]).all() for k in t64)   # a lossless file
    status = tracing.main(["compare", bad_file, good_file])
assert status == 1

# %% [markdown]
# ## Figure: the error of every traced tensor, in execution order
#
# Blue: float32 against float64, rounding only, flat near $10^{-7}$ all the way to the logits. Orange: the
# perturbed float32 model against float64: the same until `layers.1.self_attn.v_proj`, where it jumps by
# orders of magnitude. Layer 1's rotary q and k and its attention weights do not depend on $v$, so they still
# agree; from `attn_output` on the error is everywhere. The dashed line is float32's rtol; an exact zero
# (the embedding lookup, identical float32 weights) is drawn at $10^{-10}$.

# %%
names = [r.name for r in rows_rounding]
short = [n.replace("model.layers.", "L").replace("self_attn.", "").replace("model.", "") for n in names]
FLOOR = 1e-10                                                       # exact zeros (the embedding lookup) drawn here
fig, ax = plt.subplots(figsize=(14, 5))
x = np.arange(len(names))
for rows, label, colour in ((rows_rounding, "float32 vs float64", "tab:blue"),
                            (rows_bug, f"float32, {weight}[3, 7] += 0.05, vs float64", "tab:orange")):
    assert [r.name for r in rows] == names
    ax.plot(x, np.maximum([r.max_rel for r in rows], FLOOR), "o-", ms=4, color=colour, label=label)
i_first = names.index(first.name)
ax.axvline(i_first, color="tab:red", ls=":", lw=1)
ax.annotate(f"first divergence:\n{first.name}", (i_first, first.max_rel), xytext=(-230, -8),
            textcoords="offset points", fontsize=8, color="tab:red")
ax.axhline(tracing.DEFAULT_TOLERANCES["float32"][0], color="gray", ls="--", lw=1, label="float32 rtol")
ax.set_yscale("log")
ax.set_xticks(x, short, rotation=90, fontsize=7)
ax.set(ylabel="max |a - b| / max(|a|, |b|)", title="traced tensors of the 3b golden model, in execution order")
ax.legend(fontsize=8, loc="lower right")
savefig(fig, "19_trace_errors")

fig, ax = plt.subplots(figsize=(11, 4.6))
variants = list(report)
vals = np.array(list(report.values()))                              # [variants, 4]
for j, (lbl, colour) in enumerate((("float64", "tab:blue"), ("float64 left-pad", "tab:cyan"),
                                   ("float32", "tab:orange"), ("float32 left-pad", "tab:red"))):
    ax.bar(np.arange(len(variants)) + (j - 1.5) * 0.2, np.maximum(vals[:, j], 1e-17), 0.2, label=lbl, color=colour)
ax.axhline(F64, color="tab:blue", ls="--", lw=1, label=f"float64 bound {F64:g}")
ax.axhline(F32, color="tab:orange", ls="--", lw=1, label=f"float32 bound {F32:g}")
ax.set_yscale("log")
ax.set_xticks(np.arange(len(variants)), variants, rotation=30, ha="right", fontsize=8)
ax.set(ylabel="relative error of the logits", title="this project vs transformers, every golden variant")
ax.legend(fontsize=7, ncol=3)
savefig(fig, "19_goldens")
