"""NumPy masked arrays as inputs: refused, naming what to pass instead.

np.asarray(masked) keeps the data and drops the mask, so a masked array of token ids ran with its masked
entries as real tokens, silently (torch.as_tensor drops the mask too). In transformers' convention the mask
of the ids is the attention_mask, so every array input that was coerced with np.asarray refuses a masked
array: input_ids (the forward, the fast form, generate), attention_mask, position_ids, labels, and the ids
given to the tokenizer's decode. The test of the advice is that it works: the plain ids with the
attention_mask it names generate exactly what the unpadded row generates.
"""

import numpy as np
import pytest

from conftest import tiny_model
from stablelm_ref.errors import GenerationError


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3, dtype="float64")


IDS = np.ma.array([[0, 0, 5, 17, 42], [9, 3, 7, 11, 8]], mask=[[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
INPUT_IDS_MESSAGE = (r"^input_ids is a NumPy masked array, whose mask would be ignored; pass the ids as a plain "
                     r"array and their mask as attention_mask")


@pytest.mark.parametrize("call", ["forward", "fast", "generate"])
def test_masked_input_ids_are_refused(model, call):
    run = dict(forward=lambda: model(IDS), fast=lambda: model.fast()(IDS),
               generate=lambda: model.generate(IDS, max_new_tokens=2))[call]
    with pytest.raises(GenerationError, match=INPUT_IDS_MESSAGE):
        run()


def test_the_advice_generates_what_the_unpadded_rows_generate(model):
    """input_ids=ids.filled(0), attention_mask=1 - np.ma.getmaskarray(ids), as the message says: the left-padded
    row gives exactly the tokens of the row alone (float64: the padding is masked out of every softmax, and
    the positions come from the mask, so the arithmetic of the real tokens is the same)."""
    out = model.generate(IDS.filled(0), attention_mask=1 - np.ma.getmaskarray(IDS), max_new_tokens=4,
                         eos_token_id=None)
    alone = model.generate([[5, 17, 42]], max_new_tokens=4, eos_token_id=None)
    np.testing.assert_array_equal(out[0, 2:], alone[0])
    np.testing.assert_array_equal(out[1], model.generate(IDS.data[1:], max_new_tokens=4, eos_token_id=None)[0])


@pytest.mark.parametrize("name", ["attention_mask", "position_ids", "labels"])
def test_other_masked_inputs_are_refused(model, name):
    ids = IDS.filled(0)
    value = np.ma.array(np.ones_like(ids) if name != "position_ids" else np.tile(np.arange(5), (2, 1)),
                        mask=np.ma.getmaskarray(IDS))
    with pytest.raises(GenerationError, match=rf"^{name} is a NumPy masked array, whose mask would be ignored; "
                                              rf"pass a plain array"):
        model(ids, **{name: value})


def test_masked_ids_are_not_decoded_as_if_unmasked(tmp_path):
    """Tokenizer.decode / batch_decode read the data of a masked array, masked ids included."""
    from stablelm_ref.errors import TokenizerError
    from stablelm_ref.tokenizer import Tokenizer
    from test_tokenizer import tiny_tokenizer_dir

    tok = Tokenizer.from_pretrained(tiny_tokenizer_dir(tmp_path))
    for method, ids in ((tok.decode, IDS[0]), (tok.batch_decode, IDS)):
        with pytest.raises(TokenizerError, match=rf"^the ids given to {method.__name__} is a NumPy masked array, "
                                                 r"whose mask would be ignored; pass the ids to decode as a plain"):
            method(ids)
    assert tok.decode(IDS[0].compressed()) == tok.decode([5, 17, 42])
