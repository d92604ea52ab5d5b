"""The tokenizer: text <-> ids through the `tokenizers` library, left padding, chat templates.

    ids   = post_process(bpe(pre_tokenize(normalize(text))))      tokenizer.json (the `tokenizers` library)
    batch = [pad] * (width - len(ids)) + ids,  mask = [0] * (width - len(ids)) + [1] * len(ids)
    text  = decode(ids)                                           (special tokens dropped on request)

A model directory holds tokenizer.json (vocabulary, merges, normalizer, pre-tokenizer, decoder) and
usually tokenizer_config.json / special_tokens_map.json, which name the special tokens (bos, eos,
pad, unk), say whether to add bos/eos to each text, and carry the chat template. StableLM 3b-4e1t
uses the GPT-NeoX-20B BPE (50277 tokens, `<|endoftext|>` = 0 is bos, eos and unk; `<|padding|>` is id 1
but is not configured as the pad token);
StableLM 2 uses Arcade100k. A directory holding only tokenizer.json gets GPT-NeoX defaults:
`<|endoftext|>` as bos and eos when the vocabulary has it.

Padding goes on the left (a decoder continues from the last position of every row). Without a pad
token, rows are padded with eos: the attention mask marks those slots, so their id never matters.

Chat templates are Jinja; they come with downloaded files, so they render in jinja2's
ImmutableSandboxedEnvironment (no access to Python internals: `''.__class__` is an error, not an
empty string), with limits on output length, range sizes, render time (TEMPLATE_MAX_SECONDS, checked on
every line the render runs) and new memory (TEMPLATE_MAX_BYTES, enforced with the process's address-space
limit while the render runs: see _bounded for what that means for other threads).

Files: tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja.
"""

from __future__ import annotations

import json
import os
import reprlib
import sys
import threading
import time
import warnings
from datetime import datetime

import numpy as np

from . import bounded_io
from ._xp import host_array, refuse_masked
from .errors import TokenizerError, check_flag, is_int, printable

SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")
NEOX_DEFAULT = "<|endoftext|>"
# transformers' apply_chat_template passes these to the tokenizer; here they would be template variables, unused
_CHAT_TOKENIZER_KEYWORDS = ("return_tensors", "return_dict", "padding", "truncation", "max_length",
                            "return_attention_mask", "tokenizer_kwargs")
# transformers' apply_chat_template options that change its answer and are not done here: what each does there
_CHAT_NOT_DONE = {"continue_final_message": "the text ends at the last message's content, which the model goes on "
                                            "with: render with add_generation_prompt=False and cut the text after "
                                            "that content yourself",
                  "return_assistant_tokens_mask": "a mask of the assistant's tokens, from {% generation %} blocks"}
TEMPLATE_MAX_CHARS = 1_000_000  # rendered chat prompt
TEMPLATE_MAX_SECONDS = 2.0
TEMPLATE_MAX_RANGE = 100_000
TEMPLATE_MAX_BYTES = 256 * 2**20  # new memory one render may take (Linux: enforced with RLIMIT_AS)
# Size caps, checked before a file is read (real files: tokenizer.json 2-7 MB, the others < 1 MB).
MAX_FILE_BYTES = {"tokenizer.json": 64 * 2**20, "tokenizer_config.json": 16 * 2**20,
                  "special_tokens_map.json": 2**20, "chat_template.jinja": 2**20}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of tokenizer_config.json."""

    def __init__(self, backend, bos_token=None, eos_token=None, pad_token=None, unk_token=None,
                 add_bos_token=False, add_eos_token=False, chat_template=None, model_max_length=None, source="<memory>"):
        self.backend = backend
        self.backend.no_padding()
        self.backend.no_truncation()
        self.source = source
        self.add_bos_token = _flag(add_bos_token, "add_bos_token")
        self.add_eos_token = _flag(add_eos_token, "add_eos_token")
        self.chat_template = _chat_templates(chat_template, source)
        self.model_max_length = model_max_length
        for name, token in zip(SPECIAL_NAMES, (bos_token, eos_token, pad_token, unk_token)):
            if token is not None and not isinstance(token, str):
                raise TokenizerError(f"{source}: {name} must be a string (the token's text), got {token!r}")
            if token is not None and backend.token_to_id(token) is None:
                raise TokenizerError(f"{source}: {name} {token!r} is not in the vocabulary of tokenizer.json; fix "
                                     "tokenizer_config.json / special_tokens_map.json")
            setattr(self, name, token)
        vocab = backend.get_vocab(with_added_tokens=True)
        self._vocab_size = max(backend.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)

    # ---- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, revision=None, cache_dir=None, **hub_kwargs):
        """Load from a directory, a Hub repo id (its *.json files, through hub.snapshot), or
        "stablelm-ref:default" (stablelm_ref.DEFAULT_MODEL), the model shipped inside the package."""
        from . import hub

        path = hub.model_directory(path, error=TokenizerError, holds="tokenizer.json", revision=revision,
                                   cache_dir=cache_dir, **hub_kwargs)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.lexists(tok_file):
            raise TokenizerError(f"{path}: no tokenizer.json (the only tokenizer format read here); add the "
                                 "model's tokenizer.json to the directory")
        backend = _load_backend(tok_file, root=path)
        config = _read_json(os.path.join(path, "tokenizer_config.json"), path)
        special_map = _read_json(os.path.join(path, "special_tokens_map.json"), path)
        tokens = {}
        for name in SPECIAL_NAMES:       # tokenizer_config.json's value wins; special_tokens_map.json's is checked too
            mapped = _token_content(special_map.get(name), name, f"{path}: special_tokens_map.json")
            tokens[name] = _token_content(config[name], name, f"{path}: tokenizer_config.json") if name in config \
                else mapped
        if tokens["bos_token"] is None and tokens["eos_token"] is None and backend.token_to_id(NEOX_DEFAULT) is not None:
            tokens["bos_token"] = tokens["eos_token"] = tokens["unk_token"] = NEOX_DEFAULT
        template = config.get("chat_template")      # checked by __init__, unless chat_template.jinja replaces it
        template_file = os.path.join(path, "chat_template.jinja")
        if os.path.lexists(template_file):
            raw = bounded_io.read_bytes(template_file, MAX_FILE_BYTES["chat_template.jinja"], TokenizerError, path)
            try:
                template = raw.decode("utf-8")                        # the file wins, as in transformers
            except UnicodeDecodeError as e:
                raise TokenizerError(f"{template_file}: not UTF-8 (offset {e.start}); fix or re-download it") from None
        max_len = config.get("model_max_length")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, (int, float)) or
                                    not max_len >= 1 or not float(max_len).is_integer()):
            raise TokenizerError(f"{path}: tokenizer_config.json key 'model_max_length' must be a whole number >= 1, "
                                 f"got {max_len!r}")
        flags = {key: _flag(config.get(key, False), key, f"{path}: tokenizer_config.json key", json=True)
                 for key in ("add_bos_token", "add_eos_token")}
        return cls(backend, **tokens, **flags, chat_template=template,
                   model_max_length=None if max_len is None else int(max_len), source=path)

    @classmethod
    def from_file(cls, tokenizer_json, **kwargs):
        """Only a tokenizer.json: give the special tokens as keyword arguments (GPT-NeoX defaults)."""
        if not isinstance(tokenizer_json, (str, os.PathLike)):
            raise TokenizerError(f"give the path of a tokenizer.json, got {tokenizer_json!r}")
        backend = _load_backend(os.fspath(tokenizer_json))
        if backend.token_to_id(NEOX_DEFAULT) is not None:
            for name in ("bos_token", "eos_token", "unk_token"):
                kwargs.setdefault(name, NEOX_DEFAULT)
        return cls(backend, source=os.fspath(tokenizer_json), **kwargs)

    def _library(self, doing, call, *args, **kwargs):
        """A call into the tokenizers library; a Rust panic (pyo3's PanicException, a BaseException that no
        `except Exception` catches: e.g. a tokenizer.json regex that exceeds the regex engine's limits on a
        text) becomes a TokenizerError naming the file."""
        try:
            return call(*args, **kwargs)
        except BaseException as e:
            if not _is_panic(e):
                raise
            raise TokenizerError(f"{self.source}: the tokenizers library failed while {doing} "
                                 f"({_first_line(e)}); tokenizer.json cannot handle this input") from None

    # ---- ids of the special tokens ------------------------------------------------------------
    def token_to_id(self, token):
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self):
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self):
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self):
        return self.token_to_id(self.pad_token)

    @property
    def unk_token_id(self):
        return self.token_to_id(self.unk_token)

    @property
    def vocab_size(self):
        """Number of ids, added tokens included (the largest id + 1)."""
        return self._vocab_size

    def __len__(self):
        return self.vocab_size

    def check_vocabulary(self, vocab_size, where):
        """TokenizerError when this tokenizer has more ids than a model's vocabulary (config.json's vocab_size) holds:
        some text would give ids the model has no embedding for, so the two do not belong together. The one rule of
        the commands that pair a model with its directory's tokenizer (generate, chat, trace --text)."""
        if self.vocab_size > vocab_size:
            raise TokenizerError(f"{where}: the tokenizer has {self.vocab_size} ids but the model's vocabulary has "
                                 f"{vocab_size}: they do not belong together; give the model's own tokenizer")

    # ---- encoding -----------------------------------------------------------------------------
    def encode(self, text, add_special_tokens=True):
        """One text -> list of ids (tokenizer.json's post-processor, then add_bos/add_eos_token)."""
        check_text(text)
        add_special_tokens = _flag(add_special_tokens, "add_special_tokens")
        ids = self._library("encoding a text", self.backend.encode, text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
                ids = [self.bos_token_id] + ids
            if self.add_eos_token and self.eos_token_id is not None and ids[-1:] != [self.eos_token_id]:
                ids = ids + [self.eos_token_id]
        return ids

    def __call__(self, text, padding=True, add_special_tokens=True, return_tensors=None, max_length=None,
                 truncation=None, return_attention_mask=True, **others):
        """A text or a list of texts -> {"input_ids": [B, T] int64, "attention_mask": [B, T] int64}, NumPy arrays.

        The keywords transformers' tokenizers take, as far as they apply here:
            padding         True / "longest" (default): rows of different lengths are padded on the left to the
                            longest; "max_length": every row to max_length (a longer row is an error, and so is a
                            max_length whose arrays cannot fit in memory); False /
                            "do_not_pad": the rows must have equal lengths
            return_tensors  None or "np": NumPy arrays are what it returns; "pt", "tf", "jax", "mlx" are refused
                            (convert the arrays, e.g. torch.from_numpy)
            truncation      None, False or "do_not_truncate": cutting texts to max_length is not done here
                            (transformers cuts the end; slice the ids instead)
            return_attention_mask   False leaves "attention_mask" out
        Any other keyword is a TokenizerError naming it (transformers' return_token_type_ids, text_pair, ...)."""
        if others:
            raise TokenizerError(f"the tokenizer call takes no {next(iter(others))!r}; it takes text, padding, "
                                 "add_special_tokens, return_tensors ('np'), max_length (with padding='max_length') "
                                 "and return_attention_mask")
        if not (return_tensors is None or _is_string(return_tensors, "np")):
            raise TokenizerError(f"return_tensors={return_tensors!r}: this tokenizer always returns NumPy arrays "
                                 "(return_tensors=None or 'np'); convert them yourself, e.g. "
                                 "torch.from_numpy(enc['input_ids'])")
        if not (truncation is None or truncation is False or _is_string(truncation, "do_not_truncate")):
            raise TokenizerError(f"truncation={truncation!r}: this tokenizer does not cut texts; slice the ids "
                                 "(enc['input_ids'][:, :n] keeps the first n tokens, as transformers' truncation "
                                 "does) or shorten the text")
        return_attention_mask = _flag(return_attention_mask, "return_attention_mask")
        if isinstance(padding, str):
            padding = {"longest": True, "do_not_pad": False}.get(padding, padding)
        if _is_string(padding, "max_length"):
            if not (is_int(max_length) and max_length >= 1):
                raise TokenizerError(f"padding='max_length' needs max_length, an integer >= 1; got {max_length!r}")
            max_length = int(max_length)
        elif max_length is not None:
            raise TokenizerError(f"max_length={max_length!r} is used only with padding='max_length' (transformers "
                                 "would also cut longer texts: this tokenizer does not)")
        else:
            padding = _flag(padding, "padding", advice=" (transformers' strings 'longest', 'max_length' and "
                                                        "'do_not_pad' are taken too); left padding is the only kind")
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise TokenizerError("give a string or a non-empty list of strings to tokenize")
        if _is_string(padding, "max_length"):    # ids and mask, int64 each: 10**12 was NumPy's "Unable to allocate"
            bounded_io.check_memory(len(texts) * max_length * 8 * 2,
                                    f"padding {len(texts)} text(s) to max_length={max_length:,}", TokenizerError,
                                    "a smaller max_length")
        rows = [self.encode(t, add_special_tokens) for t in texts]
        width = max(len(r) for r in rows)
        if _is_string(padding, "max_length"):
            if width > max_length:
                raise TokenizerError(f"a text has {width} tokens, more than max_length={max_length}; this tokenizer "
                                     "does not cut texts: shorten it or raise max_length")
            width = max_length
        if any(len(r) != width for r in rows):
            if not padding:
                raise TokenizerError("the texts have different lengths in tokens: pass padding=True")
        pad_id = self.pad_token_id if self.pad_token_id is not None else self.eos_token_id
        if pad_id is None and any(len(r) != width for r in rows):
            raise TokenizerError(f"{self.source}: no pad_token and no eos_token to pad with; set pad_token")
        ids = np.full((len(rows), width), pad_id if pad_id is not None else 0, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r):] = r
                mask[i, width - len(r):] = 1
        return {"input_ids": ids, "attention_mask": mask} if return_attention_mask else {"input_ids": ids}

    # ---- decoding -----------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens=False):
        """ids -> text. Ids the tokenizer does not have decode to nothing, as in the tokenizers library: a
        model's embedding is often padded past the tokenizer (50304 rows for 50277 tokens in 3b-4e1t)
        and sampling can, rarely, pick one of those rows."""
        skip_special_tokens = _flag(skip_special_tokens, "skip_special_tokens")
        ids = _id_array(ids, "decode")
        if ids.ndim != 1:
            raise TokenizerError(f"decode takes one sequence of ids, got shape {ids.shape}; use batch_decode")
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise TokenizerError(f"negative token id {min(ids)}: ids are >= 0")
        n = self._vocab_size
        return self._library("decoding ids", self.backend.decode, [i for i in ids if i < n],
                             skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens=False):
        sequences = _id_array(sequences, "batch_decode")
        if sequences.ndim != 2:
            raise TokenizerError(f"batch_decode takes [batch, seq_len] ids, got shape {sequences.shape}")
        return [self.decode(row, skip_special_tokens) for row in sequences]

    # ---- chat template ------------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, chat_template=None,
                            **kwargs):
        """Render the conversation with the chat template (sandboxed); token ids if tokenize=True.

        chat_template: a template string, or, as in transformers, the name of one of the tokenizer's named
        templates (tokenizer_config.json's list form); None: the tokenizer's template (its 'default' one).
        Other keywords are template variables, except transformers' tokenizer keywords (return_tensors,
        return_dict, padding, truncation, max_length, return_attention_mask, tokenizer_kwargs): those are a
        TokenizerError when set (not None or False), since the template would take them silently and the result
        would not be what they ask for; call the tokenizer on the rendered text for arrays. So are, set, the options
        of transformers' not done here (continue_final_message, return_assistant_tokens_mask)."""
        for name, what in _CHAT_NOT_DONE.items():
            value = kwargs.pop(name, None)
            if not (value is None or value is False):
                raise TokenizerError(f"apply_chat_template does not do {name}={printable(reprlib.repr(value))} "
                                     f"(in transformers: {what})")
        for name in _CHAT_TOKENIZER_KEYWORDS:
            value = kwargs.pop(name, None)
            if not (value is None or value is False or (isinstance(value, dict) and not value)):
                raise TokenizerError(
                    f"apply_chat_template takes no {name}={printable(reprlib.repr(value))}: it returns the rendered "
                    "text (tokenize=False, the default) or a list of ids (tokenize=True); for arrays call the "
                    "tokenizer on the text: tok(tok.apply_chat_template(messages), add_special_tokens=False, "
                    "return_tensors='np'), where padding=, max_length= and return_attention_mask= apply")
        add_generation_prompt = _flag(add_generation_prompt, "add_generation_prompt")
        tokenize = _flag(tokenize, "tokenize")
        template = self._template(chat_template)
        if not isinstance(messages, (list, tuple)) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise TokenizerError("messages must be a list of {'role': ..., 'content': ...} dicts")
        context = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                   "pad_token": self.pad_token or "", "unk_token": self.unk_token or "", **kwargs}
        text = render_chat_template(template, messages=list(messages),
                                    add_generation_prompt=add_generation_prompt, **context)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _template(self, chat_template):
        """The template apply_chat_template renders (see there)."""
        named = self.chat_template if isinstance(self.chat_template, dict) else {}
        if chat_template is not None:
            return named.get(chat_template, chat_template) if isinstance(chat_template, str) else chat_template
        if self.chat_template is None:
            raise TokenizerError(f"{self.source}: this tokenizer has no chat template (tokenizer_config.json "
                                 "'chat_template'); pass chat_template=... or use a chat model's tokenizer")
        if isinstance(self.chat_template, str):
            return self.chat_template
        if "default" not in named:
            raise TokenizerError(f"{self.source}: the tokenizer has chat templates named "
                                 f"{', '.join(map(repr, named))} but none named 'default', the one used when none is "
                                 f"asked for; pass chat_template={next(iter(named))!r} (a name) or a template string")
        return named["default"]


# ---- the sandbox --------------------------------------------------------------------------------

def _sandbox():
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class LimitedSandbox(ImmutableSandboxedEnvironment):
        """No Python internals (errors, not silent blanks), bounded ranges and sequence sizes (the render's
        time and memory are bounded by _bounded)."""

        intercepted_binops = frozenset({"*", "**"})

        def unsafe_undefined(self, obj, attribute):
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} object is unsafe")

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > TEMPLATE_MAX_CHARS:
                        raise SecurityError("the template builds a sequence too large to render")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1000:
                raise SecurityError("the template raises to a power too large to compute")
            return super().call_binop(context, operator, left, right)

    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def checked_range(*args):
        r = range(*args)
        if len(r) > TEMPLATE_MAX_RANGE:
            raise SecurityError(f"range of {len(r)} items is too large (at most {TEMPLATE_MAX_RANGE})")
        return r

    def raise_exception(message):
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.globals.update(range=checked_range, raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    env.filters["tojson"] = tojson
    return env


_ENV = None


def _address_space():
    """The process's virtual memory size in bytes (Linux /proc/self/statm), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class _RenderTimeout(BaseException):
    """The render ran past TEMPLATE_MAX_SECONDS. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on its way out can swallow it: jinja2 has such handlers (the `is sequence` test
    around len(), the sandbox's getitem), and CPython removes a trace function once it has raised, so a
    swallowed timeout would leave the rest of the render unbounded."""


_RENDER_LOCK = threading.Lock()


def _bounded(render):
    """render() within TEMPLATE_MAX_SECONDS and TEMPLATE_MAX_BYTES of new memory; one render at a time.

    Time: a trace function (sys.settrace, this thread) looks at the clock on every line that runs in
    render() (the template's compiled code and jinja2's runtime are Python, generators included), so a loop
    with an empty body ends too, and raises _RenderTimeout at the first line past the deadline (on lines
    only: not on the 'call' event of a generator being closed by the garbage collector, where an exception
    is printed and dropped). What it cannot interrupt is a single C call; those are bounded by the memory
    limit. Memory (Linux): the address-space limit (RLIMIT_AS) is lowered to what the process uses now
    plus TEMPLATE_MAX_BYTES, so an allocation past it raises MemoryError instead of growing the process.
    The sandbox's own checks (`*`, `**`, range sizes, output length) do not bound memory alone: `~`
    doubling a string in a loop, str.replace or a format width multiply it too. Both are restored in this
    function's own frame, which began before the trace function was set and so is never traced: the
    clean-up cannot be cut short by the deadline (a `with` block's __exit__ would be a traced frame).

    The trade-off: RLIMIT_AS belongs to the whole process, so while a render runs (at most
    TEMPLATE_MAX_SECONDS) an allocation by another thread of the process (a server's thread pool) that
    needs new address space can fail with MemoryError too. Renders themselves take _RENDER_LOCK, one at a
    time: two overlapping renders would otherwise each restore the limit the other had set, leaving the
    process capped after both ended."""
    with _RENDER_LOCK:
        deadline = time.monotonic() + TEMPLATE_MAX_SECONDS

        def tracer(frame, event, arg):
            if event == "line" and time.monotonic() > deadline:
                raise _RenderTimeout()
            return tracer

        old_limit, used = None, _address_space()
        try:
            import resource

            old_limit = resource.getrlimit(resource.RLIMIT_AS)
            if used is not None:
                cap = used + TEMPLATE_MAX_BYTES
                hard = old_limit[1]
                resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard),
                                                        hard))
        except (ImportError, ValueError, OSError):
            old_limit = None
        old_trace = sys.gettrace()
        sys.settrace(tracer)
        try:
            return render()
        finally:
            sys.settrace(old_trace)
            if old_limit is not None:
                resource.setrlimit(resource.RLIMIT_AS, old_limit)


def render_chat_template(template, /, **context):
    """Render a chat template string in the sandbox, bounded in time and memory (see _bounded);
    every failure is a TokenizerError."""
    from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError

    global _ENV
    if _ENV is None:
        _ENV = _sandbox()
    if not isinstance(template, str):
        raise TokenizerError(f"a chat template is a string, got {type(template).__name__}")
    pieces = []

    def render():
        size = 0
        for piece in _ENV.from_string(template).generate(**context):
            size += len(piece)
            if size > TEMPLATE_MAX_CHARS:
                raise SecurityError(f"the rendered chat prompt exceeds {TEMPLATE_MAX_CHARS} characters")
            pieces.append(piece)
        return "".join(pieces)

    try:
        return _bounded(render)
    except TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None
    except SecurityError as e:
        raise TokenizerError(f"the chat template was refused by the sandbox: {e}") from None
    except _RenderTimeout:
        raise TokenizerError(f"the chat template was refused by the sandbox: rendering took longer than "
                             f"{TEMPLATE_MAX_SECONDS} s") from None
    except TemplateError as e:
        raise TokenizerError(f"the chat template failed: {e}") from None
    except MemoryError:
        pieces.clear()                                   # the traceback keeps render()'s frame: free the text now
        raise TokenizerError(f"the chat template was refused by the sandbox: it needs more than "
                             f"{TEMPLATE_MAX_BYTES // 2**20} MiB of memory") from None
    except Exception as e:  # noqa: BLE001 - whatever the template's code raised (LookupError from
        # str.encode('bogus'), AssertionError from truncate(-5), ...): the template failed, not this package
        raise TokenizerError(f"the chat template failed: {type(e).__name__}: {str(e)[:200]}") from None


# ---- files --------------------------------------------------------------------------------------

def _load_backend(path, root=None):
    """tokenizer.json, read through bounded_io (a regular file, size-capped, inside `root`), parsed by
    the `tokenizers` library from the checked text."""
    from tokenizers import Tokenizer as Backend

    raw = bounded_io.read_bytes(path, MAX_FILE_BYTES["tokenizer.json"], TokenizerError, root)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 (offset {e.start}); re-download it") from None
    try:
        return Backend.from_str(text)
    except BaseException as e:  # the Rust library raises plain Exception subclasses, or panics
        if not isinstance(e, Exception) and not _is_panic(e):
            raise
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({_first_line(e)}); re-download it") from None


def _read_json(path, root):
    """{} when the file is absent; a JSON object read through bounded_io otherwise."""
    if not os.path.lexists(path):
        return {}
    data = bounded_io.read_json(path, MAX_FILE_BYTES[os.path.basename(path)], TokenizerError, root)
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: must hold a JSON object")
    return data


def _chat_templates(value, source):
    """The chat template a tokenizer uses (tokenizer_config.json's "chat_template", the chat_template.jinja that
    replaces it, or the argument), checked once: None, a string, or the named form, a list of {"name": ...,
    "template": ...} objects with string values, returned as {name: template} (what transformers keeps as
    tokenizer.chat_template, a name given twice keeping the later template, with a warning here; the 'default'
    one is used when none is asked for). An empty
    list (or {}) is no template: transformers keeps {} and renders only a template passed to it. A malformed
    value is a TokenizerError naming `source`, not "no chat template" when a chat is rendered."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, dict)) and not value:
        return None
    where = f"{source}: chat_template (tokenizer_config.json's \"chat_template\", or the chat_template argument)"
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)                                                # the {name: template} form, in memory
    if not isinstance(value, list):
        raise TokenizerError(f"{where} must be a template string or a list of "
                             f'{{"name": ..., "template": ...}} objects, got {reprlib.repr(value)}')
    named = {}
    for i, entry in enumerate(value):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)):
            raise TokenizerError(f"{where}: entry [{i}] must be an object {{\"name\": a string, \"template\": a "
                                 f"string}}, got {reprlib.repr(entry)}")
        if entry["name"] in named:                # transformers' {name: template for ...}: the later one, silently
            warnings.warn(f"{where} names two templates {printable(repr(entry['name']))}: the later one is used, as "
                          "transformers does; rename one to keep both", stacklevel=2)
        named[entry["name"]] = entry["template"]
    return named


def _token_content(value, name, path):
    """A special token is a string or an AddedToken dict {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{path}: {name} must be a string or {{'content': ...}}, got {value!r}")


def _flag(value, name, where="", advice="", json=False):
    """A True/False argument or file key (errors.check_flag: the string "false" would be true, silently; json:
    a file's key, its message spelling the values as JSON does)."""
    return check_flag(value, f"{where + ' ' if where else ''}{name!r}", TokenizerError, advice, json)


def _is_string(value, text):
    """value is the string `text` (an array or other object compares as not equal, never elementwise)."""
    return isinstance(value, str) and value == text


def _is_panic(e):
    """pyo3's PanicException (a Rust panic inside the tokenizers library), known by name: it is not importable."""
    return type(e).__name__ == "PanicException"


def _first_line(e):
    """An exception's message for one line of ours: its first line (at most 200 characters), else its type."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def check_text(text, what="text"):
    """A str that UTF-8 can encode; a lone surrogate (what Python makes of invalid UTF-8 bytes in
    command-line arguments, or of a broken \\ud800 escape) is refused with its position."""
    if not isinstance(text, str):
        raise TokenizerError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"{what} holds {text[e.start]!r} at character {e.start}, a lone surrogate that is not "
                             "valid Unicode (invalid UTF-8 in the input?); fix the input's encoding") from None
    return text


def _id_array(ids, what):
    """Token ids (list, NumPy or CuPy array) -> a NumPy integer array, or TokenizerError."""
    refuse_masked(ids, f"the ids given to {what}", "the ids to decode as a plain array (ids.compressed() for the "
                  "unmasked ones of one sequence)", TokenizerError)
    arr = host_array(ids)
    if arr is None or (arr.dtype.kind not in "iu" and arr.size) or arr.dtype.kind == "b":
        raise TokenizerError(f"{what} takes integer token ids (a list or an integer array), got "
                             f"{type(ids).__name__}" + (f" of {arr.dtype}" if arr is not None else ""))
    return arr.astype(np.int64) if arr.size == 0 else arr


__all__ = ["Tokenizer", "render_chat_template"]
