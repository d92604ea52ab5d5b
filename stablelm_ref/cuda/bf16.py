"""bfloat16 on CuPy as raw 16-bit patterns (the kernels read and write uint16 bits).

    bits = f32_to_bf16_bits(a)      # float32 -> uint16, round to nearest even (NaN stays NaN)
    a = bf16_bits_to_f32(bits)      # exact
    to_bf16_bits(w)                 # any host or CuPy array (CuPy bfloat16 / int16 bits: a view, no copy)
"""

from __future__ import annotations

import numpy as np

from . import xp


def f32_to_bf16_bits(a):
    """float32 array -> uint16 array of bfloat16 bits, round to nearest even (NaN stays NaN)."""
    cp = xp.cupy()
    u = cp.ascontiguousarray(a, dtype=cp.float32).view(cp.uint32)
    r = ((u + cp.uint32(0x7FFF) + ((u >> 16) & cp.uint32(1))) >> 16).astype(cp.uint16)
    nan = (u & cp.uint32(0x7FFFFFFF)) > cp.uint32(0x7F800000)
    return cp.where(nan, ((u >> 16) | cp.uint32(0x40)).astype(cp.uint16), r)


def bf16_bits_to_f32(a):
    cp = xp.cupy()
    return (a.astype(cp.uint32) << 16).view(cp.float32)


def round_bf16(a):
    return bf16_bits_to_f32(f32_to_bf16_bits(a))


def _is_bf16_dtype(dt) -> bool:
    return getattr(dt, "name", "") == "bfloat16"


def to_bf16_bits(a):
    """Host (float32/float16/float64/bfloat16) or CuPy array -> C-contiguous CuPy uint16 bf16 bits."""
    cp = xp.cupy()
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
    cp = xp.cupy()
    if isinstance(a, cp.ndarray):
        if a.dtype.itemsize == 2 and (a.dtype.kind in "iuV" or _is_bf16_dtype(a.dtype)):
            return bf16_bits_to_f32(cp.ascontiguousarray(a.view(cp.uint16)))
        return cp.ascontiguousarray(a, dtype=cp.float32)
    return cp.asarray(np.asarray(a).astype(np.float32))
