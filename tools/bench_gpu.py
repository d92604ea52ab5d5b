"""Decode speed on one GPU through model.generate, across the StableLM family's shapes, against the
memory roofline and transformers, in one run (`make bench-gpu`).

    python tools/bench_gpu.py                  # everything; one table at the end with the GPU's name
    python tools/bench_gpu.py --skip-hf        # this package only (no torch needed)
    python tools/bench_gpu.py --shapes 3b-4e1t --skip-static
    python tools/bench_gpu.py --ncu-step       # one eager engine step between cudaProfilerStart/Stop, for
        ncu --clock-control none --profile-from-start off --csv --metrics gpu__time_duration.sum \\
            python tools/bench_gpu.py --ncu-step

Shapes (random bf16 weights, std 0.02, LayerNorm 1 / 0): stablelm-2-1_6b, stablelm-3b-4e1t, stablelm-2-12b
(published config.json values: vocab, hidden, intermediate, layers, heads, kv heads, qkv bias, qk LayerNorm,
parallel residual; head_dim 64 / 80 / 160, rotary 25%). Prompt 128 random tokens, 128 new tokens, no EOS.
Measured in one run on one GPU:
  - StableLmForCausalLM(..., device="gpu").generate(ids, max_new_tokens=128): decode tokens/s from the
    `timings` generate reports (host clock from the first token read to the last: everything a user waits
    for, the host's per-token work included), median of 3 after a warm-up call (GEMV tuning, graph capture);
    greedy batch 1, sampling batch 1 (temperature 0.8, top-k 50, top-p 0.9), greedy batch 8 (3b only, total
    tokens/s over the 8 rows); time to the first token (the model's own forward on the prompt);
  - the engine's step alone: graph replays between CUDA events (the argmax left out), to separate the GPU's
    step time from the loop's host time;
  - the memory roofline: weight bytes one decode step must read / measured device bandwidth (a
    device-to-device copy, bytes read + written);
  - transformers generate() at 3b-4e1t shapes on the same weights (eager + dynamic cache, and
    cache_implementation="static", which compiles the decode step): t(128 new) - t(1 new), median of 3.
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
from stablelm_ref.cuda import bf16, decode_engine as de, decode_kernels as kn  # noqa: E402
from stablelm_ref.checkpoint import expected_shapes  # noqa: E402

SHAPES = dict(vocab_size=50304, hidden_size=2560, intermediate_size=6912, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, layer_norm_eps=1e-5, use_qkv_bias=False,
              qk_layernorm=False, use_parallel_residual=False, tie_word_embeddings=False, hidden_act="silu",
              max_position_embeddings=4096, rope_theta=10000.0, partial_rotary_factor=0.25)


COMMON = dict(layer_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=4096,
              rope_theta=10000.0, partial_rotary_factor=0.25)
FAMILY = {   # published config.json shapes
    "2-1.6b": dict(vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                   num_attention_heads=32, num_key_value_heads=32, use_qkv_bias=True, qk_layernorm=False,
                   use_parallel_residual=False, **COMMON),
    "3b-4e1t": SHAPES,
    "2-12b": dict(vocab_size=100352, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=32, num_key_value_heads=8, use_qkv_bias=False, qk_layernorm=True,
                  use_parallel_residual=True, **COMMON),
}
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=0)


def log(*a):
    print(*a, flush=True)


def engine_config(layers=None, shapes=None):
    """The engine's config (a namespace) for `shapes` (a FAMILY entry; default 3b-4e1t), optionally fewer layers."""
    c = dict(shapes or SHAPES)
    if layers:
        c["num_hidden_layers"] = layers
    hd = c["hidden_size"] // c["num_attention_heads"]
    return SimpleNamespace(**c, head_dim=hd, rotary_ndims=int(hd * c["partial_rotary_factor"]), rope_scaling=None)


def random_params(cfg, seed=0):
    """Random weights made on the GPU for every tensor a checkpoint of this config holds
    (checkpoint.expected_shapes, as model.from_config builds them): matrices bf16 with std 0.02 like
    transformers' init, LayerNorms 1 / 0 and biases std 0.02 in float32."""
    import cupy as cp
    rng = cp.random.default_rng(seed)
    p = {}
    for name, shape in expected_shapes(cfg, "causal_lm").items():
        if "layernorm" in name or name.startswith("model.norm"):
            p[name] = (cp.ones if name.endswith("weight") else cp.zeros)(shape, cp.float32)
        elif name.endswith("bias"):
            p[name] = rng.standard_normal(shape, dtype=cp.float32) * cp.float32(0.02)
        else:
            p[name] = bf16.f32_to_bf16_bits(rng.standard_normal(shape, dtype=cp.float32) * cp.float32(0.02))
    return p


# ----------------------------------------------------------------------------- device bandwidth
READ_PROBE = r"""
extern "C" __global__ void read_probe(const uint4* __restrict__ src, size_t n16, float* __restrict__ out) {
    // out[blockIdx.x] = sum of the block's slice; every 16-byte chunk read once, past L1 (as decode.cu's GEMV)
    __shared__ float buf[32];
    float s = 0.f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += (size_t)gridDim.x * blockDim.x) {
        uint4 v;
        asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
            : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(src + i));
        s += __uint_as_float(v.x) + __uint_as_float(v.y) + __uint_as_float(v.z) + __uint_as_float(v.w);
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.f;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += buf[w];
        out[blockIdx.x] = t;
    }
}
"""


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
    probe = cp.RawKernel(READ_PROBE, "read_probe")
    t_read = timed(lambda: probe((blocks,), (512,), (src, np.uint64(src.nbytes // 16), out)))
    return 2 * n * 4 / t_copy, n * 4 / t_read          # bytes/s: copy (read + written), read-only


# ----------------------------------------------------------------------------- this engine
def step_breakdown(engine, nb):
    """Graph replay time of one full step, of its GEMVs alone, and of everything else (ms)."""
    plan = engine._plan(nb)
    if engine.uses_step_kernel(nb):              # [embed, the whole-step kernel, argmax]: no GEMV launches
        return {"step": engine.time_launches(plan, reps=5), "launches": len(plan)}
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
    kernels = kn.DecodeKernels()
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


def build_model(shapes, layers=None, seed=0):
    """StableLmForCausalLM on the GPU with random bf16 weights made on the device (no host copy)."""
    import cupy as cp
    import ml_dtypes

    from stablelm_ref import StableLmConfig, StableLmForCausalLM
    from stablelm_ref.checkpoint import expected_shapes

    kw = dict(shapes, eos_token_id=None, pad_token_id=None)
    if layers:
        kw["num_hidden_layers"] = layers
    config = StableLmConfig(**kw)
    bf16_dtype, rng, params = np.dtype(ml_dtypes.bfloat16), cp.random.default_rng(seed), {}
    for name, shape in expected_shapes(config, "causal_lm").items():
        if "norm" in name:
            params[name] = (cp.ones if name.endswith("weight") else cp.zeros)(shape, cp.float32).astype(bf16_dtype)
        elif name.endswith("bias"):
            params[name] = cp.zeros(shape, bf16_dtype)
        else:
            params[name] = bf16.f32_to_bf16_bits(rng.standard_normal(shape, dtype=cp.float32) * cp.float32(0.02)
                                                 ).view(bf16_dtype)
    return StableLmForCausalLM(config, params, device="gpu")


def time_generate(model, ids, new_tokens, reps=3, **kw):
    """{decode tok/s (all rows), first token s}: medians of reps model.generate calls after a warm-up."""
    model.generate(ids, max_new_tokens=new_tokens, **kw)        # warm-up: GEMV tuning, graph capture
    rates, ttft = [], []
    for _ in range(reps):
        t = {}
        model.generate(ids, max_new_tokens=new_tokens, timings=t, **kw)
        rates.append(t["decode_tokens"] / t["decode_s"])
        ttft.append(t["prefill_s"])
    return float(np.median(rates)), float(np.median(ttft))


def megakernel_ab(model, engine, ids1, args, r, name, rounds=3):
    """Batch 1 greedy with the step as per-layer launches (engine.megakernel False) and as the whole-step
    kernel (True), alternating, `rounds` times: medians of the engine's step (graph replay) and of generate."""
    got, before = {False: ([], []), True: ([], [])}, engine.megakernel
    for _ in range(rounds):
        for mk in (False, True):
            engine.megakernel = mk
            engine.reserve(1, args.prompt + args.new + 1)
            got[mk][0].append(engine.time_step(1))
            got[mk][1].append(time_generate(model, ids1, args.new)[0])
    engine.megakernel = before
    for mk, label in ((False, "per-layer launches"), (True, "whole-step kernel")):
        ms, tps = float(np.median(got[mk][0])), float(np.median(got[mk][1]))
        r[f"b1 {label}: step ms, greedy tok/s"] = (ms, tps)
        log(f"{name}: batch 1, {label}: engine step {ms:.4f} ms (all {[round(v, 4) for v in got[mk][0]]}), "
            f"generate greedy {tps:.1f} tok/s (all {[round(v, 1) for v in got[mk][1]]})")


def bench_shape(name, args, bw_copy, res):
    import cupy as cp

    model = build_model(FAMILY[name], args.layers)
    fast = model.fast()
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    ids1 = rng.integers(2, V, (1, args.prompt))
    r = res[name] = {}
    r["greedy b1 tok/s"], r["ttft b1 s"] = time_generate(model, ids1, args.new)
    engine = fast.engine
    assert engine is not None, fast.unsupported
    wbytes = engine.weight_bytes_per_step()
    r["weight GB per step"] = wbytes / 1e9
    r["roofline tok/s"] = bw_copy / wbytes
    engine.reserve(1, args.prompt + args.new + 1)
    r["engine step b1 ms (graph replay)"] = engine.time_step(1)
    engine.reserve(1, args.prompt + args.new + 64)
    engine.start(np.ones((1, args.prompt), np.int64))
    r["breakdown b1 ms (plain graph)"] = step_breakdown(engine, 1)
    log(f"{name}: breakdown {r['breakdown b1 ms (plain graph)']}")
    r["tuning b1"] = {k: tuple(v) for k, v in engine.tuning[1].items()}
    log(f"{name}: greedy b1 {r['greedy b1 tok/s']:.1f} tok/s ({100 * r['greedy b1 tok/s'] / r['roofline tok/s']:.0f}% "
        f"of {r['roofline tok/s']:.0f}); engine step alone {r['engine step b1 ms (graph replay)']:.3f} ms "
        f"= {1e3 / r['engine step b1 ms (graph replay)']:.0f} tok/s; first token {1e3 * r['ttft b1 s']:.1f} ms")
    r["whole-step kernel b1 (tuner's choice)"] = (engine.step_kernel.get(1), engine.step_kernel_note)
    log(f"{name}: the tuner's whole-step kernel choice {engine.step_kernel.get(1)} ({engine.step_kernel_note})")
    if args.megakernel_ab:
        megakernel_ab(model, engine, ids1, args, r, name)
    r["sampling b1 tok/s"], _ = time_generate(model, ids1, args.new, **SAMPLING)
    log(f"{name}: sampling b1 {r['sampling b1 tok/s']:.1f} tok/s "
        f"({100 * r['sampling b1 tok/s'] / r['greedy b1 tok/s']:.0f}% of greedy)")
    if name in args.batch8_shapes:
        ids8 = rng.integers(2, V, (8, args.prompt))
        r["greedy b8 tok/s total"], r["ttft b8 s"] = time_generate(model, ids8, args.new)
        engine.reserve(8, args.prompt + args.new + 1)
        r["engine step b8 ms (graph replay)"] = engine.time_step(8)
        r["tuning b8"] = {k: tuple(v) for k, v in engine.tuning[8].items()}
        log(f"{name}: batch 8 GEMVs (rows, threads, persist, us, GB/s, unroll: 0 CUDA cores, >0 tensor cores): "
            f"{r['tuning b8']}")
        log(f"{name}: greedy b8 {r['greedy b8 tok/s total']:.0f} tok/s in total; engine step alone "
            f"{r['engine step b8 ms (graph replay)']:.3f} ms")
    hf_model = None
    if name == "3b-4e1t" and not args.skip_hf:
        hf_model = bench_transformers(model, ids1, args, r)
    del model, fast, engine, hf_model
    cp.get_default_memory_pool().free_all_blocks()


def hf_copy(model, cfg_kwargs, attn):
    """transformers' StableLM (bf16, CUDA) holding `model`'s weights (our GPU model's params, bf16 CuPy)."""
    import torch
    hf = build_hf(cfg_kwargs, attn)
    with torch.no_grad():
        sd = hf.state_dict()
        for k, v in model.params.items():
            if k in sd:
                sd[k].copy_(torch.from_dlpack(v.view(np.int16)).view(torch.bfloat16))
    return hf


def bf16_logit_errors(model, hf_model=None, prompt=64, new=16, seed=0):
    """Relative 2-norm errors ||bf16 - f64|| / ||f64|| of logits against this package's float64 CPU reference on
    the same weights, at the same positions (the prompt's last, then `new` more teacher-forced on random ids):
      engine: the prefill's last logits, then `new` decode steps of the graph engine through EngineSteps, the
              step backend model.generate uses (float32 logits from bf16 weights and activations)
      transformers: hf_model's bfloat16 forward over the same ids (None without hf_model)."""
    import cupy as cp

    from stablelm_ref import StableLmForCausalLM
    from stablelm_ref.fast_gpu import EngineSteps

    seq = np.random.default_rng(seed).integers(2, model.config.vocab_size, (1, prompt + new))
    f64 = StableLmForCausalLM(model.config, {k: cp.asnumpy(v).astype(np.float64) for k, v in model.params.items()})
    ref = f64(seq).logits[:, prompt - 1: prompt + new]                      # [1, new + 1, V] float64
    del f64
    steps = model.fast().decode_steps(1, prompt + new)
    assert isinstance(steps, EngineSteps), "the graph engine does not cover this model"
    with steps.context():                  # the engine (built here), on its stream: every copy ordered after its step
        steps.engine.use_sampler(None)
        got = [steps.prefill(seq[:, :prompt], np.ones((1, prompt), np.int64), np.arange(prompt)[None])
               .astype(cp.float32)]
        for i in range(prompt, prompt + new):
            got.append(steps.step(seq[:, i], None, None, None).copy())
        ours = cp.asnumpy(cp.stack(got, axis=1)).astype(np.float64)     # (outside it, a race: see the notes)

    def rel(a):
        return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))
    out = {"engine": rel(ours), "transformers": None}
    if hf_model is not None:
        import torch
        with torch.no_grad():
            theirs = hf_model(torch.as_tensor(seq, device="cuda")).logits[:, prompt - 1: prompt + new]
        out["transformers"] = rel(theirs.float().cpu().numpy().astype(np.float64))
    return out


def bench_transformers(model, ids1, args, r):
    """transformers on the same weights (bf16, CUDA), eager and static cache."""
    import torch
    cfg = {k: v for k, v in FAMILY["3b-4e1t"].items()}
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    hf = hf_copy(model, cfg, "eager")
    ids_t = torch.as_tensor(ids1, device="cuda")
    steps = args.new - 1
    t_e, gen_e = time_hf_generate(hf, ids_t, args.new)
    r["hf eager b1 tok/s"] = steps / t_e
    ours = np.asarray(model.generate(ids1, max_new_tokens=args.new).get())[0, ids1.shape[1]:]
    r["greedy ids equal to transformers eager (prefix)"] = int(np.argmin(np.append(ours[: gen_e.shape[1]] == gen_e[0],
                                                                                   False)))
    log(f"transformers eager b1: {r['hf eager b1 tok/s']:.1f} tok/s; our greedy ids equal theirs for the first "
        f"{r['greedy ids equal to transformers eager (prefix)']} tokens")
    if not args.skip_static:
        try:
            hf.set_attn_implementation("sdpa")
        except Exception:  # noqa: BLE001
            pass
        try:
            t_s, _ = time_hf_generate(hf, ids_t, args.new, cache_implementation="static")
            r["hf static b1 tok/s"] = steps / t_s
            log(f"transformers static cache + compile b1: {r['hf static b1 tok/s']:.1f} tok/s")
        except Exception as e:  # noqa: BLE001
            r["hf static error"] = repr(e)[:300]
            log("transformers static cache failed:", repr(e)[:300])
    return hf


def bench_accuracy(args, res):
    """bf16_logit_errors at 3b-4e1t widths, args.accuracy_layers layers (the float64 CPU model must fit)."""
    import cupy as cp
    model = build_model(FAMILY["3b-4e1t"], args.accuracy_layers, seed=1)
    hf = None
    if not args.skip_hf:
        hf = hf_copy(model, dict(FAMILY["3b-4e1t"], num_hidden_layers=args.accuracy_layers), "sdpa")
    a = res["accuracy"] = dict(bf16_logit_errors(model, hf), layers=args.accuracy_layers)
    log(f"bf16 logits vs float64 ({args.accuracy_layers} layers): engine {a['engine']:.3e}, transformers "
        f"{a['transformers'] if a['transformers'] is None else format(a['transformers'], '.3e')}")
    del model, hf
    cp.get_default_memory_pool().free_all_blocks()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128, help="new tokens per generate call")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (smoke runs)")
    ap.add_argument("--shapes", nargs="+", default=list(FAMILY), choices=list(FAMILY))
    ap.add_argument("--batch8-shapes", nargs="*", default=["3b-4e1t"], help="shapes also timed at batch 8")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-static", action="store_true")
    ap.add_argument("--accuracy-layers", type=int, default=8,
                    help="bf16 logits vs float64 at 3b-4e1t widths with this many layers (0: skip)")
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--megakernel-ab", action="store_true",
                    help="batch 1: time the per-layer step and the whole-step kernel (decode_step.cu) alternately")
    ap.add_argument("--ncu-step", action="store_true")
    ap.add_argument("--ncu-summary", type=str, default=None, help="summarise an ncu --csv file and exit")
    args = ap.parse_args()
    if args.ncu_summary:
        return ncu_summary(args.ncu_summary)
    if args.ncu_step:
        return ncu_step(args)

    t_start = time.time()
    res = {"versions": versions()}
    kernels = kn.DecodeKernels()
    res["gpu"] = kernels.device_name
    log("GPU:", kernels.device_name, "| kernels:", kernels.source, "|", res["versions"])
    bw_copy, bw_read = measure_bandwidth(kernels)
    res["bandwidth copy GB/s"], res["bandwidth read GB/s"] = bw_copy / 1e9, bw_read / 1e9
    log(f"device bandwidth: copy {bw_copy / 1e9:.0f} GB/s (read + write), read-only kernel {bw_read / 1e9:.0f} GB/s")
    for name in args.shapes:
        bench_shape(name, args, bw_copy, res)
        log(f"({time.time() - t_start:.0f} s)")
    if args.accuracy_layers:
        bench_accuracy(args, res)
        log(f"({time.time() - t_start:.0f} s)")

    log("")
    log(f"## decode through model.generate, bf16, prompt {args.prompt}, {args.new} new tokens, {res['gpu']}"
        f"{' (' + str(args.layers) + ' layers)' if args.layers else ''}; copy bandwidth {bw_copy / 1e9:.0f} GB/s")
    log("| shapes | decoder | tokens/s | % of roofline / note |")
    log("|---|---|---:|---|")
    for name in args.shapes:
        r = res[name]
        roof, g = r["roofline tok/s"], r["greedy b1 tok/s"]
        step = r["engine step b1 ms (graph replay)"]
        log(f"| {name} | generate, greedy, batch 1 | {g:.1f} | {100 * g / roof:.0f}%; engine step alone {step:.3f} ms "
            f"({100 * (1e3 / step) / roof:.0f}%); first token {1e3 * r['ttft b1 s']:.0f} ms |")
        log(f"| {name} | generate, sampling (T 0.8, top-k 50, top-p 0.9), batch 1 | {r['sampling b1 tok/s']:.1f} | "
            f"{100 * r['sampling b1 tok/s'] / g:.0f}% of greedy |")
        if "greedy b8 tok/s total" in r:
            log(f"| {name} | generate, greedy, batch 8 (total) | {r['greedy b8 tok/s total']:.0f} | engine step alone "
                f"{r['engine step b8 ms (graph replay)']:.3f} ms = {8e3 / r['engine step b8 ms (graph replay)']:.0f} "
                f"tok/s |")
        if "hf eager b1 tok/s" in r:
            log(f"| {name} | transformers eager + dynamic cache, batch 1 | {r['hf eager b1 tok/s']:.1f} | "
                f"{100 * r['hf eager b1 tok/s'] / roof:.0f}% |")
        if "hf static b1 tok/s" in r:
            log(f"| {name} | transformers static cache + compile, batch 1 | {r['hf static b1 tok/s']:.1f} | "
                f"{100 * r['hf static b1 tok/s'] / roof:.0f}% |")
        log(f"| {name} | memory roofline ({r['weight GB per step']:.2f} GB / copy bandwidth) | {roof:.0f} | 100% |")
    if "accuracy" in res:
        a = res["accuracy"]
        theirs = "" if a["transformers"] is None else f"; transformers bf16 {a['transformers']:.2e}"
        log(f"| 3b-4e1t widths, {a['layers']} layers | bf16 logits vs float64 CPU (rel. 2-norm, prompt 64 + "
            f"16 decode steps) | | engine {a['engine']:.2e}{theirs} |")
    res["wall s"] = time.time() - t_start
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
