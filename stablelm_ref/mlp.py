"""The SwiGLU MLP (a gated linear unit with the SiLU activation).

    mlp(x) = down_proj( act(gate_proj(x)) * up_proj(x) )          act = silu: silu(z) = z * sigmoid(z)

gate_proj and up_proj map hidden_size -> intermediate_size, down_proj maps back; none has a bias.
Every StableLM uses silu; `hidden_act` may name any activation below (transformers' ACT2FN names).

Config: hidden_size, intermediate_size, hidden_act.
Checkpoint tensors: model.layers.{i}.mlp.{gate,up,down}_proj.weight.
"""

import math

from . import kernels
from ._xp import array_namespace, linear, no_trace


def sigmoid(z):
    """1 / (1 + exp(-z)), written so that exp never overflows."""
    xp = array_namespace(z)
    e = xp.exp(-xp.abs(z))                                   # in (0, 1]
    return xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def silu(z):
    return z * sigmoid(z)


def erf(z):
    """The error function to float64 accuracy using only array-API operations (the standard has no erf).

    |z| < 2.5: its Maclaurin series  erf(z) = 2/sqrt(pi) sum_n (-1)^n z^(2n+1) / (n! (2n+1));
    |z| >= 2.5: erfc(z) = exp(-z^2) / sqrt(pi) / (z + (1/2)/(z + 1/(z + (3/2)/(z + ...)))) (continued fraction).
    Narrower inputs are computed in float64 and cast back.
    """
    xp = array_namespace(z)
    x = xp.astype(z, xp.float64)
    small = xp.clip(x, -2.5, 2.5)
    term, total = small, small
    for n in range(1, 60):
        term = term * (-small * small) / n
        total = total + term / (2 * n + 1)
    series = total * (2.0 / math.sqrt(math.pi))
    big = xp.clip(xp.abs(x), 2.5, 30.0)
    fraction = big
    for k in range(120, 0, -1):
        fraction = big + (k / 2.0) / fraction
    erfc = xp.exp(-big * big) / (math.sqrt(math.pi) * fraction)
    tail = xp.where(x >= 0, 1.0 - erfc, erfc - 1.0)
    return xp.astype(xp.where(xp.abs(x) < 2.5, series, tail), z.dtype)


def gelu(z):
    """The exact GELU: z * Phi(z) = z/2 (1 + erf(z / sqrt 2))."""
    return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))


def gelu_tanh(z):
    """The tanh approximation (gelu_new, gelu_pytorch_tanh)."""
    xp = array_namespace(z)
    return 0.5 * z * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z * z * z)))


def gelu_fast(z):
    xp = array_namespace(z)
    return 0.5 * z * (1.0 + xp.tanh(z * 0.7978845608 * (1.0 + 0.044715 * z * z)))


def relu(z):
    xp = array_namespace(z)
    return xp.where(z > 0, z, xp.zeros_like(z))


def tanh(z):
    return array_namespace(z).tanh(z)


ACTIVATIONS = {
    "silu": silu, "swish": silu, "gelu": gelu, "gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_fast, "relu": relu, "tanh": tanh, "sigmoid": sigmoid,
}


@kernels.seam("gated_activation")
def gated_activation(gate, up, hidden_act):
    """act(gate) * up, elementwise (one fused CUDA kernel on CuPy arrays for silu: kernels.py)."""
    return ACTIVATIONS[hidden_act](gate) * up


def mlp(x, w, hidden_act, trace=no_trace):
    """x: [B, T, hidden] -> [B, T, hidden]. w: {gate,up,down}_proj.weight (the names after
    `model.layers.{i}.mlp.`); trace names likewise."""
    gate = linear(x, w["gate_proj.weight"])                  # [B, T, hidden] -> [B, T, inter]
    up = linear(x, w["up_proj.weight"])                      # [B, T, hidden] -> [B, T, inter]
    h = gated_activation(gate, up, hidden_act)               # [B, T, inter]
    out = linear(h, w["down_proj.weight"])                   # [B, T, inter] -> [B, T, hidden]
    trace("gate_proj", gate), trace("up_proj", up), trace("act", h), trace("down_proj", out)
    return out
