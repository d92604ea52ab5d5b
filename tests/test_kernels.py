"""kernels.py, the seam: a marked function runs the implementation registered for its first argument's
library (and the reference when none is, or it declines); reference_only switches seams off by name."""

import array_api_strict
import numpy as np
import pytest

from stablelm_ref import kernels
from stablelm_ref.layernorm import layer_norm
from stablelm_ref.mlp import gated_activation


@pytest.fixture
def registry():
    saved = dict(kernels._IMPLEMENTATIONS)
    yield kernels
    kernels._IMPLEMENTATIONS.clear()
    kernels._IMPLEMENTATIONS.update(saved)


def test_library_names():
    assert kernels.library(np.ones(2)) == "numpy"
    assert kernels.library(array_api_strict.asarray([1.0])) == "array_api_strict"


def test_a_seam_runs_the_registered_implementation_or_its_reference(registry):
    x, w, b = np.arange(6.0).reshape(2, 3), np.ones(3), np.zeros(3)
    reference = layer_norm(x, w, b, 1e-5)                               # nothing registered for NumPy
    np.testing.assert_allclose(reference, layer_norm.reference(x, w, b, 1e-5), rtol=0, atol=0)
    seen = []
    registry.register("layer_norm", "numpy", lambda *a: seen.append(a) or np.full((2, 3), 5.0))
    assert (layer_norm(x, w, b, 1e-5) == 5.0).all() and seen[0][0] is x and seen[0][3] == 1e-5
    registry.register("layer_norm", "numpy", lambda *a: None)          # declines: the reference runs
    np.testing.assert_array_equal(layer_norm(x, w, b, 1e-5), reference)
    assert (layer_norm(array_api_strict.asarray(x), array_api_strict.asarray(w), None, 1e-5).shape == (2, 3))


def test_reference_only_by_name_and_nested(registry):
    g, u = np.array([[-1.0, 2.0]]), np.array([[3.0, 4.0]])
    registry.register("gated_activation", "numpy", lambda *a: np.zeros((1, 2)))
    registry.register("layer_norm", "numpy", lambda *a: np.zeros((1, 2)))
    ref = gated_activation.reference(g, u, "silu")
    with kernels.reference_only("gated_activation"):
        np.testing.assert_array_equal(gated_activation(g, u, "silu"), ref)
        assert (layer_norm(g, np.ones(2), None, 1e-5) == 0).all()         # another seam stays on
        with kernels.reference_only():
            assert not (layer_norm(g, np.ones(2), None, 1e-5) == 0).all()
        assert (layer_norm(g, np.ones(2), None, 1e-5) == 0).all()         # restored on the way out
    assert (gated_activation(g, u, "silu") == 0).all()
