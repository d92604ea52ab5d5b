"""Goldens: this project against transformers' outputs stored in tests/goldens/ (tools/make_goldens.py).

Tolerances, as the relative error ||ours - theirs|| / ||theirs|| (2-norm over the compared values):
- float64: 1e-7. Not 1e-15, because transformers builds the RoPE cos/sin tables in float32 even for a
  float64 model (docs/facts.md), which perturbs q and k at ~1e-8 relative; every other step is float64.
  A real bug (a wrong head order, a missing bias, rotate_half pairs) shows at 1e-2 or more.
- float32: 1e-4. Both sides compute in float32 (~6e-8 per operation) through two layers with different
  summation orders (BLAS kernels, softmax, LayerNorm); observed ~1e-6; 1e-4 keeps a 100x margin.
- Losses: transformers computes them in float32 from the logits (`logits.float()`), so 1e-6.
Left-padded rows are compared at their token positions only: pad positions attend to nothing and
their values are undefined in both implementations.
"""

import glob
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from stablelm_ref import (StableLmConfig, StableLmForCausalLM, StableLmForSequenceClassification,
                          StableLmForTokenClassification)

GOLDENS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "goldens", "*", "golden.safetensors")))
NAMES = [os.path.basename(os.path.dirname(p)) for p in GOLDENS]
F64, F32, LOSS = 1e-7, 1e-4, 1e-6


def rel(ours, theirs, where=None):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if where is not None:
        ours, theirs = ours[where], theirs[where]
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


@pytest.fixture(scope="module", params=NAMES)
def golden(request):
    folder = os.path.join(os.path.dirname(__file__), "goldens", request.param)
    return folder, load_file(os.path.join(folder, "golden.safetensors"))


def test_all_variants_present():
    assert set(NAMES) >= {"3b", "1_6b", "12b", "tied", "rotary_half", "rotary_full", "rope_linear",
                          "rope_dynamic", "theta_eps", "gelu"}


def test_causal_lm_float64(golden):
    folder, g = golden
    model = StableLmForCausalLM.from_pretrained(folder, dtype="float64")
    out = model(g["right_ids"], attention_mask=g["right_mask"], labels=g["right_labels"], output_hidden_states=True)
    tokens = g["right_mask"] == 1
    assert rel(out.logits, g["right_logits"], tokens) < F64
    for i, h in enumerate(out.hidden_states):
        assert rel(h, g[f"right_hidden_{i}"], tokens) < F64, f"hidden state {i}"
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert abs(out.loss - g["right_loss"].item()) < LOSS * abs(g["right_loss"].item())
    left = model(g["left_ids"], attention_mask=g["left_mask"], position_ids=g["left_pos"])
    assert rel(left.logits, g["left_logits"], g["left_mask"] == 1) < F64


def test_causal_lm_float32(golden):
    folder, g = golden
    model = StableLmForCausalLM.from_pretrained(folder)  # float32 by default
    assert model.dtype == np.float32
    out = model(g["right_ids"], attention_mask=g["right_mask"])
    assert out.logits.dtype == np.float32
    assert rel(out.logits, g["right_logits_f32"], g["right_mask"] == 1) < F32
    left = model(g["left_ids"], attention_mask=g["left_mask"], position_ids=g["left_pos"])
    assert rel(left.logits, g["left_logits_f32"], g["left_mask"] == 1) < F32


def test_left_padded_rows_equal_unpadded(golden):
    """Row 1 of the left-padded batch, without its padding, gives the same logits as a batch of one."""
    folder, g = golden
    if "dynamic" in folder:
        pytest.skip("dynamic NTK rope derives its base from the batch's longest position, so a shorter row "
                    "alone gets other frequencies (transformers behaves the same)")
    model = StableLmForCausalLM.from_pretrained(folder, dtype="float64")
    keep = g["left_mask"][1] == 1
    alone = model(g["left_ids"][1:, keep]).logits
    padded = model(g["left_ids"], attention_mask=g["left_mask"], position_ids=g["left_pos"]).logits
    np.testing.assert_allclose(padded[1:, keep], alone, rtol=0, atol=1e-10)


def _with_score(folder, cls, extra):
    lm = StableLmForCausalLM.from_pretrained(folder, dtype="float64")
    params = {k: v for k, v in lm.params.items() if k != "lm_head.weight"}
    params.update({k: v.astype(np.float64) for k, v in extra.items()})
    return cls(StableLmConfig.from_pretrained(folder), params)


def test_sequence_classification(golden):
    folder, g = golden
    model = _with_score(folder, StableLmForSequenceClassification, {"score.weight": g["score_weight"]})
    out = model(g["right_ids"], attention_mask=g["right_mask"], labels=g["seq_labels"])
    assert rel(out.logits, g["seq_right_logits"]) < F64
    assert abs(out.loss - g["seq_right_loss"].item()) < LOSS * abs(g["seq_right_loss"].item())
    left = model(g["left_ids"], attention_mask=g["left_mask"], position_ids=g["left_pos"])
    assert rel(left.logits, g["seq_left_logits"]) < F64


def test_token_classification(golden):
    folder, g = golden
    model = _with_score(folder, StableLmForTokenClassification,
                        {"score.weight": g["token_score_weight"], "score.bias": g["token_score_bias"]})
    out = model(g["right_ids"], attention_mask=g["right_mask"], labels=g["token_labels"])
    assert rel(out.logits, g["token_logits"], g["right_mask"] == 1) < F64
    assert abs(out.loss - g["token_loss"].item()) < LOSS * abs(g["token_loss"].item())
