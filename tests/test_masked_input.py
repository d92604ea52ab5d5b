"""NumPy masked arrays as inputs: refused, naming what to pass instead.

np.asarray(masked) keeps the data and drops the mask, so a masked array of token ids ran with its masked
entries as real tokens, silently (torch.as_tensor drops the mask too). In transformers' convention the mask
of the ids is the attention_mask, so every array input that was coerced with np.asarray refuses a masked
array, or a list or tuple holding one: input_ids (the forward, the fast form, generate), attention_mask,
position_ids, labels, and the ids given to the tokenizer's decode. The test of the advice is that it works: the plain ids with the
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
INPUT_IDS_MESSAGE = (r"^input_ids {verb} a NumPy masked array, whose mask would be ignored; pass the ids as a "
                     r"plain array and their mask as attention_mask")
# A masked array, and the containers np.asarray takes apart just as silently: rows of masked arrays in a list or
# a tuple, and the np.ma.masked constant among ints (np.asarray([5, np.ma.masked]) is [5., 0.]).
FORMS = {"masked array": lambda a: a, "list of masked rows": list, "tuple of masked rows": tuple,
         "list of lists of masked ones": lambda a: [[np.ma.array(v, mask=m) for v, m in zip(row, np.ma.getmaskarray(
             row))] for row in a],
         "np.ma.masked in a list": lambda a: [[np.ma.masked if m else int(v) for v, m in zip(row.data, row.mask)]
                                             for row in np.ma.array(a, mask=np.ma.getmaskarray(a))]}


def verb(form):
    """The message says the input "is" a masked array, or "holds" one (a list or tuple around it)."""
    return "is" if form == "masked array" else "holds"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("call", ["forward", "fast", "generate"])
def test_masked_input_ids_are_refused(model, call, form):
    ids = FORMS[form](IDS)
    run = dict(forward=lambda: model(ids), fast=lambda: model.fast()(ids),
               generate=lambda: model.generate(ids, max_new_tokens=2))[call]
    with pytest.raises(GenerationError, match=INPUT_IDS_MESSAGE.format(verb=verb(form))):
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


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ["attention_mask", "position_ids", "labels"])
def test_other_masked_inputs_are_refused(model, name, form):
    ids = IDS.filled(0)
    value = FORMS[form](np.ma.array(np.ones_like(ids) if name != "position_ids" else np.tile(np.arange(5), (2, 1)),
                                    mask=np.ma.getmaskarray(IDS)))
    with pytest.raises(GenerationError, match=rf"^{name} {verb(form)} a NumPy masked array, whose mask would be "
                                              rf"ignored; pass a plain array"):
        model(ids, **{name: value})


def test_lists_without_masked_arrays_pass_and_deep_nesting_is_no_recursion_error(model):
    """The walk looks through lists and tuples only; plain rows, arrays in a list, and a list nested deeper
    than Python's recursion limit are judged as before (the last: not an array of ids)."""
    plain = model([[5, 17, 42]]).logits
    np.testing.assert_array_equal(model(([5, 17, 42],)).logits, plain)
    np.testing.assert_array_equal(model([np.array([5, 17, 42])]).logits, plain)
    deep = [5]
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(GenerationError, match="input_ids must be"):
        model(deep)


def test_masked_ids_are_not_decoded_as_if_unmasked(tmp_path):
    """Tokenizer.decode / batch_decode read the data of a masked array, masked ids included."""
    from stablelm_ref.errors import TokenizerError
    from stablelm_ref.tokenizer import Tokenizer
    from test_tokenizer import tiny_tokenizer_dir

    tok = Tokenizer.from_pretrained(tiny_tokenizer_dir(tmp_path))
    for method, ids, says in ((tok.decode, IDS[0], "is"), (tok.batch_decode, IDS, "is"),
                              (tok.batch_decode, list(IDS), "holds"), (tok.decode, [5, np.ma.masked, 42], "holds")):
        with pytest.raises(TokenizerError, match=rf"^the ids given to {method.__name__} {says} a NumPy masked "
                                                 r"array, whose mask would be ignored; pass the ids to decode as a"):
            method(ids)
    assert tok.decode(IDS[0].compressed()) == tok.decode([5, 17, 42])
