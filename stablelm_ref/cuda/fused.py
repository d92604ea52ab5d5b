"""CuPy implementations of the LayerNorm, rotary and SwiGLU seams: load fused.cu, check, launch.

    layer_norm(x, weight, bias, eps)             layernorm.layer_norm       one block per row
    add_layer_norm(x, delta, weight, bias, eps)  layernorm.add_layer_norm   the residual add, then LayerNorm
    apply_rotary(x, cos, sin, rotary_ndims)      rotary.apply_rotary        one thread per output element
    apply_rotary_qk(q, k, cos, sin, d)           rotary.apply_rotary_qk     q's and k's rotary in one launch
    gated_activation(gate, up, "silu")           mlp.gated_activation       one thread per element

Each is registered in kernels.py for CuPy arrays and takes its reference's arguments; it declines
(returns None, so the array-API reference runs) what it does not cover: float64 (the golden mode
stays on the reference), per-head LayerNorm weights, activations other than silu. Each computes in
float32 and rounds once to the input dtype; the reference rounds after each operation in 16-bit
dtypes, so in bfloat16 the kernels are the more accurate (tests/gpu/test_fused.py holds both to a
float64 run). Why: a forward on CuPy otherwise launches ~12 array operations per LayerNorm, ~8 per
rotary and ~9 per SiLU gate, each a launch (15-25 us of Python and driver on the H200 host,
tools/bench_attention.py --host-costs) and a trip through device memory; at prompt lengths of a few
hundred tokens those launches, not the GEMMs, set the time. For the same reason the residual add
before a LayerNorm and the rotary of q and k are one launch each where the reference makes two.

The source compiles with NVRTC (cupy.RawModule) on first use of each dtype combination and is cached.
"""

from __future__ import annotations

import pathlib

import numpy as np

from .. import kernels

_SOURCE = pathlib.Path(__file__).with_name("fused.cu")
_TAGS = {"float32": 0, "bfloat16": 1, "float16": 2}
_THREADS = 256
_kernels: dict = {}


def _tag(dtype):
    return _TAGS.get(np.dtype(dtype).name)


def _kernel(name):
    if name not in _kernels:
        import cupy

        module = cupy.RawModule(code=_SOURCE.read_text(), options=("-std=c++17",), name_expressions=[name])
        _kernels[name] = module.get_function(name)
    return _kernels[name]


def _grid(n):
    return (max(1, min((n + _THREADS - 1) // _THREADS, 65536)),)


def _layer_norm_operands(x, weight, bias):
    """(x, weight, bias) contiguous for the LayerNorm kernels (bias: the weight when there is none, unread) and
    their template arguments, or None where they leave the LayerNorm to the reference: float64 (or any dtype
    without a tag), per-head weights (2-D), a weight unlike x's last axis, an empty x, a bias unlike the weight.
    The checks come first, so a declined call never imports CuPy."""
    xt, wt = _tag(x.dtype), _tag(weight.dtype)
    if xt is None or wt is None or weight.ndim != 1 or x.shape[-1] != weight.shape[0] or x.size == 0:
        return None
    if bias is not None and (bias.dtype != weight.dtype or bias.shape != weight.shape):
        return None
    import cupy

    weight = cupy.ascontiguousarray(weight)
    bias = cupy.ascontiguousarray(bias) if bias is not None else weight
    return cupy.ascontiguousarray(x), weight, bias, f"{xt}, {wt}"


def layer_norm(x, weight, bias, eps):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis; None for what it leaves to the reference."""
    operands = _layer_norm_operands(x, weight, bias)
    if operands is None:
        return None
    import cupy

    x, weight, bias_arg, tags = operands
    n = x.shape[-1]
    y = cupy.empty_like(x)
    _kernel(f"layer_norm_kernel<{tags}>")((x.size // n,), (_THREADS,),
                                          (x, weight, bias_arg, y, np.int32(n), np.float32(eps),
                                           np.int32(bias is not None)))
    return y


def add_layer_norm(x, delta, weight, bias, eps):
    """(x + delta, layer_norm(x + delta)) in one pass; None for what it leaves to the reference."""
    if delta.dtype != x.dtype or delta.shape != x.shape:
        return None
    operands = _layer_norm_operands(x, weight, bias)
    if operands is None:
        return None
    import cupy

    x, weight, bias_arg, tags = operands
    n = x.shape[-1]
    delta = cupy.ascontiguousarray(delta)
    s, y = cupy.empty_like(x), cupy.empty_like(x)
    _kernel(f"add_layer_norm_kernel<{tags}>")((x.size // n,), (_THREADS,),
                                              (x, delta, weight, bias_arg, s, y, np.int32(n), np.float32(eps),
                                               np.int32(bias is not None)))
    return s, y


def _rotary_args(x, cos, sin, rotary_ndims):
    """(x with contiguous rows, its (batch, head, row) element strides), or None where the kernel does not apply."""
    import cupy

    xt, ct = _tag(x.dtype), _tag(cos.dtype)
    if xt is None or ct is None or x.ndim != 4 or cos.dtype != sin.dtype or x.size == 0:
        return None
    b, h, t, hd = x.shape
    d = rotary_ndims
    if d % 2 or d > hd or cos.shape != sin.shape or cos.shape[1:] != (t, d) or cos.shape[0] not in (1, b):
        return None
    if t * hd >= 2**31:                                               # the kernel's 32-bit element index
        return None
    if x.strides[3] != x.itemsize:
        x = cupy.ascontiguousarray(x)
    return x, tuple(np.int64(st // x.itemsize) for st in x.strides[:3])


def apply_rotary_qk(q, k, cos, sin, rotary_ndims):
    """(rotary(q), rotary(k)) in one launch; q [B, H, T, hd], k [B, KVH, T, hd]; None for the reference."""
    import cupy

    if q.dtype != k.dtype or q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        return None
    qa, ka = _rotary_args(q, cos, sin, rotary_ndims), _rotary_args(k, cos, sin, rotary_ndims)
    if qa is None or ka is None:
        return None
    (q, q_strides), (k, k_strides) = qa, ka
    b, h, t, hd = q.shape
    kvh = k.shape[1]
    if b * (h + kvh) > 65535:                                         # the launch's grid.y
        return None
    cos, sin = cupy.ascontiguousarray(cos), cupy.ascontiguousarray(sin)
    yq, yk = cupy.empty((b, h, t, hd), dtype=q.dtype), cupy.empty((b, kvh, t, hd), dtype=k.dtype)
    cos_sb = 0 if cos.shape[0] == 1 else t * rotary_ndims
    _kernel(f"rotary_qk_kernel<{_tag(q.dtype)}, {_tag(cos.dtype)}>")(
        ((t * hd + _THREADS - 1) // _THREADS, b * (h + kvh)), (_THREADS,),
        (q, k, cos, sin, yq, yk, np.int32(b), np.int32(h), np.int32(kvh), np.int32(t), np.int32(hd),
         np.int32(rotary_ndims), *q_strides, *k_strides, np.int64(cos_sb)))
    return yq, yk


def apply_rotary(x, cos, sin, rotary_ndims):
    """Rotary on the first rotary_ndims dims of each head of x [B, H, T, hd]; cos, sin [B or 1, T, d]."""
    import cupy

    args = _rotary_args(x, cos, sin, rotary_ndims)
    if args is None or x.shape[0] * x.shape[1] > 65535:               # the launch's grid.y
        return None
    x, strides = args
    b, h, t, hd = x.shape
    cos, sin = cupy.ascontiguousarray(cos), cupy.ascontiguousarray(sin)
    y = cupy.empty((b, h, t, hd), dtype=x.dtype)
    cos_sb = 0 if cos.shape[0] == 1 else t * rotary_ndims
    _kernel(f"rotary_kernel<{_tag(x.dtype)}, {_tag(cos.dtype)}>")(
        ((t * hd + _THREADS - 1) // _THREADS, b * h), (_THREADS,),
        (x, cos, sin, y, np.int32(h), np.int32(t), np.int32(hd), np.int32(rotary_ndims), *strides, np.int64(cos_sb)))
    return y


def gated_activation(gate, up, hidden_act):
    """silu(gate) * up in one pass; None (the reference) for other activations."""
    import cupy

    xt = _tag(gate.dtype)
    if hidden_act not in ("silu", "swish") or xt is None or gate.shape != up.shape or gate.dtype != up.dtype:
        return None
    gate, up = cupy.ascontiguousarray(gate), cupy.ascontiguousarray(up)
    y = cupy.empty_like(gate)
    per_chunk = 16 // gate.itemsize
    aligned = gate.data.ptr % 16 == 0 and up.data.ptr % 16 == 0 and y.data.ptr % 16 == 0
    nvec = y.size // per_chunk if aligned else 0
    _kernel(f"silu_gate_kernel<{xt}>")(_grid(max(nvec, 1) if aligned else y.size), (_THREADS,),
                                       (gate, up, y, np.int64(y.size), np.int64(nvec)))
    return y


kernels.register("layer_norm", "cupy", layer_norm)
kernels.register("rotary", "cupy", apply_rotary)
kernels.register("rotary_qk", "cupy", apply_rotary_qk)
kernels.register("add_layer_norm", "cupy", add_layer_norm)
kernels.register("gated_activation", "cupy", gated_activation)
