"""Rotary position embedding on part of each head, GPT-NeoX style.

    theta_i = rope_theta ** (-2i / d)            i < d/2,  d = rotary_ndims
    rot(x)  = x * cos(p theta) + rotate_half(x) * sin(p theta),   rotate_half([x1, x2]) = [-x2, x1]

x1, x2 are the two halves of the rotated dims (not interleaved pairs). StableLM rotates only
rotary_ndims = int(head_dim * partial_rotary_factor) dims of each head (20 of 80 in 3b-4e1t, 16 of
64 in 2-1.6b, 40 of 160 in 2-12b) and passes the rest through untouched.

Scaling types (config rope_scaling / rope_parameters.rope_type):
    linear   theta_i / factor                        (positions stretched by `factor`)
    dynamic  rope_theta * (factor * L / max_pos - (factor - 1)) ** (d / (d - 2)) as the base,
             where L = max(position) + 1, only when L > max_position_embeddings (NTK-aware)

transformers builds the cos/sin tables in float32 for every model dtype; this file builds them in
float64 in float64 mode (the golden reference) and float32 otherwise. transformers' dynamic rope keeps
the largest base it has seen until a call is short again; here each call derives it from its own
positions, which is the same for any growing sequence (generation).

Config: rope_theta, partial_rotary_factor, rope_scaling, max_position_embeddings.
On CuPy arrays a fused CUDA kernel applies it in one pass (kernels.py, stablelm_ref/cuda/fused.cu),
computing in float32 and rounding once where this code rounds after each product in 16-bit dtypes;
apply_rotary_qk rotates an attention layer's queries and keys in one launch.
Checkpoint tensors: none.
"""

from . import kernels
from ._xp import array_namespace, wide_dtype


def inverse_frequencies(config, xp, dtype, seq_len=None):
    """theta_i for i < rotary_ndims / 2, as a [d/2] array of `dtype`."""
    d = config.rotary_ndims
    base = float(config.rope_theta)
    scaling = config.rope_scaling or {}
    if config.rope_type == "dynamic" and seq_len is not None and seq_len > config.max_position_embeddings:
        factor = scaling["factor"]
        base = base * ((factor * seq_len / config.max_position_embeddings) - (factor - 1)) ** (d / (d - 2))
    exponents = xp.arange(0, d, 2, dtype=dtype) / d                   # [d/2]
    inv_freq = 1.0 / (base ** exponents)                              # [d/2]
    if config.rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    return inv_freq


def rotary_cos_sin(position_ids, config, dtype):
    """cos and sin tables for integer positions [B, T] -> two [B, T, d] arrays of `dtype`."""
    xp = array_namespace(position_ids)
    wide = wide_dtype(xp, dtype)
    seq_len = int(xp.max(position_ids)) + 1 if config.rope_type == "dynamic" else None
    inv_freq = inverse_frequencies(config, xp, wide, seq_len)        # [d/2]
    freqs = xp.astype(position_ids, wide)[..., None] * inv_freq      # [B, T, 1] * [d/2] -> [B, T, d/2]
    angles = xp.concat([freqs, freqs], axis=-1)                      # [B, T, d]
    return xp.astype(xp.cos(angles), dtype), xp.astype(xp.sin(angles), dtype)


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] over the last axis (the two halves, not interleaved pairs)."""
    xp = array_namespace(x)
    half = x.shape[-1] // 2
    return xp.concat([-x[..., half:], x[..., :half]], axis=-1)


@kernels.seam("rotary")
def apply_rotary(x, cos, sin, rotary_ndims):
    """Rotate the first rotary_ndims dims of each head. x: [B, H, T, hd]; cos, sin: [B, T, d]."""
    xp = array_namespace(x)
    rot, rest = x[..., :rotary_ndims], x[..., rotary_ndims:]        # [B, H, T, d], [B, H, T, hd - d]
    cos, sin = cos[:, None, :, :], sin[:, None, :, :]                # [B, T, d] -> [B, 1, T, d]
    rot = rot * cos + rotate_half(rot) * sin                         # [B, H, T, d]
    return xp.concat([rot, rest], axis=-1)                           # [B, H, T, hd]


@kernels.seam("rotary_qk")
def apply_rotary_qk(q, k, cos, sin, rotary_ndims):
    """(rot(q), rot(k)) for one attention layer: q [B, H, T, hd], k [B, KVH, T, hd] (one kernel launch on
    CuPy for both, where the two calls below would make two)."""
    return apply_rotary(q, cos, sin, rotary_ndims), apply_rotary(k, cos, sin, rotary_ndims)
