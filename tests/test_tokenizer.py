"""Tokenizer: ids and round trips against the tokenizers library, left padding, special tokens, the
published prompt ids (GPT-NeoX-20B file), and the sandboxed chat template."""

import json
import os
import re
import shutil

import numpy as np
import pytest

from stablelm_ref.errors import TokenizerError
from stablelm_ref.tokenizer import Tokenizer, render_chat_template

from conftest import NEOX_TOKENIZER

ZEPHYR = ("{% for message in messages %}{% if message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + "
          "eos_token}}{% elif message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + eos_token}}"
          "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n'  + message['content'] + eos_token}}"
          "{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}")

SENTENCES = [
    "The weather is always wonderful in the spring.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "My favorite food has always been pizza, but lately I have been craving something different.",
    "Les élèves aiment le café. 日本語のテキスト。 Emoji: 🙂",
    "    indented code\twith tabs and   spaces",
]
UNICODE_TEXTS = ["héllo wörld", "日本語のテキスト", "🙂🙃 emoji", "\t tabs\n\nnewlines  ", "def f(x):\n    return x ** 2\n",
                 "", " ", "Ω≈ç√∫˜µ≤≥÷", "a\u0301 combining"]


def tiny_tokenizer_dir(path, vocab_size=300, chat_template=ZEPHYR, config=True):
    """A byte-level BPE trained in milliseconds on SENTENCES, saved like a model directory's tokenizer."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(SENTENCES, trainer)
    os.makedirs(path, exist_ok=True)
    backend.save(os.path.join(path, "tokenizer.json"))
    if config:
        cfg = {"bos_token": "<|endoftext|>", "eos_token": {"content": "<|endoftext|>"}, "pad_token": "<|padding|>",
               "add_bos_token": False, "model_max_length": 64}
        if chat_template is not None:
            cfg["chat_template"] = chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_tokenizer_dir(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    if not os.path.isfile(NEOX_TOKENIZER):
        pytest.skip(f"the shared GPT-NeoX-20B tokenizer is not at {NEOX_TOKENIZER}")
    d = tmp_path_factory.mktemp("neox")
    shutil.copy(NEOX_TOKENIZER, d / "tokenizer.json")  # a directory holding only tokenizer.json
    return Tokenizer.from_pretrained(str(d))


# ---- the GPT-NeoX-20B file (published prompt ids: test_published_goldens.py) ------------------------

def test_neox_only_tokenizer_json_gets_endoftext_defaults(neox):
    assert (neox.bos_token_id, neox.eos_token_id, neox.pad_token_id) == (0, 0, None)
    assert neox.vocab_size == 50277  # docs/facts.md: 50277 tokens, < the model's 50304


def test_neox_ids_and_round_trip_equal_tokenizers_library(neox):
    import unicodedata

    from tokenizers import Tokenizer as Backend

    ref = Backend.from_file(NEOX_TOKENIZER)
    for text in UNICODE_TEXTS + SENTENCES:
        ids = neox.encode(text)
        assert ids == ref.encode(text).ids, text
        # byte-level BPE is lossless after the NFC normalizer ("a\u0301" comes back as "\xe1")
        assert neox.decode(ids) == ref.decode(ids) == unicodedata.normalize("NFC", text), text


# ---- the tiny tokenizer: padding, special tokens, decode -----------------------------------------

@pytest.mark.parametrize("text", UNICODE_TEXTS + SENTENCES)
def test_tiny_round_trip(tiny_dir, text):
    tok = Tokenizer.from_pretrained(tiny_dir)
    assert tok.decode(tok.encode(text)) == text


def test_batch_is_left_padded_with_pad_token(tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)
    texts = ["The weather", "def fibonacci(n):", "x"]
    enc = tok(texts)
    rows = [tok.encode(t) for t in texts]
    width = max(map(len, rows))
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (3, width)
    assert enc["input_ids"].dtype == np.int64
    for i, r in enumerate(rows):
        n = len(r)
        assert enc["input_ids"][i, width - n:].tolist() == r
        assert (enc["input_ids"][i, :width - n] == tok.pad_token_id).all() and tok.pad_token_id == 1
        assert enc["attention_mask"][i].tolist() == [0] * (width - n) + [1] * n
    assert tok.batch_decode(enc["input_ids"], skip_special_tokens=True) == texts
    with pytest.raises(TokenizerError, match="padding=True"):
        tok(texts, padding=False)


def test_special_tokens_and_add_bos_eos(tmp_path, tiny_dir):
    d = tiny_tokenizer_dir(str(tmp_path / "t"))
    cfg = json.load(open(os.path.join(d, "tokenizer_config.json")))
    cfg.update(add_bos_token=True, add_eos_token=True)
    json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"))
    tok = Tokenizer.from_pretrained(d)
    plain = Tokenizer.from_pretrained(tiny_dir).encode("hello")
    assert tok.encode("hello") == [0] + plain + [0]
    assert tok.encode("hello", add_special_tokens=False) == plain
    assert tok.decode(tok.encode("hello"), skip_special_tokens=True) == "hello"
    assert tok.decode(tok.encode("hello")) == "<|endoftext|>hello<|endoftext|>"


def test_add_bos_token_given_as_an_argument_is_refused_in_python_words(tmp_path):
    """Only a value read from tokenizer_config.json is named as its key, with JSON's spelling of the values."""
    d = tiny_tokenizer_dir(str(tmp_path / "t"))
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_file(os.path.join(d, "tokenizer.json"), add_bos_token="yes")
    assert str(e.value) == "'add_bos_token' must be True or False, got 'yes'"


def test_special_tokens_map_fills_missing(tmp_path):
    d = tiny_tokenizer_dir(str(tmp_path / "t"), config=False)
    json.dump({"eos_token": "<|padding|>", "pad_token": {"content": "<|endoftext|>"}},
              open(os.path.join(d, "special_tokens_map.json"), "w"))
    tok = Tokenizer.from_pretrained(d)
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (1, 0, None)


@pytest.mark.parametrize("setup, match", [
    (lambda d: os.remove(os.path.join(d, "tokenizer.json")), "no tokenizer.json"),
    (lambda d: open(os.path.join(d, "tokenizer.json"), "w").write("{not json"), "not a valid tokenizer.json"),
    (lambda d: open(os.path.join(d, "tokenizer_config.json"), "w").write("[1"), "not valid JSON"),
    (lambda d: json.dump({"eos_token": "<nope>"}, open(os.path.join(d, "tokenizer_config.json"), "w")),
     "eos_token '<nope>' is not in the vocabulary"),
    (lambda d: json.dump({"eos_token": 5}, open(os.path.join(d, "tokenizer_config.json"), "w")),
     "eos_token must be a string"),
])
def test_bad_files_raise_tokenizer_error(tmp_path, setup, match):
    d = tiny_tokenizer_dir(str(tmp_path / "t"))
    setup(d)
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.from_pretrained(d)


def test_decode_drops_ids_past_the_vocabulary_and_rejects_negative_ones(tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)
    ids = tok.encode("The weather")
    assert tok.decode(ids + [tok.vocab_size, tok.vocab_size + 19]) == "The weather"  # padded embedding rows
    with pytest.raises(TokenizerError, match="negative token id -1"):
        tok.decode([5, -1])


# ---- chat template -------------------------------------------------------------------------------

def test_zephyr_template_renders_like_transformers_format(tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]
    eot = "<|endoftext|>"
    want = (f"<|system|>\nBe brief.{eot}<|user|>\nHi!{eot}<|assistant|>\nHello.{eot}<|user|>\nWhy?{eot}"
            "<|assistant|>")
    assert tok.apply_chat_template(msgs) == want
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == want[:-len("<|assistant|>")]
    ids = tok.apply_chat_template(msgs, tokenize=True)
    assert ids == tok.encode(want, add_special_tokens=False) and ids.count(0) == 4


@pytest.mark.parametrize("keyword, value", [("return_tensors", "np"), ("return_tensors", "pt"), ("return_dict", True),
                                            ("padding", True), ("padding", "max_length"), ("truncation", True),
                                            ("max_length", 16), ("return_attention_mask", True),
                                            ("tokenizer_kwargs", {"padding": True})])
@pytest.mark.parametrize("tokenize", [False, True])
def test_chat_template_refuses_the_tokenizer_keywords_by_name(tiny_dir, keyword, value, tokenize):
    """Before: they went into the template's context, unused, so return_tensors='np' still gave a str (tokenize
    defaults to False here) or a list (tokenize=True): an answer that silently was not the one asked for."""
    tok = Tokenizer.from_pretrained(tiny_dir)
    msgs = [{"role": "user", "content": "Hi!"}]
    with pytest.raises(TokenizerError, match=f"apply_chat_template takes no {keyword}=.*call the tokenizer on the "
                                             r"text: tok\(tok.apply_chat_template\(messages\)"):
        tok.apply_chat_template(msgs, tokenize=tokenize, **{keyword: value})


@pytest.mark.parametrize("keyword, match", [("continue_final_message", "cut the text after that content yourself"),
                                            ("return_assistant_tokens_mask", "a mask of the assistant's tokens")])
def test_chat_template_refuses_transformers_options_it_does_not_do(tiny_dir, keyword, match):
    """Before: continue_final_message=True went into the template's context unused, so the text still ended the
    message (with <|endoftext|> here) and the model was not continuing it, silently; False is transformers' default."""
    tok = Tokenizer.from_pretrained(tiny_dir)
    msgs = [{"role": "user", "content": "Hi!"}]
    with pytest.raises(TokenizerError, match=f"does not do {keyword}=True \\(in transformers: .*{match}"):
        tok.apply_chat_template(msgs, **{keyword: True})
    assert tok.apply_chat_template(msgs, **{keyword: False}) == tok.apply_chat_template(msgs)


def test_chat_template_unset_tokenizer_keywords_change_nothing_and_the_advice_holds(tiny_dir):
    """None, False and {} ask for nothing (transformers' defaults): taken out of the context, the result unchanged.
    And the error's advice gives the ids of tokenize=True, as a [1, T] array."""
    tok = Tokenizer.from_pretrained(tiny_dir)
    msgs = [{"role": "user", "content": "Hi!"}]
    template = "{{ messages[0].content }}|{{ return_dict }}|{{ padding }}"     # undefined variables render empty
    assert tok.apply_chat_template(msgs, chat_template=template, return_tensors=None, return_dict=False,
                                   padding=False, tokenizer_kwargs={}) == "Hi!||"
    enc = tok(tok.apply_chat_template(msgs), add_special_tokens=False, return_tensors="np")
    assert enc["input_ids"].tolist() == [tok.apply_chat_template(msgs, tokenize=True)]


@pytest.mark.parametrize("template, match", [
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ("{{ ''.__class__ }}", "unsafe"),                    # silently blank in plain jinja2: refused here
    ("{{ messages.__class__.__base__.__subclasses__() }}", "unsafe"),
    ("{{ cycler.__init__.__globals__ }}", "unsafe"),
    ("{% for i in range(10**9) %}x{% endfor %}", "too large"),
    ("{{ 'a' * 10**8 }}", "too large"),
    ("{% for m in messages %}{{ raise_exception('Conversation roles must alternate') }}{% endfor %}",
     "Conversation roles must alternate"),
    ("{% if %}", "not valid Jinja"),
])
def test_hostile_or_failing_templates_raise_tokenizer_error(template, match):
    with pytest.raises(TokenizerError, match=match):
        render_chat_template(template, messages=[{"role": "user", "content": "hi"}])


def test_template_render_time_is_bounded(monkeypatch):
    import time

    from stablelm_ref import tokenizer

    monkeypatch.setattr(tokenizer, "TEMPLATE_MAX_SECONDS", 0.2)
    t0 = time.monotonic()
    with pytest.raises(TokenizerError, match="longer than"):  # 10^10 empty iterations without the limit
        render_chat_template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                             messages=[])
    assert time.monotonic() - t0 < 5


def test_no_template_is_a_clear_error(tmp_path):
    tok = Tokenizer.from_pretrained(tiny_tokenizer_dir(str(tmp_path / "t"), chat_template=None))
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_tojson_is_not_html_escaped():
    out = render_chat_template("{{ messages | tojson }}", messages=[{"role": "user", "content": "<a> & é"}])
    assert json.loads(out) == [{"role": "user", "content": "<a> & é"}] and "<a> & é" in out


# ---- class: a present but malformed value read as absent ----------------------------------------------------

@pytest.mark.parametrize("value, match", [
    (5, "must be a template string or a list of"),
    ({"default": 5}, "must be a template string or a list of"),
    ([5], r"entry \[0\] must be an object \{\"name\": a string, \"template\": a string\}, got 5"),
    ([{"name": "default"}], r"entry \[0\] must be an object"),
    ([{"name": "default", "template": "x"}, {"name": 1, "template": "y"}], r"entry \[1\] must be an object"),
])
def test_a_malformed_chat_template_is_refused_at_load(tmp_path, value, match):
    """Before: each loaded, and apply_chat_template then said "this tokenizer has no chat template"."""
    directory = tiny_tokenizer_dir(str(tmp_path / "t"), chat_template=value)
    with pytest.raises(TokenizerError, match=f"{directory}: chat_template \\(tokenizer_config.json's .*{match}"):
        Tokenizer.from_pretrained(directory)


def test_a_name_given_to_two_chat_templates_keeps_the_later_one_with_a_warning(tmp_path):
    """transformers builds {name: template} from the list (tokenization_utils_base: a dict comprehension), so the
    later of two templates of one name wins, silently; it was a TokenizerError at load here. Now the later one
    is used, as there, with a warning naming the file and the name."""
    value = [{"name": "default", "template": "A:{{ messages[0].content }}"}, {"name": "x", "template": "X"},
             {"name": "default", "template": "B:{{ messages[0].content }}"}]
    directory = tiny_tokenizer_dir(str(tmp_path / "t"), chat_template=value)
    with pytest.warns(UserWarning, match=f"{re.escape(directory)}: chat_template .* names two templates 'default': "
                                         "the later one is used, as transformers does; rename one to keep both"):
        tok = Tokenizer.from_pretrained(directory)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "B:hi"
    assert list(tok.chat_template) == ["default", "x"]                   # a dict comprehension's order


@pytest.mark.parametrize("value", [5, [5], [{"name": "a", "template": "x"}, {"name": "a", "template": "y"}]])
def test_a_chat_template_jinja_file_replaces_the_config_value_unchecked(tmp_path, value):
    """chat_template.jinja wins over tokenizer_config.json's "chat_template" (transformers' from_pretrained drops
    the config's value then; checked with 5.24): a malformed value that is never used was refused at load here."""
    directory = tiny_tokenizer_dir(str(tmp_path / "t"), chat_template=value)
    with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
        f.write("J:{{ messages[0].content }}")
    tok = Tokenizer.from_pretrained(directory)
    assert tok.chat_template == "J:{{ messages[0].content }}"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "J:hi"


@pytest.mark.parametrize("value", [[], {}])
def test_an_empty_list_of_chat_templates_is_no_template(tmp_path, value):
    """transformers reads "chat_template": [] (or {}) as {}: no template of its own, a template passed to
    apply_chat_template renders (checked with 5.24). It was a TokenizerError at load here."""
    tok = Tokenizer.from_pretrained(tiny_tokenizer_dir(str(tmp_path / "t"), chat_template=value))
    assert tok.chat_template is None
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(TokenizerError, match="this tokenizer has no chat template"):
        tok.apply_chat_template(msgs)
    assert tok.apply_chat_template(msgs, chat_template="S:{{ messages[0].content }}") == "S:hi"


NAMED = [{"name": "tool_use", "template": "T:{{ messages[0].content }}"},
         {"name": "rag", "template": "R:{{ messages[0].content }}"}]


def test_named_chat_templates_are_picked_by_name_or_default(tmp_path):
    """tokenizer_config.json's list form (transformers: tokenizer.chat_template becomes {name: template}; the
    'default' one is used when none is asked for, and chat_template='name' picks one)."""
    msgs = [{"role": "user", "content": "hi"}]
    tok = Tokenizer.from_pretrained(tiny_tokenizer_dir(str(tmp_path / "d"), chat_template=NAMED + [
        {"name": "default", "template": "D:{{ messages[0].content }}"}]))
    assert tok.apply_chat_template(msgs) == "D:hi"
    assert tok.apply_chat_template(msgs, chat_template="tool_use") == "T:hi"
    assert tok.apply_chat_template(msgs, chat_template="X{{ messages|length }}") == "X1"    # a string, not a name
    tok = Tokenizer.from_pretrained(tiny_tokenizer_dir(str(tmp_path / "n"), chat_template=NAMED))
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=True)                     # it loads
    with pytest.raises(TokenizerError, match="chat templates named 'tool_use', 'rag' but none named 'default'.*"
                                             "pass chat_template='tool_use'"):
        tok.apply_chat_template(msgs)
    assert tok.apply_chat_template(msgs, chat_template="rag") == "R:hi"


@pytest.mark.parametrize("value, kept", [(2048, 2048), (2048.0, 2048), (10**30, 10**30)])
def test_model_max_length_as_a_whole_float_is_kept(tmp_path, value, kept):
    """Before: a float (2048.0) passed the check and was then dropped to None."""
    directory = tiny_tokenizer_dir(str(tmp_path / "t"))
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["model_max_length"] = value
    with open(path, "w") as f:
        json.dump(cfg, f)
    assert Tokenizer.from_pretrained(directory).model_max_length == kept
    cfg["model_max_length"] = 2048.5
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(TokenizerError, match="'model_max_length' must be a whole number >= 1"):
        Tokenizer.from_pretrained(directory)


# ---- the keywords transformers' tokenizers take: honoured where they apply, refused by name otherwise ----------

def test_return_tensors_np_is_what_it_returns_and_others_are_refused(tiny_dir):
    """Before: tok("abc", return_tensors="np") was a bare TypeError (an unexpected keyword)."""
    tok = Tokenizer.from_pretrained(tiny_dir)
    plain = tok(["abc", "a longer text"])
    for value in (None, "np"):
        enc = tok(["abc", "a longer text"], return_tensors=value)
        assert all(isinstance(v, np.ndarray) for v in enc.values())
        np.testing.assert_array_equal(enc["input_ids"], plain["input_ids"])
    for value in ("pt", "tf", "jax", "NP", np.array(["np"])):
        with pytest.raises(TokenizerError, match="always returns NumPy arrays .*torch.from_numpy"):
            tok("abc", return_tensors=value)


def test_padding_spellings_of_transformers(tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)
    texts = ["abc", "a longer text"]
    np.testing.assert_array_equal(tok(texts, padding="longest")["input_ids"], tok(texts)["input_ids"])
    with pytest.raises(TokenizerError, match="different lengths"):
        tok(texts, padding="do_not_pad")
    rows = [tok.encode(t) for t in texts]
    enc = tok(texts, padding="max_length", max_length=12)
    pad = tok.pad_token_id
    for i, r in enumerate(rows):          # left padding to 12: pads, then the row; the mask marks the row
        assert enc["input_ids"][i].tolist() == [pad] * (12 - len(r)) + r
        assert enc["attention_mask"][i].tolist() == [0] * (12 - len(r)) + [1] * len(r)
    with pytest.raises(TokenizerError, match=f"has {max(map(len, rows))} tokens, more than max_length=2"):
        tok(texts, padding="max_length", max_length=2)
    for bad in (None, 0, 2.0, True):
        with pytest.raises(TokenizerError, match="padding='max_length' needs max_length"):
            tok(texts, padding="max_length", max_length=bad)
    with pytest.raises(TokenizerError, match="max_length=4 is used only with padding='max_length'"):
        tok(texts, max_length=4)
    with pytest.raises(TokenizerError, match="'padding' must be True or False, got 'right'.*'longest'"):
        tok(texts, padding="right")


def test_max_length_beyond_memory_is_refused_by_name(tiny_dir):
    """Before: tok(["hi"], padding="max_length", max_length=10**12) was NumPy's raw "Unable to allocate 7.28 TiB"
    (the ids alone). Ids and mask, 8 bytes each: 16 TB, more than any host has, so the guard must refuse it."""
    tok = Tokenizer.from_pretrained(tiny_dir)
    with pytest.raises(TokenizerError, match=r"padding 1 text\(s\) to max_length=1,000,000,000,000 needs "
                                             r"14,901\.2 GiB.*a smaller max_length"):
        tok(["hi"], padding="max_length", max_length=10**12)



def test_truncation_is_refused_and_return_attention_mask_honoured(tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)
    for value in (None, False, "do_not_truncate"):
        assert tok("abc", truncation=value)["input_ids"].tolist() == [tok.encode("abc")]
    for value in (True, "longest_first", "only_first"):
        with pytest.raises(TokenizerError, match="does not cut texts; slice the ids"):
            tok("abc", truncation=value)
    assert list(tok("abc", return_attention_mask=False)) == ["input_ids"]
    with pytest.raises(TokenizerError, match="'return_attention_mask' must be True or False"):
        tok("abc", return_attention_mask="no")
    for keyword in ("text_pair", "return_token_type_ids", "padding_side", "stride"):
        with pytest.raises(TokenizerError, match=f"the tokenizer call takes no '{keyword}'; it takes text, padding"):
            tok("abc", **{keyword: 1})


def test_a_special_token_is_checked_in_both_files_that_can_name_it(tmp_path):
    """tokenizer_config.json's bos_token wins over special_tokens_map.json's, as in transformers; the map's value
    was then never looked at, malformed or not."""
    directory = tiny_tokenizer_dir(str(tmp_path / "t"))
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": 5}, f)
    with pytest.raises(TokenizerError, match=r"special_tokens_map.json: bos_token must be a string or \{'content'"):
        Tokenizer.from_pretrained(directory)
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<|padding|>", "unk_token": {"content": "<|padding|>"}}, f)
    tok = Tokenizer.from_pretrained(directory)
    assert tok.bos_token == "<|endoftext|>" and tok.unk_token == "<|padding|>"     # config's bos, the map's unk


def test_check_vocabulary_refuses_only_a_tokenizer_of_more_ids_than_the_model(tmp_path):
    """The one rule of generate, chat and trace --text: a tokenizer fits a model whose vocabulary holds every id it
    can give (as many or more: checkpoints pad vocab_size, 50304 for 50277 ids); one more id and it is refused,
    naming the directory and both sizes. Nothing tested the boundary: refusing an exact fit passed every test."""
    tok = Tokenizer.from_pretrained(tiny_tokenizer_dir(str(tmp_path / "t")))
    n = tok.vocab_size
    tok.check_vocabulary(n, "here")
    tok.check_vocabulary(n + 3, "here")
    with pytest.raises(TokenizerError, match=f"^here: the tokenizer has {n} ids but the model's vocabulary has "
                                             f"{n - 1}: they do not belong together; give the model's own tokenizer$"):
        tok.check_vocabulary(n - 1, "here")
