"""The fused prefill attention kernel equals the float64 reference (stablelm_ref.cuda.reference).

Tolerances, as ||out - ref|| / ||ref|| per (batch, head) slice:
  The reference sees the same (already rounded) bf16/fp16 inputs, exactly, and computes in float64;
  the kernel adds three roundings of its own: the probabilities P are rounded to the input dtype
  before the P.V tensor-core product, the output is rounded to the input dtype, and float32
  accumulation (2^-24, negligible). Each rounding is at most u relative (u = 2^-8 = 3.9e-3 for
  bfloat16, 2^-11 = 4.9e-4 for float16) and, being round-to-nearest, unbiased, so the expected
  relative error is about u/2 to u (measured on the H100: see docs/cuda_prefill_notes.md).
  Bounds: bf16 1e-2 (~2.5 u), fp16 2e-3 (~4 u), float32 kernel 1e-5. A wrong index, a missed tile or
  a lost rescale gives errors of order 1, far above these.
Every output element must be written: `out` is filled with NaN first and must come back finite.
Query rows with no allowed key must be exactly zero (the defined behaviour).
"""

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
try:
    _ndev = cupy.cuda.runtime.getDeviceCount()
except Exception:  # pragma: no cover
    _ndev = 0
if _ndev == 0:  # pragma: no cover
    pytest.skip("no CUDA device visible", allow_module_level=True)

import ml_dtypes  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stablelm_ref.cuda.flash_prefill import (  # noqa: E402
    CANDIDATES,
    DEFAULT_VARIANT,
    HEAD_DIMS,
    flash_attention_prefill,
    flash_attention_prefill_variant,
)
from stablelm_ref.cuda import flash_hopper  # noqa: E402
from stablelm_ref.cuda.reference import attention_reference  # noqa: E402

DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}
TOL = {"bf16": 1e-2, "fp16": 2e-3, "fp32": 1e-5}


def make_inputs(seed, B, H, KVH, T, S, D, dtype, spread=1.0, pads=None):
    """Random q, k, v (host arrays in `dtype`) and a left-padding key mask (or None)."""
    rng = np.random.default_rng(seed)
    q = (spread * rng.standard_normal((B, H, T, D))).astype(DTYPES[dtype])
    k = (spread * rng.standard_normal((B, KVH, S, D))).astype(DTYPES[dtype])
    v = rng.standard_normal((B, KVH, S, D)).astype(DTYPES[dtype])
    mask = None
    if pads is not None:
        mask = np.ones((B, S), dtype=np.int32)
        for b, p in enumerate(pads):
            mask[b, :p] = 0
    return q, k, v, mask


def run_and_check(q, k, v, mask, dtype, causal=True, variant=None, rel_tol=None):
    """Run the kernel on NaN-poisoned `out`, compare with the reference; return the worst error."""
    B, H, T, D = q.shape
    out = cupy.full((B, H, T, D), np.nan, dtype=DTYPES[dtype])
    dq, dk, dv = cupy.asarray(q), cupy.asarray(k), cupy.asarray(v)
    dm = None if mask is None else cupy.asarray(mask)
    if variant is None:
        got = flash_attention_prefill(dq, dk, dv, dm, causal=causal, out=out)
    else:
        got = flash_attention_prefill_variant(variant, dq, dk, dv, dm, causal=causal, out=out)
    assert got is out
    got = cupy.asnumpy(out).astype(np.float64)                          # [B, H, T, D]
    assert np.isfinite(got).all(), "some output elements were not written (NaN poison survived)"

    ref = attention_reference(q, k, v, mask, causal=causal)            # float64 [B, H, T, D]
    empty = ~np.any(ref != 0, axis=-1)                                  # rows with no allowed key
    assert (got[empty] == 0).all(), "fully masked query rows must be exactly zero"

    err = np.linalg.norm((got - ref).reshape(B, H, -1), axis=-1)
    norm = np.linalg.norm(ref.reshape(B, H, -1), axis=-1)
    rel = np.where(norm > 0, err / np.maximum(norm, 1e-300), err)       # [B, H]
    tol = TOL[dtype] if rel_tol is None else rel_tol
    assert rel.max() <= tol, f"relative error {rel.max():.3e} > {tol:.0e} (per (b, h): {rel.round(5)})"
    return float(rel.max())


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_long_sequence_many_tiles(D):
    # 1000 is no multiple of any tile: partial query block, partial key tile, causal tile skipping
    q, k, v, _ = make_inputs(1, 1, 4, 2, 1000, 1000, D, "bf16")
    run_and_check(q, k, v, None, "bf16")


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_every_variant(D):
    # each candidate kernel variant (the benchmark may make any of them the default)
    q, k, v, mask = make_inputs(2, 2, 4, 2, 333, 400, D, "bf16", pads=[0, 150])
    for variant in CANDIDATES[D]:
        run_and_check(q, k, v, mask, "bf16", variant=variant)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_small_cases(dtype):
    # small shapes for compute-sanitizer: one query (decode-like, long cache), left padding
    # including a batch row that is ALL padding, GQA, and a non-causal case.
    for seed, (B, H, KVH, T, S, D), pads, causal in [
        (3, (2, 4, 1, 1, 130, 80), [0, 129], True),
        (4, (3, 2, 2, 70, 70, 64), [5, 70, 69], True),
        (5, (1, 4, 2, 17, 90, 128), None, True),
        (6, (2, 2, 1, 40, 65, 160), [0, 30], False),
    ]:
        q, k, v, mask = make_inputs(seed, B, H, KVH, T, S, D, dtype, pads=pads)
        run_and_check(q, k, v, mask, dtype, causal=causal)


def test_fully_padded_queries_are_zero_and_others_unaffected():
    # left padding: the first `pad` queries see only padding -> zero rows; the rest must equal the
    # attention over the unpadded suffix alone (what generate() relies on).
    pad, T, D = 37, 100, 80
    q, k, v, mask = make_inputs(7, 1, 2, 2, T, T, D, "fp16", pads=[pad])
    out = cupy.asnumpy(flash_attention_prefill(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v),
                                               cupy.asarray(mask))).astype(np.float64)
    assert (out[:, :, :pad] == 0).all()
    alone = cupy.asnumpy(flash_attention_prefill(cupy.asarray(q[:, :, pad:]), cupy.asarray(k[:, :, pad:]),
                                                 cupy.asarray(v[:, :, pad:]))).astype(np.float64)
    np.testing.assert_allclose(out[:, :, pad:], alone, rtol=0, atol=2e-3)


def test_non_contiguous_inputs_and_bool_mask():
    rng = np.random.default_rng(8)
    B, T, H, D = 2, 50, 4, 64
    x = rng.standard_normal((B, T, 3, H, D)).astype(np.float16)         # [B, T, qkv, H, D]
    dx = cupy.asarray(x)
    dq, dk, dv = (dx[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B, H, T, D] views
    assert not dq.flags.c_contiguous
    mask = np.ones((B, T), dtype=bool)
    mask[1, :10] = False
    got = cupy.asnumpy(flash_attention_prefill(dq, dk, dv, cupy.asarray(mask))).astype(np.float64)
    ref = attention_reference(cupy.asnumpy(dq), cupy.asnumpy(dk), cupy.asnumpy(dv), mask)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= TOL["fp16"]


def test_explicit_scale():
    q, k, v, _ = make_inputs(9, 1, 2, 1, 64, 64, 128, "bf16")
    out = flash_attention_prefill(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), scale=0.3)
    ref = attention_reference(q, k, v, scale=0.3)
    got = cupy.asnumpy(out).astype(np.float64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= TOL["bf16"]


def test_bad_arguments_are_refused():
    q = cupy.zeros((1, 4, 8, 64), dtype=np.float16)
    k = cupy.zeros((1, 3, 8, 64), dtype=np.float16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention_prefill(q, k, k)
    k = cupy.zeros((1, 2, 4, 64), dtype=np.float16)
    with pytest.raises(ValueError, match="at least as many keys"):
        flash_attention_prefill(q, k, k)
    with pytest.raises(ValueError, match="head dim 96"):
        x = cupy.zeros((1, 1, 4, 96), dtype=np.float16)
        flash_attention_prefill(x, x, x)
    with pytest.raises(TypeError, match="float64"):
        x = cupy.zeros((1, 1, 4, 64), dtype=np.float64)
        flash_attention_prefill(x, x, x)
    with pytest.raises(ValueError, match="key_mask"):
        x = cupy.zeros((1, 1, 4, 64), dtype=np.float16)
        flash_attention_prefill(x, x, x, cupy.ones((1, 5)))


def _rel(got, ref):
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_strided_views_in_and_out(dtype):
    # what the model passes: q read from the [B, T, H*D] projection, k and v the first S positions of a
    # longer KV cache [B, KVH, max_len, D], out written into [B, T, H, D] (merge_heads is then a reshape)
    B, H, KVH, T, S, D, max_len = 2, 4, 2, 37, 50, 80, 96
    q, k, v, mask = make_inputs(11, B, H, KVH, T, S, D, dtype, pads=[0, 20])
    proj = cupy.asarray(np.ascontiguousarray(q.transpose(0, 2, 1, 3)))          # [B, T, H, D]
    dq = proj.transpose(0, 2, 1, 3)                                             # [B, H, T, D] view
    kc = cupy.full((B, KVH, max_len, D), np.nan, dtype=DTYPES[dtype])           # poison past S: never read
    vc = cupy.full((B, KVH, max_len, D), np.nan, dtype=DTYPES[dtype])
    kc[:, :, :S], vc[:, :, :S] = cupy.asarray(k), cupy.asarray(v)
    merged = cupy.full((B, T, H, D), np.nan, dtype=DTYPES[dtype])
    out = merged.transpose(0, 2, 1, 3)
    assert not dq.flags.c_contiguous and not kc[:, :, :S].flags.c_contiguous
    got = flash_attention_prefill(dq, kc[:, :, :S], vc[:, :, :S], cupy.asarray(mask), out=out)
    assert got is out
    got = cupy.asnumpy(merged).astype(np.float64).transpose(0, 2, 1, 3)
    assert np.isfinite(got).all()
    ref = attention_reference(q, k, v, mask)
    assert _rel(got, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_the_seam_on_cupy_equals_the_reference_equation(dtype):
    # attention.causal_attention on CuPy arrays runs the kernel (through attention_for_model) and must
    # equal the array-API reference run on the same rounded inputs in float64, rows that see no key
    # included (both give them zeros, as transformers' sdpa). Tolerance as for the kernel alone.
    from stablelm_ref import kernels
    from stablelm_ref.attention import causal_attention

    B, H, KVH, T, S, D = 3, 6, 2, 45, 60, 64
    q, k, v, mask = make_inputs(12, B, H, KVH, T, S, D, dtype, pads=[0, 30, 55])
    key_mask = mask != 0
    out, weights = causal_attention(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), cupy.asarray(key_mask))
    assert weights is None                                                 # the kernel ran
    with kernels.reference_only():
        ref, probs = causal_attention(*(a.astype(np.float64) for a in (q, k, v)), key_mask)
    assert probs is not None
    got = cupy.asnumpy(out).astype(np.float64)
    blind = ~np.any(np.tril(np.ones((T, S), bool), S - T)[None] & key_mask[:, None, :], axis=-1)  # [B, T]
    assert blind.sum() == (30 - 15) + (55 - 15)                            # rows 1 and 2 have blind queries
    assert _rel(got, ref) <= TOL[dtype]


# the random-shape property test last: if it fails, hypothesis shrinks for a while
@st.composite
def cases(draw):
    B = draw(st.integers(1, 3))
    KVH = draw(st.integers(1, 2))
    H = KVH * draw(st.sampled_from([1, 2, 4]))
    T = draw(st.integers(1, 300))
    S = T + draw(st.one_of(st.just(0), st.integers(0, 200)))        # S - T: KV-cache prefix
    D = draw(st.sampled_from(HEAD_DIMS))
    dtype = draw(st.sampled_from(["bf16", "fp16"]))
    pads = draw(st.one_of(st.none(), st.lists(st.integers(0, S), min_size=B, max_size=B)))
    causal = draw(st.sampled_from([True, True, True, False]))
    spread = draw(st.sampled_from([0.5, 1.0, 2.5]))                   # flat to peaked softmax
    seed = draw(st.integers(0, 2**32 - 1))
    return dict(B=B, H=H, KVH=KVH, T=T, S=S, D=D, dtype=dtype, pads=pads, causal=causal,
                spread=spread, seed=seed)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_matches_reference_on_random_shapes(c):
    q, k, v, mask = make_inputs(c["seed"], c["B"], c["H"], c["KVH"], c["T"], c["S"], c["D"],
                                c["dtype"], c["spread"], c["pads"])
    run_and_check(q, k, v, mask, c["dtype"], causal=c["causal"])


# ---- the wgmma (Hopper, sm_90a) kernel: the same function as the mma.sync kernel -----------------------
hopper = pytest.mark.skipif(not flash_hopper.usable(), reason="the wgmma kernel needs a compute capability "
                            "9.0 GPU and nvcc or NVRTC for sm_90a")
HOPPER_CASES = [(D, var) for D, vs in flash_hopper.CANDIDATES.items() for var in vs]


def _run_variant(variant, q, k, v, mask, dtype, causal=True):
    out = cupy.full(q.shape, np.nan, dtype=DTYPES[dtype])
    flash_attention_prefill_variant(variant, cupy.asarray(q), cupy.asarray(k), cupy.asarray(v),
                                    None if mask is None else cupy.asarray(mask), causal=causal, out=out)
    return cupy.asnumpy(out).astype(np.float64)


@hopper
@pytest.mark.parametrize("D, variant", HOPPER_CASES)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_hopper_kernel_equals_reference_and_mma_kernel(D, variant, dtype):
    # several key tiles and query blocks, a partial last tile, GQA, left padding with a fully padded row,
    # a KV-cache prefix (S > T); against the float64 reference (TOL, as for the mma.sync kernel), and
    # against the mma.sync kernel: both round P and the output to the input dtype once, independently,
    # so they differ by about as much as each differs from the reference (the same bound holds).
    q, k, v, mask = make_inputs(20 + D, 2, 4, 2, 333, 400, D, dtype, pads=[0, 400])
    err = run_and_check(q, k, v, mask, dtype, variant=variant)
    mma = _run_variant(DEFAULT_VARIANT[D], q, k, v, mask, dtype)
    got = _run_variant(variant, q, k, v, mask, dtype)
    assert (got[1] == 0).all() and (mma[1] == 0).all()                # the fully padded batch row
    assert _rel(got[0], mma[0]) <= TOL[dtype], f"wgmma vs mma.sync {_rel(got[0], mma[0]):.2e} (ref {err:.2e})"


@hopper
@pytest.mark.parametrize("D, variant", HOPPER_CASES)
def test_hopper_long_and_non_causal(D, variant):
    q, k, v, _ = make_inputs(30 + D, 1, 2, 1, 1000, 1000, D, "bf16")
    run_and_check(q, k, v, None, "bf16", variant=variant)
    q, k, v, mask = make_inputs(31 + D, 2, 2, 2, 70, 300, D, "bf16", pads=[10, 0])
    run_and_check(q, k, v, mask, "bf16", causal=False, variant=variant)


@hopper
@pytest.mark.parametrize("i, D, variant", [(i, D, var) for i, (D, var) in enumerate(HOPPER_CASES)])
def test_hopper_small_cases(i, D, variant):
    # for compute-sanitizer (-k picks variants): one query over a long cache, all-padding rows, GQA,
    # non-causal, each head dim
    for seed, (B, H, KVH, T, S), pads, causal in [
        (40 + i, (2, 4, 1, 1, 130), [0, 129], True),
        (50 + i, (3, 2, 2, 70, 70), [5, 70, 69], True),
        (60 + i, (2, 2, 1, 40, 65), [0, 30], False),
    ]:
        q, k, v, mask = make_inputs(seed, B, H, KVH, T, S, D, "bf16", pads=pads)
        run_and_check(q, k, v, mask, "bf16", causal=causal, variant=variant)


TMA_CASES = [(D, var) for D, var in HOPPER_CASES if flash_hopper.VARIANTS[var][4]]


@hopper
@pytest.mark.parametrize("D, variant", TMA_CASES)
def test_hopper_tma_reads_strided_views(D, variant, monkeypatch):
    # the tensor maps describe what the model passes: q as a view of the [B, T, H, D] projection (head
    # stride D, row stride H D), k and v the first S rows of a longer KV cache whose rows past S are NaN
    # (outside the maps' S rows, so the copy engine zero-fills them instead of reading them), out
    # written through a view; a partial last query block and key tile, GQA, left padding
    B, H, KVH, T, S, max_len = 2, 4, 2, 150, 211, 256
    q, k, v, mask = make_inputs(70 + D, B, H, KVH, T, S, D, "bf16", pads=[0, 37])
    dq = cupy.asarray(np.ascontiguousarray(q.transpose(0, 2, 1, 3))).transpose(0, 2, 1, 3)
    kc = cupy.full((B, KVH, max_len, D), np.nan, dtype=DTYPES["bf16"])
    vc = cupy.full((B, KVH, max_len, D), np.nan, dtype=DTYPES["bf16"])
    kc[:, :, :S], vc[:, :, :S] = cupy.asarray(k), cupy.asarray(v)
    merged = cupy.full((B, T, H, D), np.nan, dtype=DTYPES["bf16"])
    ran, real = [], flash_hopper.get_kernel                 # the TMA kernel ran, not TMA_FALLBACK's
    monkeypatch.setattr(flash_hopper, "get_kernel", lambda kind, D, var: ran.append(var) or real(kind, D, var))
    flash_attention_prefill_variant(variant, dq, kc[:, :, :S], vc[:, :, :S], cupy.asarray(mask),
                                    out=merged.transpose(0, 2, 1, 3))
    assert ran == [variant], f"{variant} fell back to {ran}: no tensor map was made for these views"
    got = cupy.asnumpy(merged).astype(np.float64).transpose(0, 2, 1, 3)
    assert np.isfinite(got).all()
    assert _rel(got, attention_reference(q, k, v, mask)) <= TOL["bf16"]


@hopper
def test_hopper_tma_falls_back_where_no_tensor_map_can_be_made(monkeypatch):
    # an operand the copy engine cannot describe runs TMA_FALLBACK's cp.async variant, same result
    ran = []
    real = flash_hopper.get_kernel
    monkeypatch.setattr(flash_hopper, "tensor_map", lambda *a: None)
    monkeypatch.setattr(flash_hopper, "get_kernel", lambda kind, D, var: ran.append(var) or real(kind, D, var))
    q, k, v, mask = make_inputs(80, 1, 2, 1, 100, 120, 128, "bf16", pads=[5])
    run_and_check(q, k, v, mask, "bf16", variant="h24")
    assert ran == [flash_hopper.TMA_FALLBACK[128]]


@hopper
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.data())
def test_hopper_matches_reference_on_random_shapes(c, data):
    variant = data.draw(st.sampled_from(flash_hopper.CANDIDATES[c["D"]]))
    q, k, v, mask = make_inputs(c["seed"], c["B"], c["H"], c["KVH"], c["T"], c["S"], c["D"],
                                c["dtype"], c["spread"], c["pads"])
    run_and_check(q, k, v, mask, c["dtype"], causal=c["causal"], variant=variant)
