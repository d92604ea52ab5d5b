"""Decode-step autotuning: per matrix kind the GEMV's rows per block, threads per block and persistent blocks
per SM, then the attention's shape, then (batch 1, on request) the whole-step kernel or not.

A decode step is memory-bound and its GEMVs are most of it; the best launch shape depends on the matrix
and on its neighbours in the step. Four stages, once per batch size (seconds; the fourth only where
engine.megakernel is None, not the default False):

    1. each kind (q|k|v, o_proj, gate|up, down, lm_head) alone: every candidate (R, T) timed over all
       layers' matrices as a plain graph (at batch > 1 the tensor-core GEMV's shapes too); the best
       TUNE_FINALISTS kept
    2. within the whole step as captured (PDL edges, argmax left out): every finalist at 0-4 persistent
       blocks per SM, then the winner with half its rows a block (fewer registers a thread, so that a
       neighbouring kernel's blocks fit beside it) at 0-4 persistent blocks; one kind at a time, largest
       first; a change is kept if the step is faster; then a second pass over the kinds, each kind's best
       candidates timed again beside the others' final choices. One kind at a time ends in a local optimum
       (q|k|v's best shape depends on down's and the other way round), so the search runs TUNE_STARTS times
       from stage 1's choice, each visiting the kinds in another order (largest first, then smallest first,
       ...), and where the searches end apart their ends are timed again in alternating rounds
       (TUNE_CONFIRM) over real steps, the cache length growing (engine.time_decode: a step at one length
       ranked tunings 0.005 ms a 3b-4e1t step apart the other way round), and the fastest kept
    3. within the step too: the attention's shape (split_tiles, nbuf: how many key tiles a split takes before
       the keys spread over more blocks, and how many it holds in shared memory)
    4. batch 1 (engine.megakernel None): the whole step as one kernel (decode_step.cu; its ring's STEP_SHAPES)
       against the tuned per-layer step, the faster kept (engine.step_kernel[1], engine.step_shape; why it was
       not timed or kept: engine.step_kernel_note)

Every timing is kept in engine.tune_log (tools/decode_probe.py prints it).

What the tuner chose is kept on disk (cached(): one small JSON file a batch size under the kernel cache's
folder, `tuning/`, or $STABLELM_REF_TUNE_CACHE; "off" keeps nothing), keyed by everything the timings
depended on: the GPU, the compiled kernels, the matrices' shapes, the attention's splits, the engine's
settings and these stages' own constants. The next engine with the same key (another process, the next
`stablelm-ref generate --device gpu`) reads it back instead of timing for seconds; an unreadable or
invalid file is timed again and replaced. engine.tune_cache False skips the file (tools/decode_probe.py
times the tuner itself).

The functions take the engine (decode_engine.GpuDecodeEngine): its buffers, plan and step timing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
from pathlib import Path
from typing import NamedTuple

from .bf16 import f32_to_bf16_bits
from .cubin import cache_dir
from .decode_kernels import ATT_SHAPES, GEMV_MAX_THREADS, GEMV_MMA, GEMV_ROWS, MODE_SWIGLU, STEP_SHAPES

TUNE_FINALISTS = 3                          # GEMV shapes per matrix kind timed again within the whole step
TUNE_PERSIST = (1, 2, 3, 4)                 # persistent blocks per SM tried for the chosen shape
TUNE_GRID = True                            # in the step: every finalist at every persistent count
TUNE_ROUNDS = 2                             # passes over the kinds in the step (later ones: TUNE_RECHECK each)
TUNE_RECHECK = 4                            # a kind's best candidates timed again in each later pass
TUNE_STARTS = 2                             # stage 2 searched this many times, each visiting the kinds in
#                                             another order; the fastest of the searches' ends is kept
TUNE_CONFIRM = 3                            # rounds in which the searches' different ends are timed again
TUNE_CONFIRM_STEPS = 128                    # ... each over this many real steps (engine.time_decode), or fewer
#                                             where the cache has less room (under 16: time_step instead)


class GemvShape(NamedTuple):
    """How a GEMV is launched: rows per block group, threads per block, persistent blocks per SM (0: one
    block per group of rows), the microseconds / GB/s it took alone at tuning time (0 if not timed), and
    the kernel: unroll 0 = the CUDA-core GEMV, 2 or 4 = the tensor-core one (gemv_mma, rows 16 or 32)."""
    rows: int
    threads: int
    persist: int
    us: float
    gbs: float
    unroll: int = 0


DEFAULT_GEMV = GemvShape(4, 256, 0, 0.0, 0.0)
DEFAULT_ATT = ATT_SHAPES[0]                 # attention: one tile a split (keys spread over many blocks), 1 buffer


def gemv_candidates(K: int, nb: int, mode: int, tensor_cores: bool = False):
    """(rows per block, threads, unroll) worth timing for a K-wide GEMV at batch nb: the CUDA-core GEMV's
    shapes, and for nb > 1 (where the CUDA-core GEMV does nb FMAs a weight) the tensor-core GEMV's."""
    kc = K // 8
    rows = [r for r in GEMV_ROWS if not (nb > 4 and r == 8) and not (mode == MODE_SWIGLU and r % 2)]
    threads = {128, 256, 512}
    for j in (1, 2, 3, 4):
        t = 32 * math.ceil(math.ceil(kc / j) / 32)
        if 64 <= t <= GEMV_MAX_THREADS:
            threads.add(t)
    out = [(r, t, 0) for r in rows for t in sorted(threads)]
    if nb > 1 and tensor_cores:
        out += [(16 * mt, t, u) for mt, u in GEMV_MMA for t in (128, 256, 512)]
    return out


def tune(engine, nb):
    """Choose each GEMV kind's launch shape for batch nb (once): each kind timed alone over the candidates,
    then its finalists, persistent blocks and half the rows a block (leaner) inside the whole step, then the
    attention's shape (tune_in_step, which ends with tune_attention), then at batch 1 with megakernel None
    the whole-step kernel against that step (tune_step_kernel). With engine.autotune False nothing is timed:
    every kind keeps DEFAULT_GEMV, the attention DEFAULT_ATT. A choice kept on disk for the same key
    (cached) is read back instead of timed, and a new one is kept."""
    if nb in engine.tuning:
        return
    cp = engine.cp
    res = {}
    path = cached(engine, nb) if engine.autotune else None
    if path is not None and load(engine, nb, path):
        return
    if engine.autotune:
        rng = cp.random.default_rng(0)
        with engine.stream:
            for buf in (engine.h, engine.att, engine.mlp):       # realistic (non-zero) inputs
                buf[...] = f32_to_bf16_bits(rng.standard_normal(buf.shape, dtype=cp.float32))
            saved = (engine.x.copy(), engine.logits_buf.copy())
        top = {}
        for name, (Ws, mode) in engine._gemv_shapes().items():         # 1. each matrix kind on its own
            N, K = Ws[0].shape
            reps = max(1, 4 // len(Ws))
            timed = []
            for R, T, U in gemv_candidates(K, nb, mode, getattr(engine.k, "tensor_cores", False)):
                engine.tuning.setdefault(nb, {})[name] = GemvShape(R, T, 0, 0.0, 0.0, U)
                launches = [engine._layer_gemv(name, i, nb) for i in range(len(Ws))] * reps
                ms = engine.time_launches(launches) / len(launches)
                timed.append((ms, U, R, T))
            timed.sort()
            timed = [GemvShape(R, T, 0, ms * 1e3, Ws[0].nbytes / (ms * 1e-3) / 1e9, U) for ms, U, R, T in timed]
            engine.tune_log += [("alone", nb, name, tuple(c)) for c in timed]
            top[name] = timed[:TUNE_FINALISTS]
            engine.tuning[nb][name] = top[name][0]
        search_from_starts(engine, nb, top)                              # 2. the finalists in the step
        tune_step_kernel(engine, nb)                                     # 4. batch 1: the whole-step kernel
        with engine.stream:
            engine.x[...], engine.logits_buf[...] = saved
        engine.stream.synchronize()
        res = dict(engine.tuning[nb])
    engine.tuning[nb] = res
    engine._forget(nb)
    if path is not None:
        save(engine, nb, path)


TUNE_CACHE_ENV = "STABLELM_REF_TUNE_CACHE"   # the tuning files' folder, or "off"
TUNE_FORMAT = 1                              # the files' layout (a change makes every old file a miss)


def cached(engine, nb):
    """The file that keeps the tuner's choice for this engine at batch nb (None: not kept): its name hashes
    what the timings depended on, so that any change of GPU, kernels, shapes or settings misses."""
    where = os.environ.get(TUNE_CACHE_ENV, "")
    if where.lower() == "off" or not getattr(engine, "tune_cache", True):
        return None
    k = engine.k
    key = {
        "format": TUNE_FORMAT, "gpu": getattr(k, "device_name", None), "sms": getattr(k, "num_sms", None),
        "cc": getattr(k, "compute_capability", None), "kernels": getattr(k, "source", None),
        "matrices": [list(W.shape) for Ws, _ in engine._gemv_shapes().values() for W in Ws],
        "heads": [engine.H, engine.KVH, engine.D], "nb": nb,
        "splits": k.attention_splits(nb, engine.KVH, engine.max_len),
        "settings": [bool(engine.pdl), engine.folds_layernorm(nb), engine.folds_final(nb), engine.megakernel,
                     engine.att_cluster, getattr(engine, "att_fit", False), sorted(engine.carveout.items())],
        "stages": [TUNE_FINALISTS, list(TUNE_PERSIST), TUNE_GRID, TUNE_ROUNDS, TUNE_RECHECK, TUNE_STARTS,
                   TUNE_CONFIRM, TUNE_CONFIRM_STEPS, [list(a) for a in ATT_SHAPES], [list(s) for s in STEP_SHAPES]],
    }
    if engine.megakernel is None:                              # stage 4 timed decode_step.cu too
        from .launch import step_source
        key["step kernel"] = hashlib.sha256(step_source().encode()).hexdigest()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return Path(where or cache_dir() / "tuning") / f"decode-b{nb}-{digest}.json"


def _ints(values) -> bool:
    return all(type(v) is int for v in values)          # (a float 160.0 would reach a launch's block size)


def _valid(shape: GemvShape, nb: int, mode: int) -> bool:
    """Whether a kernel exists for `shape` at batch nb in this mode (the rows gemv_candidates and leaner
    offer: no 8-row CUDA-core GEMV above batch 4, SwiGLU's rows in pairs)."""
    if not _ints((shape.rows, shape.threads, shape.persist, shape.unroll)) or shape.persist not in (0,) + TUNE_PERSIST:
        return False
    if shape.unroll:
        return (shape.rows % 16 == 0 and (shape.rows // 16, shape.unroll) in GEMV_MMA
                and shape.threads in (128, 256, 512))
    return (shape.rows in GEMV_ROWS and not (nb > 4 and shape.rows == 8)
            and not (mode == MODE_SWIGLU and shape.rows % 2) and 32 <= shape.threads <= GEMV_MAX_THREADS
            and shape.threads % 32 == 0)


def load(engine, nb, path) -> bool:
    """Put the choice kept in `path` into the engine (True), or leave the engine as it is (False) where there
    is no such file or it does not hold a valid choice for the engine's kinds."""
    try:
        data = json.loads(Path(path).read_text())
        shapes = {name: GemvShape(*(v[:3] + [float(x) for x in v[3:5]] + v[5:6]))
                  for name, v in data["gemv"].items()}
        att = tuple(data["attention"])
        step_ms = float(data["step ms"])
        step_kernel = data.get("step kernel")
        step_shape = tuple(data["step shape"]) if data.get("step shape") else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    kinds = engine._gemv_shapes()
    if (set(shapes) != set(kinds) or not all(_valid(v, nb, kinds[name][1]) for name, v in shapes.items())
            or not _ints(att) or att not in ATT_SHAPES or not math.isfinite(step_ms)
            or (step_shape is not None and (not _ints(step_shape) or step_shape not in STEP_SHAPES))
            or step_kernel not in (None, True, False)):
        return False
    engine.tuning[nb], engine.att_shape[nb], engine.step_ms[nb] = shapes, att, step_ms
    if step_kernel is not None and engine.megakernel is None:
        engine.step_kernel[nb] = bool(step_kernel)
        if step_shape is not None:
            engine.step_shape = step_shape
    engine.tune_log.append(("cache", nb, str(path)))
    engine._forget(nb)
    return True


def save(engine, nb, path):
    """Keep the engine's choice for batch nb in `path` (atomically; a folder that cannot be written keeps
    nothing: the next engine times again)."""
    from ..checkpoint import atomic_write
    data = {"gemv": {name: list(v) for name, v in engine.tuning[nb].items()},
            "attention": list(engine.att_shape.get(nb, DEFAULT_ATT)), "step ms": engine.step_ms.get(nb, 0.0),
            "step kernel": engine.step_kernel.get(nb) if engine.megakernel is None else None,
            "step shape": list(engine.step_shape) if engine.megakernel is None else None,
            "gpu": getattr(engine.k, "device_name", None)}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, (json.dumps(data, indent=1) + "\n").encode())
    except OSError:
        pass



def search_from_starts(engine, nb, top):
    """Stage 2 (tune_in_step, which ends with the attention's shape) TUNE_STARTS times, each from stage 1's
    choice (every kind's first finalist, the attention's default) and visiting the kinds in another order
    (tune_in_step's `start`: s-th rotation of largest-first, every other one reversed). Where the searches end
    at different tunings, each end is timed again in TUNE_CONFIRM alternating rounds, over TUNE_CONFIRM_STEPS
    real steps of the sequence under way (engine.time_decode; where the cache has no room for 16, time_step's
    20 replays of one), logged as ("end", nb, search, ms), and the one of the lowest median is kept, with that
    median as engine.step_ms[nb]."""
    start = {name: cands[0] for name, cands in top.items()}
    ends = []
    for s in range(max(1, TUNE_STARTS)):
        engine.tuning[nb] = dict(start)
        engine.att_shape.pop(nb, None)
        tune_in_step(engine, nb, top, start=s)
        end = (dict(engine.tuning[nb]), engine.att_shape.get(nb, DEFAULT_ATT))
        if end not in ends:
            ends.append(end)
    if len(ends) > 1:
        times = [[] for _ in ends]
        for _ in range(TUNE_CONFIRM):
            for i, (shapes, att) in enumerate(ends):
                engine.tuning[nb], engine.att_shape[nb] = dict(shapes), att
                engine._forget(nb)
                room = min(TUNE_CONFIRM_STEPS, engine.steps_left() - 2)
                ms = engine.time_decode(nb, room) if room >= 16 else None
                times[i].append(ms if ms is not None else engine.time_step(nb, replays=20))
        medians = [statistics.median(t) for t in times]
        engine.tune_log += [("end", nb, i, ms) for i, ms in enumerate(medians)]
        i = min(range(len(ends)), key=medians.__getitem__)
        engine.tuning[nb], engine.att_shape[nb] = dict(ends[i][0]), ends[i][1]
        engine.step_ms[nb] = medians[i]
        engine._forget(nb)


def tune_in_step(engine, nb, top, start=0):
    """Choose among each kind's finalists by timing the whole step as it runs (the graph as captured,
    PDL edges included, without the argmax so that no state advances), one kind at a time. A GEMV's best
    shape alone and within the step differ: its neighbours overlap its start and its end.

    Round 1, each kind (most bytes first): with TUNE_GRID every finalist at every persistent count (a finalist
    that loses at one block a group may win persistent), else the finalists and then persistent counts for
    the winner alone; then the winner at half its rows. Rounds after the first time each kind's TUNE_RECHECK
    best candidates again, now that every other kind has its choice, starting from a fresh timing of the step
    as chosen (a best time measured once is optimistic: a later candidate would have to beat its noise).

    start: which order the kinds are visited in: the kinds by bytes, most first, rotated by start // 2 and,
    for an odd start, reversed (0: most bytes first, 1: fewest first; search_from_starts's searches)."""
    try:
        best = engine.time_step(nb)
    except Exception:  # noqa: BLE001 - e.g. a driver without PDL: keep the per-kind choice
        return
    shapes = engine._gemv_shapes()
    kinds = sorted(top, key=lambda n: -sum(W.nbytes for W in shapes[n][0]))     # most bytes first
    r = (start // 2) % len(kinds)
    kinds = kinds[r:] + kinds[:r]
    order = kinds[::-1] if start % 2 else kinds
    timed = {name: {} for name in order}                                         # candidate -> its last time
    for rnd in range(TUNE_ROUNDS):
        if rnd:
            best = engine.time_step(nb)
        for name in order:
            chosen = engine.tuning[nb][name]
            timed[name].setdefault(chosen, best)

            def better(cands):
                nonlocal best, chosen
                for cand in cands:
                    if cand == chosen:
                        continue
                    engine.tuning[nb][name] = cand
                    ms = engine.time_step(nb)
                    engine.tune_log.append(("step", nb, name, tuple(cand), ms))
                    timed[name][cand] = ms
                    if ms < best:
                        best, chosen = ms, cand

            if rnd:
                better(sorted(timed[name], key=timed[name].get)[:TUNE_RECHECK])
            elif TUNE_GRID:
                better([c._replace(persist=p) for c in top[name] for p in (0,) + TUNE_PERSIST])
                better(leaner(chosen, shapes[name][1]))
            else:
                better(top[name][1:])                                        # the other finalists
                better([chosen._replace(persist=p) for p in TUNE_PERSIST])   # then persistent blocks for the winner
                better(leaner(chosen, shapes[name][1]))                      # then half its rows a block
            engine.tuning[nb][name] = chosen
    best = tune_attention(engine, nb, best)
    engine.step_ms[nb] = best
    engine._forget(nb)


def leaner(shape, mode):
    """`shape` with half the rows a block (CUDA-core GEMV; SwiGLU keeps an even count), at 0 and TUNE_PERSIST
    persistent blocks a SM. Half the rows is about half the registers a thread (R weight chunks in flight):
    tools/decode_timeline.py showed gate|up's blocks unable to start while o_proj's R = 8 blocks held the
    register file, and the step timed with o_proj at R = 4 (decode_probe --sweep) was 0.026 ms faster at
    3b-4e1t than the tuner's R = 8, a shape its finalists (ranked alone) never reached."""
    rows = shape.rows // 2
    if shape.unroll or rows < 1 or (mode == MODE_SWIGLU and rows % 2):
        return []
    return [shape._replace(rows=rows, persist=p, us=0.0, gbs=0.0) for p in (0,) + TUNE_PERSIST]


def tune_attention(engine, nb, best):
    """3. The attention's (split_tiles, nbuf) among ATT_SHAPES that fit the GPU's shared memory, kept if the
    step is faster. Returns the step's time."""
    k, G = engine.k, engine.H // engine.KVH
    chosen = engine.att_shape.get(nb, DEFAULT_ATT)
    for shape in ATT_SHAPES:
        if shape == chosen or not k.attention_fits(G, engine.D, shape[1]):
            continue
        engine.att_shape[nb] = shape
        ms = engine.time_step(nb)
        engine.tune_log.append(("step", nb, "attention", shape, ms))
        if ms < best:
            best, chosen = ms, shape
    engine.att_shape[nb] = chosen
    return best


def tune_step_kernel(engine, nb):
    """4. At batch 1 with engine.megakernel None: time the step as [embed, decode_step_b1] with each ring shape
    of STEP_SHAPES that fits against the tuned per-layer step (both as captured, argmax left out) and keep the
    fastest (engine.step_kernel[nb], engine.step_shape). Logged as ("step", nb, "whole-step kernel", shape or
    None for the per-layer step, ms); where it cannot run, engine.step_kernel_note says why."""
    if nb != 1 or engine.megakernel is not None:
        return
    problem = engine.step_kernel_problem()
    if problem is not None:
        engine.step_kernel_note = problem
        return
    engine.step_kernel[nb] = False
    timed = []
    try:
        timed.append((engine.time_step(nb), None))
        engine.step_kernel[nb] = True
        for shape in STEP_SHAPES:
            engine.step_shape = shape
            if engine.step_kernel_problem() is None:
                timed.append((engine.time_step(nb), shape))
    except Exception as e:  # noqa: BLE001 - e.g. a refused cooperative launch: the per-layer step
        engine.step_kernel[nb], engine.step_kernel_note = False, f"timing failed: {e!r}"
        engine.step_shape = STEP_SHAPES[0]
        engine._forget(nb)
        return
    engine.tune_log += [("step", nb, "whole-step kernel", shape, ms) for ms, shape in timed]
    ms, shape = min(timed, key=lambda t: t[0])
    engine.step_kernel[nb] = shape is not None
    engine.step_shape = shape or STEP_SHAPES[0]
    best = min(t for t in timed if t[1] is not None)
    engine.step_kernel_note = (None if shape else f"slower: {best[0]:.4f} ms a step ({best[1]}) against "
                               f"{timed[0][0]:.4f} per layer")
    engine.step_ms[nb] = ms
    engine._forget(nb)
