"""The wrong container in place of token ids gets a message in the caller's words, through the forward, the fast
path and generate: the tokenizer's output dict (pass its two entries, or **enc), a generator or a set (NumPy made
a 0-d object array of it: 'shape () of object'), and ints beyond int64 (an id outside the vocabulary, not 'object')."""

import pytest

from stablelm_ref.errors import GenerationError

from conftest import tiny_model

CASES = {"the tokenizer's dict": ({"input_ids": [[1, 2]], "attention_mask": [[1, 1]]},
                                  r"^input_ids is a dict with keys \['input_ids', 'attention_mask'\] \(the tokenizer's "
                                  r"output\?\): pass enc\['input_ids'\] as input_ids"),
         "a generator": ((i for i in [1, 2]), r"^input_ids must be a list of lists of ints or an integer array, got a "
                                              r"generator$"),
         "a set": ({1, 2}, r"got a set \{1, 2\}$"),
         "an int beyond int64": ([[3, 2**70]], rf"^token id {2**70} is outside the vocabulary \[0, 101\)")}


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("call", ["forward", "fast", "generate"])
def test_the_wrong_container_is_named(model, case, call):
    ids, message = CASES[case]
    run = dict(forward=model, fast=model.fast(), generate=lambda i: model.generate(i, max_new_tokens=2))[call]
    with pytest.raises(GenerationError, match=message):
        run(ids)


def test_an_object_array_of_ids_in_the_vocabulary_is_still_refused(model):
    """An object ndarray is not an integer array (test_hostile_input's independent statement of valid input):
    refused as before, with the dtype named."""
    import numpy as np

    with pytest.raises(GenerationError, match=r"must be a \[batch, seq_len\] array of integers, got shape \(1, 3\) "
                                              r"of object"):
        model(np.array([[1, 2, 3]], dtype=object))


def test_the_dict_unpacked_is_what_the_message_advises(model):
    enc = {"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1, 1]]}
    assert model(**enc).logits.shape == (1, 3, model.config.vocab_size)
