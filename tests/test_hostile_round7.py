"""Hostile input, round 7: a review of round 6's mends (the fast form's test of params, its copies, its making
under one lock, the save's clean-up under a Ctrl-C) and of the leads it left.

As before, each test names what a user did and checks the answer against what is true of the files, the numbers
or the words.
"""

import numpy as np
import pytest

from stablelm_ref.errors import CheckpointError
from stablelm_ref.trace import write_trace


# ---- class: advice that would do harm (a directory given as a trace's output) -----------------------------------

def test_a_directory_given_as_the_trace_s_output_is_named_as_one(tmp_path):
    """trace --out DIR: the message called the directory 'a model's weights or another file' and said 'remove it'
    (of --out /tmp, or of a model's directory). It says it is a directory, that a file name is wanted in it, and
    the directory is left as it was."""
    (tmp_path / "keep.txt").write_text("keep me")
    with pytest.raises(CheckpointError) as info:
        write_trace(tmp_path, {"a": np.zeros(2)})
    words = str(info.value)
    assert f"{tmp_path} is a directory" in words and str(tmp_path / "trace.safetensors") in words, words
    assert "remove" not in words and "another file" not in words, words
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"] and (tmp_path / "keep.txt").read_text() == "keep me"
