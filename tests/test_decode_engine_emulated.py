"""GpuDecodeEngine on the CPU: CuPy replaced by NumPy, each CUDA kernel by its float64 reference.

This checks everything around the kernels where no GPU is: weight fusion (q|k|v rows, interleaved
gate/up rows), buffer strides, the order of the launches in a step, the device-side bookkeeping
(cache length, positions, token history), graph capture and replay, the CuPy prefill, and that the
references themselves equal transformers (float32) on random StableLM models. The kernels against
these references, and the engine against transformers on a GPU: tests/gpu/test_decode_engine.py.
"""

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from stablelm_ref.cuda import decode_engine as de

pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
from decode_cases import CONFIGS, left_padded_batch, make_model, run_engine_against_transformers  # noqa: E402


# ----------------------------------------------------------------------------- NumPy stand-in for CuPy
class _Capture:
    launches = None           # a list while a stream is capturing


class _Stream:
    def __init__(self, non_blocking=False):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def begin_capture(self):
        _Capture.launches = []

    def end_capture(self):
        graph, _Capture.launches = _Graph(_Capture.launches), None
        return graph

    def synchronize(self):
        pass


class _Graph:
    def __init__(self, launches):
        self.launches = launches

    def launch(self, stream=None):
        for run in self.launches:
            run()


class _Clock:
    """Emulated GPU time (ms): each launch that runs adds its cost (see _Kernel)."""
    t = 0.0


class _Event:
    def record(self, stream=None):
        self.t = _Clock.t

    def synchronize(self):
        pass


def _fake_cupy():
    ns = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("_")})
    ns.asnumpy = lambda a, stream=None: np.array(a)
    ns.cuda = types.SimpleNamespace(Stream=_Stream, Event=_Event, get_elapsed_time=lambda e0, e1: e1.t - e0.t)
    return ns


class _Kernel:
    """Records itself while capturing, else runs its NumPy implementation on the raw arguments.
    Emulated cost: 1 ms a launch; a GEMV with one block per row group 2 ms (so persistent blocks win)."""

    def __init__(self, impl, **static):
        self.impl, self.static = impl, static

    def cost(self, grid, args):
        if self.impl is _gemv:
            groups = -(-int(args[4]) // self.static["rows"])          # ceil(N / rows)
            return 2.0 if grid[0] == groups else 1.0
        return 1.0

    def __call__(self, grid, block, args, shared_mem=0):
        def run():
            _Clock.t += self.cost(grid, args)
            self.impl(grid, block, args, **self.static)
        if _Capture.launches is not None:
            _Capture.launches.append(run)
        else:
            run()


def _null(p):
    return isinstance(p, np.uint64) and p == 0


def _gemv(grid, block, args, rows):
    x, ldx, nb, W, N, K, bias, yf, yh, ldy, mode = args
    assert grid[0] <= (N + rows - 1) // rows and block[0] % 32 == 0     # (persistent blocks: fewer)
    xs = de.ref_bf16_to_f64(np.stack([x.reshape(-1)[b * ldx: b * ldx + K] for b in range(nb)]))
    Wf = de.ref_bf16_to_f64(W)
    if mode == de.MODE_SWIGLU:
        out = yh.reshape(-1)
        y = de.ref_gemv(xs, Wf, mode)
        for b in range(nb):
            out[b * ldy: b * ldy + N // 2] = de.ref_f64_to_bf16(y[b])
        return
    out = yf.reshape(-1)
    y0 = np.stack([out[b * ldy: b * ldy + N] for b in range(nb)]).astype(np.float64)
    y = de.ref_gemv(xs, Wf, mode, bias=None if _null(bias) else bias.astype(np.float64), y0=y0)
    for b in range(nb):
        out[b * ldy: b * ldy + N] = y[b]


def _attention(grid, block, args, D):
    (qkv, kc, vc, lenp, posp, kmask, inv_freq, rot, qn_w, kn_w, qk_ln, eps, part_o, part_ml, counters, out,
     H, KVH, max_len, scale) = args
    nb = grid[2]
    assert grid[1] == KVH and kc.shape[-2] == max_len and kc.shape[-1] == D
    L = int(lenp[0])
    qk = bool(qk_ln)
    o, k_new, v_new = de.ref_decode_attention(
        qkv[:nb], de.ref_bf16_to_f64(kc[:nb]), de.ref_bf16_to_f64(vc[:nb]), L, posp[:nb], kmask[:nb],
        inv_freq, int(rot), int(H), int(KVH), D, qn=qn_w if qk else None, kn=kn_w if qk else None,
        eps=float(eps), scale=float(scale))
    out[:nb] = de.ref_f64_to_bf16(o)
    kc[:nb, :, L] = de.ref_f64_to_bf16(k_new)
    vc[:nb, :, L] = de.ref_f64_to_bf16(v_new)


def _layernorm(grid, block, args):
    x, ldx, w, b, y, ldy, K, eps = args
    for r in range(grid[0]):
        y.reshape(-1)[r * ldy: r * ldy + K] = de.ref_f64_to_bf16(
            de.ref_layernorm(x.reshape(-1)[r * ldx: r * ldx + K], w, b, float(eps)))


def _embed(grid, block, args):
    tok, E, hidden, x = args
    for b in range(grid[0]):
        x[b] = de.ref_bf16_to_f64(E[tok[b]])


def _argmax(grid, block, args):
    logits, V, tok, history, ldh, max_steps, step, cache_len, pos, counter = args
    s = int(step[0])
    for b in range(grid[0]):
        tok[b] = int(np.argmax(logits[b]))
        if s < max_steps:
            history.reshape(-1)[s * ldh + b] = tok[b]
        pos[b] += 1
    step[0] += 1
    cache_len[0] += 1


class EmulatedKernels(de.DecodeKernels):
    def __init__(self):
        self.cp = de._cupy()
        self.gemv_fn = {(bm, r): _Kernel(_gemv, rows=r) for bm in de.GEMV_BATCHES for r in de.GEMV_ROWS}
        self.attn_fn = {d: _Kernel(_attention, D=d) for d in de.ATT_DIMS}
        self.layernorm_fn, self.embed_fn = _Kernel(_layernorm), _Kernel(_embed)
        self.argmax_fn = _Kernel(_argmax)
        self.num_sms, self.device_name, self.source = 132, "numpy", "emulated"


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(de, "_BACKEND", _fake_cupy())
    return EmulatedKernels()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_emulated_engine_matches_transformers(emulated, name):
    _, e_pre, e_dec, agree = run_engine_against_transformers(name, kernels=emulated)
    assert agree >= 0.9


def test_emulated_graph_replay_equals_eager(emulated):
    name = "GQA + qk LayerNorm + parallel residual, D=160"
    a = run_engine_against_transformers(name, steps=3, use_graph=True, kernels=emulated)[0]
    b = run_engine_against_transformers(name, steps=3, use_graph=False, kernels=emulated)[0]
    assert np.array_equal(a.generated(), b.generated())
    assert np.array_equal(a.get_logits(), b.get_logits())


def test_emulated_autotune_chooses_by_step_time(emulated):
    """The two tuning stages run end to end (per-kind timing, then finalists and persistent blocks inside the
    step); with persistent GEMVs emulated as cheaper, every kind ends persistent; tokens are unchanged."""
    emulated.num_sms = 1                     # persist=1: one block for all row groups (fewer than groups)
    cfg, params, _ = make_model(CONFIGS["3b-like MHA, D=80"])
    ids, mask = left_padded_batch(np.random.default_rng(3), cfg.vocab_size, [5, 9])
    runs = []
    for autotune in (False, True):
        engine = de.GpuDecodeEngine(cfg, params, max_batch=2, max_len=24, kernels=emulated, autotune=autotune,
                                    pdl=False)
        runs.append(engine.generate(ids, mask, max_new_tokens=5))
    assert set(engine.tuning[2]) == {"qkv", "o_proj", "gate_up", "down", "lm_head"}
    for name, shape in engine.tuning[2].items():
        assert shape.persist == de.TUNE_PERSIST[0], (name, shape)     # the first strictly faster choice
        assert shape.rows in de.GEMV_ROWS and shape.us > 0
    assert engine.step_ms[2] > 0
    assert np.array_equal(runs[0], runs[1])


def test_emulated_generate_and_eos(emulated):
    cfg, params, _ = make_model(CONFIGS["3b-like MHA, D=80"])
    ids, mask = left_padded_batch(np.random.default_rng(2), cfg.vocab_size, [5, 9])
    engine = de.GpuDecodeEngine(cfg, params, max_batch=2, max_len=24, kernels=emulated, autotune=False)
    out = engine.generate(ids, mask, max_new_tokens=7)
    assert out.shape == (2, 7)
    engine.prefill(ids, mask, logits=None)
    for _ in range(6):
        engine.decode_step()
    assert np.array_equal(out, engine.generated())
    eos = int(out[0, 2])
    cut = engine.generate(ids, mask, max_new_tokens=7, eos_token_id=eos, pad_token_id=1)
    first = np.argmax(out == eos, axis=1)
    for b in range(2):
        if (out[b] == eos).any():
            assert (cut[b, first[b] + 1:] == 1).all() and np.array_equal(cut[b, : first[b] + 1], out[b, : first[b] + 1])
        else:
            assert np.array_equal(cut[b], out[b])


def test_emulated_errors(emulated):
    cfg, params, _ = make_model(CONFIGS["3b-like MHA, D=80"])
    engine = de.GpuDecodeEngine(cfg, params, max_batch=1, max_len=8, kernels=emulated, autotune=False)
    with pytest.raises(de.GenerationError, match="prefill"):
        engine.decode_step()
    with pytest.raises(de.GenerationError, match="max_batch"):
        engine.prefill(np.ones((2, 3), np.int64))
    with pytest.raises(de.GenerationError, match="max_len"):
        engine.generate(np.ones((1, 5), np.int64), max_new_tokens=5)
    scaled = types.SimpleNamespace(**{**vars(cfg), "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(NotImplementedError, match="default rotary"):
        de.GpuDecodeEngine(scaled, params, kernels=emulated, autotune=False)
    missing = dict(params)
    missing.pop("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(de.CheckpointError, match="up_proj"):
        de.GpuDecodeEngine(cfg, missing, kernels=emulated, autotune=False)


def test_reference_bf16_rounding_matches_ml_dtypes(emulated):
    x = np.random.default_rng(3).standard_normal(10000).astype(np.float32) * 1e3
    x[:3] = [np.nan, np.inf, -np.inf]
    ours = de.f32_to_bf16_bits(x)
    ref = de.ref_f64_to_bf16(x)
    assert np.array_equal(ours[3:], ref[3:]) and np.isnan(de.ref_bf16_to_f64(ours[:1])).all()
    assert np.array_equal(ours[1:3], ref[1:3])
