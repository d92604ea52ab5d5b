"""A timeline of one GPU decode step: when every block of every kernel starts, returns from the PDL wait and
exits, and where the step's time goes between kernels.

    python tools/decode_timeline.py                         # stablelm-3b-4e1t shapes, batch 1, bf16 random weights
    python tools/decode_timeline.py --shapes 2-1.6b --csv out.csv   # another shape; every launch to a CSV
    python tools/decode_timeline.py --variant oproj-early1   # a decode_probe variant's timeline, at the shipped tuning

The engine is tuned with the shipped kernels, then decode.cu is built again with decode_timeline.cuh (beside
this file) put before it: its PDL_LAUNCH / PDL_WAIT take the place of decode.cu's (which give way to macros
defined before them) and make each block of every kernel record its launch (%gridid), its SM, and
%globaltimer / clock64 at its start, on return from griddepcontrol.wait and at exit (the latest of its warps),
into a buffer of the module (the shipped decode.cu has none of this code). One replay of the captured step
(PDL edges, the same tuning) fills it; the records are grouped by launch (gridid, ordered by first start: a
dependent grid cannot start before its predecessor's blocks have all started) and matched with the step's
plan.

Per launch i (times relative to the step's first block start; "prev" = launch i - 1):
  span     last exit(i) - last exit(prev): what launch i adds to the step's critical path (the spans sum to
           the step)
  dep      first wait return(i) - last exit(prev): from the predecessor's last block gone to the first of
           this kernel's blocks released (the PDL flush and signal); < 0 cannot happen
  lastwait last wait return(i) - last exit(prev): when the last block is released (> dep when blocks start
           late: not resident because the SMs were full)
  late     last start(i) - last exit(prev), if > 0: blocks that could start only after the predecessor ended
  early    % of this launch's blocks that started before the predecessor's last exit (resident early,
           prefetching their weights)
  early2   % that started before the last exit of the launch before the predecessor (for gate|up: resident
           while the attention still ran)
  work     last exit(i) - last wait return(i): the work after the last block is released
  tail     last exit(i) - median exit(i): how long the last blocks trail

After the launches, each kind's kernel resources: threads, grid, registers, static and dynamic shared memory,
and the blocks an SM holds by the driver's occupancy calculator with that kind alone on it.

Timing: %globaltimer when its ticks are fine (< 100 ns apart); otherwise each SM's clock64, put on the
globaltimer's axis per SM (one common rate fitted over every SM's samples, each SM's offset from the upper
envelope of globaltimer - clock / rate). The timeline build adds an atomic, a block barrier and a few stores
a block: its step is slower than the shipped one (both printed); read the gaps, not the absolute step.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import FAMILY, engine_config, random_params  # noqa: E402
from decode_probe import VARIANT_CONSTANTS, VARIANTS, kernels_for, probe_source, time_graph  # noqa: E402
from stablelm_ref.cuda import decode_engine as de  # noqa: E402

TIMELINE_CUH = Path(__file__).with_name("decode_timeline.cuh")
HOOK = "#if defined(PDL_LAUNCH)"     # decode.cu keeps PDL macros defined before it
TL_MAX = 1 << 19             # decode_timeline.cuh's TL_MAX
FIELDS = ("grid", "t0", "tw", "te", "c0", "cw", "ce", "smblk")   # TlRec as 8 uint64 words
KIND_ORDER = ("embed", "layernorm", "qkv", "attention", "o_proj", "gate_up", "down", "lm_head", "argmax",
              "sample")


def log(*a):
    print(*a, flush=True)


def kind_of(tag):
    return tag.split(":", 1)[1] if tag.startswith("gemv:") else tag


def timeline_source(decode_cu):
    """The timeline build's source: decode_timeline.cuh, then decode.cu's text (decode_cu); refused without
    the hook line (decode_probe.probe_source)."""
    return probe_source(TIMELINE_CUH, decode_cu, HOOK, "decode.cu", "PDL_LAUNCH / PDL_WAIT")


def timeline_patch(variant=None):
    """decode.cu's text -> the timeline build's source, of decode.cu changed by decode_probe's VARIANTS[variant]
    first where a variant is named (None where the variant finds no line to change)."""
    if variant is None:
        return timeline_source
    if variant not in VARIANTS or VARIANTS[variant] is None or variant in VARIANT_CONSTANTS:
        raise ValueError(f"{variant!r} is not a decode_probe text variant the timeline can build (its VARIANTS "
                         "other than 'default' and the attention-constant ones)")

    def patch(src):
        text = VARIANTS[variant](src)
        return None if text is None else timeline_source(text)
    return patch


def timeline_kernels(variant=None):
    return kernels_for("timeline" if variant is None else f"timeline of {variant}", timeline_patch(variant))


def read_records(k):
    """The records of the last replay: uint64 [n, 8] (FIELDS)."""
    cp = k.cp
    count = cp.ndarray((1,), cp.uint32, memptr=k.module.get_global("tl_count"))
    recs = cp.ndarray((TL_MAX, 8), cp.uint64, memptr=k.module.get_global("tl_rec"))
    n = int(count.get()[0])
    if n > TL_MAX:
        raise SystemExit(f"the step ran {n} blocks, more than the probe buffer's {TL_MAX} "
                         f"({TIMELINE_CUH.name} TL_MAX)")
    return recs[:n].get()


def reset_records(k):
    cp = k.cp
    cp.ndarray((1,), cp.uint32, memptr=k.module.get_global("tl_count")).fill(0)
    cp.cuda.runtime.deviceSynchronize()          # the engine's stream does not wait for the default stream


def timer_quantum(t):
    """The globaltimer's tick: the median gap between its distinct values (ns)."""
    u = np.unique(t[t > 0])
    d = np.diff(u)
    return float(np.median(d)) if len(d) else 0.0


def block_times(recs):
    """(t0, tw, te) in ns as float64 on one axis, and a note on which timer was used. tw is NaN where a block
    returned before its wait."""
    t = {f: recs[:, i].astype(np.float64) for i, f in enumerate(FIELDS) if f != "smblk"}
    sm = (recs[:, 7] & 0xffffffff).astype(np.int64)
    q = timer_quantum(np.concatenate([recs[:, 1], recs[:, 3]]))
    waited = recs[:, 2] > 0
    if q <= 100:
        base = t["t0"].min()
        out = (t["t0"] - base, np.where(waited, t["tw"] - base, np.nan), t["te"] - base)
        return out, f"%globaltimer (tick {q:.0f} ns)"
    # clock64 per SM on the globaltimer's axis: t = off[sm] + (c - cmin[sm]) * slope
    nsm = int(sm.max()) + 1
    keeps = {"0": np.ones(len(recs), bool), "w": waited, "e": np.ones(len(recs), bool)}
    ts = np.concatenate([t["t" + x][keeps[x]] for x in "0we"])
    cs = np.concatenate([recs[keeps[x], FIELDS.index("c" + x)].astype(np.int64) for x in "0we"])
    ss = np.concatenate([sm[keeps[x]] for x in "0we"])
    cmin = np.full(nsm, np.iinfo(np.int64).max)
    np.minimum.at(cmin, ss, cs)
    cr = (cs - cmin[ss]).astype(np.float64)
    ts = ts - ts.min()
    cnt = np.bincount(ss, minlength=nsm).astype(np.float64)
    cmean = np.bincount(ss, cr, nsm) / np.maximum(cnt, 1)
    tmean = np.bincount(ss, ts, nsm) / np.maximum(cnt, 1)
    dc, dt = cr - cmean[ss], ts - tmean[ss]             # pooled slope, each SM centred
    slope = float(dc @ dt / (dc @ dc)) if float(dc @ dc) > 0 else 1.0     # ns per cycle
    off = np.full(nsm, -np.inf)
    np.maximum.at(off, ss, ts - slope * cr)             # the upper envelope: the timer's reads lag the truth

    def conv(x):
        c = recs[:, FIELDS.index("c" + x)].astype(np.int64)
        v = off[sm] + slope * (c - cmin[sm]).astype(np.float64)
        return np.where(keeps[x], v, np.nan)

    t0, tw, te = conv("0"), conv("w"), conv("e")
    base = t0.min()
    return (t0 - base, tw - base, te - base), (f"clock64 per SM on the globaltimer's axis (globaltimer tick "
                                               f"{q:.0f} ns; {1 / slope:.3f} GHz fitted)")


def launches_of(recs, times):
    """Per launch (ordered by first block start): dict of its blocks' times and SMs."""
    t0, tw, te = times
    grids = recs[:, 0]
    out = []
    for g in np.unique(grids):
        m = grids == g
        out.append(dict(grid=int(g), t0=t0[m], tw=tw[m], te=te[m], sm=(recs[m, 7] & 0xffffffff).astype(np.int64)))
    out.sort(key=lambda L: L["t0"].min())
    return out


def analyse(recs, plan, times=None):
    """One row (dict) per launch, matched with the plan's launches (tag, grid) in order."""
    if times is None:
        times, _ = block_times(recs)
    launches = launches_of(recs, times)
    if len(launches) != len(plan):
        log(f"warning: {len(launches)} launches recorded, the plan has {len(plan)}: kinds are not matched")
    rows = []
    prev_exit = prev2_exit = None
    for i, L in enumerate(launches):
        fn = plan[i] if len(launches) == len(plan) else None
        nblocks = int(np.prod(fn.grid)) if fn is not None else len(L["t0"])
        if fn is not None and nblocks != len(L["t0"]):
            log(f"warning: launch {i} ({fn.tag}) recorded {len(L['t0'])} blocks, its grid has {nblocks}")
        first_start, last_start = L["t0"].min(), L["t0"].max()
        tw = L["tw"][~np.isnan(L["tw"])]
        first_wait = tw.min() if len(tw) else np.nan
        last_wait = tw.max() if len(tw) else np.nan
        last_exit = L["te"].max()
        ref = prev_exit if prev_exit is not None else first_start
        row = dict(i=i, kind=kind_of(fn.tag) if fn is not None else "?", blocks=len(L["t0"]),
                   sms=len(np.unique(L["sm"])), start=first_start / 1e3, last_start=last_start / 1e3,
                   first_wait=first_wait / 1e3, last_wait=last_wait / 1e3, exit=last_exit / 1e3,
                   span=(last_exit - ref) / 1e3, dep=(first_wait - ref) / 1e3, lastwait=(last_wait - ref) / 1e3,
                   late=max(0.0, last_start - ref) / 1e3,
                   early=100.0 * float(np.mean(L["t0"] < ref)) if prev_exit is not None else 0.0,
                   early2=100.0 * float(np.mean(L["t0"] < prev2_exit)) if prev2_exit is not None else 0.0,
                   work=(last_exit - last_wait) / 1e3, tail=(last_exit - np.median(L["te"])) / 1e3,
                   first_exit=L["te"].min() / 1e3)
        rows.append(row)
        prev2_exit, prev_exit = prev_exit, last_exit
    return rows


def by_kind(rows, launch_bytes=None, gbs=None):
    """kind -> (count, sums and means of the row fields); with launch_bytes (kind -> bytes one launch reads) and
    gbs (GB/s), also "bytes" (us those bytes take at gbs) and "over" (mean span - that: what the kind loses)."""
    out = {}
    for kind in [k for k in KIND_ORDER if any(r["kind"] == k for r in rows)] + \
            sorted({r["kind"] for r in rows} - set(KIND_ORDER)):
        rs = [r for r in rows if r["kind"] == kind]
        agg = {"n": len(rs), "span_sum": sum(r["span"] for r in rs)}
        for f in ("span", "dep", "lastwait", "late", "early", "early2", "work", "tail", "blocks"):
            vals = [r[f] for r in rs if not np.isnan(r[f])]
            agg[f] = float(np.mean(vals)) if vals else float("nan")
        if launch_bytes and gbs and kind in launch_bytes:
            agg["bytes"] = launch_bytes[kind] / (gbs * 1e3)            # bytes / (GB/s) = ns; / 1e3: us
            agg["over"] = agg["span"] - agg["bytes"]
        out[kind] = agg
    return out


def print_tables(rows, note, step_us=None, label="", launch_bytes=None, gbs=None):
    kinds = by_kind(rows, launch_bytes, gbs)
    total = sum(r["span"] for r in rows)
    log(f"\n{label}timeline of one step: {len(rows)} launches, {sum(r['blocks'] for r in rows)} blocks, "
        f"first start to last exit {rows[-1]['exit'] - rows[0]['start']:.1f} us; timer: {note}")
    if step_us:
        log(f"  (the timeline build's step by graph replay: {step_us:.1f} us)")
    log("| kind | launches | blocks | span sum us | span us | dep us | last wait us | late us | early % | early2 % | "
        f"work us | tail us | bytes at {gbs or 0:.0f} GB/s us | span - bytes us |")
    log("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, a in kinds.items():
        b = f"{a['bytes']:.2f} | {a['over']:.2f}" if "bytes" in a else " | "
        log(f"| {kind} | {a['n']} | {a['blocks']:.0f} | {a['span_sum']:.1f} | {a['span']:.2f} | {a['dep']:.2f} | "
            f"{a['lastwait']:.2f} | {a['late']:.2f} | {a['early']:.0f} | {a['early2']:.0f} | {a['work']:.2f} | "
            f"{a['tail']:.2f} | {b} |")
    log(f"| all | {len(rows)} | | {total:.1f} | | | | | | | | | | |")


def print_resources(engine, plan):
    """Per kind (its first launch in the plan): the kernel, threads, registers a thread, static and dynamic
    shared memory, and the blocks an SM holds by the driver's occupancy calculator (alone on the SM)."""
    log("| kind | kernel | threads | grid | registers | static smem B | dynamic smem B | blocks/SM alone |")
    log("|---|---|---:|---:|---:|---:|---:|---:|")
    seen = set()
    for fn in plan:
        kind = kind_of(fn.tag)
        if kind in seen:
            continue
        seen.add(kind)
        f = fn.fn
        try:
            from cupy.cuda import driver
            occ = driver.occupancyMaxActiveBlocksPerMultiprocessor(f.kernel.ptr, int(np.prod(fn.block)), fn.smem)
        except Exception as e:  # noqa: BLE001 - a probe: say why instead of stopping
            occ = f"? ({type(e).__name__})"
        log(f"| {kind} | {getattr(f, 'name', '?')} | {int(np.prod(fn.block))} | "
            f"{int(np.prod(fn.grid))} | {f.num_regs} | {f.shared_size_bytes} | {fn.smem} | {occ} |")


def print_launches(rows, first, last):
    log("| i | kind | blocks | SMs | start | last start | first wait | last wait | first exit | exit | span | dep | "
        "early % | tail |")
    log("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows[:first] + ([None] if len(rows) > first + last else []) + rows[max(first, len(rows) - last):]:
        if r is None:
            log("| ... |")
            continue
        log(f"| {r['i']} | {r['kind']} | {r['blocks']} | {r['sms']} | {r['start']:.2f} | {r['last_start']:.2f} | "
            f"{r['first_wait']:.2f} | {r['last_wait']:.2f} | {r['first_exit']:.2f} | {r['exit']:.2f} | "
            f"{r['span']:.2f} | {r['dep']:.2f} | {r['early']:.0f} | {r['tail']:.2f} |")


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def timeline(engine, k_tl, ids, steps, replays=3):
    """Swap the timeline kernels into a tuned engine (same tuning and attention shape), time its step, record
    `replays` single replays; returns (rows of the median-span replay, timer note, step us). Restores the
    engine's kernels."""
    shipped = engine.k
    engine.k = k_tl
    engine.reset_plans()
    try:
        step_ms = time_graph(engine, ids, engine.capture(1), steps)
        engine.prefill(ids, logits=None)
        g = engine.capture(1)
        plan = engine._plan(1)
        runs = []
        for _ in range(replays + 1):
            reset_records(k_tl)
            g.launch(engine.stream)
            engine.stream.synchronize()
            recs = read_records(k_tl)
            times, note = block_times(recs)
            runs.append((analyse(recs, plan, times), note, recs))
        runs = runs[1:]                                   # the first replay warms up
        runs.sort(key=lambda r: r[0][-1]["exit"] - r[0][0]["start"])
        rows, note, recs = runs[len(runs) // 2]
        return rows, note, step_ms * 1e3, recs
    finally:
        engine.k = shipped
        engine.reset_plans()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--shapes", nargs="+", default=["3b-4e1t"], choices=list(FAMILY))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=127)
    ap.add_argument("--replays", type=int, default=3)
    ap.add_argument("--gbs", type=float, default=4440.0,
                    help="bandwidth (GB/s) for each GEMV kind's bytes-time column (default: the read-only kernel's "
                         "4,440 GB/s measured on an H200 by bench_gpu.py)")
    ap.add_argument("--launches", type=int, nargs=2, default=(14, 4), metavar=("FIRST", "LAST"),
                    help="launches printed one by one: the first FIRST and the last LAST")
    ap.add_argument("--csv", default=None, help="every launch's row to this file (one per shape: NAME-shape.csv)")
    ap.add_argument("--raw", default=None, help="the raw block records to NAME-shape.npz (key recs)")
    ap.add_argument("--variant", default=None, metavar="NAME",
                    help="time decode.cu changed by this decode_probe variant (VARIANTS), at the tuning made with the "
                         "shipped kernels")
    args = ap.parse_args()
    try:
        timeline_patch(args.variant)
    except ValueError as e:
        ap.error(str(e))
    t0 = time.time()
    k_tl = None
    for shape in args.shapes:
        cfg = engine_config(args.layers, FAMILY[shape])
        ids = np.random.default_rng(0).integers(2, cfg.vocab_size, (1, args.prompt))
        engine = de.GpuDecodeEngine(cfg, random_params(cfg), max_batch=1, max_len=args.prompt + args.steps + 9,
                                    pdl=True)
        engine.att_fit = False                            # one graph over every length, as decode_probe's
        engine.prefill(ids, logits=None)
        engine.capture(1)                                 # tuned with the shipped kernels
        ms = time_graph(engine, ids, engine.capture(1), args.steps)
        log(f"{shape}: GPU {engine.k.device_name}; shipped step {ms * 1e3:.1f} us ({1e3 / ms:.1f} tok/s); tuning "
            f"{ {n: (v.rows, v.threads, v.persist) for n, v in engine.tuning[1].items()} }, attention "
            f"{engine.att_shape.get(1)} ({time.time() - t0:.0f} s)")
        if k_tl is None:
            k_tl = timeline_kernels(args.variant)
            if args.variant:
                log(f"timeline build: decode.cu with variant {args.variant}")
        rows, note, step_us, recs = timeline(engine, k_tl, ids, args.steps, args.replays)
        print_launches(rows, *args.launches)
        print_resources(engine, engine._plan(1))
        launch_bytes = {name: Ws[0].nbytes for name, (Ws, _) in engine._gemv_shapes().items()}
        print_tables(rows, note, step_us, label=f"{shape}: ", launch_bytes=launch_bytes, gbs=args.gbs)
        if args.csv:
            p = Path(args.csv)
            write_csv(rows, p.with_name(f"{p.stem}-{shape}{p.suffix}"))
        if args.raw:
            p = Path(args.raw)
            np.savez_compressed(p.with_name(f"{p.stem}-{shape}.npz"), recs=recs)
        del engine
    log(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
