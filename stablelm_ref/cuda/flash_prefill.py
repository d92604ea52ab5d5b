"""Fused causal prefill attention on the GPU: load flash_prefill.cu, check arguments, launch.

    out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h // rep, j] + mask[b, i, j]) v[b, h // rep, j]

    q [B, H, T, D], k and v [B, KVH, S, D], S >= T, rep = H // KVH (transformers' repeat_kv order).
    The T queries are the LAST T of the S positions (a KV cache holds the first S - T), so query i
    sits at position S - T + i and, with causal=True, sees keys j <= S - T + i.
    key_mask [B, S] (bool or int; 0 = padding) hides keys. A query row that sees no key at all
    (a left-padding query) gets an output row of zeros; reference.attention_reference agrees.

Operands are read and written through their strides: q, k, v and out may be views (q straight out of
the [B, T, H*D] projection, k and v out of a longer KV cache, out into [B, T, H*D]) as long as each
row's D elements are contiguous and 16-byte aligned; anything else is copied first.

`attention_for_model` is what the model's forward runs on CuPy arrays: attention.causal_attention
asks kernels.py, where this module registers it (stablelm_ref/__init__.py imports this module; CuPy
itself is imported only when a kernel runs).

The same function as stablelm_ref.cuda.reference.attention_reference, which is the spec; the test
(tests/gpu/test_flash_prefill.py) compares the two, tools/bench_attention.py times this against
torch's SDPA. bfloat16 and float16 go through the tensor-core kernel (float32 accumulation and
softmax, output in the input dtype); float32 goes through a simple, slower kernel.

The CUDA source is compiled with NVRTC through cupy.RawModule on first use of each
specialisation (dtype, head dim, variant) and cached for the process (and by CuPy on disk).
CuPy compiles for the device it runs on (sm_90 machine code on an H100).

On a compute capability 9.0 GPU (H100, H200) bfloat16/float16 run flash_hopper.cu instead (the same
function on wgmma, sm_90a; flash_hopper.py builds it), at the head dims of flash_hopper.HOPPER_DEFAULT, where it
measured faster; this kernel stays the readable one and the fallback (no nvcc/NVRTC for sm_90a,
another GPU). `flash_attention_prefill_variant` runs either kernel's variants by name.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

from .. import kernels
from . import flash_hopper
from .._xp import array_namespace

_SOURCE = pathlib.Path(__file__).with_name("flash_prefill.cu")
HEAD_DIMS = (64, 80, 128, 160)

# Tensor-core kernel variants: (warps per block, 16-row m-tiles per warp, Q in registers,
# min blocks per SM for the register allocator, keys per tile). Rows per block = 16 * warps * m-tiles.
# tools/bench_attention.py times them all; docs/cuda_prefill_notes.md has the numbers.
VARIANTS = {
    "v1": (8, 1, True, 1, 64),   # 128 rows, 8 warps x 16 rows, Q fragments in registers
    "v2": (4, 1, True, 2, 64),   # 64 rows, 4 warps x 16 rows, two blocks per SM
    "v3": (4, 2, False, 1, 64),  # 128 rows, 4 warps x 32 rows: each K/V fragment feeds 2 mma
    "v4": (4, 1, False, 3, 64),  # 64 rows, Q re-read from smem, three blocks per SM
    "v5": (8, 1, False, 1, 64),  # 128 rows, 8 warps x 16 rows, Q re-read from smem
    "v6": (4, 2, False, 1, 32),  # as v3 with 32-key tiles: half the score registers, fits D = 128
    "v7": (4, 1, False, 3, 32),  # 64 rows, 32-key tiles, Q from smem: 168 registers, 3 blocks per SM
}
# Candidates per head dim (variants whose register needs fit without large spills), and the
# default: the fastest measured on the H100 at B=4, H=32, L=1024 and 4096.
CANDIDATES = {
    64: ("v1", "v2", "v3", "v4", "v6"),
    80: ("v1", "v2", "v3", "v4", "v6"),
    128: ("v1", "v2", "v4", "v5", "v6", "v7"),
    160: ("v1", "v2", "v5", "v6", "v7"),
}
DEFAULT_VARIANT = {64: "v3", 80: "v3", 128: "v6", 160: "v6"}

_kernels: dict = {}  # (kind, D, variant) -> (RawKernel, threads, rows per block, smem bytes)


def _dtype_kind(dtype) -> str:
    name = np.dtype(dtype).name
    kinds = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    if name not in kinds:
        raise TypeError(
            f"flash_attention_prefill supports bfloat16, float16 and float32 inputs, got {name}"
        )
    return kinds[name]


def _smem_bytes(D: int, rows: int, bc: int) -> int:
    return (rows + 2 * bc) * (D + 8) * 2 + bc  # sQ, sK, sV (padded rows) + key-mask bytes


def _get_kernel(kind: str, D: int, variant: str):
    key = (kind, D, variant)
    if key not in _kernels:
        import cupy

        if kind == "fp32":
            name = f"attention_prefill_f32_kernel<{D}>"
            threads, rows, smem = 128, 4, 0
        else:
            nw, mt, qreg, minb, bc = VARIANTS[variant]
            bf16 = "true" if kind == "bf16" else "false"
            qreg = "true" if qreg else "false"
            name = f"flash_prefill_kernel<{D}, {bf16}, {nw}, {mt}, {qreg}, {minb}, {bc}>"
            threads, rows = 32 * nw, 16 * mt * nw
            smem = _smem_bytes(D, rows, bc)
        module = cupy.RawModule(
            code=_SOURCE.read_text(), options=("-std=c++17",), name_expressions=[name]
        )
        kernel = module.get_function(name)
        if smem > 48 * 1024:
            kernel.max_dynamic_shared_size_bytes = smem
        _kernels[key] = (kernel, threads, rows, smem)
    return _kernels[key]


def _operand(x, name):
    """(x or a contiguous copy, its (batch, head, row) strides in elements): rows of D contiguous
    elements, 16-byte aligned, as the kernels' 16-byte loads need."""
    import cupy

    if not isinstance(x, cupy.ndarray):
        raise TypeError(f"{name} must be a cupy.ndarray, got {type(x).__name__}")
    if x.ndim == 4 and not _strided_ok(x):
        x = cupy.ascontiguousarray(x)
        if x.data.ptr % 16:
            x = x.copy()
    return x, tuple(st // x.itemsize for st in x.strides[:3]) if x.ndim == 4 else None


def _strided_ok(x) -> bool:
    item = x.itemsize
    return (x.strides[3] == item and x.data.ptr % 16 == 0
            and all(st % 16 == 0 or n == 1 for st, n in zip(x.strides[:3], x.shape[:3])))


def flash_attention_prefill(q, k, v, key_mask=None, *, causal=True, scale=None, out=None):
    """Attention of q [B, H, T, D] over k, v [B, KVH, S, D] (S >= T, the queries being the last T
    positions), optional key_mask [B, S]; returns a [B, H, T, D] array of q's dtype.

    Fully masked query rows are zeros. `out`, if given, must be a cupy array of that shape and dtype
    with contiguous, 16-byte aligned rows (any batch/head/row strides); it is written and returned.
    """
    return flash_attention_prefill_variant(
        None, q, k, v, key_mask, causal=causal, scale=scale, out=out
    )


def flash_attention_prefill_variant(variant, q, k, v, key_mask=None, *, causal=True, scale=None, out=None):
    """flash_attention_prefill with an explicit kernel variant (a key of VARIANTS, of
    flash_hopper.VARIANTS, or None for default_variant(D)); the benchmark and the tests use it to
    compare variants."""
    import cupy

    (q, lq), (k, lk), (v, lv) = _operand(q, "q"), _operand(k, "k"), _operand(v, "v")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be 4-D [B, H, T, D] / [B, KVH, S, D]; got {q.shape}, {k.shape}, {v.shape}"
        )
    B, H, T, D = q.shape
    Bk, KVH, S, Dk = k.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if lk != lv:  # one layout for both in the kernel
        k, v = cupy.ascontiguousarray(k), cupy.ascontiguousarray(v)
        lk = tuple(st // k.itemsize for st in k.strides[:3])
    if Bk != B or Dk != D:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head dim")
    if KVH == 0 or H % KVH:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({KVH})")
    if S < T:
        raise ValueError(f"need at least as many keys as queries (S={S} < T={T})")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    kind = _dtype_kind(q.dtype)
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported; supported: {HEAD_DIMS}")
    if scale is None:
        scale = D**-0.5
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")

    if out is None:
        out = cupy.empty((B, H, T, D), dtype=q.dtype)
    elif (
        not isinstance(out, cupy.ndarray)
        or out.shape != (B, H, T, D)
        or out.dtype != q.dtype
        or not _strided_ok(out)
    ):
        raise ValueError(f"out must be a cupy array of shape {(B, H, T, D)} and dtype {q.dtype} whose rows of "
                         "D elements are contiguous and 16-byte aligned (e.g. C-contiguous, or a [B, T, H, D] "
                         "array seen through transpose(0, 2, 1, 3))")
    lo = tuple(st // out.itemsize for st in out.strides[:3])

    if key_mask is not None:
        key_mask = cupy.asarray(key_mask)
        if key_mask.shape != (B, S):
            raise ValueError(f"key_mask must have shape (B, S) = {(B, S)}, got {key_mask.shape}")
        mask_arg = (key_mask != 0).astype(cupy.uint8)  # 0/1 bytes, contiguous   # [B, S]
    else:
        mask_arg = q  # never read (has_mask = 0)
    if B * H * T == 0:
        return out

    if kind == "fp32":
        variant = "f32"
    elif variant is None:
        variant = default_variant(D)
    elif variant not in VARIANTS and variant not in flash_hopper.VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANTS) + sorted(flash_hopper.VARIANTS)}")
    args = (
        q, k, v, mask_arg, out,
        np.int32(H), np.int32(KVH), np.int32(T), np.int32(S),
        np.float32(scale * math.log2(math.e)),
        np.int32(bool(causal)), np.int32(key_mask is not None),
        *(np.int64(st) for st in (*lq, *lk, *lo)),
    )
    if variant in flash_hopper.VARIANTS:  # the wgmma kernel (sm_90a), same arguments
        flash_hopper.launch(kind, D, variant, T, H, B, args)
        return out
    kernel, threads, rows, smem = _get_kernel(kind, D, variant)
    grid = ((T + rows - 1) // rows, H, B)
    kernel(grid, (threads,), args, shared_mem=smem)
    return out


def default_variant(D: int) -> str:
    """The kernel flash_attention_prefill runs for bf16/fp16 at head dim D: the wgmma kernel's variant
    where flash_hopper.HOPPER_DEFAULT names one and this GPU runs it (flash_hopper.usable()), else the mma.sync
    one."""
    if D in flash_hopper.HOPPER_DEFAULT and flash_hopper.usable():
        return flash_hopper.HOPPER_DEFAULT[D]
    return DEFAULT_VARIANT[D]


def attention_for_model(q, k, v, key_mask=None, kernel=flash_attention_prefill):
    """attention.causal_attention on CuPy arrays: the same function as its reference, or None to decline.

    q [B, H, T, D] (a view of the [B, T, H*D] projection is read in place), k, v [B, KVH, S, D] (views
    of a KV cache too), key_mask bool [B, S] or None -> (out [B, H, T, D], None): out is a view of a
    [B, T, H, D] array so that merging the heads for o_proj is a free reshape; the kernel forms no
    attention weights (None). Declines (None) what the kernels do not
    cover: float64, head dims other than HEAD_DIMS and mixed dtypes, which then run the reference.

    A query that sees no key at all (a left-padding position) gets zeros from the kernel, as in the
    reference (transformers' sdpa). `kernel` is replaceable so that the tests can run this glue on the
    CPU with NumPy and a float64 stand-in for the kernel.
    """
    if np.dtype(q.dtype).name not in ("bfloat16", "float16", "float32") or q.shape[-1] not in HEAD_DIMS:
        return None
    if not (q.dtype == k.dtype == v.dtype):  # the reference promotes (e.g. float32 q over a bfloat16 cache)
        return None
    xp = array_namespace(q)
    B, H, T, D = q.shape
    out = xp.empty((B, T, H, D), dtype=q.dtype)                       # [B, T, H, D]
    view = xp.permute_dims(out, (0, 2, 1, 3))                          # [B, H, T, D] view of out
    kernel(q, k, v, key_mask, causal=True, out=view)           # rows that see no key: zeros, as the reference
    return view, None


kernels.register("attention", "cupy", attention_for_model)
