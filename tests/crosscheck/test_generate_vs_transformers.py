"""generate() against transformers' generate, token for token, and the repetition-penalty processor.

Random tiny StableLM checkpoints (the three family variants) are saved by stablelm_ref and loaded by
transformers from the same files. Greedy decoding is compared on left-padded batches: any difference
in the mask, the position ids, the cache or the EOS/pad handling changes tokens. float64 runs agree
to ~1e-8 in the logits (transformers' rotary tables are float32, docs/facts.md), float32 runs to ~1e-6;
the random models' top-2 logit gaps are far larger, so the token sequences must be identical.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stablelm_ref.generation import apply_repetition_penalty  # noqa: E402

from conftest import VARIANTS, tiny_model  # noqa: E402

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _pair(tmp_path, variant, dtype, seed=3, **overrides):
    ours = tiny_model(seed=seed, dtype=dtype, **{**VARIANTS[variant], **overrides})
    ours.save_pretrained(tmp_path)
    theirs = transformers.StableLmForCausalLM.from_pretrained(tmp_path, dtype=TORCH_DTYPES[dtype])
    theirs.eval()
    return ours, theirs


def _left_padded_batch(rng, lengths, pad_id, vocab=101):
    width = max(lengths)
    ids = np.full((len(lengths), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = rng.integers(2, vocab, n)
        mask[row, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_equals_transformers_on_left_padded_batch(tmp_path, variant, dtype):
    ours, theirs = _pair(tmp_path, variant, dtype, eos_token_id=None, pad_token_id=1)
    ids, mask = _left_padded_batch(np.random.default_rng(7), [9, 4, 6], pad_id=1)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
    with torch.no_grad():
        want = theirs.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=12,
                               do_sample=False).numpy()
    assert got.shape == want.shape == (3, 9 + 12)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_greedy_eos_and_pad_equal_transformers(tmp_path, dtype):
    """Pick as EOS a token some rows emit early: finished rows must then emit pad, like transformers."""
    ours, theirs = _pair(tmp_path, "3b", dtype, eos_token_id=None, pad_token_id=1)
    ids, mask = _left_padded_batch(np.random.default_rng(11), [5, 8, 3, 7], pad_id=1)
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=10)[:, 8:]
    eos = int(free[0, 2])  # row 0 emits it at step 2; other rows at their own times or never
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=1)
    with torch.no_grad():
        want = theirs.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=10,
                               do_sample=False, eos_token_id=eos, pad_token_id=1).numpy()
    np.testing.assert_array_equal(got, want)
    assert (got[0, 8 + 3:] == 1).all() and got[0, 8 + 2] == eos


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_greedy_with_repetition_penalty_equals_transformers(tmp_path, dtype):
    ours, theirs = _pair(tmp_path, "12b", dtype, eos_token_id=None, pad_token_id=1)
    ids, mask = _left_padded_batch(np.random.default_rng(5), [6, 10], pad_id=1)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=10, repetition_penalty=1.7)
    with torch.no_grad():
        want = theirs.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=10,
                               do_sample=False, repetition_penalty=1.7).numpy()
    np.testing.assert_array_equal(got, want)


def test_repetition_penalty_equals_transformers_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    scores = rng.normal(0, 3, (4, 57)).astype(np.float32)
    ids = rng.integers(0, 57, (4, 12))
    ignore = np.array([0, 3, 11, 5])
    for penalty in (0.5, 1.3, 2.0):
        for prefix in (None, ignore):
            proc = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=None if prefix is None
                                                    else torch.tensor(prefix))
            want = proc(torch.tensor(ids), torch.tensor(scores)).numpy()
            got = apply_repetition_penalty(scores, ids, penalty, prefix)
            np.testing.assert_array_equal(got, want)  # same float32 operations: bit for bit
