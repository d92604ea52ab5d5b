"""The decode kernels (decode.cu) against their NumPy float64 references, and GpuDecodeEngine against
transformers (float32) on random StableLM models. Needs CuPy and an NVIDIA GPU; skipped otherwise.

Every kernel output is poisoned (NaN) before the launch; the checks require each element that should
be written to be finite and close, and the neighbours that should not be written to stay NaN.
Tolerances: GEMV (float32 accumulation of bf16 products) |err| <= 1e-5 sum_k |x_k w_k|;
bf16 outputs (SwiGLU, LayerNorm, attention) within bf16 rounding (2^-8 relative) plus a small
absolute term; the engine's logits within 2e-2 relative of transformers float32 (see decode_cases.py).
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

cp = pytest.importorskip("cupy")
try:
    _ndev = cp.cuda.runtime.getDeviceCount()
except Exception:  # noqa: BLE001 - no driver, no device
    _ndev = 0
if _ndev == 0:
    pytest.skip("no CUDA device", allow_module_level=True)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stablelm_ref.cuda import decode_engine as de, decode_kernels as kn, specs, xp  # noqa: E402
from stablelm_ref.cuda.decode_kernels import ATT_MAX_CLUSTER  # noqa: E402

pytestmark = pytest.mark.gpu
NAN_BF16 = 0x7FC0
# STABLELM_GPU_EXAMPLES: fewer examples per property under compute-sanitizer (which is slow)
HYP = settings(max_examples=int(os.environ.get("STABLELM_GPU_EXAMPLES", "40")), deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True)


@pytest.fixture(scope="module")
def kernels():
    return kn.DecodeKernels()


def _sync():
    cp.cuda.runtime.deviceSynchronize()


def _bits(a):
    return specs.ref_f64_to_bf16(a)


# ----------------------------------------------------------------------------- GEMV
class _GemvCase:
    """Random bf16 x [nb, K] and W [N, K], the bound sum_k |x_k w_k| the tolerance scales with, and NaN-poisoned
    outputs with one row past the batch (which must stay NaN)."""

    def __init__(self, seed, nb, N, K, mode, with_bias):
        rng = np.random.default_rng(seed)
        self.nb, self.mode = nb, mode
        self.xb = _bits(rng.standard_normal((nb, K)))
        self.Wb = _bits(rng.standard_normal((N, K)) / np.sqrt(K))
        self.x, self.W = specs.ref_bf16_to_f64(self.xb), specs.ref_bf16_to_f64(self.Wb)
        self.bound = np.abs(self.x) @ np.abs(self.W).T                       # sum_k |x_k w_k|
        self.bias = rng.standard_normal(N).astype(np.float32) if (with_bias and mode == kn.MODE_STORE) else None
        self.y0 = rng.standard_normal((nb, N)).astype(np.float32)
        self.yf = self.yh = None
        if mode == kn.MODE_SWIGLU:
            self.yh = cp.full((nb + 1, N // 2), NAN_BF16, cp.uint16)
        else:
            self.yf = cp.full((nb + 1, N), np.nan, cp.float32)
            if mode == kn.MODE_ADD:
                self.yf[:nb] = cp.asarray(self.y0)

    def launch(self, kernels, **shape):           # shape: rows, threads, persist, unroll, stats_out
        return kernels.gemv_launch(cp.asarray(self.xb), cp.asarray(self.Wb), nb=self.nb, mode=self.mode,
                                   yf=self.yf, yh=self.yh,
                                   bias=None if self.bias is None else cp.asarray(self.bias), **shape)

    def check(self, rel=1e-5):
        """Float32 accumulation of exact bf16 products: |err| <= rel sum_k |x_k w_k|, rel 1e-5 for the CUDA-core
        GEMV (K <= 720 terms at 2^-24 each, with room); SwiGLU adds the bf16 rounding of the result."""
        nb, x, W, bound = self.nb, self.x, self.W, self.bound
        ref = specs.ref_gemv(x, W, self.mode, bias=None if self.bias is None else self.bias.astype(np.float64),
                             y0=self.y0)
        if self.mode == kn.MODE_SWIGLU:
            got = specs.ref_bf16_to_f64(cp.asnumpy(self.yh))
            acc = x @ W.T
            gate, up = acc[:, 0::2], acc[:, 1::2]
            silu = gate / (1 + np.exp(-gate))
            # bf16 rounding of the result + float32 accumulation error of gate and up carried through
            tol = (2.0**-8 * np.abs(ref) + rel * (1.1 * np.abs(up) * bound[:, 0::2] + np.abs(silu) * bound[:, 1::2])
                   + 1e-12)
        else:
            got = cp.asnumpy(self.yf).astype(np.float64)
            tol = rel * bound + 1e-6
        assert np.isfinite(got[:nb]).all(), "unwritten output"
        assert np.isnan(got[nb]).all(), "wrote past the batch"
        assert (np.abs(got[:nb] - ref) <= tol).all(), float(np.abs(got[:nb] - ref).max())


@HYP
@given(nb=st.integers(1, 8), N=st.integers(1, 300), kc=st.integers(1, 90), mode=st.sampled_from([0, 1, 2]),
       ri=st.integers(0, 3), threads=st.sampled_from([32, 64, 96, 128, 160, 256, 320, 512]),
       with_bias=st.booleans(), persist=st.sampled_from([0, 0, 1, 2]), seed=st.integers(0, 2**31 - 1))
def test_gemv_matches_float64(kernels, nb, N, kc, mode, ri, threads, with_bias, persist, seed):
    """persist > 0: fewer blocks than row groups (up to ~2 groups a block here), each looping over its groups."""
    if mode == kn.MODE_SWIGLU:
        N += N % 2
    rows = [r for r in kn.GEMV_ROWS if not (nb > 4 and r == 8) and not (mode == kn.MODE_SWIGLU and r % 2)]
    case = _GemvCase(seed, nb, N, 8 * kc, mode, with_bias)
    case.launch(kernels, rows=rows[ri % len(rows)], threads=threads, persist=persist)()
    _sync()
    case.check()


@HYP
@given(nb=st.integers(1, 8), N=st.integers(1, 300), kc=st.integers(1, 90), mode=st.sampled_from([0, 1, 2]),
       variant=st.sampled_from(kn.GEMV_MMA), threads=st.sampled_from([32, 64, 128, 256, 512]),
       with_bias=st.booleans(), persist=st.sampled_from([0, 0, 1, 2]), seed=st.integers(0, 2**31 - 1))
def test_gemv_mma_matches_float64(kernels, nb, N, kc, mode, variant, threads, with_bias, persist, seed):
    """The tensor-core GEMV (gemv_mma) against the same spec. N not a multiple of the 16-row tile and K not of
    the 32-wide k step exercise the edges; persist > 0 loops a block over several tile groups.
    Tolerance: the products are exact in float32; the tensor cores add each mma's 16 products to the
    accumulator after aligning them to the largest, truncating (not rounding) the bits below float32's 24
    (Fasi et al., "Numerical behavior of NVIDIA tensor cores", 2021, on V100-A100; Hopper assumed no worse):
    at most 17 terms x 2^-23 of the largest, <= 2^-19 sum_k |x_k w_k| an mma. An output is the sum of
    2 ceil(steps / warps) mmas in a chain and of one partial a warp: rel = 2^-19 (2 ceil(KS / NW) + NW).
    A wrong k slot, row or batch column errs by O(|y|), far above it (|y| ~ sum |x w| / sqrt(K) here)."""
    if mode == kn.MODE_SWIGLU:
        N += N % 2
    tiles, unroll = variant
    case = _GemvCase(seed, nb, N, 8 * kc, mode, with_bias)
    case.launch(kernels, rows=16 * tiles, threads=threads, persist=persist, unroll=unroll)()
    _sync()
    nw, ks = threads // 32, -(-kc // 4)
    case.check(rel=2.0**-19 * (2 * -(-ks // nw) + nw))


@HYP
@given(nb=st.integers(1, 8), N=st.integers(1, 300), kc=st.integers(1, 90), ri=st.integers(0, 3),
       threads=st.sampled_from([32, 96, 128, 256, 512]), persist=st.sampled_from([0, 0, 1, 2]),
       seed=st.integers(0, 2**31 - 1))
def test_gemv_add_accumulates_row_statistics(kernels, nb, N, kc, ri, threads, persist, seed):
    """MODE_ADD with stats_out: the new rows as before, and stats_out[b] += (sum_n y[b, n], sum_n y[b, n]^2) of
    the float32 outputs, in float64 (<= 300 float32 terms: float64 sums err <= 300 * 2^-53 of the sum of
    magnitudes; 1e-12 relative has room); the row past the batch untouched."""
    rows = [r for r in kn.GEMV_ROWS if not (nb > 4 and r == 8)]
    case = _GemvCase(seed, nb, N, 8 * kc, kn.MODE_ADD, False)
    s0 = np.random.default_rng(seed + 1).standard_normal((nb + 1, 2)) * 10
    stats = cp.asarray(s0)
    case.launch(kernels, rows=rows[ri % len(rows)], threads=threads, persist=persist, stats_out=stats)()
    _sync()
    case.check()
    y = cp.asnumpy(case.yf[:nb]).astype(np.float64)
    got, want = cp.asnumpy(stats), s0[:nb] + specs.ref_row_stats(y)
    scale = np.abs(s0[:nb]) + specs.ref_row_stats(np.abs(y))
    assert np.array_equal(got[nb], s0[nb]), "wrote past the batch"
    assert (np.abs(got[:nb] - want) <= 1e-12 * scale).all(), np.abs(got[:nb] - want).max()


@HYP
@given(N=st.integers(1, 300), kc=st.integers(1, 90), mode=st.sampled_from([0, 2]), ri=st.integers(0, 3),
       threads=st.sampled_from([32, 96, 128, 256, 512]), persist=st.sampled_from([0, 0, 1, 2]),
       offset=st.sampled_from([0.0, 30.0]), seed=st.integers(0, 2**31 - 1))
def test_gemv_with_folded_layernorm_matches_float64(kernels, N, kc, mode, ri, threads, persist, offset, seed):
    """gemv_ln_b1: the product with LayerNorm(x), its mean and variance from (sum x, sum x^2), against
    ref_gemv(bf16(ref_layernorm_from_stats(x)), W). The kernel normalises in float32 (mean, rstd from the
    float64 statistics) and rounds to bf16 like layernorm_rows: an element within ~1e-6 relative of a bf16
    rounding boundary may land on the other side, one bf16 step (<= 2^-7 |h_k|). Tolerance: the GEMV's
    1e-5 sum_k |h_k w_k| plus two such steps, 2 * 2^-7 max_k |h_k w_k|."""
    if mode == kn.MODE_SWIGLU:
        N += N % 2
    K = 8 * kc
    rows = [r for r in kn.GEMV_ROWS if not (mode == kn.MODE_SWIGLU and r % 2)]
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((1, K)) * rng.uniform(0.1, 10) + offset).astype(np.float32)
    w = (1 + 0.2 * rng.standard_normal(K)).astype(np.float32)
    b = (0.2 * rng.standard_normal(K)).astype(np.float32)
    stats = specs.ref_row_stats(x)
    Wb = _bits(rng.standard_normal((N, K)) / np.sqrt(K))
    W = specs.ref_bf16_to_f64(Wb)
    h = specs.ref_round_bf16(specs.ref_layernorm_from_stats(x, w, b, stats, 1e-5))
    acc = h @ W.T
    bound, step = np.abs(h) @ np.abs(W).T, 2 * 2.0**-7 * (np.abs(h)[:, None, :] * np.abs(W)[None]).max(-1)
    out = dict(yh=cp.full((2, N // 2), NAN_BF16, cp.uint16)) if mode == kn.MODE_SWIGLU else \
        dict(yf=cp.full((2, N), np.nan, cp.float32))
    kernels.gemv_launch(cp.asarray(x), cp.asarray(Wb), nb=1, mode=mode, rows=rows[ri % len(rows)], threads=threads,
                        persist=persist, ln=(cp.asarray(w), cp.asarray(b), cp.asarray(stats), 1e-5), **out)()
    _sync()
    if mode == kn.MODE_SWIGLU:
        got = specs.ref_bf16_to_f64(cp.asnumpy(out["yh"]))
        gate, up = acc[:, 0::2], acc[:, 1::2]
        ref = specs.ref_gemv(h, W, mode)
        silu = gate / (1 + np.exp(-gate))
        e = 1e-5 * bound + step                                          # per accumulated row
        eg, eu = e[:, 0::2], e[:, 1::2]                                  # silu' <= 1.1
        tol = 2.0**-8 * np.abs(ref) + 1.1 * np.abs(up) * eg + (np.abs(silu) + 1.1 * eg) * eu + 1e-12
    else:
        got = cp.asnumpy(out["yf"]).astype(np.float64)
        ref, tol = acc, 1e-5 * bound + step + 1e-6
    assert np.isfinite(got[:1]).all() and np.isnan(got[1]).all()
    assert (np.abs(got[:1] - ref) <= tol).all(), float(np.abs(got[:1] - ref).max())


# ----------------------------------------------------------------------------- LayerNorm
@HYP
@given(nb=st.integers(1, 8), K=st.one_of(st.integers(1, 3000), st.integers(1000, 2500).map(lambda k: 4 * k)),
       offset=st.sampled_from([0.0, 30.0]),
       seed=st.integers(0, 2**31 - 1))
def test_layernorm_matches_float64(kernels, nb, K, offset, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((nb, K)) * rng.uniform(0.1, 10) + offset).astype(np.float32)
    w = (1 + 0.2 * rng.standard_normal(K)).astype(np.float32)
    b = (0.2 * rng.standard_normal(K)).astype(np.float32)
    y = cp.full((nb + 1, K), NAN_BF16, cp.uint16)
    kernels.layernorm_launch(cp.asarray(x), cp.asarray(w), cp.asarray(b), y, nb=nb, eps=1e-5)()
    _sync()
    got = specs.ref_bf16_to_f64(cp.asnumpy(y))
    ref = specs.ref_layernorm(x, w, b, 1e-5)
    assert np.isnan(got[nb]).all()
    assert (np.abs(got[:nb] - ref) <= 2.0**-8 * np.abs(ref) + 1e-4 * (np.abs(w) + 1)).all()


# ----------------------------------------------------------------------------- decode attention
@HYP
@given(D=st.sampled_from(kn.ATT_DIMS), KVH=st.sampled_from([1, 2, 4]), G=st.sampled_from([1, 2, 4, 8, 12]),
       nb=st.integers(1, 4), L=st.integers(0, 300), extra=st.integers(1, 40), qk=st.booleans(),
       rot_frac=st.sampled_from([0.0, 0.25, 0.5, 1.0]), nsplit=st.integers(1, 12),
       shape=st.sampled_from(kn.ATT_SHAPES + ((8, 1), (3, 2), (8, 3))), cluster=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_decode_attention_matches_float64(kernels, D, KVH, G, nb, L, extra, qk, rot_frac, nsplit, shape, cluster,
                                          seed):
    """Every (split_tiles, nbuf): the tuner's shapes, and splits of more tiles than buffers (each warp refills
    its rows of a buffer as it goes) at up to 12 splits of up to 300 keys; the splits combined through global
    memory, or (cluster, up to 8 splits) in the first split's shared memory. G <= 8 query heads a kv head run
    the tiles on tensor cores (q and p as bf16 + remainder: their error stays far inside the bound), G = 12 the
    float32 loop."""
    H, max_len = KVH * G, L + extra
    split_tiles, nbuf = shape
    rot = int(D * rot_frac) // 2 * 2
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((nb, (H + 2 * KVH) * D)).astype(np.float32)
    qkv[:, : H * D] *= 2.0                                                  # sharper attention
    kb = _bits(rng.standard_normal((nb, KVH, max_len, D)))
    vb = _bits(rng.standard_normal((nb, KVH, max_len, D)))
    kmask = np.ones((nb, max_len), np.uint8)
    for b in range(nb):                                                     # left padding, NaN in pad slots
        p = int(rng.integers(0, L + 1))
        kmask[b, :p] = 0
        kb[b, :, :p] = NAN_BF16
        vb[b, :, :p] = NAN_BF16
    pos = rng.integers(0, 4096, nb).astype(np.int32)
    inv_freq = de.rotary_inv_freq(10000.0, rot) if rot else np.zeros(1, np.float32)
    qn = (1 + 0.1 * rng.standard_normal((H, D))).astype(np.float32) if qk else None
    kn = (1 + 0.1 * rng.standard_normal((KVH, D))).astype(np.float32) if qk else None
    kc, vc = cp.asarray(kb), cp.asarray(vb)
    out = cp.full((nb, H * D), NAN_BF16, cp.uint16)
    counters = cp.zeros(nb * KVH, cp.int32)
    launch = kernels.attention_launch(
        cp.asarray(qkv), kc, vc, cp.asarray(np.array([L], np.int32)), cp.asarray(pos), cp.asarray(kmask),
        cp.asarray(inv_freq), rot, nb=nb, H=H, KVH=KVH, D=D, out=out,
        part_o=cp.full((nb, H, nsplit, D), np.nan, cp.float32), part_ml=cp.full((nb, H, nsplit, 2), np.nan, cp.float32),
        counters=counters, nsplit=nsplit, qn_w=None if qn is None else cp.asarray(qn),
        kn_w=None if kn is None else cp.asarray(kn), eps=1e-5, split_tiles=split_tiles, nbuf=nbuf, cluster=cluster)
    assert launch.cluster == (nsplit if cluster and 1 < nsplit <= ATT_MAX_CLUSTER else 0)
    launch()
    _sync()
    _, k_new, v_new = specs.ref_decode_attention(qkv, specs.ref_bf16_to_f64(kb), specs.ref_bf16_to_f64(vb), L, pos, kmask,
                                              inv_freq, rot, H, KVH, D, qn=qn, kn=kn, eps=1e-5)
    # the new k/v landed at cache[L] (k within one bf16 step: float32 vs float64 before rounding)
    kc_h, vc_h = cp.asnumpy(kc), cp.asnumpy(vc)
    kl, vl = specs.ref_bf16_to_f64(kc_h[:, :, L]), specs.ref_bf16_to_f64(vc_h[:, :, L])
    assert (np.abs(kl - k_new) <= 2.0**-7 * np.abs(k_new) + 1e-6).all()
    assert np.array_equal(vl, v_new)
    # attention against the reference that uses the kernel's rounded k (no rounding-boundary flakiness)
    ref, _, _ = specs.ref_decode_attention(qkv, specs.ref_bf16_to_f64(kb), specs.ref_bf16_to_f64(vb), L, pos, kmask,
                                        inv_freq, rot, H, KVH, D, qn=qn, kn=kn, eps=1e-5, k_new=kl)
    got = specs.ref_bf16_to_f64(cp.asnumpy(out))
    assert np.isfinite(got).all(), "unwritten or NaN output"
    assert (np.abs(got - ref) <= 2.0**-8 * np.abs(ref) + 1e-3).all(), float(np.abs(got - ref).max())
    keep = np.ones(max_len, bool)
    keep[L] = False
    assert np.array_equal(kc_h[:, :, keep], kb[:, :, keep]) and np.array_equal(vc_h[:, :, keep], vb[:, :, keep])
    assert not cp.asnumpy(counters).any(), "split counters must be reset for the next launch"
    first = cp.asnumpy(out)
    launch()                                                                # replay: same bits
    _sync()
    assert np.array_equal(first, cp.asnumpy(out))


@pytest.mark.parametrize("D,KVH,G,nb,L,nsplit", [(80, 4, 1, 1, 200, 5), (64, 2, 1, 2, 129, 5), (160, 2, 4, 1, 300, 8),
                                                 (128, 1, 2, 1, 40, 6), (96, 2, 2, 3, 500, 2)])
def test_attention_cluster_combine_equals_global_combine(kernels, D, KVH, G, nb, L, nsplit):
    """The splits of a kv head as one cluster, combined in the first split's shared memory, give the same bits
    as the global-memory combine (the same arithmetic in the same order of splits), with splits left idle
    (129 keys over 5 splits: 3 live; 40 keys: 1 live, no combine) and twice in a row (the cluster barriers'
    phases and the global path's counters both start clean at the next launch)."""
    if kernels.attention_cluster(nsplit) == 0:
        pytest.skip(f"no thread-block clusters on {kernels.device_name} (compute capability < 9.0)")
    H, max_len = KVH * G, L + 9
    rng = np.random.default_rng(D + L)
    qkv = cp.asarray(rng.standard_normal((nb, (H + 2 * KVH) * D)).astype(np.float32) * 2)
    kb, vb = _bits(rng.standard_normal((nb, KVH, max_len, D))), _bits(rng.standard_normal((nb, KVH, max_len, D)))
    kmask = cp.ones((nb, max_len), cp.uint8)
    pos, inv_freq = cp.asarray(np.full(nb, L, np.int32)), cp.asarray(de.rotary_inv_freq(10000.0, D // 4))
    outs = {}
    for cluster in (False, True):
        out = cp.full((nb, H * D), NAN_BF16, cp.uint16)
        kc, vc = cp.asarray(kb), cp.asarray(vb)
        counters = cp.zeros(nb * KVH, cp.int32)
        launch = kernels.attention_launch(
            qkv, kc, vc, cp.asarray(np.array([L], np.int32)), pos, kmask, inv_freq, D // 4, nb=nb, H=H, KVH=KVH,
            D=D, out=out, part_o=cp.full((nb, H, nsplit, D), np.nan, cp.float32),
            part_ml=cp.full((nb, H, nsplit, 2), np.nan, cp.float32), counters=counters, nsplit=nsplit,
            cluster=cluster)
        assert launch.cluster == (nsplit if cluster else 0)
        launch()
        _sync()
        first = cp.asnumpy(out)
        launch()
        _sync()
        assert np.array_equal(first, cp.asnumpy(out))
        assert not cp.asnumpy(counters).any()
        outs[cluster] = (first, cp.asnumpy(kc), cp.asnumpy(vc))
    assert np.isfinite(specs.ref_bf16_to_f64(outs[True][0])).all()
    for a, b in zip(outs[False], outs[True]):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("hidden", [2048, 2560, 5120, 1000, 1002, 9000])
def test_embed_rows_gathers_and_sums(kernels, hidden):
    """x = E[tok] exactly (bf16 -> float32 is exact) and (sum x, sum x^2) of each row against numpy's float64
    sums (the kernel sums float64 too, in another order: 1e-12 relative is 10^3 double roundings of headroom);
    the later statistics instances zeroed. 2048 / 2560 / 5120: the family's widths (the 16-byte path); 1002 and
    9000 take the 2-byte loop (not a multiple of 8; wider than 8 EMBED_MAXC x 256)."""
    rng = np.random.default_rng(hidden)
    nb, vocab = 3, 50
    E = rng.standard_normal((vocab, hidden)).astype(np.float32)
    Eb = cp.asarray(specs.ref_f64_to_bf16(E))
    tok = cp.asarray(np.array([7, 0, vocab - 1], np.int32))
    x = cp.full((nb + 1, hidden), -1.0, cp.float32)
    stats = cp.full((3, nb + 1, 2), 5.0, cp.float64)
    kernels.embed_launch(tok, Eb, x, nb=nb, stats=stats)()
    _sync()
    want = specs.ref_bf16_to_f64(cp.asnumpy(Eb))[[7, 0, vocab - 1]]
    got = cp.asnumpy(x)
    assert np.array_equal(got[:nb], want.astype(np.float32)) and (got[nb] == -1).all()
    st = cp.asnumpy(stats)
    np.testing.assert_allclose(st[0, :nb, 0], want.sum(1), rtol=1e-12, atol=1e-12 * hidden)
    np.testing.assert_allclose(st[0, :nb, 1], (want * want).sum(1), rtol=1e-12)
    assert (st[1:, :nb] == 0).all() and (st[:, nb] == 5.0).all()


@pytest.mark.parametrize("cluster", [False, True])
@pytest.mark.parametrize("V", [5000, 5003, 50304, 100352])
def test_argmax_step_bookkeeping(kernels, V, cluster):
    """5000: one round of loads; 50304 / 100352 (the family's vocabularies): 2 and 4 rounds of ARGMAX_INFLIGHT
    float4 a thread in one block, the maximum and a tie placed in later rounds; 5003: the scalar path. cluster:
    each row read by a cluster of blocks that combine in the first's shared memory (ties across blocks)."""
    if cluster and kernels.argmax_cluster() == 0:
        pytest.skip(f"no thread-block clusters on {kernels.device_name} (compute capability < 9.0)")
    rng = np.random.default_rng(V)
    nb = 3
    logits = rng.standard_normal((nb, V)).astype(np.float32)
    logits[1, [17, 4000]] = 50.0                                            # tie: lowest index wins
    logits[0, [V - 2, V - 1]] = 60.0                                        # tie in the last round
    if V > 40000:
        logits[1, 40000] = 50.0                                             # tie with a later round
    logits[2, 321] = np.inf                                                 # flagged (and picked, as numpy)
    tok, pos = cp.zeros(nb, cp.int32), cp.asarray(np.array([5, 9, 2], np.int32))
    history = cp.full((6, 4), -1, cp.int32)
    step, length, counter = cp.asarray(np.array([2], np.int32)), cp.asarray(np.array([40], np.int32)), cp.zeros(1, cp.int32)
    bad = cp.full(nb + 1, 7, cp.int32)
    mapped = xp.mapped_host(cp, (kn.PICK_RING, 3, 4), np.int32)            # the picks' host ring
    assert mapped is not None, "no mapped pinned memory: generate would copy the picks in the stream"
    ring_host, ring = mapped
    ring_host[...] = -5
    launch = kernels.argmax_launch(cp.asarray(logits), tok, history, step, length, pos, counter, nb=nb, bad=bad,
                                   ring=ring, cluster=cluster)
    assert launch.grid == ((kn.ARGMAX_CLUSTER, nb) if cluster else (1, nb))
    launch()
    _sync()
    assert cp.asnumpy(bad).tolist() == [0, 0, 1, 7]
    slot = ring_host[2 % kn.PICK_RING]                                      # step 2's slot: picks, flags, step
    assert slot[0, :nb].tolist() == np.argmax(logits, axis=1).tolist() and slot[1, :nb].tolist() == [0, 0, 1]
    assert (slot[2, :nb] == 2).all() and (slot[:, nb:] == -5).all() and (np.delete(ring_host, 2, 0) == -5).all()
    want = np.argmax(logits, axis=1)
    assert want[1] == 17
    assert np.array_equal(cp.asnumpy(tok), want)
    h = cp.asnumpy(history)
    assert np.array_equal(h[2, :nb], want) and (h[2, nb:] == -1).all() and (np.delete(h, 2, 0) == -1).all()
    assert cp.asnumpy(pos).tolist() == [6, 10, 3]
    assert int(step[0]) == 3 and int(length[0]) == 41 and int(counter[0]) == 0


# ----------------------------------------------------------------------------- the engine vs transformers
pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parents[1]))
from decode_cases import CONFIGS, left_padded_batch, make_model, run_engine_against_transformers  # noqa: E402


@pytest.mark.parametrize("name", list(CONFIGS))
def test_engine_matches_transformers(kernels, name):
    engine, e_pre, e_dec, agree = run_engine_against_transformers(name, kernels=kernels, autotune=True)
    print(f"{name}: prefill rel err {e_pre:.2e}, decode rel err {e_dec:.2e}, argmax agreement {agree:.3f}")
    assert agree >= 0.9


@pytest.mark.parametrize("name", [n for n in CONFIGS if "parallel" not in n])
def test_engine_batch1_with_folded_layernorms_matches_transformers(kernels, name):
    """Batch 1 (sequential residual) folds the layers' LayerNorms into the GEMVs that read them (gemv_ln_b1,
    statistics from embed_rows and the residual-add GEMVs): the same bounds against transformers float32."""
    engine, e_pre, e_dec, agree = run_engine_against_transformers(name, kernels=kernels, lengths=(9,))
    print(f"{name}, batch 1 folded: prefill rel err {e_pre:.2e}, decode rel err {e_dec:.2e}, agreement {agree:.3f}")
    assert engine.folds_layernorm(1) and "layernorm" not in {fn.tag for fn in engine._plan(1)[:-3]}
    assert agree >= 0.9


def test_engine_batch3_and_graph_equals_eager(kernels):
    name = "GQA + qk LayerNorm + parallel residual, D=160"
    a = run_engine_against_transformers(name, kernels=kernels, autotune=False, lengths=(9, 4, 12), steps=4)[0]
    b = run_engine_against_transformers(name, kernels=kernels, autotune=False, lengths=(9, 4, 12), steps=4,
                                        use_graph=False)[0]
    assert np.array_equal(a.generated(), b.generated())
    assert np.array_equal(a.get_logits(), b.get_logits())


def test_engine_pdl_graph_equals_plain_graph(kernels):
    """The graph captured with programmatic dependent launches computes exactly what the plain one does."""
    cfg, params, _ = make_model(CONFIGS["GQA + qk LayerNorm + parallel residual, D=160"])
    ids, mask = left_padded_batch(np.random.default_rng(5), cfg.vocab_size, [11, 6])
    runs = []
    for pdl in (False, True):
        e = de.GpuDecodeEngine(cfg, params, max_batch=2, max_len=32, kernels=kernels, autotune=False, pdl=pdl)
        e.prefill(ids, mask, logits=None)
        for _ in range(8):
            e.decode_step()
        runs.append((e.generated(), e.get_logits(), e.pdl, e.pdl_error))
    assert runs[1][2], f"PDL capture fell back to plain launches: {runs[1][3]}"
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])


def test_engine_cluster_combine_equals_global_combine(kernels):
    """The engine's step with its attention splits as clusters (the default where the GPU has them) computes
    exactly what it computes with the global-memory combine: a prompt long enough for several live splits,
    graph (PDL) and eager, at batch 2 and batch 1 (the folded LayerNorms)."""
    if kernels.attention_cluster(2) == 0:
        pytest.skip(f"no thread-block clusters on {kernels.device_name} (compute capability < 9.0)")
    cfg, params, _ = make_model(CONFIGS["GQA + qk LayerNorm + parallel residual, D=160"])
    for lengths in ([150, 131], [200]):
        ids, mask = left_padded_batch(np.random.default_rng(6), cfg.vocab_size, lengths)
        runs = []
        for cluster, graph in ((False, True), (True, True), (True, False)):
            e = de.GpuDecodeEngine(cfg, params, max_batch=2, max_len=256, kernels=kernels, autotune=False, pdl=True)
            e.att_cluster = cluster
            e.prefill(ids, mask, logits=None)
            for _ in range(6):
                e.decode_step(use_graph=graph)
            attn = [fn for fn in e._plan(len(lengths)) if fn.tag == "attention"]
            assert all(fn.cluster == (fn.grid[0] if cluster else 0) for fn in attn) and attn[0].grid[0] > 1
            runs.append((e.generated(), e.get_logits()))
        for r in runs[1:]:
            assert np.array_equal(runs[0][0], r[0]) and np.array_equal(runs[0][1], r[1])


def test_engine_attention_grid_fitted_to_the_keys_equals_the_full_grid(kernels):
    """att_fit (each step's attention launches the splits its cached keys need, a graph a count) computes exactly
    what the grid for max_len does, batch 1 and 2, over lengths that cross two tile boundaries; and a graph
    captured with 2 splits, replayed past the lengths it was captured for, gives the same tokens and logits
    within float32 rounding (each split takes more tiles)."""
    cfg, params, _ = make_model(CONFIGS["3b-like MHA, D=80"])
    for lengths in ([100, 70], [110]):
        ids, mask = left_padded_batch(np.random.default_rng(8), cfg.vocab_size, lengths)
        runs = []
        for fit in (False, True):
            e = de.GpuDecodeEngine(cfg, params, max_batch=2, max_len=448, kernels=kernels, autotune=False, pdl=True)
            e.att_fit = fit
            e.prefill(ids, mask, logits=None)
            for _ in range(40):
                e.decode_step()
            runs.append((e.generated(), e.get_logits(), {key[-1] for key in e._graphs}))
        assert runs[0][2] == {7} and runs[1][2] == {2, 3}
        assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])
    e.prefill(ids, mask, logits=None)
    g = e.capture(1)                                                   # 2 splits for 111 keys, replayed to 150
    assert {fn.grid[0] for fn in e._plan(1) if fn.tag == "attention"} == {2}
    for _ in range(40):
        g.launch(e.stream)
    assert np.array_equal(e.cp.asnumpy(e.history[:41, :1]).T, runs[0][0])
    # Not bit for bit past this point: a split that takes two tiles adds the second tile's p V into its running
    # output inside the tensor core, where two splits of one tile each are added by the combine's float32 fma;
    # both are float32 sums of the same terms, so the logits agree to float32 rounding carried through a bf16
    # model (the step kernel's bound against the per-layer step, 1e-2 of their scale).
    got, want = e.get_logits(), runs[0][1]
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()


def test_engine_reads_its_tuning_back_from_disk(kernels, monkeypatch, tmp_path):
    """The tuner's choice kept in STABLELM_REF_TUNE_CACHE is what the next engine of the same shapes runs with,
    without timing anything; the tokens are the same."""
    monkeypatch.setenv("STABLELM_REF_TUNE_CACHE", str(tmp_path))
    cfg, params, _ = make_model(CONFIGS["3b-like MHA, D=80"])
    ids, mask = left_padded_batch(np.random.default_rng(7), cfg.vocab_size, [13])
    runs = []
    for _ in range(2):
        e = de.GpuDecodeEngine(cfg, params, max_batch=1, max_len=32, kernels=kernels, autotune=True)
        e.prefill(ids, mask, logits=None)
        for _ in range(4):
            e.decode_step()
        runs.append((e, {entry[0] for entry in e.tune_log}))
    (a, first), (b, second) = runs
    assert "alone" in first and second == {"cache"} and len(list(tmp_path.iterdir())) == 1
    assert a.tuning == b.tuning and a.att_shape == b.att_shape
    assert np.array_equal(a.generated(), b.generated())


# ----------------------------------------------------------------------------- sampling in the step
def _run_sampler(kernels, logits, present, settings, u):
    nb, V = logits.shape
    tok, pos = cp.zeros(nb, cp.int32), cp.zeros(nb, cp.int32)
    history = cp.full((3, nb), -1, cp.int32)
    step, length, counter = cp.asarray(np.array([1], np.int32)), cp.asarray(np.array([7], np.int32)), cp.zeros(1, cp.int32)
    pres = None if present is None else cp.asarray(present)
    bad = cp.full(nb + 1, 7, cp.int32)
    table = np.full((3, nb), 0.5)                   # the draws by step: the kernels must read row step = 1
    table[1], table[2] = u, 1 - np.asarray(u)
    launches = kernels.sample_launch(cp.asarray(logits), pres, cp.asarray(table), tok, history, step, length, pos,
                                     counter, nb=nb, settings=settings, bad=bad)
    for launch in launches:
        launch()
    _sync()
    flags = cp.asnumpy(bad)
    assert flags[nb] == 7, "wrote past the batch"
    got = cp.asnumpy(tok).astype(np.int64)
    assert np.array_equal(cp.asnumpy(history)[1], got) and (cp.asnumpy(pos) == 1).all()
    assert int(step[0]) == 2 and int(length[0]) == 8 and int(counter[0]) == 0
    if pres is not None:
        after = cp.asnumpy(pres)
        assert after[np.arange(nb), got].all() and (after.sum(1) <= present.sum(1) + 1).all()
    return got, flags[:nb]


@HYP
@given(nb=st.integers(1, 8), V=st.one_of(st.integers(2, 3000), st.sampled_from([50304, 100352])),
       do_sample=st.booleans(), temperature=st.sampled_from([0.3, 0.8, 1.0, 1.7]),
       top_k=st.sampled_from([0, 1, 2, 50, 1024, 10**6]), top_p=st.sampled_from([1.0, 0.9, 0.5, 0.05]),
       penalty=st.sampled_from([1.0, 1.3, 0.7]), ties=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_sample_step_matches_generate_processors(kernels, nb, V, do_sample, temperature, top_k, top_p, penalty,
                                                 ties, seed):
    """sample_step's pick equals generation.py's processors + sampler (specs.ref_sample_step) for the same
    logits and draws. The float32 top-p sums and float64 cdf differ from NumPy's only in summation order: a
    pick could differ only for a draw within ~1e-12 of a cdf boundary (or a cumulative probability within
    ~1e-7 of 1 - top_p), which these examples do not hit."""
    settings = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=penalty)
    if not kn.DecodeKernels.sampler_covers(settings, V):
        return                                                  # the loop processes these on CuPy
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((nb, V)) * 3).astype(np.float32)
    if ties:
        logits = np.round(logits * 2) / 2                       # many equal values: top-k ties, sort order
    present = (rng.random((nb, V)) < 0.05).astype(np.uint8) if penalty != 1.0 else None
    u = rng.random(nb)
    got, flags = _run_sampler(kernels, logits, present, settings, u)
    want = specs.ref_sample_step(logits, present, settings, u)
    assert np.array_equal(got, want), (got, want)
    assert not flags.any()                                      # finite logits: no row flagged


@pytest.mark.parametrize("settings", [dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9),
                                      dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0),
                                      dict(do_sample=False, temperature=1.0, top_k=0, top_p=1.0)])
def test_sampler_flags_non_finite_logits(kernels, settings):
    """Rows whose logits hold NaN or Inf are flagged (the loop then stops with the first non-finite
    intermediate); the others are not, and every row is still picked (the bookkeeping runs)."""
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((3, 50304)).astype(np.float32)
    logits[0, 9] = np.nan
    logits[2, 50000] = -np.inf
    settings = dict(settings, repetition_penalty=1.3 if not settings["do_sample"] else 1.0)
    present = np.zeros((3, 50304), np.uint8) if not settings["do_sample"] else None
    _, flags = _run_sampler(kernels, logits, present, settings, rng.random(3))
    assert flags.tolist() == [1, 0, 1]

