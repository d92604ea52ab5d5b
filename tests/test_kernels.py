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


def test_linear_is_a_seam_used_by_every_projection(registry):
    """_xp.linear is the 'linear' seam: a registered implementation receives every projection of a layer
    (q, k, v, o and gate, up, down: 7 calls), and the NumPy result without one is the reference's, bit
    for bit (x W^T + b as one 2-D matmul, checked here against float64 to float64 rounding). A
    sequential layer also passes once through the rotary_qk and add_layer_norm seams."""
    from stablelm_ref import StableLmConfig
    from stablelm_ref._xp import linear
    from stablelm_ref.decoder_layer import decoder_layer
    from stablelm_ref.rotary import rotary_cos_sin

    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 8)), rng.standard_normal((5, 8)), rng.standard_normal(5)
    y = linear(x, w, b)
    np.testing.assert_array_equal(y, linear.reference(x, w, b))
    exact = np.einsum("bti,oi->bto", x.astype(np.longdouble), w.astype(np.longdouble)) + b
    bound = (8 + 1) * 2.0**-53 * (np.abs(x) @ np.abs(w).T + np.abs(b))     # 8 products + the bias: gamma_9
    assert (np.abs(y - exact) <= bound).all()

    config = StableLmConfig.from_dict(dict(model_type="stablelm", vocab_size=16, hidden_size=16,
                                           intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=2, max_position_embeddings=32))
    shapes = {"input_layernorm.weight": (16,), "input_layernorm.bias": (16,),
              "post_attention_layernorm.weight": (16,), "post_attention_layernorm.bias": (16,),
              "self_attn.q_proj.weight": (16, 16), "self_attn.k_proj.weight": (16, 16),
              "self_attn.v_proj.weight": (16, 16), "self_attn.o_proj.weight": (16, 16),
              "mlp.gate_proj.weight": (24, 16), "mlp.up_proj.weight": (24, 16), "mlp.down_proj.weight": (16, 24)}
    weights = {name: rng.standard_normal(shape) * 0.2 for name, shape in shapes.items()}
    h = rng.standard_normal((1, 4, 16))
    cos, sin = rotary_cos_sin(np.arange(4)[None, :], config, np.float64)
    ref = decoder_layer(h, weights, config, cos, sin)
    seen = []

    def counting(x, weight, bias=None):
        seen.append(weight.shape)
        return None                                        # declines: the reference computes

    registry.register("linear", "numpy", counting)
    fused = []
    registry.register("rotary_qk", "numpy", lambda q, k, *a: fused.append(("rotary_qk", q.shape, k.shape)))
    registry.register("add_layer_norm", "numpy", lambda x, d, *a: fused.append(("add_layer_norm", x.shape)))
    np.testing.assert_array_equal(decoder_layer(h, weights, config, cos, sin), ref)
    assert sorted(seen) == sorted([(16, 16)] * 4 + [(24, 16)] * 2 + [(16, 24)])
    assert fused == [("rotary_qk", (1, 2, 4, 8), (1, 2, 4, 8)), ("add_layer_norm", (1, 4, 16))]
    seen.clear()
    with kernels.reference_only("linear"):
        decoder_layer(h, weights, config, cos, sin)
    assert seen == []
