"""Checkpoints: safetensors files (single or sharded), read and validated here, never pickles.

A safetensors file is

    [8 bytes: N, little-endian u64] [N bytes: JSON header] [data]
    header = {"name": {"dtype": "BF16", "shape": [50304, 2560], "data_offsets": [begin, end]}, ...,
              "__metadata__": {"format": "pt"}}

with offsets relative to the start of the data, the tensors packed back to back (no gaps, no
overlaps), and nothing executed on load. The header is checked completely before any tensor byte is
read; a tensor's bytes are then read straight into an array and cast once to the compute dtype
(bfloat16 through ml_dtypes, which NumPy cannot compute with: float32 by default, float64 for
golden work). A sharded checkpoint adds `model.safetensors.index.json`:
{"weight_map": {"name": "model-00001-of-00002.safetensors", ...}}; shards must lie inside the
model directory. Every file is opened through bounded_io (a regular file, resolved inside the model
directory or its Hub cache blobs/, never a FIFO or a device), the header is size-capped before it is
read and parsed with bounded_io's JSON bounds, and the weights meet the memory guard before any is read.

`pytorch_model.bin` and other pickle files are refused, never opened: unpickling runs code.
Checkpoint names follow transformers' modeling_stablelm.py; `expected_shapes` lists them for a config.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import tempfile

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)
import numpy as np

from . import bounded_io
from .errors import CheckpointError, is_int

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt",
                "tf_model.h5", "flax_model.msgpack")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_DIMS = 32                        # NumPy's limit is 64; real tensors have 1-4
MAX_INDEX_BYTES = 16 * 1024 * 1024   # model.safetensors.index.json (real: < 200 KB)


# ---- names and shapes a config implies ---------------------------------------------------------

def expected_shapes(config, head="causal_lm", limit=None, where="the checkpoint", config_name="config.json"):
    """{checkpoint name: shape} for a config and a head: "base", "causal_lm", "sequence", "token".

    `limit` (the number of tensors a checkpoint holds) refuses, before building anything, a config
    that implies more tensors than that: a config edited to a billion layers fails at once. The
    CheckpointError names `where` (the weights) and `config_name` (the config: model.params and
    model.config for a model in memory).
    """
    h, inter, d = config.hidden_size, config.intermediate_size, config.head_dim
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    per_layer = (9 + 2 * (not config.use_parallel_residual) + 3 * config.use_qkv_bias
                 + (heads + kv) * config.qk_layernorm)
    if limit is not None and 3 + config.num_hidden_layers * per_layer > limit:
        raise CheckpointError(
            f"{config_name} implies at least {3 + config.num_hidden_layers * per_layer} tensors "
            f"(num_hidden_layers={config.num_hidden_layers}, {per_layer} per layer) but {where} holds "
            f"{limit}: {config_name} does not match the weights"
        )
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = shapes[p + "input_layernorm.bias"] = (h,)
        if not config.use_parallel_residual:
            shapes[p + "post_attention_layernorm.weight"] = shapes[p + "post_attention_layernorm.bias"] = (h,)
        for name, out in (("q_proj", heads * d), ("k_proj", kv * d), ("v_proj", kv * d)):
            shapes[f"{p}self_attn.{name}.weight"] = (out, h)
            if config.use_qkv_bias:
                shapes[f"{p}self_attn.{name}.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (h, heads * d)
        if config.qk_layernorm:
            for n in range(heads):
                shapes[f"{p}self_attn.q_layernorm.norms.{n}.weight"] = (d,)
            for n in range(kv):
                shapes[f"{p}self_attn.k_layernorm.norms.{n}.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
    shapes["model.norm.weight"] = shapes["model.norm.bias"] = (h,)
    if head == "causal_lm" and not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    elif head == "sequence":
        shapes["score.weight"] = (config.num_labels, h)
    elif head == "token":
        shapes["score.weight"] = (config.num_labels, h)
        if config.token_classification_bias:
            shapes["score.bias"] = (config.num_labels,)
    return shapes


# ---- reading ------------------------------------------------------------------------------------

def read_header(path, root=None):
    """Parse and fully validate a safetensors header. Returns (entries, metadata, data_start).

    The file must be a regular file (inside `root` when given); the header is size-capped before it
    is read and parsed with bounded_io's bounds (values, digits, nesting, UTF-8)."""
    with bounded_io.open_regular(path, CheckpointError, root) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: truncated ({size} bytes): not a safetensors file; re-download it")
            n = int.from_bytes(raw_len, "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length {n} exceeds the file size ({size} bytes) or the safetensors limit "
                    f"({MAX_HEADER_BYTES} bytes): the file is truncated or not safetensors; re-download it"
                )
            raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    header = bounded_io.parse_json(raw, f"{path}: the safetensors header", CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must be an object of strings; the file is corrupt")
    data_len = size - 8 - n
    entries, spans = {}, []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: entry must have exactly dtype, shape and data_offsets; the file is corrupt")
        dtype = SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise CheckpointError(
                f"{where}: unsupported dtype {info['dtype']!r} (supported: {', '.join(SAFETENSORS_DTYPES)})"
            )
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(is_int(s) and s >= 0 for s in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if len(shape) > MAX_DIMS:
            raise CheckpointError(f"{where}: {len(shape)} dimensions, more than the {MAX_DIMS} an array can have; "
                                  "the file is corrupt")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
        if offsets[1] > data_len:
            raise CheckpointError(
                f"{where}: data ends at byte {offsets[1]} but the file holds {data_len} data bytes: "
                "the file is truncated; re-download it"
            )
        count = math.prod(shape)  # exact: np.prod would wrap around at 2**63
        if count * dtype.itemsize != offsets[1] - offsets[0]:
            raise CheckpointError(
                f"{where}: shape {shape} of {info['dtype']} needs {count * dtype.itemsize} bytes but data_offsets "
                f"span {offsets[1] - offsets[0]}; the file is corrupt"
            )
        entries[name] = (dtype, tuple(shape), offsets[0], offsets[1])
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            kind = "overlaps the previous tensor" if begin < end else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {begin}: it {kind}; the file is corrupt")
        end = stop
    if end != data_len:
        raise CheckpointError(f"{path}: {data_len - end} bytes after the last tensor; the file is corrupt")
    return entries, metadata, 8 + n


def read_tensor(path, entry, data_start):
    """Read one tensor straight from the file into an array of its stored dtype (cast_finite casts it)."""
    stored, shape, begin, end = entry
    with bounded_io.open_regular(path, CheckpointError) as f:
        f.seek(data_start + begin)
        arr = np.fromfile(f, dtype=stored.newbyteorder("<"), count=(end - begin) // stored.itemsize)
    if arr.size * stored.itemsize != end - begin:
        raise CheckpointError(f"{path}: truncated while reading a tensor; re-download it")
    return arr.reshape(shape)


def checkpoint_files(directory, headers=None):
    """The safetensors files of a model directory and which tensor lives in which: {name: file}.

    `headers`, a dict when given, receives {file: read_header(file)} for the files whose header was read to
    list the names (a single-file checkpoint's; a sharded one is listed from its index), so that
    load_state_dict(..., headers=headers) does not parse it again."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory; give a model directory holding config.json and "
                              "model.safetensors (or a Hub repo id)")
    index = os.path.join(directory, INDEX_NAME)
    single = os.path.join(directory, SINGLE_NAME)
    if os.path.lexists(index):
        return _shards_from_index(directory, index)
    if os.path.lexists(single):
        header = read_header(single, root=directory)
        if headers is not None:
            headers[single] = header
        return {name: single for name in header[0]}
    pickles = [n for n in PICKLE_NAMES if os.path.exists(os.path.join(directory, n))]
    if pickles:
        raise CheckpointError(
            f"{directory}: holds only {', '.join(pickles)}, a pickle format that runs code when opened; it is "
            "refused. Convert it to safetensors (transformers: model.save_pretrained(dir, safe_serialization=True)) "
            "or use the repo's model.safetensors"
        )
    raise CheckpointError(f"{directory}: no {SINGLE_NAME} or {INDEX_NAME}; is this a model directory?")


def _plain_file_name(name):
    return (name not in ("", ".", "..") and "/" not in name and os.sep not in name
            and not any(ord(c) < 32 for c in name))


def _shards_from_index(directory, index):
    parsed = bounded_io.read_json(index, MAX_INDEX_BYTES, CheckpointError, root=directory,
                                  what="not a valid shard index")
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid shard index; it needs "
                              '{"weight_map": {"tensor name": "shard file name"}}')
    files = {}
    for shard in sorted(set(weight_map.values())):
        if not _plain_file_name(shard):
            raise CheckpointError(f"{index}: shard {shard!r} is not a plain file name in the model directory "
                                  "(no '/', '..', absolute paths or control characters); refused")
        path = os.path.join(directory, shard)
        if not os.path.lexists(path):
            raise CheckpointError(f"{index}: names shard {shard!r}, which is missing from {directory}; "
                                  "the download is incomplete")
        bounded_io.inside(path, directory, CheckpointError)
        files[shard] = path
    for name, shard in weight_map.items():
        weight_map[name] = files[shard]
    return weight_map


IGNORED = ("rotary_emb.inv_freq",)   # old checkpoints stored rotary tables, which are computed here


def load_state_dict(directory, dtype=np.float32, expected=None, ignore=IGNORED, files=None, headers=None):
    """Read every tensor of a model directory as {name: array of `dtype`}.

    `files` is checkpoint_files(directory, headers) when the caller already has it (it is not read again),
    `headers` the headers that call parsed: each file's header is read and validated once (the dict is
    filled in with the headers read here, so a caller that reads a tensor afterwards parses none again).

    `expected` ({name: shape}) is checked against the headers before any data is read: a missing,
    unexpected or mis-shaped tensor raises CheckpointError naming it and both shapes. Tensors whose
    name ends with an entry of `ignore` are skipped (IGNORED: old checkpoints stored rotary tables; a model
    without an lm_head adds lm_head.weight, model._lm_head_rule).
    Floating tensors must be finite: NaN or Inf raises CheckpointError.
    """
    headers = {} if headers is None else headers
    where = checkpoint_files(directory, headers) if files is None else files
    for path in set(where.values()) - set(headers):
        headers[path] = read_header(path, root=os.fspath(directory))
    located = {}
    for name, path in where.items():
        if name not in headers[path][0]:
            raise CheckpointError(f"{path}: the shard index says it holds {name!r} but it does not")
        if not any(name.endswith(s) for s in ignore):
            located[name] = path
    if expected is not None:
        _check_against(located, headers, expected, directory)
        _check_memory(expected, dtype, directory)
    params = {}
    for name, path in located.items():
        entry = headers[path][0][name]
        floating = is_floating(entry[0])
        if expected is not None and not floating:
            raise CheckpointError(f"{path}: tensor {name!r} is stored as {DTYPE_NAMES[entry[0]]}; model weights "
                                  "must be floating point (F64, F32, F16 or BF16). The file is corrupt")
        stored = read_tensor(path, entry, headers[path][2])
        params[name] = cast_finite(stored, dtype if floating else None, f"{path}: tensor {name!r}",
                                   beyond_range="; load it with dtype='float64'",
                                   not_finite="; its logits would be meaningless. The file is damaged or was saved "
                                              "from a diverged run")
    return params


def is_floating(dtype):
    """A floating-point dtype, bfloat16 (ml_dtypes, whose NumPy kind is "V") included."""
    return np.dtype(dtype).kind == "f" or np.dtype(dtype) == SAFETENSORS_DTYPES["BF16"]


def cast_finite(value, dtype, where, beyond_range, not_finite):
    """`value` (a NumPy array) cast to `dtype` (None: as it is), refused where the result is not finite, naming
    `where` ("{path}: tensor 'name'") and saying what to do:

        value itself holds NaN or Inf   CheckpointError "{where} holds N NaN or Inf values (as dtype){not_finite}"
        the cast overflowed             CheckpointError "{where} holds N values beyond dtype's range (largest
                                        magnitude M){beyond_range}"   (float16 holds at most 65504)

    Loading (load_state_dict), the GPU's narrowing (model._narrowed) and saving (save_pretrained) share it.
    Integer and bool arrays pass as they are."""
    with np.errstate(over="ignore", invalid="ignore"):                 # overflow is reported below, by name
        out = value if dtype is None or value.dtype == dtype else value.astype(dtype)
    if not is_floating(out.dtype) or np.isfinite(out).all():
        return out
    bad = int(out.size - np.count_nonzero(np.isfinite(out)))
    if np.isfinite(value).all():                                         # finite before the cast: it overflowed
        raise CheckpointError(f"{where} holds {bad} values beyond {out.dtype.name}'s range (largest magnitude "
                              f"{float(np.max(np.abs(value.astype(np.float64)))):.4g}){beyond_range}")
    raise CheckpointError(f"{where} holds {bad} NaN or Inf values (as {out.dtype.name}){not_finite}")


def _check_against(located, headers, expected, directory):
    missing = [n for n in expected if n not in located]
    unexpected = [n for n in located if n not in expected]
    if missing and all(n.startswith("score.") for n in missing):
        raise CheckpointError(f"{directory} has no classification head ({', '.join(map(repr, missing))} missing): "
                              "it holds a base or causal-LM model; load it with StableLmForCausalLM or StableLmModel, "
                              "or load a checkpoint fine-tuned with this head")
    if missing:
        raise CheckpointError(f"{directory}: tensor {missing[0]!r} (shape {tuple(expected[missing[0]])}) is missing "
                              f"from the checkpoint ({len(missing)} missing in all); does config.json match it?")
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all) for this "
                              "config and model class; check config.json (qk_layernorm, use_qkv_bias, "
                              "use_parallel_residual, tie_word_embeddings) and the class you load with")
    for name, shape in expected.items():
        got = headers[located[name]][0][name][1]
        if tuple(got) != tuple(shape):
            raise CheckpointError(f"{directory}: tensor {name!r} has shape {tuple(got)} in the checkpoint but the "
                                  f"config implies {tuple(shape)}; config.json does not match the weights")


def _check_memory(expected, dtype, directory):
    need = sum(math.prod(s) for s in expected.values()) * np.dtype(dtype).itemsize
    bounded_io.check_memory(need, f"{directory}: the weights as {np.dtype(dtype).name}", CheckpointError,
                            "use a smaller dtype or machine")


# ---- writing ------------------------------------------------------------------------------------

def check_os_path(path):
    """CheckpointError unless the operating system can take `path` (a str, bytes or os.PathLike): no NUL
    character, and encodable in the file system's encoding (a lone surrogate such as '\\ud800' is not). Python
    raised ValueError / UnicodeEncodeError from deep inside os.makedirs or tempfile for those."""
    name = os.fspath(path)
    try:
        encoded = os.fsencode(name)
    except UnicodeEncodeError as e:
        raise CheckpointError(f"{name!r}: the path cannot be encoded for the file system ({e.reason}); "
                              "choose a path without that character") from None
    if b"\0" in encoded:
        raise CheckpointError(f"{name!r}: a path cannot hold a NUL character; choose another path")


def check_path_name(path, what, example):
    """os.fspath(path); CheckpointError naming `what` unless path is a str or os.PathLike, not empty, that the
    operating system can take (check_os_path). `example` completes the advice for an empty one ('' reached
    open() as ': cannot write (No such file or directory)')."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"{what} must be a path (a string or os.PathLike), got {path!r}")
    if not os.fspath(path):
        raise CheckpointError(f"{what} is empty (''): give {example}")
    check_os_path(path)
    return os.fspath(path)


def check_directory_name(directory):
    """check_path_name for save_pretrained's output directory, which may not be the embedded default model's name."""
    check_path_name(directory, "the output directory", "a directory to save into, e.g. ./my-model")
    from .hub import DEFAULT_MODEL

    if os.fspath(directory) == DEFAULT_MODEL:    # from_pretrained(that name) is the embedded model, not this folder
        raise CheckpointError(f"{DEFAULT_MODEL!r} names the embedded default model: a folder of that name would "
                              "never be loaded by that name; save to another directory")


def make_directory(directory):
    check_directory_name(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{directory}: cannot create the output directory ({e.strerror or e})") from None


def _file_mode():
    """The mode a plain open() would give a new file (0o666 less the umask); mkstemp's is 0o600."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def check_no_directory_at(paths, deleting=False):
    """CheckpointError, before anything is written or renamed, when one of `paths` cannot be replaced by a file
    (deleting=True: cannot be deleted as a file): a directory stands there (a symlink, to anything, is replaced
    or deleted itself, like a file)."""
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            why = "the save deletes the file of this name" if deleting else "a file cannot replace it"
            raise CheckpointError(f"{path} is a directory: {why}; remove or rename it. Nothing was written")


@contextlib.contextmanager
def atomic_open(path, group=None):
    """Open a temporary file beside `path` for writing; rename it to `path` only if the block succeeds.

    A failed or interrupted save never leaves a partial file under the final name and never touches a
    file already there. With `group` (from `atomic_group`) the rename waits until every file of the
    group is written. An OSError (disk full, read-only directory) becomes a CheckpointError. The temporary of a
    failed write is removed (tried twice, as a second Ctrl-C may interrupt it; one left is named, to remove); a
    Ctrl-C during that removal is raised, as a KeyboardInterrupt, once it is done, in place of the failure's error.
    """
    check_os_path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-",
                                   suffix="-" + os.path.basename(path))
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, _file_mode())
        if group is None:
            os.replace(tmp, path)
        else:
            group.append((tmp, path))
    except BaseException as e:
        interrupts = []
        left = _remove_temporaries([tmp], interrupts)      # a second Ctrl-C here: tried again, or named
        if left:
            raise CheckpointError(f"{path}: cannot write ({_why(e)}); {'; '.join(left)}") from None
        _raise_ctrl_c(e, interrupts, f"{path}: interrupted while removing the temporaries of a failed write "
                                     f"({_why(e)}); nothing was changed there")
        if isinstance(e, OSError):
            raise CheckpointError(f"{path}: cannot write ({e.strerror or e}); nothing was changed there") from None
        raise


class AtomicGroup(list):
    """The files of one save: atomic_open(path, group) appends (temporary, path) once a file is written;
    `delete(path)` adds a file that the save deletes (a stale shard index), as (None, path)."""

    def delete(self, path):
        self.append((None, path))


@contextlib.contextmanager
def atomic_group():
    """Write several files as one (a model's weights and its configs): all or nothing, as far as the file system
    allows.

    Each `atomic_open(path, group)` writes a temporary file beside its target; `group.delete(path)` marks a file
    for deletion. When the block ends, every target is checked (check_no_directory_at: no directory in the way,
    where a file is written or deleted; a directory at a written file's name also fails the rename: checked here,
    before any rename, the group changes nothing), then
    each existing target is renamed to a backup name in the same directory (`.old-<random>-<name>`) and its new
    file renamed into place. Only when every rename has succeeded are the backups deleted (a Ctrl-C there: the
    backup is tried once more and the rest removed, then a KeyboardInterrupt says the save completed and names any
    backup left). Any failure or interrupt
    (an OSError, KeyboardInterrupt, anything) on the way restores each backup to its name, removes the new files
    that had no predecessor and every temporary, so that every existing file is left byte-identical; an OSError
    becomes a CheckpointError naming the file that failed and saying that nothing was changed. A Ctrl-C during
    that undo does not stop it halfway: the step is tried once more and the rest undone; a step interrupted twice
    is named in a CheckpointError with the backup that holds the old file (or as a new file to remove). So is a
    temporary that a failure before the renames leaves (its removal interrupted twice). A Ctrl-C during the undo
    or that removal, once they are done, is raised as a KeyboardInterrupt saying nothing was changed, never
    swallowed into the failure's CheckpointError.

    Not atomic: a power loss or a kill -9 between two renames leaves some targets new and the rest old, with the
    old files under their `.old-*` names (rename them back); an error while restoring is reported by name with the
    backup that holds the old file. Readers that open the files during the renames may see a mix.
    """
    group = AtomicGroup()
    try:
        yield group
        for tmp, path in group:
            check_no_directory_at([path], deleting=tmp is None)
    except BaseException as e:
        interrupts = []
        left = _remove_temporaries([tmp for tmp, _ in group], interrupts)
        if left:
            raise CheckpointError(f"cannot write {', '.join(p for _, p in group)} ({_why(e)}): the files there are as "
                                  f"they were, but {'; '.join(left)}") from None
        _raise_ctrl_c(e, interrupts, f"interrupted while removing the temporaries of a failed write ({_why(e)}); "
                                     f"nothing was changed: {', '.join(p for _, p in group)} are as they were")
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write {', '.join(p for _, p in group)} ({e.strerror or e}); nothing was "
                                  "changed") from None
        raise
    _commit(group)


def _commit(group):
    """Rename a group's files into place, keeping the old ones until all succeeded (see atomic_group)."""
    plan = []                  # (temporary or None, target, backup name, whether the target existed)
    step = None
    try:                       # a Ctrl-C while the plan is made: its undo removes every temporary of the group too
        for tmp, path in group:
            step, (head, name) = path, os.path.split(path)
            plan.append((tmp, path, os.path.join(head, f".old-{secrets.token_hex(6)}-{name}"), os.path.lexists(path)))
        for tmp, path, backup, existed in plan:
            step = path
            if existed:
                os.replace(path, backup)          # the old file kept, under a name no reader looks for
            if tmp is not None:
                os.replace(tmp, path)
    except BaseException as e:
        interrupts = []                           # a second Ctrl-C, during the undo
        unrestored = _undo(plan, interrupts) + _remove_temporaries([tmp for tmp, _ in group[len(plan):]], interrupts)
        targets = _targets(group)
        why = _why(e)
        if unrestored:
            raise CheckpointError(f"cannot write {step} ({why}); undoing the save failed: {'; '.join(unrestored)}. "
                                  f"The other files of {targets} are as they were") from None
        if not isinstance(e, OSError):
            raise
        nothing = f"nothing was changed: {targets} in {os.path.dirname(step) or '.'} are as they were before the save"
        _raise_ctrl_c(e, interrupts, f"interrupted while undoing a failed save ({step}: {why}); {nothing}")
        raise CheckpointError(f"cannot write {step} ({why}); {nothing}") from None
    left, interrupts = [], []
    for _, _, backup, existed in plan:
        reason = _twice(lambda: os.unlink(backup) if existed and os.path.lexists(backup) else None, interrupts)
        if reason is not None:
            left.append(f"{backup} ({reason})")
    done = f"the new {_targets(group)} are in place"
    lost = f", but the old files kept during the save could not be removed: {'; '.join(left)}; remove them" \
        if left else ""
    if any(isinstance(i, KeyboardInterrupt) for i in interrupts):   # the save is complete: say so (a traceback
        raise KeyboardInterrupt(f"interrupted after the save completed: {done}{lost}") from None     # would not)
    if interrupts:
        raise interrupts[0]
    if left:
        raise CheckpointError(f"{done}{lost}")


def _twice(action, interrupts):
    """Run action(): None when it ran, else why not, in words: an OSError's, or "interrupted" when an exception
    of another kind (a Ctrl-C's KeyboardInterrupt) stopped it twice; each such exception is appended to
    `interrupts`, for the caller to raise once every file was tried. The clean-up after a save, the undo of a
    failed one and the removal of a failed write's temporaries run to the end this way, whatever a user's Ctrl-C
    interrupts."""
    for _attempt in range(2):
        try:
            action()
            return None
        except OSError as e:
            return str(e.strerror or e)
        except BaseException as e:   # noqa: BLE001 - the caller raises it once every file was tried
            interrupts.append(e)
    return "interrupted"


def _targets(group):
    """The file names of a group, for messages."""
    return ", ".join(os.path.basename(p) for _, p in group)


def _undo(plan, interrupts):
    """Put back what _commit changed, from what the file system holds; a sentence for each target that could not
    be restored (naming the backup that holds its old file, or, for a file the save created, that it is new), and
    each temporary that could not be removed. An
    interrupt (a second Ctrl-C) does not stop it halfway: the step is tried once more and the rest done (_twice);
    one interrupted twice is named."""
    unrestored = []
    for tmp, path, backup, existed in reversed(plan):
        reason = _twice(lambda: _restore(tmp, path, backup, existed), interrupts)
        if reason is not None and existed:
            unrestored.append(f"{path} could not be restored ({reason}): its previous file is {backup}, rename it "
                              "back")
        elif reason is not None:                                  # no backup: the save's new file is in the way
            unrestored.append(f"{path} is new (there was no file of that name before the save) and could not be "
                              f"removed ({reason}): remove it")
        unrestored += _remove_temporaries([tmp], interrupts)
    return unrestored


def _remove_temporaries(temporaries, interrupts):
    """Remove those of `temporaries` (paths, or None) that exist, each tried twice (_twice: a second Ctrl-C does not
    leave one behind unsaid, and is appended to `interrupts`); a sentence for each that could not be removed."""
    left = []
    for tmp in temporaries:
        reason = _twice(lambda: os.unlink(tmp) if tmp is not None and os.path.lexists(tmp) else None, interrupts)
        if reason is not None:
            left.append(f"the temporary {tmp} could not be removed ({reason}): remove it")
    return left


def _raise_ctrl_c(e, interrupts, message):
    """KeyboardInterrupt(message) when a Ctrl-C came during the clean-up after the failure `e` (in `interrupts`,
    from _twice: that step was tried again and done) and `e` is not itself an interrupt: the failure's own error (a
    CheckpointError) would swallow the user's Ctrl-C, and a caller that retries a failed save would go on."""
    if not isinstance(e, KeyboardInterrupt) and any(isinstance(i, KeyboardInterrupt) for i in interrupts):
        raise KeyboardInterrupt(message) from None


def _why(e):
    """An exception in words, for a message: an OSError's strerror, else its text, else its type's name (a
    KeyboardInterrupt's text is "")."""
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _restore(tmp, path, backup, existed):
    """One target of a commit plan as it was before the save (idempotent: it reads the file system)."""
    if existed and os.path.lexists(backup):
        os.replace(backup, path)                          # the old file back (over the new one if placed)
    elif not existed and tmp is not None and not os.path.lexists(tmp) and os.path.lexists(path):
        os.unlink(path)                                   # a new file where there was none


def atomic_write(path, data: bytes, group=None):
    with atomic_open(path, group) as f:
        f.write(data)


def save_file(tensors, path, metadata=None, group=None):
    """Write {name: array} as one safetensors file, streamed tensor by tensor, atomically (see atomic_open).

    Names are strings other than "__metadata__" (the header's key for the metadata: a tensor of that name
    was overwritten by it, and the file written was corrupt); arrays have a dtype of SAFETENSORS_DTYPES in
    either byte order (written little-endian, as the format says)."""
    if not isinstance(tensors, dict):
        raise CheckpointError(f"save_file takes a dict {{name: array}}, got {type(tensors).__name__}")
    arrays, header, offset = {}, {}, 0
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise CheckpointError(f"cannot save a tensor named {name!r}: names are strings, and '__metadata__' is "
                                  "the safetensors header's own key")
        arrays[name] = np.asarray(value)
    for name in sorted(arrays):
        arr = arrays[name]
        native = arr.dtype.newbyteorder("=")                               # '>f4' (big-endian) is F32 too
        if native not in DTYPE_NAMES:
            raise CheckpointError(f"cannot save tensor {name!r} of dtype {arr.dtype} as safetensors")
        header[name] = {"dtype": DTYPE_NAMES[native], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with atomic_open(path, group) as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name in sorted(arrays):
            arr = np.ascontiguousarray(arrays[name])
            f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
