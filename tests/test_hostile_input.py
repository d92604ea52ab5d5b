"""Hostile and broken input, fuzzed: every loader either loads correctly or raises a StableLmError.

The contract under test (errors.py): a failure caused by input raises a subclass of StableLmError
whose message names the file, key or value; any other exception escaping is a bug. A load that
succeeds must give exactly what the file holds, judged by an independent reader: the `safetensors`
library's own Rust parser (`safetensors.deserialize`). A failed load leaves every file untouched.

    make test   the fast subset (profile "hostile-fast", a few hundred cases, a few seconds)
    make fuzz   HYPOTHESIS_PROFILE=fuzz: >= 10,000 generated cases in all; the count is printed
"""

import collections
import copy
import functools
import hashlib
import json
import math
import os
import tempfile
import warnings

import ml_dtypes
import numpy as np
import pytest
import safetensors
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from stablelm_ref import StableLmForCausalLM, checkpoint
from stablelm_ref.errors import CheckpointError, ConfigError, GenerationError, StableLmError

from conftest import tiny_model

# ---- profiles: `make test` runs "hostile-fast"; `make fuzz` sets HYPOTHESIS_PROFILE=fuzz ----------------
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.filter_too_much])
settings.register_profile("fuzz", max_examples=2500, **_COMMON)
settings.register_profile("hostile-fast", max_examples=60, **_COMMON)
PROFILE = settings.get_profile("fuzz" if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else "hostile-fast")


def budget(share):
    """This test's share of the profile: share * max_examples cases (fuzz: 2500 * share)."""
    return settings(PROFILE, max_examples=max(1, int(PROFILE.max_examples * share)))


CASES = collections.Counter()  # cases run per test and outcome; printed at the end of the module


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    yield
    if CASES:
        total = sum(v for k, v in CASES.items() if ":" not in k)
        lines = [f"hostile-input fuzz cases run: {total}"] + [f"  {k}: {v}" for k, v in sorted(CASES.items())]
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line("\n" + "\n".join(lines))


# ---- the valid checkpoint every mutation starts from ----------------------------------------------------
# One layer with every optional tensor (qkv bias, per-head q/k LayerNorm, GQA, parallel residual), its
# tensors stored in all four float dtypes by turns, so mutations meet every code path of the reader.
FUZZ_CONFIG = dict(vocab_size=13, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=16, partial_rotary_factor=0.5,
                   use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=True)
STORE_DTYPES = (np.float64, np.float32, np.float16, ml_dtypes.bfloat16)
IDS = [[1, 5, 7, 12, 0]]
REF_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
              "U64": np.uint64, "U32": np.uint32, "U16": np.uint16}


def _golden(tmp):
    model = tiny_model(seed=7, **FUZZ_CONFIG)
    tensors = {name: value.astype(STORE_DTYPES[i % 4]) for i, (name, value) in enumerate(sorted(model.params.items()))}
    checkpoint.save_file(tensors, os.path.join(tmp, "model.safetensors"), {"format": "pt"})
    model.config.save_pretrained(tmp)
    with open(os.path.join(tmp, "model.safetensors"), "rb") as f:
        weights = f.read()
    with open(os.path.join(tmp, "config.json"), "rb") as f:
        config = f.read()
    return weights, config


@functools.lru_cache(maxsize=None)
def golden():
    """(model.safetensors bytes, config.json bytes, loaded float64 params, logits of IDS)."""
    with tempfile.TemporaryDirectory() as tmp:
        weights, config = _golden(tmp)
        model = StableLmForCausalLM.from_pretrained(tmp, dtype="float64")
    return weights, config, model.params, model(IDS).logits


CASE_DIR = []  # one scratch directory per module run (module-level, so hypothesis does not print it)


@pytest.fixture(scope="module", autouse=True)
def _case_dir(tmp_path_factory):
    CASE_DIR[:] = [str(tmp_path_factory.mktemp("case"))]
    yield


def case_dir():
    return CASE_DIR[0]


def snapshot(directory):
    """{file name: sha256} of a directory: a failed or successful load must change nothing."""
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
        else:
            out[name] = "<not a file>"
    return out


def write_case(directory, weights, config):
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    for name, data in (("model.safetensors", weights), ("config.json", config)):
        if data is not None:
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)


def reference_tensors(data):
    """The tensors as the safetensors library parses them (None where it refuses the file)."""
    try:
        parsed = safetensors.deserialize(data)
    except Exception:  # its refusal is all we need to know
        return None
    return {name: np.frombuffer(bytes(t["data"]), dtype=REF_DTYPES[t["dtype"]]).reshape(t["shape"])
            for name, t in parsed}


def load_or_error(directory, test):
    """Load; return the model or the StableLmError. Anything else escapes and fails the test."""
    before = snapshot(directory)
    try:
        model = StableLmForCausalLM.from_pretrained(directory, dtype="float64")
    except StableLmError as e:
        note(f"error: {e}")
        assert str(e).strip() and "\n" not in str(e).strip(), f"an error message must be one non-empty line: {e!r}"
        assert directory in str(e) or os.path.basename(directory) in str(e), f"message names no file: {e}"
        CASES[f"{test}:{type(e).__name__}"] += 1
        model = e
    else:
        CASES[f"{test}:loaded"] += 1
    assert snapshot(directory) == before, "the load changed the user's files"
    return model


def assert_loads_what_the_file_holds(model, weights, golden):
    """A loaded model holds exactly the tensors the reference parser reads; if those are the original
    tensors, its logits are the original logits bit for bit."""
    _, _, params0, logits0 = golden
    ref = reference_tensors(weights)
    assert ref is not None, "our loader accepted a file that the safetensors library refuses"
    assert set(model.params) <= set(ref)
    for name, value in model.params.items():
        np.testing.assert_array_equal(value, ref[name].astype(np.float64), err_msg=name)
    if all(np.array_equal(model.params[n], params0[n]) for n in params0):
        np.testing.assert_array_equal(model(IDS).logits, logits0)


# ---- mutations of a safetensors file -------------------------------------------------------------------

def split(weights):
    n = int.from_bytes(weights[:8], "little")
    return weights[8:8 + n], weights[8 + n:]


def assemble(header: bytes, data: bytes, length_delta=0):
    return (len(header) + length_delta).to_bytes(8, "little", signed=False) + header + data


def dump_pairs(pairs, sep, pad):
    """A JSON object from (key, value) pairs, duplicates kept, with chosen separators and padding."""
    item_sep, key_sep = sep
    body = item_sep.join(json.dumps(k) + key_sep + json.dumps(v, separators=sep) for k, v in pairs)
    return ("{" + body + "}" + pad).encode()


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                      st.text(max_size=6))
JSON_ANY = st.recursive(JSON_LEAF, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                          st.dictionaries(st.text(max_size=5), kids, max_size=3)),
                        max_leaves=8)
SIZE = st.one_of(st.integers(0, 40), st.integers(-3, -1), st.sampled_from([2**31, 2**32, 2**62, 2**63, 2**64, 2**80]))
DTYPE_VALUE = st.one_of(st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL",
                                         "U64", "F8_E4M3", "C64", "f32", "float32", ""]), JSON_LEAF)


@st.composite
def header_edit(draw, pairs):
    """One JSON-level edit of the header's (name, entry) pairs; returns the new pairs."""
    pairs = [(k, dict(v) if isinstance(v, dict) else v) for k, v in pairs]
    tensors = [i for i, (k, v) in enumerate(pairs) if k != "__metadata__" and isinstance(v, dict)]
    if not tensors:  # an earlier edit already broke every entry
        return pairs
    i = draw(st.sampled_from(tensors))
    name, info = pairs[i]
    edit = draw(st.sampled_from(["dtype", "shape", "shape_perturb", "offsets", "offsets_perturb", "offsets_swap",
                                 "remove", "add_copy", "duplicate", "rename", "extra_key", "drop_key", "entry",
                                 "metadata", "reorder"]))
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if (edit == "shape_perturb" and not (isinstance(shape, list) and all(type(s) is int for s in shape))) or \
            (edit in ("offsets_perturb", "offsets_swap") and not (isinstance(offsets, list) and len(offsets) == 2
                                                                   and all(type(o) is int for o in offsets))) or \
            (edit == "drop_key" and not info):
        edit = "dtype"  # the field this edit needs was already broken by an earlier edit
    note(f"header edit {edit} on {name!r}")
    if edit == "dtype":
        info["dtype"] = draw(DTYPE_VALUE)
    elif edit == "shape":
        info["shape"] = draw(st.one_of(st.lists(SIZE, max_size=4), JSON_ANY))
    elif edit == "shape_perturb":
        shape = list(info["shape"])
        how = draw(st.sampled_from(["reverse", "flatten", "add1", "drop", "dim"]))
        if how == "reverse":
            shape = shape[::-1]
        elif how == "flatten":
            shape = [math.prod(shape)]
        elif how == "add1":
            shape.insert(draw(st.integers(0, len(shape))), 1)
        elif how == "drop" and shape:
            shape.pop(draw(st.integers(0, len(shape) - 1)))
        elif shape:
            shape[draw(st.integers(0, len(shape) - 1))] += draw(st.integers(-3, 3))
        info["shape"] = shape
    elif edit == "offsets":
        info["data_offsets"] = draw(st.one_of(st.lists(SIZE, max_size=3), JSON_ANY))
    elif edit == "offsets_perturb":
        begin, end = info["data_offsets"]
        info["data_offsets"] = [begin + draw(st.integers(-9, 9)), end + draw(st.integers(-9, 9))]
    elif edit == "offsets_swap":
        other = pairs[draw(st.sampled_from(tensors))][1]
        info["data_offsets"], other["data_offsets"] = other.get("data_offsets"), info["data_offsets"]
    elif edit == "remove":
        pairs.pop(i)
    elif edit == "add_copy":
        pairs.append((draw(st.text(max_size=8)), dict(info)))
    elif edit == "duplicate":
        j = draw(st.sampled_from(tensors))
        pairs[i] = (pairs[j][0], info)
    elif edit == "rename":
        pairs[i] = (draw(st.one_of(st.text(max_size=12), st.just(name.removeprefix("model.")),
                                   st.just(name + " "), st.just(name.upper()))), info)
    elif edit == "extra_key":
        info[draw(st.text(max_size=5))] = draw(JSON_LEAF)
    elif edit == "drop_key":
        info.pop(draw(st.sampled_from(sorted(info))))
    elif edit == "entry":
        pairs[i] = (name, draw(JSON_ANY))
    elif edit == "metadata":
        pairs.append(("__metadata__", draw(JSON_ANY)))
    else:
        pairs = draw(st.permutations(pairs))
    return pairs


@st.composite
def mutated_checkpoint(draw, weights):
    """A valid file changed at the byte level, the JSON level, or (the control) only in header padding."""
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite", "length", "header",
                                 "header", "header", "padding", "not_json"]))
    header, data = split(weights)
    note(f"mutation {kind}")
    if kind == "flip":
        out = bytearray(weights)
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.one_of(st.integers(0, 7), st.integers(8, 8 + len(header) - 1),
                                 st.integers(0, len(weights) - 1)))
            out[pos] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if kind == "truncate":
        return weights[:draw(st.integers(0, len(weights) - 1))]
    if kind == "insert":
        pos = draw(st.integers(0, len(weights)))
        return weights[:pos] + draw(st.binary(min_size=1, max_size=16)) + weights[pos:]
    if kind == "delete":
        pos = draw(st.integers(0, len(weights) - 1))
        return weights[:pos] + weights[pos + draw(st.integers(1, 16)):]
    if kind == "overwrite":
        pos = draw(st.integers(0, len(weights) - 1))
        chunk = draw(st.binary(min_size=1, max_size=16))
        return weights[:pos] + chunk + weights[pos + len(chunk):]
    if kind == "length":
        n = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(len(header) - 9, len(header) + 9).filter(
            lambda v: v >= 0)))
        return n.to_bytes(8, "little") + weights[8:]
    if kind == "not_json":
        junk = draw(st.one_of(st.binary(max_size=64), st.just(b"[" * 100_000 + b"]" * 100_000),
                              st.just(b'{"a": ' * 50_000 + b"1" + b"}" * 50_000), st.just(b"\xef\xbb\xbf{}"),
                              st.just(b"{}"), st.just(b"null"), st.just(b'{"__metadata__": {"format": "pt"}}')))
        return assemble(junk, data)
    pairs = list(json.loads(header).items())
    if kind == "header":
        for _ in range(draw(st.integers(1, 3))):
            pairs = draw(header_edit(pairs))
    sep = draw(st.sampled_from([(",", ":"), (", ", ": "), (",\n  ", " : ")]))
    pad = draw(st.sampled_from(["", " ", " " * 7, "\n", "\t  "]))
    return assemble(dump_pairs(pairs, sep, pad), data)


@budget(2.6)
@given(data=st.data())
def test_mutated_checkpoint_loads_exactly_or_fails_cleanly(data):
    """Bit flips, truncations, insertions, deletions and header edits: each file either loads to
    exactly what the reference parser reads from it, or raises a StableLmError naming the file."""
    weights0, config0 = golden()[:2]
    weights = data.draw(mutated_checkpoint(weights0), label="file")
    CASES["checkpoint mutations"] += 1
    write_case(case_dir(), weights, config0)
    model = load_or_error(case_dir(), "checkpoint mutations")
    if not isinstance(model, StableLmError):
        assert_loads_what_the_file_holds(model, weights, golden())


def test_padding_only_mutation_loads_identically():
    """The control case of the fuzz oracle: padding changes nothing, so the logits are the original's."""
    weights0, config0, _, logits0 = golden()
    header, data = split(weights0)
    write_case(case_dir(), assemble(header + b"        ", data), config0)
    model = load_or_error(case_dir(), "control")
    np.testing.assert_array_equal(model(IDS).logits, logits0)


# ---- config.json edits ---------------------------------------------------------------------------------
CONFIG_VALUE = st.one_of(
    st.sampled_from([0, 1, 2, -1, 4, 8, 13, 16, 2**31, 2**63, 10**30, 0.5, 1.0, 1.5, 1e-5, 1e308, "8", "", True,
                     False, None, [], {}, [1], "silu", "gelu", "relu", "swiglu", "stablelm", "llama",
                     float("nan"), float("inf"), {"rope_type": "linear", "factor": 2.0},
                     {"rope_type": "dynamic", "factor": 4.0}, {"type": "yarn", "factor": 2.0},
                     {"0": "A", "1": "B"}, {"x": "A"}]),
    JSON_ANY)


@st.composite
def edited_config(draw, config):
    """config.json with 1-4 random edits: delete a key, set a known or new key, or break the JSON."""
    d = json.loads(config)
    keys = sorted(d) + ["rope_scaling", "rope_parameters", "id2label", "num_labels", "problem_type", "extra"]
    for _ in range(draw(st.integers(1, 4))):
        edit = draw(st.sampled_from(["delete", "set", "set", "set", "rope"]))
        key = draw(st.sampled_from(keys))
        if edit == "delete":
            d.pop(key, None)
        elif edit == "rope" and isinstance(d.get("rope_parameters"), dict):
            d["rope_parameters"][draw(st.sampled_from(["rope_type", "factor", "rope_theta",
                                                       "partial_rotary_factor"]))] = copy.deepcopy(draw(CONFIG_VALUE))
        else:
            # a copy: sampled_from hands out its own dict objects, which a later "rope" edit would mutate
            # (once into themselves: a circular config that json.dumps refuses, a failure of this test)
            d[key] = copy.deepcopy(draw(CONFIG_VALUE))
    note(f"config: {d}")
    text = json.dumps(d, allow_nan=True).encode()
    if draw(st.integers(0, 19)) == 0:  # now and then: not JSON at all
        text = text[:draw(st.integers(0, len(text) - 1))]
    return text


@budget(0.9)
@given(data=st.data())
def test_edited_config_loads_or_fails_cleanly(data):
    """Random config.json edits against the valid weights: a ConfigError or CheckpointError naming the
    file, or a model whose forward gives finite logits or a GenerationError."""
    weights0, config0 = golden()[:2]
    config = data.draw(edited_config(config0), label="config")
    CASES["config edits"] += 1
    write_case(case_dir(), weights0, config)
    model = load_or_error(case_dir(), "config edits")
    if isinstance(model, StableLmError):
        assert isinstance(model, (ConfigError, CheckpointError))
        return
    try:
        logits = model(IDS).logits
    except GenerationError as e:
        note(f"forward: {e}")
        return
    assert np.isfinite(logits).all()


# ---- the shard index -----------------------------------------------------------------------------------
SHARD_NAME = st.one_of(st.sampled_from(["model.safetensors", "./model.safetensors", "../model.safetensors",
                                        "/etc/passwd", "", ".", "..", "config.json", "sub/model.safetensors",
                                        "model.safetensors\x00", "model.safetensors/", "missing.safetensors",
                                        "model.safetensors.index.json"]),
                       st.text(max_size=12))


@budget(0.3)
@given(data=st.data())
def test_edited_shard_index_loads_or_fails_cleanly(data):
    """An index over the valid single file, with its weight map edited: shard names from the hostile
    list or random text, entries removed or added, or the whole index replaced by random JSON."""
    weights0, config0 = golden()[:2]
    names = sorted(json.loads(split(weights0)[0]))
    weight_map = {n: "model.safetensors" for n in names if n != "__metadata__"}
    for _ in range(data.draw(st.integers(0, 3))):
        edit = data.draw(st.sampled_from(["rename", "remove", "add"]))
        name = data.draw(st.sampled_from(sorted(weight_map) or ["x"]))
        if edit == "rename":
            weight_map[name] = data.draw(SHARD_NAME)
        elif edit == "remove":
            weight_map.pop(name, None)
        else:
            weight_map[data.draw(st.text(max_size=8))] = data.draw(SHARD_NAME)
    index = {"weight_map": weight_map} if data.draw(st.integers(0, 9)) else data.draw(JSON_ANY)
    CASES["index edits"] += 1
    write_case(case_dir(), weights0, config0)
    with open(os.path.join(case_dir(), "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    model = load_or_error(case_dir(), "index edits")
    if not isinstance(model, StableLmError):
        assert all(os.path.normpath(v) == "model.safetensors" for v in index["weight_map"].values())
        np.testing.assert_array_equal(model(IDS).logits, golden()[3])


# ---- runtime input -------------------------------------------------------------------------------------
VOCAB, MAX_POS = FUZZ_CONFIG["vocab_size"], FUZZ_CONFIG["max_position_embeddings"]
SCALAR = st.one_of(st.integers(-3, VOCAB + 3), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                   st.booleans(), st.none(), st.text(max_size=2))


def rows(element, max_batch=3, max_len=MAX_POS + 2):
    """Rectangular or ragged lists of lists, or a flat list."""
    rect = st.integers(1, max_batch).flatmap(lambda b: st.integers(0, max_len).flatmap(
        lambda t: st.lists(st.lists(element, min_size=t, max_size=t), min_size=b, max_size=b)))
    ragged = st.lists(st.lists(element, max_size=max_len), min_size=1, max_size=max_batch)
    return st.one_of(rect, rect, ragged, st.lists(element, max_size=max_len), element)


def as_array(draw, value):
    """Sometimes (one time in three) pass the same value as a NumPy array of a chosen dtype."""
    if draw(st.integers(0, 2)):
        return value
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():  # casts that wrap are part of the fuzz
            warnings.simplefilter("ignore")
            return np.asarray(value, dtype=draw(st.sampled_from([None, np.int64, np.int32, np.uint8, np.float32,
                                                                 np.bool_, object])))
    except (ValueError, TypeError, OverflowError):
        return value


def _rect(value):
    """(rows, shape) of a value as a [B, T] integer-like table, or None when it is not one."""
    arr = np.asarray(value, dtype=object) if not isinstance(value, np.ndarray) else value
    if isinstance(value, list) and value and all(isinstance(r, list) for r in value):
        if len({len(r) for r in value}) != 1:
            return None
    if arr.ndim == 1:
        arr = arr[None, :]
    return arr if arr.ndim == 2 else None


def is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def expected_valid(ids, mask, pos):
    """An independent statement of which inputs the model must accept."""
    if isinstance(ids, np.ndarray) and ids.dtype.kind not in "iu":
        return False
    a = _rect(ids)
    if a is None or a.size == 0 or not all(is_int(x) for x in a.flat) or \
            not all(0 <= int(x) < VOCAB for x in a.flat):
        return False
    b, t = a.shape
    if t > MAX_POS:
        return False
    if mask is not None:
        m = _rect(mask)
        if isinstance(mask, np.ndarray) and mask.dtype.kind not in "biuf":
            return False
        if m is None or m.shape != (b, t) or not all(
                isinstance(x, (bool, int, float, np.number, np.bool_)) and x in (0, 1) for x in m.flat):
            return False
    if pos is not None:
        p = np.asarray(pos, dtype=object) if not isinstance(pos, np.ndarray) else pos
        if isinstance(pos, np.ndarray) and pos.dtype.kind not in "iu":
            return False
        if _rect(pos) is None or p.shape not in ((b, t), (1, t), (t,)) or \
                not all(is_int(x) or isinstance(x, bool) for x in p.flat) or \
                not all(0 <= int(x) for x in p.flat):  # past the context is allowed (extrapolation)
            return False
    return True


@st.composite
def runtime_inputs(draw):
    """A valid (ids, mask, positions) triple, then (half the time) one of them replaced by anything."""
    b, t = draw(st.integers(1, 3)), draw(st.integers(1, MAX_POS))
    ids = draw(st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=t, max_size=t), min_size=b, max_size=b))
    mask = draw(st.one_of(st.none(), st.lists(st.lists(st.sampled_from([0, 1, 1]), min_size=t, max_size=t),
                                              min_size=b, max_size=b)))
    shape = draw(st.sampled_from([(b, t), (1, t), (t,)]))
    pos = draw(st.one_of(st.none(), st.just(np.arange(math.prod(shape)).reshape(shape) % MAX_POS)))
    which = draw(st.sampled_from(["none", "none", "none", "ids", "mask", "pos"]))
    note(f"corrupting {which}")
    if which == "ids":
        ids = draw(st.one_of(rows(st.integers(0, VOCAB - 1)), rows(SCALAR)))
    elif which == "mask":
        mask = draw(rows(st.sampled_from([0, 1, 1, 1, 2, -1, 0.5, float("nan"), True, None, "1"])))
    elif which == "pos":
        pos = draw(st.one_of(rows(st.integers(-2, MAX_POS + 1)), rows(SCALAR)))
    return [None if v is None else as_array(draw, v) for v in (ids, mask, pos)]


@functools.lru_cache(maxsize=None)
def fuzz_model():
    return tiny_model(seed=7, **FUZZ_CONFIG)


@budget(0.6)
@given(data=st.data())
def test_runtime_input_is_checked(data):
    """input_ids, attention_mask and position_ids of every kind: valid ones (by an independent
    predicate) give finite logits, all others a GenerationError; nothing else escapes."""
    ids, mask, pos = data.draw(runtime_inputs(), label="inputs")
    CASES["runtime input"] += 1
    valid = expected_valid(ids, mask, pos)
    try:
        logits = fuzz_model()(ids, attention_mask=mask, position_ids=pos).logits
    except GenerationError as e:
        note(f"error: {e}")
        CASES["runtime input:GenerationError"] += 1
        assert not valid, f"a valid input was refused: {e}"
        assert str(e).strip() and "\n" not in str(e)
        return
    CASES["runtime input:ran"] += 1
    assert valid, "an invalid input was accepted"
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=[[0, VOCAB]]), f"token id {VOCAB} is outside the vocabulary"),
    (dict(input_ids=[[-1, 3]]), "token id -1 is outside the vocabulary"),
    (dict(input_ids=[[]]), "empty"), (dict(input_ids=[]), "empty"), (dict(input_ids=None), "required"),
    (dict(input_ids=[[1.0, 2.0]]), "integers"), (dict(input_ids=[["a", "b"]]), "integers"),
    (dict(input_ids="hello"), "not text: tokenize the prompt first"),
    (dict(input_ids=[[1, 2], [3]]), "rows of equal length"),
    (dict(input_ids=[[2**70]]), f"token id {2**70} is outside"), (dict(input_ids=[[[1]]]), "\\[batch, seq_len\\]"),
    (dict(input_ids=[[1] * (MAX_POS + 1)]), f"the input has {MAX_POS + 1} tokens, more than the model's context"),
    (dict(input_ids=[[1, 2]], attention_mask=[[1, 1, 1]]), "attention_mask has shape \\(1, 3\\), expected \\(1, 2\\)"),
    (dict(input_ids=[[1, 2]], attention_mask=[1, 1]), "attention_mask has shape \\(2,\\)"),
    (dict(input_ids=[[1, 2]], attention_mask=[[1, 2]]), "only hold 0 .* and 1 .*, found 2"),
    (dict(input_ids=[[1, 2]], attention_mask=[[1, -1]]), "found -1"),
    (dict(input_ids=[[1, 2]], attention_mask=[[1, float("nan")]]), "found nan"),
    (dict(input_ids=[[1, 2]], attention_mask=[[1], [1, 1]]), "rectangular"),
    (dict(input_ids=[[1, 2]], position_ids=[[0, 1, 2]]), "position_ids has shape \\(1, 3\\), expected \\(1, 2\\)"),
    (dict(input_ids=[[1, 2]], position_ids=[[-1, 0]]), "position id -1 is negative"),
    (dict(input_ids=[[1, 2]], position_ids=[[0.0, 1.0]]), "position_ids must be integers"),
])
def test_runtime_input_errors_are_clear(kwargs, match):
    with pytest.raises(GenerationError, match=match):
        fuzz_model()(**kwargs)
