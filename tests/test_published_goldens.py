"""The published stablelm-3b-4e1t figures (restated in docs/facts.md, from transformers' integration tests).

The weight tests run wherever stabilityai/stablelm-3b-4e1t is in the local Hugging Face cache (they
never download: the project's machines have no network) and skip with that reason otherwise. The
prompt-id test needs only the shared GPT-NeoX-20B tokenizer file.

Tolerances are the published ones (atol 1e-4 on logits, float32); the greedy completion is exact.
"""

import os
import shutil

import numpy as np
import pytest

from stablelm_ref import hub
from stablelm_ref.tokenizer import Tokenizer

from conftest import NEOX_TOKENIZER

REPO = "stabilityai/stablelm-3b-4e1t"
WEATHER_IDS = [510, 8588, 310, 1900, 9386]
PIZZA_PROMPT = "My favorite food has always been pizza, but lately"
PIZZA_IDS = [3220, 7583, 2739, 556, 1900, 644, 22534, 13, 533, 21403]
PIZZA_TEXT = ("My favorite food has always been pizza, but lately I’ve been craving something different. I’ve been "
              "trying to eat healthier and I’ve")
MEANS = [2.7146, 2.4245, 1.5616, 1.4424, 2.6790]
SLICE = [7.1030, -1.4195, 9.9206, 7.7008, 4.9891, 4.2169, 5.5426, 3.7878, 6.7593, 5.7360, 8.4691, 5.5448,
         5.0544, 10.4129, 8.5573, 13.0405, 7.3265, 3.5868, 6.1106, 5.9406, 5.6376, 5.7490, 5.4850, 4.8124,
         5.1991, 4.6419, 4.5719, 9.9588, 6.7222, 4.5070]


def test_neox_tokenizer_gives_the_published_prompt_ids(tmp_path):
    if not os.path.isfile(NEOX_TOKENIZER):
        pytest.skip(f"the shared GPT-NeoX-20B tokenizer is not at {NEOX_TOKENIZER}")
    shutil.copy(NEOX_TOKENIZER, tmp_path / "tokenizer.json")
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert tok.encode(PIZZA_PROMPT) == PIZZA_IDS
    assert tok.encode("The weather is always wonderful") == WEATHER_IDS


def _cached_3b():
    try:
        snap = hub.cached_snapshot(REPO, ("config.json",))
    except Exception:
        snap = None
    if snap is None or not any(n.endswith(".safetensors") for n in os.listdir(snap)):
        pytest.skip(f"{REPO} is not in the local Hugging Face cache (huggingface-cli download {REPO} --include "
                    "'*.safetensors' '*.json' on a machine with network)")
    return snap


@pytest.fixture(scope="module")
def model_3b():
    from stablelm_ref import StableLmForCausalLM

    snap = _cached_3b()
    return StableLmForCausalLM.from_pretrained(snap, dtype="float32"), snap


def test_3b_logit_means_and_slice(model_3b):
    model, _ = model_3b
    logits = np.asarray(model([WEATHER_IDS]).logits, dtype=np.float64)   # [1, 5, 50304]
    np.testing.assert_allclose(logits.mean(-1)[0], MEANS, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[0, 0, :30], SLICE, atol=1e-4, rtol=0)


def test_3b_greedy_completion(model_3b):
    model, snap = model_3b
    tok = Tokenizer.from_pretrained(snap)
    ids = tok(PIZZA_PROMPT)["input_ids"]
    assert ids[0].tolist() == PIZZA_IDS
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert tok.decode(out[0], skip_special_tokens=True) == PIZZA_TEXT


def test_3b_long_prompt(model_3b):
    """docs/facts.md: a 4,094-token prompt [306, 338] * 2047, greedy; the last three generated ids are [3, 3, 3]
    (4 new tokens reach position 4,097, past max_position_embeddings, as transformers allows)."""
    model, _ = model_3b
    ids = np.array([[306, 338] * 2047])
    with pytest.warns(UserWarning, match="past max_position_embeddings"):
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert np.asarray(out)[0, -3:].tolist() == [3, 3, 3]
