"""The fused CUDA kernels behind the LayerNorm, rotary and SwiGLU seams equal their array-API references.

Each kernel computes in float32 and rounds its output once to the input dtype, so against the float64
reference (run by NumPy on the same rounded inputs) the normwise relative error is at most u/2 from
that rounding plus the float32 arithmetic (sums of <= 4096 terms: well under 1e-6 normwise):
bfloat16 u = 2^-8 -> bound 4e-3 (u), float16 u = 2^-11 -> 5e-4 (u), float32 -> 1e-5 (float32 sums
in another order, ~1e-7 expected). A wrong index or a missed element gives errors of order 1.
The 16-bit reference on CuPy rounds after every operation; the kernel must be no less accurate (within 25%:
LayerNorm's reference also rounds only once, so there the two differ only by rounding luck).
"""

import ml_dtypes
import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="CuPy is not installed")

from stablelm_ref import kernels  # noqa: E402
from stablelm_ref.layernorm import add_layer_norm, layer_norm  # noqa: E402
from stablelm_ref.mlp import gated_activation  # noqa: E402
from stablelm_ref.rotary import apply_rotary, apply_rotary_qk  # noqa: E402

DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}
TOL = {"bf16": 4e-3, "fp16": 5e-4, "fp32": 1e-5}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def host(a):
    return cupy.asnumpy(a).astype(np.float64)


def check(fn, args_host, dtype, called):
    """fn on CuPy (kernel) vs fn on float64 NumPy (reference) vs fn on CuPy with the reference forced."""
    dev = [cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in args_host]
    got = fn(*dev)
    assert called(), "the fused kernel did not run"
    ref = fn(*[a.astype(np.float64) if isinstance(a, np.ndarray) else a for a in args_host])
    with kernels.reference_only():
        ref16 = fn(*dev)
    assert got.dtype == DTYPES[dtype] and got.shape == ref.shape
    err, err_ref = rel(host(got), ref), rel(host(ref16), ref)
    assert err <= TOL[dtype], err
    if dtype != "fp32" and ref16.dtype == got.dtype:         # no less accurate than the op-by-op reference
        assert err <= err_ref * 1.25, (err, err_ref)          # (CuPy promotes some 16-bit chains to float32)
    return err


def spy(operation):
    """(a flag function, the undo) recording whether the registered CuPy implementation ran."""
    fn = kernels._IMPLEMENTATIONS[(operation, "cupy")]
    ran = []

    def wrapped(*a, **k):
        out = fn(*a, **k)
        ran.append(out is not None)
        return out

    kernels._IMPLEMENTATIONS[(operation, "cupy")] = wrapped
    return (lambda: any(ran)), (lambda: kernels._IMPLEMENTATIONS.__setitem__((operation, "cupy"), fn))


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("n", [64, 2560, 5120 + 8])
def test_layer_norm(dtype, n):
    rng = np.random.default_rng(n)
    x = (3.0 + 2.0 * rng.standard_normal((3, 7, n))).astype(DTYPES[dtype])     # an offset mean, as real streams
    w = (1.0 + 0.3 * rng.standard_normal(n)).astype(DTYPES[dtype])
    b = (0.1 * rng.standard_normal(n)).astype(DTYPES[dtype])
    ran, undo = spy("layer_norm")
    try:
        check(lambda x_, w_, b_: layer_norm(x_, w_, b_, 1e-5), [x, w, b], dtype, ran)
        check(lambda x_, w_: layer_norm(x_, w_, None, 1e-5), [x, w], dtype, ran)
    finally:
        undo()


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("hd,d", [(80, 20), (64, 16), (160, 40), (32, 32)])
def test_rotary_on_a_strided_view(dtype, hd, d):
    rng = np.random.default_rng(hd + d)
    B, H, T = 2, 3, 9
    proj = rng.standard_normal((B, T, H, hd)).astype(DTYPES[dtype])          # [B, T, H, hd] projection
    angles = rng.uniform(0, 50, (B, T, d // 2))
    angles = np.concatenate([angles, angles], axis=-1)
    cos, sin = np.cos(angles).astype(DTYPES[dtype]), np.sin(angles).astype(DTYPES[dtype])
    ran, undo = spy("rotary")
    try:
        fn = lambda p_, c_, s_: apply_rotary(p_.transpose(0, 2, 1, 3), c_, s_, d)  # noqa: E731  [B, H, T, hd] view
        check(fn, [proj, cos, sin], dtype, ran)
        one = lambda p_, c_, s_: apply_rotary(p_.transpose(0, 2, 1, 3), c_[:1], s_[:1], d)  # noqa: E731
        check(one, [proj, cos, sin], dtype, ran)                                # cos/sin broadcast over batch
    finally:
        undo()


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("n", [64, 2560])
def test_add_layer_norm(dtype, n):
    """s = x + delta is one rounding of the exact sum (normwise <= u/2 against float64, and the same
    function as CuPy's own add: within one rounding of it); y = layer_norm(s) as test_layer_norm, from
    the rounded s, and no less accurate than the op-by-op reference."""
    rng = np.random.default_rng(n + 1)
    x = (3.0 + 2.0 * rng.standard_normal((2, 9, n))).astype(DTYPES[dtype])
    delta = rng.standard_normal((2, 9, n)).astype(DTYPES[dtype])
    w = (1.0 + 0.3 * rng.standard_normal(n)).astype(DTYPES[dtype])
    b = (0.1 * rng.standard_normal(n)).astype(DTYPES[dtype])
    ran, undo = spy("add_layer_norm")
    try:
        dev = [cupy.asarray(a) for a in (x, delta, w, b)]
        s, y = add_layer_norm(*dev, 1e-5)
        assert ran(), "the fused kernel did not run"
        with kernels.reference_only():
            s16, y16 = add_layer_norm(*dev, 1e-5)
    finally:
        undo()
    assert s.dtype == y.dtype == DTYPES[dtype] and s.shape == y.shape == x.shape
    exact = x.astype(np.float64) + delta.astype(np.float64)
    assert rel(host(s), exact) <= TOL[dtype] / 2
    assert rel(host(s), host(s16)) <= TOL[dtype]
    ref = layer_norm(host(s), w.astype(np.float64), b.astype(np.float64), 1e-5)     # float64, from the rounded s
    err, err16 = rel(host(y), ref), rel(host(y16), ref)
    assert err <= TOL[dtype], err
    if dtype != "fp32":
        assert err <= err16 * 1.25, (err, err16)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("hd,d,kvh", [(80, 20, 3), (64, 16, 1), (160, 40, 3), (128, 32, 1)])
def test_rotary_qk_in_one_launch(dtype, hd, d, kvh):
    """q (a strided view of the projection) and k (contiguous, GQA: kvh of 3 heads) rotated in one
    launch: each equal to the one-tensor kernel (the same arithmetic per element: within one rounding,
    normwise u) and to the float64 reference within TOL."""
    rng = np.random.default_rng(hd + kvh)
    B, H, T = 2, 3, 11
    proj = rng.standard_normal((B, T, H, hd)).astype(DTYPES[dtype])            # [B, T, H, hd]
    k = rng.standard_normal((B, kvh, T, hd)).astype(DTYPES[dtype])
    angles = rng.uniform(0, 50, (B, T, d // 2))
    angles = np.concatenate([angles, angles], axis=-1)
    cos, sin = np.cos(angles).astype(DTYPES[dtype]), np.sin(angles).astype(DTYPES[dtype])
    q = proj.transpose(0, 2, 1, 3)
    dq, dk = cupy.asarray(proj).transpose(0, 2, 1, 3), cupy.asarray(k)
    for c, s_ in [(cos, sin), (cos[:1], sin[:1])]:                             # per-row and broadcast tables
        dc, ds = cupy.asarray(c), cupy.asarray(s_)
        ran, undo = spy("rotary_qk")
        try:
            gq, gk = apply_rotary_qk(dq, dk, dc, ds, d)
            assert ran(), "the fused kernel did not run"
        finally:
            undo()
        one_q, one_k = apply_rotary(dq, dc, ds, d), apply_rotary(dk, dc, ds, d)
        c64, s64 = c.astype(np.float64), s_.astype(np.float64)
        for got, one, src in [(gq, one_q, q), (gk, one_k, k)]:
            assert got.dtype == DTYPES[dtype] and got.shape == src.shape
            assert rel(host(got), host(one)) <= TOL[dtype]
            assert rel(host(got), apply_rotary(src.astype(np.float64), c64, s64, d)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_silu_gate(dtype):
    rng = np.random.default_rng(3)
    gate = (4.0 * rng.standard_normal((2, 5, 6912))).astype(DTYPES[dtype])
    gate[0, 0, :4] = [-100, -30, 30, 100]                                      # the tails of the sigmoid
    up = rng.standard_normal((2, 5, 6912)).astype(DTYPES[dtype])
    ran, undo = spy("gated_activation")
    try:
        check(lambda g_, u_: gated_activation(g_, u_, "silu"), [gate, up], dtype, ran)
    finally:
        undo()


def test_declines_what_it_does_not_cover():
    x = cupy.ones((2, 8), dtype=np.float64)
    assert kernels._IMPLEMENTATIONS[("layer_norm", "cupy")](x, x[0], None, 1e-5) is None      # float64: reference
    x32 = cupy.ones((1, 4, 3, 8), dtype=np.float32)
    w = cupy.ones((1, 4, 1, 8), dtype=np.float32)
    assert kernels._IMPLEMENTATIONS[("layer_norm", "cupy")](x32, w, None, 1e-5) is None      # per-head weights
    assert kernels._IMPLEMENTATIONS[("gated_activation", "cupy")](x32, x32, "gelu") is None
    add_ln = kernels._IMPLEMENTATIONS[("add_layer_norm", "cupy")]
    assert add_ln(x, x, x[0], None, 1e-5) is None                                          # float64
    assert add_ln(x32, x32[:, :2], w[0, 0, 0], None, 1e-5) is None                         # shapes differ
    cos = cupy.ones((1, 3, 8), dtype=np.float32)
    rot_qk = kernels._IMPLEMENTATIONS[("rotary_qk", "cupy")]
    assert rot_qk(x32, x32.astype(np.float16), cos, cos, 8) is None                          # dtypes differ
    assert rot_qk(x32, x32[:, :, :2], cos, cos, 8) is None                                   # lengths differ
