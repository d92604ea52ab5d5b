"""Prefill on the GPU against transformers (SDPA), and the fused attention kernel against torch SDPA.

    python tools/bench_attention.py [--prefill-lens 512,2048] [--prefill-reps 15] [--rounds 3]
                                    [--profile-lens 512] [--host-costs] [--skip-prefill] [--skip-kernel]
                                    [--batch 4] [--heads 32] [--dims 64,80,128,160] [--lens 1024,4096]
                                    [--variants all|default] [--variant-dims 160] [--hopper-variants h4,h24]
                                    [--samples 15] [--probe h24:128]

Part 1, time to first token (`make bench-gpu`): stablelm-3b-4e1t shapes (32 layers, hidden 2560,
32 heads of 80, intermediate 6912, vocab 50304), random bf16 weights shared by both sides
(transformers' model is built by tools/bench_gpu.build_hf; our params are zero-copy CuPy views of its
tensors), batch 1, prompt lengths --prefill-lens. Timed: the model's forward with logits_to_keep=1
and a KV cache (what generate's prefill runs: ours model(ids, logits_to_keep=1, use_cache=True),
transformers' the same call under torch.no_grad, attn_implementation="sdpa"), wall clock with the
device synchronised before and after each call. At short prompts both sides are host-bound, and the
host's speed drifts during a run (seen on the H200 machines: transformers' own 512-token forward
measured 17 to 40 ms in one session), so transformers, ours, and ours without the host-time cuts of
the second round of issue 14 (the linear, rotary_qk and add_layer_norm seams forced to their
references) are timed interleaved, call by call, in --rounds rounds of --prefill-reps calls each;
the table gives the median over rounds of each round's median, and the rounds are printed. Also:
the host time of one forward (from the call to its return, the device not waited for), ours with
each seam forced to its array-API reference (kernels.reference_only, to show what each kernel buys),
--profile-lens: a torch-profiler table of the GPU kernels of one of our forwards and a cProfile of
five; --host-costs: host microseconds per call of each operation a layer runs, on tiny shapes.
Accuracy at the first length: the last position's logits of both bf16 runs against our float32
forward of the same weights.

Part 2, the kernel alone. For each (head_dim, L): which kernel torch's SDPA runs by default (the CUDA
kernels one call launches, from the profiler) and SDPA's rate with each backend forced
(FLASH_ATTENTION, CUDNN_ATTENTION, EFFICIENT_ATTENTION); then checks every kernel variant against
SDPA on the same inputs (||kernel - sdpa|| / ||sdpa||, must be <= 2e-2: both are bf16 outputs ~3e-3
from the exact result), then times it and SDPA with CUDA events: warm-up, then the median of
`--samples` samples, each sample a run of back-to-back calls over rotating input sets (so no sample
re-reads a cached input and the Python launch cost hides behind the GPU work). Causal FLOPs are
counted as 4 * B * H * L^2 * D / 2 (two matmuls of 2 FLOPs per multiply-add, half the score matrix).
On a GPU that runs it (flash_hopper.usable(): an H100/H200 with nvcc or NVRTC for sm_90a), the wgmma
kernel's variants (flash_hopper.CANDIDATES) are timed beside the mma.sync ones, and a last kernel table
puts the fastest of each kernel next to SDPA's default and its FlashAttention-2 backend.
Also measures the bf16 matmul ceiling (torch.matmul, 8192^3) once, for the notes.
cupy <-> torch through DLPack. Prints the tables last.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cupy  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_gpu  # noqa: E402  (tools/bench_gpu.py: the 3b-4e1t shapes and transformers' model, built once there)

from stablelm_ref.cuda import flash_prefill as fp  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


def to_cupy(t: torch.Tensor) -> cupy.ndarray:
    try:
        return cupy.from_dlpack(t)
    except Exception:  # a DLPack without bfloat16: move the bits as int16
        return cupy.from_dlpack(t.view(torch.int16)).view(BF16)


def to_torch(x: cupy.ndarray) -> torch.Tensor:
    try:
        return torch.from_dlpack(x)
    except Exception:
        return torch.from_dlpack(x.view(cupy.int16)).view(torch.bfloat16)


def time_ms(fn, n_inputs: int, samples: int, target_ms: float = 3.0) -> float:
    """Median GPU time of fn(i) in ms (i = which input set), events around back-to-back calls."""
    for i in range(3):
        fn(i % n_inputs)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(0)
    end.record()
    end.synchronize()
    reps = max(1, min(50, int(target_ms / max(start.elapsed_time(end), 1e-3))))
    times, call = [], 0
    for _ in range(samples):
        start.record()
        for _ in range(reps):
            fn(call % n_inputs)
            call += 1
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def matmul_ceiling_tflops(samples: int) -> float:
    n = 8192
    a = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    b = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    ms = time_ms(lambda i: a[i] @ b[i], 2, samples)
    return 2 * n**3 / ms / 1e9


SHAPES_3B = bench_gpu.FAMILY["3b-4e1t"]


def sdpa_backend(qkv) -> str:
    """Which kernel torch's SDPA runs by default here: the names of the CUDA kernels one call launches."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(*qkv, is_causal=True)
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return "; ".join(n[:60] for n in names) or "?"


def sdpa_ms_with(backend: str, sets, args) -> float:
    """SDPA's time with one backend forced (torch.nn.attention.sdpa_kernel), NaN where it refuses."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return time_ms(lambda i: F.scaled_dot_product_attention(*sets[i], is_causal=True),
                           args.sets, args.samples)
    except Exception as e:  # noqa: BLE001  (a backend that does not take these inputs)
        print(f"  SDPA {backend}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return float("nan")


def paired_wall_ms(fns, reps: int, wait: bool = True) -> list:
    """Median wall ms of each of fns, the device synchronised before and (wait) after each call, their
    calls interleaved (a, b, a, b, ...) so that a drift of the host's speed during the measurement (the
    host sets the pace at short prompts) falls on all alike. wait=False: the host time of a call, from
    the call to its return."""
    for fn in fns:
        fn(), fn()
    times = [[] for _ in fns]
    gc.collect()
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if wait:
                torch.cuda.synchronize()
            ts.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return [statistics.median(ts) for ts in times]


def wall_ms(fn, reps: int) -> float:
    """Median wall time of fn() in ms, the device synchronised before and after each call."""
    return paired_wall_ms([fn], reps)[0]


def host_ms(fn, reps: int) -> float:
    """Median host time of fn() in ms: from the call to its return, the device idle at the start and not
    waited for at the end. Where the host, not the GPU, sets the pace, this is the forward's host cost."""
    return paired_wall_ms([fn], reps, wait=False)[0]


def host_costs(n=300):
    """Host microseconds per call of each operation a layer runs, on shapes so small that the GPU's
    work per call (a few us) stays under the host's: n calls back to back, the device synchronised
    before and after. The per-layer ops of the bf16 forward, to see what the host pays for."""
    from stablelm_ref._xp import linear
    from stablelm_ref.attention import causal_attention
    from stablelm_ref.layernorm import add_layer_norm, layer_norm
    from stablelm_ref.mlp import gated_activation
    from stablelm_ref.rotary import apply_rotary, apply_rotary_qk

    rng = np.random.default_rng(0)

    def arr(*shape):
        return cupy.asarray(rng.standard_normal(shape).astype(BF16))

    x, w, ln_w, ln_b = arr(1, 16, 256), arr(256, 256), arr(256), arr(256)
    q, k = arr(1, 4, 16, 64), arr(1, 4, 16, 64)
    cos, sin = arr(1, 16, 16), arr(1, 16, 16)
    cache = cupy.zeros((1, 4, 64, 64), dtype=BF16)
    x2, wt = x.reshape(16, 256), w.T
    from stablelm_ref.cuda import flash_prefill

    ops = {
        "linear (seam: cublasGemmEx)": lambda: linear(x, w),
        "linear (reference: x @ W.T via array_api_compat)": lambda: _ref(linear, x, w),
        "cupy matmul alone (x2 @ w.T)": lambda: x2 @ wt,
        "cupy.empty": lambda: cupy.empty((16, 256), dtype=BF16),
        "residual add (cupy x + y)": lambda: x + x,
        "layer_norm (fused kernel)": lambda: layer_norm(x, ln_w, ln_b, 1e-5),
        "rotary (fused kernel)": lambda: apply_rotary(q, cos, sin, 16),
        "rotary of q and k (one launch)": lambda: apply_rotary_qk(q, k, cos, sin, 16),
        "add + layer_norm (one launch)": lambda: add_layer_norm(x, x, ln_w, ln_b, 1e-5),
        "silu gate (fused kernel)": lambda: gated_activation(x, x, "silu"),
        "cache write (cupy setitem)": lambda: cache.__setitem__((slice(None), slice(None), slice(0, 16)), k),
        "attention (seam: flash kernel + glue)": lambda: causal_attention(q, k, k, None),
        "flash_attention_prefill alone": lambda: flash_prefill.flash_attention_prefill(q, k, k),
    }
    out = {}
    for name, fn in ops.items():
        for _ in range(20):
            fn()
        gc.collect()                # a cyclic-GC pass over the process's objects can land inside a loop
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out[name] = ((t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6, start.elapsed_time(end) * 1e3)
    return out


def _ref(fn, *a):
    from stablelm_ref import kernels
    with kernels.reference_only("linear"):
        return fn(*a)


def prefill_bench(args):
    """Time to first token at 3b-4e1t shapes, ours vs transformers SDPA; returns the table rows."""
    import transformers

    from stablelm_ref import StableLmConfig, StableLmForCausalLM, kernels

    t_build = time.time()
    hf = bench_gpu.build_hf(SHAPES_3B, "sdpa")
    print(f"transformers {transformers.__version__}, attention {hf.config._attn_implementation}", flush=True)
    params = {k: to_cupy(v.detach()) for k, v in hf.state_dict().items()}       # zero-copy views, bf16
    ours = StableLmForCausalLM(StableLmConfig.from_dict({**SHAPES_3B, "model_type": "stablelm"}), params, device="gpu")
    print(f"3b-4e1t shapes built, random bf16 weights shared ({time.time() - t_build:.0f} s)", flush=True)

    lens = [int(x) for x in args.prefill_lens.split(",")]
    rows = []
    for L in lens:
        ids = np.random.default_rng(L).integers(0, SHAPES_3B["vocab_size"], (1, L))
        ids_t = torch.tensor(ids, device="cuda")

        def theirs():
            with torch.no_grad():
                return hf(input_ids=ids_t, logits_to_keep=1, use_cache=True).logits

        def mine(off=()):
            def run():
                with kernels.reference_only(*off) if off else contextlib.nullcontext():
                    return ours(ids, logits_to_keep=1, use_cache=True).logits
            return run

        host_seams = ("linear", "rotary_qk", "add_layer_norm")        # issue 14's host-time cuts, second round
        rounds = [paired_wall_ms([theirs, mine(), mine(host_seams)], args.prefill_reps) for _ in range(args.rounds)]
        hf_ms, our_ms, before_ms = (statistics.median(r[i] for r in rounds) for i in range(3))
        host = {"ours": host_ms(mine(), args.prefill_reps),
                "ours without cuBLAS linear, rotary q+k, add+LN": host_ms(mine(host_seams), args.prefill_reps),
                "transformers": host_ms(theirs, args.prefill_reps)}
        print(f"L={L:5d}: {args.rounds} rounds of {args.prefill_reps} interleaved calls, median ms per round: "
              f"transformers {', '.join(f'{r[0]:.2f}' for r in rounds)} | ours {', '.join(f'{r[1]:.2f}' for r in rounds)}"
              f" | ours without the host cuts {', '.join(f'{r[2]:.2f}' for r in rounds)}", flush=True)
        print(f"L={L:5d}: host ms per forward (call to return, no wait): "
              + ", ".join(f"{k} {v:.2f} ({v / SHAPES_3B['num_hidden_layers'] * 1e3:.0f} us/layer)"
                          for k, v in host.items()), flush=True)
        variants = {"no cuBLAS linear": ("linear",),
                    "no one-launch rotary q+k, add+LN": ("rotary_qk", "add_layer_norm"),
                    "no flash attention": ("attention",),
                    "no fused LN/rotary/SwiGLU": ("layer_norm", "rotary", "gated_activation", "rotary_qk",
                                                  "add_layer_norm"),
                    "all reference": ("*",)}
        extra = {}
        for name, off in variants.items():
            try:
                extra[name] = wall_ms(mine(off), max(3, args.prefill_reps // 3))
            except Exception as e:  # noqa: BLE001  (a comparison column, not the measurement)
                print(f"  {name}: failed ({type(e).__name__}: {e})", flush=True)
                extra[name] = float("nan")
        extra["without cuBLAS linear, rotary q+k, add+LN (paired)"] = before_ms
        extra["host ms"] = host["ours"]
        extra["host ms without those"] = host["ours without cuBLAS linear, rotary q+k, add+LN"]
        extra["transformers host ms"] = host["transformers"]
        rows.append((L, our_ms, hf_ms, extra))
        print(f"L={L:5d}: ours {our_ms:7.2f} ms ({L / our_ms * 1e3:7.0f} tok/s) | transformers SDPA {hf_ms:7.2f} ms "
              f"({L / hf_ms * 1e3:7.0f} tok/s) | ratio {hf_ms / our_ms:5.2f} | "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in extra.items()), flush=True)
        if L == lens[0]:
            ref32 = StableLmForCausalLM(ours.config, {k: v.astype(cupy.float32) for k, v in params.items()},
                                        device="gpu")
            r = ref32(ids, logits_to_keep=1).logits.astype(cupy.float64)
            a = ours(ids, logits_to_keep=1).logits.astype(cupy.float64)
            b = cupy.asarray(theirs().float().cpu().numpy()).astype(cupy.float64)
            err = lambda x: float(cupy.linalg.norm(x - r) / cupy.linalg.norm(r))  # noqa: E731
            print(f"L={L}: last-position logits, bf16 vs our float32 forward: ours {err(a):.2e}, "
                  f"transformers {err(b):.2e}", flush=True)
            del ref32
            cupy.get_default_memory_pool().free_all_blocks()
    for L in [int(x) for x in args.profile_lens.split(",") if x]:
        ids = np.random.default_rng(L).integers(0, SHAPES_3B["vocab_size"], (1, L))
        ours(ids, logits_to_keep=1, use_cache=True)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            ours(ids, logits_to_keep=1, use_cache=True)
            torch.cuda.synchronize()
        print(f"\nGPU kernels of one of our forwards at L={L} (torch profiler; CuPy's kernels included):")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
        import cProfile
        import pstats
        py = cProfile.Profile()
        py.enable()
        for _ in range(5):
            ours(ids, logits_to_keep=1, use_cache=True)
        torch.cuda.synchronize()
        py.disable()
        print(f"Python time of 5 of our forwards at L={L} (cProfile, by own time):")
        pstats.Stats(py).sort_stats("tottime").print_stats(14)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--prefill-lens", default="512,2048")
    ap.add_argument("--prefill-reps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of interleaved prefill timings (median of medians)")
    ap.add_argument("--profile-lens", default="", help="profile one of our forwards at these lengths")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--skip-kernel", action="store_true")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dims", default="64,80,128,160")
    ap.add_argument("--lens", default="1024,4096")
    ap.add_argument("--variants", default="all", help="'all' (candidates of each head dim) or 'default'")
    ap.add_argument("--variant-dims", default="", help="with --variants all: only these head dims (default: all)")
    ap.add_argument("--hopper-variants", default="", help="only these wgmma variants (default: every candidate)")
    ap.add_argument("--host-costs", action="store_true", help="host us per call of each per-layer operation")
    ap.add_argument("--samples", type=int, default=15)
    ap.add_argument("--sets", type=int, default=3, help="rotating input sets")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the matmul ceiling measurement")
    ap.add_argument("--probe", metavar="VARIANT:D", help="only launch this kernel variant twice at --batch, "
                    "--heads, the last of --lens (bf16, causal) and exit: a target for ncu (profile the "
                    "second launch: ncu -k regex:flash --launch-skip 1 --launch-count 1 ...)")
    args = ap.parse_args(argv)
    if args.probe:
        var, D = args.probe.split(":")
        L = int(args.lens.split(",")[-1])
        rs = cupy.random.RandomState(0)
        q, k, v = (rs.standard_normal((args.batch, args.heads, L, int(D)), dtype=cupy.float32).astype(BF16)
                   for _ in range(3))
        out = cupy.empty_like(q)
        for _ in range(2):
            fp.flash_attention_prefill_variant(var, q, k, v, out=out)
        cupy.cuda.runtime.deviceSynchronize()
        print(f"{var} D={D} L={L}: launched twice")
        return

    dev = torch.cuda.get_device_properties(0)
    print(f"device: {torch.cuda.get_device_name(0)}  ({dev.multi_processor_count} SMs)  "
          f"torch {torch.__version__}  cupy {cupy.__version__}", flush=True)
    if not args.no_ceiling:
        print(f"bf16 matmul ceiling (torch, 8192^3): {matmul_ceiling_tflops(args.samples):.0f} TFLOP/s",
              flush=True)

    a = cupy.ones((4, 8), dtype=BF16)
    probe = {"a + a": a + a, "a * a": a * a, "-a": -a, "a * 2.0": a * 2.0, "1.0 + a": 1.0 + a,
             "exp(a)": cupy.exp(a), "concat": cupy.concatenate([a, a], axis=-1), "a @ a.T": a @ a.T}
    print("CuPy bfloat16 result dtypes: " + ", ".join(f"{k} -> {v.dtype}" for k, v in probe.items()), flush=True)
    costs = host_costs() if args.host_costs else {}
    prefill_rows = [] if args.skip_prefill else prefill_bench(args)
    torch.cuda.empty_cache()
    cupy.get_default_memory_pool().free_all_blocks()

    B, H = args.batch, args.heads
    rows, sdpa_rows = [], []
    for D in ([] if args.skip_kernel else [int(x) for x in args.dims.split(",")]):
        all_dims = [int(x) for x in args.variant_dims.split(",") if x] if args.variant_dims else None
        every = args.variants == "all" and (all_dims is None or D in all_dims)
        # the mma.sync kernel's variants and, on a GPU that runs it, the wgmma (Hopper) kernel's
        hopper = fp.flash_hopper.CANDIDATES[D] if fp.flash_hopper.usable() else ()
        if args.hopper_variants:
            hopper = tuple(v for v in hopper if v in args.hopper_variants.split(","))
        variants = (fp.CANDIDATES[D] if every else (fp.DEFAULT_VARIANT[D],)) + hopper
        for L in [int(x) for x in args.lens.split(",")]:
            flops = 4 * B * H * L * L * D / 2
            g = torch.Generator(device="cuda").manual_seed(L + D)
            sets = [
                tuple(torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
                      for _ in range(3))
                for _ in range(args.sets)
            ]
            csets = [tuple(to_cupy(t) for t in s) for s in sets]
            sdpa_out = F.scaled_dot_product_attention(*sets[0], is_causal=True).float()
            sdpa_ms = time_ms(lambda i: F.scaled_dot_product_attention(*sets[i], is_causal=True),
                              args.sets, args.samples)
            backend = sdpa_backend(sets[0])
            by_backend = {}
            for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
                by_backend[name] = sdpa_ms_with(name, sets, args)
            print(f"D={D:4d} L={L:5d}: SDPA runs {backend}; by backend: "
                  + ", ".join(f"{k} {flops / v / 1e9:.0f} TFLOP/s" if v == v else f"{k} n/a"
                              for k, v in by_backend.items()), flush=True)
            sdpa_rows.append((D, L, backend, sdpa_ms, by_backend, flops))
            for var in variants:
                out = cupy.empty((B, H, L, D), dtype=BF16)
                fp.flash_attention_prefill_variant(var, *csets[0], out=out)
                got = to_torch(out).float()
                rel = ((got - sdpa_out).norm() / sdpa_out.norm()).item()
                if not (rel <= 2e-2):
                    print(f"D={D} L={L} {var}: MISMATCH vs SDPA, rel err {rel:.3e}: not timed", flush=True)
                    rows.append((D, L, var, rel, float("nan"), sdpa_ms, flops))
                    continue
                ms = time_ms(lambda i: fp.flash_attention_prefill_variant(var, *csets[i], out=out),
                             args.sets, args.samples)
                rows.append((D, L, var, rel, ms, sdpa_ms, flops))
                print(f"D={D:4d} L={L:5d} {var}: {ms:8.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s | "
                      f"SDPA {sdpa_ms:8.3f} ms {flops / sdpa_ms / 1e9:6.0f} TFLOP/s | rel err {rel:.1e}",
                      flush=True)
            sets = csets = None                              # free this length's inputs
            torch.cuda.empty_cache()
            cupy.get_default_memory_pool().free_all_blocks()

    print(f"\nB={B} H={H} bf16 causal, {torch.cuda.get_device_name(0)}; all variants:")
    print(f"{'D':>4} {'L':>5} {'var':>4} {'kernel ms':>10} {'kernel TF/s':>11} {'SDPA TF/s':>9} {'ratio':>6} {'rel err':>8}")
    for D, L, var, rel, ms, sdpa_ms, flops in rows:
        print(f"{D:4d} {L:5d} {var:>4} {ms:10.3f} {flops / ms / 1e9:11.0f} {flops / sdpa_ms / 1e9:9.0f} "
              f"{sdpa_ms / ms:6.2f} {rel:8.1e}")
    print(f"\nbest variant per (head_dim, L) (default now: {fp.DEFAULT_VARIANT}):")
    print(f"{'head_dim':>8} {'L':>5} {'var':>4} {'kernel ms':>10} {'kernel TFLOP/s':>14} {'SDPA TFLOP/s':>12} {'ratio':>6}")
    for D, L in dict.fromkeys((r[0], r[1]) for r in rows):
        timed = [r for r in rows if r[0] == D and r[1] == L and r[4] == r[4]]
        if not timed:
            print(f"{D:8d} {L:5d}  none passed the check")
            continue
        _, _, var, _, ms, sdpa_ms, flops = min(timed, key=lambda r: r[4])
        print(f"{D:8d} {L:5d} {var:>4} {ms:10.3f} {flops / ms / 1e9:14.0f} {flops / sdpa_ms / 1e9:12.0f} "
              f"{sdpa_ms / ms:6.2f}")

    if sdpa_rows:
        print(f"\ntorch SDPA by backend (TFLOP/s), and the default kernel, {torch.cuda.get_device_name(0)}:")
        print(f"{'D':>4} {'L':>5} {'default':>8} {'FLASH':>6} {'CUDNN':>6} {'EFFIC':>6}  default's kernels")
        for D, L, backend, sdpa_ms, by, flops in sdpa_rows:
            tf = [flops / by[k] / 1e9 if by[k] == by[k] else float("nan")
                  for k in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")]
            print(f"{D:4d} {L:5d} {flops / sdpa_ms / 1e9:8.0f} {tf[0]:6.0f} {tf[1]:6.0f} {tf[2]:6.0f}  {backend[:90]}")
        print("\nkernel against SDPA's FLASH_ATTENTION backend (FlashAttention-2 in torch) and the default:")
        print(f"{'head_dim':>8} {'L':>5} {'var':>4} {'kernel TFLOP/s':>14} {'vs default':>10} {'vs FA2':>7}")
        for D, L, _, sdpa_ms, by, flops in sdpa_rows:
            timed = [r for r in rows if r[0] == D and r[1] == L and r[4] == r[4]]
            if timed:
                _, _, var, _, ms, _, _ = min(timed, key=lambda r: r[4])
                print(f"{D:8d} {L:5d} {var:>4} {flops / ms / 1e9:14.0f} {sdpa_ms / ms:10.2f} "
                      f"{by['FLASH_ATTENTION'] / ms:7.2f}")
    if sdpa_rows:
        print(f"\nthe two kernels (fastest variant of each) against SDPA's default and its FA2 backend, TFLOP/s, "
              f"{torch.cuda.get_device_name(0)} (default now: {fp.DEFAULT_VARIANT}, wgmma: {fp.flash_hopper.HOPPER_DEFAULT}):")
        print(f"{'head_dim':>8} {'L':>5} {'mma.sync':>13} {'wgmma':>13} {'SDPA':>6} {'FA2':>6} "
              f"{'mma/SDPA':>8} {'wgmma/SDPA':>10} {'wgmma/FA2':>9} {'wgmma/mma':>9}")
        for D, L, _, sdpa_ms, by, flops in sdpa_rows:
            best = {}
            for family, names in (("mma", fp.VARIANTS), ("wgmma", fp.flash_hopper.VARIANTS)):
                timed = [r for r in rows if r[0] == D and r[1] == L and r[4] == r[4] and r[2] in names]
                best[family] = min(timed, key=lambda r: r[4]) if timed else None
            cell = {k: (f"{r[2]} {flops / r[4] / 1e9:5.0f}" if r else "-") for k, r in best.items()}
            ratio = {k: (sdpa_ms / r[4] if r else float("nan")) for k, r in best.items()}
            fa2 = by["FLASH_ATTENTION"] / best["wgmma"][4] if best["wgmma"] else float("nan")
            vs_mma = best["mma"][4] / best["wgmma"][4] if best["mma"] and best["wgmma"] else float("nan")
            print(f"{D:8d} {L:5d} {cell['mma']:>13} {cell['wgmma']:>13} {flops / sdpa_ms / 1e9:6.0f} "
                  f"{flops / by['FLASH_ATTENTION'] / 1e9:6.0f} {ratio['mma']:8.2f} {ratio['wgmma']:10.2f} "
                  f"{fa2:9.2f} {vs_mma:9.2f}")
    if costs:
        print(f"\nhost us per call (tiny bf16 shapes, 300 calls each, {torch.cuda.get_device_name(0)}):")
        print(f"  {'issue':>7} {'+ wait':>7} {'1 call':>7}  (us: host issuing 300 calls / until they finished / "
              "one call between events)")
        for name, (issue, total, one) in costs.items():
            print(f"  {issue:7.1f} {total:7.1f} {one:7.1f}  {name}")
    if prefill_rows:
        print(f"\ntime to first token, stablelm-3b-4e1t shapes, bf16, batch 1, {torch.cuda.get_device_name(0)}:")
        print("(the model's forward with logits_to_keep=1 and a KV cache, what generate's prefill runs; "
              "median wall ms)")
        print(f"{'L':>5} {'ours ms':>8} {'ours tok/s':>10} {'transformers SDPA ms':>20} {'tok/s':>8} {'ratio':>6} "
              f"{'ours without the host cuts ms':>29} {'ratio':>6}")
        for L, our_ms, hf_ms, extra in prefill_rows:
            before = extra["without cuBLAS linear, rotary q+k, add+LN (paired)"]
            print(f"{L:5d} {our_ms:8.2f} {L / our_ms * 1e3:10.0f} {hf_ms:20.2f} {L / hf_ms * 1e3:8.0f} "
                  f"{hf_ms / our_ms:6.2f} {before:29.2f} {hf_ms / before:6.2f}")
        print("ours with seams forced to their references (ms), and our host time per forward:")
        for L, our_ms, hf_ms, extra in prefill_rows:
            print(f"{L:5d} " + ", ".join(f"{k} {v:.2f}" for k, v in extra.items()))


if __name__ == "__main__":
    main()
