"""Paths that are valid Python strings but that the operating system cannot take (a NUL character, a lone
surrogate the file system's encoding cannot write): every writer refuses them with a CheckpointError naming the
path, and writes nothing, where Python raised ValueError / UnicodeEncodeError from inside os.makedirs or tempfile."""

import os

import numpy as np
import pytest

from stablelm_ref.errors import CheckpointError
from stablelm_ref.trace import write_trace

from conftest import tiny_model

BAD = {"a NUL character": ("a\x00b", "a path cannot hold a NUL character"),
       "a lone surrogate": ("\ud800dir", "the path cannot be encoded for the file system")}


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("writer", ["model", "config", "generation_config", "trace"])
def test_paths_the_os_cannot_take_are_refused_by_every_writer(tmp_path, case, writer):
    name, message = BAD[case]
    model = tiny_model(seed=1)
    path = os.path.join(tmp_path, name)
    write = {"model": model.save_pretrained, "config": model.config.save_pretrained,
             "generation_config": model.generation_config.save_pretrained,
             "trace": lambda p: write_trace(p + ".safetensors", {"x": np.zeros(2)})}[writer]
    with pytest.raises(CheckpointError, match=message):
        write(path)
    assert os.listdir(tmp_path) == []
