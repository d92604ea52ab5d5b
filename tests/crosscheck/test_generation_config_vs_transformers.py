"""generation_config.json read as transformers reads it: the same tiny checkpoint, with a generation config
that differs from config.json, loaded by both; generate called with no argument (or a few that must win).

Greedy runs compare token sequences exactly (float64 logits agree to ~1e-8, far below the random model's
top-2 gaps). Sampling cannot be compared token for token (different random generators), so the sampled
run compares what the settings do: transformers' processed scores at each step of its own sampled
sequence (output_scores) against our process_logits, with the settings our generate resolves, on our
float64 logits of the same prefix: equal -inf positions (the same tokens filtered) and finite values to
1e-6 (float64 logits ~1e-8 apart, divided by temperature 0.7 and the repetition penalty 1.1: ~1e-7).
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stablelm_ref.generation import _settings, process_logits  # noqa: E402
from stablelm_ref.generation_config import generation_config_of  # noqa: E402
from stablelm_ref.heads import StableLmForCausalLM  # noqa: E402

from conftest import tiny_model  # noqa: E402

PROMPT = np.array([[5, 17, 42, 8, 99, 23]])


def _pair(tmp_path, generation_config):
    tiny_model(seed=4, dtype="float64").save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "generation_config.json"), "w") as f:
        json.dump(generation_config, f)
    ours = StableLmForCausalLM.from_pretrained(tmp_path, dtype="float64")
    theirs = transformers.StableLmForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    theirs.eval()
    return ours, theirs


def _theirs(theirs, ids=PROMPT, **kwargs):
    with torch.no_grad():
        return theirs.generate(torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long), **kwargs)


def test_sampling_settings_from_the_file_process_scores_as_transformers(tmp_path):
    ours, theirs = _pair(tmp_path, {"eos_token_id": [3, 7], "do_sample": True, "temperature": 0.7, "top_k": 10,
                                    "top_p": 0.9, "max_new_tokens": 5, "repetition_penalty": 1.1})
    settings = _settings(ours, PROMPT.shape[1], None, None, None, None, None, None, None, None, 1,
                         generation_config_of(ours))
    assert settings == dict(do_sample=True, max_new_tokens=5, temperature=0.7, top_k=10, top_p=0.9,
                            repetition_penalty=1.1)
    for seed in range(3):
        torch.manual_seed(seed)
        out = _theirs(theirs, output_scores=True, return_dict_in_generate=True)
        seq = out.sequences.numpy()
        assert seq.shape[1] <= PROMPT.shape[1] + 5 and len(out.scores) == seq.shape[1] - PROMPT.shape[1]
        for step, want in enumerate(out.scores):
            prefix = seq[:, :PROMPT.shape[1] + step]
            logits = np.asarray(ours(prefix).logits[:, -1])
            got = process_logits(logits, prefix, settings)
            want = want.numpy()
            np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
            finite = np.isfinite(want)
            np.testing.assert_allclose(got[finite], want[finite], rtol=0, atol=1e-6)
        # transformers stops at the file's EOS ids: a finished run ends with one of them
        if seq.shape[1] < PROMPT.shape[1] + 5:
            assert seq[0, -1] in (3, 7)


def test_greedy_with_the_files_eos_list_and_length_equals_transformers(tmp_path):
    probe, _ = _pair(tmp_path / "probe", {"max_new_tokens": 12})
    free = probe.generate(PROMPT, eos_token_id=None)[0, PROMPT.shape[1]:]
    stop = int(free[4])
    ours, theirs = _pair(tmp_path / "eos", {"eos_token_id": [100, stop], "pad_token_id": 1, "max_new_tokens": 12,
                                            "do_sample": True, "temperature": 0.7})
    want = _theirs(theirs, do_sample=False).numpy()                 # the explicit argument wins on both sides
    got = ours.generate(PROMPT, do_sample=False)
    np.testing.assert_array_equal(got, want)
    assert got.shape[1] < PROMPT.shape[1] + 12                       # it did stop at the file's EOS list
    # an explicit eos_token_id=None: no EOS stop, the full 12 tokens, on both sides
    np.testing.assert_array_equal(ours.generate(PROMPT, do_sample=False, eos_token_id=None),
                                  _theirs(theirs, do_sample=False, eos_token_id=None).numpy())


@pytest.mark.parametrize("content, kwargs", [
    ({"max_length": 9}, {}),                       # the file's max_length is the total length
    ({"max_length": 9}, {"max_new_tokens": 2}),    # an explicit max_new_tokens wins
    ({"max_new_tokens": 4}, {"max_length": 15}),   # the file's max_new_tokens wins over max_length
    ({"max_new_tokens": 4}, {"max_new_tokens": 7}),
    ({"max_length": 20}, {}),                      # 20 (transformers' default value) from the file: total
    ({}, {"max_length": 12}),                      # no length in the file: the argument's
])
def test_lengths_from_the_file_equal_transformers(tmp_path, content, kwargs):
    ours, theirs = _pair(tmp_path, {"eos_token_id": None, **content})
    got = ours.generate(PROMPT, **kwargs)
    np.testing.assert_array_equal(got, _theirs(theirs, **kwargs).numpy())

