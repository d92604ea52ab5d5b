"""The generation_config.json save_pretrained writes, read back by transformers.

Ours has no "transformers_version" key (transformers writes its own version there). transformers 5 treats
that key as metadata (GenerationConfig.__init__ pops it; no loading or generation code reads it), so the
file needs none: this test loads ours with transformers' GenerationConfig.from_pretrained and its model's
from_pretrained, and checks every field we wrote arrives with its value, with no warning, and that
transformers' own save of the loaded config adds its version while the fields stay the same.
"""

import json
import warnings

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from conftest import tiny_model  # noqa: E402

FIELDS = dict(do_sample=True, temperature=0.7, top_k=10, top_p=0.9, repetition_penalty=1.1, max_new_tokens=5,
              eos_token_id=[3, 7], pad_token_id=1, bos_token_id=0)


def test_transformers_loads_our_generation_config_without_transformers_version(tmp_path):
    model = tiny_model(seed=4, dtype="float32")
    for key, value in FIELDS.items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(tmp_path / "ours")
    with open(tmp_path / "ours" / "generation_config.json") as f:
        written = json.load(f)
    assert written == FIELDS and "transformers_version" not in written
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # transformers says nothing about the missing key
        theirs = transformers.GenerationConfig.from_pretrained(tmp_path / "ours")
    assert {key: getattr(theirs, key) for key in FIELDS} == FIELDS
    loaded = transformers.StableLmForCausalLM.from_pretrained(tmp_path / "ours")
    assert {key: getattr(loaded.generation_config, key) for key in FIELDS} == FIELDS
    theirs.save_pretrained(tmp_path / "theirs")
    with open(tmp_path / "theirs" / "generation_config.json") as f:
        again = json.load(f)
    assert again.pop("transformers_version") == transformers.__version__ and again == FIELDS
