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
              say whether the logits were finite (read_chosen: one copy), nothing else. One step runs
              ahead: step() queues the copy of its picks, then already the next step (whose graph reads
              those picks on the device), so the GPU works while the loop reads the ids, checks eos and
              streams. The loop feeds every unfinished row the graph's own pick; a finished row's pad it
              does not get, which changes nothing the loop keeps (rows are independent; its tokens are pad
              from then on). A step queued when the loop stops (eos, max_new_tokens) is wasted.
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
for those matrices become views of the fused arrays (as fast_cpu.py does for the CPU's layout).
This module imports no CuPy at import time (stablelm_ref/__init__.py imports it to register "gpu").
"""

from __future__ import annotations

import logging

import numpy as np

from .errors import StableLmError
from .fast_forms import register

logger = logging.getLogger(__name__)

CACHE_ROUND = 256          # the engine's cache length is rounded up to this, so that most calls reuse it


class GpuFastModel:
    """StableLmForCausalLM on the GPU with its decode engine (built on the first generate that uses it)."""

    def __init__(self, model, autotune: bool = True):
        from .heads import StableLmForCausalLM

        if not isinstance(model, StableLmForCausalLM) or model.device != "gpu":
            raise StableLmError(f"GpuFastModel takes a StableLmForCausalLM on device='gpu', got "
                                f"{type(model).__name__} on {getattr(model, 'device', '?')}")
        self.model, self.config = model, model.config
        self.autotune = autotune
        self.engine = None
        self.unsupported = None          # why the engine cannot run this model (None: not known yet / it can)

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
        """EngineSteps for `batch` rows of `total` positions, or None where the engine does not apply."""
        from .cuda import decode_engine as de

        if str(self.model.dtype) != "bfloat16":
            return None
        if batch > de.MAX_BATCH:
            logger.info("batch %d > %d: decoding through the model's forward, not the graph engine",
                        batch, de.MAX_BATCH)
            return None
        engine = self._engine(batch, total + 1)
        return None if engine is None else EngineSteps(self.model, engine, batch)

    def _engine(self, batch, max_len):
        from .cuda import decode_engine as de

        if self.unsupported is not None:
            return None
        max_len = -(-max_len // CACHE_ROUND) * CACHE_ROUND
        if self.engine is None:
            try:
                de.GpuDecodeEngine.check_config(self.config)                  # rope_type included
            except (NotImplementedError, StableLmError) as e:
                self.unsupported = str(e)
            if self.unsupported is not None:
                logger.info("the graph engine does not cover this model (%s): decoding through its forward",
                            self.unsupported)
                return None
            self.engine = de.GpuDecodeEngine(self.config, self.model.params, max_batch=batch, max_len=max_len,
                                             autotune=self.autotune)
            self._share_weights()
        else:
            self.engine.reserve(batch, max_len)
        return self.engine

    def _share_weights(self):
        """The model's q/k/v and gate/up matrices become views of the engine's fused arrays (held once)."""
        p, e, dt = self.model.params, self.engine, self.model.dtype
        HD, KD = e.H * e.D, e.KVH * e.D
        for i, L in enumerate(e.layers):
            a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            p[a + "q_proj.weight"] = L.wqkv[:HD].view(dt)                          # [H D, hidden]
            p[a + "k_proj.weight"] = L.wqkv[HD:HD + KD].view(dt)                   # [KVH D, hidden]
            p[a + "v_proj.weight"] = L.wqkv[HD + KD:].view(dt)
            p[m + "gate_proj.weight"] = L.wgu[0::2].view(dt)                       # rows g0, u0, g1, u1, ...
            p[m + "up_proj.weight"] = L.wgu[1::2].view(dt)


class EngineSteps:
    """generation.py's step backend over the decode engine (see the module docstring)."""

    def __init__(self, model, engine, batch):
        self.model, self.engine, self.batch = model, engine, batch
        self.xp = engine.cp
        self.wide = self.xp.float32
        self.cache = engine.kv_cache(batch, model.dtype)
        self._chosen = engine.tok[:batch]
        self._ahead = False              # the step the loop asks for next is already queued
        self._copied = False             # the latest step's picks are being copied to the host
        self._drawn = False              # every later step's draws are on the device (use_draws)

    def context(self):
        return self.engine.stream            # every CuPy op of the loop on the engine's stream, in order

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
        """(the graph's picks [B] on the host, whether the logits they were picked from are all finite): one
        device-to-host copy of the engine's [2, max_batch] picks and flags (argmax_step / the sampler set the
        flags while they scan the logits)."""
        both = self.engine.read_picks() if self._copied else self.engine.cp.asnumpy(self.engine.tok_flags)
        return both[0, : self.batch].astype(np.int64), not both[1, : self.batch].any()


register("gpu", GpuFastModel)
