"""A faster CPU forward for StableLmForCausalLM: the same function, restructured for NumPy + BLAS.

    fast = model.fast()                      # or FastCpuModel(model), the same; float32 or float64, NumPy
    out = fast(ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
               labels=None, logits_to_keep=0)  # -> ModelOutput(.logits, .past_key_values), as model(...)

The concept files (layernorm.py, rotary.py, attention.py, mlp.py, decoder_layer.py, model.py, heads.py)
stay the specification; this file computes the same equations and is tested equal to them
(tests/test_fast_cpu.py). Nothing here is new mathematics; the speed comes from the structure, and
docs/cpu_notes.md measures each part. A decode step is ~45 NumPy calls per layer, every one of them
writing into a buffer allocated once:

- Fused weights, stored once, transposed for BLAS. Per layer
      W_in^T  = [Wq; Wk; Wv]^T                [hidden, (H + 2 KVH) D]    one GEMM instead of three
                [Wq; Wk; Wv; Wgate; Wup]^T    [hidden, (H + 2 KVH) D + 2 I] with parallel residual
                                              (one LayerNorm feeds both halves: one GEMM instead of five)
      W_gu^T  = [Wgate; Wup]^T                [hidden, 2 I]               (sequential residual)
      W_o^T [H D, hidden]
  as C-contiguous [in, out] matrices, so y = x W^T is a plain row-major GEMM (GEMV while decoding);
  W_down stays [hidden, I] as the checkpoint has it (read as the transposed operand of the same product):
  at hidden 512 OpenBLAS's GEMV streams that layout about twice as fast in a decode step, where the
  [I, hidden] one splits each short row of 512 between its two threads (docs/cpu_notes.md).
  A layer's matrices share one allocation (`_Arena`, in the order a step reads them), large enough for
  NumPy to back it with transparent huge pages. The model's `params` entries become views into these
  matrices: the weights are not held twice, and the reference model keeps working on the same numbers.
- The lm_head is transposed the same way, in place (`_transpose_in_place`: the [vocab, hidden] matrix
  becomes [hidden, vocab] in its own memory, through a scratch of one block), when vocab has a divisor
  near 2048; at hidden 512 OpenBLAS's GEMV streams that layout about twice as fast. A Ctrl-C meanwhile is
  raised once it is done (`_ctrl_c_held`): the matrix is never left half permuted or out of params. A tied
  embedding is then a view of that [hidden, vocab] memory; its rows are gathered as columns of it (`_embed_rows`:
  np.take of a non-contiguous array copies it whole first).
- Work buffers allocated once per (batch, new tokens) shape and written in place (`out=`): a decode
  step allocates nothing but the logits it returns.
- q and k are rotated in place inside the q|k|v GEMM's output (both at once: 3 calls, the rotation
  written as x cos + swap(x) sin+-, with sin+- = [-sin, sin] tabled once per position); queries, keys
  and values are then read from there as strided views (BLAS takes a row stride), and only the new
  keys and values are copied, into the preallocated kv_cache.KVCache.
- Attention: softmax without a division of the [T, S] probabilities (the [T, D] output is divided by
  their sums instead); prefill runs in blocks of QUERY_BLOCK queries, each reading only the keys it
  may see (the causal upper triangle is neither computed nor stored).
- LayerNorm statistics are GEMVs against a [hidden, 1] column of 1/hidden (np.mean is a Python
  function that costs ten times a ufunc call on a vector).
- The final LayerNorm and the lm_head run only on the positions whose logits are kept
  (logits_to_keep=1 while decoding: one row of [vocab] per sequence, not T), and so does the last layer
  after its q|k|v GEMM (its keys and values are cached for every position; its queries, attention, o,
  MLP and residual serve only the kept rows): a 128-token prefill with logits_to_keep=1, as generate
  makes, skips 127/128 of the last layer's remaining work, as llama.cpp does.
- The copies follow the model: the q|k|v biases and qk-norm weights are joined too, their params entries views
  of the joined arrays, so an edit in place of any tensor reaches this form; a tensor replaced or renamed in params,
  a config field or model.dtype edited is seen by a test on each call (~9 us), which rebuilds (FastCpuModel._sync),
  layer by layer as the first build does: the old copies go as the new are made, never all held twice.
  A tensor of another dtype than model.dtype is refused by name: this form computes in one dtype. Two names of
  params on one array (a tie: params[b] = params[a]) become views of two copies, and the build warns that an edit in
  place of one no longer reaches the other (fast_forms.warn_split).
- The buffers are the form's, not the call's: calls from several threads take turns (a lock), where they wrote
  into each other's buffers (wrong logits, or a ValueError from inside NumPy). The form is made under a lock too
  (fast_forms.MAKING): threads asking a model for it at once get one form.

Rounding: float64 results agree with the reference to ~1e-15 relative (different BLAS calls sum in
different orders; q is scaled before q k^T instead of after); float32 within the bound the tests derive
from float32 rounding. Requests the fast path does not cover (labels, output_hidden_states, trace) run
the reference.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .errors import CheckpointError, GenerationError, StableLmError, check_flag
from .fast_forms import MAKING, Source, layer_tensors, register, ties, warn_split
from .heads import kept_positions
from .mlp import ACTIVATIONS
from .attention import causal_mask
from .model import ModelOutput
from .rotary import rotary_cos_sin

ROPE_TABLE = 1 << 16       # positions the rotary table holds at most: a config's max_position_embeddings of
                           # 10**12 (valid) made the first call allocate 7 TiB for it; beyond, cos/sin per call
QUERY_BLOCK = 64           # prefill attention: scores of at most [B, H, QUERY_BLOCK, S] at a time; a causal
                           # prompt of 128 computes 1/4 fewer scores than in one block (docs/cpu_notes.md)


def _copy_as_is(params, name, arena):
    """params[name] [out, in] copied into `arena` as it is (C-contiguous [out, in]); params[name] becomes that
    copy. Returns its [in, out] transposed view, read by BLAS as a transposed operand."""
    w = params[name]
    stored = arena.take(*w.shape)
    stored[...] = w
    params[name] = stored
    return stored.T


def _fuse_transposed(params, names, arena):
    """[W_1; W_2; ...]^T as one C-contiguous [in, sum(out)] matrix taken from `arena`; params[name] becomes
    a view of it."""
    weights = [params[n] for n in names]
    fused = arena.take(weights[0].shape[1], sum(w.shape[0] for w in weights))
    start = 0
    for name, w in zip(names, weights):
        stop = start + w.shape[0]
        fused[:, start:stop] = w.T                                   # [out, in] -> [in, out]
        params[name] = fused[:, start:stop].T                        # same numbers, no second copy
        start = stop
    del weights
    return fused


class _Arena:
    """One allocation for a layer's fused matrices, back to back in the order a step reads them.

    NumPy asks the kernel for transparent huge pages (madvise) for arrays of 4 MiB and more: one array per
    layer (12.8 MB at hidden 512) gets them, where the four matrices allocated apart (1-6 MB each) mostly
    did not. A decode step streams every matrix once from DRAM; with 4 KiB pages that is a TLB miss per
    4 KiB, and the small GEMVs (o, down) paid for it (docs/cpu_notes.md)."""

    ALIGN = 1024                                                     # elements: 4 KiB in float32

    def __init__(self, shapes, dtype):
        sizes = [-(-r * c // self.ALIGN) * self.ALIGN for r, c in shapes]
        self.memory = np.empty(sum(sizes) + self.ALIGN, dtype=dtype)
        self.next = (-self.memory.ctypes.data // self.memory.itemsize) % self.ALIGN

    def take(self, rows, cols):
        a = self.memory[self.next:self.next + rows * cols].reshape(rows, cols)
        self.next += -(-rows * cols // self.ALIGN) * self.ALIGN
        return a


def _transpose_in_place(w, block):
    """A C-contiguous [V, K] matrix rewritten as its [K, V] transpose in the same memory; returns the
    [K, V] array (w's memory; w itself must no longer be read). V must be a multiple of `block`.

    Two steps, each a permutation of contiguous pieces, with scratch of one block:
      1. [V/block, block, K] -> [V/block, K, block]: each block of rows transposed through a copy;
      2. [n, K, block] -> [K, n, block]: an n x K transpose whose elements are runs of `block` values,
         done by following the permutation's cycles (a run moves once, 256 runs per NumPy call).
    """
    v, k = w.shape
    n = v // block
    flat = w.reshape(-1)                                             # the memory, as one vector
    blocks = flat.reshape(n, block * k)
    for i in range(n):                                               # 1. [block, K] -> [K, block]
        blocks[i] = blocks[i].reshape(block, k).T.copy().reshape(-1)
    runs = flat.reshape(n * k, block)                                # run r = (i, j) at r = i K + j
    done = np.zeros(n * k, dtype=bool)
    for start in range(n * k):                                       # 2. run (i, j) -> slot j n + i
        if done[start]:
            continue
        cycle = [start]                                              # slots, each filled from the next
        src = (start % n) * k + start // n                           # the run that belongs in slot `start`
        while src != start:
            cycle.append(src)
            src = (src % n) * k + src // n
        done[cycle] = True
        if len(cycle) == 1:
            continue
        first = runs[cycle[0]].copy()
        for a in range(0, len(cycle) - 1, 256):
            z = min(a + 256, len(cycle) - 1)
            runs[cycle[a:z]] = runs[cycle[a + 1:z + 1]]                # gathered before written
        runs[cycle[-1]] = first
    return flat.reshape(k, v)


@contextlib.contextmanager
def _ctrl_c_held():
    """A Ctrl-C (SIGINT) during the block is held until it ends, then sent again to the handler that was there
    (Python's raises KeyboardInterrupt): for a step that cannot stop halfway (the lm_head's memory half permuted,
    popped from params). Only the main thread receives signals; elsewhere, or under a handler set outside Python,
    the block runs as it is."""
    caught = []
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        signal.raise_signal(signal.SIGINT)


def _only_in(params, name):
    """Whether params[name] is a writeable C-contiguous array that nothing but `params` refers to, whose
    memory no other array shares (so rewriting that memory changes no one else's numbers)."""
    a = params[name]
    if not (isinstance(a, np.ndarray) and a.flags.c_contiguous and a.flags.writeable):
        return False
    if sys.getrefcount(a) > 3:                                       # params, `a`, getrefcount's argument
        return False
    base = a.base                                                    # e.g. np.fromfile's 1-D array, reshaped
    while base is not None:
        if not isinstance(base, np.ndarray) or base.nbytes != a.nbytes or sys.getrefcount(base) > 3:
            return False                                             # (a's .base, `base`, the argument)
        base = base.base
    return True


def _lm_head_block(vocab):
    """A divisor of vocab near 2048 (the run length of _transpose_in_place), or None."""
    for block in sorted(range(512, 8193), key=lambda d: abs(d - 2048)):
        if vocab % block == 0:
            return block
    return None


class _Layer:
    """The arrays of one decoder layer, fused (the groups of fast_forms.layer_tensors) and transposed."""

    def __init__(self, params, i, config):
        t = layer_tensors(config, i)
        self.ln1 = tuple(params[n] for n in t.ln1)
        qkv, gate_up, o, down = t.qkv, t.gate_up, [t.o], [t.down]
        # parallel residual: one LayerNorm feeds both halves, so q|k|v|gate|up is one GEMM
        groups = [qkv + gate_up, o, down] if config.use_parallel_residual else [qkv, o, gate_up, down]
        arena = _Arena([(params[g[0]].shape[1], sum(params[n].shape[0] for n in g)) for g in groups],
                       params[qkv[0]].dtype)
        self.in_t = _fuse_transposed(params, groups[0], arena)           # [hidden, (H+2KVH) D (+ 2 I)]
        self.o_t = _fuse_transposed(params, o, arena)                    # [H D, hidden]
        self.ln2 = self.gate_up_t = None
        if t.ln2 is not None:
            self.ln2 = tuple(params[n] for n in t.ln2)
            self.gate_up_t = _fuse_transposed(params, gate_up, arena)    # [hidden, 2 I]
        self.down_t = _copy_as_is(params, down[0], arena)                # [I, hidden]: a view of [hidden, I]
        self.qkv_b = None                    # both joined like the weights: params become views of them, so an
        if t.qkv_bias is not None:           # edit in place reaches the fast form too
            names = t.qkv_bias
            self.qkv_b = np.concatenate([params[n] for n in names])      # [(H + 2 KVH) D]
            for name, view in zip(names, np.split(self.qkv_b, np.cumsum([params[n].size for n in names[:-1]]))):
                params[name] = view
        self.qk_norm = None
        if t.qk_norms is not None:                                       # [H + KVH, D]: q heads, then k heads
            self.qk_norm = np.stack([params[n] for n in t.qk_norms])
            for name, row in zip(t.qk_norms, self.qk_norm):
                params[name] = row


class _Work:
    """Buffers for one (batch, new tokens) shape, reused by every layer and every call of that shape, and
    the views of them each layer reads (made once here: a view costs as much as a ufunc call on a vector)."""

    def __init__(self, b, t, config, dtype):
        h, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
        heads, kv, rd = config.num_attention_heads, config.num_key_value_heads, config.rotary_ndims
        n, qkv, half = b * t, (heads + 2 * kv) * d, rd // 2
        e = lambda *shape: np.empty(shape, dtype=dtype)  # noqa: E731
        self.x = e(n, h)                           # the residual stream
        self.h = e(n, h)                           # LayerNorm output
        self.sq = e(n, h)                          # LayerNorm scratch (squares)
        self.stat = e(n, 1)                        # LayerNorm mean, then std
        parallel = config.use_parallel_residual
        self.inp = e(n, qkv + (2 * inter if parallel else 0))       # the first GEMM's output
        self.qkv = self.inp[:, :qkv]               # [B*T, (H+2KVH) D]
        self.gu = self.inp[:, qkv:] if parallel else e(n, 2 * inter)
        self.gate, self.up = self.gu[:, :inter], self.gu[:, inter:]
        heads_all = self.qkv.reshape(b, t, heads + 2 * kv, d)       # [B, T, H+2KVH, D] views from here on
        self.qk = heads_all[:, :, :heads + kv]     # [B, T, H+KVH, D]: rotated (and qk-normed) in place
        self.q = heads_all[:, :, :heads]           # [B, T, H, D]
        self.k_new = heads_all[:, :, heads:heads + kv].transpose(0, 2, 1, 3)   # [B, KVH, T, D]
        self.v_new = heads_all[:, :, heads + kv:].transpose(0, 2, 1, 3)
        self.q_groups = self.q.reshape(b, t, kv, heads // kv, d).transpose(0, 2, 3, 1, 4)  # [B, KVH, G, T, D]
        # rotary: x[:d] <- x[:d] cos + [x2, x1] [-sin, sin], x1 and x2 the halves of x[:d] of each q and k head
        self.rot_x = self.qk[..., :rd]             # [B, T, H+KVH, d]
        st = self.rot_x.strides                    # [x2, x1]: x2 then, half a row back, x1
        self.rot_swapped = as_strided(self.rot_x[..., half:], (b, t, heads + kv, 2, half),
                                      st[:3] + (-half * st[3], st[3]), writeable=False)
        self.rot = e(b, t, heads + kv, 2, half)    # [x2, x1] [-sin, sin]
        self.rot_flat = self.rot.reshape(b, t, heads + kv, rd)
        self.cos = e(b, t, rd)
        self.sin = e(b, t, rd)                     # [-sin, sin]: sin with its first half negated
        self.cos_heads = self.cos[:, :, None, :]   # [B, T, 1, d]
        self.sin_pairs = self.sin.reshape(b, t, 1, 2, half)
        self.head_stat = e(b, t, heads + kv, 1)    # qk LayerNorm statistics
        self.head_sq = e(b, t, heads + kv, d) if config.qk_layernorm else None
        self.attn = e(n, heads * d)                # attention output, [B, T, H, D] order
        self.attn_groups = self.attn.reshape(b, t, kv, heads // kv, d).transpose(0, 2, 3, 1, 4)  # [B, KVH, G, T, D]
        self.o = e(n, h)
        self.act = e(n, inter)
        self.tmp = e(n, inter)
        self.scores = e(0)                         # [B, KVH, G, T', S'], grown as S grows
        self.row_max = e(b * heads * min(t, QUERY_BLOCK))
        self.row_sum = e(b * heads * min(t, QUERY_BLOCK))

    def attention_blocks(self, past, blocked, causal_only):
        """[(queries, out, S, scores, row max, row sum, mask, empty rows)] per block of QUERY_BLOCK queries, for
        this call: without padding (causal_only) queries q0..q1-1 read keys 0..past+q1-1 only, the rest never
        computed. `empty rows` ([.., T', 1]: the queries that may see no key, only with padding) or None."""
        b, kv, group, t, d = self.q_groups.shape
        blocks = []
        for q0 in range(0, t, QUERY_BLOCK):
            q1 = min(q0 + QUERY_BLOCK, t)
            s = past + q1 if causal_only else past + t
            shape = (b, kv, group, q1 - q0, s)                                   # [B, KVH, G, T', S']
            n = math.prod(shape)
            if self.scores.size < n:
                self.scores = np.empty(max(n, 2 * self.scores.size), dtype=self.x.dtype)
            m = b * kv * group * (q1 - q0)
            mask = None if blocked is None else blocked[..., q0:q1, :s]
            empty = None if causal_only or mask is None else mask.all(axis=-1, keepdims=True)  # a query sees itself
            blocks.append((self.q_groups[..., q0:q1, :], self.attn_groups[..., q0:q1, :], s,
                           self.scores[:n].reshape(shape), self.row_max[:m].reshape(shape[:-1] + (1,)),
                           self.row_sum[:m].reshape(shape[:-1] + (1,)), mask,
                           empty if empty is not None and empty.any() else None))
        return blocks


class FastCpuModel:
    """StableLmForCausalLM's forward for NumPy float32/float64, fused and preallocated (see module doc)."""

    _MAX_SHAPES = 4

    def __new__(cls, model):
        """A model has one CPU fast form: FastCpuModel(model) is model.fast(), whichever came first, and so is a copy
        of it (__copy__). A build makes model.params views of its fused copies, so two forms would each see the
        other's build as params replaced and rebuild on every call (_sync). The form is made here, under
        fast_forms.MAKING: threads asking at once get the one form (two builds beside each other failed)."""
        with MAKING:
            existing = getattr(model, "__dict__", {}).get("_fast")
            if type(existing) is cls and existing.__dict__.get("model") is model:
                return existing
            self = super().__new__(cls)
            self._make(model)
            return self

    def __copy__(self):
        """The form itself (see __new__): copy.copy made a second form of the same model, and after any edit of
        params calls alternating between the two rebuilt every fused copy each time."""
        return self

    def __reduce__(self):
        """pickle and copy.deepcopy: the fast form of the carried model, made again from it (the model is carried
        without its form, StableLmPreTrainedModel.__getstate__; the form's lock and buffers are not carried)."""
        return FastCpuModel, (self.model,)

    def __init__(self, model):
        """Nothing more: __new__ made the form, or found the model's own."""

    def _make(self, model):
        from .heads import StableLmForCausalLM

        if not isinstance(model, StableLmForCausalLM):
            raise StableLmError(f"FastCpuModel takes a StableLmForCausalLM, got {type(model).__name__}")
        self.model = model
        self._lock = threading.Lock()
        self._build()
        model._fast = self                                          # what model.fast() returns from now on

    def _build(self):
        """The fused weights and everything else made from model.params and model.config, after the reference's
        check of the two (CheckpointError / ConfigError naming what is wrong); a snapshot of what they were. Every
        tensor the config implies must have the model's dtype: the reference computes with a tensor cast after
        loading (NumPy promotes), where the copies and buffers here are of one dtype (a float16 q_proj made its
        layer's fused q|k|v float16, rounding k and v). model.dtype is read here too, on a rebuild as well (set after
        the build, it is watched like the config): float32 or float64, on NumPy."""
        model = self.model
        if model.xp is not np or model.dtype not in (np.float32, np.float64):
            raise StableLmError(f"FastCpuModel runs NumPy float32 or float64 models; this one is "
                                f"{model.device} {model.dtype}. Load it with device='cpu', dtype='float32'")
        model._check_params()
        tied = ties(model.params, model._shapes())
        for name in model._shapes():
            dtype = model.params[name].dtype
            if dtype != model.dtype:
                raise CheckpointError(f"the CPU fast form computes in {model.dtype} (model.dtype): tensor {name!r} "
                                      f"has dtype {dtype}; cast it back (.astype(np.{model.dtype})) or call the "
                                      "model itself, which computes with it")
        self.layers, self._source = [], None    # a rebuild: each old fused copy goes as its layer is made again
        self._config = c = model.config
        p = model.params
        self.layers = [_Layer(p, i, c) for i in range(c.num_hidden_layers)]
        self.norm = (p["model.norm.weight"], p["model.norm.bias"])
        self.lm_head_t = self._lm_head(p, c)                                # [hidden, vocab]
        self.embed = p["model.embed_tokens.weight"]                         # [vocab, hidden]
        self.mean_col = np.full((c.hidden_size, 1), 1.0 / c.hidden_size, dtype=model.dtype)  # x @ it = mean
        self.act = None if c.hidden_act in ("silu", "swish") else ACTIVATIONS[c.hidden_act]
        self._work = {}
        self._rope = None                                                   # (cos, [-sin, sin]) [P, rd]
        self._source = Source(model)              # what the copies were made of: params, config, dtype
        warn_split(tied, p, "the CPU fast form")

    def _sync(self):
        """Rebuilt (_build) when model.params, model.config or model.dtype changed since the last build
        (fast_forms.Source: a tensor replaced or renamed, a config field edited, the dtype set): the fused copies
        would not see such a change; the reference forward reads them on every call, and this form computes the
        same function. An edit in place of a tensor's values needs nothing: params hold views of the fused copies.
        The test is by identity of the tensors and equality of the names (~9 us for the default model's 179
        tensors); it does not see an array's .shape or .dtype assigned in place."""
        if self._source is None or not self._source.same(self.model):      # None: a build that did not finish
            self._build()

    @staticmethod
    def _lm_head(p, c):
        """The lm_head as [hidden, vocab]: transposed in place (C-contiguous) when vocab allows, so that
        params (and a tied embedding) become views of it; else a transposed view of [vocab, hidden]."""
        name = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        block = _lm_head_block(p[name].shape[0])
        if block is None or not _only_in(p, name):
            return p[name].T               # read transposed where it is (OpenBLAS's gemv "T")
        with _ctrl_c_held():                     # popped meanwhile: a Ctrl-C here left params without it
            p[name] = _transpose_in_place(p.pop(name), block).T      # same numbers, now [hidden, vocab] C
        return p[name].T

    # The attributes generate() and users read (config, xp, dtype, params, device, ...) are the model's.
    def __getattr__(self, name):
        if "model" in self.__dict__:
            return getattr(self.__dict__["model"], name)
        return object.__getattribute__(self, name)

    def generate(self, input_ids, **kwargs):
        from .generation import generate

        return generate(self, input_ids, **kwargs)

    def _workspace(self, b, t):
        key = (b, t)
        if key not in self._work:
            if len(self._work) >= self._MAX_SHAPES:
                self._work.pop(next(iter(self._work)))
            self._work[key] = _Work(b, t, self._config, self.model.dtype)
        return self._work[key]

    # ---- the forward ------------------------------------------------------------------------
    def __call__(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                 labels=None, logits_to_keep=0, output_hidden_states=False, trace=None):
        if labels is not None or check_flag(output_hidden_states, "output_hidden_states", GenerationError) \
                or trace is not None:                                           # the reference covers these
            return self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache, labels,
                              logits_to_keep, output_hidden_states, trace)
        with self._lock:                              # one call at a time: its buffers are the form's (threads wait)
            return self._forward(input_ids, attention_mask, position_ids, past_key_values, use_cache, logits_to_keep)

    __call__.__doc__ = "Same arguments and result as StableLmForCausalLM.forward (logits, past_key_values)."

    def _forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache, logits_to_keep):
        """__call__'s fast path, under the form's lock."""
        self._sync()                                                            # params or config edited
        model, config = self.model, self._config
        ids, cache, past, mask2d, position_ids = model._prepare_inputs(input_ids, attention_mask, position_ids,
                                                                       past_key_values, use_cache)
        b, t = ids.shape                                                        # [B, T]
        if mask2d is not None and mask2d.all():
            mask2d = None                                                       # nothing to mask but causality
        kept = kept_positions(logits_to_keep, t)                                 # [T'] positions, or None: all

        w = self._workspace(b, t)
        self._embed_rows(ids.reshape(-1), w.x)                                   # [B*T, hidden]
        self._cos_sin(position_ids, w)                                           # w.cos, w.sin: [B, T, d]
        blocked = None                                                           # [B, 1, 1, T, S] or None
        if mask2d is not None or t > 1:
            blocked = ~causal_mask(mask2d, b, t, past, np)[:, :, None, :, :]
        blocks = w.attention_blocks(past, blocked, causal_only=mask2d is None)
        trim = kept is not None and 0 < len(kept) < t                            # the last layer on kept rows only
        for i, layer in enumerate(self.layers):
            keys_t, values = self._layer_inputs(w, layer, i, past, t, cache)
            if trim and i == len(self.layers) - 1:
                w, blocks = self._kept_only(w, kept, b, t, past, blocked)
            self._layer_outputs(w, layer, keys_t, values, blocks)
        if cache is not None:
            cache.advance(t)

        x = w.x.reshape(b, -1, w.x.shape[-1])
        x = x if kept is None or trim else x[:, kept, :]                         # [B, T', hidden]
        x = x.reshape(-1, x.shape[-1])                                           # [B*T', hidden]
        h = self._layer_norm(x, *self.norm, np.empty_like(x), np.empty(x.shape[:-1] + (1,), x.dtype), np.empty_like(x))
        logits = np.matmul(h, self.lm_head_t).reshape(b, -1, config.vocab_size)  # one GEMM: [B*T', vocab]
        h = h.reshape(b, -1, h.shape[-1])
        return ModelOutput(logits=logits, past_key_values=cache, last_hidden_state=h if kept is None else None)

    def _embed_rows(self, ids, out):
        """out [N, hidden] = the embedding's rows ids [N]. np.take copies a source that is not C-contiguous whole
        before it gathers (6.3 MB a decode step for the default model's: tied, its embedding is a [vocab, hidden] view
        of the lm_head transposed in place, and that copy was half the step): such an embedding is gathered as columns
        of its transpose where that is C-contiguous, else by indexing (which reads only the rows)."""
        e = self.embed
        if e.flags.c_contiguous:
            np.take(e, ids, axis=0, out=out)
        elif e.T.flags.c_contiguous:
            np.take(e.T, ids, axis=1, out=out.T)                                 # [hidden, N], out's memory
        else:
            out[...] = e[ids]

    def _cos_sin(self, position_ids, w):
        """w.cos, w.sin = rotary cos and [-sin, sin] (sin with its first half negated) at position_ids:
        rows of a table rotary.rotary_cos_sin made once for positions 0..P-1 (grown when a position
        reaches P; P at most ROPE_TABLE); for dynamic rope, whose angles depend on the longest position, and
        for positions beyond ROPE_TABLE, made per call."""
        config, dtype = self._config, self.model.dtype
        half = config.rotary_ndims // 2
        need = int(position_ids.max()) + 1
        if config.rope_type == "dynamic" or need > ROPE_TABLE:
            cos, sin = rotary_cos_sin(position_ids, config, dtype)               # [B, T, d]
            w.cos[...] = cos
            np.multiply(sin[..., :half], -1, out=w.sin[..., :half])
            w.sin[..., half:] = sin[..., half:]
            return
        if self._rope is None or self._rope[0].shape[0] < need:
            size = min(ROPE_TABLE, max(need, config.max_position_embeddings,
                                       2 * (0 if self._rope is None else self._rope[0].shape[0])))
            cos, sin = rotary_cos_sin(np.arange(size)[None, :], config, dtype)  # [1, P, d]
            sin[..., :half] *= -1
            self._rope = (cos[0], sin[0])
        np.take(self._rope[0], position_ids, axis=0, out=w.cos)
        np.take(self._rope[1], position_ids, axis=0, out=w.sin)

    def _layer_norm(self, x, weight, bias, out, stat, sq):
        """layernorm.layer_norm written into `out`; the two means are GEMVs against a column of 1/n."""
        col = self.mean_col
        np.matmul(x, col, out=stat)                                              # mean [N, 1]
        np.subtract(x, stat, out=out)                                            # x - mean
        np.square(out, out=sq)
        np.matmul(sq, col, out=stat)                                             # var
        np.add(stat, self._config.layer_norm_eps, out=stat)
        np.sqrt(stat, out=stat)
        np.divide(out, stat, out=out)
        np.multiply(out, weight, out=out)
        if bias is not None:
            np.add(out, bias, out=out)
        return out

    def _kept_only(self, w, kept, b, t, past, blocked):
        """(the workspace of the kept rows, B x T', its attention blocks) for the last layer's outputs: it holds
        their residual stream and their rows of the q|k|v (|gate|up) GEMM's output, rotated; the blocks
        attend their queries to every key through their rows of the mask.

        The last layer's keys and values are needed at every position (the KV cache); its queries, attention,
        o, MLP and residual only where logits are kept: with logits_to_keep=1, one row of the T. llama.cpp
        does the same (docs/cpu_notes.md, fifth pass)."""
        k = self._workspace(b, len(kept))                                        # len(kept) < t: not w itself
        for part, whole in ((k.x, w.x), (k.inp, w.inp)):                        # [B*T', ...] <- [B*T, ...]
            np.take(whole.reshape(b, t, -1), kept, axis=1, out=part.reshape(b, len(kept), -1))
        # queries kept at positions past + kept; t' of them laid out as if they were the last of past + t keys
        return k, k.attention_blocks(past + t - len(kept), blocked[..., kept, :], causal_only=False)

    def _layer_inputs(self, w, layer, i, past, t, cache):
        """LayerNorm 1 and the q|k|v (|gate|up) GEMM into w.inp, q and k rotated, q scaled, the new keys and
        values written to the cache; returns the keys [B, KVH, 1, D, S] and values [B, KVH, 1, S, D] to attend."""
        self._layer_norm(w.x, *layer.ln1, w.h, w.stat, w.sq)                     # [B*T, hidden]
        np.matmul(w.h, layer.in_t, out=w.inp)                                    # [B*T, (H+2KVH) D (+ 2 I)]
        if layer.qkv_b is not None:
            np.add(w.qkv, layer.qkv_b, out=w.qkv)
        if layer.qk_norm is not None:                                            # per-head LayerNorm, in place
            self._head_norm(w.qk, layer.qk_norm, w)
        np.multiply(w.rot_swapped, w.sin_pairs, out=w.rot)                       # rotary on q and k at once:
        np.multiply(w.rot_x, w.cos_heads, out=w.rot_x)                           # x cos
        np.add(w.rot_x, w.rot_flat, out=w.rot_x)                                 # + [x2, x1] [-sin, sin]
        np.multiply(w.q, self._config.head_dim ** -0.5, out=w.q)                  # the 1/sqrt(D) of q k^T
        if cache is not None:
            end = past + t
            keys, values = cache.keys[i], cache.values[i]                        # [B, KVH, max_len, D]
            np.copyto(keys[:, :, past:end], w.k_new)
            np.copyto(values[:, :, past:end], w.v_new)
        else:
            keys, values = w.k_new, w.v_new                                      # [B, KVH, T, D] views
        return keys[:, :, None].swapaxes(-1, -2), values[:, :, None]             # [B, KVH, 1, D, S], [.., S, D]

    def _layer_outputs(self, w, layer, keys_t, values, blocks):
        """Attention of w's queries, o, the residual, the MLP (LayerNorm 2 and gate|up first, unless they came
        with q|k|v) and its residual, in place on w.x."""
        for q, out, s, scores, row_max, row_sum, blocked, empty in blocks:
            self._attend(q, keys_t[..., :s], values[..., :s, :], out, scores, row_max, row_sum, blocked, empty)
        np.matmul(w.attn, layer.o_t, out=w.o)                                    # [B*T, H D] -> [B*T, hidden]
        np.add(w.x, w.o, out=w.x)

        # --- MLP: parallel x + attn(h) + mlp(h) (gate|up came with q|k|v), or sequential --------------
        if layer.ln2 is not None:
            self._layer_norm(w.x, *layer.ln2, w.h, w.stat, w.sq)
            np.matmul(w.h, layer.gate_up_t, out=w.gu)                            # [B*T, 2 I]
        self._mlp(w, layer)
        np.add(w.x, w.o, out=w.x)

    @staticmethod
    def _attend(q, keys_t, values, out, scores, row_max, row_sum, blocked, empty):
        """out = softmax(q k^T + mask) v for one block of queries, the probabilities never divided:
        q [B, KVH, G, T', D] (already scaled), keys_t [B, KVH, 1, D, S], values [B, KVH, 1, S, D]."""
        np.matmul(q, keys_t, out=scores)                                         # q k^T / sqrt(D): [B, KVH, G, T', S]
        if blocked is not None:
            np.copyto(scores, np.finfo(scores.dtype).min, where=blocked)
        np.maximum.reduce(scores, axis=-1, keepdims=True, out=row_max)
        np.subtract(scores, row_max, out=scores)
        np.exp(scores, out=scores)                                               # unnormalised probabilities
        np.add.reduce(scores, axis=-1, keepdims=True, out=row_sum)
        np.matmul(scores, values, out=out)                                       # [B, KVH, G, T', D]
        np.divide(out, row_sum, out=out)                                         # softmax's denominator
        if empty is not None:                                                    # a row with no key (padding)
            np.copyto(out, 0, where=empty)                                       # -> 0, as attention.py

    def _mlp(self, w, layer):
        """down( act(h Wg^T) * (h Wu^T) ) into w.o, from gate|up in w.gu."""
        gate, up = w.gate, w.up
        if self.act is None:                                                     # silu(z) up = z up / (1 + exp(-z))
            np.negative(gate, out=w.act)
            with np.errstate(over="ignore"):                                     # exp(-z) = inf: z up / inf = 0,
                np.exp(w.act, out=w.act)                                         # the limit (z < -88 in float32)
            np.add(w.act, 1.0, out=w.act)
            np.multiply(gate, up, out=w.tmp)
            np.divide(w.tmp, w.act, out=w.act)
        else:
            w.act[...] = self.act(gate)
            np.multiply(w.act, up, out=w.act)
        np.matmul(w.act, layer.down_t, out=w.o)                                  # [B*T, hidden]

    def _head_norm(self, x, weight, w):
        """Per-head LayerNorm (no bias) over D, in place on x [B, T, heads, D]; weight [heads, D]."""
        inv_d = 1.0 / x.shape[-1]
        stat, sq = w.head_stat, w.head_sq
        np.add.reduce(x, axis=-1, keepdims=True, out=stat)
        np.multiply(stat, inv_d, out=stat)                                       # mean
        np.subtract(x, stat, out=x)
        np.square(x, out=sq)
        np.add.reduce(sq, axis=-1, keepdims=True, out=stat)
        np.multiply(stat, inv_d, out=stat)                                       # var
        np.add(stat, self._config.layer_norm_eps, out=stat)
        np.sqrt(stat, out=stat)
        np.divide(x, stat, out=x)
        np.multiply(x, weight, out=x)


register("cpu", FastCpuModel)
