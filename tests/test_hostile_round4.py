"""Hostile input, round 4: a review of the morning's surfaces (weights of a non-floating dtype, generate and
save reading an edited config before checking it, a save interrupted while removing its backups).

As in the earlier rounds, each test names the class and checks for a StableLmError naming what is wrong (never
a traceback from inside NumPy, never a silent wrong result) and that nothing is left half-written.
"""

import os
import re

import ml_dtypes
import numpy as np
import pytest

from conftest import files_of, tiny_model
from stablelm_ref import StableLmForCausalLM, checkpoint
from stablelm_ref.errors import CheckpointError, ConfigError

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
    message = f"^model.params hold a tensor the model cannot compute with: tensor '{TENSOR}' has dtype {name};"
    with pytest.raises(CheckpointError, match=message):        # not "no longer match model.config": no mismatch
        model(ids)
    with pytest.raises(CheckpointError, match=message):
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


# ---- class: raw traceback / misleading message (generate and save read an edited config before checking it) -

EDITS = {
    "num_attention_heads = 0": (lambda m: setattr(m.config, "num_attention_heads", 0),
                                ConfigError, "'num_attention_heads' must be an integer >= 1, got 0"),
    "vocab_size = True": (lambda m: setattr(m.config, "vocab_size", True),
                          ConfigError, "'vocab_size' must be an integer >= 1, got True"),
    "config = None": (lambda m: setattr(m, "config", None),
                      ConfigError, "model.config must be a StableLmConfig, got NoneType"),
    "tied, no lm_head": (lambda m: setattr(m.config, "tie_word_embeddings", False),
                         CheckpointError, "'lm_head.weight' is missing from the model"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_generate_checks_an_edited_config_before_reading_it(edit):
    """generate() read model.config before the forward's check: heads = 0 gave a ZeroDivisionError, untying a
    tied model a KeyError 'lm_head.weight', vocab_size = True "outside the vocabulary [0, True)", config = None
    "has no language-modelling head". Each now gets the forward's own error, naming the field."""
    change, error, message = EDITS[edit]
    model = tiny_model(seed=3, dtype="float32", tie_word_embeddings=True)
    change(model)
    for run in (lambda: model(np.array([[1, 2]])), lambda: model.generate(np.array([[1, 2]]), max_new_tokens=2)):
        with pytest.raises(error, match=re.escape(message)):
            run()


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_save_checks_an_edited_config_before_the_generation_config(tmp_path, edit):
    """The save checked the generation config against the edited config first: vocab_size = True gave
    "pad_token_id 1 is outside [0, True)", config = None an AttributeError. Each names the field; nothing is
    written."""
    change, _, message = EDITS[edit]
    model = tiny_model(seed=3, dtype="float32", tie_word_embeddings=True)
    model.generation_config.pad_token_id = 1
    change(model)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists() or files_of(str(tmp_path / "saved")) == {}


# ---- class: leftover files (a save interrupted while it removes its backups) --------------------------------

@pytest.mark.parametrize("interrupts", [1, 2])
def test_an_interrupt_while_removing_the_backups_finishes_or_names_them(tmp_path, monkeypatch, interrupts):
    """Every rename had succeeded, but a KeyboardInterrupt from os.unlink of the first backup stopped the loop
    (it caught only OSError): the other `.old-*` files stayed and nothing said the save had completed. Now the
    loop tries the interrupted backup once more and removes the rest, then re-raises the KeyboardInterrupt
    saying the new files are in place (and naming a backup interrupted twice)."""
    tiny_model(seed=4).save_pretrained(tmp_path)                            # an old checkpoint to replace
    real, calls = os.unlink, []

    def unlink(path, *args, **kwargs):
        if os.path.basename(path).startswith(".old-"):
            calls.append(path)
            if len(calls) <= interrupts:
                raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    new = tiny_model(seed=17)
    with pytest.raises(KeyboardInterrupt, match="interrupted after the save completed: the new model.safetensors, "
                                                "config.json, generation_config.json are in place") as info:
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    backups = [name for name in os.listdir(tmp_path) if name.startswith(".old-")]
    assert len(backups) == interrupts - 1                      # once: retried and removed; twice: left, named
    assert all(f"{name} (interrupted)" in str(info.value) for name in backups)
    loaded = StableLmForCausalLM.from_pretrained(tmp_path, dtype="float64")
    assert all(np.array_equal(loaded.params[k], v) for k, v in new.params.items())


@pytest.mark.parametrize("interrupts", [1, 2])
@pytest.mark.parametrize("first", [KeyboardInterrupt(), OSError(5, "Input/output error")], ids=["Ctrl-C", "OSError"])
def test_an_interrupt_while_undoing_a_failed_save_loses_no_file(tmp_path, monkeypatch, interrupts, first):
    """A Ctrl-C (or an OSError) at the 4th rename (the new config.json into place) starts the undo; a Ctrl-C at the
    undo's first rename (config.json's backup back to its name) stopped it, since it caught only OSError:
    config.json and model.safetensors stayed under `.old-*` names and nothing said so. Now the interrupted rename
    is tried once more and the rest restored: every file as it was (a KeyboardInterrupt), or, interrupted twice,
    a CheckpointError naming the backup that holds the old config.json, with its old bytes."""
    from test_checkpoint import _old_checkpoint
    from conftest import VARIANTS

    before = _old_checkpoint(tmp_path)
    calls, real = [], os.replace

    def replace(src, dst, **kwargs):                   # the 4th rename fails, the undo's first is interrupted
        calls.append(src)
        if len(calls) == 4:
            raise first
        if 4 < len(calls) <= 4 + interrupts:
            raise KeyboardInterrupt
        return real(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    expected = KeyboardInterrupt if interrupts == 1 else CheckpointError
    with pytest.raises(expected) as info:
        tiny_model(seed=17, **VARIANTS["1_6b"]).save_pretrained(tmp_path)
    monkeypatch.undo()
    after = files_of(tmp_path)
    if interrupts == 1:
        assert after == before
        if isinstance(first, OSError):                 # the failure, and that the undo was completed
            assert str(info.value).startswith("interrupted while undoing a failed save") and \
                "Input/output error); nothing was changed" in str(info.value)
        return
    (backup,) = [name for name in after if name.startswith(".old-")]
    assert backup.endswith("-config.json") and after[backup] == before["config.json"]
    after["config.json"] = after.pop(backup)
    assert after == before                                                # nothing else changed, nothing lost
    assert f"{tmp_path / 'config.json'} could not be restored (interrupted): its previous file is " \
           f"{tmp_path / backup}, rename it back" in str(info.value)
