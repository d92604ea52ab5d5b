"""The GPU decode engine: a StableLM decode step as raw CUDA kernels, captured once as a CUDA graph.

One decode step for a batch of B <= 8 rows (bf16 weights, float32 residual stream x):

    x    = E[tok]                                        embed_rows
    for each layer:
      h  = LayerNorm(x)                                  layernorm_rows        -> bf16 [B, hidden]
                                                         (batch 1, sequential residual: folded into the
                                                         GEMV that reads h, gemv_ln_b1: mean and variance
                                                         from (sum x, sum x^2), which embed_rows and the
                                                         residual-add GEMVs accumulate)
      qkv = h @ [Wq; Wk; Wv]^T + b                       gemv (store)          -> f32 [B, (H + 2 KVH) D]
      a  = attention(qkv, cache)                         decode_attention:     q/k LayerNorm per head,
                                                         rotary, k/v written at cache[len], flash-decoding
                                                         over splits of [0, len] + combine -> bf16 [B, H D]
                                                         (a kv head's splits one thread-block cluster on
                                                         sm_90: combined in shared memory; as many splits
                                                         as the cached keys need, att_splits: one graph a
                                                         count)
      x += a @ Wo^T                                      gemv (add)
      h2 = LayerNorm2(x)    (h2 = h with parallel residual: x + attn(ln(x)) + mlp(ln(x)))
      m  = silu(h2 @ Wg^T) * (h2 @ Wu^T)                 gemv over interleaved gate/up rows (swiglu) -> bf16
      x += m @ Wd^T                                      gemv (add)
    logits = LayerNorm_f(x) @ W_lm^T                     gemv (store)          -> f32 [B, vocab]
                                                         (batch 1, sequential residual: LayerNorm_f folded
                                                         in too, the last down accumulating its statistics)
    tok = argmax(logits); len += 1; pos += 1             argmax_step (or generate's processors and sampler:
                                                         sample_step, or for top-k sample_topk_partial over
                                                         many blocks a row + sample_topk_merge); each also
                                                         flags rows with NaN / Inf logits (tok_flags[1]) and
                                                         puts picks and flags in a ring of host memory mapped
                                                         for the device (generate reads them with no copy)

At batch 1 on sm_90+ the step can instead be [embed_rows, decode_step_b1, argmax | sampling]: every layer,
the final LayerNorm and lm_head in one persistent kernel (decode_step.cu: one block a SM, 16 warps each
streaming its own rows of every matrix through its own shared-memory ring (bulk copies, or the tuner's
cp.async shape), the attention split over the grid, phases between grid barriers; the same roundings as the
launches above). engine.megakernel picks: False (the default: it measured 1.2x slower than the per-layer step
at 3b-4e1t and 2-1.6b shapes on an H200, so it is not timed) = never, None = the tuner times both steps and
keeps the faster (step_kernel[1], tune.py's stage 4), True = always. The emulated engine
(tests/test_decode_engine_emulated.py) has no such kernel and keeps the per-layer plan.

Token ids, positions and the cache length live in device memory, so the whole step is captured once
(cupy stream capture; cuBLAS is never called inside it) and replayed with no host work per layer.
A decode step is memory-bound: it reads every weight once (5.33 GB at stablelm-3b-4e1t shapes), so
the GEMV kernel does the work that matters. Its rows-per-block and block size are tuned per matrix shape
at the first capture of each batch size by timing graph replays of that matrix kind; then the best few at
0-4 persistent blocks per SM (blocks that loop over several row groups) and the winner at half the rows a
block are timed within the whole captured step, twice over the kinds, from two starts (the kinds visited in
two orders; where the two searches end apart, their ends are timed again over real steps), then the
attention's shape (seconds; tune.py, which keeps the choice on disk for the next engine of the same shapes on
the same GPU). At
batch 2-8 the candidates include the tensor-core GEMV (gemv_mma: mma.sync, where the CUDA-core GEMV does
nb FMAs a weight and becomes ALU-bound).

The graph is captured with programmatic dependent launches (PDL, cuLaunchKernelEx through ctypes): each
kernel may be scheduled while its predecessor drains, loading its first weights into registers before
griddepcontrol.wait (tokens and logits bit-identical to a plain graph's). On an H200, stablelm-3b-4e1t shapes,
batch 1: 1.63-1.65 ms a step by tuning, 608 tokens/s through model.generate in the latest bench, 76% of the
memory roofline (docs/cuda_decode_notes.md has every version, on the H100 before and the H200 now, and what did
not help).

model.generate reaches it through fast_gpu.EngineSteps: the model's own forward fills the engine's cache
through kv_cache() (views of it), start() sets the device state, set_tokens() the fed ids, decode_step()
replays the graph. prefill() is the engine's own self-contained prompt pass (engine_prefill.py: CuPy float32
ops and cuBLAS, activations rounded to bf16 where the decode kernels round): the engine's tests and probes use
it where there is no StableLmForCausalLM (transformers' weights).

The decode engine's files, by concern: decode.cu and decode_step.cu (the kernels), cubin.py (a source to a
cached cubin: nvcc, else NVRTC), launch.py (building decode.cu and decode_step.cu, bound launches, PDL,
cooperative launches, capture and replay timing), decode_kernels.py (the Python face of each kernel), tune.py
(the autotuner: GEMV shapes, the attention's shape, the whole-step kernel or not; its choice kept on disk),
engine_prefill.py (the engine's own prompt pass), specs.py (the float64 specification of every kernel), bf16.py
(bfloat16 bits on CuPy), xp.py (CuPy, or the CPU tests' stand-in), this file (weights, buffers, the step's
plan, capture, the device-side bookkeeping). Probe-only code lives in tools/ (decode_probe.py,
decode_timeline.py, step_timeline.py and their .cuh builds).

Config (attributes): vocab_size, hidden_size, intermediate_size, num_hidden_layers,
num_attention_heads, num_key_value_heads, head_dim, rotary_ndims, rope_theta, layer_norm_eps,
use_qkv_bias, qk_layernorm, use_parallel_residual, tie_word_embeddings, hidden_act,
max_position_embeddings.  Checkpoint tensors: the transformers names (model.embed_tokens.weight,
model.layers.{i}.*, model.norm.*, lm_head.weight), host arrays (float32 / bfloat16) or CuPy arrays
(float32, or 16-bit integer arrays holding raw bfloat16 bits, e.g. torch bf16 through DLPack).
"""

from __future__ import annotations

import numpy as np

from ..errors import CheckpointError, ConfigError, GenerationError
from ..fast_forms import layer_tensors
from . import engine_prefill, tune, xp
from .bf16 import to_bf16_bits, to_f32
from .decode_kernels import (ATT_DIMS, ATT_TK, MAX_BATCH, MK_PMAX, MODE_ADD, MODE_STORE, MODE_SWIGLU,
                             PICK_RING, STEP_SHAPES, DecodeKernels)
from .launch import Launch, capture_launches, replay_ms
from .tune import DEFAULT_ATT, DEFAULT_GEMV, GemvShape


def rotary_inv_freq(rope_theta: float, rotary_ndims: int) -> np.ndarray:
    """theta_i = rope_theta ** (-2i / d), in float32 like transformers."""
    d = np.float32(rotary_ndims)
    return (np.float32(1.0) / (np.float32(rope_theta) ** (np.arange(0, rotary_ndims, 2, dtype=np.float32) / d))
            ).astype(np.float32)


def config_from_transformers(cfg):
    """The attributes GpuDecodeEngine reads, from a transformers StableLmConfig (rope keys at the top
    level in older files, inside rope_parameters in newer ones)."""
    from types import SimpleNamespace
    rp = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    factor = rp.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 0.25))
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return SimpleNamespace(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=head_dim, rotary_ndims=int(head_dim * factor),
        rope_theta=float(theta), partial_rotary_factor=float(factor), layer_norm_eps=cfg.layer_norm_eps,
        use_qkv_bias=cfg.use_qkv_bias, qk_layernorm=cfg.qk_layernorm, use_parallel_residual=cfg.use_parallel_residual,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)), hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings, rope_scaling=rp or None)


# ----------------------------------------------------------------------------- the engine
class _Layer:
    __slots__ = ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "wqkv", "bqkv", "wo", "qn", "kn", "wgu", "wd")


class GpuDecodeEngine:
    """The decode step of StableLM on one GPU, bf16 weights, batch <= max_batch (<= 8). generate() drives it
    through fast_gpu.EngineSteps; alone (tests, probes):

    engine = GpuDecodeEngine(config, params, max_batch=1, max_len=1024)
    engine.prefill(input_ids, attention_mask, logits=None)     # or: the model's forward into kv_cache(), start()
    engine.decode_step()                                       # one graph replay: the next token of each row
    engine.generated()                                         # [B, steps] numpy
    """

    def __init__(self, config, params, max_batch: int = 1, max_len: int | None = None,
                 dtype: str = "bfloat16", *, kernels: DecodeKernels | None = None, autotune: bool = True,
                 pdl: bool = True):
        cp = self.cp = xp.cupy()
        if str(dtype).replace("torch.", "") not in ("bfloat16", "bf16"):
            raise NotImplementedError(f"GpuDecodeEngine computes with bfloat16 weights only, not {dtype!r}")
        self.check_config(config)
        c = self.config = config
        if not 1 <= max_batch <= MAX_BATCH:
            raise ConfigError(f"max_batch must be in [1, {MAX_BATCH}], got {max_batch}")
        self.max_batch = int(max_batch)
        self.max_len = int(max_len or c.max_position_embeddings)
        self.H, self.KVH, self.D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.G = self.H // self.KVH
        self.hidden, self.inter, self.vocab = c.hidden_size, c.intermediate_size, c.vocab_size
        self.rot = int(c.rotary_ndims)
        self.eps = float(c.layer_norm_eps)
        self.parallel = bool(c.use_parallel_residual)
        self.qk_ln = bool(c.qk_layernorm)
        self.k = kernels or DecodeKernels()
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.autotune = autotune
        self.pdl = pdl                      # capture with programmatic dependent launches (sm_90+; falls
        #                                     back to plain launches if the driver refuses, see capture())
        self.pdl_error = None
        self.fold_layernorm = True          # batch 1: the layers' LayerNorms folded into their GEMVs
        self.fold_final_layernorm = True    # with them, the final LayerNorm folded into lm_head (folds_final)
        self.megakernel = False             # batch 1, the whole step in one kernel (decode_step.cu): False = never
        #                                     (the default while it is 1.2x slower than the per-layer step, eleventh
        #                                     session's notes: timing it would add ~1 s to every tuning), None = the
        #                                     tuner's choice (step_kernel), True = always (an error where it cannot
        #                                     run)
        self.step_kernel: dict[int, bool] = {}    # batch -> whether the tuner chose the whole-step kernel
        self.step_kernel_note = None        # megakernel None: why the tuner did not time or keep the whole-step
        #                                     kernel (None: kept; never set while megakernel is False or True)
        self.step_shape = STEP_SHAPES[0]    # its rings: (bytes a slot, copies), the tuner's choice
        #                                     (set by hand: reset_plans() after, as for any tuning change)
        with self.stream:
            self._load_weights(params)
            self._allocate()
        self.stream.synchronize()
        self.tuning: dict[int, dict[str, GemvShape]] = {}
        self.step_ms: dict[int, float] = {}  # the tuned step's time (argmax left out), per batch size
        self.att_shape: dict[int, tuple] = {}    # batch -> attention's (split_tiles, nbuf), tune.py's choice
        self.tune_cache = True              # the tuner's choice kept on disk and read back (tune.cached)
        self.att_cluster = True             # a kv head's attention splits as one thread-block cluster where the
        #                                     GPU has them (DecodeKernels.attention_cluster): their partials
        #                                     combined in shared memory, not through global memory; the argmax
        #                                     reads a row with a cluster of blocks too; set False by capture()
        #                                     where the driver refuses the launch (the reason: att_cluster_error)
        self.att_cluster_error = None
        self.att_fit = True                 # the attention's grid fitted to the keys cached (att_splits): a step
        #                                     captured again each time the splits it needs change
        self.carveout: dict[str, int] = {}       # kind (a launch's tag, "gemv:" dropped) -> its launches' preferred
        #                                          shared-memory carveout in percent; absent: the driver's choice
        self.tune_log: list[tuple] = []      # every timing the tuner made (tune.py), or ("cache", batch, path)
        #                                     where it read its choice back from disk
        self._plans: dict[tuple, list[Launch]] = {}      # (batch, sampler, megakernel, splits) -> launches
        self.sampler = None                              # None: argmax_step; else generate's settings
        self._graphs: dict = {}
        self._nb = None
        self._host_len = 0
        self._host_step = 0
        self._picks_copied = None            # the event after queue_picks_copy's step (and copy)
        self._picks_step = 0                 # that step's device step number (its ring slot: % PICK_RING)

    # -- configuration ------------------------------------------------------------------------
    @staticmethod
    def check_config(c):
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "rotary_ndims", "rope_theta", "layer_norm_eps",
                    "use_qkv_bias", "qk_layernorm", "use_parallel_residual", "tie_word_embeddings",
                    "hidden_act", "max_position_embeddings"):
            if not hasattr(c, key):
                raise ConfigError(f"config has no attribute {key!r} (GpuDecodeEngine needs a StableLmConfig)")
        for holder in (getattr(c, "rope_scaling", None), getattr(c, "rope_parameters", None)):
            if isinstance(holder, dict):
                kind = holder.get("rope_type", holder.get("type", "default"))
                if kind not in (None, "default"):
                    raise NotImplementedError(
                        f"GpuDecodeEngine supports the default rotary embedding only, not rope_type={kind!r}; "
                        "use the NumPy model for scaled rotary embeddings")
        if c.hidden_act != "silu":
            raise NotImplementedError(f"hidden_act {c.hidden_act!r}: the fused MLP kernel implements silu only")
        if c.head_dim * c.num_attention_heads != c.hidden_size:
            raise ConfigError(f"head_dim {c.head_dim} * num_attention_heads {c.num_attention_heads} "
                              f"!= hidden_size {c.hidden_size}")
        if c.num_attention_heads % c.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if c.head_dim not in ATT_DIMS:
            raise NotImplementedError(f"head_dim {c.head_dim}: decode attention is compiled for {ATT_DIMS}")
        if c.hidden_size % 8 or c.intermediate_size % 8:
            raise NotImplementedError("hidden_size and intermediate_size must be multiples of 8 (16-byte loads)")
        if c.rotary_ndims % 2 or c.rotary_ndims > c.head_dim:
            raise ConfigError(f"rotary_ndims {c.rotary_ndims} must be even and <= head_dim {c.head_dim}")

    # -- weights --------------------------------------------------------------------------------
    def _load_weights(self, params):
        cp, c = self.cp, self.config

        def get(name):
            if name not in params:
                raise CheckpointError(f"checkpoint tensor {name!r} is missing")
            return params[name]

        def bits(name, shape):
            a = to_bf16_bits(get(name))
            if tuple(a.shape) != tuple(shape):
                raise CheckpointError(f"{name}: shape {tuple(a.shape)}, expected {tuple(shape)}")
            return a

        def f32(name, shape):
            a = to_f32(get(name))
            if tuple(a.shape) != tuple(shape):
                raise CheckpointError(f"{name}: shape {tuple(a.shape)}, expected {tuple(shape)}")
            return a

        hd, H, KVH, D, I = self.hidden, self.H, self.KVH, self.D, self.inter
        self.embed = bits("model.embed_tokens.weight", (self.vocab, hd))
        self.layers = []
        for i in range(c.num_hidden_layers):
            t = layer_tensors(c, i)                      # the groups fast_cpu.py joins too, in its own layout
            L = _Layer()
            L.ln1_w, L.ln1_b = (f32(n, (hd,)) for n in t.ln1)
            L.ln2_w, L.ln2_b = (f32(n, (hd,)) for n in t.ln2) if t.ln2 is not None else (None, None)
            rows = (H * D, KVH * D, KVH * D)
            L.wqkv = cp.concatenate([bits(n, (r, hd)) for n, r in zip(t.qkv, rows)], axis=0)  # [(H+2KVH) D, hidden]
            L.bqkv = (cp.concatenate([f32(n, (r,)) for n, r in zip(t.qkv_bias, rows)])
                      if t.qkv_bias is not None else None)
            L.wo = bits(t.o, (hd, H * D))
            if t.qk_norms is not None:
                L.qn = cp.stack([f32(n, (D,)) for n in t.qk_norms[:H]])                      # [H, D]
                L.kn = cp.stack([f32(n, (D,)) for n in t.qk_norms[H:]])                      # [KVH, D]
            else:
                L.qn = L.kn = None
            gate, up = (bits(n, (I, hd)) for n in t.gate_up)
            L.wgu = cp.ascontiguousarray(cp.stack([gate, up], axis=1).reshape(2 * I, hd))  # rows g0,u0,g1,u1,...
            del gate, up
            L.wd = bits(t.down, (hd, I))
            self.layers.append(L)
        self.norm_w = f32("model.norm.weight", (hd,))
        self.norm_b = f32("model.norm.bias", (hd,))
        if c.tie_word_embeddings or "lm_head.weight" not in params:
            if not c.tie_word_embeddings:
                raise CheckpointError("checkpoint tensor 'lm_head.weight' is missing "
                                      "(and tie_word_embeddings is false)")
            self.lm = self.embed
        else:
            self.lm = bits("lm_head.weight", (self.vocab, hd))
        self.inv_freq = cp.asarray(rotary_inv_freq(c.rope_theta, self.rot) if self.rot else np.zeros(1, np.float32))

    def weight_bytes_per_step(self) -> int:
        """Bytes of weights one decode step reads (every matrix and norm once; the B embedding rows it gathers,
        B x hidden x 2 bytes, are left out)."""
        n = 0
        for L in self.layers:
            n += sum(a.nbytes for a in (L.wqkv, L.wo, L.wgu, L.wd))
            n += sum(a.nbytes for a in (L.ln1_w, L.ln1_b, L.ln2_w, L.ln2_b, L.bqkv, L.qn, L.kn) if a is not None)
        return n + self.lm.nbytes + self.norm_w.nbytes * 2

    # -- device state ---------------------------------------------------------------------------
    def _allocate(self):
        """Every buffer, for max_batch rows of max_len positions. One that fails (out of memory, a Ctrl-C) leaves
        kc None, so that the next reserve() allocates them all again: a mix of new and old buffers was kept, and
        every later generate stepped through the plans of the old ones."""
        try:
            self._allocate_buffers()
        except BaseException:
            self.kc = self.vc = None
            raise

    def _allocate_buffers(self):
        cp = self.cp
        MB, hd = self.max_batch, self.hidden
        QKV = (self.H + 2 * self.KVH) * self.D
        self.x = cp.zeros((MB, hd), cp.float32)                     # residual stream
        self.h = cp.zeros((MB, hd), cp.uint16)                      # LayerNorm output (bf16)
        self.qkv = cp.zeros((MB, QKV), cp.float32)
        self.att = cp.zeros((MB, self.H * self.D), cp.uint16)
        self.mlp = cp.zeros((MB, self.inter), cp.uint16)
        self.logits_buf = cp.zeros((MB, self.vocab), cp.float32)
        nl = len(self.layers)
        self.kc = cp.zeros((nl, MB, self.KVH, self.max_len, self.D), cp.uint16)
        self.vc = cp.zeros_like(self.kc)
        self.kmask = cp.zeros((MB, self.max_len), cp.uint8)
        self.tok_flags = cp.zeros((2, MB), cp.int32)                # the step's picks | non-finite logits flags
        self.tok, self.nonfinite = self.tok_flags[0], self.tok_flags[1]
        self.picks_host = np.frombuffer(cp.cuda.alloc_pinned_memory(self.tok_flags.nbytes), np.int32,
                                        self.tok_flags.size).reshape(2, MB)   # queue_picks_copy's target
        ring = xp.mapped_host(cp, (PICK_RING, 3, MB), np.int32)   # where the step's kernels put their picks
        self.ring_host, self.ring = ring if ring is not None else (None, None)   # for the host: no copy
        self.pos = cp.zeros(MB, cp.int32)
        self.cache_len = cp.zeros(1, cp.int32)
        self.step = cp.zeros(1, cp.int32)
        self.history = cp.zeros((self.max_len, MB), cp.int32)
        self.att_counters = cp.zeros(MB * self.KVH, cp.int32)
        self.am_counter = cp.zeros(1, cp.int32)
        self.present = cp.zeros((MB, self.vocab), cp.uint8)       # ids in each row (repetition penalty)
        self.uniform = cp.zeros((self.max_len, MB), cp.float64)   # draws u ~ U[0, 1) by step, like history
        self.sample_scratch = self.k.sample_scratch(MB, self.vocab)  # sampling's top-k union (sample_launch)
        ns = max(self.k.attention_splits(nb, self.KVH, self.max_len) for nb in range(1, MB + 1))
        self.part_o = cp.zeros((MB, self.H, ns, self.D), cp.float32)
        self.part_ml = cp.zeros((MB, self.H, ns, 2), cp.float32)
        self.ln_stats = cp.zeros((2 * len(self.layers) + 1, MB, 2), cp.float64)  # folded LayerNorms' (sum,
        #                                                           sum sq): [2i] LN1 of layer i, [2i + 1] LN2, [-1] the final
        self.step_sync = cp.zeros(2, cp.uint32)     # the whole-step kernel's grid barrier (it leaves it zero)
        self.step_part_o = cp.zeros((1, self.H, MK_PMAX, self.D), cp.float32)   # its attention's parts
        self.step_part_ml = cp.zeros((1, self.H, MK_PMAX, 2), cp.float32)
        self._step_ptrs = None                      # its pointer table (_step_launch; made again with the cache)

    # -- the decode step as a list of launches ---------------------------------------------------------
    def _gemv_shapes(self):
        """name -> (weights of every layer, mode): what the tuner sizes (_layer_gemv picks each one's input)."""
        return {
            "qkv": ([L.wqkv for L in self.layers], MODE_STORE),
            "o_proj": ([L.wo for L in self.layers], MODE_ADD),
            "gate_up": ([L.wgu for L in self.layers], MODE_SWIGLU),
            "down": ([L.wd for L in self.layers], MODE_ADD),
            "lm_head": ([self.lm], MODE_STORE),
        }

    def folds_layernorm(self, nb) -> bool:
        """Whether the step at batch nb folds the layers' LayerNorms into the GEMVs that read them
        (gemv_ln_b1_r*: batch 1, sequential residual, fold_layernorm set); the final LayerNorm too where
        folds_final. Not with a parallel residual: there gate|up reads LN1(x) of the x before o_proj's add, which
        the folded read (of the current x) would not see."""
        return self.fold_layernorm and nb == 1 and not self.parallel and self.hidden <= 24576

    def folds_final(self, nb) -> bool:
        """Whether the final LayerNorm is folded into lm_head too (with folds_layernorm and
        fold_final_layernorm): the last layer's down accumulates its statistics (ln_stats[-1]) and lm_head
        reads the float32 residual, so the LayerNorm kernel and its launch boundary go. Each lm_head block
        writes h into its shared memory once, so a persistent lm_head (the tuner's usual choice) pays it once
        a block, a one-block-a-group one once a group of rows."""
        return self.fold_final_layernorm and self.folds_layernorm(nb)

    def _layer_gemv(self, name, i, nb):
        """The launch of GEMV kind `name` of layer i (lm_head: i ignored) at batch nb, as the step runs it.
        With folded LayerNorms (folds_layernorm), q|k|v and gate|up read the float32 residual x and the
        LayerNorm statistics (ln_stats[2i]: LN1 of layer i, [2i + 1]: LN2) that embed_rows (instance 0), o_proj
        (LN2) and the previous layer's down (LN1) accumulate; otherwise the bf16 output h of the LayerNorm
        kernel. With folds_final, lm_head reads x and the final LayerNorm's statistics (ln_stats[-1]) that the
        last layer's down accumulates."""
        shape = self.tuning.get(nb, {}).get(name, DEFAULT_GEMV)
        fold, last, final = self.folds_layernorm(nb), i + 1 == len(self.layers), self.folds_final(nb)
        L = self.layers[i] if name != "lm_head" else None
        kw = dict(nb=nb, rows=shape.rows, threads=shape.threads, persist=shape.persist, unroll=shape.unroll,
                  tag="gemv:" + name)
        if name == "qkv":
            ln = (L.ln1_w, L.ln1_b, self.ln_stats[2 * i], self.eps) if fold else None
            return self.k.gemv_launch(self.x if fold else self.h, L.wqkv, mode=MODE_STORE, yf=self.qkv, bias=L.bqkv,
                                      ln=ln, **kw)
        if name == "o_proj":
            stats = self.ln_stats[2 * i + 1] if fold else None
            return self.k.gemv_launch(self.att, L.wo, mode=MODE_ADD, yf=self.x, stats_out=stats, **kw)
        if name == "gate_up":
            ln = (L.ln2_w, L.ln2_b, self.ln_stats[2 * i + 1], self.eps) if fold else None
            return self.k.gemv_launch(self.x if fold else self.h, L.wgu, mode=MODE_SWIGLU, yh=self.mlp, ln=ln, **kw)
        if name == "down":
            stats = self.ln_stats[2 * i + 2] if fold and (final or not last) else None
            return self.k.gemv_launch(self.mlp, L.wd, mode=MODE_ADD, yf=self.x, stats_out=stats, **kw)
        if final:
            return self.k.gemv_launch(self.x, self.lm, mode=MODE_STORE, yf=self.logits_buf, **kw,
                                      ln=(self.norm_w, self.norm_b, self.ln_stats[-1], self.eps))
        return self.k.gemv_launch(self.h, self.lm, mode=MODE_STORE, yf=self.logits_buf, **kw)

    def step_kernel_problem(self) -> str | None:
        """Why the whole-step kernel (decode_step.cu) cannot run this model on this GPU; None if it can."""
        problem = self.k.step_problem(hidden=self.hidden, inter=self.inter, H=self.H, KVH=self.KVH, D=self.D,
                                      slot=self.step_shape[0])
        if problem is None and any(W.data.ptr % 16 for L in self.layers for W in (L.wqkv, L.wo, L.wgu, L.wd)):
            problem = "a weight matrix does not start at a 16-byte boundary (its bulk copies need one)"
        if problem is None and self.lm.data.ptr % 16:
            problem = "lm_head's weight does not start at a 16-byte boundary (its bulk copies need one)"
        return problem

    def uses_step_kernel(self, nb) -> bool:
        """Whether the step at batch nb is [embed, decode_step_b1, argmax | sampling]: batch 1 only, where
        megakernel is True, or None and the tuner chose it (step_kernel). megakernel True where the kernel
        cannot run is an error saying why."""
        if nb != 1 or self.megakernel is False or (self.megakernel is None and not self.step_kernel.get(nb)):
            return False
        problem = self.step_kernel_problem()
        if problem is not None:
            if self.megakernel:
                raise NotImplementedError(f"megakernel=True, but the whole-step kernel cannot run here: {problem}; "
                                          "set engine.megakernel = None (the tuner's choice) or False")
            return False
        return True

    def _step_launch(self):
        """decode_step_b1's launch: every layer, the final LayerNorm and lm_head at batch 1 (decode_kernels)."""
        cp, L0 = self.cp, len(self.layers)
        if self._step_ptrs is None:          # once per cache allocation: captured graphs hold its address
            ptrs = np.zeros((L0, 16), np.uint64)
            for i, L in enumerate(self.layers):
                arrays = (L.wqkv, L.wo, L.wgu, L.wd, L.ln1_w, L.ln1_b, L.ln2_w, L.ln2_b, L.bqkv, L.qn, L.kn,
                          self.kc[i], self.vc[i])
                ptrs[i, : len(arrays)] = [0 if a is None else a.data.ptr for a in arrays]
            with self.stream:
                self._step_ptrs = cp.asarray(ptrs)
        return self.k.step_launch(
            self._step_ptrs, self.lm, self.norm_w, self.norm_b, self.x, self.qkv, self.step_part_o, self.step_part_ml,
            self.mlp, self.logits_buf, self.cache_len, self.pos, self.kmask, self.inv_freq, self.rot,
            hidden=self.hidden, inter=self.inter, vocab=self.vocab, H=self.H, KVH=self.KVH, D=self.D, eps=self.eps,
            qk_ln=self.qk_ln, parallel=self.parallel, sync=self.step_sync, shape=self.step_shape)

    def att_splits(self, nb) -> int:
        """The attention's splits (grid x) for the next step of batch nb: with att_fit, as many as the cached
        keys need (one a split_tiles tiles of ATT_TK keys, the next step's new key included) while a sequence is
        under way, at most attention_splits(max_len) (what the partials' buffers hold); else that maximum. The
        kernel itself uses only the splits the device-side length needs, so a graph with fewer splits than a
        later length needs stays correct (each split takes more tiles); the extra ones of a graph captured for
        the maximum launch, start and leave (on the H200, 8 splits a kv head where 4 had keys made a 3b-4e1t
        step 0.018 ms slower: the notes' thirteenth session)."""
        cap = self.k.attention_splits(nb, self.KVH, self.max_len)
        if not self.att_fit or self._nb is None:
            return cap
        split_tiles = self.att_shape.get(nb, DEFAULT_ATT)[0]
        tiles = -(-(self._host_len + 1) // ATT_TK)
        return max(1, min(cap, -(-tiles // split_tiles)))

    def _plan(self, nb):
        ns = 0 if self.uses_step_kernel(nb) else self.att_splits(nb)
        key = (nb, self._sampler_key(), self.megakernel, ns)
        if key in self._plans:
            return self._plans[key]
        k = self.k
        if self.uses_step_kernel(nb):
            plan = [k.embed_launch(self.tok, self.embed, self.x, nb=nb), self._step_launch()]
            return self._finish_plan(key, plan, nb)
        split_tiles, nbuf = self.att_shape.get(nb, DEFAULT_ATT)
        fold = self.folds_layernorm(nb)
        plan = [k.embed_launch(self.tok, self.embed, self.x, nb=nb, stats=self.ln_stats if fold else None)]
        for i, L in enumerate(self.layers):
            if not fold:
                plan.append(k.layernorm_launch(self.x, L.ln1_w, L.ln1_b, self.h, nb=nb, eps=self.eps,
                                               tag="layernorm"))
            plan.append(self._layer_gemv("qkv", i, nb))
            plan.append(k.attention_launch(
                self.qkv, self.kc[i], self.vc[i], self.cache_len, self.pos, self.kmask, self.inv_freq, self.rot,
                nb=nb, H=self.H, KVH=self.KVH, D=self.D, out=self.att, part_o=self.part_o, part_ml=self.part_ml,
                counters=self.att_counters, nsplit=ns, qn_w=L.qn, kn_w=L.kn, eps=self.eps, split_tiles=split_tiles,
                nbuf=nbuf, cluster=self.att_cluster))
            plan.append(self._layer_gemv("o_proj", i, nb))
            if not self.parallel and not fold:
                plan.append(k.layernorm_launch(self.x, L.ln2_w, L.ln2_b, self.h, nb=nb, eps=self.eps,
                                               tag="layernorm"))
            plan.append(self._layer_gemv("gate_up", i, nb))
            plan.append(self._layer_gemv("down", i, nb))
        if not self.folds_final(nb):
            plan.append(k.layernorm_launch(self.x, self.norm_w, self.norm_b, self.h, nb=nb, eps=self.eps,
                                           tag="layernorm"))
        plan.append(self._layer_gemv("lm_head", 0, nb))
        return self._finish_plan(key, plan, nb)

    def _finish_plan(self, key, plan, nb):
        """The step's last launches (argmax, or generate's processors and sampler) and the carveouts."""
        k = self.k
        if self.sampler is None:
            plan.append(self._argmax_launch(nb))
        else:
            penalty = self.sampler["repetition_penalty"] != 1.0
            plan += k.sample_launch(self.logits_buf, self.present if penalty else None, self.uniform, self.tok,
                                    self.history, self.step, self.cache_len, self.pos, self.am_counter, nb=nb,
                                    settings=self.sampler, scratch=self.sample_scratch, bad=self.nonfinite,
                                    ring=self.ring)
        for fn in plan:
            fn.carveout = self.carveout.get(fn.tag.split(":")[-1])
        self._plans[key] = plan
        return plan

    def _argmax_launch(self, nb):
        return self.k.argmax_launch(self.logits_buf, self.tok, self.history, self.step, self.cache_len, self.pos,
                                    self.am_counter, nb=nb, bad=self.nonfinite, ring=self.ring,
                                    cluster=self.att_cluster)

    def reset_plans(self):
        """Drop every plan and captured graph, so the next step is planned and captured again (after a change
        of kernels, tuning, buffers or a setting such as fold_layernorm)."""
        self._plans.clear()
        self._graphs.clear()

    def forget_tuning(self, nb=None):
        """Forget what the tuner chose for batch nb (every batch if None): the GEMV shapes, the attention's
        shape and the step's time, and drop the plans and graphs; the next capture tunes again. (Clearing
        `tuning` alone kept the attention shape tuned for the kernels or settings before.)"""
        for d in (self.tuning, self.att_shape, self.step_ms, self.step_kernel):
            if nb is None:
                d.clear()
            else:
                d.pop(nb, None)
        self.reset_plans()

    def tuning_state(self):
        """What the tuner chose, every batch (to put back with set_tuning_state): copies, each batch's GEMV
        shapes included, so that changing the engine's tuning later leaves them as they were."""
        return {nb: dict(t) for nb, t in self.tuning.items()}, dict(self.att_shape), dict(self.step_ms)

    def set_tuning_state(self, state):
        tuning, att_shape, step_ms = state
        self.tuning = {nb: dict(t) for nb, t in tuning.items()}
        self.att_shape, self.step_ms = dict(att_shape), dict(step_ms)
        self.reset_plans()

    def _forget(self, nb):
        """Drop the plans of batch nb (after a tuning change)."""
        for key in [key for key in self._plans if key[0] == nb]:
            del self._plans[key]

    def _sampler_key(self):
        s = self.sampler
        return None if s is None else tuple(sorted(s.items()))

    # -- what the step does with its logits: argmax (default) or generate's processors and sampler -----
    def use_sampler(self, settings):
        """settings: generation._settings' dict (do_sample, temperature, top_k, top_p, repetition_penalty), for
        sample_step in the step's place of argmax_step; None for the greedy argmax. Returns False (and keeps
        the argmax) where sample_step does not cover the settings."""
        if settings is not None:
            keep = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
            settings = {k: settings[k] for k in keep}
            if not self.k.sampler_covers(settings, self.vocab):
                self.sampler = None
                return False
        self.sampler = settings
        return True

    def set_draws(self, draws):
        """draws [n, B] (host float64 in [0, 1)): the uniforms the sampler inverts the cdf at in the next n
        decode steps, row i for the i-th step from now (the graph reads row `step` of the table: one upload
        for a whole generate call, none a step). Rows past the table's end are dropped."""
        d = np.asarray(draws, np.float64).reshape(len(draws), -1)
        s = self._host_step
        n = max(0, min(len(d), self.max_len - s))
        with self.stream:
            self.uniform[s:s + n, : d.shape[1]] = self.cp.asarray(d[:n])

    # -- timing helpers and the GEMV autotuner ------------------------------------------------------
    def capture_launches(self, launches, pdl: bool = False):
        return capture_launches(self.stream, launches, pdl)

    def replay_ms(self, graph, replays: int = 1, reps: int = 3, warmup: bool = True) -> float:
        return replay_ms(self.stream, graph, replays, reps, warmup)

    def time_launches(self, launches, reps: int = 3) -> float:
        """Milliseconds per replay of `launches` captured as one plain CUDA graph (median of reps)."""
        return self.replay_ms(self.capture_launches(launches), reps=reps)

    def _tune(self, nb):
        tune.tune(self, nb)

    def time_step(self, nb, replays: int = 10, reps: int = 3) -> float:
        """Milliseconds per decode step for batch nb with the current tuning, the argmax or sampling left out
        (nothing advances: each replay writes the same cache slot and scratch buffers). Median of reps."""
        return self.replay_ms(self.capture_launches(self._unpicked_plan(nb), pdl=self.pdl), replays=replays,
                              reps=reps)

    def _unpicked_plan(self, nb):
        """The step's launches planned afresh, without its pick (the argmax or the sampler)."""
        self._forget(nb)
        return [fn for fn in self._plan(nb) if fn.tag not in ("argmax", "sample")]

    def time_decode(self, nb, steps: int) -> float | None:
        """Milliseconds per decode step for batch nb with the current tuning over `steps` real greedy steps from
        the sequence under way (the argmax included: the cache length grows as in a generate), in one timing;
        then the device state is put back (cache length, positions, step number, tokens, flags), so the
        sequence goes on as if nothing had run (the cache rows and history rows the steps wrote lie past the
        length, and are written again before they are read). time_step replays one step at one length; this
        one sees the attention grow. None where no sequence of batch nb is under way or the cache has no room."""
        if self._nb != nb or not 1 <= steps < self.steps_left() - 1:
            return None
        state = (self.cache_len, self.pos, self.step, self.tok, self.nonfinite, self.am_counter)
        with self.stream:
            saved = [a.copy() for a in state]
        plan = self._unpicked_plan(nb) + [self._argmax_launch(nb)]
        try:
            return self.replay_ms(self.capture_launches(plan, pdl=self.pdl), replays=steps, reps=1, warmup=False)
        finally:
            with self.stream:
                for a, v in zip(state, saved):
                    a[...] = v
            self.stream.synchronize()

    # -- public API -------------------------------------------------------------------------------------
    def prefill(self, input_ids, attention_mask=None, *, logits: str | None = "last"):
        """Run the prompt through the model (CuPy float32 + cuBLAS), fill the KV cache, pick the first
        new token. logits: 'last' -> [B, V], 'all' -> [B, T, V] (numpy float32), None -> nothing."""
        return engine_prefill.prefill(self, input_ids, attention_mask, logits=logits)

    def capture(self, nb: int):
        """Tune the GEMVs and the attention for batch nb (once) and capture the decode step as a CUDA graph (one a
        count of attention splits, att_splits: a step whose splits differ from the last's replays another). With
        pdl, the kernels after the first are captured as programmatic dependents of their predecessor; if
        the driver refuses, the engine falls back to ordinary launches (the reason is kept in pdl_error). A
        refused capture of the tuner's whole-step kernel falls back to the per-layer step (step_kernel_note), a
        refused one with cluster launches (the attention's, the argmax's) to the global-memory combine and one
        block a row, tuned again (att_cluster False, the reason in att_cluster_error)."""
        self._tune(nb)                                   # (once a batch size: the key below depends on it)
        key = (nb, bool(self.pdl), self._sampler_key(), self.megakernel,
               0 if self.uses_step_kernel(nb) else self.att_splits(nb))
        if key not in self._graphs:
            try:
                self._graphs[key] = self.capture_launches(self._plan(nb), pdl=self.pdl)
            except Exception as e:  # noqa: BLE001 - no libcuda symbol, odd argument, refused capture
                if self.megakernel is None and self.uses_step_kernel(nb):      # the per-layer step instead
                    self.step_kernel[nb], self.step_kernel_note = False, f"capture failed: {e!r}"
                    self._forget(nb)
                    return self.capture(nb)
                if self.att_cluster and any(getattr(fn, "cluster", 0) for fn in self._plan(nb)):
                    self.att_cluster, self.att_cluster_error = False, repr(e)   # the global combine instead,
                    self.forget_tuning(nb)                                      # timed without clusters
                    return self.capture(nb)
                if not self.pdl:
                    raise
                self.pdl, self.pdl_error = False, repr(e)    # plain launches instead
                return self.capture(nb)
        return self._graphs[key]

    def decode_step(self, use_graph: bool = True):
        """Feed the current token of each row, compute the next (asynchronous: nothing is copied back)."""
        if self._nb is None:
            raise GenerationError("decode_step() needs a prompt first: call prefill()")
        if self._host_len >= self.max_len:
            raise GenerationError(f"the KV cache is full (max_len={self.max_len})")
        nb = self._nb
        if use_graph:
            self.capture(nb).launch(self.stream)       # (eager launches never use PDL: see decode.cu)
        else:
            self._tune(nb)
            with self.stream:
                for fn in self._plan(nb):
                    fn()
        self._host_len += 1
        self._host_step += 1

    def synchronize(self):
        self.stream.synchronize()

    def _reset_step_scratch(self):
        """Zero what the step's kernels expect zero at a sequence's start (on the current stream): the
        attention splits' and argmax/sampler's counters, the top-k union's counts, the non-finite flags."""
        self.att_counters[...] = 0
        self.am_counter[...] = 0
        self.sample_scratch[2][...] = 0
        self.nonfinite[...] = 0

    def steps_left(self) -> int:
        """decode_step() calls the cache has room for."""
        return self.max_len - self._host_len

    def queue_picks_copy(self):
        """Make the latest step's picks and non-finite flags (tok_flags) readable by read_picks(), which then
        waits for that step alone while later steps run: where the engine has its host ring (mapped memory the
        step's argmax / sampler write, slot step % PICK_RING), an event after the step, nothing else in the
        stream; else a copy into pinned host memory, ordered after that step and before anything queued later."""
        cp = self.cp
        if self.ring is None:
            cp.asnumpy(self.tok_flags, stream=self.stream, out=self.picks_host, blocking=False)
        self._picks_step = self._host_step - 1                   # the device step number that step wrote
        if self._picks_copied is None:
            self._picks_copied = cp.cuda.Event()
        self._picks_copied.record(self.stream)

    def read_picks(self) -> np.ndarray:
        """[2, max_batch] int32: the picks and flags of the step queue_picks_copy() followed (waits for it). A ring
        slot already written by a later step (more than PICK_RING - 1 steps queued after it) is not that step's:
        then the stream is waited for and the step's picks read from its history row (its flags are the
        latest's)."""
        self._picks_copied.synchronize()
        if self.ring is None:
            return self.picks_host.copy()
        s = self._picks_step
        slot = self.ring_host[s % PICK_RING]
        got = slot[:2].copy()
        if (slot[2, : self._nb] == s).all():
            return got
        self.stream.synchronize()
        got = self.cp.asnumpy(self.tok_flags)
        if s < self.history.shape[0]:
            got[0, : self._nb] = self.cp.asnumpy(self.history[s, : self._nb])
        return got

    def get_logits(self) -> np.ndarray:
        """Logits [B, V] (float32) that chose the latest token."""
        self.stream.synchronize()
        return self.cp.asnumpy(self.logits_buf[: self._nb])

    def generated(self) -> np.ndarray:
        """Tokens chosen so far [B, steps] (prefill's pick first)."""
        self.stream.synchronize()
        return self.cp.asnumpy(self.history[: self._host_step, : self._nb]).T.astype(np.int64)

    # -- the model's own forward as the prefill (generation.py's loop; see stablelm_ref/fast_gpu.py) ------
    def reserve(self, batch: int, max_len: int):
        """Make room for `batch` rows of `max_len` positions: the device buffers are allocated again (and the
        captured graphs dropped) only when the current ones are too small; the tuning (GEMV and attention shapes)
        is kept. A growth that fails (out of memory) leaves the old size, allocated again by the next call: the size
        that failed was kept, and every later call, however small, ran out of memory again."""
        if not 1 <= batch <= MAX_BATCH:
            raise GenerationError(f"the decode engine runs batches of 1 to {MAX_BATCH} rows, not {batch}")
        if batch <= self.max_batch and max_len <= self.max_len and self.kc is not None:
            return
        old = self.max_batch, self.max_len
        self.max_batch, self.max_len = max(batch, self.max_batch), max(max_len, self.max_len)
        self.kc = self.vc = None                                     # free the old cache first
        self.reset_plans()                                           # (captured with the old buffers)
        self._nb = None
        try:
            with self.stream:
                self._allocate()
        except BaseException:
            self.max_batch, self.max_len = old
            raise
        self.stream.synchronize()

    def kv_cache(self, batch: int, dtype):
        """A kv_cache.KVCache whose per-layer buffers [batch, KVH, max_len, D] are views of this engine's
        cache (as `dtype`, the model's bfloat16): the model's forward writes the prompt's keys and values
        where decode_step reads them."""
        from ..kv_cache import KVCache

        keys = [self.kc[i, :batch].view(dtype) for i in range(len(self.layers))]
        values = [self.vc[i, :batch].view(dtype) for i in range(len(self.layers))]
        return KVCache.from_buffers(keys, values, self.cp)

    def start(self, attention_mask, input_ids=None):
        """Device state for decode_step after a prompt of T positions was written into the cache (by the
        model's forward through kv_cache()): the key mask, each row's next position, the cache length; with
        input_ids [B, T], the ids present in each row after its left padding (the repetition penalty's)."""
        cp = self.cp
        mask = np.asarray(attention_mask).astype(np.int32)
        B, T = mask.shape
        if B > self.max_batch or T >= self.max_len:
            raise GenerationError(f"a prompt of {B} x {T} does not fit the engine ({self.max_batch} x {self.max_len})")
        with self.stream:
            self.kmask[:B, :T] = cp.asarray(mask.astype(np.uint8))
            self.kmask[:B, T:] = 1
            self.pos[:B] = cp.asarray(mask.sum(axis=1).astype(np.int32))
            self.cache_len[0] = T
            self.step[0] = 1                                  # the first token (set_tokens) is history[0]
            self._reset_step_scratch()
            if input_ids is not None:
                ids = np.asarray(input_ids)
                first = np.argmax(mask != 0, axis=1)                  # [B] left-padding lengths
                rows, cols = np.nonzero(np.arange(T)[None, :] >= first[:, None])
                self.present[:B] = 0
                self.present[cp.asarray(rows), cp.asarray(ids[rows, cols])] = 1
        self._nb, self._host_len, self._host_step = B, T, 1

    def set_tokens(self, ids):
        """Replace the latest chosen tokens (the step's argmax, or the slot start() left) by ids [B] (device
        or host): what the next decode_step feeds, and what generated() reports."""
        cp, B = self.cp, self._nb
        with self.stream:
            t = cp.asarray(ids).astype(cp.int32)
            self.tok[:B] = t
            self.history[self._host_step - 1, :B] = t
            self.present[cp.arange(B), t] = 1
