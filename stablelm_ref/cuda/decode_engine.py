"""Fast greedy decoding on an NVIDIA GPU: raw CUDA kernels replayed as one CUDA graph per token.

One decode step for a batch of B <= 8 rows (bf16 weights, float32 residual stream x):

    x    = E[tok]                                        embed_rows
    for each layer:
      h  = LayerNorm(x)                                  layernorm_rows        -> bf16 [B, hidden]
      qkv = h @ [Wq; Wk; Wv]^T + b                       gemv (store)          -> f32 [B, (H + 2 KVH) D]
      a  = attention(qkv, cache)                         decode_attention:     q/k LayerNorm per head,
                                                         rotary, k/v written at cache[len], flash-decoding
                                                         over splits of [0, len] + combine -> bf16 [B, H D]
      x += a @ Wo^T                                      gemv (add)
      h2 = LayerNorm2(x)    (h2 = h with parallel residual: x + attn(ln(x)) + mlp(ln(x)))
      m  = silu(h2 @ Wg^T) * (h2 @ Wu^T)                 gemv over interleaved gate/up rows (swiglu) -> bf16
      x += m @ Wd^T                                      gemv (add)
    logits = LayerNorm_f(x) @ W_lm^T                     gemv (store)          -> f32 [B, vocab]
    tok = argmax(logits); len += 1; pos += 1             argmax_step

Token ids, positions and the cache length live in device memory, so the whole step is captured once
(cupy stream capture; cuBLAS is never called inside it) and replayed with no host work per layer.
A decode step is memory-bound: it reads every weight once (5.33 GB at stablelm-3b-4e1t shapes), so
the GEMV kernel does the work that matters. Its rows-per-block and block size are tuned per matrix shape
at start-up by timing graph replays of that matrix kind; then the best few, and 1-4 persistent blocks per
SM (blocks that loop over several row groups), are timed within the whole captured step (seconds).

The graph is captured with programmatic dependent launches (PDL, cuLaunchKernelEx through ctypes): each
kernel may be scheduled while its predecessor drains, loading its first weights into registers before
griddepcontrol.wait. On an H100, stablelm-3b-4e1t shapes, batch 1: 2.23 ms a step (449 tokens/s, 79% of
the memory roofline); the same shapes in a plain graph 2.54 ms, with bit-identical tokens and logits
(docs/cuda_decode_notes.md has every version and what did not help).

Prefill (filling the cache from a prompt) uses plain CuPy float32 ops and cuBLAS with a simple
masked softmax attention: correctness over speed. Activations are rounded to bf16 at the same
points as in the decode kernels, so prefill and decode compute the same function.

Config (attributes): vocab_size, hidden_size, intermediate_size, num_hidden_layers,
num_attention_heads, num_key_value_heads, head_dim, rotary_ndims, rope_theta, layer_norm_eps,
use_qkv_bias, qk_layernorm, use_parallel_residual, tie_word_embeddings, hidden_act,
max_position_embeddings.  Checkpoint tensors: the transformers names (model.embed_tokens.weight,
model.layers.{i}.*, model.norm.*, lm_head.weight), host arrays (float32 / bfloat16) or CuPy arrays
(float32, or 16-bit integer arrays holding raw bfloat16 bits, e.g. torch bf16 through DLPack).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import CheckpointError, ConfigError, GenerationError

_SRC = Path(__file__).with_name("decode.cu")

MODE_STORE, MODE_ADD, MODE_SWIGLU = 0, 1, 2
GEMV_BATCHES = (1, 2, 4, 8)                 # compiled batch widths (BM); a batch of 3 uses BM = 4
GEMV_ROWS = (1, 2, 4, 8)                    # compiled rows per block (R)
GEMV_MAX_THREADS = 512
ATT_DIMS = (64, 80, 96, 128, 160)           # compiled head dims
ATT_THREADS, ATT_TK, ATT_MAXJ = 128, 64, 8  # must match decode.cu
TUNE_FINALISTS = 3                          # GEMV shapes per matrix kind timed again within the whole step
TUNE_PERSIST = (1, 2, 3, 4)                 # persistent blocks per SM tried for the chosen shape
MAX_BATCH = 8


class GemvShape(NamedTuple):
    """How a GEMV is launched: rows per block group, threads per block, persistent blocks per SM (0: one
    block per group of rows), and the microseconds / GB/s it took alone at tuning time (0 if not timed)."""
    rows: int
    threads: int
    persist: int
    us: float
    gbs: float


DEFAULT_GEMV = GemvShape(4, 256, 0, 0.0, 0.0)


_BACKEND = None   # tests may put a NumPy stand-in for CuPy here (see tests/test_decode_engine_emulated.py)


def _cupy():
    if _BACKEND is not None:
        return _BACKEND
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError("the GPU decode engine needs CuPy: pip install 'stablelm-ref[gpu]'") from e
    return cupy


# ----------------------------------------------------------------------------- building the kernels
def _define_flags(defines) -> list[str]:
    return [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]


def kernel_cache_name(compute_capability: str, defines: dict | None = None) -> str:
    """File name of the compiled module for this source, these -D defines and GPU architecture (e.g. '90')."""
    key = _SRC.read_bytes() + compute_capability.encode() + " ".join(_define_flags(defines)).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    return f"decode-{digest}-sm_{compute_capability}.cubin"


def build_cubin(compute_capability: str, out_dir: str | os.PathLike, defines: dict | None = None) -> Path:
    """Compile decode.cu with nvcc into out_dir (a machine without a GPU can prepare it)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found on PATH")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / kernel_cache_name(compute_capability, defines)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_out = Path(tmp) / target.name
        subprocess.run([nvcc, "-cubin", f"-arch=sm_{compute_capability}", "-O3", *_define_flags(defines),
                        "-o", str(tmp_out), str(_SRC)], check=True, capture_output=True, text=True)
        shutil.move(str(tmp_out), str(target))
    return target


def _load_module(cp, defines: dict | None = None):
    """A cached cubin (STABLELM_REF_KERNEL_CACHE, default ~/.cache/stablelm_ref), else nvcc, else NVRTC.
    defines: compile-time variants of decode.cu (benchmarks compare them; the engine uses the defaults)."""
    cc = cp.cuda.Device().compute_capability
    cache = Path(os.environ.get("STABLELM_REF_KERNEL_CACHE", Path.home() / ".cache" / "stablelm_ref"))
    cubin = cache / kernel_cache_name(cc, defines)
    if not cubin.exists() and shutil.which("nvcc"):
        try:
            build_cubin(cc, cache, defines)
        except (OSError, subprocess.CalledProcessError):
            pass
    if cubin.exists():
        return cp.RawModule(path=str(cubin)), f"cubin {cubin.name}"
    return cp.RawModule(code=_SRC.read_text(), options=("--std=c++17", *_define_flags(defines))), "nvrtc"


def _i32(v):
    return np.int32(v)


_NULL = np.uint64(0)   # a null device pointer as a kernel argument


class Launch:
    """One kernel launch with its arguments bound (replayed eagerly or captured into a graph)."""

    __slots__ = ("fn", "grid", "block", "args", "smem", "tag")

    def __init__(self, fn, grid, block, args, smem=0, tag=""):
        self.fn, self.grid, self.block, self.args, self.smem, self.tag = fn, grid, block, args, smem, tag

    def __call__(self):
        self.fn(self.grid, self.block, self.args, shared_mem=self.smem)


class PdlLauncher:
    """Launches through the driver's cuLaunchKernelEx with programmatic stream serialization, so that in
    a captured graph each kernel may start while its predecessor drains (decode.cu's PDL_LAUNCH/PDL_WAIT).
    CuPy's launcher has no launch attributes, hence ctypes. Struct layouts as in cuda.h (CUDA 12/13)."""

    ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6

    def __init__(self):
        import ctypes as C
        self.C = C

        class Value(C.Union):
            _fields_ = [("pad", C.c_char * 64), ("val", C.c_int), ("_align", C.c_void_p)]

        class Attr(C.Structure):
            _fields_ = [("id", C.c_int), ("pad", C.c_char * 4), ("value", Value)]

        class Config(C.Structure):
            _fields_ = [("gridDimX", C.c_uint), ("gridDimY", C.c_uint), ("gridDimZ", C.c_uint),
                        ("blockDimX", C.c_uint), ("blockDimY", C.c_uint), ("blockDimZ", C.c_uint),
                        ("sharedMemBytes", C.c_uint), ("hStream", C.c_void_p), ("attrs", C.POINTER(Attr)),
                        ("numAttrs", C.c_uint)]

        self.Attr, self.Config = Attr, Config
        self.fn = C.CDLL("libcuda.so.1").cuLaunchKernelEx
        self.fn.restype = C.c_int
        self.fn.argtypes = [C.POINTER(Config), C.c_void_p, C.POINTER(C.c_void_p), C.c_void_p]

    def bind(self, launch: "Launch", stream_ptr: int, programmatic: bool):
        """A callable that launches `launch` on the stream (as a programmatic dependent if asked)."""
        C, cp = self.C, _cupy()
        vals = []
        for a in launch.args:
            if isinstance(a, cp.ndarray):
                vals.append(C.c_void_p(a.data.ptr))
            elif isinstance(a, np.uint64):
                vals.append(C.c_uint64(int(a)))
            elif isinstance(a, np.int32):
                vals.append(C.c_int32(int(a)))
            elif isinstance(a, np.float32):
                vals.append(C.c_float(float(a)))
            else:
                raise TypeError(f"PdlLauncher: unsupported kernel argument {type(a)}")
        params = (C.c_void_p * len(vals))(*[C.cast(C.pointer(v), C.c_void_p) for v in vals])
        attr = self.Attr()
        attr.id = self.ATTR_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.val = 1
        g = tuple(launch.grid) + (1,) * (3 - len(launch.grid))
        b = tuple(launch.block) + (1,) * (3 - len(launch.block))
        cfg = self.Config(g[0], g[1], g[2], b[0], b[1], b[2], launch.smem, stream_ptr, C.pointer(attr),
                          1 if programmatic else 0)
        func = launch.fn.kernel.ptr

        def run(_keep=(vals, params, attr, cfg)):
            rc = self.fn(C.byref(cfg), C.c_void_p(func), params, None)
            if rc != 0:
                raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {rc} ({launch.tag})")
        return run


class DecodeKernels:
    """The compiled decode.cu module and one launcher per kernel (also used by the tests)."""

    def __init__(self, defines: dict | None = None):
        cp = self.cp = _cupy()
        self.defines = dict(defines or {})
        self.module, self.source = _load_module(cp, self.defines)
        f = self.module.get_function
        self.gemv_fn = {(bm, r): f(f"gemv_b{bm}_r{r}") for bm in GEMV_BATCHES for r in GEMV_ROWS
                        if not (bm == 8 and r == 8)}
        self.attn_fn = {d: f(f"decode_attention_d{d}") for d in ATT_DIMS}
        self.layernorm_fn = f("layernorm_rows")
        self.embed_fn = f("embed_rows")
        self.argmax_fn = f("argmax_step")
        self.read_probe_fn = f("read_probe")
        dev = cp.cuda.Device()
        self.num_sms = dev.attributes["MultiProcessorCount"]
        self.device_name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()

    # -- GEMV ---------------------------------------------------------------------------------
    @staticmethod
    def gemv_batch_width(nb: int) -> int:
        for bm in GEMV_BATCHES:
            if nb <= bm:
                return bm
        raise GenerationError(f"decode batch {nb} is larger than {GEMV_BATCHES[-1]}")

    def gemv_launch(self, x, W, *, nb, mode, yf=None, yh=None, bias=None, rows=4, threads=256, persist=0,
                    tag="gemv"):
        """y[b, n] (+)= x[b, :] @ W[n, :] for b < nb.  x: uint16 bf16 bits [>= nb, K] (C-contiguous rows),
        W: uint16 [N, K]; yf: float32 [>= nb, N] (store/add); yh: uint16 [>= nb, N/2] (swiglu).
        persist: 0 = one block per group of `rows` rows; p > 0 = p blocks per SM, each taking several groups."""
        N, K = W.shape
        if K % 8 or x.shape[-1] != K or x.dtype.itemsize != 2 or W.dtype.itemsize != 2:
            raise ValueError(f"gemv: need bf16 x [nb, K] and W [N, K] with K % 8 == 0, got {x.shape}, {W.shape}")
        if threads % 32 or not 32 <= threads <= GEMV_MAX_THREADS:
            raise ValueError(f"gemv: threads must be a multiple of 32 in [32, {GEMV_MAX_THREADS}]")
        bm = self.gemv_batch_width(nb)
        if mode == MODE_SWIGLU:
            if rows % 2 or N % 2:
                raise ValueError("gemv swiglu needs an even number of rows per block and of W rows")
            y, ldy = yh, yh.shape[-1]
        else:
            y, ldy = yf, yf.shape[-1]
        fn = self.gemv_fn[(bm, rows)]
        args = (x, _i32(K), _i32(nb), W, _i32(N), _i32(K),
                bias if bias is not None else _NULL,
                yf if yf is not None else _NULL, yh if yh is not None else _NULL, _i32(ldy), _i32(mode))
        del y
        groups = (N + rows - 1) // rows
        grid = min(groups, persist * self.num_sms) if persist else groups
        return Launch(fn, (grid,), (threads,), args, tag=tag)

    # -- attention ----------------------------------------------------------------------------
    def attention_splits(self, nb: int, kv_heads: int, max_len: int) -> int:
        """Splits of the key axis (grid x): about two blocks per SM, at most one tile each."""
        want = math.ceil(2 * self.num_sms / max(1, nb * kv_heads))
        return int(max(1, min(want, math.ceil(max_len / ATT_TK))))

    @staticmethod
    def attention_smem(G: int, D: int) -> int:
        return ATT_TK * (D + 8) * 2 + ATT_TK * D * 2 + (G * D + 2 * D + G * ATT_TK + 3 * G + D) * 4

    def attention_launch(self, qkv, kc, vc, cache_len, pos, kmask, inv_freq, rot, *, nb, H, KVH, D,
                         out, part_o, part_ml, counters, nsplit, qn_w=None, kn_w=None, eps=1e-5,
                         scale=None, tag="attention"):
        if D not in self.attn_fn:
            raise NotImplementedError(f"decode attention is compiled for head_dim in {ATT_DIMS}, not {D}")
        if H % KVH:
            raise ValueError(f"num_attention_heads {H} is not a multiple of num_key_value_heads {KVH}")
        G = H // KVH
        if G * D > 2 * ATT_MAXJ * ATT_THREADS:
            raise NotImplementedError(f"decode attention supports (heads per kv head) * head_dim <= "
                                      f"{2 * ATT_MAXJ * ATT_THREADS}, got {G} * {D}")
        max_len = kc.shape[-2]
        smem = self.attention_smem(G, D)
        fn = self.attn_fn[D]
        if smem > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = smem
        qk_ln = qn_w is not None
        scale = D ** -0.5 if scale is None else scale
        args = (qkv, kc, vc, cache_len, pos, kmask, inv_freq, _i32(rot),
                qn_w if qk_ln else _NULL, kn_w if qk_ln else _NULL, _i32(qk_ln), np.float32(eps),
                part_o, part_ml, counters, out, _i32(H), _i32(KVH), _i32(max_len), np.float32(scale))
        return Launch(fn, (nsplit, KVH, nb), (ATT_THREADS,), args, smem=smem, tag=tag)

    # -- small kernels ------------------------------------------------------------------------
    def layernorm_launch(self, x, w, b, y, *, nb, eps, tag="layernorm"):
        K = x.shape[-1]
        threads = 256 if K <= 4096 else 512     # the register-resident fast path holds 16 floats a thread
        return Launch(self.layernorm_fn, (nb,), (threads,),
                      (x, _i32(K), w, b, y, _i32(y.shape[-1]), _i32(K), np.float32(eps)), tag=tag)

    def embed_launch(self, tok, E, x, *, nb, tag="embed"):
        return Launch(self.embed_fn, (nb,), (256,), (tok, E, _i32(E.shape[1]), x), tag=tag)

    def argmax_launch(self, logits, tok, history, step, cache_len, pos, counter, *, nb, tag="argmax"):
        V = logits.shape[-1]
        return Launch(self.argmax_fn, (nb,), (1024,),
                      (logits, _i32(V), tok, history, _i32(history.shape[1]), _i32(history.shape[0]),
                       step, cache_len, pos, counter), tag=tag)


# ----------------------------------------------------------------------------- bf16 helpers (CuPy)
def f32_to_bf16_bits(a):
    """float32 array -> uint16 array of bfloat16 bits, round to nearest even (NaN stays NaN)."""
    xp = _cupy()
    u = xp.ascontiguousarray(a, dtype=xp.float32).view(xp.uint32)
    r = ((u + xp.uint32(0x7FFF) + ((u >> 16) & xp.uint32(1))) >> 16).astype(xp.uint16)
    nan = (u & xp.uint32(0x7FFFFFFF)) > xp.uint32(0x7F800000)
    return xp.where(nan, ((u >> 16) | xp.uint32(0x40)).astype(xp.uint16), r)


def bf16_bits_to_f32(a):
    cp = _cupy()
    return (a.astype(cp.uint32) << 16).view(cp.float32)


def round_bf16(a):
    return bf16_bits_to_f32(f32_to_bf16_bits(a))


def _is_bf16_dtype(dt) -> bool:
    return getattr(dt, "name", "") == "bfloat16"


def to_bf16_bits(a):
    """Host (float32/float16/float64/bfloat16) or CuPy array -> C-contiguous CuPy uint16 bf16 bits."""
    cp = _cupy()
    if isinstance(a, cp.ndarray):
        if a.dtype.itemsize == 2 and (a.dtype.kind in "iuV" or _is_bf16_dtype(a.dtype)):
            return cp.ascontiguousarray(a.view(cp.uint16))
        return f32_to_bf16_bits(a.astype(cp.float32))
    a = np.asarray(a)
    if _is_bf16_dtype(a.dtype):
        return cp.asarray(np.ascontiguousarray(a).view(np.uint16))
    import ml_dtypes
    return cp.asarray(a.astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16))


def to_f32(a):
    """Host or CuPy array (raw bf16 bits for 16-bit integer CuPy arrays) -> CuPy float32."""
    cp = _cupy()
    if isinstance(a, cp.ndarray):
        if a.dtype.itemsize == 2 and (a.dtype.kind in "iuV" or _is_bf16_dtype(a.dtype)):
            return bf16_bits_to_f32(cp.ascontiguousarray(a.view(cp.uint16)))
        return cp.ascontiguousarray(a, dtype=cp.float32)
    return cp.asarray(np.asarray(a).astype(np.float32))


def _layernorm(x, w, b, eps):
    cp = _cupy()
    mean = x.mean(axis=-1, keepdims=True)
    var = cp.square(x - mean).mean(axis=-1, keepdims=True)
    y = (x - mean) / cp.sqrt(var + eps) * w
    return y if b is None else y + b


def _rope(x, cos, sin, rot):
    """GPT-NeoX rotary on the first rot dims: x1 cos - x2 sin | x2 cos + x1 sin | untouched rest."""
    cp = _cupy()
    if rot == 0:
        return x
    half = rot // 2
    x1, x2 = x[..., :half], x[..., half:rot]
    return cp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]], axis=-1)


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


# ----------------------------------------------------------------------------- NumPy float64 references
# The specification of every kernel in decode.cu: the GPU tests compare each kernel with these.
def ref_bf16_to_f64(bits) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def ref_f64_to_bf16(a) -> np.ndarray:
    """Round to bfloat16 (through float32, as the kernels do) and return the raw bits."""
    import ml_dtypes
    return np.asarray(a, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def ref_round_bf16(a) -> np.ndarray:
    return ref_bf16_to_f64(ref_f64_to_bf16(a))


def ref_gemv(x, W, mode=MODE_STORE, bias=None, y0=None) -> np.ndarray:
    """x [nb, K], W [N, K] (values, float64): store -> x W^T + bias; add -> y0 + x W^T;
    swiglu (rows interleaved gate0, up0, gate1, ...) -> silu(gate) * up  [nb, N/2]."""
    acc = np.asarray(x, np.float64) @ np.asarray(W, np.float64).T
    if mode == MODE_STORE:
        return acc if bias is None else acc + bias
    if mode == MODE_ADD:
        return y0 + acc
    g, u = acc[:, 0::2], acc[:, 1::2]
    return g / (1.0 + np.exp(-g)) * u


def ref_layernorm(x, w, b, eps) -> np.ndarray:
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mean).mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * w
    return y if b is None else y + b


def ref_decode_attention(qkv, kc, vc, cache_len, pos, kmask, inv_freq, rot, H, KVH, D,
                         qn=None, kn=None, eps=1e-5, scale=None, k_new=None):
    """One decode step of attention for nb rows.

    qkv [nb, (H + 2 KVH) D] (new token, float), kc/vc [nb, KVH, >= cache_len, D] (cached bf16 values;
    slots with kmask 0 may hold anything), kmask [nb, >= cache_len] (1 = attend), pos [nb] rotary
    positions. Returns (out [nb, H D], k_new [nb, KVH, D], v_new [nb, KVH, D]) with k_new/v_new the
    bf16-rounded values the kernel writes at cache[cache_len]. Query head h reads kv head h // (H / KVH).
    k_new (optional, [nb, KVH, D]) replaces the computed new keys (to test with a kernel's own rounding).
    """
    qkv = np.asarray(qkv, np.float64)
    nb, G, L = qkv.shape[0], H // KVH, int(cache_len)
    scale = D ** -0.5 if scale is None else scale
    out = np.zeros((nb, H, D))
    given_k = k_new
    k_new, v_new = np.zeros((nb, KVH, D)), np.zeros((nb, KVH, D))
    half = rot // 2
    for b in range(nb):
        q = qkv[b, : H * D].reshape(H, D)
        k = qkv[b, H * D:(H + KVH) * D].reshape(KVH, D)
        v = qkv[b, (H + KVH) * D:].reshape(KVH, D)
        if qn is not None:
            q = ref_layernorm(q, qn, None, eps)
            k = ref_layernorm(k, kn, None, eps)
        ang = (np.float32(pos[b]) * np.asarray(inv_freq[:half], np.float32)).astype(np.float64)
        cos, sin = np.cos(ang), np.sin(ang)

        def rope(t):
            t = t.copy()
            x1, x2 = t[:, :half].copy(), t[:, half:rot].copy()
            t[:, :half], t[:, half:rot] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
            return t

        q, k = rope(q) * scale, ref_round_bf16(rope(k))
        if given_k is not None:
            k = np.asarray(given_k[b], np.float64)
        v = ref_round_bf16(v)
        k_new[b], v_new[b] = k, v
        valid = np.concatenate([np.asarray(kmask[b, :L], bool), [True]])
        for h in range(H):
            j = h // G
            keys = np.concatenate([np.asarray(kc[b, j, :L], np.float64), k[j][None]])[valid]
            vals = np.concatenate([np.asarray(vc[b, j, :L], np.float64), v[j][None]])[valid]
            s = keys @ q[h]
            p = np.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ vals
    return out.reshape(nb, H * D), k_new, v_new


# ----------------------------------------------------------------------------- the engine
class _Layer:
    __slots__ = ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "wqkv", "bqkv", "wo", "qn", "kn", "wgu", "wd")


class GpuDecodeEngine:
    """Greedy generation for StableLM on one GPU, bf16 weights, batch <= max_batch (<= 8).

    engine = GpuDecodeEngine(config, params, max_batch=1, max_len=1024)
    new_ids = engine.generate(input_ids, attention_mask, max_new_tokens=128)   # [B, 128] numpy
    """

    def __init__(self, config, params, max_batch: int = 1, max_len: int | None = None,
                 dtype: str = "bfloat16", *, kernels: DecodeKernels | None = None, autotune: bool = True,
                 pdl: bool = True):
        cp = self.cp = _cupy()
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
        with self.stream:
            self._load_weights(params)
            self._allocate()
        self.stream.synchronize()
        self.tuning: dict[int, dict[str, GemvShape]] = {}
        self.step_ms: dict[int, float] = {}  # the tuned step's time (argmax left out), per batch size
        self._plans: dict[int, list[Launch]] = {}
        self._graphs: dict = {}
        self._nb = None
        self._host_len = 0
        self._host_step = 0

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
            p = f"model.layers.{i}."
            L = _Layer()
            L.ln1_w = f32(p + "input_layernorm.weight", (hd,))
            L.ln1_b = f32(p + "input_layernorm.bias", (hd,))
            if self.parallel:
                L.ln2_w = L.ln2_b = None
            else:
                L.ln2_w = f32(p + "post_attention_layernorm.weight", (hd,))
                L.ln2_b = f32(p + "post_attention_layernorm.bias", (hd,))
            a = p + "self_attn."
            L.wqkv = cp.concatenate([bits(a + "q_proj.weight", (H * D, hd)), bits(a + "k_proj.weight", (KVH * D, hd)),
                                     bits(a + "v_proj.weight", (KVH * D, hd))], axis=0)       # [(H+2KVH) D, hidden]
            L.bqkv = (cp.concatenate([f32(a + "q_proj.bias", (H * D,)), f32(a + "k_proj.bias", (KVH * D,)),
                                      f32(a + "v_proj.bias", (KVH * D,))]) if c.use_qkv_bias else None)
            L.wo = bits(a + "o_proj.weight", (hd, H * D))
            if self.qk_ln:
                L.qn = cp.stack([f32(a + f"q_layernorm.norms.{h}.weight", (D,)) for h in range(H)])    # [H, D]
                L.kn = cp.stack([f32(a + f"k_layernorm.norms.{h}.weight", (D,)) for h in range(KVH)])  # [KVH, D]
            else:
                L.qn = L.kn = None
            m = p + "mlp."
            gate, up = bits(m + "gate_proj.weight", (I, hd)), bits(m + "up_proj.weight", (I, hd))
            L.wgu = cp.ascontiguousarray(cp.stack([gate, up], axis=1).reshape(2 * I, hd))  # rows g0,u0,g1,u1,...
            del gate, up
            L.wd = bits(m + "down_proj.weight", (hd, I))
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
        """Bytes of weights one decode step reads (every matrix once, one embedding row per batch row)."""
        n = 0
        for L in self.layers:
            n += sum(a.nbytes for a in (L.wqkv, L.wo, L.wgu, L.wd))
            n += sum(a.nbytes for a in (L.ln1_w, L.ln1_b, L.ln2_w, L.ln2_b, L.bqkv, L.qn, L.kn) if a is not None)
        return n + self.lm.nbytes + self.norm_w.nbytes * 2

    def kv_bytes_per_step(self, cache_len: int, nb: int = 1) -> int:
        return 2 * len(self.layers) * nb * self.KVH * (cache_len + 1) * self.D * 2

    # -- device state ---------------------------------------------------------------------------
    def _allocate(self):
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
        self.tok = cp.zeros(MB, cp.int32)
        self.pos = cp.zeros(MB, cp.int32)
        self.cache_len = cp.zeros(1, cp.int32)
        self.step = cp.zeros(1, cp.int32)
        self.history = cp.zeros((self.max_len, MB), cp.int32)
        self.att_counters = cp.zeros(MB * self.KVH, cp.int32)
        self.am_counter = cp.zeros(1, cp.int32)
        ns = max(self.k.attention_splits(nb, self.KVH, self.max_len) for nb in range(1, MB + 1))
        self.part_o = cp.zeros((MB, self.H, ns, self.D), cp.float32)
        self.part_ml = cp.zeros((MB, self.H, ns, 2), cp.float32)

    # -- the decode step as a list of launches ---------------------------------------------------------
    def _gemv_shapes(self):
        """name -> (weights of every layer, x, output kwargs, mode)."""
        return {
            "qkv": ([L.wqkv for L in self.layers], self.h, MODE_STORE),
            "o_proj": ([L.wo for L in self.layers], self.att, MODE_ADD),
            "gate_up": ([L.wgu for L in self.layers], self.h, MODE_SWIGLU),
            "down": ([L.wd for L in self.layers], self.mlp, MODE_ADD),
            "lm_head": ([self.lm], self.h, MODE_STORE),
        }

    def _gemv(self, name, W, x, mode, nb, bias=None):
        shape = self.tuning.get(nb, {}).get(name, DEFAULT_GEMV)
        out = {"qkv": dict(yf=self.qkv), "o_proj": dict(yf=self.x), "gate_up": dict(yh=self.mlp),
               "down": dict(yf=self.x), "lm_head": dict(yf=self.logits_buf)}[name]
        return self.k.gemv_launch(x, W, nb=nb, mode=mode, bias=bias, rows=shape.rows, threads=shape.threads,
                                  persist=shape.persist, tag="gemv:" + name, **out)

    def _plan(self, nb):
        if nb in self._plans:
            return self._plans[nb]
        k = self.k
        ns = k.attention_splits(nb, self.KVH, self.max_len)
        plan = [k.embed_launch(self.tok, self.embed, self.x, nb=nb)]
        for i, L in enumerate(self.layers):
            plan.append(k.layernorm_launch(self.x, L.ln1_w, L.ln1_b, self.h, nb=nb, eps=self.eps, tag="layernorm"))
            plan.append(self._gemv("qkv", L.wqkv, self.h, MODE_STORE, nb, bias=L.bqkv))
            plan.append(k.attention_launch(
                self.qkv, self.kc[i], self.vc[i], self.cache_len, self.pos, self.kmask, self.inv_freq, self.rot,
                nb=nb, H=self.H, KVH=self.KVH, D=self.D, out=self.att, part_o=self.part_o, part_ml=self.part_ml,
                counters=self.att_counters, nsplit=ns, qn_w=L.qn, kn_w=L.kn, eps=self.eps))
            plan.append(self._gemv("o_proj", L.wo, self.att, MODE_ADD, nb))
            if not self.parallel:
                plan.append(k.layernorm_launch(self.x, L.ln2_w, L.ln2_b, self.h, nb=nb, eps=self.eps,
                                               tag="layernorm"))
            plan.append(self._gemv("gate_up", L.wgu, self.h, MODE_SWIGLU, nb))
            plan.append(self._gemv("down", L.wd, self.mlp, MODE_ADD, nb))
        plan.append(k.layernorm_launch(self.x, self.norm_w, self.norm_b, self.h, nb=nb, eps=self.eps,
                                       tag="layernorm"))
        plan.append(self._gemv("lm_head", self.lm, self.h, MODE_STORE, nb))
        plan.append(k.argmax_launch(self.logits_buf, self.tok, self.history, self.step, self.cache_len, self.pos,
                                    self.am_counter, nb=nb))
        self._plans[nb] = plan
        return plan

    # -- timing helpers and the GEMV autotuner ------------------------------------------------------
    def capture_launches(self, launches, pdl: bool = False):
        """`launches` captured on the engine's stream as one CUDA graph; with pdl, each launch after the first
        is a programmatic dependent of its predecessor (PdlLauncher)."""
        s = self.stream
        if pdl:
            pl = PdlLauncher()
            launches = [pl.bind(fn, s.ptr, programmatic=i > 0) for i, fn in enumerate(launches)]
        with s:
            s.begin_capture()
            try:
                for fn in launches:
                    fn()
            finally:
                g = s.end_capture()
        return g

    def replay_ms(self, graph, replays: int = 1, reps: int = 3, warmup: bool = True) -> float:
        """Milliseconds per replay of `graph`: reps timings of `replays` back-to-back replays between CUDA
        events (after one untimed replay if warmup), median."""
        cp, s = self.cp, self.stream
        with s:
            if warmup:
                graph.launch(s)
            times = []
            for _ in range(reps):
                e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                e0.record(s)
                for _ in range(replays):
                    graph.launch(s)
                e1.record(s)
                e1.synchronize()
                times.append(cp.cuda.get_elapsed_time(e0, e1) / replays)
        return float(np.median(times))

    def time_launches(self, launches, reps: int = 3) -> float:
        """Milliseconds per replay of `launches` captured as one plain CUDA graph (median of reps)."""
        return self.replay_ms(self.capture_launches(launches), reps=reps)

    @staticmethod
    def gemv_candidates(K: int, nb: int, mode: int):
        kc = K // 8
        rows = [r for r in GEMV_ROWS if not (nb > 4 and r == 8) and not (mode == MODE_SWIGLU and r % 2)]
        threads = {128, 256, 512}
        for j in (1, 2, 3, 4):
            t = 32 * math.ceil(math.ceil(kc / j) / 32)
            if 64 <= t <= GEMV_MAX_THREADS:
                threads.add(t)
        return [(r, t) for r in rows for t in sorted(threads)]

    def _tune(self, nb):
        if nb in self.tuning:
            return
        cp = self.cp
        res = {}
        if self.autotune:
            rng = cp.random.default_rng(0)
            with self.stream:
                for buf in (self.h, self.att, self.mlp):       # realistic (non-zero) inputs
                    buf[...] = f32_to_bf16_bits(rng.standard_normal(buf.shape, dtype=cp.float32))
                saved = (self.x.copy(), self.logits_buf.copy())
            top = {}
            for name, (Ws, x, mode) in self._gemv_shapes().items():      # 1. each matrix kind on its own
                N, K = Ws[0].shape
                reps = max(1, 4 // len(Ws)) if len(Ws) < 4 else 1
                timed = []
                for R, T in self.gemv_candidates(K, nb, mode):
                    self.tuning.setdefault(nb, {})[name] = GemvShape(R, T, 0, 0.0, 0.0)
                    launches = [self._gemv(name, W, x, mode, nb) for W in Ws] * reps
                    ms = self.time_launches(launches) / len(launches)
                    timed.append((ms, R, T))
                timed.sort()
                top[name] = [GemvShape(R, T, 0, ms * 1e3, Ws[0].nbytes / (ms * 1e-3) / 1e9)
                             for ms, R, T in timed[:TUNE_FINALISTS]]
                self.tuning[nb][name] = top[name][0]
            self._tune_in_step(nb, top)                                    # 2. the finalists in the step
            with self.stream:
                self.x[...], self.logits_buf[...] = saved
            self.stream.synchronize()
            res = dict(self.tuning[nb])
        self.tuning[nb] = res
        self._plans.pop(nb, None)

    def _tune_in_step(self, nb, top):
        """Choose among each kind's finalists by timing the whole step as it runs (the graph as captured,
        PDL edges included, without the argmax so that no state advances), one kind at a time. A GEMV's best
        shape alone and within the step differ: its neighbours overlap its start and its end."""
        try:
            best = self.time_step(nb)
        except Exception:  # noqa: BLE001 - e.g. a driver without PDL: keep the per-kind choice
            return
        shapes = self._gemv_shapes()
        for name in sorted(top, key=lambda n: -sum(W.nbytes for W in shapes[n][0])):   # most bytes first
            chosen = self.tuning[nb][name]

            def better(cands):
                nonlocal best, chosen
                for cand in cands:
                    self.tuning[nb][name] = cand
                    ms = self.time_step(nb)
                    if ms < best:
                        best, chosen = ms, cand

            better(top[name][1:])                                        # the other finalists
            better([chosen._replace(persist=p) for p in TUNE_PERSIST])   # then persistent blocks for the winner
            self.tuning[nb][name] = chosen
        self.step_ms[nb] = best
        self._plans.pop(nb, None)

    def time_step(self, nb, replays: int = 10, reps: int = 3) -> float:
        """Milliseconds per decode step for batch nb with the current tuning, the argmax left out (nothing
        advances: each replay writes the same cache slot and scratch buffers). Median of reps."""
        self._plans.pop(nb, None)
        plan = self._plan(nb)
        assert plan[-1].tag == "argmax"
        return self.replay_ms(self.capture_launches(plan[:-1], pdl=self.pdl), replays=replays, reps=reps)

    # -- public API -------------------------------------------------------------------------------------
    def prefill(self, input_ids, attention_mask=None, *, logits: str | None = "last"):
        """Run the prompt through the model (CuPy float32 + cuBLAS), fill the KV cache, pick the first
        new token. logits: 'last' -> [B, V], 'all' -> [B, T, V] (numpy float32), None -> nothing."""
        cp = self.cp
        ids = np.asarray(cp.asnumpy(input_ids) if isinstance(input_ids, cp.ndarray) else input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise GenerationError(f"input_ids must have shape [batch, seq_len], got {ids.shape}")
        B, T = ids.shape
        if attention_mask is None:
            mask = np.ones((B, T), np.int32)
        else:
            mask = np.asarray(cp.asnumpy(attention_mask) if isinstance(attention_mask, cp.ndarray)
                              else attention_mask).astype(np.int32).reshape(B, T)
        if B > self.max_batch:
            raise GenerationError(f"batch {B} is larger than max_batch={self.max_batch} of this engine")
        if T >= self.max_len:
            raise GenerationError(f"prompt of {T} tokens leaves no room in the cache (max_len={self.max_len})")
        if ids.min() < 0 or ids.max() >= self.vocab:
            raise GenerationError(f"input ids must lie in [0, {self.vocab})")
        if not np.all(mask.sum(1) > 0) or not np.all((mask == 0) | (mask == 1)):
            raise GenerationError("attention_mask must be 0/1 with at least one 1 per row")
        H, KVH, D, G, rot = self.H, self.KVH, self.D, self.G, self.rot
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)            # generate(): positions from the mask
        with self.stream:
            ids_d = cp.asarray(ids.astype(np.int32))
            mask_d = cp.asarray(mask.astype(bool))
            x = bf16_bits_to_f32(self.embed[ids_d])                                   # [B, T, hidden]
            allowed = cp.tril(cp.ones((T, T), dtype=bool))[None] & mask_d[:, None, :]  # [B, T(q), T(k)]
            allowed |= cp.eye(T, dtype=bool)[None]                  # a pad query sees itself: finite, unused
            allowed = allowed[:, None]                                                 # [B, 1, T, T]
            ang = cp.asarray(pos.astype(np.float32))[..., None] * self.inv_freq[: max(rot // 2, 1)]
            cos, sin = cp.cos(ang)[:, None], cp.sin(ang)[:, None]                      # [B, 1, T, rot/2]
            scale = np.float32(D ** -0.5)
            for i, L in enumerate(self.layers):
                h = round_bf16(_layernorm(x, L.ln1_w, L.ln1_b, self.eps))             # [B, T, hidden]
                qkv = h @ bf16_bits_to_f32(L.wqkv).T                                   # [B, T, (H+2KVH) D]
                if L.bqkv is not None:
                    qkv += L.bqkv
                q = qkv[..., : H * D].reshape(B, T, H, D).transpose(0, 2, 1, 3)       # [B, H, T, D]
                k = qkv[..., H * D:(H + KVH) * D].reshape(B, T, KVH, D).transpose(0, 2, 1, 3)
                v = qkv[..., (H + KVH) * D:].reshape(B, T, KVH, D).transpose(0, 2, 1, 3)
                if self.qk_ln:
                    q = _layernorm(q, L.qn[None, :, None, :], None, self.eps)
                    k = _layernorm(k, L.kn[None, :, None, :], None, self.eps)
                q, k = _rope(q, cos, sin, rot), _rope(k, cos, sin, rot)
                k, v = round_bf16(k), round_bf16(v)                                     # the cache is bf16
                self.kc[i, :B, :, :T] = f32_to_bf16_bits(k)
                self.vc[i, :B, :, :T] = f32_to_bf16_bits(v)
                kk, vv = cp.repeat(k, G, axis=1), cp.repeat(v, G, axis=1)               # [B, H, T, D]
                s = (q * scale) @ kk.transpose(0, 1, 3, 2)                              # [B, H, T, T]
                s = cp.where(allowed, s, cp.float32(-np.inf))
                p = cp.exp(s - s.max(axis=-1, keepdims=True))
                p /= p.sum(axis=-1, keepdims=True)
                a = round_bf16((p @ vv).transpose(0, 2, 1, 3).reshape(B, T, H * D))    # [B, T, H D]
                x = x + a @ bf16_bits_to_f32(L.wo).T
                h2 = h if self.parallel else round_bf16(_layernorm(x, L.ln2_w, L.ln2_b, self.eps))
                gu = h2 @ bf16_bits_to_f32(L.wgu).T                                     # [B, T, 2I]
                g, u = gu[..., 0::2], gu[..., 1::2]
                x = x + round_bf16(g / (1 + cp.exp(-g)) * u) @ bf16_bits_to_f32(L.wd).T
            hf = round_bf16(_layernorm(x, self.norm_w, self.norm_b, self.eps))
            wl = bf16_bits_to_f32(self.lm)
            out = (hf if logits == "all" else hf[:, -1:]) @ wl.T                        # [B, T or 1, V]
            last = out[:, -1]
            del wl
            # device state for decode_step()
            self.kmask[:B, :T] = mask_d
            self.kmask[:B, T:] = 1
            self.pos[:B] = cp.asarray(mask.sum(axis=1).astype(np.int32))
            self.cache_len[0] = T
            first = cp.argmax(last, axis=1).astype(cp.int32)
            self.tok[:B] = first
            self.history[0, :B] = first
            self.step[0] = 1
            self.logits_buf[:B] = last
            self.att_counters[...] = 0
            self.am_counter[...] = 0
            result = None if logits is None else cp.asnumpy(out if logits == "all" else last, stream=self.stream)
        self.stream.synchronize()
        self._nb, self._host_len, self._host_step = B, T, 1
        return result

    def capture(self, nb: int):
        """Tune the GEMVs for batch nb (once) and capture the decode step as a CUDA graph. With pdl, the
        kernels after the first are captured as programmatic dependents of their predecessor; if the driver
        refuses, the engine falls back to ordinary launches (the reason is kept in pdl_error)."""
        key = (nb, bool(self.pdl))
        if key not in self._graphs:
            self._tune(nb)
            try:
                self._graphs[key] = self.capture_launches(self._plan(nb), pdl=self.pdl)
            except Exception as e:  # noqa: BLE001 - no libcuda symbol, odd argument, refused capture
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
        captured graphs dropped) only when the current ones are too small; the GEMV tuning is kept."""
        if not 1 <= batch <= MAX_BATCH:
            raise GenerationError(f"the decode engine runs batches of 1 to {MAX_BATCH} rows, not {batch}")
        if batch <= self.max_batch and max_len <= self.max_len:
            return
        self.max_batch, self.max_len = max(batch, self.max_batch), max(max_len, self.max_len)
        self.kc = self.vc = None                                     # free the old cache first
        with self.stream:
            self._allocate()
        self.stream.synchronize()
        self._plans.clear()
        self._graphs.clear()
        self._nb = None

    def kv_cache(self, batch: int, dtype):
        """A kv_cache.KVCache whose per-layer buffers [batch, KVH, max_len, D] are views of this engine's
        cache (as `dtype`, the model's bfloat16): the model's forward writes the prompt's keys and values
        where decode_step reads them."""
        from ..kv_cache import KVCache

        keys = [self.kc[i, :batch].view(dtype) for i in range(len(self.layers))]
        values = [self.vc[i, :batch].view(dtype) for i in range(len(self.layers))]
        return KVCache.from_buffers(keys, values, self.cp)

    def start(self, attention_mask):
        """Device state for decode_step after a prompt of T positions was written into the cache (by the
        model's forward through kv_cache()): the key mask, each row's next position, the cache length."""
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
            self.att_counters[...] = 0
            self.am_counter[...] = 0
        self._nb, self._host_len, self._host_step = B, T, 1

    def set_tokens(self, ids):
        """Replace the latest chosen tokens (the step's argmax, or the slot start() left) by ids [B] (device
        or host): what the next decode_step feeds, and what generated() reports."""
        cp, B = self.cp, self._nb
        with self.stream:
            t = cp.asarray(ids).astype(cp.int32)
            self.tok[:B] = t
            self.history[self._host_step - 1, :B] = t
