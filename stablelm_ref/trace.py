"""Golden-reference checks: record every intermediate of a forward pass, save it, compare two recordings.

    trace     = {name: array}, in execution order; names follow the checkpoint's (model.embed_tokens,
                model.layers.3.self_attn.q_proj, ..., model.layers.3 (residual out), model.norm, lm_head)
    scale     = max(max|a|, max|b|)                         one number per tensor, both sides
    abs_err   = max |a - b|
    rel_err   = abs_err / scale                             normwise relative error
    cosine    = <a, b> / (||a|| ||b||)                      in float64
    ok        = abs_err <= atol + rtol * scale
    first divergence = the first tensor, in execution order, that is not ok (A's order; B's when only
                B's file records one; without either, names sorted naturally: layers.2 before layers.10)

Why normwise and not elementwise: intermediates are full of elements near zero (attention weights
of masked or ignored keys, activations that cross zero). An elementwise |a-b|/|b| there measures
nothing but the denominator, while the rounding error of a matmul or LayerNorm scales with the size
of the whole tensor, not of the element. Dividing by the tensor's largest magnitude gives one
comparable number per tensor, is symmetric in A and B, and never divides by ~0.

Tolerances default by the lower precision of the two traces (a trace's precision is its `dtype`
metadata when present, else its tensors' dtype); see DEFAULT_TOLERANCES. A trace is a safetensors
file: tensors under their names, stored in the dtype they were computed in (float16 and bfloat16
included), metadata = model, dtype, device, ids (JSON), package version, producer, the execution
order as JSON (safetensors sorts the names) and, for a padded batch, attention_mask (JSON rows of 0/1:
compare leaves the padded positions out of every tensor, see drop_padding). Any safetensors file of
{name: array} compares too: without the order metadata its names are taken in natural order (numbers as
numbers), and compare uses the other file's recorded order when that one has one.

    logits, trace = model.run_with_trace([[510, 8588, 310]])
    stablelm-ref trace --model DIR --ids 510,8588,310 --dtype float64 --out a.safetensors
    stablelm-ref compare a.safetensors b.safetensors          # exit 0: all agree, 1: a divergence

Tracing costs next to nothing when off: the default callback (_xp.no_trace) does nothing. A recording runs
the array-API reference of every seam (kernels.reference_only), so a GPU trace holds the attention weights too.
Recording is the model's own `run_with_trace` (heads.py); this file, which the model does not import,
writes, reads and compares the records.
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from . import bounded_io, checkpoint, hub
from ._version import __version__
from ._xp import to_host
from .command import PROG, _Parser, run
from .errors import CheckpointError, StableLmError, check_flag, is_number, printable
from .heads import StableLmForCausalLM
from .tokenizer import Tokenizer

TRACE_FORMAT = "stablelm-ref-trace/1"

# (rtol, atol) by the lower precision of the two traces. The check is normwise (see above), so
# rtol is a bound on abs_err / max|x| and atol only matters for tensors that are ~0 throughout.
#  float64: both sides exact to ~1e-16 per operation (measured: transformers --exact against us,
#           <= 3.5e-15 of scale); different summation orders (BLAS blocking, GPU reductions) through
#           a few dozen layers stay below ~1e-13. 1e-10 leaves margin yet fails on any real
#           difference in the math.
#  float32: unit roundoff 6e-8; a matmul over K = 2560..13824 terms plus LayerNorm, softmax and
#           32-40 residual layers accumulate ~1e-6..1e-5 of the tensor's scale (measured on the
#           2-layer test models against float64: <= 1.3e-6 ours, <= 2.0e-6 transformers). 1e-4
#           keeps an order of margin for the largest models.
#  float16:  unit roundoff 4.9e-4, and every op rounds its output: ~8x below bfloat16's error.
#  bfloat16: unit roundoff 3.9e-3. Measured on the 2-layer test models against float64: 1.2e-2 to
#           3.1e-2 of scale (transformers computing in bfloat16 on the CPU), 0.8e-2 to 2.7e-2 (our
#           CPU emulation: bfloat16 weights, float32 compute). 5e-2 passes legitimate rounding and
#           still fails wrong math (errors of order 1). A bfloat16 comparison cannot see small bugs:
#           compare float32 or float64 traces for those.
DEFAULT_TOLERANCES = {
    "float64": (1e-10, 1e-12),
    "float32": (1e-4, 1e-5),
    "float16": (1e-2, 1e-3),
    "bfloat16": (5e-2, 1e-3),
}
_PRECISION_RANK = {"float64": 3, "float32": 2, "float16": 1, "bfloat16": 0}
# a `dtype` metadata may be written by a framework's own str(): str(torch.float32) is 'torch.float32'
_DTYPE_PREFIXES = ("torch.", "jax.numpy.", "jnp.", "numpy.", "np.")


def run_precision(dtype):
    """The DEFAULT_TOLERANCES name a trace's `dtype` metadata means ('float32', 'torch.float32', 'jnp.float32',
    'np.float32' -> 'float32'), or None for anything else (then the tensors' stored dtypes decide)."""
    if not isinstance(dtype, str):
        return None
    name = next((dtype[len(p):] for p in _DTYPE_PREFIXES if dtype.startswith(p)), dtype)
    return name if name in DEFAULT_TOLERANCES else None


# ---- recording ----------------------------------------------------------------------------------

def _host(a):
    """A host (NumPy) array: CuPy arrays are copied off the GPU."""
    return np.asarray(to_host(a))


# run_with_trace(model, ids, attention_mask=None, position_ids=None) -> (logits, {name: host array}) is
# the model's own method (heads.py, like TransformerLens' run_with_cache): the same function, named here.
run_with_trace = StableLmForCausalLM.run_with_trace


# ---- files --------------------------------------------------------------------------------------

def write_trace(path, trace, metadata=None):
    """Write {name: array} as safetensors, atomically (a failed write leaves no file under `path`).

    Arrays are stored in their own dtype (float16/bfloat16 too); the execution order (the dict's
    order) goes into the metadata as JSON, with `metadata` (values: strings, or anything JSON).
    An existing file under `path` is replaced only if it is a trace itself (check_trace_output): a
    mistyped --out must not overwrite a model's weights or any other file."""
    check_trace_output(path)
    if not isinstance(trace, dict):
        raise CheckpointError(f"write_trace takes a dict {{name: array}}, got {type(trace).__name__}")
    meta = {}
    for key, value in (metadata or {}).items():
        try:
            meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"trace metadata {key!r}: {e}; give a string or JSON data") from None
    meta.update(format=TRACE_FORMAT, package_version=__version__, order=json.dumps([str(n) for n in trace]))
    tensors = {name: _host(a) for name, a in trace.items()}              # save_file checks names and dtypes
    checkpoint.save_file(tensors, os.fspath(path), meta)


def check_path(path, what):
    """os.fspath(path); CheckpointError naming `what` unless it is a file name the OS can take, not empty."""
    return checkpoint.check_path_name(path, what, "a file name, e.g. trace.safetensors")


def check_trace_output(path, what="the trace's output path"):
    """CheckpointError unless `path` is free or holds a trace (metadata format TRACE_FORMAT): the only file
    write_trace may replace. Anything else there (a model's model.safetensors, a config, a text) is kept.
    A path that is no file name (check_path) is refused naming `what`; a directory (or a link to one) is named as
    one, with a file name in it to give. (A save's check of its targets is checkpoint.check_no_directory_at: a save
    replaces any file, but no directory.)"""
    path = check_path(path, what)
    if not os.path.lexists(path):
        return
    if os.path.isdir(path):                      # not "another file ... remove it": --out /tmp, a model's directory
        raise CheckpointError(f"{path} is a directory: {what} is a file; give a file name in it, e.g. "
                              f"{os.path.join(path, 'trace.safetensors')}. Nothing was written")
    try:
        _, meta, _ = checkpoint.read_header(path)
        is_trace = meta.get("format") == TRACE_FORMAT
    except CheckpointError:
        is_trace = False
    if not is_trace:
        raise CheckpointError(f"{path}: exists and is not a stablelm-ref trace (a model's weights or another "
                              "file); it is kept, nothing was written. Choose another output file, or remove it")


def natural_key(name):
    """Sort key that compares numbers as numbers: model.layers.2 before model.layers.10."""
    parts = re.split(r"([0-9]+)", name)                    # text, number, text, ...: ASCII digits only
    return [int(part) if i % 2 else part for i, part in enumerate(parts)]


def read_trace(path):
    """(trace {name: array} in execution order, metadata {key: str; "order" and "ids" parsed from JSON}).

    A file without `order` metadata (another producer's) has its names in natural order (natural_key) and
    no "order" key in the returned metadata: compare then takes the other file's order when it has one.
    `ids` as a flat list of ints is read as one row; a `dtype` other than DEFAULT_TOLERANCES' names is
    reported with a warning (the tolerances then follow the tensors' dtypes). docs/tracing.md lists the keys.

    A crafted file meets the checkpoint reader's bounds (regular file, header size, JSON bounds, at most
    MAX_DIMS dimensions), bounded JSON for its metadata and the memory guard before its tensors are read."""
    path = check_path(path, "the trace to read")
    entries, meta, start = checkpoint.read_header(path)
    meta = dict(meta)
    order = sorted(entries, key=natural_key)
    if "order" in meta:
        listed = bounded_io.parse_json(meta["order"], f"{path}: metadata 'order'", CheckpointError,
                                       _HOW_TO_ORDER + "; str(list(names)) is Python, not JSON")
        if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
            raise CheckpointError(f"{path}: metadata 'order' is not a JSON list of tensor names; " + _HOW_TO_ORDER)
        missing = [n for n in listed if n not in entries]
        if missing:
            raise CheckpointError(f"{path}: metadata 'order' lists {missing[0]!r}, which the file does not "
                                  f"hold (it holds {len(entries)} tensors); " + _HOW_TO_ORDER)
        order = list(dict.fromkeys(listed + order))                  # the listed ones, then the rest
        meta["order"] = order
    if "ids" in meta:
        try:
            ids = bounded_io.parse_json(meta["ids"], f"{path}: metadata 'ids'", CheckpointError)
        except CheckpointError:
            ids = None
        if isinstance(ids, list) and ids and all(type(i) is int for i in ids):
            ids = [ids]                                              # a flat list: one row
        if isinstance(ids, list) and all(isinstance(r, list) and all(type(i) is int for i in r) for r in ids):
            meta["ids"] = ids  # else: free text from another producer, kept as it is
    if "attention_mask" in meta:
        mask = bounded_io.parse_json(meta["attention_mask"], f"{path}: metadata 'attention_mask'", CheckpointError,
                                     _HOW_TO_MASK)
        meta["attention_mask"] = _check_mask(mask, f"{path}: metadata 'attention_mask'")
    if "dtype" in meta and run_precision(meta["dtype"]) is None:
        warnings.warn(f"{printable(str(path))}: metadata 'dtype' is {printable(meta['dtype'])!r}, not one of "
                      f"{', '.join(DEFAULT_TOLERANCES)} (each also read with a torch., jnp. or np. prefix: "
                      "'torch.float32'); the tolerances follow the tensors' dtypes instead", stacklevel=2)
    elif "dtype" in meta:
        meta["dtype"] = run_precision(meta["dtype"])                 # 'torch.float32' -> 'float32'
    count = sum(math.prod(entries[name][1]) for name in order)
    bounded_io.check_memory(count * 8 * 2, f"{path}: reading and comparing the trace ({count:,} values, "
                            "held as float64)", CheckpointError, "compare on a machine with more memory")
    trace = {name: checkpoint.read_tensor(str(path), entries[name], start) for name in order}
    return trace, meta


def _check_mask(mask, where, example="a JSON list [[0, 0, 1, 1], [1, 1, 1, 1]]"):
    """A 0/1 attention mask as an int array [B, T]; CheckpointError naming `where` otherwise."""
    rows = mask if isinstance(mask, list) and mask and all(isinstance(r, list) for r in mask) else None
    if (rows is None or len({len(r) for r in rows}) != 1 or not rows[0]
            or not all(type(v) is int and v in (0, 1) for r in rows for v in r)):
        raise CheckpointError(f"{where} is not an attention mask: give rows of 0 (padding) and 1 (token), one row "
                              f"per batch row, all of one length, e.g. {example}")
    return np.array(rows, dtype=np.int64)


_HOW_TO_MASK = ("write 'attention_mask' as JSON rows of 0 and 1, json.dumps(mask.tolist()) for an array (str() of "
                "an array or of a tuple is Python, not JSON), or leave it out")
_HOW_TO_ORDER = ("write 'order' as the JSON list of the names the file holds, in execution order "
                 "(json.dumps(list(trace)) for a dict in execution order), or leave it out: names are then compared "
                 "in the other file's order, or in natural order")


# ---- comparing ----------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of a comparison. shape is A's (B's when A lacks the tensor); note says what is wrong; rtol and
    atol are the tolerances this tensor was judged by, precision the lower precision of the two sides that chose
    their defaults (NaN and '' when it was not compared)."""

    name: str
    shape: tuple | None
    max_abs: float
    max_rel: float
    cosine: float
    ok: bool
    note: str = ""
    rtol: float = math.nan
    atol: float = math.nan
    precision: str = ""


def _precision(dtype):
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    return name if name in _PRECISION_RANK else "float32"  # integer/other tensors: float32's tolerance


def _lower_precision(dtype_a, dtype_b):
    return min(_precision(dtype_a), _precision(dtype_b), key=_PRECISION_RANK.get)


def default_tolerances(dtype_a, dtype_b):
    """(rtol, atol) for comparing a tensor of dtype_a with one of dtype_b: the lower precision decides."""
    return DEFAULT_TOLERANCES[_lower_precision(dtype_a, dtype_b)]


def _compare_arrays(a, b):
    """(max abs err, max rel err (normwise), cosine similarity, scale), all in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size == 0:
        return 0.0, 0.0, 1.0, 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(a == b, 0.0, np.abs(a - b))          # equal infinities count as equal
        max_abs = float(np.max(diff))                        # NaN anywhere -> NaN -> not ok
        scale = float(max(np.max(np.abs(a)), np.max(np.abs(b))))
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if na == 0 or nb == 0:
            cosine = 1.0 if na == nb else 0.0
        else:
            cosine = float(np.clip(np.vdot(a, b) / (na * nb), -1.0, 1.0))
    return max_abs, max_rel, cosine, scale


def check_tolerance(value, name):
    """None (the dtype's default) or float(value) for a finite real number >= 0, else a StableLmError naming it
    (`name`: "rtol=" from Python, "--rtol " from the command line). A negative or NaN tolerance judged identical
    tensors not ok (max_abs 0 <= -1 is False), and a string was a raw TypeError from the comparison."""
    if value is None:
        return None
    if not (is_number(value) and value >= 0):
        raise StableLmError(f"{name}{printable(repr(value))}: a tolerance is a finite number >= 0 (or None for the "
                            "dtype's default)")
    return float(value)


def check_comparable(a, b, labels=("A", "B")):
    """CheckpointError when traces a and b share no tensor that holds a value: every row would be missing (or
    empty), and "all of nothing agrees" is no check. Two files that share no name are usually not two traces
    (a model's weights, model.embed_tokens.weight ..., are not one); `labels` name them in the message.
    A trace is a dict of name -> array (anything with a shape and a dtype: NumPy's, read_trace's); another
    object, or a value that is no array (a nested list, None), is a CheckpointError by name: it was a raw
    AttributeError. Lists are not converted, since their dtype (float64) would choose the tolerances."""
    for label, t in zip(labels, (a, b)):
        label = printable(str(label))
        if not isinstance(t, Mapping):
            raise CheckpointError(f"{label} is a {type(t).__name__}, not a trace: give a dict of name -> array "
                                  "(read_trace(path)[0], or run_with_trace's trace)")
        for name, value in t.items():
            if not (hasattr(value, "shape") and hasattr(value, "dtype")):
                raise CheckpointError(f"{label}'s tensor {printable(str(name))!r} is a {type(value).__name__}, not an "
                                      "array: a trace maps names to arrays (np.asarray(value, dtype) makes one)")
    if any(np.size(a[name]) and np.size(b[name]) for name in a if name in b):
        return

    def holds(label, t):
        if not t:
            return f"{label} holds no tensor"
        weights = ", a model's weights, not a trace" if all(n.endswith((".weight", ".bias")) for n in t) else ""
        return f"{label} holds {len(t)}, e.g. {printable(next(iter(t)))!r}{weights}"

    shared = "no tensor name" if not set(a) & set(b) else "no tensor that holds a value"
    a_name, b_name = (printable(str(label)) for label in labels)
    raise CheckpointError(f"{a_name} and {b_name} share {shared}: nothing to compare ({holds(a_name, a)}; "
                          f"{holds(b_name, b)}). Give two traces: stablelm-ref trace's, or a port's intermediates "
                          "saved under the names of docs/tracing.md")


def compare_traces(a, b, rtol=None, atol=None, precision=(None, None), order=None, allow_missing=False,
                   attention_mask=None):
    """Compare two traces tensor by tensor -> [Row], in A's execution order, then names only in B.

    `order` (a list of names) replaces A's order: compare passes B's recorded order when A's file has none.
    allow_missing: a name only one side holds (a port that cannot produce attn_weights under SDPA or flash
    attention) is a row noted "missing in B (allowed)" with ok=True, so it is neither a failure nor the first
    divergence. attention_mask ([B, T] of 0/1): the padded positions (0) are left out of every tensor whose
    token axis (token_axis) has the mask's shape: a padded query sees no key, and implementations differ there.

    rtol/atol default per tensor by the lower precision of the two sides; `precision` names each
    trace's run dtype (its metadata) and overrides the tensors' dtypes for that choice (a CPU
    emulation of bfloat16 stores float32 tensors; 'torch.float32' and the like are read by run_precision).
    Each compared Row carries the rtol and atol it was judged by and the precision that chose them. Missing names and shape mismatches are rows
    with ok=False and a note, never exceptions; traces that share no tensor holding a value are a
    CheckpointError (check_comparable), since a comparison of nothing cannot fail. A tolerance that is not a
    finite number >= 0 is a StableLmError (check_tolerance), as are an allow_missing that is not True or False, a
    precision that is not a pair and an order that is not a list of names."""
    rtol, atol = check_tolerance(rtol, "rtol="), check_tolerance(atol, "atol=")
    allow_missing = check_flag(allow_missing, "allow_missing", StableLmError)   # "no" was true: missing rows ok
    if not (isinstance(precision, (tuple, list)) and len(precision) == 2):      # "float32" was read as "f", "l"
        raise StableLmError(f"precision must be a pair, (A's run dtype, B's), each a name or None; got "
                            f"{printable(reprlib.repr(precision))}")
    if order is not None and not (isinstance(order, (tuple, list)) and all(isinstance(n, str) for n in order)):
        raise StableLmError(f"order must be a list of tensor names or None; got {printable(reprlib.repr(order))}")
    check_comparable(a, b)
    if attention_mask is not None:
        attention_mask = check_mask_tokens(attention_mask, a, b, "attention_mask")
    rows = []
    run_a, run_b = run_precision(precision[0]), run_precision(precision[1])
    names = dict.fromkeys([n for n in (order or []) if n in a or n in b] + list(a) + list(b))   # first place kept
    allowed = " (allowed)" if allow_missing else ""
    for name in names:
        if name not in a or name not in b:
            side, there = ("B", a) if name not in b else ("A", b)
            rows.append(Row(name, tuple(there[name].shape), math.nan, math.nan, math.nan, bool(allow_missing),
                            f"missing in {side}{allowed}"))
            continue
        x, y = a[name], b[name]
        if tuple(x.shape) != tuple(y.shape):
            expected = layout(name)
            rows.append(Row(name, tuple(x.shape), math.nan, math.nan, math.nan, False,
                            f"shape {tuple(x.shape)} in A, {tuple(y.shape)} in B"
                            + (f"; the layout is {expected}" if expected else "")))
            continue
        lower = _lower_precision(run_a or x.dtype, run_b or y.dtype)
        rt, at = DEFAULT_TOLERANCES[lower]
        rt = rt if rtol is None else rtol
        at = at if atol is None else atol
        x, y = drop_padding(name, x, attention_mask), drop_padding(name, y, attention_mask)
        max_abs, max_rel, cosine, scale = _compare_arrays(x, y)
        ok = bool(max_abs <= at + rt * scale)                   # NaN compares False: not ok
        rows.append(Row(name, tuple(x.shape), max_abs, max_rel, cosine, ok, rtol=rt, atol=at, precision=lower))
    return rows


# the per-head attention tensors, [B, H or KVH, T, D] (attn_weights [B, H, T, S]): positions on axis 2
_PER_HEAD = ("q_proj", "k_proj", "v_proj", "q_layernorm", "k_layernorm", "rotary_q", "rotary_k", "attn_weights",
             "attn_output")


# each name's layout, docs/tracing.md's name table (a test holds the two together), by the name's last parts
_QUERY = "[B, H, T, D] (heads before tokens)"
_KEY_VALUE = "[B, KVH, T, D] (the key/value heads, not repeated to H)"
_LAYOUTS = {
    **dict.fromkeys(("model.embed_tokens", "input_layernorm", "o_proj", "post_attention_layernorm", "mlp.down_proj",
                     "model.layers.i", "model.norm"), "[B, T, hidden]"),
    **dict.fromkeys(("q_proj", "q_layernorm", "rotary_q", "attn_output"), _QUERY),
    **dict.fromkeys(("k_proj", "v_proj", "k_layernorm", "rotary_k"), _KEY_VALUE),
    "attn_weights": "[B, H, T, S] (query positions T, key positions S)",
    **dict.fromkeys(("mlp.gate_proj", "mlp.up_proj", "mlp.act"), "[B, T, inter]"),
    "lm_head": "[B, T, vocab]",
}


def layout(name):
    """The layout of a trace name ('[B, KVH, T, D] (the key/value heads, not repeated to H)' for
    model.layers.3.self_attn.k_proj), or None for a name that is not one of the trace's."""
    if re.fullmatch(r"model\.layers\.[0-9]+", name):
        return _LAYOUTS["model.layers.i"]
    if name in ("model.embed_tokens", "model.norm", "lm_head"):
        return _LAYOUTS[name]
    match = re.fullmatch(r"model\.layers\.[0-9]+\.(?:self_attn\.)?(.+)", name)
    if not match:
        return None
    part = match.group(1)
    attention = ".self_attn." in name
    if attention != (part in _PER_HEAD or part == "o_proj"):
        return None
    return _LAYOUTS.get(part)


def check_mask_tokens(mask, a, b, where):
    """An attention mask for comparing traces a and b -> int array [B, T]; CheckpointError naming `where` unless it
    is rows of 0/1 (a list, or an array of bools or numbers) shaped as the traces' batch x tokens: those of
    model.embed_tokens (A's, else B's), else of the first tensor both hold on its token axis. A mask of another
    shape would match no tensor, and every tensor would be compared whole, silently."""
    try:
        host = np.asarray(mask)
    except ValueError:                                       # ragged rows
        host = None
    if host is not None and host.dtype.kind in "biuf" and host.size and np.isin(host, (0, 1)).all():
        mask = host.astype(np.int64).tolist()
    mask = _check_mask(mask if isinstance(mask, list) else None, where, "[[0, 0, 1, 1], [1, 1, 1, 1]]")
    if not mask.any():                        # every position left out: a comparison of nothing cannot fail
        raise CheckpointError(f"{where} is all padding (no 1), so nothing would be compared: mark the tokens with 1")
    shared = [n for n in ("model.embed_tokens",) if n in a or n in b] + [n for n in a if n in b]
    for name in shared:
        x = a[name] if name in a else b[name]
        if x.ndim > token_axis(name):
            tokens = (x.shape[0], x.shape[token_axis(name)])
            if tokens != mask.shape:
                raise CheckpointError(f"{where} is {mask.shape[0]}x{mask.shape[1]}, but the traces' tokens are "
                                      f"{tokens[0]}x{tokens[1]} (batch x tokens, of {printable(name)}): give the mask "
                                      "the traces were recorded with")
            break
    return mask


def token_axis(name):
    """The axis of a trace tensor that runs over the token (query) positions: 2 for the per-head attention
    tensors (self_attn.q_proj ... attn_output), 1 for every other name ([B, T, ...])."""
    return 2 if ".self_attn." in name and name.rsplit(".", 1)[-1] in _PER_HEAD else 1


def drop_padding(name, x, attention_mask):
    """x with the positions the mask pads (0) on its token axis set to 0 (left out of every error measure);
    x itself when there is no mask or x does not have the mask's [B, T] at (0, token_axis(name))."""
    axis = token_axis(name)
    if attention_mask is None or x.ndim <= axis or (x.shape[0], x.shape[axis]) != attention_mask.shape:
        return x
    keep = attention_mask.astype(bool).reshape((x.shape[0],) + (1,) * (axis - 1) + (x.shape[axis],)
                                               + (1,) * (x.ndim - axis - 1))
    return np.where(keep, x, np.zeros((), x.dtype))


def first_divergence(rows):
    """The first Row that is not ok, or None when every tensor agrees."""
    return next((r for r in rows if not r.ok), None)


def _cosine(c):
    """Cosine similarity, readable near 1: 0.999999999987 is shown as 1-1.3e-11."""
    if math.isnan(c):
        return "-"
    return "1" if c == 1.0 else f"1-{1.0 - c:.1e}" if c > 0.9999 else f"{c:.6f}"


def _num(x):
    return "-" if math.isnan(x) else f"{x:.3e}" if x not in (0.0, math.inf) else ("0" if x == 0 else "inf")


def format_table(rows):
    """A text table: one row per tensor, the first divergence marked '>>'."""
    first = first_divergence(rows)
    header = ("", "tensor", "shape", "max abs err", "max rel err", "cosine", "")
    lines = []
    for r in rows:
        status = r.note or ("ok" if r.ok else "DIFFERS")
        if r is first:
            status += "  <- first divergence"
        cosine = _cosine(r.cosine)
        shape = "x".join(map(str, r.shape)) if r.shape is not None else "-"
        lines.append((">>" if r is first else "", printable(r.name), shape, _num(r.max_abs), _num(r.max_rel), cosine,
                      status))
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:{'>' if i in (3, 4, 5) else '<'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
    out += [fmt.format(*line).rstrip() for line in lines]
    return "\n".join(out)


# ---- command line -------------------------------------------------------------------------------

def _numbers(text):
    """'510,8588, 310' -> [510, 8588, 310], or None unless every comma-separated item is ASCII digits (spaces
    around them allowed): int() alone took '1_0' as 10 and other scripts' digits, and an empty item was dropped."""
    items = [t.strip() for t in text.split(",")]
    if not all(re.fullmatch(r"[0-9]+", t) for t in items):
        return None
    return [int(t) for t in items]


def parse_rows(text, option, what, example):
    """The one parser of --ids and --mask: '5,17;0,4' -> [[5, 17], [0, 4]], rows separated by ';', items by ','
    (_numbers: ASCII digits, no empty item); StableLmError naming `option` and showing `example` otherwise."""
    if not text.strip():
        raise StableLmError(f"{option} is empty: give at least one {what}, e.g. {option} {example}")
    rows = [_numbers(row) for row in text.split(";")]
    if None in rows:
        raise StableLmError(f"{option} {text!r}: give comma-separated {what}s (digits 0-9, no empty item), rows "
                            f"separated by ';', e.g. {option} {example}")
    return rows


_PADDED_EXAMPLE = "--ids 0,0,5,17;3,9,5,17 --mask 0,0,1,1;1,1,1,1"


def parse_mask(text):
    """--mask (of trace or compare) -> int array [B, T] of 0/1, rows of one length, each with a token."""
    return _check_mask(parse_rows(text, "--mask", "0 or 1", "0,0,1,1;1,1,1,1"), f"--mask {text!r}",
                       "--mask 0,0,1,1;1,1,1,1")


def ids_and_mask(ids, mask):
    """--ids and --mask of a trace command -> (rows of ids, mask [B, T] or None): one row of ids, or a padded
    batch whose rows have one length, with --mask marking its padding (0) as the traces record it."""
    rows = parse_rows(ids, "--ids", "token id", "510,8588,310")
    if len({len(r) for r in rows}) != 1:
        raise StableLmError(f"--ids rows have different lengths ({', '.join(str(len(r)) for r in rows)}): pad the "
                            f"shorter rows to one length and mark the padding with --mask, e.g. {_PADDED_EXAMPLE}")
    if mask is None:
        return rows, None
    mask_rows = parse_mask(mask)
    if mask_rows.shape != (len(rows), len(rows[0])):
        raise StableLmError(f"--mask is {mask_rows.shape[0]}x{mask_rows.shape[1]} but --ids is {len(rows)}x"
                            f"{len(rows[0])} (rows x ids): give one 0 or 1 per id, e.g. {_PADDED_EXAMPLE}")
    return rows, mask_rows


def text_ids(model_dir, text, mask=None):
    """--text of a trace command -> ([ids], None, the tokenizer): one unpadded row from the model's tokenizer;
    --mask is refused (it marks the padding of --ids rows). The tokenizer is returned, read once, for the caller's
    check once the model is loaded that the two belong together (tokenizer.check_vocabulary, the rule generate
    and chat apply: the tokenizer, not the user, is then at fault; the model's own message, for ids given
    directly, names no tokenizer)."""
    if mask is not None:
        raise StableLmError(f"--mask goes with --ids (the padding of a batch of rows, e.g. {_PADDED_EXAMPLE}); "
                            "--text gives one unpadded row")
    tokenizer = Tokenizer.from_pretrained(model_dir)
    ids = [int(i) for i in tokenizer.encode(text)]
    if not ids:
        raise StableLmError(f"--text {text!r} gives no tokens: give some text (or --ids)")
    return [ids], None, tokenizer


def load_for_trace(model, dtype, device):
    """from_pretrained for a trace. bfloat16 on the CPU (NumPy has no bfloat16 matmul) is EMULATED:
    the weights are rounded to bfloat16 and everything is computed in float32. That isolates the
    cost of bfloat16 weights; a GPU bfloat16 run also rounds every intermediate, so it differs more."""
    emulate = dtype == "bfloat16" and device == "cpu"
    m = StableLmForCausalLM.from_pretrained(model, dtype="float32" if emulate else dtype, device=device)
    compute = dtype
    if emulate:
        bf16 = checkpoint.SAFETENSORS_DTYPES["BF16"]
        m.params = {k: v.astype(bf16).astype(np.float32) for k, v in m.params.items()}
        compute = "float32 on bfloat16-rounded weights (CPU emulation of bfloat16)"
    return m, compute


def cmd_trace(args):
    dtype = args.dtype or ("float64" if args.device == "cpu" else "float32")
    check_trace_output(args.out, "--out")                 # before the model loads: a wrong --out fails at once
    directory = hub.model_directory(args.model)          # a repo id resolved once, for both
    ids, mask, tok = ((*ids_and_mask(args.ids, args.mask), None) if args.ids is not None
                      else text_ids(directory, args.text, args.mask))
    model, compute = load_for_trace(directory, dtype, args.device)
    if tok is not None:
        tok.check_vocabulary(model.config.vocab_size, directory)
    logits, trace = run_with_trace(model, ids, attention_mask=mask)    # positions 0..T-1, as transformers' forward
    meta = {"model": str(args.model), "dtype": dtype, "compute": compute, "device": args.device, "ids": ids,
            "producer": "stablelm-ref"}
    write_trace(args.out, trace, meta if mask is None else {**meta, "attention_mask": mask.tolist()})
    padded = "" if mask is None else f", attention mask recorded ({int((mask == 0).sum())} padded positions)"
    print(f"wrote {len(trace)} tensors ({sum(a.nbytes for a in trace.values()) / 2**20:.1f} MiB) to {args.out}"
          + padded)
    return 0


def cmd_compare(args):
    check_tolerance(args.rtol, "--rtol "), check_tolerance(args.atol, "--atol ")    # before the files are read
    a, meta_a = read_trace(args.a)
    b, meta_b = read_trace(args.b)
    check_comparable(a, b, (args.a, args.b))
    order = meta_b["order"] if "order" in meta_b and "order" not in meta_a else None
    mask, mask_from = _choose_mask(args.mask, meta_a, meta_b)
    if mask is not None:
        mask = check_mask_tokens(mask, a, b, f"the attention mask ({mask_from})")
    rows = compare_traces(a, b, args.rtol, args.atol,
                          precision=(run_precision(meta_a.get("dtype")), run_precision(meta_b.get("dtype"))),
                          order=order, allow_missing=args.allow_missing, attention_mask=mask)
    for label, meta, path in (("A", meta_a, args.a), ("B", meta_b, args.b)):
        producer, dtype, device, model = (printable(meta.get(k, "?")) for k in ("producer", "dtype", "device", "model"))
        print(f"{label}: {printable(path)}  ({producer}, {dtype}, {device}, model {model})")
    if mask is not None:
        print(f"attention mask from {mask_from}: {int((mask == 0).sum())} padded positions left out of every tensor")
    if order is not None:
        print("A has no execution order; using B's")
    elif "order" not in meta_a:
        print("neither file has an execution order; names in natural order (layers.2 before layers.10)")
    if "ids" in meta_a and "ids" in meta_b and meta_a["ids"] != meta_b["ids"]:      # one line, as every warning
        warnings.warn("the two traces were recorded from different input ids", stacklevel=1)
    if "attention_mask" in meta_a and "attention_mask" in meta_b and not np.array_equal(meta_a["attention_mask"],
                                                                                        meta_b["attention_mask"]):
        warnings.warn("the two traces were recorded with different attention masks (A's is used)", stacklevel=1)
    print(tolerance_line(rows, args.rtol, args.atol, (meta_a.get("dtype"), meta_b.get("dtype")), a, b) + "\n")
    print(format_table(rows))
    first = first_divergence(rows)
    bad = sum(not r.ok for r in rows)
    missing = sum(r.ok and r.note.startswith("missing") for r in rows)
    skipped = f" ({missing} missing from one side, allowed by --allow-missing)" if missing else ""
    if first is None:
        print(f"\nall {len(rows) - missing} tensors both sides hold agree{skipped}" if missing
              else f"\nall {len(rows)} tensors agree")
        return 0
    print(f"\n{bad} of {len(rows)} tensors beyond tolerance; first divergence: {printable(first.name)}"
          + (f" ({first.note})" if first.note else "") + skipped)
    return 1


def tolerance_line(rows, rtol, atol, precision, a, b):
    """compare's header: the rtol and atol in force and where each came from (--rtol/--atol, else the default of
    the lower precision of the two sides, each side's by its dtype metadata, else by its tensors' dtypes); the
    rows say which precision judged each tensor (compare_traces chose it)."""
    def side(label, run, trace):
        if run_precision(run):
            return f"{label} {run_precision(run)} by its dtype metadata"
        kinds = sorted({_precision(x.dtype) for x in trace.values()}, key=_PRECISION_RANK.get, reverse=True)
        return f"{label} {'/'.join(kinds) or '-'} by its tensors' dtypes"

    if not any(r.precision for r in rows):
        return "tolerance: none (no tensor compared)"
    given = rtol is not None and atol is not None
    lowers = {}                               # lower precision -> how many compared tensors it judged
    for r in rows:
        if r.precision:
            lowers[r.precision] = lowers.get(r.precision, 0) + 1
    lowers = dict(sorted(lowers.items(), key=lambda item: -_PRECISION_RANK[item[0]]))   # float64 first
    parts = []
    for lower, count in lowers.items():
        rt, at = DEFAULT_TOLERANCES[lower]
        said = (f"rtol={rt:g}" if rtol is None else f"rtol={rtol:g} from --rtol") + ", " + (
            f"atol={at:g}" if atol is None else f"atol={atol:g} from --atol")
        if given:
            parts.append(said)                # one pair for every tensor
            break
        parts.append(said + (f" for {count} tensor{'s' if count > 1 else ''}" if len(lowers) > 1 else ""))
    why = "" if given else (
        f" ({', '.join(lowers)} default{'s' if len(lowers) > 1 else ''}: the lower precision of "
        f"{side('A', precision[0], a)} and {side('B', precision[1], b)})")
    return f"tolerance: {'; '.join(parts)}{why}\n" \
           "ok = max abs err <= atol + rtol * max(|A|max, |B|max)"


def _choose_mask(option, meta_a, meta_b):
    """(mask [B, T] or None, where it came from): --mask, else A's metadata, else B's."""
    if option is not None:
        return parse_mask(option), "--mask"
    for label, meta in (("A", meta_a), ("B", meta_b)):
        if "attention_mask" in meta:
            return meta["attention_mask"], f"{label}'s metadata"
    return None, None


def add_cli_commands(subparsers):
    """Register `trace` and `compare` on an argparse subparsers object (stablelm-ref's CLI)."""
    p = subparsers.add_parser("trace", allow_abbrev=False,
                              help="record every intermediate of one forward pass to a safetensors file",
                              description="Record every named intermediate of one forward pass (execution order) "
                                          "to a safetensors trace.")
    p.add_argument("--model", default=hub.DEFAULT_MODEL, metavar="DIR_OR_REPO",
                   help="model directory or Hugging Face Hub repo id (default: the embedded default model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ids", help="comma-separated token ids, e.g. 510,8588,310; a padded batch: rows separated "
                                   "by ';' with --mask, e.g. --ids '0,0,5,17;3,9,5,17' --mask '0,0,1,1;1,1,1,1'")
    src.add_argument("--text", help="text to tokenize with the model's tokenizer")
    p.add_argument("--mask", metavar="ROWS",
                   help="attention mask of the --ids rows, rows separated by ';' (0: padding, 1: token), recorded "
                        "in the trace; positions stay 0..T-1 in every row, as transformers' forward without "
                        "position_ids")
    p.add_argument("--dtype", choices=("float64", "float32", "bfloat16"),
                   help="compute dtype (default float64 on the CPU, float32 on the GPU; bfloat16 on the CPU is "
                        "emulated: bfloat16-rounded weights, float32 compute)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="cpu (NumPy) or gpu (CuPy)")
    p.add_argument("--out", required=True, help="output file (safetensors)")
    p.set_defaults(func=cmd_trace)

    c = subparsers.add_parser("compare", allow_abbrev=False,
                              help="compare two traces; exit 0 if all tensors agree, 1 otherwise",
                              description="Compare two traces tensor by tensor in A's execution order (B's when "
                                          "only B's file records one) and mark the first tensor beyond "
                                          "tolerance. Exit 0: all agree; 1: a divergence.")
    c.add_argument("a", help="trace A (safetensors)")
    c.add_argument("b", help="trace B (safetensors)")
    c.add_argument("--rtol", type=float, help="relative tolerance (of each tensor's max magnitude); default by dtype")
    c.add_argument("--atol", type=float, help="absolute tolerance; default by dtype")
    c.add_argument("--mask", metavar="ROWS",
                   help="attention mask, rows separated by ';' (e.g. 0,0,1,1;1,1,1,1): padded positions (0) are left "
                        "out of every tensor; default: the traces' attention_mask metadata")
    c.add_argument("--allow-missing", action="store_true",
                   help="a tensor only one file holds (e.g. attn_weights from a port using SDPA or flash attention) "
                        "is listed but neither fails nor counts as the first divergence")
    c.set_defaults(func=cmd_compare)


def main(argv=None):
    """`python -m stablelm_ref.trace {trace,compare} ...`: the same commands as `stablelm-ref`, run alike
    (command.run: one-line errors and warnings prefixed 'stablelm-ref:', exit 2 on a user error)."""
    parser = _Parser(prog=PROG, description="Record and compare StableLM traces (the trace and compare commands "
                                            "of stablelm-ref).",
                     epilog="python -m stablelm_ref.trace COMMAND --help for each command's options.")
    add_cli_commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
