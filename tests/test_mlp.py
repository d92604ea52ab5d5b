"""The SwiGLU MLP and its activations against independent references (math.erf, closed forms)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stablelm_ref.mlp import ACTIVATIONS, erf, mlp


@settings(max_examples=200, deadline=None)
@given(st.floats(-40, 40, allow_nan=False))
def test_erf_matches_math_erf(z):
    # float64 series / continued fraction: measured max error 8e-15 over [-8, 8]
    assert abs(float(erf(np.array([z]))[0]) - math.erf(z)) < 1e-13


def test_activations_against_closed_forms(xp):
    z = np.linspace(-30, 30, 1001)
    sig = 1 / (1 + np.exp(-z))
    expect = {
        "silu": z * sig, "sigmoid": sig, "relu": np.maximum(z, 0), "tanh": np.tanh(z),
        "gelu": np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in z]),
        "gelu_new": 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3))),
    }
    for name, ref in expect.items():
        np.testing.assert_allclose(np.asarray(ACTIVATIONS[name](xp.asarray(z))), ref, rtol=1e-12, atol=1e-12,
                                   err_msg=name)


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_swiglu_against_explicit_formula(xp, act):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 8))
    p = {"mlp.gate_proj.weight": rng.normal(size=(12, 8)), "mlp.up_proj.weight": rng.normal(size=(12, 8)),
         "mlp.down_proj.weight": rng.normal(size=(8, 12))}
    g = x @ p["mlp.gate_proj.weight"].T
    a = g / (1 + np.exp(-g)) if act == "silu" else np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / 2 ** 0.5)))(g)
    ref = (a * (x @ p["mlp.up_proj.weight"].T)) @ p["mlp.down_proj.weight"].T
    out = mlp(xp.asarray(x), {k.removeprefix("mlp."): xp.asarray(v) for k, v in p.items()}, act)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-10, atol=1e-10)
