"""Hostile input, round 4: a review of the morning's surfaces (weights of a non-floating dtype, generate and
save reading an edited config before checking it, a save interrupted while removing its backups).

As in the earlier rounds, each test names the class and checks for a StableLmError naming what is wrong (never
a traceback from inside NumPy, never a silent wrong result) and that nothing is left half-written.
"""

import os

import ml_dtypes
import numpy as np
import pytest

from conftest import files_of, tiny_model
from stablelm_ref import StableLmForCausalLM, checkpoint
from stablelm_ref.errors import CheckpointError

TENSOR = "model.layers.0.mlp.up_proj.weight"


# ---- class: half-written output / silent wrong result (weights that are not floating point) -------------

@pytest.mark.parametrize("dtype", [np.int32, np.int8, bool, object, np.complex64])
def test_weights_that_are_not_floating_point_are_refused_by_save_forward_and_fast(tmp_path, dtype):
    """int32/bool weights saved and then failed to load ("stored as I32 ... corrupt"); object failed with a raw
    NumPy TypeError in the forward and a UFuncTypeError in fast(); complex64 gave complex logits. Each now
    gets one CheckpointError naming the tensor and its dtype, and the save writes nothing."""
    model = tiny_model(seed=1, dtype="float32")
    model.params[TENSOR] = model.params[TENSOR].astype(dtype)
    name = np.dtype(dtype).name
    directory = tmp_path / "saved"
    with pytest.raises(CheckpointError, match=f"{TENSOR}' has dtype {name}; model weights must be floating"):
        model.save_pretrained(directory)
    assert not directory.exists() or files_of(str(directory)) == {}
    ids = np.array([[1, 2, 3]])
    with pytest.raises(CheckpointError, match=f"{TENSOR}' has dtype {name}"):
        model(ids)
    with pytest.raises(CheckpointError, match=f"{TENSOR}' has dtype {name}"):
        model.fast()(ids)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_every_floating_dtype_still_saves_and_loads(tmp_path, dtype):
    """The check must not refuse a dtype the project writes: each is saved (float16/bfloat16 are GPU dtypes, so
    written through save's dtype) and loads back to the float32 values of the weights cast to it, exactly."""
    model = tiny_model(seed=2, dtype="float32")
    model.save_pretrained(tmp_path / "m", dtype=dtype)
    loaded = StableLmForCausalLM.from_pretrained(tmp_path / "m")
    wanted = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    for name, value in model.params.items():
        np.testing.assert_array_equal(loaded.params[name], value.astype(wanted).astype(np.float32))
