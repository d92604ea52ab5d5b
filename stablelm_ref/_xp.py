"""Small array-API helpers shared by the concept files, each written once here (no model logic).

    softmax(x)_i     = exp(x_i - max x) / sum_j exp(x_j - max x)       in float32, or float64 for float64
    log_softmax(x)_i = (x_i - max x) - log sum_j exp(x_j - max x)      (both over the last axis)
    linear(x, W, b)  = x W^T + b                                       W: [out_features, in_features]
                                                                       (a kernels.py seam: cuBLAS on CuPy)
    to_host(a)       = a NumPy array from a CuPy one; anything else unchanged
    host_array(a)    = np.asarray(to_host(a)), or None for what is not array-like (refuse_masked first)

and the weight sub-dicts (subtree) and the trace callback's default (no_trace, scoped).
"""

import numpy as np
from array_api_compat import array_namespace as _compat_array_namespace

from . import kernels

_NAMESPACE_OF_TYPE: dict = {}


def array_namespace(*arrays):
    """array_api_compat.array_namespace, remembered per array type for the one-array case: the concept
    files ask it on every call, and it inspects its argument each time (several microseconds, hundreds
    of times per forward)."""
    if len(arrays) != 1:
        return _compat_array_namespace(*arrays)
    kind = type(arrays[0])
    xp = _NAMESPACE_OF_TYPE.get(kind)
    if xp is None:
        xp = _NAMESPACE_OF_TYPE[kind] = _compat_array_namespace(arrays[0])
    return xp


def wide_dtype(xp, dtype):
    """The dtype for softmax and LayerNorm statistics: float64 stays float64, anything narrower -> float32.

    transformers computes both in float32 for float32/bfloat16/float16 models; float64 mode is the
    golden reference and keeps float64 throughout.
    """
    return xp.float64 if dtype == xp.float64 else xp.float32


@kernels.seam("linear")
def linear(x, weight, bias=None):
    """y = x W^T + b, with W in the checkpoint's [out_features, in_features] layout.

    The leading dims are flattened so the product is one 2-D matmul (one BLAS/cuBLAS call; CuPy has
    no batched bfloat16 matmul). A seam (kernels.py): on CuPy bfloat16/float16 arrays it runs
    cuda/gemm.py, the same product as one direct cublasGemmEx call without CuPy's matmul dispatch.
    """
    xp = array_namespace(x)
    lead = x.shape[:-1]
    y = xp.reshape(x, (-1, x.shape[-1])) @ xp.matrix_transpose(weight)  # [N, in] @ [in, out] -> [N, out]
    y = xp.reshape(y, (*lead, weight.shape[0]))                          # [..., out]
    return y if bias is None else y + bias


def dtype_min(xp, dtype):
    """The most negative finite value of a float dtype (transformers' additive-mask value)."""
    return xp.finfo(dtype).min


def softmax(x, dtype=None):
    """Softmax over the last axis, computed in wide_dtype (float32, or float64 in float64 mode) and returned
    as `dtype` (default: x's). Subtracting the max first keeps exp from overflowing; a -inf entry gives 0."""
    xp = array_namespace(x)
    dtype = x.dtype if dtype is None else dtype
    z = xp.astype(x, wide_dtype(xp, dtype))
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
    return xp.astype(e / xp.sum(e, axis=-1, keepdims=True), dtype)


def log_softmax(x):
    """log(softmax(x)) over the last axis without forming softmax(x), in wide_dtype(x.dtype)."""
    xp = array_namespace(x)
    z = xp.astype(x, wide_dtype(xp, x.dtype))
    z = z - xp.max(z, axis=-1, keepdims=True)
    return z - xp.log(xp.sum(xp.exp(z), axis=-1, keepdims=True))


def host_array(a):
    """np.asarray(to_host(a)), or None where `a` is not array-like (ragged lists, objects, integers too
    large for any dtype): each caller raises its own error, naming the argument."""
    try:
        return np.asarray(to_host(a))
    except (ValueError, TypeError, OverflowError):
        return None


def refuse_masked(a, name, instead, error):
    """`error` when `a` is a NumPy masked array, or a list or tuple holding one at any depth (rows of masked
    arrays, np.ma.masked among ints): np.asarray (host_array) keeps their data and drops their masks, so the
    masked entries would be used as values, silently (torch.as_tensor drops them too). `instead` says what to
    pass: transformers' convention, where the mask of the ids is the attention_mask."""
    if isinstance(a, np.ma.MaskedArray) or (isinstance(a, (list, tuple)) and _holds_masked(a)):
        kind = "is" if isinstance(a, np.ma.MaskedArray) else "holds"
        raise error(f"{name} {kind} a NumPy masked array, whose mask would be ignored; pass {instead}")


def _holds_masked(items):
    """Whether a list or tuple holds a masked array, looked for through nested lists and tuples (no recursion:
    a deeply nested list is walked, not a RecursionError)."""
    stack = [items]
    while stack:
        for item in stack.pop():
            if isinstance(item, (list, tuple)):
                stack.append(item)
            elif isinstance(item, np.ma.MaskedArray):
                return True
    return False


def to_host(a):
    """A CuPy array -> NumPy (a copy off the GPU); anything else unchanged."""
    return a.get() if hasattr(a, "get") and hasattr(a, "__cuda_array_interface__") else a


def subtree(params, prefix):
    """{name: tensor} of the entries under `prefix`, with the prefix removed (picoGPT-style weights:
    subtree(params, "model.layers.3.")["self_attn.q_proj.weight"] is model.layers.3.self_attn.q_proj.weight)."""
    n = len(prefix)
    return {name[n:]: value for name, value in params.items() if name.startswith(prefix)}


def no_trace(name, array):
    """The default trace callback: records nothing (see trace.py for one that records)."""


def scoped(trace, prefix):
    """A trace callback that prefixes every name, so a layer can say "q_proj" for
    model.layers.3.self_attn.q_proj; no_trace stays no_trace (tracing off costs one call per name)."""
    if trace is no_trace:
        return no_trace
    return lambda name, array: trace(prefix + name, array)
