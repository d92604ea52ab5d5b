"""Text generation: logits processors, greedy and sampled decoding, stopping at EOS, streaming.

    prefill:  z = model(prompt, mask, positions = cumsum(mask) - 1)[:, -1]      one forward, fills the cache
    step:     z = repetition_penalty(z) -> z / temperature -> top_k(z) -> top_p(z)   (transformers' order)
              next = argmax z                               do_sample=False (greedy)
                   | next ~ softmax(z)                      do_sample=True, np.random.default_rng(seed)
              next = pad_token_id where the row has already produced EOS
              z = model(next, cache, positions = previous + 1)[:, -1]              one token per row

with each processor as transformers defines it:

    repetition_penalty  z_v = z_v / p if z_v > 0 else z_v * p,  for every id v already in the row
                        (prompt and generated; the left padding is ignored, as transformers 5 does)
    temperature         z = z / T
    top_k               keep z_v >= (k-th largest z); ties at the k-th value are kept
    top_p               sort ascending, drop the tokens whose cumulative probability is <= 1 - p:
                        the smallest set of the most likely tokens whose probability reaches p stays

Padding is on the left: a row's position ids come from its attention mask (cumsum - 1, pad slots 0),
so a left-padded row produces the same tokens as the row alone. The KV cache is preallocated for
prompt + max_new_tokens positions and never grows; every forward asks only for the last position's
logits (logits_to_keep=1). Rows that produced an EOS id keep emitting pad_token_id (eos when the model
has no pad token, as transformers does) and generation stops early once every row is finished; the
result is the full sequences [B, prompt + generated] like transformers' generate.

The loop is the same on every device; each forward goes through a step backend (step_backend below):
the model's own forward (ModelSteps), or on the GPU the CUDA-graph decode engine (fast_gpu.EngineSteps).
The logits are processed where they are, in float32 (float64 for a float64 model: the golden reference;
transformers processes in float32), by the same functions on NumPy or CuPy arrays; the engine may pick
inside its step instead (the greedy argmax, or its sample_step kernel, whose spec is these functions).
Sampling draws u ~ U[0, 1) per row from np.random.default_rng(seed) on the host and inverts the cumulative
distribution, so a filtered token (probability exactly 0) can never be drawn, and a seed gives the same
tokens on the CPU and the GPU given the same logits (a backend that samples inside its step gets every
later step's draws at once: rng.random((steps, B)) gives the numbers of one rng.random(B) a step, in
order). The loop reads back B token ids per new token.

Defaults, as transformers' generate resolves them: an argument left out (None) takes the model's
generation config (model.generation_config, a generation_config.GenerationConfig: the model directory's
generation_config.json, or config.json's bos/eos/pad token ids when there is none), and a field the
generation config leaves unset takes transformers' default (GENERATION_DEFAULTS): greedy, temperature 1.0,
top_k 50, top_p 1.0, repetition_penalty 1.0, and 20 new tokens (capped at max_position_embeddings) when
no max_new_tokens or max_length is set anywhere. max_new_tokens (argument, else the generation config's)
wins over max_length (a total length, the argument's or the config's). eos_token_id / pad_token_id default
to the generation config's; an explicit None means none (eos_token_id=None never stops at an EOS, as in
transformers 5).

Guards: the KV cache's size (from max_new_tokens / max_length) is checked against free memory before it
is allocated; logits holding NaN or Inf stop generation with a GenerationError that names the first
non-finite intermediate (never a sample from NaN probabilities); a temperature so small that z / T
overflows gives that row its T -> 0 limit, greedy.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings

import numpy as np

from ._xp import softmax as array_softmax
from ._xp import to_host
from .errors import GenerationError, check_flag
from .generation_config import (DEFAULT_MAX_LENGTH, DEFAULT_TOP_K, GENERATION_DEFAULTS, check_values,
                                generation_config_of)
from .generation_config import token_ids as _token_ids
from .kv_cache import KVCache
from .model import check_context, mask_array, past_context

logger = logging.getLogger(__name__)



# ---- logits processors: [B, V] -> [B, V] --------------------------------------------------------

def _np(a):
    """NumPy, or CuPy for a CuPy array: the processors below run where the logits are (same code)."""
    return sys.modules["cupy"] if type(a).__module__.startswith("cupy") else np


def apply_repetition_penalty(scores, input_ids, penalty, ignore_prefix=None):
    """Penalise every id present in the row: positive scores / penalty, negative scores * penalty.

    scores [B, V]; input_ids [B, S] (on the scores' device); ignore_prefix [B]: leading positions (left
    padding) not counted.
    """
    xp = _np(scores)
    scores, ids = xp.asarray(scores), xp.asarray(input_ids)
    batch, vocab = scores.shape
    if ignore_prefix is not None:
        positions = xp.arange(ids.shape[1])[None, :]                      # [1, S]
        ids = xp.where(positions < xp.asarray(ignore_prefix)[:, None], vocab, ids)  # pad slots -> V (dropped)
    present = xp.zeros((batch, vocab + 1), dtype=bool)                   # [B, V + 1]
    present[xp.arange(batch)[:, None], ids] = True
    # In the scores' dtype, as transformers computes it (equal to the last bit); a penalty that dtype cannot hold is
    # applied in float64 and cast, giving the limit (2 / 1e-300 -> inf, 0 stays 0; in float32 it became 0 or inf and
    # 0 / 0 or 0 * inf made NaN)
    info = xp.finfo(scores.dtype)
    p = penalty if float(info.tiny) <= penalty <= float(info.max) else xp.float64(penalty)
    with np.errstate(over="ignore"):
        penalised = xp.where(scores < 0, scores * p, scores / p).astype(scores.dtype)
    return xp.where(present[:, :vocab], penalised, scores)


def apply_temperature(scores, temperature):
    """z / T. Where a temperature is so small that z / T overflows, the row becomes its T -> 0 limit:
    0 for the maximal scores and -inf elsewhere (sampling then draws among the maxima: greedy)."""
    xp = _np(scores)
    with np.errstate(over="ignore", divide="ignore"):                   # T below float32's range: 0 -> inf
        out = (scores / temperature).astype(scores.dtype)
    over = xp.any(xp.isposinf(out), axis=-1, keepdims=True)              # [B, 1] rows that overflowed
    top = xp.max(scores, axis=-1, keepdims=True)                        # [B, 1]
    limit = xp.where(scores == top, 0.0, -xp.inf).astype(scores.dtype)  # the T -> 0 row
    return xp.where(over, limit, out)


def apply_top_k(scores, k):
    """Keep the scores >= the k-th largest of each row; the rest become -inf."""
    xp = _np(scores)
    k = min(k, scores.shape[-1])
    kth = xp.partition(scores, -k, axis=-1)[:, -k:].min(axis=-1, keepdims=True)  # [B, 1]
    return xp.where(scores < kth, -xp.inf, scores).astype(scores.dtype)


def apply_top_p(scores, p):
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    xp = _np(scores)
    order = xp.argsort(scores, axis=-1, kind="stable")                   # ascending, [B, V]
    ascending = xp.take_along_axis(scores, order, axis=-1)
    cumulative = xp.cumsum(softmax(ascending), axis=-1)                   # [B, V]
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[:, -1] = False                                          # keep the most likely token
    remove = xp.empty_like(remove_sorted)
    remove[xp.arange(scores.shape[0])[:, None], order] = remove_sorted   # back to vocabulary order
    return xp.where(remove, -xp.inf, scores).astype(scores.dtype)


def softmax(scores):
    """Softmax over the last axis (_xp.softmax); a row holding +inf (scores that overflowed: a tiny
    temperature or repetition penalty) puts all its mass on the +inf entries, the limit of the finite case."""
    xp = _np(scores)
    inf_row = xp.isposinf(xp.max(scores, axis=-1, keepdims=True))       # [B, 1]
    scores = xp.where(inf_row, xp.where(xp.isposinf(scores), 0.0, -xp.inf), scores)
    return array_softmax(scores)


def sample(probs, rng):
    """One draw per row from probs [B, V] by inverting the cumulative distribution -> [B].

    The uniform draws come from rng (a numpy Generator, on the host) wherever probs are: the same seed
    and the same probabilities give the same tokens on the CPU and the GPU (up to the cumulative sum's
    rounding at a boundary)."""
    xp = _np(probs)
    probs = xp.asarray(probs, dtype=xp.float64)
    if not bool(xp.all(xp.isfinite(probs)) & xp.all(probs >= 0) & xp.all(xp.sum(probs, axis=-1) > 0)):
        raise GenerationError("the sampling probabilities are not a distribution (NaN, negative or all zero); "
                              "the logits were not finite")
    cdf = xp.cumsum(probs, axis=-1)                                      # [B, V]
    u = xp.asarray(rng.random(probs.shape[0])) * cdf[:, -1]              # [B]
    idx = xp.sum(cdf <= u[:, None], axis=-1)                             # first index with cdf > u
    last_possible = probs.shape[1] - 1 - xp.argmax(probs[:, ::-1] > 0, axis=-1)
    return xp.minimum(idx, last_possible)                                # rounding guard at u ~ 1


def process_logits(scores, sequences, settings, ignore_prefix=None):
    """transformers' order: repetition penalty (always), then for sampling temperature, top-k, top-p."""
    if settings["repetition_penalty"] != 1.0:
        scores = apply_repetition_penalty(scores, sequences, settings["repetition_penalty"], ignore_prefix)
    if settings["do_sample"]:
        if settings["temperature"] != 1.0:
            scores = apply_temperature(scores, settings["temperature"])
        if settings["top_k"]:
            scores = apply_top_k(scores, settings["top_k"])
        if settings["top_p"] < 1.0:
            scores = apply_top_p(scores, settings["top_p"])
    return scores


# ---- streaming ----------------------------------------------------------------------------------

class TextStreamer:
    """Prints text as it is generated (batch 1): transformers' streamer protocol, put(ids) / end().

    generate calls put(prompt_ids [1, T]) once, then put(next_ids [1]) per new token, then end().
    The text so far is decoded whole and only the new suffix is written, held back while it ends in
    an incomplete UTF-8 character (a byte-level BPE token can hold part of one).
    """

    def __init__(self, tokenizer, skip_prompt=True, skip_special_tokens=True, file=None):
        self.tokenizer = tokenizer
        self.skip_prompt = check_flag(skip_prompt, "skip_prompt", GenerationError)
        self.skip_special_tokens = check_flag(skip_special_tokens, "skip_special_tokens", GenerationError)
        self.file = file
        self.ids, self.printed, self.prompt_seen = [], 0, False
        self.text = ""

    def put(self, value):
        value = np.asarray(value)
        if value.ndim > 1 and value.shape[0] > 1:
            raise GenerationError("TextStreamer streams one sequence: generate a batch of 1 (or no streamer)")
        value = value.reshape(-1).tolist()
        if not self.prompt_seen:
            self.prompt_seen = True
            if self.skip_prompt:
                return
        self.ids.extend(value)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return  # an incomplete character: wait for the next token
        self._write(text[self.printed:])
        self.printed = len(text)
        self.text = text

    def end(self):
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        self._write(text[self.printed:] + "\n")
        self.text = text
        self.ids, self.printed, self.prompt_seen = [], 0, False

    def _write(self, s):
        out = self.file if self.file is not None else sys.stdout
        out.write(s)
        out.flush()


# ---- argument checking --------------------------------------------------------------------------

class _FromConfig:
    """The default of eos_token_id / pad_token_id: take the model's generation config (generation_config.json,
    else config.json). An explicit None means none (no EOS stop), as in transformers 5."""

    def __repr__(self):
        return "<from the model's generation config>"


FROM_CONFIG = _FromConfig()


def check_finite_scores(model, scores, sequences, mask, step):
    """GenerationError when the logits [B, V] hold NaN or Inf, naming the first intermediate (in execution
    order) of the reference forward over the sequences so far that is not finite. scores may live on the
    device (one small reduction). A step backend that picks inside its step reports the check with the ids
    (read_chosen)."""
    xp = _np(scores)
    if not bool(xp.all(xp.isfinite(scores))):
        raise_non_finite(model, sequences, mask, step)


def raise_non_finite(model, sequences, mask, step):
    """The GenerationError for non-finite logits at generation step `step` (see check_finite_scores)."""
    reference = getattr(model, "model", model)          # a fast form keeps its reference model
    first = _first_non_finite(reference, sequences, mask)
    where = f"; the first non-finite intermediate is {first}" if first else ""
    raise GenerationError(f"the logits are not finite (NaN or Inf) at generation step {step}{where}: the weights "
                          "or config.json (layer_norm_eps, rope scaling, huge weights) overflow in "
                          f"{np.dtype(model.dtype).name}; try dtype='float64' or check the checkpoint")


class _Found(Exception):
    pass


def _first_non_finite(reference, sequences, mask):
    def check(name, array):
        if not np.isfinite(np.asarray(to_host(array))).all():
            raise _Found(name)

    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0)
    try:
        with np.errstate(all="ignore"):                                   # the overflow is what we look for
            reference.forward(sequences, attention_mask=mask, position_ids=positions, trace=check)
    except _Found as e:
        return str(e)
    except Exception:  # noqa: BLE001 - only a diagnosis: the error raised is the caller's
        return None
    return None


def check_cache_memory(model, batch, total):
    """The memory guard for generate's KV cache [B, kv_heads, total, head_dim] x 2 x layers (and the
    token table), before it is allocated: sizes come from arguments (max_new_tokens, max_length)."""
    from .bounded_io import check_memory

    c = model.config
    need = (2 * c.num_hidden_layers * batch * c.num_key_value_heads * total * c.head_dim
            * np.dtype(model.dtype).itemsize + 2 * batch * total * 8)
    check_memory(need, f"generating {total:,} positions for {batch} row(s) (the KV cache)", GenerationError,
                 "lower max_new_tokens / max_length (--max-new-tokens) or the batch", xp=model.xp)


def _settings(model, prompt_len, max_new_tokens, max_length, do_sample, temperature, top_k, top_p,
              repetition_penalty, seed, batch, gc):
    """The decoding settings: each argument given (not None) wins, else the generation config's value (gc:
    generation_config_of(model), re-checked here as it may have been edited since it was read), else
    transformers' default (GENERATION_DEFAULTS)."""
    config = model.config
    if do_sample is not None:
        check_flag(do_sample, "do_sample", GenerationError)
    check_values(dict(max_new_tokens=max_new_tokens, max_length=max_length, temperature=temperature, top_k=top_k,
                      top_p=top_p, repetition_penalty=repetition_penalty, seed=seed))
    try:                                     # model.generation_config may have been edited since it was read
        gc.check()                           # its token ids: generate checks the ones it uses
    except GenerationError as e:
        raise GenerationError(f"model.generation_config: {e}") from None

    def pick(name, value):
        if value is not None:
            return value
        return getattr(gc, name) if getattr(gc, name) is not None else GENERATION_DEFAULTS[name]

    sampling = bool(pick("do_sample", do_sample))
    if not sampling and any(v not in (None, d) for v, d in ((temperature, 1.0), (top_k, DEFAULT_TOP_K),
                                                           (top_p, 1.0))):
        warnings.warn("do_sample=False: temperature, top_k and top_p are ignored (greedy decoding); pass "
                      "do_sample=True to sample", UserWarning, stacklevel=3)

    # The length, as transformers 5's _prepare_generated_length: max_new_tokens (the argument, else the
    # generation config's) wins over max_length (the argument's, else the config's: the total length); with
    # neither set anywhere, DEFAULT_MAX_LENGTH new tokens.
    new_tokens = max_new_tokens if max_new_tokens is not None else gc.max_new_tokens
    config_length = gc.max_length
    if new_tokens is not None:
        if max_length is not None:
            logger.warning("Both max_new_tokens (=%d) and max_length (=%d) are set; max_new_tokens takes "
                           "precedence", new_tokens, max_length)
        total = prompt_len + int(new_tokens)             # int: NumPy's uint8(255) + 2 would wrap to 1
    elif max_length is not None or config_length is not None:
        length = int(max_length if max_length is not None else config_length)
        if prompt_len >= length:
            source = "" if max_length is not None else " (from the model's generation config)"
            raise GenerationError(f"the prompt has {prompt_len} tokens but max_length{source} is {length}; "
                                  "increase max_length or, better, set max_new_tokens")
        total = length
    else:
        warnings.warn(f"Using the default max_length (={DEFAULT_MAX_LENGTH} new tokens); set max_new_tokens "
                      "to control the generation length", UserWarning, stacklevel=3)
        total = min(prompt_len + DEFAULT_MAX_LENGTH, config.max_position_embeddings)
        if total <= prompt_len:
            total = prompt_len + 1
    check_cache_memory(model, batch, total)              # sizes from arguments: before any allocation
    check_context(config, prompt_len, "the prompt has")
    if past_context(config, total):
        # transformers generates past the context too (rotary extrapolates); quality is not promised there
        warnings.warn(f"prompt + new tokens = {total} positions, past max_position_embeddings "
                      f"({config.max_position_embeddings}): the model was not trained that far", UserWarning,
                      stacklevel=3)
    return dict(do_sample=sampling, max_new_tokens=total - prompt_len,
                temperature=float(pick("temperature", temperature)), top_k=int(pick("top_k", top_k)),
                top_p=float(pick("top_p", top_p)),
                repetition_penalty=float(pick("repetition_penalty", repetition_penalty)))


def _attention_mask(attention_mask, ids, pad_token_id, eos):
    """The given mask (checked), or transformers' inference: ids != pad when pad is present and not an EOS."""
    if attention_mask is None:
        if pad_token_id is not None and (ids == pad_token_id).any() and pad_token_id not in (eos or []):
            mask = (ids != pad_token_id).astype(np.int64)
            if (row := _empty_row(mask)) is not None:
                raise GenerationError(f"row {row} of input_ids is all pad_token_id ({pad_token_id}), so it would "
                                      "be all padding: every row needs at least one token (or pass an attention_mask)")
            return mask
        return np.ones_like(ids)
    mask = mask_array(attention_mask, ids.shape, "(shaped like input_ids)").astype(np.int64)  # the forward's check
    if (row := _empty_row(mask)) is not None:
        raise GenerationError(f"row {row} of attention_mask is all padding: every row needs at least one token")
    return mask


def _empty_row(mask):
    """The index of the first row of mask [B, T] with no token (all 0), or None."""
    empty = ~mask.any(axis=1)
    return int(np.nonzero(empty)[0][0]) if empty.any() else None


# ---- generate -----------------------------------------------------------------------------------

def generate(model, input_ids, attention_mask=None, max_new_tokens=None, max_length=None, do_sample=None,
             temperature=None, top_k=None, top_p=None, repetition_penalty=None, eos_token_id=FROM_CONFIG,
             pad_token_id=FROM_CONFIG, seed=None, streamer=None, timings=None, engine="auto"):
    """Continue each row of input_ids [B, T] (left-padded); return the sequences [B, T + generated].

    An argument left out takes the model's generation config (model.generation_config), then transformers'
    default (module docstring); passing None is the same, except for eos_token_id and pad_token_id, where None is a
    value of its own (eos_token_id=None: never stop at an EOS; pad_token_id=None: a finished row emits the first
    EOS id), not the generation config's:
        attention_mask      [B, T] of 1 (token) / 0 (left padding); default: ids != pad_token_id where the pad
                            id occurs and is not an EOS id, else all ones
        max_new_tokens      new tokens per row (wins over max_length); max_length: prompt + new, in total;
                            neither set anywhere: 20 new tokens
        do_sample           False: greedy (argmax); True: sample with temperature, top_k (0: off), top_p and
                            seed (an int: np.random.default_rng(seed); None: a fresh seed)
        repetition_penalty  > 1 lowers the logits of ids already in the row (1.0: off)
        eos_token_id        an id or a list of ids that end a row; None: never stop at an EOS
        pad_token_id        what a finished row emits (the generation config's, else the first EOS id)
        streamer            an object with put(ids) and end(), e.g. TextStreamer(tokenizer) (batch 1)
        timings             a dict that receives prefill_tokens, prefill_s, decode_tokens, decode_s
        engine              "auto", "fast", "reference": the forward each step runs on (see step_backend)
    """
    no_head = GenerationError(f"{type(model).__name__} has no language-modelling head; generate with "
                              "StableLmForCausalLM")
    if not callable(getattr(model, "_check_params", None)):
        raise no_head
    model._check_params()      # the forward's check, before anything reads the config: an edited config gave a
    if not hasattr(model, "lm_head_weight"):    # ZeroDivisionError (heads = 0), "outside [0, True)" (vocab_size =
        raise no_head                           # True), and made this property a KeyError or a wrong "no head"
    config = model.config
    ids = np.asarray(to_host(model._ids(input_ids)))                    # [B, T], checked against the vocab
    batch, prompt_len = ids.shape
    vocab = config.vocab_size
    gc = generation_config_of(model)
    source = f" (from {gc.source})"
    eos = _token_ids("eos_token_id", gc.eos_token_id if eos_token_id is FROM_CONFIG else eos_token_id, vocab,
                     allow_list=True, source=source if eos_token_id is FROM_CONFIG else "")
    pad = _token_ids("pad_token_id", gc.pad_token_id if pad_token_id is FROM_CONFIG else pad_token_id, vocab,
                     allow_list=False, source=source if pad_token_id is FROM_CONFIG else "")
    pad = pad[0] if pad else None
    if pad is None and eos is not None:
        if attention_mask is None and batch > 1:
            logger.warning("The attention mask and the pad token id were not set, with a batched input. As a "
                           "consequence, you may observe unexpected behavior. Please pass your input's "
                           "attention_mask to obtain reliable results.")
        pad = eos[0]
    s = _settings(model, prompt_len, max_new_tokens, max_length, do_sample, temperature, top_k, top_p,
                  repetition_penalty, seed, batch, gc)
    mask = _attention_mask(attention_mask, ids, pad, eos)              # [B, T] host ints
    if batch > 1 and (mask[:, -1] == 0).any():
        logger.warning("A decoder-only model is being used, but right-padding was detected! For correct "
                       "generation results, pad on the left (Tokenizer does by default)")
    if timings is not None and not isinstance(timings, dict):    # filled at the end: a wrong type lost the output
        raise GenerationError(f"timings must be a dict (it receives prefill/decode tokens and seconds), got "
                              f"{type(timings).__name__}")
    if isinstance(streamer, type):
        raise GenerationError(f"streamer is the class {streamer.__name__}; pass an instance, e.g. "
                              f"{streamer.__name__}(tokenizer)")
    if streamer is not None and not (callable(getattr(streamer, "put", None)) and
                                     callable(getattr(streamer, "end", None))):
        raise GenerationError(f"streamer must have put(ids) and end() methods, got {type(streamer).__name__}")
    rng = np.random.default_rng(seed) if s["do_sample"] else None
    ignore_prefix = np.argmax(mask != 0, axis=1)                          # [B] left-padding lengths

    total = prompt_len + s["max_new_tokens"]
    steps = step_backend(model, batch, total, engine)
    sequences = np.zeros((batch, total), dtype=np.int64)                 # [B, T + new], on the host
    sequences[:, :prompt_len] = ids
    full_mask = np.zeros((batch, total), dtype=np.int64)                 # [B, T + new]
    full_mask[:, :prompt_len] = mask
    unfinished = np.ones(batch, dtype=bool)
    process = s["do_sample"] or s["repetition_penalty"] != 1.0           # else: argmax of the raw logits
    if streamer is not None:
        streamer.put(ids)

    with steps.context():                                                # the backend's stream, if any
        xp = steps.xp
        fused = steps.choose_in_step(s)       # True: each step picks the next ids itself (on the device)
        device_sequences = xp.asarray(sequences) if s["repetition_penalty"] != 1.0 else None  # the penalty's
        t0 = time.perf_counter()
        positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0)   # [B, T]
        scores = steps.prefill(ids, mask, positions)                      # [B, V] on the backend's device
        length = prompt_len
        prefill_s, t_decode, draws = None, None, None
        while True:
            next_host = None
            if scores is None:                                            # picked inside the step
                next_dev = steps.chosen_ids()                             # [B]
                next_host, finite = steps.read_chosen()                   # the one host read per token
                if not finite:                                            # name what overflowed, and stop
                    raise_non_finite(model, sequences[:, :length], full_mask[:, :length], length - prompt_len)
            else:
                scores = scores.astype(steps.wide)                        # [B, V]
                check_finite_scores(model, scores, sequences[:, :length], full_mask[:, :length], length - prompt_len)
                if process:
                    history = device_sequences[:, :length] if device_sequences is not None else None
                    scores = process_logits(scores, history, s, ignore_prefix)
                if s["do_sample"]:
                    next_dev = sample(softmax(scores.astype(xp.float64)), rng)  # [B]
                else:
                    next_dev = xp.argmax(scores, axis=-1)                 # [B]
            if next_host is None:
                next_host = to_host(next_dev)                             # the one host read per token
            next_ids = np.asarray(next_host).astype(np.int64)
            if prefill_s is None:
                prefill_s, t_decode = time.perf_counter() - t0, time.perf_counter()
            fed_as_chosen = bool(unfinished.all())                        # else finished rows are fed pad
            next_ids = np.where(unfinished, next_ids, pad).astype(np.int64)  # finished rows emit pad
            sequences[:, length] = next_ids
            if device_sequences is not None and not fused:    # a fused step keeps its own history
                device_sequences[:, length] = xp.asarray(next_ids)
            full_mask[:, length] = 1
            length += 1
            if streamer is not None:
                with steps.outside():                 # the caller's code, while the backend holds its engine
                    streamer.put(next_ids)
            if eos is not None:
                unfinished &= ~np.isin(next_ids, eos)
            if length == total or not unfinished.any():
                break
            position = full_mask[:, :length].sum(axis=1, keepdims=True) - 1  # [B, 1]
            u = None
            if fused and s["do_sample"]:                                  # the draws sample() would take
                if draws is None:       # every later step's at once: the same numbers in the same order
                    draws = rng.random((total - length, batch))
                    steps.use_draws(draws)
                u = draws[length - prompt_len - 1]                        # [B]: this step's
            scores = steps.step(next_ids, next_dev if fed_as_chosen else None, full_mask[:, :length], position,
                                fused=fused, u=u)
        decode_s = time.perf_counter() - t_decode
    if streamer is not None:
        streamer.end()
    if timings is not None:
        timings.update(prefill_tokens=int(mask.sum()), prefill_s=prefill_s,
                       decode_tokens=batch * (length - prompt_len - 1), decode_s=decode_s)
    result = sequences[:, :length]
    return model.xp.asarray(result) if model.xp is not np else result


# ---- step backends: what one forward of the loop runs on ----------------------------------------

ENGINES = ("auto", "fast", "reference")


def step_backend(model, batch, total, engine="auto"):
    """The forward generate's loop calls for the prompt and for each new token.

    engine "reference": the model's own forward (whatever model was given: the concept modules on NumPy
    or CuPy, or a fast form such as fast_cpu.FastCpuModel, which is called exactly like the model).
    engine "fast": the fast form of the model's device (model.fast()): on the CPU FastCpuModel's forward,
    on the GPU the CUDA-graph decode engine where it covers the request (a bfloat16 model, batch <= 8,
    default rope, silu), the model's own forward otherwise.
    engine "auto" (the default): "fast" on the GPU, "reference" on the CPU (the CPU reference is the golden
    path; pass model.fast() or engine="fast" for speed).
    """
    if engine not in ENGINES:
        raise GenerationError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "auto":
        engine = "fast" if getattr(model, "device", "cpu") == "gpu" else "reference"
    if engine == "fast":
        fast = model if hasattr(model, "decode_steps") else model.fast()
        steps = fast.decode_steps(batch, total) if hasattr(fast, "decode_steps") else None
        return steps if steps is not None else ModelSteps(fast, batch, total)
    return ModelSteps(model, batch, total)


class ModelSteps:
    """Steps through a forward called like the model: model(ids, attention_mask, position_ids, cache,
    logits_to_keep=1), with a KVCache sized exactly for the whole generation (never grown)."""

    def __init__(self, model, batch, total):
        self.model, self.xp = model, model.xp
        self.wide = self.xp.float64 if model.dtype == np.float64 else self.xp.float32  # processing dtype
        self.cache = KVCache(model.config, batch, total, model.dtype, model.xp)

    def context(self):
        return contextlib.nullcontext()

    def outside(self):
        """Where generate runs the caller's code (the streamer's put) inside context(): a backend that holds an
        engine for the loop lets another thread's generate started there go another way (fast_gpu.EngineSteps)."""
        return contextlib.nullcontext()

    def choose_in_step(self, settings):
        """Whether step() picks the next ids itself (returning None); the model's forward only computes logits."""
        return False

    def prefill(self, ids, mask, positions):
        """ids, mask, positions [B, T] (host) -> the last position's logits [B, V]; fills the cache."""
        out = self.model(ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def use_draws(self, draws):
        """A backend that samples inside its step (choose_in_step) gets every later step's uniform draws
        [steps, B] here once, before the first step (row i: the i-th step's u); the forward needs none."""

    def step(self, next_ids, next_dev, mask, position, fused=False, u=None):
        """One new token per row (next_ids [B], host) -> its logits [B, V]."""
        out = self.model(next_ids[:, None], attention_mask=mask, position_ids=position,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.logits = out.logits[:, -1, :]
        return self.logits

    def step_logits(self):
        """The logits [B, V] of the latest step: what a backend that picks inside its step (returning None
        from step(), see choose_in_step) picked from; the loop checks they are finite."""
        return self.logits

    def read_chosen(self):
        """For a backend that picks inside its step: (chosen_ids() on the host, whether step_logits() are all
        finite). EngineSteps reads both at once (from the engine's host ring); this default takes two reads."""
        xp = self.xp
        return np.asarray(to_host(self.chosen_ids())), bool(xp.all(xp.isfinite(self.step_logits())))

