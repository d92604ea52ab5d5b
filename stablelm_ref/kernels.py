"""The seam where fused kernels enter the math, chosen by the array library of the input.

A concept file states its equation once, in array-API code. Where a faster implementation of one of
its functions exists for an array library (CUDA kernels for CuPy arrays), the function is marked as a
seam; a call then runs the implementation registered for the library of its first argument, and the
reference (the function's own body) when none is registered or the implementation declines by
returning None (a dtype or shape it does not cover):

    @kernels.seam("layer_norm")             # layernorm.py: the reference is the function's body
    def layer_norm(x, weight, bias, eps): ...

    register("layer_norm", "cupy", fn)      # stablelm_ref/cuda/fused.py, on import
    with reference_only(): ...              # every seam runs its reference (run_with_trace does this)
    with reference_only("attention"): ...   # only the named ones (benchmarks, tests)

An implementation takes the reference's arguments and returns what the reference returns; the GPU
tests hold each to its reference. So attention.py and the other concept files have no device branch:
one function on NumPy and on CuPy. The reference never imports a kernel module; the kernel modules
import this one (stablelm_ref/__init__.py imports them, as it imports the fast forms). This module
imports nothing from the package.

Seams now: attention (attention.causal_attention), layer_norm and add_layer_norm (layernorm.py),
rotary and rotary_qk (rotary.apply_rotary, apply_rotary_qk), gated_activation (mlp.gated_activation),
linear (_xp.linear: every projection and head); CuPy implementations in stablelm_ref/cuda/
(flash_prefill.py, fused.py, gemm.py). A seam whose reference calls other seams (add_layer_norm calls
layer_norm, rotary_qk calls rotary) falls back to their kernels when its own declines.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from contextvars import ContextVar

_IMPLEMENTATIONS: dict = {}                       # (operation, library) -> function
_OFF = ContextVar("stablelm_ref_reference_only", default=frozenset())
_ALL = "*"


def library(x) -> str:
    """The array library an array belongs to: "numpy", "cupy", "array_api_strict", ..."""
    return type(x).__module__.split(".")[0]


def register(operation: str, library_name: str, fn) -> None:
    """Make `fn` the implementation of `operation` for arrays of `library_name`."""
    _IMPLEMENTATIONS[(operation, library_name)] = fn


def implementation(operation: str, x):
    """The function registered for `operation` and x's library, or None (then: the reference)."""
    off = _OFF.get()
    if off and (_ALL in off or operation in off):
        return None
    return _IMPLEMENTATIONS.get((operation, library(x)))


def seam(operation: str):
    """Decorate a reference function: calls go to the implementation registered for its first argument's
    library when there is one and it does not decline (return None), else to the reference."""
    def wrap(reference):
        @functools.wraps(reference)
        def dispatch(x, *args, **kwargs):
            fused = implementation(operation, x)
            if fused is not None:
                result = fused(x, *args, **kwargs)
                if result is not None:
                    return result
            return reference(x, *args, **kwargs)

        dispatch.reference = reference
        return dispatch

    return wrap


@contextmanager
def reference_only(*operations: str):
    """Within this block the named seams (all, when none is named) run their array-API reference."""
    token = _OFF.set(_OFF.get() | frozenset(operations or (_ALL,)))
    try:
        yield
    finally:
        _OFF.reset(token)
