"""The GPU's fast form of StableLmForCausalLM: the model's own forward for the prompt, the CUDA-graph
decode engine (cuda/decode_engine.py) for every new token.

    fast = model.fast()                      # model on device="gpu"; GpuFastModel(model)
    fast(ids, ...)                           # the model's own forward (the concept modules on CuPy)
    model.generate(ids, ...)                 # generation.py's loop; each step through fast.decode_steps()

generate (generation.py) is the only loop. For a request the engine covers (a bfloat16 model, batch <= 8,
default rope, silu MLP, a compiled head_dim) decode_steps() returns EngineSteps:

    prefill   the model's own forward on CuPy, writing keys and values into a kv_cache.KVCache whose
              per-layer buffers [B, KVH, max_len, D] are views of the engine's cache; start() then sets
              the engine's key mask, positions and length from the attention mask
    step      set_tokens(the ids the loop chose) unless they are already on the device, then one graph
              replay: embed -> layers (LayerNorm, q|k|v, attention, o, MLP) -> LayerNorm -> lm_head -> pick
    greedy    the pick is argmax_step inside the graph: the loop reads B token ids per step and B flags that
              say whether the logits were finite (read_chosen), nothing else: the step's kernel writes them
              into a ring of slots in mapped host memory, so nothing but an event follows the step in the
              stream (without mapped memory: one copy into pinned memory). One step runs ahead: step()
              records that event, then queues the next step (whose graph reads those picks on the device),
              so the GPU works while the loop reads the ids, checks eos and streams. The loop feeds every
              unfinished row the graph's own pick; a finished row's pad it does not get, which changes
              nothing the loop keeps (rows are independent; its tokens are pad from then on). A step
              queued when the loop stops (eos, max_new_tokens) is wasted.
    sampling  the pick is sample_step (or, for top-k, sample_topk_partial + sample_topk_merge) inside the
              graph (decode.cu): repetition penalty, temperature, top-k, top-p and the draw, from u ~ U[0, 1)
              that the loop draws on the host with the same numpy Generator the CPU path uses, so a seed gives
              the CPU's tokens given the same logits. The loop draws every step's u at once (use_draws: the
              same numbers in the same order as one draw a step) and they are uploaded once; each step's graph
              reads its own row, so sampling runs one step ahead like greedy.
              Settings it does not cover (top_k > 1024, or top_k 0 with top_p < 1) leave the logits on the
              device (engine.logits_buf, float32) for the loop's processors and sampler (generation.py, the
              same functions as on the CPU, on CuPy arrays).

Any other request (float32 / float16 on the GPU, batch > 8, scaled rope, ...) steps through the model's
own forward (the concept modules on CuPy): decode_steps() returns None and generate uses ModelSteps.

Weights are held once: after the engine fused q|k|v rows and interleaved gate/up rows, the model's params
for those matrices become views of the fused arrays (as fast_cpu.py does for the CPU's layout); the vectors
the kernels read in float32 become views of one joined bfloat16 array, converted once a generate. The engine is
built on the first generate that uses it, and again on the first after an edit of model.params, model.config or
model.dtype (fast_forms.Source, the CPU form's test), the stale one freed first (also when the edited model steps
through its forward: its cache and copies held memory for nothing); a generate holds it for its whole loop
(EngineSteps.context), grown first (reserve) where the request needs more rows or positions than its buffers hold.
This module imports no CuPy at import time (stablelm_ref/__init__.py imports it to register "gpu").
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import numpy as np

from .errors import StableLmError
from .fast_forms import MAKING, Source, layer_tensors, register, ties, warn_split

logger = logging.getLogger(__name__)

CACHE_ROUND = 256          # the engine's cache length is rounded up to this, so that most calls reuse it


class GpuFastModel:
    """StableLmForCausalLM on the GPU with its decode engine (built on the first generate that uses it).

    A model has one GPU form: GpuFastModel(model) is model.fast(), whichever came first, and so is a copy of it;
    pickle and copy.deepcopy carry it as the form of the carried model (made again from it, its engine too). The
    engine's copies follow the model as the CPU form's do (fast_forms.Source): a generate after a tensor of
    model.params was replaced or renamed, a field of model.config edited or model.dtype set builds the engine
    again from the model as it is then (its settings kept, and its tuning where the shapes are the same), the stale
    one freed first; one that steps through the model's forward instead (an edit the engine does not cover) frees
    it. An edit in place of a tensor's values reaches the engine too: q|k|v and gate|up are views of its fused
    arrays; o, down, the embedding and lm_head it reads in params' own memory (or params become views of its copy,
    for a tensor not C-contiguous); the vectors it reads in float32 (LayerNorm weights and
    biases, q|k|v biases, qk-norm weights) are views of one bfloat16 array it converts at every generate's start
    (_share_vectors). Two names of params on one array (a tie) a build splits so, it warns (fast_forms.warn_split).
    The engine holds one generate at a time: its cache and device state are that
    generate's, so generates from several threads take turns; one started from inside another (a streamer's
    put) steps through the model's forward, and so does one of another thread that finds the holder in one call of
    its streamer's put for PUT_WAIT seconds (the put may be waiting for it: it waited for the engine, a deadlock)."""

    def __new__(cls, model, autotune: bool | None = None, kernels=None):
        """autotune: whether the engine tunes its kernels (None: as the model's form has it, True for a new one);
        kernels: the engine's cuda.decode_kernels.DecodeKernels (None: decode.cu built on first use; the
        emulated tests pass theirs). A model's existing form takes the autotune asked for."""
        with MAKING:
            existing = getattr(model, "__dict__", {}).get("_fast")
            if type(existing) is cls and existing.__dict__.get("model") is model:
                existing._ask(autotune, kernels)
                return existing
            self = super().__new__(cls)
            self._make(model, True if autotune is None else autotune, kernels)
            return self

    def __init__(self, model, autotune: bool | None = None, kernels=None):
        """Nothing more: __new__ made the form, or found the model's own."""

    def _ask(self, autotune, kernels):
        if kernels is not None and kernels is not self.kernels:
            raise StableLmError("GpuFastModel(model, kernels=...): the model's GPU form exists with other kernels; "
                                "pass them where the form is first made (before model.fast())")
        if autotune is not None:
            self.autotune = autotune
            if self.engine is not None:
                self.engine.autotune = autotune

    def _make(self, model, autotune, kernels):
        from .heads import StableLmForCausalLM

        if not isinstance(model, StableLmForCausalLM) or model.device != "gpu":
            raise StableLmError(f"GpuFastModel takes a StableLmForCausalLM on device='gpu', got "
                                f"{type(model).__name__} on {getattr(model, 'device', '?')}")
        self.model, self.autotune, self.kernels = model, autotune, kernels
        self.engine = None
        self.unsupported = None          # why the engine did not run the latest request (None: it did / not asked)
        self._source = None              # what the engine's copies were made of (fast_forms.Source)
        self._kept = None                # what the next engine keeps of a stale one that went (_Kept)
        self._vectors = self._vector_bits = None    # the engine's float32 vectors, the params' bf16 (_share_vectors)
        self._lock = threading.Lock()    # held by the generate using the engine (EngineSteps.context)
        self._holder = None              # the thread holding it
        self._outside_since = None       # when its generate entered the streamer's put it is in, or None
        model._fast = self

    def __copy__(self):
        """The form itself (see __new__): a second form would build a second engine of the same weights."""
        return self

    def __reduce__(self):
        """pickle and copy.deepcopy: the GPU form of the carried model, made again from it (the engine, its stream
        and lock are not carried: failed with "cannot pickle 'module' object")."""
        return GpuFastModel, (self.model, self.autotune)

    def __getattr__(self, name):        # config, xp, dtype, params, device, lm_head_weight, _ids: the model's
        return getattr(self.__dict__["model"], name) if "model" in self.__dict__ else object.__getattribute__(self, name)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, input_ids, **kwargs):
        from .generation import generate

        return generate(self, input_ids, **kwargs)

    def fast(self):
        return self

    # ---- the decode engine --------------------------------------------------------------------
    def decode_steps(self, batch, total):
        """EngineSteps for `batch` rows of `total` positions, or None where the engine does not apply (the reason
        in self.unsupported, and logged)."""
        self.unsupported = self._problem(batch)
        if self.unsupported is not None:
            logger.info("decoding through the model's forward, not the graph engine: %s", self.unsupported)
            if self._lock.acquire(blocking=False):          # (not while a generate steps through the engine)
                try:
                    if not self._current():
                        self._drop()                        # its cache, and copies of the model's old weights
                finally:
                    self._lock.release()
            return None
        return EngineSteps(self, batch, total + 1)

    def _problem(self, batch):
        """Why the engine cannot run this request on the model as it is now, or None. Asked on every generate:
        the model may have been edited since the last."""
        from .cuda import decode_engine as de

        model = self.model
        if str(model.dtype) != "bfloat16":
            return f"the engine computes in bfloat16, the model in {model.dtype}"
        if batch > de.MAX_BATCH:
            return f"batch {batch} > {de.MAX_BATCH}"
        # _holder alone could be stale: a Ctrl-C as a hold's clean-up began left it set, the lock released
        if self._holder == threading.get_ident() and self._lock.locked():
            return "a generate inside a generate (the engine holds the outer one's state)"
        if not self._turn():
            return ("another thread's generate holds the engine and is in its streamer's put (which may wait for "
                    "this one)")
        try:
            de.GpuDecodeEngine.check_config(model.config)                  # rope_type included
        except (NotImplementedError, StableLmError) as e:
            return f"the engine does not cover this model ({e})"
        for name in model._shapes():
            if model.params[name].dtype != model.dtype:   # the forward computes with it; the engine would round it
                return f"tensor {name!r} is {model.params[name].dtype}, the model {model.dtype}"
        return None

    PUT_WAIT = 0.5   # seconds another generate's holder may stay in one streamer put before a waiter gives up on it

    def _turn(self):
        """Waits while another thread's generate holds the engine (generates take turns); False once that one has
        been in one call of its streamer's put for PUT_WAIT seconds: the put may be waiting for this generate (a
        streamer that starts a generate in a thread and joins it waited for ever). A put that returns within that
        time (printing a token) is not a reason: a waiter that gave up at any put saw one at nearly every token and
        stepped through the forward. EngineSteps.context takes the engine after; this only looks (a Ctrl-C between
        taking the lock here and giving it back would have left it taken for ever)."""
        while self._lock.locked():
            since = self._outside_since
            if since is not None and time.monotonic() - since >= self.PUT_WAIT:
                return False
            time.sleep(0.002)
        return True

    def _engine(self, batch, max_len):
        """The engine for `batch` rows of `max_len` positions: built (or built again, after an edit of the model
        since the last build: fast_forms.Source), else grown where its buffers are too small (reserve)."""
        from .cuda import decode_engine as de

        max_len = -(-max_len // CACHE_ROUND) * CACHE_ROUND
        if self._current():
            self.engine.reserve(batch, max_len)
            return self.engine
        self._drop()                               # the stale engine goes before the new one is made
        tied = ties(self.model.params, self.model._shapes())
        engine = de.GpuDecodeEngine(self.model.config, self.model.params, max_batch=batch, max_len=max_len,
                                    autotune=self.autotune, kernels=self.kernels)
        self.kernels = engine.k                    # (decode.cu built once)
        if self._kept is not None:
            self._kept.carry(engine)
        self.engine = engine
        self._share_weights()
        self._share_vectors()
        self._source, self._kept = Source(self.model), None
        warn_split(tied, self.model.params, "the GPU decode engine")
        return engine

    def _current(self):
        """Whether there is an engine made from the model as it is now (not stale: fast_forms.Source). A build
        that did not finish (an error, a Ctrl-C) left _source None."""
        return self.engine is not None and self._source is not None and self._source.same(self.model)

    def _drop(self):
        """Let the engine go (its cache, its copies, the tensors they were made of), keeping what the next one
        carries (_Kept)."""
        if self.engine is not None:
            self._kept = _Kept(self.engine)
        self.engine = self._source = self._vectors = None

    def _share_weights(self):
        """The model's q/k/v and gate/up matrices become views of the engine's fused arrays (held once). o_proj,
        down_proj, the embedding and lm_head the engine reads in params' own memory; one it had to copy (a tensor
        not C-contiguous) becomes a view of its copy, so that an edit in place of it reaches the engine too."""
        p, e, dt = self.model.params, self.engine, self.model.dtype
        HD, KD = e.H * e.D, e.KVH * e.D
        read = [("model.embed_tokens.weight", e.embed)] + ([("lm_head.weight", e.lm)] if e.lm is not e.embed else [])
        for i, L in enumerate(e.layers):
            t = layer_tensors(self.model.config, i)
            q, k, v = t.qkv
            p[q] = L.wqkv[:HD].view(dt)                                            # [H D, hidden]
            p[k] = L.wqkv[HD:HD + KD].view(dt)                                     # [KVH D, hidden]
            p[v] = L.wqkv[HD + KD:].view(dt)
            gate, up = t.gate_up
            p[gate] = L.wgu[0::2].view(dt)                                         # rows g0, u0, g1, u1, ...
            p[up] = L.wgu[1::2].view(dt)
            read += [(t.o, L.wo), (t.down, L.wd)]
        for name, used in read:
            if not e.cp.may_share_memory(p[name], used):                           # (bounds only: no kernel)
                p[name] = used.view(dt)

    def _share_vectors(self):
        """The vectors the kernels read in float32 (LayerNorm weights and biases, q|k|v biases, qk-norm weights)
        are joined: the model's params for them become views of one bfloat16 array (`_vector_bits`), and the
        engine's float32 copies views of one float32 array (`_vectors`), which refresh_vectors() computes from it
        at the start of every generate (one conversion; EngineSteps.context, right after this build too): an edit in
        place of one of them reaches the engine, as for the matrices. Each piece starts at a multiple of
        VECTOR_ALIGN elements (the kernels' vector loads)."""
        p, e, dt = self.model.params, self.engine, self.model.dtype
        cp = e.cp
        pieces = []                                            # (engine object, attribute, [param names], shape)
        for i, L in enumerate(e.layers):
            t = layer_tensors(self.model.config, i)
            pieces += [(L, "ln1_w", [t.ln1[0]]), (L, "ln1_b", [t.ln1[1]])]
            if L.ln2_w is not None:
                pieces += [(L, "ln2_w", [t.ln2[0]]), (L, "ln2_b", [t.ln2[1]])]
            if L.bqkv is not None:
                pieces.append((L, "bqkv", t.qkv_bias))
            if L.qn is not None:
                pieces += [(L, "qn", t.qk_norms[:e.H]), (L, "kn", t.qk_norms[e.H:])]
        pieces += [(e, "norm_w", ["model.norm.weight"]), (e, "norm_b", ["model.norm.bias"])]
        sizes = [sum(int(p[name].size) for name in names) for _, _, names in pieces]
        starts = np.cumsum([0] + [-(-n // VECTOR_ALIGN) * VECTOR_ALIGN for n in sizes])
        with e.stream:
            bits = cp.zeros(int(starts[-1]), cp.uint16)
            self._vectors = cp.zeros(int(starts[-1]), cp.float32)
            for (holder, attr, names), start, size in zip(pieces, starts, sizes):
                shape = getattr(holder, attr).shape
                at = int(start)
                for name in names:
                    n = int(p[name].size)
                    bits[at:at + n] = p[name].reshape(-1).view(cp.uint16)
                    p[name] = bits[at:at + n].view(dt)
                    at += n
                setattr(holder, attr, self._vectors[int(start):int(start) + size].reshape(shape))
        self._vector_bits = bits

    def refresh_vectors(self):
        """The engine's float32 vectors computed again from the model's (the bfloat16 views _share_vectors made), on
        its stream: what an edit in place of a LayerNorm weight, a bias or a qk-norm weight changed."""
        cp = self.engine.cp
        with self.engine.stream:                                           # bfloat16 bits -> float32: exact
            self._vectors[...] = (self._vector_bits.astype(cp.uint32) << 16).view(cp.float32)


VECTOR_ALIGN = 64          # elements: each vector of _share_vectors' joined arrays starts at 128 / 256 bytes


class _Kept:
    """What an engine built again after an edit of the model keeps of the stale one, taken before that one goes:
    its settings (CARRIED) and, where every weight matrix has the same shape, its tuning (the tuner would take
    seconds to find it again)."""

    CARRIED = ("pdl", "pdl_error", "fold_layernorm", "fold_final_layernorm", "megakernel", "step_shape", "carveout",
               "att_cluster", "att_cluster_error")

    def __init__(self, engine):
        self.settings = {name: getattr(engine, name) for name in self.CARRIED}
        self.shapes, self.tuning = self._shapes(engine), engine.tuning_state()
        self.step_kernel = dict(engine.step_kernel)

    @staticmethod
    def _shapes(e):
        return [W.shape for Ws, _ in e._gemv_shapes().values() for W in Ws] + [e.KVH, e.D]

    def carry(self, engine):
        for name, value in self.settings.items():
            setattr(engine, name, value)
        if self._shapes(engine) == self.shapes:
            engine.set_tuning_state(self.tuning)
            engine.step_kernel = dict(self.step_kernel)
        engine.reset_plans()


class EngineSteps:
    """generation.py's step backend over the decode engine (see the module docstring)."""

    def __init__(self, form, batch, max_len):
        self.form, self.model, self.batch, self.max_len = form, form.model, batch, max_len
        self.engine = None               # the form's, once context() holds it
        self._ahead = False              # the step the loop asks for next is already queued
        self._copied = False             # the latest step's picks are being copied to the host
        self._drawn = False              # every later step's draws are on the device (use_draws)

    @contextlib.contextmanager
    def context(self):
        """The engine, held for the whole generate (its cache and device state are this generate's: another
        thread's generate waits): built, built again after an edit of the model, or grown, here; every CuPy op
        of the loop on its stream, in order. That stream is non-blocking (no implicit order with CuPy's default,
        legacy null stream): the caller's current stream is waited for first, so that an edit of the model queued
        there is done before the engine reads the weights (a host wait; ~10 us where nothing is queued)."""
        from .cuda import xp

        xp.cupy().cuda.get_current_stream().synchronize()
        form = self.form
        with form._lock:
            form._holder, form._outside_since = threading.get_ident(), None
            try:
                e = self.engine = form._engine(self.batch, self.max_len)
                form.refresh_vectors()               # float32 vectors from params: a new build's, or edits in place
                self.xp, self.wide = e.cp, e.cp.float32
                self.cache = e.kv_cache(self.batch, self.model.dtype)
                self._chosen = e.tok[: self.batch]
                with e.stream:
                    yield
            finally:
                form._holder = None

    @contextlib.contextmanager
    def outside(self):
        """generate calls its streamer's put in here: code of the caller's, which may start a generate in another
        thread and wait for it; that one, once this put has lasted PUT_WAIT seconds, steps through the model's forward
        (GpuFastModel._turn)."""
        self.form._outside_since = time.monotonic()
        try:
            yield
        finally:
            self.form._outside_since = None

    def choose_in_step(self, settings):
        """The step picks the next ids in the graph: argmax_step (greedy), or sample_step (generate's
        processors and sampler) where it covers the settings; else the loop processes engine.logits_buf."""
        if not settings["do_sample"] and settings["repetition_penalty"] == 1.0:
            return self.engine.use_sampler(None)
        return self.engine.use_sampler(settings)

    def prefill(self, ids, mask, positions):
        out = self.model(ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1)
        self.engine.start(mask, ids)
        self._ahead = self._drawn = False
        return out.logits[:, -1, :]                                       # [B, V] bfloat16

    def use_draws(self, draws):
        """draws [steps, B]: the uniforms of every later step (generate draws them at once), uploaded once."""
        self.engine.set_draws(draws)
        self._drawn = True

    def step(self, next_ids, next_dev, mask, position, fused=False, u=None):
        e = self.engine
        if self._ahead:                                                   # queued by the previous call
            self._ahead = False
        else:
            if next_dev is not self._chosen:                              # the loop chose, or fed pad
                e.set_tokens(next_dev if next_dev is not None else next_ids)
            if u is not None and not self._drawn:
                e.set_draws(np.asarray(u)[None])                          # this step's draws alone
            e.decode_step()
        self._copied = False
        if fused and (u is None or self._drawn):                          # run one step ahead
            e.queue_picks_copy()
            self._copied = True
            if e.steps_left() > 0:
                e.decode_step()                                           # on the device's own picks
                self._ahead = True
        return None if fused else e.logits_buf[: self.batch]             # [B, V] float32, on the device

    def chosen_ids(self):
        return self._chosen                                               # [B] int32: the graph's choice

    def read_chosen(self):
        """(the graph's picks [B] on the host, whether the logits they were picked from are all finite): the
        engine's picks and flags of the step (argmax_step / the sampler set the flags while they scan the
        logits), from its ring in mapped host memory (engine.read_picks), else one device-to-host copy."""
        both = self.engine.read_picks() if self._copied else self.engine.cp.asnumpy(self.engine.tok_flags)
        return both[0, : self.batch].astype(np.int64), not both[1, : self.batch].any()


register("gpu", GpuFastModel)
