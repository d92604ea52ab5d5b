"""cuda/fused.py's LayerNorm entry points on the CPU: which calls the kernels take and which they leave to the
reference (returning None), with CuPy and the launch replaced by NumPy stand-ins that record the launch. The
kernels' numbers are held to float64 in tests/gpu/test_fused.py (on a GPU)."""

import sys
import types

import ml_dtypes
import numpy as np
import pytest

from stablelm_ref.cuda import fused

BF16, F16, F32, F64 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)


@pytest.fixture
def launches(monkeypatch):
    """A stand-in `cupy` (its two calls fused.py makes here, on NumPy) and _kernel recording each launch."""
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(ascontiguousarray=np.ascontiguousarray,
                                                                   empty_like=np.empty_like))
    seen = []
    monkeypatch.setattr(fused, "_kernel", lambda name: lambda grid, block, args: seen.append((name, grid, args)))
    return seen


def arrays(x=F32, w=F32, b=F32, shape=(2, 3, 8), n=8, wdim=1, bshape=None):
    x_ = np.ones(shape, dtype=x)
    w_ = np.ones((n,) if wdim == 1 else (4, n), dtype=w)
    b_ = None if b is None else np.zeros(bshape or w_.shape, dtype=b)
    return x_, w_, b_


DECLINED = {                                       # what the kernels leave to the reference
    "float64 x": dict(x=F64), "float64 weight": dict(w=F64, b=F64), "per-head weights": dict(wdim=2),
    "weight unlike the last axis": dict(n=6), "empty x": dict(shape=(0, 8)), "bias dtype": dict(b=F16),
    "bias shape": dict(bshape=(4,)),
}
TAKEN = {"float32": ({}, "0, 0"), "bfloat16 x, float32 weight, no bias": (dict(x=BF16, b=None), "1, 0"),
         "float16": (dict(x=F16, w=F16, b=F16), "2, 2")}


@pytest.mark.parametrize("case", DECLINED)
def test_both_layer_norms_decline_the_same_calls(launches, case):
    x, w, b = arrays(**DECLINED[case])
    assert fused.layer_norm(x, w, b, 1e-5) is None
    assert fused.add_layer_norm(x, x.copy(), w, b, 1e-5) is None
    assert launches == []


@pytest.mark.parametrize("delta", [dict(dtype=F16), dict(shape=(2, 3, 1))])
def test_add_layer_norm_declines_a_delta_unlike_x(launches, delta):
    x, w, b = arrays()
    d = np.ones(delta.get("shape", x.shape), dtype=delta.get("dtype", x.dtype))
    assert fused.add_layer_norm(x, d, w, b, 1e-5) is None and launches == []


@pytest.mark.parametrize("case", TAKEN)
def test_both_layer_norms_launch_one_block_per_row(launches, case):
    kwargs, tags = TAKEN[case]
    x, w, b = arrays(**kwargs)
    y = fused.layer_norm(x, w, b, 1e-5)
    s, y2 = fused.add_layer_norm(x, x.copy(), w, b, 1e-5)
    assert y.shape == s.shape == y2.shape == x.shape and y.dtype == x.dtype
    (name1, grid1, args1), (name2, grid2, args2) = launches
    assert name1 == f"layer_norm_kernel<{tags}>" and name2 == f"add_layer_norm_kernel<{tags}>"
    assert grid1 == grid2 == (6,)                                   # 2 x 3 rows of 8
    assert int(args1[4]) == int(args2[6]) == 8                      # n, the row length
    assert int(args1[-1]) == int(args2[-1]) == (b is not None)      # has_bias; without one, the weight is passed
    assert (args1[2] is args1[1]) == (b is None)
