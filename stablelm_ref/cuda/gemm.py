"""The CuPy implementation of the linear seam: y = x W^T (+ b) as one cublasGemmEx call.

    linear(x [..., in], W [out, in], b [out] | None) -> y [..., out]      _xp.linear is the reference

Why: the reference's `x @ W.T` on CuPy goes through array_api_compat's wrappers and CuPy's matmul
dispatch (shape and stride analysis, dtype resolution, a tensordot path), about 45 us of host time per
call (tools/bench_attention.py --host-costs); a 3b-4e1t forward makes 225 GEMMs, so at a 512-token
prompt the host, not the GPU, sets the time (docs/cuda_prefill_notes.md). Here the host work is what
cuBLAS needs and no more: one output allocation and one library call.

The call is cublasGemmEx through CuPy's own Cython binding (the handle of the current device, its
stream set to the current stream by the binding). Tried and measured (H200, tools/bench_attention.py
--host-costs): a cuBLASLt plan per shape (descriptors and the heuristic's algorithm made once, then
one cublasLtMatmul through ctypes) cost the same host time per call as cublasGemmEx (23.2 against
22.8 us: what the cached heuristic saves, ctypes spends) and no wall time at 512 or 2048 tokens, so it
was not kept (docs/cuda_prefill_notes.md).

The row-major product as cuBLAS (column-major) sees it: a row-major [r, c] matrix is a column-major
[c, r] one with leading dimension c. So Y [N, out] (row-major) is Y^T [out, N] column-major, and
Y^T = W X^T: op(A) = W with A the weight buffer read transposed (column-major [in, out], lda = in),
op(B) = X^T with B the input buffer as is (column-major [in, N], ldb = in), ldc = out.

Covers bfloat16 and float16 (float32 accumulation, CUBLAS_COMPUTE_32F; one rounding of each output,
as CuPy's matmul for these dtypes) with x and W of one dtype, W C-contiguous, sizes under 2^31.
Declines (None: the reference runs) everything else: float32 and float64 (the float32 GPU model is
the one tested against the CPU to 1e-5, and keeps CuPy's exact float32 matmul), mixed dtypes,
strided weights, empty inputs. A non-contiguous x is copied first, as the
reference's reshape would. A bias (StableLM 2's qkv biases) is added by CuPy afterwards, as in the
reference.
"""

from __future__ import annotations

import numpy as np

from .. import kernels

_CUDA_R_16F, _CUDA_R_16BF = 2, 14                 # cudaDataType_t
_CUBLAS_COMPUTE_32F = 68                          # cublasComputeType_t: float32 accumulation, no TF32
_CUBLAS_GEMM_DEFAULT = -1                         # cublasGemmAlgo_t: cuBLAS's heuristic
_OP_N, _OP_T = 0, 1                               # cublasOperation_t
_TYPES = {"bfloat16": _CUDA_R_16BF, "float16": _CUDA_R_16F}
_INT_MAX = 2**31 - 1
_ONE = np.ones(1, dtype=np.float32)               # alpha, beta: host scalars (the default pointer mode),
_ZERO = np.zeros(1, dtype=np.float32)             # float32 for CUBLAS_COMPUTE_32F; kept alive by the module
_ONE_PTR, _ZERO_PTR = _ONE.ctypes.data, _ZERO.ctypes.data
_cupy = None
_gemm_ex = None


def _load():
    global _cupy, _gemm_ex
    import cupy
    try:
        from cupy_backends.cuda.libs import cublas   # CuPy's Cython binding (the one its matmul calls)
    except ImportError:                               # older layouts
        from cupy.cuda import cublas

    _cupy, _gemm_ex = cupy, cublas.gemmEx


def linear(x, weight, bias=None):
    """y = x W^T + b through one cublasGemmEx call; None for what it leaves to the reference."""
    if _gemm_ex is None:
        _load()
    dtype = _TYPES.get(x.dtype.name)
    if dtype is None or weight.dtype != x.dtype or weight.ndim != 2 or x.ndim < 1:
        return None
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f or x.size == 0 or weight.size == 0 or not weight.flags.c_contiguous:
        return None
    if not x.flags.c_contiguous:
        x = _cupy.ascontiguousarray(x)
    n = x.size // in_f
    if max(n, in_f, out_f) > _INT_MAX or n * out_f > _INT_MAX:          # cuBLAS's 32-bit sizes
        return None
    y = _cupy.empty((*x.shape[:-1], out_f), dtype=x.dtype)
    _gemm_ex(_cupy.cuda.device.get_cublas_handle(), _OP_T, _OP_N, out_f, n, in_f,
             _ONE_PTR, weight.data.ptr, dtype, in_f,       # A = W, read as W^T: column-major [in, out]
             x.data.ptr, dtype, in_f,                      # B = x^T, column-major [in, N]
             _ZERO_PTR, y.data.ptr, dtype, out_f,          # C = y^T, column-major [out, N]
             _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT)
    return y if bias is None else y + bias


kernels.register("linear", "cupy", linear)
