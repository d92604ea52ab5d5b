"""Hostile input, round 3: classes of failure the first two rounds did not reach, one section per class.

Each test states the class, then checks that the input gets a StableLmError naming what is wrong (never a
traceback from deep inside NumPy, jinja2 or the tokenizers library, never a silent wrong answer) and that
nothing is lost: no file replaced or left behind that would load something else than what was saved.
"""

import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from stablelm_ref import StableLmForCausalLM, checkpoint
from stablelm_ref.errors import CheckpointError
from stablelm_ref.trace import TRACE_FORMAT, read_trace, write_trace


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_tokenizer import tiny_tokenizer_dir

    path = str(tmp_path_factory.mktemp("m3") / "model")
    tiny_model(seed=5, dtype="float32", vocab_size=320, max_position_embeddings=64).save_pretrained(path)
    tiny_tokenizer_dir(path)
    return path


def copy_of(model_dir, tmp_path, name="copy"):
    path = str(tmp_path / name)
    shutil.copytree(model_dir, path)
    return path


def files_of(directory):
    """{name: bytes} of every file in a directory: what 'nothing was changed' compares."""
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


# ---- class: an output path that names a file of another kind (trace --out over a model's weights) --------

def test_trace_out_never_replaces_a_file_that_is_not_a_trace(model_dir, tmp_path):
    """`stablelm-ref trace --out DIR/model.safetensors` replaced the model's weights with the trace (seen:
    the directory then failed to load). Any existing file that is not a trace is kept, the command exits 2."""
    from stablelm_ref.cli import main

    directory = copy_of(model_dir, tmp_path)
    before = files_of(directory)
    for name in sorted(before):
        assert main(["trace", "--model", directory, "--ids", "1,2", "--out", os.path.join(directory, name)]) == 2
    assert files_of(directory) == before
    StableLmForCausalLM.from_pretrained(directory)                           # still loads


def test_a_trace_may_replace_a_trace_and_only_a_trace(tmp_path):
    path = tmp_path / "t.safetensors"
    write_trace(path, {"a": np.zeros(2)})
    write_trace(path, {"b": np.ones(3)})                                     # a trace over a trace: replaced
    trace, meta = read_trace(path)
    assert list(trace) == ["b"] and meta["format"] == TRACE_FORMAT
    other = tmp_path / "weights.safetensors"
    checkpoint.save_file({"w": np.ones(2, np.float32)}, str(other))          # safetensors, but not a trace
    text = tmp_path / "notes.txt"
    text.write_text("keep me")
    for path in (other, text):
        before = path.read_bytes()
        with pytest.raises(CheckpointError, match="not a stablelm-ref trace"):
            write_trace(path, {"a": np.zeros(2)})
        assert path.read_bytes() == before
    with pytest.raises(CheckpointError, match="output path"):
        write_trace(None, {"a": np.zeros(2)})
