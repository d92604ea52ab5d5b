"""The heads on top of StableLmModel, and their losses.

Causal LM (text generation):
    logits = h W_lm^T                      lm_head.weight [vocab, hidden] (model.embed_tokens.weight if tied)
    loss   = mean over t, labels[t+1] != -100, of  -log softmax(logits[t])[labels[t+1]]

Sequence classification (one label per sequence):
    logits = h W_score^T, pooled at the rightmost token that is not pad_token_id
             (left or right padding; a row of only pads pools position 0; without pad_token_id
             the last position, batch 1 only)
    loss   = MSE (regression, num_labels == 1) | cross-entropy (single label, integer labels)
             | binary cross-entropy with logits (multi-label, float labels)      config.problem_type

Token classification (one label per token):
    logits = h W_score^T + b_score;  loss = cross-entropy over tokens whose label != -100

Losses are computed in float32 (float64 in float64 mode) from the logits.
Config: tie_word_embeddings, num_labels (id2label), problem_type, pad_token_id.
Checkpoint tensors: lm_head.weight, score.weight, score.bias (token classification).
"""

from __future__ import annotations

import inspect

import numpy as np

from . import generation, kernels
from ._xp import array_namespace, host_array, linear, log_softmax, no_trace, refuse_masked, to_host, wide_dtype
from .errors import GenerationError, StableLmError, is_int
from .model import StableLmModel, StableLmPreTrainedModel

IGNORE_INDEX = -100


def as_method_signature(function):
    """inspect.Signature of `function(model, ...)` as a method's, `(self, ...)`: what help() shows for a method
    that calls it with the model first."""
    signature = inspect.signature(function)
    first, *rest = signature.parameters.values()
    return signature.replace(parameters=[first.replace(name="self"), *rest])


def kept_positions(logits_to_keep, t):
    """The positions of T whose logits are returned, for logits_to_keep as transformers takes it: an int k > 0,
    the last k ([T'] int64); 0 or k >= t, None (every position); or a 1-D array of positions in [-t, t), as
    [T'] int64 in [0, t). GenerationError otherwise. The forward here and model.fast() share it."""
    if is_int(logits_to_keep):                                          # not a bool
        logits_to_keep = int(logits_to_keep)                            # np.uint64: no wrap-around in t - k
        if logits_to_keep < 0:
            raise GenerationError(f"logits_to_keep must be >= 0, got {logits_to_keep}")
        return None if logits_to_keep == 0 or logits_to_keep >= t else np.arange(t - logits_to_keep, t)
    keep = host_array(logits_to_keep)
    if keep is None:
        keep = np.asarray([0.5])                                        # refused just below
    if keep.ndim != 1 or keep.dtype.kind not in "iu" or (keep.size and not (-t <= keep.min() and keep.max() < t)):
        raise GenerationError(f"logits_to_keep must be an int or a 1-D array of positions in [0, {t}), "
                              f"got {logits_to_keep!r}")
    return keep.astype(np.int64) % t


def label_array(labels, shape, integer=True, what="labels"):
    """labels (list or array) -> a host array of `shape` (any shape: None; integers, or numbers when
    integer=False), or a GenerationError that says what was expected."""
    refuse_masked(labels, what, f"a plain array (a token's label {IGNORE_INDEX} is ignored by the loss: "
                  f"{what}.filled({IGNORE_INDEX}))", GenerationError)
    host = host_array(labels)
    kinds = "iu" if integer else "iuf"
    if host is None or host.dtype.kind not in kinds:
        raise GenerationError(f"{what} must be {'integer class ids' if integer else 'numbers'} (a list or an "
                              f"array of shape {shape}), got {type(labels).__name__}"
                              + (f" of {host.dtype}" if host is not None else ""))
    if shape is not None and host.shape != tuple(shape):
        raise GenerationError(f"{what} have shape {host.shape}, expected {tuple(shape)}")
    if host.dtype.kind == "u" and host.size and int(host.max()) > np.iinfo(np.int64).max:
        raise GenerationError(f"{what} hold {int(host.max())}, beyond int64")
    if host.dtype.kind == "f" and not np.isfinite(host).all():         # the loss would be NaN, silently
        bad = host[~np.isfinite(host)].flat[0]
        raise GenerationError(f"{what} hold {bad}: regression targets and multi-label targets must be finite")
    return host.astype(np.int64) if integer else host


def cross_entropy(logits, labels, num_classes):
    """Mean of -log p(label) over rows whose label is not -100. logits [N, C], labels [N] (host ints)."""
    xp = array_namespace(logits)
    labels = label_array(labels, None).reshape(-1)
    if labels.size != int(logits.shape[0]):
        raise GenerationError(f"{labels.size} labels for {int(logits.shape[0])} rows of logits")
    keep = labels != IGNORE_INDEX
    bad = labels[keep & ((labels < 0) | (labels >= num_classes))]
    if bad.size:
        raise GenerationError(f"label {int(bad[0])} is outside [0, {num_classes}) (use -100 to ignore a position)")
    rows = np.nonzero(keep)[0]
    if rows.size == 0:
        return float("nan")  # transformers: mean over no items
    logp = log_softmax(xp.take(logits, xp.asarray(rows), axis=0))       # [N_kept, C]
    picked = xp.take_along_axis(logp, xp.asarray(labels[rows])[:, None], axis=1)  # [N_kept, 1]
    return float(-xp.mean(picked))


def causal_lm_loss(logits, labels, vocab_size):
    """Shifted: position t predicts labels[t + 1]; the last position predicts nothing."""
    labels = label_array(labels, tuple(logits.shape[:2]))               # [B, T]
    shifted = np.concatenate([labels[:, 1:], np.full((labels.shape[0], 1), IGNORE_INDEX)], axis=1)  # [B, T]
    xp = array_namespace(logits)
    return cross_entropy(xp.reshape(logits, (-1, vocab_size)), shifted, vocab_size)


class StableLmForCausalLM(StableLmPreTrainedModel):
    """StableLM with the language-modelling head: next-token logits, loss, generate() and run_with_trace()."""

    head = "causal_lm"

    @property
    def lm_head_weight(self):
        p = self.params
        return p["model.embed_tokens.weight"] if self.config.tie_word_embeddings else p["lm_head.weight"]

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                labels=None, logits_to_keep=0, output_hidden_states=False, trace=None):
        """logits [B, T', vocab] with T' = T, or the last `logits_to_keep` positions (an int > 0), or the
        positions listed (a 1-D index array). `trace(name, array)` is called with each intermediate (names in
        trace.py; attn_weights is None where a fused attention kernel ran: run_with_trace runs the reference)."""
        out = self._forward_base(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                                 output_hidden_states, trace)
        xp, h = self.xp, out.last_hidden_state                            # [B, T, hidden]
        t = h.shape[1]
        keep = kept_positions(logits_to_keep, t)
        if keep is not None and is_int(logits_to_keep):
            h = h[:, int(keep[0]):, :]                                      # the last k: a view, no gather
        elif keep is not None:
            h = xp.take(h, xp.asarray(keep), axis=1)                        # [B, len(keep), hidden]
        every_position = keep is None or np.array_equal(keep, np.arange(t))
        out.logits = linear(h, self.lm_head_weight)                       # [B, T', vocab]
        (trace or no_trace)("lm_head", out.logits)
        if labels is not None:
            if not every_position:  # the loss pairs logits[t] with labels[t + 1], for every t in order
                raise GenerationError("labels need logits for every position: leave logits_to_keep at 0")
            out.loss = causal_lm_loss(out.logits, labels, self.config.vocab_size)
        return out

    def run_with_trace(self, input_ids, attention_mask=None, position_ids=None):
        """One forward pass recording every named intermediate: (logits [B, T, vocab], {name: array}), host
        (NumPy) arrays in execution order. trace.py writes such records to files and compares them."""
        recorded = {}

        def record(name, array):
            if name in recorded:  # a name recorded twice would silently hide the first value
                raise StableLmError(f"trace name {name!r} was recorded twice in one forward pass")
            recorded[name] = np.asarray(to_host(array))

        with kernels.reference_only():  # fused kernels never form the attention weights; the reference does
            out = self(input_ids, attention_mask=attention_mask, position_ids=position_ids, trace=record)
        return np.asarray(to_host(out.logits)), recorded

    def generate(self, input_ids, **kwargs):
        return generation.generate(self, input_ids, **kwargs)

    # help(model.generate) and inspect.signature show generation.generate's arguments and docstring, not **kwargs
    generate.__signature__ = as_method_signature(generation.generate)
    generate.__doc__ = ("model.generate(input_ids, ...) is generation.generate(model, input_ids, ...):\n\n    "
                        + generation.generate.__doc__)

    def fast(self):
        """The fast form of this model for its device, built once: fast_cpu.FastCpuModel on the CPU (fused
        weights, preallocated buffers, called exactly like this model), fast_gpu.GpuFastModel on the GPU (the
        model's forward plus the CUDA-graph decode engine generate steps through). Fused matrices hold the
        weights; self.params become views of them (same values, not stored twice; but the dict the model was made
        from, or any other holding its tensors, keeps the tensors as they were beside the copies: drop it, e.g.
        del params, where memory matters). model.params must match
        model.config when it is built (CheckpointError otherwise, as for the forward). The CPU form tests on each
        call whether params or config changed since (a tensor replaced, a config field edited) and then checks
        and rebuilds its copies (FastCpuModel._sync), refusing a tensor of another dtype than model.dtype; the GPU
        form builds its engine again on the next generate after such a change (fast_forms.Source for both). A copy
        of this model (copy.copy) or a model made on its params (every model has a params dict of its own) gets a
        fast form of its own."""
        from .fast_forms import MAKING, fast_form   # the registry: heads.py never imports its fast forms

        with MAKING:                                 # threads asking at once get one form (fast_forms.fast_form)
            if getattr(getattr(self, "_fast", None), "model", None) is not self:   # none yet, or a copy's original's
                self._check_params()                 # built from params edited after loading, it failed inside NumPy
                self._fast = fast_form(self)
            return self._fast


class StableLmForSequenceClassification(StableLmPreTrainedModel):
    """One score vector per sequence, pooled at the last non-pad token."""

    head = "sequence"

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                labels=None, output_hidden_states=False):
        out = self._forward_base(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                                 output_hidden_states)
        xp, config = self.xp, self.config
        logits = linear(out.last_hidden_state, self.params["score.weight"])  # [B, T, num_labels]
        ids = np.asarray(to_host(input_ids))
        ids = ids[None, :] if ids.ndim == 1 else ids
        batch, t = ids.shape
        if config.pad_token_id is None:
            if batch != 1:
                raise GenerationError("cannot pool a batch of more than one row without pad_token_id in the "
                                      "config: set pad_token_id, or classify one sequence at a time")
            last = np.full(batch, t - 1)
        else:
            last = (np.arange(t)[None, :] * (ids != config.pad_token_id)).argmax(-1)  # rightmost non-pad, [B]
        pooled = logits[xp.arange(batch), xp.asarray(last), :]                 # [B, num_labels]
        out.logits = pooled
        if labels is not None:
            out.loss = sequence_classification_loss(pooled, labels, config)
        return out


def sequence_classification_loss(pooled, labels, config):
    """labels: [B] class ids (single label), [B] or [B, 1] numbers (regression, num_labels 1), [B, n]
    numbers (regression with n outputs, or multi-label 0/1 targets)."""
    xp = array_namespace(pooled)
    batch, n = int(pooled.shape[0]), config.num_labels
    probe = label_array(labels, None, integer=False)                      # numbers, any shape (checked below)
    problem = config.problem_type
    if problem is None:
        problem = ("regression" if n == 1 else
                   "single_label_classification" if probe.dtype.kind in "iu" else "multi_label_classification")
    z = xp.astype(pooled, wide_dtype(xp, pooled.dtype))                   # [B, num_labels]
    if problem == "single_label_classification":
        return cross_entropy(z, label_array(probe.reshape(-1) if probe.size == batch else probe, (batch,)), n)
    if problem == "regression" and n == 1:
        labels = label_array(probe.reshape(-1) if probe.size == batch else probe, (batch,), integer=False)
    else:
        labels = label_array(probe, (batch, n), integer=False)
    target = xp.asarray(labels.astype(np.float64 if z.dtype == xp.float64 else np.float32))
    if problem == "regression":
        if n == 1:
            z, target = xp.reshape(z, (-1,)), xp.reshape(target, (-1,))
        return float(xp.mean((z - target) ** 2))
    # BCE with logits, stable: max(z, 0) - z*y + log(1 + exp(-|z|))
    loss = xp.maximum(z, 0) - z * target + xp.log1p(xp.exp(-xp.abs(z)))
    return float(xp.mean(loss))


class StableLmForTokenClassification(StableLmPreTrainedModel):
    """One score vector per token."""

    head = "token"

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                labels=None, output_hidden_states=False):
        out = self._forward_base(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                                 output_hidden_states)
        bias = self.params.get("score.bias") if self.config.token_classification_bias else None   # else unused
        logits = linear(out.last_hidden_state, self.params["score.weight"], bias)
        out.logits = logits                                                 # [B, T, num_labels]
        if labels is not None:
            n = self.config.num_labels
            labels = label_array(labels, tuple(logits.shape[:2]))          # [B, T]: one label per token
            out.loss = cross_entropy(self.xp.reshape(logits, (-1, n)), labels.reshape(-1), n)
        return out


__all__ = ["StableLmModel", "StableLmForCausalLM", "StableLmForSequenceClassification",
           "StableLmForTokenClassification", "causal_lm_loss", "cross_entropy"]
