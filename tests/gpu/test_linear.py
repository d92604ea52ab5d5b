"""The linear seam on CuPy (cuda/gemm.py, one direct cublasGemmEx) equals its reference, x W^T + b.

Against a float64 product of the same rounded inputs: the GEMM accumulates in float32 (k <= 6912 terms:
a relative error of order sqrt(k) * 2^-24 ~ 5e-6, far below the output's rounding) and rounds each
output once to the input dtype, at most u/2 relative (bfloat16 u = 2^-8, float16 u = 2^-11); normwise,
bound u: bf16 4e-3, fp16 5e-4. A transposed operand, a wrong leading dimension or a missed row gives
errors of order 1. Against CuPy's own matmul (the reference forced): the same product with the same
accumulation, so within one rounding of the output (normwise <= u).
"""

import ml_dtypes
import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="CuPy is not installed")

from stablelm_ref import kernels  # noqa: E402
from stablelm_ref._xp import linear  # noqa: E402

DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp16": np.dtype(np.float16)}
TOL = {"bf16": 2.0**-8, "fp16": 2.0**-11}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def ran():
    fn = kernels._IMPLEMENTATIONS[("linear", "cupy")]
    calls = []

    def wrapped(*a, **k):
        out = fn(*a, **k)
        calls.append(out is not None)
        return out

    kernels.register("linear", "cupy", wrapped)
    yield calls
    kernels.register("linear", "cupy", fn)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("lead, k, n, bias, view", [
    ((1, 512), 2560, 2560, False, None),     # 3b q_proj at a 512-token prompt
    ((1, 300), 2560, 6912, False, None),     # gate/up
    ((2, 7), 6912, 2560, False, None),       # down, odd row count
    ((3,), 80, 240, True, None),             # 2-D input, a bias (StableLM 2's qkv)
    ((1, 1), 2560, 50304, False, None),      # the lm_head on the last position
    ((2, 5), 64, 48, True, "every_other"),   # a non-contiguous input (copied first)
    ((1, 4), 72, 40, False, "skip_row"),     # a view starting 144 bytes in (not 256-byte aligned)
], ids=["q_proj_512", "gate_300", "down_7", "bias_2d", "lm_head", "strided", "offset_16"])
def test_linear_matches_float64_and_cupy_matmul(dtype, lead, k, n, bias, view, ran):
    dt = DTYPES[dtype]
    rng = np.random.default_rng(k + n)
    shape = (*lead[:-1], lead[-1] + 1, k) if view == "skip_row" else (*lead, 2 * k if view else k)
    x = rng.standard_normal(shape).astype(dt)
    pick = {None: np.s_[...], "every_other": np.s_[..., ::2], "skip_row": np.s_[:, 1:, :]}[view]
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(dt)
    b = rng.standard_normal(n).astype(dt) if bias else None
    xd, xh = cupy.asarray(x)[pick], x[pick]
    if view == "skip_row":
        assert xd.data.ptr % 256 and xd.data.ptr % 16 == 0 and xd.flags.c_contiguous
    wd, bd = cupy.asarray(w), (cupy.asarray(b) if bias else None)

    got = linear(xd, wd, bd)
    assert ran == [True], "the cuBLAS implementation did not run"
    assert got.dtype == dt and got.shape == (*lead, n)
    ref = xh.astype(np.float64) @ w.astype(np.float64).T + (b.astype(np.float64) if bias else 0.0)
    with kernels.reference_only("linear"):
        theirs = linear(xd, wd, bd)
    got_h = cupy.asnumpy(got).astype(np.float64)
    assert rel(got_h, ref) <= TOL[dtype]
    assert rel(got_h, cupy.asnumpy(theirs).astype(np.float64)) <= TOL[dtype]


def test_linear_declines_what_it_does_not_cover(ran):
    """float32/float64 (the exact reference matmul), mixed dtypes and strided weights run the reference."""
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((4, 32)), rng.standard_normal((16, 32))
    for xd, wd in [(cupy.asarray(x, np.float32), cupy.asarray(w, np.float32)),
                   (cupy.asarray(x), cupy.asarray(w)),
                   (cupy.asarray(x, DTYPES["bf16"]), cupy.asarray(w, np.float32)),
                   (cupy.asarray(x, DTYPES["bf16"]), cupy.asarray(np.ascontiguousarray(w.T), DTYPES["bf16"]).T)]:
        got = linear(xd, wd)
        np.testing.assert_allclose(cupy.asnumpy(got).astype(np.float64),
                                   x.astype(np.float64) @ w.T.astype(np.float64), rtol=0, atol=0.3)
    assert ran == [False] * 4
