"""The whole-step decode kernel (decode_step.cu, batch 1) against the per-layer step and transformers.

Both steps compute the same function with the same roundings (bf16 h, att, mlp; float32 x, qkv, logits):
only the order of the float32 sums differs (a row over one warp's 32 lanes against gemv_impl's chunks;
LayerNorm statistics two-pass in float32 against the folded (sum, sum of squares) in float64; the attention's
keys in parts of whole 32-key chunks, one warp a part, against 4 warps of 16-key tiles). A different float32 sum can
move a bf16 rounding by one unit (2^-8 relative) in an activation; through the following GEMVs that is ~1e-3
relative on the logits (the per-layer step's own distance to transformers float32 is ~3e-3, decode_cases.py).
So: logits within 1e-2 relative of the per-layer step's at every step, and the greedy tokens equal wherever
the per-layer logits' top-2 margin exceeds twice the largest difference (the steps stop being comparable
once a token differs: later inputs differ). The kernel itself is deterministic: eager and graph replays
are bit-identical.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")          # (conftest.py collects this folder only where CuPy sees a CUDA device)
pytest.importorskip("transformers")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stablelm_ref.cuda import decode_engine as de, decode_kernels as kn  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1]))
from decode_cases import CONFIGS, make_model, rel_err, run_engine_against_transformers  # noqa: E402

pytestmark = pytest.mark.gpu
# STABLELM_GPU_EXAMPLES: fewer examples under compute-sanitizer (each builds two engines and a model)
ODD = settings(max_examples=int(os.environ.get("STABLELM_GPU_EXAMPLES", "12")), deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def kernels():
    k = kn.DecodeKernels()
    if k.compute_capability < 90:
        pytest.skip("the whole-step kernel needs sm_90 (bulk copies, mbarriers)")
    return k


def _steps(cfg, params, kernels, ids, mask, steps, megakernel, max_len=32, use_graph=True, shape=None):
    """Prefill, then `steps` decode steps at batch 1: (tokens [steps + 1], logits [steps, V])."""
    engine = de.GpuDecodeEngine(cfg, params, max_batch=1, max_len=max_len, kernels=kernels, autotune=False)
    engine.megakernel = megakernel
    engine.step_shape = shape or engine.step_shape
    engine.prefill(ids, mask, logits=None)
    logits = []
    for _ in range(steps):
        engine.decode_step(use_graph=use_graph)
        logits.append(engine.get_logits()[0])
    assert engine.uses_step_kernel(1) == bool(megakernel)
    return engine.generated()[0], np.stack(logits)


def _compare(name, cfg, params, kernels, ids, mask, steps, max_len=32, tol=1e-2):
    """The whole-step kernel against the per-layer step (see the module docstring). Returns the largest
    relative difference over the steps both took with the same inputs."""
    tok_a, lg_a = _steps(cfg, params, kernels, ids, mask, steps, True, max_len)
    tok_b, lg_b = _steps(cfg, params, kernels, ids, mask, steps, False, max_len)
    assert tok_a[0] == tok_b[0]                                   # the shared prefill's pick
    worst = 0.0
    for s in range(steps):
        err = rel_err(lg_a[s], lg_b[s])
        worst = max(worst, err)
        assert err < tol, (name, s, err)
        assert tok_a[s + 1] == np.argmax(lg_a[s]) and tok_b[s + 1] == np.argmax(lg_b[s])
        if tok_a[s + 1] != tok_b[s + 1]:
            top2 = np.sort(lg_b[s])[-2:]
            assert top2[1] - top2[0] <= 2 * np.abs(lg_a[s] - lg_b[s]).max(), (name, s)
            break
    return worst


@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_kernel_matches_transformers(kernels, name):
    """decode_cases' bound against transformers float32 (2e-2 relative; every decided greedy pick agrees:
    check_argmax), 6 steps. The share of all picks that agree counts near-ties too: at batch 1 there are 7
    picks, and one near-tie is 0.857 (the per-layer step shows the same on these models), hence >= 0.7."""
    engine, e_pre, e_dec, agree = run_engine_against_transformers(name, kernels=kernels, lengths=(9,), megakernel=True)
    print(f"{name}, whole-step kernel: decode rel err {e_dec:.2e}, agreement {agree:.3f}")
    assert engine.uses_step_kernel(1) and [fn.tag for fn in engine._plan(1)] == ["embed", "step", "argmax"]
    assert agree >= 0.7


@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_kernel_matches_the_per_layer_step(kernels, name):
    """8 steps from a left-padded prompt (3 pad positions, masked in every step's attention)."""
    cfg, params, _ = make_model(CONFIGS[name])
    rng = np.random.default_rng(2)
    ids = rng.integers(2, cfg.vocab_size, (1, 12))
    mask = np.ones((1, 12), np.int64)
    mask[0, :3] = 0
    worst = _compare(name, cfg, params, kernels, ids, mask, 8)
    print(f"{name}: whole-step kernel vs per-layer step, largest relative difference {worst:.2e}")


def test_step_kernel_long_cache_and_eager_equals_graph(kernels):
    """A cache of 600 keys (split into several parts of 32-key chunks, a warp each, combined in o_proj's
    staging; 40 masked pad positions), GQA + qk LayerNorm + parallel residual; eager launches and graph replays
    bit-identical."""
    name = "GQA + qk LayerNorm + parallel residual, D=160"
    cfg, params, _ = make_model(CONFIGS[name])
    rng = np.random.default_rng(4)
    ids = rng.integers(2, cfg.vocab_size, (1, 600))
    mask = np.ones((1, 600), np.int64)
    mask[0, :40] = 0
    _compare(name, cfg, params, kernels, ids, mask, 3, max_len=640)
    a = _steps(cfg, params, kernels, ids, mask, 3, True, 640, use_graph=True)
    b = _steps(cfg, params, kernels, ids, mask, 3, True, 640, use_graph=False)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("shape", kn.STEP_SHAPES[1:])
def test_step_kernel_ring_shapes_compute_the_same(kernels, shape):
    """The rings' slot size and filling (the tuner's STEP_SHAPES: whole rows a tile, or segments of K; bulk copies
    or the lanes' cp.async) change nothing the warps compute: a lane takes the same 16-byte chunks of every row in
    the same order; logits and tokens bit-identical to the default shape's. (D=80: every shape fits; at D=160 the
    two warps' attention scratch leaves no room for two 6 KB slots a warp, which the engine names.)"""
    name = "3b-like MHA, D=80"
    cfg, params, _ = make_model(CONFIGS[name])
    ids = np.random.default_rng(6).integers(2, cfg.vocab_size, (1, 40))
    mask = np.ones((1, 40), np.int64)
    a = _steps(cfg, params, kernels, ids, mask, 4, True, 64)
    b = _steps(cfg, params, kernels, ids, mask, 4, True, 64, shape=shape)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    cfg160, params160, _ = make_model(CONFIGS["GQA + qk LayerNorm + parallel residual, D=160"])
    engine = de.GpuDecodeEngine(cfg160, params160, max_batch=1, max_len=64, kernels=kernels, autotune=False)
    engine.step_shape = (6144, "bulk")
    assert "two ring slots of 6144 bytes" in engine.step_kernel_problem()


@ODD
@given(D=st.sampled_from(kn.ATT_DIMS), kvh=st.integers(1, 3), group=st.integers(1, 3),
       inter8=st.integers(8, 260), vocab=st.integers(130, 700), qk=st.booleans(), parallel=st.booleans(),
       bias=st.booleans(), T=st.integers(1, 70), pad=st.integers(0, 5), seed=st.integers(0, 2 ** 16))
def test_step_kernel_odd_shapes(kernels, D, kvh, group, inter8, vocab, qk, parallel, bias, T, pad, seed):
    """Shapes whose rows split unevenly over the blocks and the tiles (hidden, 2 x inter and vocab not
    multiples of the tile height or of the SM count; blocks with no rows of a small matrix), every family
    switch, 1-70 prompt positions with left padding."""
    H = kvh * group
    overrides = dict(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=kvh, intermediate_size=8 * inter8,
                     qk_layernorm=qk, use_parallel_residual=parallel, use_qkv_bias=bias)
    cfg, params, _ = make_model(overrides, seed=seed % 7, layers=2, vocab=vocab)
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, (1, T + pad))
    mask = np.ones((1, T + pad), np.int64)
    mask[0, :pad] = 0
    _compare(str(overrides), cfg, params, kernels, ids, mask, 3, max_len=T + pad + 8)


def test_megakernel_true_where_it_cannot_run_says_why(kernels, monkeypatch):
    cfg, params, _ = make_model(CONFIGS["3b-like MHA, D=80"])
    engine = de.GpuDecodeEngine(cfg, params, max_batch=1, max_len=16, kernels=kernels, autotune=False)
    monkeypatch.setattr(kernels, "max_smem", 40 * 1024)
    engine.megakernel = True
    with pytest.raises(NotImplementedError, match="whole-step kernel cannot run here: .*shared memory"):
        engine._plan(1)
    engine.megakernel = None
    assert not engine.uses_step_kernel(1)


def test_tuner_times_the_step_kernel(kernels):
    """With megakernel None the tuner times the per-layer step and the whole-step kernel's ring shapes at batch 1
    and keeps the fastest (logged)."""
    cfg, params, _ = make_model(CONFIGS["qkv bias, D=64"])
    engine = de.GpuDecodeEngine(cfg, params, max_batch=1, max_len=32, kernels=kernels, autotune=True)
    assert engine.megakernel is False            # the default (not timed) while it is the slower step
    engine.megakernel = None
    engine.prefill(np.arange(2, 12)[None], None, logits=None)
    engine.decode_step()
    timed = [e for e in engine.tune_log if e[2] == "whole-step kernel"]
    assert [e[3] for e in timed] == [None, *kn.STEP_SHAPES] and all(e[4] > 0 for e in timed)
    best = min(timed, key=lambda e: e[4])
    assert engine.step_kernel[1] == (best[3] is not None) and engine.uses_step_kernel(1) == (best[3] is not None)
    assert engine.step_shape == (best[3] or kn.STEP_SHAPES[0])
    print("tuner:", [(e[3], round(e[4], 4)) for e in timed])
