"""Decode speed on one GPU at stablelm-3b-4e1t shapes: GpuDecodeEngine vs transformers, vs the roofline.

    python tools/bench_gpu.py              # everything, one table at the end (`make bench-gpu`)
    python tools/bench_gpu.py --skip-hf    # this engine only (no torch needed)
    python tools/bench_gpu.py --ncu-step   # one eager decode step between cudaProfilerStart/Stop, for
        ncu --clock-control none --profile-from-start off --csv --metrics gpu__time_duration.sum \\
            python tools/bench_gpu.py --ncu-step

Shapes: vocab 50304, hidden 2560, intermediate 6912, 32 layers, 32 heads (32 kv), head_dim 80,
rotary 20; random weights, bf16, 128-token prompt, 128 new tokens, greedy.
Measured in one run on one GPU:
  - this engine: decode-only time of the steps after the prompt (CUDA events around the graph replays),
    median of 3 after a warm-up run; once with a plain graph and once with programmatic dependent launches
    (PDL, the default), checking both give identical tokens/logits. The GEMV shapes are tuned once, for the
    PDL graph, and used by both;
  - transformers generate(), eager attention + dynamic cache, and cache_implementation="static"
    (transformers compiles the decode step): time of 129 new tokens minus time of 1 new token
    (= 128 decode steps), median of 3 after a warm-up;
  - the memory roofline: weight bytes one decode step must read / measured device bandwidth
    (a device-to-device copy, bytes read + written; a read-only kernel is printed beside it);
  - batch 8: tokens/s per row and in total.
Prefill attention speed (the flash prefill kernel) is measured by tools/bench_attention.py, not here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stablelm_ref.cuda import decode_engine as de  # noqa: E402

SHAPES = dict(vocab_size=50304, hidden_size=2560, intermediate_size=6912, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, layer_norm_eps=1e-5, use_qkv_bias=False,
              qk_layernorm=False, use_parallel_residual=False, tie_word_embeddings=False, hidden_act="silu",
              max_position_embeddings=4096, rope_theta=10000.0, partial_rotary_factor=0.25)


def log(*a):
    print(*a, flush=True)


def engine_config(layers=None):
    c = dict(SHAPES)
    if layers:
        c["num_hidden_layers"] = layers
    hd = c["hidden_size"] // c["num_attention_heads"]
    return SimpleNamespace(**c, head_dim=hd, rotary_ndims=int(hd * c["partial_rotary_factor"]), rope_scaling=None)


def random_params(cfg, seed=0):
    """Random bf16 weights made on the GPU (std 0.02 like transformers' init; LayerNorm 1 / 0)."""
    import cupy as cp
    rng = cp.random.default_rng(seed)
    hd, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qd, kd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim

    def w(*shape):
        return de.f32_to_bf16_bits(rng.standard_normal(shape, dtype=cp.float32) * cp.float32(0.02))

    p = {"model.embed_tokens.weight": w(V, hd), "lm_head.weight": w(V, hd),
         "model.norm.weight": cp.ones(hd, cp.float32), "model.norm.bias": cp.zeros(hd, cp.float32)}
    for i in range(cfg.num_hidden_layers):
        q = f"model.layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm"):
            p[q + ln + ".weight"], p[q + ln + ".bias"] = cp.ones(hd, cp.float32), cp.zeros(hd, cp.float32)
        p[q + "self_attn.q_proj.weight"], p[q + "self_attn.k_proj.weight"] = w(qd, hd), w(kd, hd)
        p[q + "self_attn.v_proj.weight"], p[q + "self_attn.o_proj.weight"] = w(kd, hd), w(hd, qd)
        p[q + "mlp.gate_proj.weight"], p[q + "mlp.up_proj.weight"] = w(I, hd), w(I, hd)
        p[q + "mlp.down_proj.weight"] = w(hd, I)
    return p


# ----------------------------------------------------------------------------- device bandwidth
def measure_bandwidth(kernels, gib=4.0):
    import cupy as cp
    n = int(gib * 2**30) // 4
    src = cp.random.default_rng(1).standard_normal(n, dtype=cp.float32)
    dst = cp.empty_like(src)
    blocks = kernels.num_sms * 8
    out = cp.empty(blocks, cp.float32)
    rt = cp.cuda.runtime

    def copy():
        rt.memcpyAsync(dst.data.ptr, src.data.ptr, src.nbytes, rt.memcpyDeviceToDevice,
                       cp.cuda.get_current_stream().ptr)

    def timed(fn, reps=5):
        fn()
        ts = []
        for _ in range(reps):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            ts.append(cp.cuda.get_elapsed_time(e0, e1) * 1e-3)
        return float(np.median(ts))

    t_copy = timed(copy)
    t_read = timed(lambda: kernels.read_probe_fn((blocks,), (512,), (src, np.uint64(src.nbytes // 16), out)))
    return 2 * n * 4 / t_copy, n * 4 / t_read          # bytes/s: copy (read + written), read-only


# ----------------------------------------------------------------------------- this engine
def time_engine_decode(engine, ids, new_tokens, reps=3):
    """Decode-only seconds for new_tokens - 1 steps after prefill (events around the replays)."""
    import cupy as cp
    times = []
    for r in range(reps + 1):                       # run 0: warm-up (GEMV tuning, graph capture)
        engine.prefill(ids, logits=None)
        if r == 0:
            engine.capture(engine._nb)
        s = engine.stream
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record(s)
        for _ in range(new_tokens - 1):
            engine.decode_step()
        e1.record(s)
        e1.synchronize()
        if r:
            times.append(cp.cuda.get_elapsed_time(e0, e1) * 1e-3)
    return float(np.median(times)), engine.generated()


def step_breakdown(engine, nb):
    """Graph replay time of one full step, of its GEMVs alone, and of everything else (ms)."""
    plan = engine._plan(nb)
    gemv = [f for f in plan if f.tag.startswith("gemv")]
    other = [f for f in plan if not f.tag.startswith("gemv")]
    return {"step": engine.time_launches(plan, reps=5), "gemv only": engine.time_launches(gemv, reps=5),
            "other only": engine.time_launches(other, reps=5), "launches": len(plan)}


# ----------------------------------------------------------------------------- transformers
def build_hf(cfg_kwargs, attn):
    import torch
    import transformers
    cfg = transformers.StableLmConfig(**cfg_kwargs)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = transformers.StableLmForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    if next(model.parameters()).dtype != torch.bfloat16:
        model = model.to(torch.bfloat16)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def params_from_torch(model):
    """Zero-copy CuPy views (int16 bit patterns of the bf16 weights) of the transformers model."""
    import cupy as cp
    import torch
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().contiguous()
        out[k] = cp.from_dlpack(v.view(torch.int16) if v.dtype == torch.bfloat16 else v)
    return out


def time_hf_generate(model, ids, new_tokens, reps=3, **kw):
    """(seconds for new_tokens - 1 decode steps, generated ids): t(new_tokens) - t(1), median of reps."""
    import torch
    mask = torch.ones_like(ids)

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t, out

    run(new_tokens)                                   # warm-up (and compilation for the static cache)
    run(1)
    long, short = [], []
    for _ in range(reps):
        t, out = run(new_tokens)
        long.append(t)
        short.append(run(1)[0])
    return float(np.median(long) - np.median(short)), out[:, ids.shape[1]:].cpu().numpy()


# ----------------------------------------------------------------------------- main
def versions():
    v = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("cupy", "torch", "transformers"):
        try:
            v[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            pass
    try:
        import cupy as cp
        v["cuda runtime"] = cp.cuda.runtime.runtimeGetVersion()
        v["driver"] = cp.cuda.runtime.driverGetVersion()
    except Exception:  # noqa: BLE001
        pass
    return v


def ncu_step(args):
    """Build the engine on random weights, run a prompt and warm steps, profile one eager step."""
    import cupy as cp
    cfg = engine_config(args.layers)
    kernels = de.DecodeKernels()
    engine = de.GpuDecodeEngine(cfg, random_params(cfg), max_batch=1, max_len=args.prompt + args.new + 8,
                                kernels=kernels)
    ids = np.random.default_rng(0).integers(2, cfg.vocab_size, (1, args.prompt))
    engine.prefill(ids, logits=None)
    for _ in range(4):
        engine.decode_step()
    engine.decode_step(use_graph=False)
    engine.synchronize()
    log("tuning:", json.dumps(engine.tuning[1]))
    cp.cuda.runtime.profilerStart()
    engine.decode_step(use_graph=False)
    engine.synchronize()
    cp.cuda.runtime.profilerStop()
    log("profiled one decode step:", len(engine._plan(1)), "launches")


def ncu_summary(path):
    """Per-kernel table from `ncu --csv --print-units base --metrics gpu__time_duration.sum,dram__bytes_read.sum,...`."""
    import csv
    from collections import defaultdict
    rows = [r for r in csv.DictReader(line for line in open(path) if line.startswith('"'))]
    per = defaultdict(dict)                       # launch id -> {metric: value, name, grid, block}
    for r in rows:
        d = per[r["ID"]]
        d["name"], d["grid"], d["block"] = r["Kernel Name"].split("(")[0], r["Grid Size"], r["Block Size"]
        try:
            d[r["Metric Name"]] = float(r["Metric Value"].replace(",", ""))
        except ValueError:
            pass
    groups = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for d in per.values():
        g = groups[(d["name"], d["grid"], d["block"])]
        g[0] += 1
        g[1] += d.get("gpu__time_duration.sum", 0.0) * 1e-3                 # ns -> us
        g[2] += d.get("dram__bytes_read.sum", 0.0)
        g[3] += d.get("dram__throughput.avg.pct_of_peak_sustained_elapsed", 0.0)
    total = sum(g[1] for g in groups.values())
    log(f"ncu: {len(per)} kernels, sum of kernel times {total:.1f} us")
    log("| kernel | grid | block | launches | total us | % | us/launch | MB read/launch | GB/s | DRAM % of peak |")
    log("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (name, grid, block), (n, us, byt, pct) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        log(f"| {name} | {grid} | {block} | {n} | {us:.1f} | {100 * us / total:.1f} | {us / n:.2f} | "
            f"{byt / n / 1e6:.2f} | {byt / (us * 1e-6) / 1e9 if us else 0:.0f} | {pct / n:.0f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128, help="new tokens (decode steps = new - 1 + 1 warm)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (smoke runs)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-static", action="store_true")
    ap.add_argument("--batch8", type=int, default=8)
    ap.add_argument("--hf-batch8", action="store_true", help="also time transformers eager at the large batch")
    ap.add_argument("--static-budget", type=int, default=240, help="seconds allowed for the static-cache run")
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--no-pdl", action="store_true", help="skip the programmatic-dependent-launch variant")
    ap.add_argument("--ncu-step", action="store_true")
    ap.add_argument("--ncu-summary", type=str, default=None, help="summarise an ncu --csv file and exit")
    args = ap.parse_args()
    if args.ncu_summary:
        return ncu_summary(args.ncu_summary)
    if args.ncu_step:
        return ncu_step(args)

    t_start = time.time()
    res = {"versions": versions()}
    kernels = de.DecodeKernels()
    res["gpu"] = kernels.device_name
    log("GPU:", kernels.device_name, "| kernels:", kernels.source, "|", res["versions"])
    bw_copy, bw_read = measure_bandwidth(kernels)
    res["bandwidth copy GB/s"], res["bandwidth read GB/s"] = bw_copy / 1e9, bw_read / 1e9
    log(f"device bandwidth: copy {bw_copy / 1e9:.0f} GB/s (read + write), read-only kernel {bw_read / 1e9:.0f} GB/s")

    cfg = engine_config(args.layers)
    hf_kwargs = {k: v for k, v in SHAPES.items()}
    if args.layers:
        hf_kwargs["num_hidden_layers"] = args.layers
    max_len = args.prompt + args.new + 8
    rng = np.random.default_rng(0)
    ids1 = rng.integers(2, cfg.vocab_size, (1, args.prompt))
    ids8 = rng.integers(2, cfg.vocab_size, (args.batch8, args.prompt))

    model = None
    if not args.skip_hf:
        import torch
        model = build_hf(hf_kwargs, "eager")
        params = params_from_torch(model)
        log(f"transformers model built ({time.time() - t_start:.0f} s)")
    else:
        params = random_params(cfg)
    engine = de.GpuDecodeEngine(cfg, params, max_batch=max(1, args.batch8), max_len=max_len, kernels=kernels)
    del params
    for ids in (ids1, ids8) if args.batch8 else (ids1,):   # tune the GEMVs as the default engine runs (PDL)
        engine.prefill(ids, logits=None)
        engine.capture(ids.shape[0])
    log(f"GEMVs tuned ({time.time() - t_start:.0f} s)")
    engine.pdl = False                                     # plain graph first (same shapes); the PDL variant below
    wbytes = engine.weight_bytes_per_step()
    res["weight bytes per step"] = wbytes
    log(f"engine ready ({time.time() - t_start:.0f} s); weights read per step {wbytes / 1e9:.3f} GB")

    t1, gen1 = time_engine_decode(engine, ids1, args.new)
    logits_plain = engine.get_logits()
    steps = args.new - 1
    res["engine b1 tok/s"] = steps / t1
    res["engine b1 ms/token"] = 1e3 * t1 / steps
    res["tuning b1"] = engine.tuning[1]
    engine.prefill(ids1, logits=None)               # fresh cache room for the breakdown's replays
    res["breakdown b1 ms"] = step_breakdown(engine, 1)
    log(f"engine batch 1: {steps / t1:.1f} tok/s ({1e3 * t1 / steps:.3f} ms/token); breakdown {res['breakdown b1 ms']}")
    for name, g in engine.tuning[1].items():
        log(f"  gemv {name:8s} rows/block {g.rows} threads {g.threads:4d} persistent blocks/SM {g.persist}: "
            f"alone {g.us:7.1f} us  {g.gbs:6.0f} GB/s")
    if args.batch8:
        t8, gen8 = time_engine_decode(engine, ids8, args.new)
        res["engine b8 tok/s per row"] = steps / t8
        res["engine b8 tok/s total"] = steps * args.batch8 / t8
        res["tuning b8"] = engine.tuning[args.batch8]
        log(f"engine batch {args.batch8}: {steps / t8:.1f} tok/s per row, {steps * args.batch8 / t8:.0f} total")
    if not args.no_pdl:                              # the same engine, graph captured with PDL edges
        engine.pdl = True
        t1p, gen1p = time_engine_decode(engine, ids1, args.new)
        if engine.pdl:
            same = bool(np.array_equal(gen1p, gen1) and np.array_equal(engine.get_logits(), logits_plain))
            res["engine+pdl b1 tok/s"] = steps / t1p
            res["engine+pdl b1 identical to plain graph"] = same
            log(f"engine batch 1 with PDL: {steps / t1p:.1f} tok/s ({1e3 * t1p / steps:.3f} ms/token); "
                f"tokens and logits identical to the plain graph: {same}")
            if args.batch8:
                t8p, gen8p = time_engine_decode(engine, ids8, args.new)
                res["engine+pdl b8 tok/s per row"] = steps / t8p
                res["engine+pdl b8 identical to plain graph"] = bool(np.array_equal(gen8p, gen8))
                log(f"engine batch {args.batch8} with PDL: {steps / t8p:.1f} tok/s per row, identical tokens: "
                    f"{res['engine+pdl b8 identical to plain graph']}")
        else:
            res["pdl error"] = engine.pdl_error
            log("PDL capture failed, plain launches kept:", engine.pdl_error)
        engine.pdl = False
    kv = engine.kv_bytes_per_step(args.prompt + args.new // 2)
    res["roofline tok/s"] = bw_copy / wbytes
    res["roofline tok/s (read-only bw)"] = bw_read / wbytes
    res["kv bytes per step (mid-run)"] = kv

    if model is not None:                           # (torch was imported to build it)
        ids_t = torch.as_tensor(ids1, device="cuda")
        t_e, gen_e = time_hf_generate(model, ids_t, args.new)
        res["hf eager b1 tok/s"] = steps / t_e
        log(f"transformers eager batch 1: {steps / t_e:.1f} tok/s ({time.time() - t_start:.0f} s)")
        if args.batch8 and args.hf_batch8:
            t_e8, _ = time_hf_generate(model, torch.as_tensor(ids8, device="cuda"), args.new)
            res["hf eager b8 tok/s per row"] = steps / t_e8
            log(f"transformers eager batch {args.batch8}: {steps / t_e8:.1f} tok/s per row")
        match = int(np.argmin(np.append(gen1[0, : gen_e.shape[1]] == gen_e[0], False)))
        res["greedy ids equal to transformers eager (prefix)"] = match
        if not args.skip_static:
            try:
                model.set_attn_implementation("sdpa")
                attn = "sdpa"
            except Exception:  # noqa: BLE001
                attn = "eager"
            import signal

            def _late(*_):
                raise TimeoutError(f"static-cache run took longer than {args.static_budget} s")
            signal.signal(signal.SIGALRM, _late)
            signal.alarm(args.static_budget)
            try:
                t_s, gen_s = time_hf_generate(model, ids_t, args.new, cache_implementation="static")
                signal.alarm(0)
                res["hf static b1 tok/s"] = steps / t_s
                res["hf static attention"] = attn
                log(f"transformers static cache ({attn}) batch 1: {steps / t_s:.1f} tok/s ({time.time() - t_start:.0f} s)")
            except Exception as e:  # noqa: BLE001
                signal.alarm(0)
                res["hf static error"] = repr(e)[:300]
                log("transformers static cache failed:", repr(e)[:300])

    # ------------------------------------------------------------------ the table
    roof = res["roofline tok/s"]
    rows = [("this engine, CUDA graph, batch 1", res["engine b1 tok/s"], f"{100 * res['engine b1 tok/s'] / roof:.0f}%")]
    if "engine+pdl b1 tok/s" in res:
        rows.append(("this engine, CUDA graph + PDL, batch 1", res["engine+pdl b1 tok/s"],
                     f"{100 * res['engine+pdl b1 tok/s'] / roof:.0f}% (same tokens/logits as plain: "
                     f"{res['engine+pdl b1 identical to plain graph']})"))
    if "hf eager b1 tok/s" in res:
        rows.append(("transformers eager + dynamic cache, batch 1", res["hf eager b1 tok/s"],
                     f"{100 * res['hf eager b1 tok/s'] / roof:.0f}%"))
    if "hf static b1 tok/s" in res:
        rows.append((f"transformers static cache, compiled ({res['hf static attention']}), batch 1",
                     res["hf static b1 tok/s"], f"{100 * res['hf static b1 tok/s'] / roof:.0f}%"))
    if "engine b8 tok/s per row" in res:
        rows.append((f"this engine, batch {args.batch8} (per row / total)", res["engine b8 tok/s per row"],
                     f"total {res['engine b8 tok/s total']:.0f} tok/s"))
    if "engine+pdl b8 tok/s per row" in res:
        rows.append((f"this engine + PDL, batch {args.batch8} (per row / total)", res["engine+pdl b8 tok/s per row"],
                     f"total {res['engine+pdl b8 tok/s per row'] * args.batch8:.0f} tok/s"))
    if "hf eager b8 tok/s per row" in res:
        rows.append((f"transformers eager, batch {args.batch8} (per row / total)", res["hf eager b8 tok/s per row"],
                     f"total {res['hf eager b8 tok/s per row'] * args.batch8:.0f} tok/s"))
    rows.append(("memory roofline, batch 1 (weights / copy bandwidth)", roof, "100%"))
    log("")
    log(f"## decode, stablelm-3b-4e1t shapes{' (' + str(args.layers) + ' layers)' if args.layers else ''}, bf16, "
        f"prompt {args.prompt}, {args.new} new tokens, {res['gpu']}")
    log(f"weights read per token {wbytes / 1e9:.3f} GB; copy bandwidth {bw_copy / 1e9:.0f} GB/s "
        f"(read-only kernel {bw_read / 1e9:.0f} GB/s); engine step: {res['breakdown b1 ms']}")
    log("| decoder | tokens/s | % of roofline / note |")
    log("|---|---:|---|")
    for name, tps, note in rows:
        log(f"| {name} | {tps:.1f} | {note} |")
    res["wall s"] = time.time() - t_start
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
