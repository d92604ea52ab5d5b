"""GpuDecodeEngine on the CPU: CuPy replaced by NumPy, each CUDA kernel by its float64 reference.

This checks everything around the kernels where no GPU is: weight fusion (q|k|v rows, interleaved
gate/up rows), buffer strides, the order of the launches in a step, the device-side bookkeeping
(cache length, positions, token history), graph capture and replay, the CuPy prefill, that the
references themselves equal transformers (float32) on random StableLM models (those need torch), and
generation.py's one loop stepping through fast_gpu.EngineSteps (no torch needed: they run in make test). The kernels against
these references, and the engine against transformers on a GPU: tests/gpu/test_decode_engine.py.
"""

import copy
import json
import sys
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from stablelm_ref.cuda import bf16, decode_engine as de, decode_kernels as kn, specs, tune, xp as cuda_xp
from stablelm_ref.generation import process_logits

sys.path.insert(0, str(Path(__file__).parent))
from decode_cases import (CONFIGS, engine_greedy, left_padded_batch, make_model,  # noqa: E402
                          run_engine_against_transformers)


# ----------------------------------------------------------------------------- NumPy stand-in for CuPy
class _Capture:
    launches = None           # a list while a stream is capturing


class _Stream:
    log = None                # a list while a test records which streams are entered and synchronized

    def __init__(self, non_blocking=False):
        self.null = False

    def __enter__(self):
        if _Stream.log is not None:
            _Stream.log.append("null entered" if self.null else "entered")
        return self

    def __exit__(self, *exc):
        return False

    def begin_capture(self):
        _Capture.launches = []

    def end_capture(self):
        graph, _Capture.launches = _Graph(_Capture.launches), None
        return graph

    def synchronize(self):
        if _Stream.log is not None:
            _Stream.log.append("null synchronized" if self.null else "synchronized")


_NULL_STREAM = _Stream()
_NULL_STREAM.null = True


class _Graph:
    def __init__(self, launches):
        self.launches = launches

    def launch(self, stream=None):
        for run in self.launches:
            run()


class _Clock:
    """Emulated GPU time (ms): each launch that runs adds its cost (see _Kernel). Elapsed times are rounded to
    1e-9 ms, so that equal costs time equal wherever the clock stands (its float sum rounds differently)."""
    t = 0.0


class _Event:
    def record(self, stream=None):
        self.t = _Clock.t

    def synchronize(self):
        pass


def _asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if out is None:
        return np.array(a)
    out[...] = a
    return out


def _fake_cupy():
    ns = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("_")})
    ns.asnumpy = _asnumpy
    ns.cuda = types.SimpleNamespace(Stream=_Stream, Event=_Event, alloc_pinned_memory=bytearray,
                                    get_current_stream=lambda: _NULL_STREAM,
                                    get_elapsed_time=lambda e0, e1: round(e1.t - e0.t, 9))
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
        if self.impl is _attention:                                   # more tiles a block: cheaper
            return 1.0 - 0.1 * int(args[-1])
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
    """gemv_b*_r* (11 arguments + stats_out), gemv_mma_* (11), gemv_ln_b1_r* (+ stats_out, ln_w, ln_b, ln_stats,
    eps: x is the float32 residual, normalised with the given statistics, rounded to bf16 as the kernel does)."""
    x, ldx, nb, W, N, K, bias, yf, yh, ldy, mode = args[:11]
    stats_out = args[11] if len(args) > 11 else np.uint64(0)
    assert grid[0] <= (N + rows - 1) // rows and block[0] % 32 == 0     # (persistent blocks: fewer)
    rows_x = np.stack([x.reshape(-1)[b * ldx: b * ldx + K] for b in range(nb)])
    if len(args) > 12:
        ln_w, ln_b, ln_stats, eps = args[12:]
        assert nb == 1 and x.dtype == np.float32
        xs = specs.ref_round_bf16(specs.ref_layernorm_from_stats(rows_x, ln_w, ln_b, ln_stats[:nb], float(eps)))
    else:
        xs = specs.ref_bf16_to_f64(rows_x)
    Wf = specs.ref_bf16_to_f64(W)
    if mode == kn.MODE_SWIGLU:
        out = yh.reshape(-1)
        y = specs.ref_gemv(xs, Wf, mode)
        for b in range(nb):
            out[b * ldy: b * ldy + N // 2] = specs.ref_f64_to_bf16(y[b])
        return
    out = yf.reshape(-1)
    y0 = np.stack([out[b * ldy: b * ldy + N] for b in range(nb)]).astype(np.float64)
    y = specs.ref_gemv(xs, Wf, mode, bias=None if _null(bias) else bias.astype(np.float64), y0=y0)
    for b in range(nb):
        out[b * ldy: b * ldy + N] = y[b]
    if not _null(stats_out):
        stats_out[:nb] += specs.ref_row_stats(y.astype(np.float32))


def _attention(grid, block, args, D):
    (qkv, kc, vc, lenp, posp, kmask, inv_freq, rot, qn_w, kn_w, qk_ln, eps, part_o, part_ml, counters, out,
     H, KVH, max_len, scale, split_tiles, nbuf) = args
    nb = grid[2]
    assert grid[1] == KVH and kc.shape[-2] == max_len and kc.shape[-1] == D
    assert 1 <= nbuf <= kn.ATT_MAXBUF and split_tiles >= 1 and part_o.shape[2] >= grid[0]
    L = int(lenp[0])
    qk = bool(qk_ln)
    o, k_new, v_new = specs.ref_decode_attention(
        qkv[:nb], specs.ref_bf16_to_f64(kc[:nb]), specs.ref_bf16_to_f64(vc[:nb]), L, posp[:nb], kmask[:nb],
        inv_freq, int(rot), int(H), int(KVH), D, qn=qn_w if qk else None, kn=kn_w if qk else None,
        eps=float(eps), scale=float(scale))
    out[:nb] = specs.ref_f64_to_bf16(o)
    kc[:nb, :, L] = specs.ref_f64_to_bf16(k_new)
    vc[:nb, :, L] = specs.ref_f64_to_bf16(v_new)


def _layernorm(grid, block, args):
    x, ldx, w, b, y, ldy, K, eps = args
    for r in range(grid[0]):
        y.reshape(-1)[r * ldy: r * ldy + K] = specs.ref_f64_to_bf16(
            specs.ref_layernorm(x.reshape(-1)[r * ldx: r * ldx + K], w, b, float(eps)))


def _embed(grid, block, args):
    tok, E, hidden, x, stats, n_stats, ld_stats = args
    for b in range(grid[0]):
        x[b] = specs.ref_bf16_to_f64(E[tok[b]])
        if not _null(stats):
            stats[:, b] = 0.0
            stats[0, b] = specs.ref_row_stats(x[b])


def _sample(grid, block, args):
    (logits, V, present, penalty, do_sample, temperature, top_k, top_p, u, tok, history, ldh, max_steps, step,
     cache_len, pos, counter, bad, ring) = args
    nb = grid[0]
    settings = dict(do_sample=bool(do_sample), temperature=float(temperature), top_k=int(top_k),
                    top_p=float(top_p), repetition_penalty=float(penalty))
    pres = None if _null(present) else present[:nb]
    flags = ~np.isfinite(logits[:nb]).all(axis=1)
    _finish(nb, specs.ref_sample_step(logits[:nb], pres, settings, _draws(u, step, nb)), present, history, ldh,
            max_steps, step, cache_len, pos, tok, ring, flags)
    _flag(bad, flags)


def _sample_partial(grid, block, args):
    """Each slice's top-k (ties kept) of the processed logits (penalty, temperature: generation.py's processors)
    appended to the row's union."""
    logits, V, present, penalty, temperature, top_k, val, idx, count, cand_bad, ucap = args
    P, nb = grid
    settings = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0,
                    repetition_penalty=float(penalty))
    for b in range(nb):
        history = np.nonzero(present[b])[0][None] if not _null(present) else np.zeros((1, 0), np.int64)
        z = process_logits(np.asarray(logits[b:b + 1], np.float32), history, settings)[0]
        cand_bad[b] |= int(not np.isfinite(logits[b]).all())
        for p in range(P):
            zs = z[p * kn.SAMPLE_SLICE:(p + 1) * kn.SAMPLE_SLICE]
            keep = np.arange(len(zs)) if len(zs) <= top_k else np.nonzero(zs >= np.sort(zs)[-top_k])[0]
            n0 = int(count[b])
            val[b, n0:n0 + len(keep)] = zs[keep]
            idx[b, n0:n0 + len(keep)] = keep + p * kn.SAMPLE_SLICE
            count[b] += len(keep)


def _sample_merge(grid, block, args):
    """The spec (top-k of the union, top-p, the draw) on the union placed in a row of -inf."""
    (val, idx, count, cand_bad, ucap, top_k, top_p, u, present, V, tok, history, ldh, max_steps, step, cache_len, pos,
     counter, bad, ring) = args
    nb = grid[0]
    rows = np.full((nb, int(V)), -np.inf, np.float32)
    for b in range(nb):
        rows[b, idx[b, :count[b]]] = val[b, :count[b]]
    settings = dict(do_sample=True, temperature=1.0, top_k=int(top_k), top_p=float(top_p), repetition_penalty=1.0)
    count[:nb] = 0
    _finish(nb, specs.ref_sample_step(rows, None, settings, _draws(u, step, nb)), present, history, ldh, max_steps,
            step, cache_len, pos, tok, ring, cand_bad[:nb] != 0)
    _flag(bad, cand_bad[:nb] != 0)
    cand_bad[:nb] = 0


def _draws(u, step, nb):
    """This step's draws: row `step` of the table (shaped like history; the last row past its end)."""
    return u[min(int(step[0]), u.shape[0] - 1), :nb]


def _flag(bad, rows):
    if not _null(bad):
        bad[: len(rows)] = rows


def _finish(nb, ids, present, history, ldh, max_steps, step, cache_len, pos, tok, ring, flags):
    s = int(step[0])
    for b in range(nb):
        if not _null(ring):                                   # decode.cu's finish_row: slot step % PICK_RING
            ring[s % kn.PICK_RING, :, b] = (ids[b], int(flags[b]), s)
        tok[b] = ids[b]
        if not _null(present):
            present[b, ids[b]] = 1
        if s < max_steps:
            history.reshape(-1)[s * ldh + b] = tok[b]
        pos[b] += 1
    step[0] += 1
    cache_len[0] += 1


def _argmax(grid, block, args):
    logits, V, tok, history, ldh, max_steps, step, cache_len, pos, counter, bad, ring = args
    nb = grid[1]                                              # grid (blocks a row, rows)
    flags = ~np.isfinite(logits[:nb]).all(axis=1)
    _finish(nb, np.argmax(logits[:nb], axis=1), np.uint64(0), history, ldh, max_steps, step, cache_len, pos, tok,
            ring, flags)
    _flag(bad, flags)


class EmulatedKernels(kn.DecodeKernels):
    def __init__(self):
        self.cp = cuda_xp.cupy()
        self.gemv_fn = {(bm, r): _Kernel(_gemv, rows=r) for bm in kn.GEMV_BATCHES for r in kn.GEMV_ROWS}
        self.mma_fn = {(t, u): _Kernel(_gemv, rows=16 * t) for t, u in kn.GEMV_MMA}
        self.gemv_ln_fn = {r: _Kernel(_gemv, rows=r) for r in kn.GEMV_ROWS}
        self.tensor_cores = True
        self.attn_fn = {d: _Kernel(_attention, D=d) for d in kn.ATT_DIMS}
        self.attn_tc_fn = self.attn_fn                                # (the same arithmetic in NumPy)
        self.layernorm_fn, self.embed_fn = _Kernel(_layernorm), _Kernel(_embed)
        self.argmax_fn = _Kernel(_argmax)
        self.sample_fn = _Kernel(_sample)
        self.sample_partial_fn, self.sample_merge_fn = _Kernel(_sample_partial), _Kernel(_sample_merge)
        self.num_sms, self.device_name, self.source = 132, "numpy", "emulated"
        self.max_smem, self._att_smem = 227 * 1024, {}               # the H100's / H200's opt-in maximum


def _needs_transformers():
    """The engine-vs-transformers tests build their models with transformers (make test has no torch: skipped
    there; make crosscheck's environment runs them)."""
    pytest.importorskip("torch", reason="builds its random model with transformers (pip install torch)")
    pytest.importorskip("transformers", reason="builds its random model with transformers")


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(cuda_xp, "BACKEND", _fake_cupy())
    return EmulatedKernels()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_emulated_engine_matches_transformers(emulated, name):
    _needs_transformers()
    _, e_pre, e_dec, agree = run_engine_against_transformers(name, kernels=emulated)
    assert agree >= 0.9


@pytest.mark.parametrize("name", [n for n in CONFIGS if "parallel" not in n])
def test_emulated_engine_batch1_with_folded_layernorms_matches_transformers(emulated, name):
    """Batch 1 folds the LayerNorms into the GEMVs (their statistics passed from kernel to kernel)."""
    _needs_transformers()
    engine, e_pre, e_dec, agree = run_engine_against_transformers(name, kernels=emulated, lengths=(9,))
    assert engine.folds_layernorm(1) and "layernorm" not in {fn.tag for fn in engine._plan(1)[:-3]}
    assert agree >= 0.9


def test_emulated_graph_replay_equals_eager(emulated):
    _needs_transformers()
    name = "GQA + qk LayerNorm + parallel residual, D=160"
    a = run_engine_against_transformers(name, steps=3, use_graph=True, kernels=emulated)[0]
    b = run_engine_against_transformers(name, steps=3, use_graph=False, kernels=emulated)[0]
    assert np.array_equal(a.generated(), b.generated())
    assert np.array_equal(a.get_logits(), b.get_logits())


def test_emulated_autotune_chooses_by_step_time(emulated):
    """The three tuning stages run end to end (per-kind timing, then finalists and persistent blocks inside the
    step, then the attention's shape); with persistent GEMVs and more tiles an attention block emulated as
    cheaper, every kind ends persistent and the attention on ATT_SHAPES' last; tokens are unchanged; every
    timing is in the tuner's log."""
    _needs_transformers()
    emulated.num_sms = 1                     # persist=1: one block for all row groups (fewer than groups)
    cfg, params, _ = make_model(CONFIGS["3b-like MHA, D=80"])
    ids, mask = left_padded_batch(np.random.default_rng(3), cfg.vocab_size, [5, 9])
    runs = []
    for autotune in (False, True):
        engine = de.GpuDecodeEngine(cfg, params, max_batch=2, max_len=24, kernels=emulated, autotune=autotune,
                                    pdl=False)
        runs.append(engine_greedy(engine, ids, mask, 5))
    assert set(engine.tuning[2]) == {"qkv", "o_proj", "gate_up", "down", "lm_head"}
    for name, shape in engine.tuning[2].items():
        assert shape.persist == tune.TUNE_PERSIST[0], (name, shape)     # the first strictly faster choice
        assert shape.rows in kn.GEMV_ROWS and shape.us > 0 and shape.unroll == 0    # ties: the CUDA-core GEMV
    timed_alone = {e[3][5] for e in engine.tune_log if e[0] == "alone"}
    assert timed_alone == {0} | {u for _, u in kn.GEMV_MMA}              # batch 2: the tensor-core GEMV timed too
    logged = {(e[0], e[2]) for e in engine.tune_log}
    assert logged == ({(stage, name) for stage in ("alone", "step") for name in engine.tuning[2]}
                      | {("step", "attention")})
    assert engine.att_shape[2] == kn.ATT_SHAPES[-1]
    attn = [fn for fn in engine._plan(2) if fn.tag == "attention"]
    assert attn and all(tuple(int(a) for a in fn.args[-2:]) == kn.ATT_SHAPES[-1] for fn in attn)
    assert all(fn.smem == emulated.attention_smem(1, 80, kn.ATT_SHAPES[-1][1]) for fn in attn)
    assert engine.step_ms[2] > 0
    assert np.array_equal(runs[0], runs[1])
    # forget_tuning(nb): that batch's GEMV shapes, attention shape and step time go, with the plans; another
    # batch's stay (tools/decode_probe.py retunes through it: a cleared `tuning` alone kept the attention's)
    engine.tuning[1], engine.att_shape[1], engine.step_ms[1] = {}, (1, 1), 1.0
    engine.forget_tuning(2)
    assert 2 not in engine.tuning and 2 not in engine.att_shape and 2 not in engine.step_ms and not engine._plans
    assert engine.tuning[1] == {} and engine.att_shape[1] == (1, 1) and engine.step_ms[1] == 1.0
    state = engine.tuning_state()
    engine.forget_tuning()
    assert not engine.tuning and not engine.att_shape and not engine.step_ms
    engine.set_tuning_state(state)
    assert engine.att_shape == {1: (1, 1)} and engine.step_ms == {1: 1.0}
    # the state is a copy down to each batch's shapes: changing the engine's tuning afterwards leaves it
    engine.tuning[1]["qkv"] = "changed"
    assert state[0] == {1: {}}
    engine.set_tuning_state(state)
    assert engine.tuning == {1: {}}


def _untuned_then_tuned(emulated, monkeypatch, cost, steps, max_len=16, each=lambda engine: None):
    """Batch 1 on the small model, the emulated kernels costing `cost` (one SM): an untuned engine, then a
    tuned one, each given `each(engine)` before its prefill of the same 6 ids, then `steps` decode steps.
    Returns the tuned engine and both engines' tokens (generated())."""
    monkeypatch.setattr(_Kernel, "cost", cost)
    emulated.num_sms = 1
    model = _models(emulated)[1].model
    ids = np.random.default_rng(2).integers(2, 384, (1, 6))
    runs = []
    for autotune in (False, True):
        engine = de.GpuDecodeEngine(model.config, model.params, max_batch=1, max_len=max_len, kernels=emulated,
                                    autotune=autotune, pdl=False)
        each(engine)
        engine.prefill(ids, logits=None)
        for _ in range(steps):
            engine.decode_step()
        runs.append(engine.generated())
    return engine, runs


def test_tuner_tries_the_winner_with_half_its_rows(emulated, monkeypatch):
    """Stage 2 ends with the winner at half its rows a block, at 0-4 persistent blocks (tune.leaner). Emulated costs
    where more rows win alone (stage 1 ranks R 8 first) and fewer rows win in persistent grids: every kind ends
    at R 4 (half of 8; SwiGLU keeps it even), persistent (the first strictly faster choice), its alone-time
    unknown (0); the tokens do not change."""
    def cost(self, grid, args):
        if self.impl is _gemv:
            R = self.static["rows"]
            return 2.0 - 0.01 * R if grid[0] == -(-int(args[4]) // R) else 1.0 + 0.01 * R
        return 1.0
    engine, runs = _untuned_then_tuned(emulated, monkeypatch, cost, steps=3)
    for name, shape in engine.tuning[1].items():
        assert (shape.rows, shape.persist, shape.us) == (4, tune.TUNE_PERSIST[0], 0.0), (name, shape)
    assert np.array_equal(runs[0], runs[1])
    # leaner(): the CUDA-core GEMV only; SwiGLU keeps pairs of rows; one row has no half
    s = tune.GemvShape(8, 160, 2, 9.0, 1.0)
    assert [c[:3] for c in tune.leaner(s, kn.MODE_ADD)] == [(4, 160, p) for p in (0,) + tune.TUNE_PERSIST]
    assert tune.leaner(s._replace(rows=2), kn.MODE_SWIGLU) == [] and tune.leaner(s._replace(rows=1), kn.MODE_ADD) == []
    assert tune.leaner(s._replace(rows=32, unroll=2), kn.MODE_ADD) == []


@pytest.mark.parametrize("grid", [True, False])
def test_tuner_times_every_finalist_persistent(emulated, monkeypatch, grid):
    """Stage 2 with TUNE_GRID times every finalist at every persistent count: emulated costs where R 8 is best
    alone and with one block a group, but R 2 (the third finalist of R 8, 4, 2) is best persistent. The grid ends every
    kind at R 2 persistent; the previous order (the finalists at one block a group, then persistent counts for
    that winner alone) never times R 2 persistent and ends at R 8. Later passes (TUNE_ROUNDS) time each
    kind's best candidates again: the log holds those second timings."""
    def cost(self, grid_, args):
        if self.impl is _gemv:
            R = self.static["rows"]
            return 2.0 - 0.01 * R if grid_[0] == -(-int(args[4]) // R) else 1.0 + 0.01 * (R != 2)
        return 1.0
    monkeypatch.setattr(_Kernel, "cost", cost)
    monkeypatch.setattr(tune, "TUNE_GRID", grid)
    monkeypatch.setattr(tune, "gemv_candidates", lambda K, nb, mode, tc=False: [(r, 128, 0) for r in (8, 4, 2)])
    emulated.num_sms = 1
    model = _models(emulated)[1].model
    engine = de.GpuDecodeEngine(model.config, model.params, max_batch=1, max_len=16, kernels=emulated,
                                autotune=True, pdl=False)
    engine.prefill(np.random.default_rng(2).integers(2, 384, (1, 6)), logits=None)
    engine.decode_step()
    want = 2 if grid else 8
    for name, shape in engine.tuning[1].items():
        assert (shape.rows, shape.persist > 0) == (want, True), (name, shape)
    in_step = [e for e in engine.tune_log if e[0] == "step" and e[2] == "qkv"]
    firsts = {e[3] for e in in_step}
    assert tune.TUNE_ROUNDS > 1 and len(in_step) > len(firsts)        # some candidates timed twice


@pytest.mark.parametrize("starts,max_len", [(1, 16), (2, 16), (2, 48)])
def test_tuner_searches_from_several_starts_and_keeps_the_fastest_end(emulated, monkeypatch, starts, max_len):
    """Stage 2 one kind at a time ends in a local optimum that depends on the order the kinds are visited in.
    Emulated costs where q|k|v's cost depends on down's shape: from stage 1's choice (R 2 for both, 0.30 over
    the step's base), visiting down first (most bytes first: down's matrix is larger here) moves down to R 8
    (0.21) and stops there; visiting q|k|v first moves it to R 8 (0.10) and stops there. One search ends at the
    first; TUNE_STARTS = 2 also searches fewest bytes first, times both ends again (logged as "end") and keeps
    the second. With room in the cache (max_len 48: 40 steps) the ends are timed over real steps
    (time_decode), which put the sequence back: the tokens equal an untuned engine's."""
    monkeypatch.setattr(tune, "TUNE_STARTS", starts)
    monkeypatch.setattr(tune, "TUNE_PERSIST", (1,))
    monkeypatch.setattr(tune, "gemv_candidates", lambda K, nb, mode, tc=False: [(r, 128, 0) for r in (2, 8)])
    table = {(2, 2): 0.30, (8, 2): 0.10, (2, 8): 0.20, (8, 8): 0.25}          # (q|k|v rows, down rows) -> cost
    held = {}

    def cost(self, grid_, args):
        if self.impl is not _gemv:
            return 1.0
        R, N, K = self.static["rows"], int(args[4]), int(args[5])
        if R not in (2, 8):
            return 9.0                                        # leaner's halves (R 1, R 4) lose
        down = held["engine"].tuning.get(1, {}).get("down")
        if (N, K) == (640, 320):                              # q|k|v: its cost depends on down's rows
            return 1.0 + (0.01 * (R == 8) if down is None else table.get((R, down.rows), 0.0))
        if (N, K) == (320, 864):                              # down
            return 1.0 + 0.01 * (R == 8)
        return 1.0
    decoded = []

    def each(engine):
        held["engine"] = engine
        monkeypatch.setattr(engine, "time_decode", lambda nb, n, f=engine.time_decode: decoded.append(n) or f(nb, n))

    engine, runs = _untuned_then_tuned(emulated, monkeypatch, cost, steps=4, max_len=max_len, each=each)
    assert (int(engine.cache_len[0]), int(engine.step[0]), int(engine.pos[0])) == (10, 5, 10)
    assert engine.layers[0].wqkv.shape == (640, 320) and engine.layers[0].wd.shape == (320, 864)
    assert np.array_equal(runs[0], runs[1])
    assert decoded == ([] if starts == 1 or max_len == 16 else [max_len - 6 - 2] * 2 * tune.TUNE_CONFIRM)
    got = (engine.tuning[1]["qkv"].rows, engine.tuning[1]["down"].rows)
    ends = [e for e in engine.tune_log if e[0] == "end"]
    if starts == 1:
        assert got == (2, 8) and not ends
    else:
        assert got == (8, 2)
        assert [e[2] for e in ends] == [0, 1] and ends[1][3] < ends[0][3]
        assert engine.step_ms[1] == ends[1][3]


def test_tuning_is_kept_on_disk_and_read_back(emulated, monkeypatch, tmp_path):
    """The tuner's choice goes to one file a batch size (STABLELM_REF_TUNE_CACHE); the next engine of the same
    shapes reads it instead of timing (no "alone" or "step" timings in its log, the same tuning, the same
    tokens); other shapes miss; an unreadable file is timed again and replaced; engine.tune_cache False and
    the folder "off" neither read nor write."""
    monkeypatch.setenv("STABLELM_REF_TUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(tune, "gemv_candidates", lambda K, nb, mode, tc=False: [(r, 128, 0) for r in (4, 2)])
    monkeypatch.setattr(tune, "TUNE_PERSIST", (1,))              # a quick tuner: the file is what is tested
    monkeypatch.setattr(tune, "TUNE_ROUNDS", 1)
    emulated.num_sms = 1
    model = _models(emulated)[1].model
    ids = np.random.default_rng(2).integers(2, 384, (1, 6))

    def run(cfg=None, cache=True):
        engine = de.GpuDecodeEngine(cfg or model.config, model.params, max_batch=1, max_len=16, kernels=emulated,
                                    autotune=True, pdl=False)
        engine.tune_cache = cache
        engine.prefill(ids, logits=None)
        for _ in range(3):
            engine.decode_step()
        stages = {e[0] for e in engine.tune_log}
        return engine, stages

    first, stages = run()
    files = sorted(tmp_path.iterdir())
    assert stages >= {"alone", "step"} and len(files) == 1 and files[0].name.startswith("decode-b1-")
    second, stages = run()
    assert stages == {"cache"} and second.tuning == first.tuning and second.att_shape == first.att_shape
    assert np.array_equal(first.generated(), second.generated())
    assert sorted(tmp_path.iterdir()) == files
    _, stages = run(cache=False)                                 # not read
    assert "alone" in stages
    files[0].write_text("{ not json")
    _, stages = run()                                            # timed again, the file replaced
    assert "alone" in stages and json.loads(files[0].read_text())["gemv"].keys() == first.tuning[1].keys()
    good = json.loads(files[0].read_text())
    fresh = de.GpuDecodeEngine(model.config, model.params, max_batch=1, max_len=16, kernels=emulated)
    assert tune.load(fresh, 1, files[0]) and fresh.tuning[1] == first.tuning[1]
    # no such kernel (3 rows, SwiGLU's rows not in pairs, 9 persistent blocks), or a field that is not an int
    bad_shapes = [("qkv", 0, 3), ("gate_up", 0, 1), ("down", 2, 9), ("qkv", 0, 4.0), ("down", 1, 128.5),
                  ("o_proj", 2, True)]
    bad_fields = [("attention", [1.0, 1.0]), ("step ms", "soon"), ("gemv", [1, 2]), ("step shape", [1])]
    for case in bad_shapes + bad_fields:
        bad = copy.deepcopy(good)
        if len(case) == 3:
            bad["gemv"][case[0]][case[1]] = case[2]
        else:
            bad[case[0]] = case[1]
        files[0].write_text(json.dumps(bad))
        fresh.forget_tuning()
        assert not tune.load(fresh, 1, files[0]) and 1 not in fresh.tuning, case
    files[0].write_text(json.dumps(good))
    other = copy.deepcopy(model.config)
    other.max_position_embeddings = 512                          # the same matrices: the same file
    _, stages = run(other)
    assert stages == {"cache"} and len(list(tmp_path.iterdir())) == 1
    monkeypatch.setenv("STABLELM_REF_TUNE_CACHE", "off")
    for f in tmp_path.iterdir():
        f.unlink()
    _, stages = run()
    assert "alone" in stages and not list(tmp_path.iterdir())


@pytest.mark.parametrize("autotune", [False, True])
def test_a_refused_cluster_launch_falls_back_to_the_global_combine(emulated, autotune):
    """Where the driver refuses the attention's cluster launch (here: the emulated kernels offer clusters, as
    an sm_90 GPU does, and the stand-in has no driver to launch them), capture() drops the clusters, tunes
    again and runs the global-memory combine: the same tokens as a GPU without clusters, the reason kept."""
    model = _models(emulated)[1].model
    ids = np.random.default_rng(4).integers(2, 384, (1, 70))            # 3 live splits of 64 keys
    runs = []
    for cc in (0, 90):
        emulated.compute_capability = cc
        assert (emulated.attention_cluster(3) == 3) == (cc == 90)
        engine = de.GpuDecodeEngine(model.config, model.params, max_batch=1, max_len=160, kernels=emulated,
                                    autotune=autotune, pdl=False)
        engine.att_fit = False           # the grid max_len needs (3 splits), whatever split_tiles the tuner picks
        runs.append(engine_greedy(engine, ids, None, 4))
        attn = [fn for fn in engine._plan(1) if fn.tag == "attention"]
        assert attn[0].grid[0] > 1 and not any(fn.cluster for fn in attn)
        assert engine.att_cluster == (cc == 0) and (engine.att_cluster_error is None) == (cc == 0)
    assert np.array_equal(runs[0], runs[1])


def test_attention_grid_follows_the_cached_keys(emulated):
    """att_fit: each step's attention launches the splits its keys need (one a tile of ATT_TK keys, the new one
    included), captured once a count: a 70-token prompt steps with 2 splits, 3 from 127 cached keys on, where
    the grid for max_len has 7 (its extra splits start and leave). The tokens equal the full grid's, and a graph
    replayed at a length past its splits stays right (the kernel gives each split more tiles)."""
    model = _models(emulated)[1].model
    ids = np.random.default_rng(4).integers(2, 384, (1, 70))
    runs, grids = {}, {}
    for fit in (False, True):
        engine = de.GpuDecodeEngine(model.config, model.params, max_batch=1, max_len=448, kernels=emulated,
                                    autotune=False, pdl=False)
        engine.att_fit = fit
        seen = []
        real = engine.capture

        def spy(nb, _real=real, _seen=seen, _e=engine):
            _seen.append(_e.att_splits(nb))
            return _real(nb)

        engine.capture = spy
        runs[fit] = engine_greedy(engine, ids, None, 64)            # cached keys 70 .. 132
        grids[fit] = sorted(set(seen)), {key[-1] for key in engine._graphs}
    assert grids[False] == ([7], {7})
    assert grids[True] == ([2, 3], {2, 3})
    assert np.array_equal(runs[False], runs[True])
    engine.att_fit = False                                          # (the last engine: fitted, at 133 keys)
    engine.prefill(ids, None, logits=None)
    engine.att_fit = True
    g = engine.capture(1)                                           # 2 splits for 71 keys ...
    for _ in range(63):
        g.launch(engine.stream)                                     # ... replayed up to 133
        engine._host_len += 1
        engine._host_step += 1
    assert np.array_equal(engine.generated()[:, :64], runs[False])


def test_cluster_launch_attribute_as_the_driver_reads_it(emulated, monkeypatch):
    """PdlLauncher hands cuLaunchKernelEx a CUlaunchAttribute array as cuda.h lays it out (id, 4 bytes of
    padding, a 64-byte value union whose clusterDim is {x, y, z} at its start): a cluster launch of the
    attention carries CLUSTER_DIMENSION (4) = (cluster, 1, 1) beside the programmatic edge (6), a plain one
    neither. (The driver itself is faked: this machine may have none.)"""
    import ctypes
    from types import SimpleNamespace

    from stablelm_ref.cuda import launch as ln

    seen = []

    class Fn:                                     # stands for the driver's cuLaunchKernelEx
        restype = argtypes = None

        def __call__(self, cfg, func, params, extra):
            c = cfg._obj
            attrs = [c.attrs[i] for i in range(c.numAttrs)]
            seen.append(((c.gridDimX, c.gridDimY, c.gridDimZ), c.blockDimX, c.sharedMemBytes,
                         {a.id: (a.value.val, (a.value.dim.x, a.value.dim.y, a.value.dim.z)) for a in attrs}))
            return 0

    monkeypatch.setattr(ctypes, "CDLL", lambda name: SimpleNamespace(cuLaunchKernelEx=Fn()))
    pl = ln.PdlLauncher()
    assert ctypes.sizeof(pl.Attr) == 72 and pl.Attr.value.offset == 8
    fn = SimpleNamespace(kernel=SimpleNamespace(ptr=1234))
    pl.bind(ln.Launch(fn, (5, 32, 2), (128,), (np.int32(7),), smem=4096, cluster=5), 0, programmatic=True)()
    pl.bind(ln.Launch(fn, (5, 32, 2), (128,), (np.int32(7),)), 0, programmatic=False)()
    (grid, block, smem, attrs), (_, _, _, plain) = seen
    assert grid == (5, 32, 2) and block == 128 and smem == 4096
    assert attrs[pl.ATTR_PROGRAMMATIC_STREAM_SERIALIZATION][0] == 1
    assert attrs[pl.ATTR_CLUSTER_DIMENSION][1] == (5, 1, 1) and pl.ATTR_CLUSTER_DIMENSION == 4
    assert plain == {}


def test_cluster_only_where_the_partials_fit(emulated):
    """attention_launch(cluster=True) makes a cluster launch only where the splits' partials fit in shared memory
    beside the tiles: at a limit that holds the tiles alone (what the tuner's attention_fits checks), the same
    launch combines through global memory instead of being refused."""
    emulated.compute_capability = 90
    G, D, KVH, nsplit, max_len = 4, 160, 2, 8, 600
    kc = np.zeros((1, KVH, max_len, D), np.uint16)

    def attention(limit):
        emulated.max_smem = limit
        return emulated.attention_launch(
            np.zeros((1, (G * KVH + 2 * KVH) * D), np.float32), kc, kc, np.zeros(1, np.int32), np.zeros(1, np.int32),
            np.ones((1, max_len), np.uint8), np.ones(D // 4, np.float32), D // 2, nb=1, H=G * KVH, KVH=KVH, D=D,
            out=None, part_o=None, part_ml=None, counters=None, nsplit=nsplit, nbuf=2, cluster=True)

    plain, clustered = emulated.attention_smem(G, D, 2), emulated.attention_smem(G, D, 2, nsplit)
    assert clustered > plain
    assert attention(clustered).cluster == nsplit and attention(clustered).smem == clustered
    launch = attention(plain)
    assert launch.cluster == 0 and launch.smem == plain


def test_argmax_reads_a_row_with_a_cluster_where_the_gpu_has_them(emulated):
    """argmax_launch(cluster=True): ARGMAX_CLUSTER blocks of ARGMAX_CLUSTER_THREADS a row as one cluster on
    sm_90, one block of ARGMAX_THREADS before; the engine's plan follows att_cluster."""
    logits, ints = np.zeros((2, 1000), np.float32), np.zeros(8, np.int32)
    history = np.zeros((4, 2), np.int32)
    for cc, want in ((0, ((1, 2), kn.ARGMAX_THREADS, 0)), (90, ((8, 2), kn.ARGMAX_CLUSTER_THREADS, 8))):
        emulated.compute_capability = cc
        fn = emulated.argmax_launch(logits, ints, history, ints, ints, ints, ints, nb=2, cluster=True)
        assert (fn.grid, fn.block[0], fn.cluster) == want
        assert emulated.argmax_launch(logits, ints, history, ints, ints, ints, ints, nb=2).cluster == 0
    model = _models(emulated)[1].model
    engine = de.GpuDecodeEngine(model.config, model.params, max_batch=1, max_len=64, kernels=emulated,
                                autotune=False)
    for cluster in (True, False):
        engine.att_cluster = cluster
        engine.reset_plans()
        assert engine._plan(1)[-1].cluster == (8 if cluster else 0)


def test_tuning_files_differ_by_shape_gpu_and_setting(emulated, monkeypatch, tmp_path):
    """The file's name hashes what the timings depended on: another model's matrices, another GPU, another
    kernel build, another setting each name another file."""
    monkeypatch.setenv("STABLELM_REF_TUNE_CACHE", str(tmp_path))
    model = _models(emulated)[1].model
    e = de.GpuDecodeEngine(model.config, model.params, max_batch=1, max_len=16, kernels=emulated, autotune=True,
                           pdl=False)
    base = tune.cached(e, 1)
    assert base.parent == tmp_path and tune.cached(e, 1) == base and tune.cached(e, 2) != base
    small = _models(emulated, intermediate_size=640)[1].model
    assert tune.cached(de.GpuDecodeEngine(small.config, small.params, max_batch=1, max_len=16, kernels=emulated,
                                          autotune=True, pdl=False), 1) != base
    for name, value in (("device_name", "another GPU"), ("source", "cubin decode-0123-sm_90.cubin")):
        monkeypatch.setattr(emulated, name, value)
        assert tune.cached(e, 1) != base
        monkeypatch.undo()
        monkeypatch.setenv("STABLELM_REF_TUNE_CACHE", str(tmp_path))
    e.att_cluster = False
    assert tune.cached(e, 1) != base
    e.att_cluster = True
    e.tune_cache = False
    assert tune.cached(e, 1) is None


def test_every_probe_variant_still_finds_the_lines_it_changes():
    """tools/decode_probe.py's compile-time variants (and decode_timeline.py's build) are text changes to
    decode.cu: one whose line a kernel edit changed stops a probe run on the GPU ('decode.cu no longer has the line
    it changes', as att-wait-exit did after the attention's cluster start came in). Checked here, on the CPU, for
    the working tree's decode.cu, so that such an edit fails the suite rather than a later session's device
    time."""
    tools = str(Path(__file__).parents[1] / "tools")
    sys.path.insert(0, tools)
    try:
        import decode_probe as dp
        import decode_timeline as dt
    finally:
        sys.path.remove(tools)
    from stablelm_ref.cuda import launch

    src = launch.SOURCE.read_text()
    lost = [name for name, patch in dp.VARIANTS.items() if patch is not None and patch(src) is None]
    assert not lost, f"decode_probe variants whose lines decode.cu no longer has: {lost}"
    same = [name for name, patch in dp.VARIANTS.items() if patch is not None and patch(src) == src]
    assert not same, f"decode_probe variants that change nothing in decode.cu (they would time the shipped code): {same}"
    assert dt.timeline_source(src).endswith(src)
    # decode_timeline --variant: the variant's change, then the timeline's header before it
    varied = dp.VARIANTS["oproj-early1"](src)
    assert varied != src and dt.timeline_patch("oproj-early1")(src) == dt.timeline_source(varied)
    assert dt.timeline_patch(None) is dt.timeline_source
    for bad in ("default", "att-w8", "no-such-variant"):
        with pytest.raises(ValueError, match="not a decode_probe text variant"):
            dt.timeline_patch(bad)


# What a kernel of the step writes and a later kernel reads: decode.cu's names for it, as parameters and locals
STEP_WRITTEN = {"x", "xv", "xr", "xrow", "qkv", "ln_stats", "logits", "row", "cand_val", "cand_idx", "stepp"}


def test_what_the_step_writes_is_never_read_through_the_non_coherent_path():
    """decode.cu reads what an earlier kernel of the step wrote through pointers that are not const __restrict__
    (see its PDL comment): with one, the compiler uses the non-coherent path and ptxas may schedule the load before
    griddepcontrol.wait, under PDL while the predecessor still writes it (seen on sm_90, CUDA 13.0: the LayerNorm
    statistics read before the wait, NaN logits). The GPU tests cannot catch it: where the load lands is the
    scheduler's choice of the day. Checked on the text: no const __restrict__ declaration and no __ldg names that
    data (the regex must find the weights' declarations of that form, so that it cannot pass vacuously)."""
    import re

    from stablelm_ref.cuda import launch

    src = launch.SOURCE.read_text()
    declared = re.findall(r"const\s+\w+\s*\*\s*__restrict__\s+(\w+)", src)
    assert "W" in declared                           # the weights: the form is found where it is right
    bad = sorted(set(declared) & STEP_WRITTEN)
    assert not bad, f"decode.cu declares step-written data const __restrict__: {bad}"
    for call in re.findall(r"__ldg\(([^;]*)\)", src):
        assert not set(re.findall(r"(?<![.\w])\w+", call)) & STEP_WRITTEN, f"__ldg of step-written data: {call}"


def _fma(a: float, b: float, c: float) -> float:
    """a * b + c with one rounding (exact rational arithmetic; float(Fraction) rounds to nearest, ties to even)."""
    return float(Fraction(a) * Fraction(b) + Fraction(c))


@settings(max_examples=2000, deadline=None)
@given(k=hst.one_of(hst.sampled_from([2048, 2560, 5120, 64, 96, 160]), hst.integers(1, 1 << 16)),
       s=hst.one_of(hst.floats(-1e7, 1e7, allow_nan=False), hst.floats(0.0, 1e14),
                   hst.floats(-1e-3, 1e-3, allow_nan=False, allow_subnormal=False)))
def test_the_folded_layernorm_quotient_is_the_division(k, s):
    """decode.cu's folded LayerNorm takes mean = sum x / K and E[x^2] = sum x^2 / K without dividing after its
    wait: rK = RN(1 / K) before it, then q0 = RN(s rK), q = RN(q0 + (s - K q0) rK) with fused multiply-adds
    (Markstein's correction), which its comment says is RN(s / K), so that h is bit for bit what the division gave.
    Checked here in exact arithmetic over the family's hidden sizes and any K up to 65536, for sums of K float32
    values of either sign, sums of squares and values near zero."""
    rk = 1.0 / k
    q0 = s * rk
    q = _fma(_fma(-float(k), q0, s), rk, q0)
    assert q == s / k, (k, s, q, s / k)


def test_probe_changes_the_tuning_and_puts_it_back(emulated):
    """tools/decode_probe.py's changed(): a GEMV shape field or a kind's launch carveout changed for the block's
    duration (the plan's launches carry the carveout), the tuning, attention shape, step time and carveouts put
    back afterwards, also when the block raises; parse_changes refuses what is not KIND.FIELD=INT."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    import decode_probe as dp
    emulated.num_sms = 1
    model = _models(emulated)[1].model
    engine = de.GpuDecodeEngine(model.config, model.params, max_batch=1, max_len=16, kernels=emulated, pdl=False)
    engine.prefill(np.random.default_rng(2).integers(2, 384, (1, 6)), logits=None)
    engine.decode_step()
    before = engine.tuning_state()
    down = engine.tuning[1]["down"]
    ch = dp.parse_changes(f"down.persist={down.persist + 1},attention.carveout=50")
    assert ch == [("down", "persist", down.persist + 1), ("attention", "carveout", 50)]
    with pytest.raises(RuntimeError):
        with dp.changed(engine, ch):
            assert engine.tuning[1]["down"] == down._replace(persist=down.persist + 1)
            plan = engine._plan(1)
            assert {fn.carveout for fn in plan if fn.tag == "attention"} == {50}
            assert {fn.carveout for fn in plan if fn.tag != "attention"} == {None}
            raise RuntimeError("the block fails")
    assert engine.tuning_state() == before and engine.carveout == {}
    assert {fn.carveout for fn in engine._plan(1)} == {None}
    for bad in ("down.persist", "down.color=1", "down.persist=x"):
        with pytest.raises(SystemExit, match="KIND.FIELD=INT"):
            dp.parse_changes(bad)


def test_emulated_prefill_and_steps(emulated):
    _needs_transformers()
    cfg, params, _ = make_model(CONFIGS["3b-like MHA, D=80"])
    ids, mask = left_padded_batch(np.random.default_rng(2), cfg.vocab_size, [5, 9])
    engine = de.GpuDecodeEngine(cfg, params, max_batch=2, max_len=24, kernels=emulated, autotune=False)
    out = engine_greedy(engine, ids, mask, 7)
    assert out.shape == (2, 7)
    assert np.array_equal(out, engine_greedy(engine, ids, mask, 7))        # a second prompt starts afresh


def test_emulated_errors(emulated):
    _needs_transformers()
    cfg, params, _ = make_model(CONFIGS["3b-like MHA, D=80"])
    engine = de.GpuDecodeEngine(cfg, params, max_batch=1, max_len=8, kernels=emulated, autotune=False)
    with pytest.raises(de.GenerationError, match="prefill"):
        engine.decode_step()
    with pytest.raises(de.GenerationError, match="max_batch"):
        engine.prefill(np.ones((2, 3), np.int64))
    with pytest.raises(de.GenerationError, match="max_len"):
        engine.prefill(np.ones((1, 8), np.int64))
    with pytest.raises(de.GenerationError, match="1 to 8 rows"):
        engine.reserve(9, 8)
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
    ours = bf16.f32_to_bf16_bits(x)
    ref = specs.ref_f64_to_bf16(x)
    assert np.array_equal(ours[3:], ref[3:]) and np.isnan(specs.ref_bf16_to_f64(ours[:1])).all()
    assert np.array_equal(ours[1:3], ref[1:3])


# ----------------------------------------------------------------------------- generate() through the engine
# generation.py's one loop with fast_gpu.EngineSteps as its step backend: the prefill is the model's own
# forward (bfloat16, NumPy through ml_dtypes here) writing into views of the engine's cache, every later
# token one (emulated) graph replay. The reference is the same weights in float32 through the concept
# modules, teacher-forced on the generated tokens: the engine's bf16 activations and cache keep the logits
# within ~1e-2 of it (decode_cases.py), so every greedy pick whose float32 top-2 margin exceeds 0.25 (ten
# times that error at these logit scales, |z| ~ 1-3) must be the reference's argmax.
from stablelm_ref import StableLmConfig, StableLmForCausalLM  # noqa: E402
from stablelm_ref import fast_gpu  # noqa: E402
from stablelm_ref.generation import generate  # noqa: E402

MARGIN = 0.25


def _gpu_form(model, kernels):
    """model.fast() of a CPU bfloat16 model marked as on the GPU: GpuFastModel over NumPy and the emulated engine
    (built on the first generate)."""
    model.device = "gpu"
    return fast_gpu.GpuFastModel(model, autotune=False, kernels=kernels)


def _models(kernels, **overrides):
    import ml_dtypes

    c = dict(vocab_size=384, hidden_size=320, intermediate_size=864, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, eos_token_id=None, pad_token_id=1)
    c.update(overrides)
    ref = StableLmForCausalLM.from_config(StableLmConfig(**c), seed=7, std=0.08)
    bf = np.dtype(ml_dtypes.bfloat16)
    ref.params = {k: v.astype(bf).astype(np.float32) for k, v in ref.params.items()}   # bf16 values exactly
    model = StableLmForCausalLM(ref.config, {k: v.astype(bf) for k, v in ref.params.items()})
    return ref, _gpu_form(model, kernels)


def _check_greedy(ref, out, prompt_len, mask, decided_at_least=0.5):
    full_mask = np.concatenate([mask, np.ones((out.shape[0], out.shape[1] - prompt_len), np.int64)], axis=1)
    pos = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0)
    z = ref(out, attention_mask=full_mask, position_ids=pos).logits[:, prompt_len - 1:-1]   # [B, new, V]
    top2 = np.sort(z, axis=-1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > MARGIN
    agree = np.argmax(z, axis=-1) == out[:, prompt_len:]
    assert agree[decided].all() and decided.mean() > decided_at_least, (agree, decided)


def test_generate_through_engine_steps_greedy_left_padded(emulated):
    ref, fast = _models(emulated)
    ids, mask = left_padded_batch(np.random.default_rng(4), 384, [7, 3, 5])
    steps_seen = []
    real_step = fast_gpu.EngineSteps.step

    def spy(self, *a, **k):
        steps_seen.append(k["fused"])
        return real_step(self, *a, **k)

    generate(fast, ids[:1], attention_mask=mask[:1], max_new_tokens=2, engine="fast")    # the engine at batch 1
    fast_gpu.EngineSteps.step = spy
    try:
        out = generate(fast, ids, attention_mask=mask, max_new_tokens=6, engine="fast")
    finally:
        fast_gpu.EngineSteps.step = real_step
    assert out.shape == (3, 7 + 6) and np.array_equal(out[:, :7], ids)
    assert steps_seen == [True] * 5                        # every token after the first: one engine replay
    assert fast.engine.max_batch == 3 and fast.engine.max_len >= 13      # reserve() grew the cache
    _check_greedy(ref, out, 7, mask)
    # the engine's history holds the loop's tokens, and the one step queued ahead of the loop (greedy)
    assert fast.engine.generated().shape == (3, 6 + 1)
    assert np.array_equal(fast.engine.generated()[:, :6], out[:, 7:])


def test_generate_through_engine_steps_eos_pad_streamer(emulated):
    ref, fast = _models(emulated)
    ids, mask = left_padded_batch(np.random.default_rng(5), 384, [6, 4])
    free = generate(fast, ids, attention_mask=mask, max_new_tokens=8, engine="fast")
    eos = int(free[0, 6 + 2])                               # row 0's third new token

    class Streamer:
        def __init__(self):
            self.parts = []

        def put(self, v):
            self.parts.append(np.asarray(v).copy())

        def end(self):
            self.parts.append(None)

    st = Streamer()
    cut = generate(fast, ids[:1], attention_mask=mask[:1], max_new_tokens=8, eos_token_id=eos, engine="fast",
                   streamer=st)
    stop = 6 + int(np.argmax(free[0, 6:] == eos)) + 1
    assert np.array_equal(cut[0], free[0, :stop])           # stops at the first eos
    assert np.array_equal(np.concatenate([p.reshape(-1) for p in st.parts[1:-1]]), free[0, 6:stop])
    both = generate(fast, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=3,
                    engine="fast")
    for b in range(2):
        hit = np.nonzero(free[b, 6:] == eos)[0]
        end = 6 + (hit[0] + 1 if hit.size else 8)
        assert np.array_equal(both[b, :end], free[b, :end])
        assert (both[b, end:] == 3).all()                 # a finished row emits pad (and is fed pad)


def test_generate_through_engine_steps_sampling(emulated, monkeypatch):
    """Seeded sampling is reproducible; top_k=1 is greedy; a huge repetition penalty forbids repeats; the
    step's own sampler (sample_step, emulated by its spec) draws what the loop's processors draw on the
    same logits with the same seed (with it turned off, the loop processes engine.logits_buf)."""
    ref, fast = _models(emulated)
    ids, mask = left_padded_batch(np.random.default_rng(6), 384, [5, 5])
    kw = dict(attention_mask=mask, max_new_tokens=6, engine="fast")
    settings = [dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.3, seed=2),
                dict(do_sample=True, temperature=1.2, top_k=0, seed=3), dict(repetition_penalty=2.0)]
    in_graph = [generate(fast, ids, **s, **kw) for s in settings]
    assert fast.engine.sampler is not None                                  # sample_step ran in the graph
    with monkeypatch.context() as patch:              # (undo() would undo the emulated fixture's CuPy too)
        patch.setattr(kn.DecodeKernels, "sampler_covers", staticmethod(lambda settings, vocab: False))
        for s, a in zip(settings, in_graph):
            assert np.array_equal(generate(fast, ids, **s, **kw), a), s
        assert fast.engine.sampler is None
    a = generate(fast, ids, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=11, **kw)
    b = generate(fast, ids, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=11, **kw)
    assert np.array_equal(a, b)
    greedy = generate(fast, ids, **kw)
    assert np.array_equal(generate(fast, ids, do_sample=True, top_k=1, seed=3, **kw), greedy)
    pen = generate(fast, ids, repetition_penalty=1e6, **kw)
    for row in pen:                                        # a huge penalty: no new token repeats a present one
        new = row[5:].tolist()
        assert len(set(new)) == len(new) and not set(new) & set(row[:5].tolist())


def test_step_backend_choice(emulated):
    from stablelm_ref.generation import ModelSteps, step_backend

    ref, fast = _models(emulated)
    assert isinstance(step_backend(fast, 2, 10, "fast"), fast_gpu.EngineSteps)
    assert isinstance(step_backend(fast, 9, 10, "fast"), ModelSteps)          # batch > 8: the forward
    assert isinstance(step_backend(fast, 2, 10, "reference"), ModelSteps)
    assert isinstance(step_backend(ref, 2, 10, "auto"), ModelSteps) and step_backend(ref, 2, 10).model is ref
    with pytest.raises(de.GenerationError, match="engine must be one of"):
        step_backend(ref, 1, 4, "graph")


def test_generate_through_engine_steps_reports_non_finite_logits(emulated, monkeypatch):
    """The fused path (the pick made inside the graph) never picks silently from NaN / Inf logits: the step's
    pick flags them (argmax_step, the sampler), the loop reads the flags with the ids and names the first
    non-finite intermediate, as it does for logits it processes itself (issue 15, class 6)."""
    ref, fast = _models(emulated)
    ids, mask = left_padded_batch(np.random.default_rng(8), 384, [5])
    real_step = fast_gpu.EngineSteps.step
    calls, saved = [], []

    def poisoned(self, *a, **k):
        if len(calls) == 1:                                            # NaN weights: the second replay's logits
            saved.append(self.engine.lm[17].copy())
            self.engine.lm[17] = 0x7FC0
        out = real_step(self, *a, **k)
        calls.append(k["fused"])
        return out

    monkeypatch.setattr(fast_gpu.EngineSteps, "step", poisoned)
    # greedy and sampling run one step ahead: the step after the poison was queued already, the one after it
    # is poisoned
    for settings, poisoned_call in ((dict(), 3), (dict(do_sample=True, temperature=0.8, top_k=50, seed=1), 3)):
        calls.clear()
        with pytest.raises(de.GenerationError, match="not finite"):
            generate(fast, ids, attention_mask=mask, max_new_tokens=6, engine="fast", **settings)
        assert calls == [True] * poisoned_call                           # it stopped at the poisoned step
        fast.engine.lm[17] = saved.pop()


def test_generate_through_engine_steps_tensor_core_gemv_plan(emulated):
    """Every GEMV of the step on the tensor-core kernel (as the tuner may choose at batch > 1): the launches
    it builds (kernel, grid over 16- or 32-row tiles, persistent grids) give the CUDA-core plan's tokens."""
    ref, fast = _models(emulated)
    ids, mask = left_padded_batch(np.random.default_rng(4), 384, [7, 3])
    want = generate(fast, ids, attention_mask=mask, max_new_tokens=5, engine="fast")
    engine = fast.engine
    for rows, unroll, persist in ((16, 4, 0), (32, 2, 1)):
        engine.tuning[2] = {name: tune.GemvShape(rows, 128, persist, 0.0, 0.0, unroll)
                            for name in engine._gemv_shapes()}
        engine._forget(2)
        engine._graphs.clear()
        plan = [fn for fn in engine._plan(2) if fn.tag.startswith("gemv")]
        groups = [-(-int(fn.args[4]) // rows) for fn in plan]                  # ceil(N / rows)
        assert all(fn.fn.static["rows"] == rows and fn.fn in emulated.mma_fn.values() for fn in plan)
        assert [fn.grid[0] for fn in plan] == [min(g, emulated.num_sms) if persist else g for g in groups]
        assert np.array_equal(generate(fast, ids, attention_mask=mask, max_new_tokens=5, engine="fast"), want)
    with pytest.raises(ValueError, match="gemv_mma"):
        emulated.gemv_launch(engine.h, engine.layers[0].wo, nb=2, mode=kn.MODE_STORE, yf=engine.x, rows=8, unroll=4)


@pytest.mark.parametrize("settings", [dict(), dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=4),
                                      dict(do_sample=True, temperature=1.2, top_k=0, repetition_penalty=1.3, seed=5)])
def test_picks_read_from_the_host_ring_without_a_copy(emulated, monkeypatch, settings):
    """Where the engine has mapped host memory (a GPU; here a NumPy array stands for both views), the step's
    argmax / sampler put each row's pick, flag and step number into ring slot step % PICK_RING and generate
    reads them there, no copy queued in the stream: the same tokens as the copy path (eos and pad included). A
    slot overwritten by later steps (more than PICK_RING - 1 queued after the one asked for) is not read:
    the picks come from that step's history row."""
    ref, fast = _models(emulated)
    ids, mask = left_padded_batch(np.random.default_rng(5), 384, [6, 4])
    kw = dict(attention_mask=mask, max_new_tokens=9, engine="fast", pad_token_id=3, **settings)
    plain = generate(fast, ids, **kw)
    assert fast.engine.ring is None                            # the stand-in backend: copies
    kw["eos_token_id"] = int(plain[0, 6 + 3])
    plain_eos = generate(fast, ids, **kw)
    copies = []
    monkeypatch.setattr(cuda_xp, "mapped_host", lambda cp, shape, dtype: (lambda a: (a, a))(np.zeros(shape, dtype)))
    monkeypatch.setattr(cuda_xp.BACKEND, "asnumpy",
                        lambda a, **k: copies.append(k.get("out") is not None) or _asnumpy(a, **k))
    fast.model.params = dict(fast.model.params)                 # an edit: the engine is built again, with a ring
    del kw["eos_token_id"]
    assert np.array_equal(generate(fast, ids, **kw), plain)
    e = fast.engine
    assert e.ring is not None and e.ring is e.ring_host and not any(copies)
    kw["eos_token_id"] = int(plain[0, 6 + 3])
    assert np.array_equal(generate(fast, ids, **kw), plain_eos)
    e.prefill(ids, mask, logits=None)                          # the engine alone: a slot written over
    e.decode_step()
    e.queue_picks_copy()
    for _ in range(kn.PICK_RING):
        e.decode_step()
    got = e.read_picks()
    assert np.array_equal(got[0, :2], e.generated()[:, 1]) and not got[1, :2].any()
    e.decode_step()
    e.queue_picks_copy()
    assert np.array_equal(e.read_picks()[0, :2], e.generated()[:, -1])


def test_generate_through_engine_steps_sampling_runs_ahead_on_drawn_uniforms(emulated):
    """Sampling in the step takes every step's draws at once (one upload) and runs one step ahead like greedy:
    the engine's history holds the loop's tokens and one queued step more; the tokens equal a run that uploads
    each step's draws separately (the draws a step at a time, as before) for the same seed."""
    ref, fast = _models(emulated)
    ids, mask = left_padded_batch(np.random.default_rng(9), 384, [6, 4])
    kw = dict(attention_mask=mask, max_new_tokens=7, engine="fast", do_sample=True, temperature=0.8, top_k=50,
              top_p=0.9, repetition_penalty=1.2, seed=5)
    uploads = []
    real = de.GpuDecodeEngine.set_draws

    def spy(self, draws):
        uploads.append(np.asarray(draws).shape)
        return real(self, draws)

    de.GpuDecodeEngine.set_draws = spy
    try:
        out = generate(fast, ids, **kw)
    finally:
        de.GpuDecodeEngine.set_draws = real
    assert uploads == [(6, 2)]                                # 7 new tokens: the first from the prefill's logits
    assert fast.engine.generated().shape == (2, 7 + 1)
    assert np.array_equal(fast.engine.generated()[:, :7], out[:, 6:])
    one_at_a_time = fast_gpu.EngineSteps.use_draws
    fast_gpu.EngineSteps.use_draws = lambda self, draws: None        # step() then uploads each step's u
    try:
        assert np.array_equal(generate(fast, ids, **kw), out)
        assert fast.engine.generated().shape == (2, 7)        # and, without the table, nothing runs ahead
    finally:
        fast_gpu.EngineSteps.use_draws = one_at_a_time


@pytest.mark.parametrize("parallel", [False, True])
def test_generate_through_engine_steps_folded_layernorms(emulated, parallel):
    """Batch 1 folds the LayerNorms into the GEMVs that read them: no LayerNorm kernel, q|k|v, gate|up and
    lm_head on gemv_ln (the float32 residual and the statistics embed_rows, o_proj and down accumulate, instance
    by instance, the last layer's down the final LayerNorm's); the tokens equal the step's with the final
    LayerNorm as a kernel, the unfolded step's and the float32 reference's picks. A parallel residual keeps its
    LayerNorm kernels (gate|up reads LN1 of x before o_proj's add)."""
    ref, fast = _models(emulated, use_parallel_residual=parallel)
    ids = np.random.default_rng(12).integers(2, 384, (1, 7))
    mask = np.ones_like(ids)
    folded = generate(fast, ids, attention_mask=mask, max_new_tokens=6, engine="fast")
    engine = fast.engine
    plan = engine._plan(1)
    n_layers = len(engine.layers)
    assert [fn.tag for fn in plan].count("layernorm") == (n_layers + 1 if parallel else 0)
    ln_gemvs = [fn for fn in plan if fn.fn in emulated.gemv_ln_fn.values()]
    assert [fn.tag for fn in ln_gemvs] == ([] if parallel else ["gemv:qkv", "gemv:gate_up"] * n_layers + ["gemv:lm_head"])
    _check_greedy(ref, folded, 7, mask)
    engine.fold_final_layernorm = False
    engine.reset_plans()
    try:
        final_kernel = generate(fast, ids, attention_mask=mask, max_new_tokens=6, engine="fast")
        assert [fn.tag for fn in engine._plan(1)].count("layernorm") == (n_layers + 1 if parallel else 1)
    finally:
        engine.fold_final_layernorm = True
        engine.reset_plans()
    assert np.array_equal(folded, final_kernel)
    engine.fold_layernorm = False
    engine.reset_plans()
    try:
        plain = generate(fast, ids, attention_mask=mask, max_new_tokens=6, engine="fast")
        assert [fn.tag for fn in engine._plan(1)].count("layernorm") == len(engine.layers) * (1 + (not parallel)) + 1
    finally:
        engine.fold_layernorm = True
        engine.reset_plans()
    assert np.array_equal(folded, plain)


def test_step_layout_sizes_the_whole_step_kernel():
    """decode_step.cu's shared memory at the family's shapes (the H100 / H200 opt-in maximum, 227 KB): each of
    the 16 warps' rings holds as many 4 KB slots as fit beside h, the staged att / mlp vector (or two warps'
    attention scratch: 3b-4e1t 2 x 144 x 80 bytes) and the fixed head; shapes it cannot hold are named with the
    reason."""
    smem = 227 * 1024
    assert kn.step_layout(2560, 6912, 80, smem) == (23040, 3, 1024 + 5120 + 23040 + 3 * 16 * 4096)   # 3b-4e1t
    assert kn.step_layout(2048, 5632, 64, smem)[1] == 3                                             # 2-1.6b
    vec, nslot, total = kn.step_layout(5120, 13824, 160, smem)                                      # 2-12b
    assert nslot == 2 and total <= smem
    assert kn.step_layout(2560, 6912, 80, smem, slot=2048)[1] == kn.MK_MAXSLOT
    assert "hidden_size 8192" in kn.step_layout(8192, 22016, 128, smem)
    assert "at least 2048" in kn.step_layout(2560, 6912, 80, smem, slot=1024)
    assert "two ring slots" in kn.step_layout(2560, 6912, 80, 64 * 1024)


def test_step_parts_bounds_the_attentions_split():
    """The whole-step kernel's attention parts a head: the partials' buffers' ns, one part a warp for the first
    MK_AW warps of each block, MK_PMAX (3b-4e1t: 32 heads on 132 SMs x 2 warps take 8 parts each)."""
    assert kn.step_parts(32, 5, 132) == 5
    assert kn.step_parts(32, 40, 132) == kn.MK_PMAX == 8
    assert kn.step_parts(160, 40, 132) == 1


def test_emulated_engine_keeps_the_per_layer_step(emulated):
    """The emulated kernels have no whole-step kernel (no compute capability): the engine plans the per-layer
    step at batch 1 unless told megakernel=True, which is an error saying why."""
    model = _models(emulated)[1].model
    engine = de.GpuDecodeEngine(model.config, model.params, max_batch=1, max_len=16, kernels=emulated, autotune=False)
    assert "compute capability" in engine.step_kernel_problem()
    assert not engine.uses_step_kernel(1) and "step" not in {fn.tag for fn in engine._plan(1)}
    engine.megakernel = True
    with pytest.raises(NotImplementedError, match="whole-step kernel cannot run here: needs bulk copies"):
        engine._plan(1)


# ----------------------------------------------------------------------------- the GPU form follows its model
def _edited_pair(ref, model, name, make):
    """params[name] replaced, in the bfloat16 model and in its float32 reference alike."""
    import ml_dtypes

    ref.params[name] = make(ref.params[name])
    model.params[name] = ref.params[name].astype(ml_dtypes.bfloat16)


def test_gpu_form_follows_edits_of_the_model(emulated):
    """The engine's copies follow params, config and dtype as the CPU form's do (fast_forms.Source): after a tensor
    replaced, two swapped, a config field edited, the next generate builds the engine again (its tuning kept), and
    the tokens follow the edited model; a config the engine does not cover (scaled rope) or a tensor of another
    dtype steps through the model's forward (the stale engine freed meanwhile). (A third of the picks or more are
    decided by the float32 margin.) The engine kept its first copies: it generated the unedited model's tokens after
    the first (which the model's own forward gives)."""
    ref, fast = _models(emulated)
    model = fast.model
    ids, mask = left_padded_batch(np.random.default_rng(4), 384, [7, 3])
    kw = dict(attention_mask=mask, max_new_tokens=6, engine="fast")
    _check_greedy(ref, generate(fast, ids, **kw), 7, mask, 0.3)
    first = fast.engine
    first.tuning[2]["qkv"] = tune.DEFAULT_GEMV._replace(us=123.0)              # a tuning to keep
    first.fold_layernorm = False
    _edited_pair(ref, model, "model.layers.0.self_attn.o_proj.weight", lambda w: -w)
    _check_greedy(ref, generate(fast, ids, **kw), 7, mask, 0.3)
    assert fast.engine is not first and fast.engine.tuning[2]["qkv"].us == 123.0 and not fast.engine.fold_layernorm
    g, u = "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"
    for p in (ref.params, model.params):
        p[g], p[u] = p[u], p[g]
    _check_greedy(ref, generate(fast, ids, **kw), 7, mask, 0.3)
    model.config.layer_norm_eps = 0.5                                          # the reference's config too
    _check_greedy(ref, generate(fast, ids, **kw), 7, mask, 0.3)
    model.config.rope_scaling = {"rope_type": "linear", "factor": 4.0}
    assert generate(fast, ids, **kw).shape == (2, 13) and "rotary" in fast.unsupported
    assert fast.engine is None                                                 # stale: freed, its tuning kept
    _check_greedy(ref, generate(model, ids, **{**kw, "engine": "reference"}), 7, mask, 0.3)
    model.config.rope_scaling = None
    assert np.array_equal(generate(fast, ids, **kw), generate(model, ids, **{**kw, "engine": "reference"}))
    assert fast.unsupported is None and fast.engine.tuning[2]["qkv"].us == 123.0
    model.params["model.norm.bias"] = model.params["model.norm.bias"].astype(np.float32)
    generate(fast, ids, **kw)
    assert "model.norm.bias" in fast.unsupported


def test_gpu_form_is_the_models_one(emulated, monkeypatch):
    """GpuFastModel(model), model.fast() and copy.copy of either are one form with one engine (a second form built
    a second engine of the same weights, and made params views of its fused arrays: edits in place then reached
    only one of them); copy.deepcopy and pickle carry the form of the carried model (they failed: "cannot pickle
    'module' object"), which generates the same tokens."""
    import copy
    import pickle

    from stablelm_ref import model as model_module

    ref, fast = _models(emulated)
    model = fast.model
    assert fast_gpu.GpuFastModel(model) is fast and model.fast() is fast and copy.copy(fast) is fast
    ids = np.random.default_rng(5).integers(2, 384, (1, 6))
    want = generate(model, ids, max_new_tokens=5)                          # device "gpu": the engine (auto)
    assert fast.engine is not None
    monkeypatch.setattr(model_module, "array_module", lambda device: np)    # the carried model's "GPU"
    for twin in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert type(twin) is fast_gpu.GpuFastModel and twin.model is not model and twin.engine is None
        assert twin.model.fast() is twin
        twin.kernels = emulated
        assert np.array_equal(generate(twin.model, ids, max_new_tokens=5), want)


def test_engine_grows_again_after_a_failed_allocation(emulated, monkeypatch):
    """A generate whose engine had to grow and failed to (out of memory, a Ctrl-C) leaves the engine usable: it kept
    a mix of new and old buffers and its old plans, which the next generate of that size stepped through."""
    ref, fast = _models(emulated)
    ids, mask = left_padded_batch(np.random.default_rng(6), 384, [5, 3])
    generate(fast, ids[:1], attention_mask=mask[:1], max_new_tokens=3, engine="fast")
    real = emulated.sample_scratch

    def out_of_memory(*a):
        raise MemoryError("out of memory allocating 1,024 bytes")
    monkeypatch.setattr(emulated, "sample_scratch", out_of_memory)        # after the cache, before the rest
    with pytest.raises(MemoryError):
        generate(fast, ids, attention_mask=mask, max_new_tokens=6, engine="fast")
    monkeypatch.setattr(emulated, "sample_scratch", real)
    out = generate(fast, ids, attention_mask=mask, max_new_tokens=6, engine="fast")
    _check_greedy(ref, out, 5, mask)
    assert fast.engine.part_o.shape[0] == 2
    # a rebuild interrupted after the engine was made, before the model's params were its views (a Ctrl-C): the
    # next generate builds it again (it failed with AttributeError: 'NoneType' object has no attribute 'same')
    fast.model.params["model.norm.bias"] = fast.model.params["model.norm.bias"].copy()
    def interrupted(self):
        raise KeyboardInterrupt
    share = fast_gpu.GpuFastModel._share_weights
    fast_gpu.GpuFastModel._share_weights = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            generate(fast, ids, attention_mask=mask, max_new_tokens=6, engine="fast")
    finally:
        fast_gpu.GpuFastModel._share_weights = share
    assert np.array_equal(generate(fast, ids, attention_mask=mask, max_new_tokens=6, engine="fast"), out)


def test_generates_from_two_threads_take_turns_on_the_engine(emulated, monkeypatch):
    """The engine's cache and device state are one generate's: a second thread's generate started while the first
    is in its loop waits for it (it overwrote the first's cache and state, whose later tokens then came from the
    second's prompt); one started while the first is in its streamer's put (which may be waiting for it: it waited
    for the first's engine, a deadlock) or inside a generate (from the streamer) steps through the model's forward."""
    import threading

    ref, fast = _models(emulated)
    a_ids = np.random.default_rng(7).integers(2, 384, (1, 6))
    b_ids = np.random.default_rng(8).integers(2, 384, (2, 5))
    kw = dict(max_new_tokens=6, engine="fast")
    want_a, want_b = generate(fast, a_ids, **kw), generate(fast, b_ids, **kw)
    forward_b = generate(fast.model, b_ids, **{**kw, "engine": "reference"})
    b_started, got = threading.Event(), {}
    real_step = fast_gpu.EngineSteps.step

    def step(self, *a, **k):                     # A's first step: B starts, and A goes on 0.2 s later
        if threading.current_thread() is threading.main_thread() and not b_started.is_set():
            b_started.set()
            threading.Event().wait(0.2)
        return real_step(self, *a, **k)

    def run_b():
        b_started.wait()
        got["b"] = generate(fast, b_ids, **kw)

    monkeypatch.setattr(fast_gpu.EngineSteps, "step", step)
    thread = threading.Thread(target=run_b)
    thread.start()
    got["a"] = generate(fast, a_ids, **kw)
    thread.join()
    assert np.array_equal(got["a"], want_a) and np.array_equal(got["b"], want_b)
    monkeypatch.setattr(fast_gpu.EngineSteps, "step", real_step)

    inner = {}

    class Joining:                               # a put that starts B in another thread and waits for it
        n = 0

        def put(self, v):
            self.n += 1
            if self.n == 3:
                thread = threading.Thread(target=lambda: inner.update(out=generate(fast, b_ids, **kw),
                                                                      reason=fast.unsupported))
                thread.start()
                thread.join(timeout=10)
                assert not thread.is_alive(), "the inner generate waits for the outer's engine"

        def end(self):
            pass

    assert np.array_equal(generate(fast, a_ids, streamer=Joining(), **kw), want_a)
    assert "streamer" in inner["reason"] and np.array_equal(inner["out"], forward_b)

    class Nested(Joining):
        def put(self, v):
            self.n += 1
            if self.n == 3:
                inner["out"] = generate(fast, b_ids, **kw)
                inner["reason"] = fast.unsupported

    assert np.array_equal(generate(fast, a_ids, streamer=Nested(), **kw), want_a)
    assert "inside a generate" in inner["reason"] and np.array_equal(inner["out"], forward_b)
    assert np.array_equal(generate(fast, b_ids, **kw), want_b) and fast.unsupported is None


def test_gpu_form_follows_edits_in_place_of_the_vectors(emulated):
    """An edit in place of a LayerNorm weight or bias, a q|k|v bias or a qk-norm weight reaches the engine, as one of
    a matrix does: params hold views of one joined bfloat16 array, which every generate converts into the engine's
    float32 vectors (they were float32 copies made once, and the engine generated the unedited model's tokens)."""
    ref, fast = _models(emulated, use_qkv_bias=True, qk_layernorm=True)
    model = fast.model
    ids, mask = left_padded_batch(np.random.default_rng(4), 384, [7, 3])
    kw = dict(attention_mask=mask, max_new_tokens=6, engine="fast")
    _check_greedy(ref, generate(fast, ids, **kw), 7, mask, 0.3)
    rng = np.random.default_rng(0)
    for name in ("model.norm.weight", "model.layers.0.input_layernorm.bias", "model.layers.1.self_attn.k_proj.bias",
                 "model.layers.0.self_attn.q_layernorm.norms.2.weight",
                 "model.layers.1.post_attention_layernorm.weight"):
        change = rng.uniform(-1.5, 1.5, model.params[name].shape).astype(np.float32)
        ref.params[name] = (ref.params[name] + change).astype(model.params[name].dtype).astype(np.float32)
        model.params[name][...] = ref.params[name]                             # in place
        _check_greedy(ref, generate(fast, ids, **kw), 7, mask, 0.3)


@pytest.mark.parametrize("settings", [dict(), dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=4,
                                                   repetition_penalty=1.3)])
def test_generate_after_an_interrupted_generate(emulated, settings):
    """A streamer raising (or a Ctrl-C) mid-generate, with a step queued ahead of the loop and its draws uploaded:
    the next generate on the engine gives the tokens of one never interrupted."""
    ref, fast = _models(emulated)
    ids, mask = left_padded_batch(np.random.default_rng(3), 384, [6, 4])
    kw = dict(attention_mask=mask, max_new_tokens=7, engine="fast", **settings)
    want = generate(fast, ids, **kw)

    class Raising:
        n = 0

        def put(self, v):
            self.n += 1
            if self.n == 4:
                raise KeyboardInterrupt

        def end(self):
            pass

    other = left_padded_batch(np.random.default_rng(9), 384, [3, 5])
    with pytest.raises(KeyboardInterrupt):
        generate(fast, other[0], **{**kw, "attention_mask": other[1]}, streamer=Raising())
    assert fast._holder is None
    assert np.array_equal(generate(fast, ids, **kw), want)


def test_a_stale_engine_is_freed_before_the_next_is_made(emulated, monkeypatch):
    """An engine made stale by an edit of the model goes before its successor is made, its tuning and settings kept:
    the rebuild held the old engine (its cache and buffers, and the tensors its copies were made of) until the new
    one was made, twice the cache at once; and while the model steps through its forward (an edit the engine does not
    cover: params cast to float32 here), the stale engine held a bfloat16 copy of every weight beside the new ones."""
    import gc
    import weakref

    import ml_dtypes

    ref, fast = _models(emulated)
    model = fast.model
    ids = np.random.default_rng(5).integers(2, 384, (1, 6))
    kw = dict(max_new_tokens=4, engine="fast")
    generate(fast, ids, **kw)
    fast.engine.fold_layernorm = False
    caches = [weakref.ref(fast.engine.kc)]
    alive = []
    real = de.GpuDecodeEngine._allocate_buffers

    def allocate(self):
        gc.collect()
        alive.append(caches[-1]() is not None)
        return real(self)

    monkeypatch.setattr(de.GpuDecodeEngine, "_allocate_buffers", allocate)
    model.params["model.norm.bias"] = model.params["model.norm.bias"].copy()
    generate(fast, ids, **kw)
    assert alive == [False] and not fast.engine.fold_layernorm               # carried
    caches.append(weakref.ref(fast.engine.kc))
    embed = weakref.ref(model.params["model.embed_tokens.weight"])          # the engine reads it in place
    tuning = fast.engine.tuning_state()
    model.params = {k: v.astype(np.float32) for k, v in model.params.items()}
    model.dtype = np.dtype(np.float32)
    generate(fast, ids, **kw)
    gc.collect()
    assert "bfloat16" in fast.unsupported and caches[-1]() is None and embed() is None
    model.params = {k: v.astype(ml_dtypes.bfloat16) for k, v in model.params.items()}
    model.dtype = np.dtype(ml_dtypes.bfloat16)
    assert np.array_equal(generate(fast, ids, **kw), generate(model, ids, **{**kw, "engine": "reference"}))
    assert fast.engine.tuning_state() == tuning and not fast.engine.fold_layernorm


def _interrupt_at(code, line):
    """A trace function (sys.settrace) raising KeyboardInterrupt when `code` reaches `line`, once: a Ctrl-C there."""
    done = []

    def local(frame, event, arg):
        if done:
            return None
        if event == "line" and frame.f_lineno == line:
            done.append(line)
            sys.settrace(None)
            raise KeyboardInterrupt
        return local

    return lambda frame, event, arg: local if frame.f_code is code else None


def test_a_ctrl_c_anywhere_in_a_rebuild_or_a_generates_start(emulated):
    """A Ctrl-C at any line of a generate's hold on the engine (EngineSteps.context) or of a rebuild after an edit
    (the stale engine's drop, the build, the params made views of its arrays, the vectors joined and converted):
    the next generate runs through the engine again and gives the model's own tokens."""
    import inspect

    ref, fast = _models(emulated)
    model = fast.model
    ids = np.random.default_rng(5).integers(2, 384, (1, 6))
    kw = dict(max_new_tokens=3, engine="fast")
    generate(fast, ids, **kw)
    want = generate(model, ids, **{**kw, "engine": "reference"})
    functions = [fast_gpu.EngineSteps.context.__wrapped__, fast_gpu.GpuFastModel._engine, fast_gpu.GpuFastModel._drop,
                 fast_gpu.GpuFastModel._share_weights, fast_gpu.GpuFastModel._share_vectors,
                 fast_gpu.GpuFastModel.refresh_vectors, fast_gpu._Kept.__init__, fast_gpu._Kept.carry,
                 fast_gpu.GpuFastModel._turn]
    reached = 0
    for f in functions:
        code = f.__code__
        source = inspect.getsourcelines(f)[0]
        body = sorted({line for _, _, line in code.co_lines() if line is not None and line > code.co_firstlineno
                       and not source[line - code.co_firstlineno].lstrip().startswith(("try:", "with "))})
        for line in body:                    # (not where a trace's exception lands before a with's or try's handler)
            name = "model.norm.bias"
            model.params[name] = model.params[name].copy()                       # a rebuild next
            sys.settrace(_interrupt_at(code, line))
            try:
                generate(fast, ids, **kw)
            except KeyboardInterrupt:
                reached += 1
            finally:
                sys.settrace(None)
            assert np.array_equal(generate(fast, ids, **kw), want), (f.__qualname__, line - code.co_firstlineno)
            assert fast.unsupported is None and not fast._lock.locked(), (f.__qualname__, line - code.co_firstlineno)
    assert reached > 40


def test_gpu_form_follows_edits_in_place_of_a_tensor_it_had_to_copy(emulated):
    """A matrix the engine reads in params' own memory (o_proj, down_proj, the embedding, lm_head) replaced by one
    it must copy (not C-contiguous): params take the copy, so that an edit in place of it still reaches the engine
    (it edited a tensor the engine no longer read, which generated the unedited model's tokens)."""
    ref, fast = _models(emulated)
    model = fast.model
    ids = np.random.default_rng(5).integers(2, 384, (1, 6))
    kw = dict(max_new_tokens=6, engine="fast")
    generate(fast, ids, **kw)
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.embed_tokens.weight", "lm_head.weight"):
        model.params[name] = np.asfortranarray(model.params[name])           # the same values, another layout
        generate(fast, ids, **kw)
        model.params[name][...] = -model.params[name]                         # in place
        assert np.array_equal(generate(fast, ids, **kw), generate(model, ids, **{**kw, "engine": "reference"})), name


def test_a_generate_waits_for_the_callers_stream_before_the_engines(emulated, monkeypatch):
    """The engine's stream is non-blocking (no implicit order with CuPy's default, legacy null stream), so an edit in
    place queued on the caller's stream just before a generate could still be running while the engine's stream built
    the engine, converted the vectors, or ran the prefill and the steps, which then read the unedited values: a
    generate first waits for the caller's current stream (a host wait, ~10 us where nothing is queued)."""
    ref, fast = _models(emulated)
    model = fast.model
    ids = np.random.default_rng(5).integers(2, 384, (1, 6))
    for edit in (lambda: None, lambda: model.params.update({"model.norm.bias": model.params["model.norm.bias"] * 2})):
        edit()                                                    # (the second generate rebuilds the engine)
        monkeypatch.setattr(_Stream, "log", [])
        generate(fast, ids, max_new_tokens=3, engine="fast")
        assert _Stream.log[0] == "null synchronized", _Stream.log[:3]


def test_gpu_fast_model_of_a_model_with_a_form_applies_what_it_asks(emulated):
    """GpuFastModel(model, autotune=...) of a model whose GPU form exists is that form, with the setting asked for (it
    was ignored: GpuFastModel(model, autotune=False) went on tuning); other kernels than its own are refused."""
    ref, fast = _models(emulated)                                       # autotune=False
    generate(fast, np.arange(2, 8)[None], max_new_tokens=2, engine="fast")
    assert fast_gpu.GpuFastModel(fast.model) is fast and not fast.autotune           # nothing asked: as it is
    assert fast_gpu.GpuFastModel(fast.model, autotune=True) is fast and fast.autotune and fast.engine.autotune
    with pytest.raises(fast_gpu.StableLmError, match="exists with other kernels"):
        fast_gpu.GpuFastModel(fast.model, kernels=EmulatedKernels())


def test_two_models_on_one_params_dict_each_build_their_engine_once(emulated, monkeypatch):
    """StableLmForCausalLM(config, model.params) shared the dict: each GPU form's build made its tensors views of its
    own engine's arrays, so the other form saw them replaced and built its engine again, on every generate
    alternating (6 builds in 6 generates). A model keeps a dict of its own (of the same tensors): one build each,
    and each generates its own model's tokens."""
    ref, fast = _models(emulated)
    model = fast.model
    twin = _gpu_form(StableLmForCausalLM(model.config, model.params), emulated)
    assert twin.model.params is not model.params
    ids = np.random.default_rng(5).integers(2, 384, (1, 6))
    kw = dict(max_new_tokens=4, engine="fast")
    want = generate(model, ids, **{**kw, "engine": "reference"})
    builds, real = [], de.GpuDecodeEngine.__init__
    monkeypatch.setattr(de.GpuDecodeEngine, "__init__", lambda self, *a, **k: builds.append(1) or real(self, *a, **k))
    for _ in range(3):
        for form in (fast, twin):
            assert np.array_equal(generate(form, ids, **kw), want)
    assert len(builds) == 2, len(builds)


def test_an_engine_build_that_splits_tied_tensors_says_so(emulated, caplog):
    """Two names of model.params on one array (layer 1's q_proj and down_proj tied to layer 0's): the engine's build
    makes each a view of its layer's fused or contiguous copy, so an edit in place of one no longer reaches the other;
    the build warns, naming them (it split them silently). The engine and the model still generate the same tokens."""
    import logging

    ref, fast = _models(emulated)
    p = fast.model.params
    p["model.layers.1.self_attn.q_proj.weight"] = p["model.layers.0.self_attn.q_proj.weight"]
    p["model.layers.1.mlp.down_proj.weight"] = np.asfortranarray(p["model.layers.0.mlp.down_proj.weight"])
    p["model.layers.0.mlp.down_proj.weight"] = p["model.layers.1.mlp.down_proj.weight"]
    ids = np.random.default_rng(5).integers(2, 384, (1, 6))
    with caplog.at_level(logging.WARNING, logger="stablelm_ref"):
        out = generate(fast, ids, max_new_tokens=4, engine="fast")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("edit both" in m for m in said), said
    assert any("'model.layers.0.mlp.down_proj.weight' and 'model.layers.1.mlp.down_proj.weight'" in m for m in said)
    assert np.array_equal(out, generate(fast.model, ids, max_new_tokens=4, engine="reference"))


def test_a_growth_too_large_for_memory_leaves_the_engine_its_old_size(emulated, monkeypatch):
    """A generate whose engine could not grow (out of memory: a batch or a length more than the device holds) leaves
    the engine its old size: the failed size was kept as the engine's, and every later generate, however small,
    allocated it again and ran out of memory again, until the engine was built anew."""
    ref, fast = _models(emulated)
    ids, mask = left_padded_batch(np.random.default_rng(6), 384, [5, 3])
    kw = dict(attention_mask=mask[:1], max_new_tokens=3, engine="fast")
    want = generate(fast, ids[:1], **kw)
    real = de.GpuDecodeEngine._allocate_buffers

    def allocate(self):                                  # a device that holds one row
        if self.max_batch > 1:
            raise MemoryError("out of memory allocating 1,024 bytes")
        return real(self)

    monkeypatch.setattr(de.GpuDecodeEngine, "_allocate_buffers", allocate)
    with pytest.raises(MemoryError):
        generate(fast, ids, attention_mask=mask, max_new_tokens=3, engine="fast")
    assert np.array_equal(generate(fast, ids[:1], **kw), want) and fast.engine.max_batch == 1


def test_a_generate_waits_for_another_threads_streamed_generate_whose_puts_return(emulated, monkeypatch):
    """A second thread's generate that waits for the engine while the holder streams (each put a few ms: a token
    printed) gets the engine when the holder is done; it gave up at the first put it saw, which with a streamer is
    nearly every poll, and stepped its whole generate through the model's forward. Only a put that lasts
    GpuFastModel.PUT_WAIT (it may be waiting for this generate) makes the waiter step through the forward."""
    import threading
    import time

    ref, fast = _models(emulated)
    a_ids = np.random.default_rng(7).integers(2, 384, (1, 6))
    b_ids = np.random.default_rng(8).integers(2, 384, (2, 5))
    want_b = generate(fast, b_ids, max_new_tokens=6, engine="fast")
    stepped = set()
    real_step = fast_gpu.EngineSteps.step

    def step(self, *a, **k):
        stepped.add(threading.get_ident())
        return real_step(self, *a, **k)

    monkeypatch.setattr(fast_gpu.EngineSteps, "step", step)
    b_may_start, got = threading.Event(), {}

    class Printing:                                 # a put of 5 ms a token, as printing or sending one would take
        n = 0

        def put(self, v):                           # (the first put is the prompt's, before the engine is held)
            self.n += 1
            if self.n == 3:
                b_may_start.set()
            time.sleep(0.005)

        def end(self):
            pass

    def run_b():
        b_may_start.wait()
        got["b"] = generate(fast, b_ids, max_new_tokens=6, engine="fast")
        got["tid"], got["reason"] = threading.get_ident(), fast.unsupported

    thread = threading.Thread(target=run_b)
    thread.start()
    generate(fast, a_ids, max_new_tokens=24, engine="fast", streamer=Printing())
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert got["reason"] is None and got["tid"] in stepped      # B stepped through the engine
    assert np.array_equal(got["b"], want_b)
