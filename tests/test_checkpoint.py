"""Checkpoint files, one hostile case at a time: each a CheckpointError naming the file, nothing executed,
nothing lost. (The random mutations of the same files are in test_hostile_input.py.)"""

import hashlib
import json
import os
import pickle
import sys
import tempfile
import time
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
import safetensors

from stablelm_ref import StableLmForCausalLM, bounded_io, checkpoint
from stablelm_ref.errors import CheckpointError

from conftest import VARIANTS, files_of, tiny_config, tiny_model

IDS = [[3, 1, 4, 1, 5]]


def raw_file(header, data=b""):
    head = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return len(head).to_bytes(8, "little") + head + data


@pytest.fixture
def saved(tmp_path):
    """A saved tiny model directory and its float64 logits on IDS."""
    model = tiny_model(seed=11)
    model.save_pretrained(tmp_path)
    return str(tmp_path), model(IDS).logits


def load_fails(directory, match):
    before = files_of(directory)
    with pytest.raises(CheckpointError, match=match) as info:
        StableLmForCausalLM.from_pretrained(directory, dtype="float64")
    assert files_of(directory) == before, "a failed load changed the directory"
    return str(info.value)


# ---- the file format ----------------------------------------------------------------------------------

def write_weights(directory, data):
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(data)


def test_truncated_files_fail_cleanly(saved):
    directory, _ = saved
    path = os.path.join(directory, "model.safetensors")
    with open(path, "rb") as f:
        good = f.read()
    n = int.from_bytes(good[:8], "little")
    cuts = sorted({0, 1, 7, 8, 9, 8 + n - 1, 8 + n, 8 + n + 1, len(good) - 1} | set(range(0, len(good), len(good) // 16)))
    for cut in cuts:
        write_weights(directory, good[:cut])
        message = load_fails(directory, "truncated|exceeds|not valid JSON|data ends|bytes after")
        assert "model.safetensors" in message


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, 10**9, 200 * 1024 * 1024])
def test_header_length_larger_than_the_file(saved, length):
    directory, _ = saved
    write_weights(directory, length.to_bytes(8, "little") + b"{}")
    load_fails(directory, "exceeds the file size")


@pytest.mark.parametrize("header, match", [
    (b"\xff\xfe not utf-8", "not valid JSON"),
    (b"{'single': 'quotes'}", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),           # RecursionError in json, found by the fuzzer
    (b"[]", "not a JSON object"), (b'"text"', "not a JSON object"), (b"null", "not a JSON object"),
    (b'{"x": [1, 2]}', "exactly dtype, shape and data_offsets"),
    (b'{"x": {"dtype": "F32", "shape": [1]}}', "exactly dtype, shape and data_offsets"),
    (b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}}', "exactly dtype"),
    (b'{"__metadata__": {"format": 1}}', "__metadata__ must be an object of strings"),
    (b'{"__metadata__": ["pt"]}', "__metadata__ must be an object of strings"),
])
def test_header_not_json_or_of_the_wrong_shape(tmp_path, header, match):
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_file(header, b"\0" * 4))
    with pytest.raises(CheckpointError, match=match):
        checkpoint.read_header(path)


@pytest.mark.parametrize("dtype", ["F8_E4M3", "C64", "U64", "f32", "float32", "", 3, None, ["F32"]])
def test_unknown_dtypes(tmp_path, dtype):
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_file({"x": {"dtype": dtype, "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8))
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        checkpoint.read_header(path)


@pytest.mark.parametrize("offsets_a, offsets_b, data_len, match", [
    ([0, 8], [4, 12], 12, "overlaps"),
    ([0, 8], [0, 8], 8, "overlaps"),
    ([0, 8], [12, 20], 20, "leaves a gap"),
    ([4, 12], [12, 20], 20, "leaves a gap"),
    ([0, 8], [8, 24], 16, "data ends at byte 24 but the file holds 16"),
    ([0, 8], [8, 17], 16, "data ends at byte 17 but the file holds 16 data bytes: the file is truncated"),  # 1 past
    ([0, 8], [8, 2**70], 16, "data ends at byte"),
    ([8, 0], [8, 16], 16, "0 <= begin <= end"),
    ([-8, 0], [0, 8], 16, "0 <= begin <= end"),
    ([0, 8.0], [8, 16], 16, "0 <= begin <= end"),
    ([0, True], [8, 16], 16, "0 <= begin <= end"),
    ([0], [8, 16], 16, "0 <= begin <= end"),
])
def test_offsets_that_overlap_leave_gaps_or_point_past_the_end(tmp_path, offsets_a, offsets_b, data_len, match):
    path = tmp_path / "model.safetensors"
    header = {"a": {"dtype": "U8", "shape": [8], "data_offsets": offsets_a},
              "b": {"dtype": "U8", "shape": [offsets_b[1] - offsets_b[0]], "data_offsets": offsets_b}}
    path.write_bytes(raw_file(header, b"\0" * data_len))
    with pytest.raises(CheckpointError, match=match):
        checkpoint.read_header(path)


def test_trailing_bytes_after_the_last_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12))
    with pytest.raises(CheckpointError, match="4 bytes after the last tensor"):
        checkpoint.read_header(path)


@pytest.mark.parametrize("shape", [[3], [2, 3], [], [0], [2**32, 2**32], [2**64], [2**70, 0], [-1, -2],
                                   [1.0, 2], [True], "2", None])
def test_shape_disagreeing_with_the_byte_range(tmp_path, shape):
    """[2**32, 2**32] has 2**64 elements: NumPy's int64 product wraps it to 0, which matched an empty
    byte range; the count is now exact (Python ints)."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_file({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]},
                               "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8))
    if shape in ([0], [2**70, 0]):  # an empty tensor really is 0 bytes
        entries, _, _ = checkpoint.read_header(path)
        assert entries["a"][1] == tuple(shape)
        return
    with pytest.raises(CheckpointError, match="needs|non-negative integers"):
        checkpoint.read_header(path)


def test_duplicate_names(tmp_path):
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_file(f'{{"a": {entry}, "a": {entry}}}'.encode(), b"\0" * 4))
    with pytest.raises(CheckpointError, match="duplicate key 'a'"):
        checkpoint.read_header(path)


def test_integer_weights_are_refused(saved):
    """An I64 tensor of the same byte size as the F64 original passes every header check; as weights it
    would make an integer model. Found by the header-edit fuzzer (dtype F64 -> I64)."""
    directory, _ = saved
    path = os.path.join(directory, "model.safetensors")
    with open(path, "rb") as f:
        good = f.read()
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + n])
    assert header["model.norm.weight"]["dtype"] == "F64"
    header["model.norm.weight"]["dtype"] = "I64"
    write_weights(directory, raw_file(header, good[8 + n:]))
    load_fails(directory, "'model.norm.weight' is stored as I64; model weights must be floating point")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e300])
def test_nan_and_inf_weights_are_an_error_naming_the_tensor(tmp_path, bad):
    """1e300 is finite in the F64 file but overflows to inf as float32: an error naming float32's range and
    dtype='float64'. The files are written directly: save_pretrained refuses non-finite weights itself."""
    model = tiny_model(seed=12)
    model.params["model.layers.1.mlp.up_proj.weight"][3, 5] = bad
    checkpoint.save_file(model.params, str(tmp_path / "model.safetensors"))
    model.config.save_pretrained(tmp_path)
    match = (r"'model.layers.1.mlp.up_proj.weight' holds 1 values beyond float32's range .*dtype='float64'"
             if bad == 1e300 else r"'model.layers.1.mlp.up_proj.weight' holds 1 NaN or Inf values \(as float32\)")
    with pytest.raises(CheckpointError, match=match):
        StableLmForCausalLM.from_pretrained(tmp_path, dtype="float32")
    if bad == 1e300:
        StableLmForCausalLM.from_pretrained(tmp_path, dtype="float64")  # representable: loads


def test_load_state_dict_in_bfloat16_refuses_what_bfloat16_cannot_hold(tmp_path):
    """bfloat16 (ml_dtypes: NumPy kind "V", not "f") is checked like the other float dtypes: 1e300 from an F64
    file became inf, silently, when load_state_dict cast to it. bfloat16 holds float32's range (3.39e38)."""
    checkpoint.save_file({"w": np.array([1.0, 3e38, 1e300])}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'w' holds 1 values beyond bfloat16's range \(largest "
                                              r"magnitude 1e\+300\); load it with dtype='float64'"):
        checkpoint.load_state_dict(tmp_path, checkpoint.SAFETENSORS_DTYPES["BF16"])
    checkpoint.save_file({"w": np.array([1.0, 3e38, np.nan])}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'w' holds 1 NaN or Inf values \(as bfloat16\); its logits"):
        checkpoint.load_state_dict(tmp_path, checkpoint.SAFETENSORS_DTYPES["BF16"])
    checkpoint.save_file({"w": np.array([1.0, 3e38])}, str(tmp_path / "model.safetensors"))
    bf16 = checkpoint.SAFETENSORS_DTYPES["BF16"]
    assert checkpoint.load_state_dict(tmp_path, bf16)["w"][1] == np.float64(3e38).astype(bf16)


def test_a_pickle_renamed_to_model_safetensors_is_never_unpickled(tmp_path, monkeypatch):
    model = tiny_model(seed=13)
    model.config.save_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps(_Exploit(str(marker)), protocol=4))
    _forbid_unpickling(monkeypatch)
    load_fails(str(tmp_path), "exceeds the file size|not valid JSON")
    assert not marker.exists()


# ---- pickle-only directories ----------------------------------------------------------------------------

class _Exploit:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _forbid_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the loader tried to unpickle a file")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    if "torch" in sys.modules:
        monkeypatch.setattr(sys.modules["torch"], "load", refuse)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.ckpt"])
def test_pickle_only_directory_is_refused_without_opening_it(tmp_path, monkeypatch, name):
    tiny_config().save_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / name).write_bytes(pickle.dumps(_Exploit(str(marker)), protocol=4))
    # the exploit works: unpickling really would create the marker
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Exploit(str(probe))))
    assert probe.exists()
    probe.unlink()
    _forbid_unpickling(monkeypatch)
    message = load_fails(str(tmp_path), "pickle format that runs code when opened; it is refused")
    assert name in message and "safetensors" in message
    assert not marker.exists()


# ---- sharded checkpoints --------------------------------------------------------------------------------

def shard(directory, model, names_per_shard=None):
    """Save `model` as two shards + index in `directory`; returns the index dict."""
    names = sorted(model.params)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        checkpoint.save_file({n: model.params[n] for n in part}, os.path.join(directory, fname))
        weight_map.update({n: fname for n in part})
    index = {"metadata": {}, "weight_map": weight_map}
    write_index(directory, index)
    model.config.save_pretrained(directory)
    return index


def write_index(directory, index):
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)


def test_sharded_round_trip(tmp_path):
    model = tiny_model(seed=14)
    shard(tmp_path, model)
    again = StableLmForCausalLM.from_pretrained(tmp_path, dtype="float64")
    np.testing.assert_array_equal(again(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("entry", ["from_pretrained", "load_state_dict"])
def test_each_header_is_read_once(tmp_path, monkeypatch, layout, entry):
    """Listing the names (checkpoint_files) and loading the tensors share one parse of each file's header."""
    model = tiny_model(seed=14)
    if layout == "single":
        model.save_pretrained(tmp_path)
    else:
        shard(tmp_path, model)
    reads = []
    real = checkpoint.read_header
    monkeypatch.setattr(checkpoint, "read_header", lambda path, root=None: reads.append(path) or real(path, root))
    if entry == "from_pretrained":
        again = StableLmForCausalLM.from_pretrained(tmp_path, dtype="float64").params
    else:
        again = checkpoint.load_state_dict(tmp_path, np.float64)
    assert len(set(reads)) == len(reads) == (1 if layout == "single" else 2), reads
    assert all(np.array_equal(again[n], model.params[n]) for n in model.params)


def test_missing_shard(tmp_path):
    model = tiny_model(seed=14)
    shard(tmp_path, model)
    os.unlink(tmp_path / "model-00002-of-00002.safetensors")
    load_fails(str(tmp_path), "names shard 'model-00002-of-00002.safetensors', which is missing")


@pytest.mark.parametrize("evil", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors",
                                  "..", "", "a\x00b.safetensors", "sub/model.safetensors"])
def test_shard_names_outside_the_model_directory(tmp_path, evil):
    inside = tmp_path / "model"
    inside.mkdir()
    model = tiny_model(seed=14)
    index = shard(inside, model)
    checkpoint.save_file(model.params, str(tmp_path / "outside.safetensors"))
    index["weight_map"] = {n: evil for n in index["weight_map"]}
    write_index(inside, index)
    load_fails(str(inside), "not a plain file name in the model directory")


def test_symlinked_shard_pointing_outside_is_refused(tmp_path):
    inside = tmp_path / "model"
    inside.mkdir()
    model = tiny_model(seed=14)
    shard(inside, model)
    target = tmp_path / "elsewhere.safetensors"
    os.replace(inside / "model-00002-of-00002.safetensors", target)
    os.symlink(target, inside / "model-00002-of-00002.safetensors")
    load_fails(str(inside), "outside the model directory; refused")
    # the single-file layout is held to the same rule
    os.unlink(inside / "model.safetensors.index.json")
    os.symlink(target, inside / "model.safetensors")
    load_fails(str(inside), "outside the model directory; refused")


def test_hugging_face_cache_layout_is_allowed(tmp_path):
    """The Hub cache keeps files in <repo>/blobs/ and links them from <repo>/snapshots/<rev>/: that is
    not 'outside'. Before the fix, sharded models in the Hub cache were refused."""
    repo = tmp_path / "models--stabilityai--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    staging = tmp_path / "staging"
    for d in (snap, blobs, staging):
        d.mkdir(parents=True)
    model = tiny_model(seed=15)
    shard(staging, model)
    for name in os.listdir(staging):
        blob = blobs / hashlib.sha256(name.encode()).hexdigest()
        os.replace(staging / name, blob)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    again = StableLmForCausalLM.from_pretrained(snap, dtype="float64")
    np.testing.assert_array_equal(again(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("index, match", [
    (b"not json", "not a valid shard index"),
    (b"[]", "not a valid shard index"),
    (b'{"weight_map": [1]}', "not a valid shard index"),
    (b'{"weight_map": {"a": 1}}', "not a valid shard index"),
    (b'{"metadata": {}}', "not a valid shard index"),
    (b'{"weight_map": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not a valid shard index"),
])
def test_broken_index(tmp_path, index, match):
    model = tiny_model(seed=14)
    shard(tmp_path, model)
    (tmp_path / "model.safetensors.index.json").write_bytes(index)
    load_fails(str(tmp_path), match)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    model = tiny_model(seed=14)
    index = shard(tmp_path, model)
    name = "model.norm.weight"
    index["weight_map"][name] = next(f for n, f in index["weight_map"].items() if f != index["weight_map"][name])
    write_index(tmp_path, index)
    load_fails(str(tmp_path), f"says it holds '{name}' but it does not")


# ---- configs that do not fit the weights or the machine -------------------------------------------------

@pytest.mark.parametrize("overrides", [
    dict(num_hidden_layers=10**9), dict(num_hidden_layers=2**62),
    dict(num_attention_heads=2**30, hidden_size=2**36, num_key_value_heads=2**30, qk_layernorm=True),
    dict(vocab_size=10**12), dict(hidden_size=2**40, num_attention_heads=2**34, num_key_value_heads=2**34),
    dict(intermediate_size=10**15),
])
def test_absurd_sizes_fail_before_allocating(saved, overrides):
    """Checked against the checkpoint's header: fails in well under a second, with a small peak of memory."""
    directory, _ = saved
    config = json.load(open(os.path.join(directory, "config.json")))
    config.update(overrides)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        load_fails(directory, "does not match the weights|config implies|is missing")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - start < 2.0
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_tensor_count_bound_matches_expected_shapes(variant):
    """The closed-form count that refuses absurd configs is a true lower bound of expected_shapes."""
    config = tiny_config(**VARIANTS[variant])
    n = len(checkpoint.expected_shapes(config, "base"))
    assert len(checkpoint.expected_shapes(config, "base", limit=n)) == n
    with pytest.raises(CheckpointError, match="does not match the weights"):
        checkpoint.expected_shapes(config, "base", limit=n - 1)


def test_weights_larger_than_free_memory_fail_before_reading(saved, monkeypatch):
    directory, _ = saved
    monkeypatch.setattr(bounded_io, "available_memory", lambda: 10 * 4096)
    monkeypatch.setattr(checkpoint, "read_tensor", lambda *a, **k: pytest.fail("read a tensor before the check"))
    message = load_fails(directory, "of memory is free")
    assert "weights as float64 needs" in message


# ---- writing: nothing partial, nothing clobbered --------------------------------------------------------

class _FailingFile:
    """A file object that writes `budget` bytes, then fails like a full disk."""

    def __init__(self, f, budget):
        self.f, self.budget = f, budget

    def write(self, data):
        if len(data) > self.budget:
            self.f.write(bytes(data[:self.budget]))
            raise OSError(28, "No space left on device")
        self.budget -= len(data)
        return self.f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


@pytest.mark.parametrize("failing, budget", [("model.safetensors", 0), ("model.safetensors", 100),
                                             ("model.safetensors", 5000), ("config.json", 0), ("config.json", 100),
                                             ("model.safetensors", 10**9)])
def test_failed_save_leaves_no_partial_file_and_keeps_the_old_model(tmp_path, monkeypatch, budget, failing):
    old = tiny_model(seed=16)
    old.save_pretrained(tmp_path)
    before = files_of(tmp_path)
    new = tiny_model(seed=17, **VARIANTS["1_6b"])
    real_mkstemp, real_fdopen, temp_names = tempfile.mkstemp, os.fdopen, {}

    def mkstemp(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        temp_names[fd] = path
        return fd, path

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        return _FailingFile(f, budget) if temp_names.get(fd, "").endswith(failing) else f

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "fdopen", fdopen)
    if budget == 10**9:  # enough room: the save succeeds and replaces both files
        new.save_pretrained(tmp_path)
        monkeypatch.undo()
        again = StableLmForCausalLM.from_pretrained(tmp_path, dtype="float64")
        np.testing.assert_array_equal(again(IDS).logits, new(IDS).logits)
        return
    with pytest.raises(CheckpointError, match=f"{failing}: cannot write .No space left on device"):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert files_of(tmp_path) == before, "a failed save changed or left files"
    again = StableLmForCausalLM.from_pretrained(tmp_path, dtype="float64")
    np.testing.assert_array_equal(again(IDS).logits, old(IDS).logits)


def test_save_interrupted_by_any_exception_leaves_nothing(tmp_path, monkeypatch):
    """Not only OSError: an exception from the array code midway (here a KeyboardInterrupt) cleans up."""
    model = tiny_model(seed=18)
    calls = []
    real = np.ascontiguousarray

    def third_tensor_interrupts(a, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(a, *args, **kwargs)

    monkeypatch.setattr(np, "ascontiguousarray", third_tensor_interrupts)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    assert len(calls) == 3 and os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_directory(tmp_path):
    os.chmod(tmp_path, 0o555)
    try:
        with pytest.raises(CheckpointError, match="cannot write"):
            tiny_model().save_pretrained(tmp_path)
        assert os.listdir(tmp_path) == []
    finally:
        os.chmod(tmp_path, 0o755)


def test_output_path_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="cannot create the output directory"):
        tiny_model().save_pretrained(tmp_path / "file")


def test_saved_files_get_the_usual_mode_not_mkstemps_0600(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask


def test_save_round_trip_is_byte_exact_in_every_dtype(tmp_path):
    """Our writer and reader against the safetensors library's parser, in every float dtype."""
    tensors = {f"t.{np.dtype(d).name}": (np.arange(12).reshape(3, 4) / 7).astype(d)
               for d in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16)}
    path = str(tmp_path / "x.safetensors")
    checkpoint.save_file(tensors, path, {"format": "pt"})
    entries, metadata, start = checkpoint.read_header(path)
    assert metadata == {"format": "pt"}
    with open(path, "rb") as f:
        theirs = dict(safetensors.deserialize(f.read()))
    for name, arr in tensors.items():
        got = checkpoint.read_tensor(path, entries[name], start)
        assert got.dtype == arr.dtype and got.shape == arr.shape and got.tobytes() == arr.tobytes()
        assert bytes(theirs[name]["data"]) == arr.tobytes() and theirs[name]["shape"] == [3, 4]


def test_a_file_one_byte_short_is_called_truncated(saved):
    """The last tensor ending one byte past the data is a truncated file, said so (an off-by-one in the
    end check would still fail the load, but as '-1 bytes after the last tensor')."""
    directory, _ = saved
    path = os.path.join(directory, "model.safetensors")
    with open(path, "rb") as f:
        good = f.read()
    data_len = len(good) - 8 - int.from_bytes(good[:8], "little")
    write_weights(directory, good[:-1])
    message = load_fails(directory, "data ends")
    assert f"data ends at byte {data_len} but the file holds {data_len - 1} data bytes: the file is truncated" \
        in message


def _bfloat16_bits_rounded_to_nearest_even(x):
    """float32 -> bfloat16 bit patterns by integer arithmetic (finite values): keep the high 16 bits, adding
    half of the dropped 16 (0x7FFF) plus the kept part's last bit, so that ties go to the even neighbour."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def test_save_pretrained_in_bfloat16_rounds_to_nearest_even(tmp_path):
    """Read back with the safetensors library: every stored bfloat16 equals round-to-nearest-even of the
    float32 weight (truncation differs in about half of them, and at every tie below)."""
    model = tiny_model(seed=12, dtype="float32")
    n = model.params["model.norm.bias"].size
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF, 0x3F807FFF, 0x3F800001], np.uint32)
    model.params["model.norm.bias"] = np.resize(ties, n).view(np.float32)   # halfway cases, even and odd
    model.save_pretrained(tmp_path, dtype="bfloat16")
    with open(tmp_path / "model.safetensors", "rb") as f:
        stored = dict(safetensors.deserialize(f.read()))
    for name, value in model.params.items():
        assert stored[name]["dtype"] == "BF16"
        got = np.frombuffer(bytes(stored[name]["data"]), dtype="<u2").reshape(value.shape)
        np.testing.assert_array_equal(got, _bfloat16_bits_rounded_to_nearest_even(value), err_msg=name)
    tie_bits = np.frombuffer(bytes(stored["model.norm.bias"]["data"]), dtype="<u2")[:6]
    assert tie_bits.tolist() == [0x3F80, 0x3F82, 0xBF80, 0x3F81, 0x3F80, 0x3F80]


# ---- tied embeddings: config.json's tie_word_embeddings and a checkpoint's lm_head.weight ----------------

def _tied_checkpoint(directory, lm_head):
    """A tied tiny model saved with `lm_head` as its lm_head.weight (None: none saved); the model back."""
    model = tiny_model(seed=12, dtype="float32", tie_word_embeddings=True)
    tensors = dict(model.params) if lm_head is None else {**model.params, "lm_head.weight": lm_head(model)}
    checkpoint.save_file(tensors, str(directory / "model.safetensors"))
    model.config.save_pretrained(directory)
    return model


@pytest.mark.parametrize("lm_head", [None, lambda m: m.params["model.embed_tokens.weight"].copy(),
                                     lambda m: m.params["model.embed_tokens.weight"].astype(np.float64)],
                         ids=["absent", "equal", "equal-in-float64"])
def test_a_tied_checkpoint_without_an_lm_head_or_with_a_copy_loads(tmp_path, lm_head):
    """Either way the logits are the embedding's, exactly those of the model saved (the same float32 weights)."""
    model = _tied_checkpoint(tmp_path, lm_head)
    back = StableLmForCausalLM.from_pretrained(tmp_path)
    assert "lm_head.weight" not in back.params                       # the copy is checked, then dropped
    np.testing.assert_array_equal(back(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("lm_head, match", [
    (lambda m: m.params["model.embed_tokens.weight"] * np.float32(1 + 2**-20), "lm_head.weight differs"),
    (lambda m: np.where(np.arange(m.params["model.embed_tokens.weight"].size).reshape(
        m.params["model.embed_tokens.weight"].shape) == 0, np.nan, m.params["model.embed_tokens.weight"]),
     "'lm_head.weight' holds 1 NaN or Inf"),
    (lambda m: m.params["model.embed_tokens.weight"][:-1], r"'lm_head.weight' has shape \(100, 64\) in the checkpoint"
                                                           r" but the config implies \(101, 64\)"),
], ids=["differing", "nan", "shape"])
def test_a_tied_checkpoint_whose_lm_head_is_not_the_embedding_is_refused(tmp_path, lm_head, match):
    _tied_checkpoint(tmp_path, lm_head)
    load_fails(str(tmp_path), match)


def test_models_without_an_lm_head_skip_a_causal_lms(tmp_path):
    """The bare model and the classifiers do not use lm_head.weight: any one (untied, even not the embedding
    with a tied config) is skipped, as transformers skips it."""
    from stablelm_ref import StableLmModel

    model = _tied_checkpoint(tmp_path, lambda m: m.params["model.embed_tokens.weight"] + np.float32(0.5))
    base = StableLmModel.from_pretrained(tmp_path)
    assert "lm_head.weight" not in base.params
    np.testing.assert_array_equal(base(IDS).last_hidden_state, model(IDS, output_hidden_states=True).hidden_states[-1])


@pytest.mark.parametrize("cls_name", ["StableLmForSequenceClassification", "StableLmForTokenClassification"])
def test_a_classifier_from_a_checkpoint_without_its_head_says_so(tmp_path, cls_name):
    """A causal-LM checkpoint (the default model, a published base model) has no score head: loading it into a
    classifier names the missing head and what to load instead, not 'does config.json match it?'."""
    import stablelm_ref

    tiny_model(seed=2).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"has no classification head \('score\.weight'[^)]* missing\): it holds a "
                                              r"base or causal-LM model; load it with StableLmForCausalLM"):
        getattr(stablelm_ref, cls_name).from_pretrained(tmp_path)


# ---- a save is all or nothing: every target checked first, the old files kept until every rename succeeded ------

SAVED = ("model.safetensors", "config.json", "generation_config.json")


def _old_checkpoint(directory, index=False):
    """A saved tiny model in `directory` (with a stale shard index when `index`); {name: sha256} of it."""
    tiny_model(seed=16).save_pretrained(directory)
    if index:
        (directory / checkpoint.INDEX_NAME).write_text('{"weight_map": {}}')
    return files_of(directory)


@pytest.mark.parametrize("target", SAVED)
def test_a_directory_in_the_way_of_any_file_changes_nothing(tmp_path, target):
    """Before: the weights and config.json were replaced, then the rename onto the directory failed; the message
    listed all three files as not written. Now every target is checked before anything is written."""
    before = _old_checkpoint(tmp_path)
    os.unlink(tmp_path / target)
    (tmp_path / target).mkdir()
    (tmp_path / target / "keep").write_text("x")
    before = files_of(tmp_path)
    with pytest.raises(CheckpointError, match=f"{target} is a directory: a file cannot replace it.*Nothing was"):
        tiny_model(seed=17, **VARIANTS["1_6b"]).save_pretrained(tmp_path, dtype="float32")
    assert files_of(tmp_path) == before and sorted(os.listdir(tmp_path)) == sorted(before.keys() - {f"{target}/keep"}
                                                                                  | {target})


def test_a_directory_at_the_shard_index_the_save_deletes_is_named_as_such(tmp_path):
    """The save deletes a stale model.safetensors.index.json; a directory of that name is refused before anything
    is written, by a message about deleting it (it said "a file cannot replace it", though no file was to)."""
    before = _old_checkpoint(tmp_path)
    (tmp_path / checkpoint.INDEX_NAME).mkdir()
    (tmp_path / checkpoint.INDEX_NAME / "keep").write_text("x")
    before = files_of(tmp_path)
    with pytest.raises(CheckpointError, match=f"{checkpoint.INDEX_NAME} is a directory: the save deletes the file of "
                                              "this name; remove or rename it. Nothing was written"):
        tiny_model(seed=17).save_pretrained(tmp_path)
    assert files_of(tmp_path) == before and not any(n.startswith(".") for n in os.listdir(tmp_path))


def test_a_group_refuses_a_directory_in_the_way_before_any_rename(tmp_path):
    """atomic_group's own check, for any caller (save_pretrained also checks up front): a directory at one
    target's name leaves the other target as it was."""
    (tmp_path / "a").write_bytes(b"old")
    (tmp_path / "b").mkdir()
    with pytest.raises(CheckpointError, match="b is a directory: a file cannot replace it"):
        with checkpoint.atomic_group() as group:
            checkpoint.atomic_write(str(tmp_path / "a"), b"new", group)
            checkpoint.atomic_write(str(tmp_path / "b"), b"new", group)
    assert (tmp_path / "a").read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["a", "b"]


def _replace_failing_at(monkeypatch, failing, exception):
    """os.replace raising `exception` on the calls numbered in `failing` (from 1), the real one otherwise."""
    calls, real = [], os.replace

    def replace(src, dst, **kwargs):
        calls.append((src, dst))
        if len(calls) in failing:
            raise exception
        return real(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return calls


# The renames of a save over an existing checkpoint with a stale index: per target, the old file to its backup
# (odd calls), then the new file into place (even calls); the index has only the first. Calls 8.. are the undo's.
@pytest.mark.parametrize("exception", [OSError(5, "Input/output error"), KeyboardInterrupt()],
                         ids=["OSError", "KeyboardInterrupt"])
@pytest.mark.parametrize("failing", [1, 2, 3, 4, 5, 6, 7])
def test_a_rename_failing_midway_restores_every_file(tmp_path, monkeypatch, failing, exception):
    before = _old_checkpoint(tmp_path, index=True)
    new = tiny_model(seed=17, **VARIANTS["1_6b"])
    calls = _replace_failing_at(monkeypatch, {failing}, exception)
    with pytest.raises(CheckpointError if isinstance(exception, OSError) else KeyboardInterrupt) as info:
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert len(calls) >= failing
    assert files_of(tmp_path) == before, "a failed save changed a file or left a temporary"
    if isinstance(exception, OSError):
        assert "Input/output error" in str(info.value) and "nothing was changed" in str(info.value)
        assert all(name in str(info.value) for name in SAVED + (checkpoint.INDEX_NAME,))


@pytest.mark.parametrize("failing", [1, 2, 3])
def test_a_failed_save_into_a_new_directory_leaves_it_as_it_was(tmp_path, monkeypatch, failing):
    """Targets that did not exist (one rename each): the undo removes the new files already in place."""
    (tmp_path / "notes.txt").write_text("keep me")
    calls = _replace_failing_at(monkeypatch, {failing}, OSError(5, "Input/output error"))
    with pytest.raises(CheckpointError, match="nothing was changed"):
        tiny_model(seed=17).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert len(calls) >= failing
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_an_undo_that_fails_names_the_backup_that_holds_the_old_file(tmp_path, monkeypatch):
    """The 4th rename (the new config.json into place) fails, and so does every rename after it: config.json's
    and the weights' old files cannot be renamed back. The message names both backups; they hold the old bytes."""
    before = _old_checkpoint(tmp_path)
    _replace_failing_at(monkeypatch, set(range(4, 100)), OSError(5, "Input/output error"))
    with pytest.raises(CheckpointError, match="undoing the save failed") as info:
        tiny_model(seed=17).save_pretrained(tmp_path)
    monkeypatch.undo()
    backups = {name: (tmp_path / name) for name in os.listdir(tmp_path) if name.startswith(".old-")}
    assert len(backups) == 2 and all(str(path) in str(info.value) for path in backups.values())
    for name, path in backups.items():
        original = name.split("-", 2)[2]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before[original]
        assert f"{tmp_path / original} could not be restored" in str(info.value)


def test_an_old_file_that_cannot_be_removed_after_a_save_is_named(tmp_path, monkeypatch):
    """Every rename succeeded (the new files are in place) but deleting a backup fails: said, by name."""
    _old_checkpoint(tmp_path)
    real = os.unlink

    def unlink(path, *args, **kwargs):
        if os.path.basename(path).startswith(".old-") and os.path.basename(path).endswith("config.json"):
            raise OSError(1, "Operation not permitted")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    new = tiny_model(seed=17)
    with pytest.raises(CheckpointError, match=r"the new model.safetensors, config.json, generation_config.json are in "
                                              r"place, but .*\.old-\w+-config.json \(Operation not permitted\)"):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    again = StableLmForCausalLM.from_pretrained(tmp_path, dtype="float64")
    np.testing.assert_array_equal(again(IDS).logits, new(IDS).logits)
