"""Small helpers shared by the concept files (no model logic here): array-API helpers, weight
sub-dicts, and the trace callback's default."""

from array_api_compat import array_namespace as _compat_array_namespace

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


def linear(x, weight, bias=None):
    """y = x W^T + b, with W in the checkpoint's [out_features, in_features] layout.

    The leading dims are flattened so the product is one 2-D matmul (one BLAS/cuBLAS call; CuPy has
    no batched bfloat16 matmul).
    """
    xp = array_namespace(x)
    lead = x.shape[:-1]
    y = xp.reshape(x, (-1, x.shape[-1])) @ xp.matrix_transpose(weight)  # [N, in] @ [in, out] -> [N, out]
    y = xp.reshape(y, (*lead, weight.shape[0]))                          # [..., out]
    return y if bias is None else y + bias


def dtype_min(xp, dtype):
    """The most negative finite value of a float dtype (transformers' additive-mask value)."""
    return xp.finfo(dtype).min


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
