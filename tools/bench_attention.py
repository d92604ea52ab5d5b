"""Prefill on the GPU against transformers (SDPA), and the fused attention kernel against torch SDPA.

    python tools/bench_attention.py [--prefill-lens 512,2048] [--skip-prefill] [--skip-kernel]
                                    [--batch 4] [--heads 32] [--dims 64,80,128,160] [--lens 1024,4096]
                                    [--variants all|default] [--samples 15]

Part 1, time to first token (`make bench-gpu`): stablelm-3b-4e1t shapes (32 layers, hidden 2560,
32 heads of 80, intermediate 6912, vocab 50304), random bf16 weights shared by both sides (our
params are zero-copy CuPy views of the transformers model's tensors), batch 1, prompt lengths
--prefill-lens. Timed: the model's forward with logits_to_keep=1 and a KV cache (what generate's
prefill runs: ours model(ids, logits_to_keep=1, use_cache=True), transformers' the same call under
torch.no_grad, attn_implementation="sdpa"), wall clock with the device synchronised before and
after, median of --prefill-reps after two warm-ups; also ours with each seam forced to its
array-API reference (kernels.reference_only), to show what each kernel buys, and a torch-profiler
table of the GPU kernels of one of our forwards. Accuracy at the first length: the last position's
logits of both bf16 runs against our float32 forward of the same weights.

For each (head_dim, L): checks every kernel variant against SDPA on the same inputs
(||kernel - sdpa|| / ||sdpa||, must be <= 2e-2: both are bf16 outputs ~3e-3 from the exact result),
then times it and SDPA with CUDA events: warm-up, then the median of `--samples` samples, each
sample a run of back-to-back calls over rotating input sets (so no sample re-reads a cached input
and the Python launch cost hides behind the GPU work). Causal FLOPs are counted as
4 * B * H * L^2 * D / 2 (two matmuls of 2 FLOPs per multiply-add, half the score matrix).
Also measures the bf16 matmul ceiling (torch.matmul, 8192^3) once, for the notes.
cupy <-> torch through DLPack. Prints one table last.
"""

from __future__ import annotations

import argparse
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


SHAPES_3B = dict(vocab_size=50304, hidden_size=2560, intermediate_size=6912, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, layer_norm_eps=1e-5, use_qkv_bias=False,
                 qk_layernorm=False, use_parallel_residual=False, tie_word_embeddings=False, hidden_act="silu",
                 max_position_embeddings=4096, rope_theta=10000.0, partial_rotary_factor=0.25)


def wall_ms(fn, reps: int) -> float:
    """Median wall time of fn() in ms, the device synchronised before and after each call."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def prefill_bench(args):
    """Time to first token at 3b-4e1t shapes, ours vs transformers SDPA; returns the table rows."""
    import transformers

    from stablelm_ref import StableLmConfig, StableLmForCausalLM, kernels

    t_build = time.time()
    cfg = transformers.StableLmConfig(**SHAPES_3B)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            hf = transformers.StableLmForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    hf = hf.to(torch.bfloat16).eval()
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
                with kernels.reference_only(*off) if off else _nothing():
                    return ours(ids, logits_to_keep=1, use_cache=True).logits
            return run

        hf_ms = wall_ms(theirs, args.prefill_reps)
        our_ms = wall_ms(mine(), args.prefill_reps)
        print(f"L={L:5d}: ours {our_ms:7.2f} ms, transformers SDPA {hf_ms:7.2f} ms", flush=True)
        variants = {"no flash attention": ("attention",),
                    "no fused LN/rotary/SwiGLU": ("layer_norm", "rotary", "gated_activation"),
                    "all reference": ("*",)}
        extra = {}
        for name, off in variants.items():
            try:
                extra[name] = wall_ms(mine(off), max(3, args.prefill_reps // 3))
            except Exception as e:  # noqa: BLE001  (a comparison column, not the measurement)
                print(f"  {name}: failed ({type(e).__name__}: {e})", flush=True)
                extra[name] = float("nan")
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


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--prefill-lens", default="512,2048")
    ap.add_argument("--prefill-reps", type=int, default=15)
    ap.add_argument("--profile-lens", default="", help="profile one of our forwards at these lengths")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--skip-kernel", action="store_true")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dims", default="64,80,128,160")
    ap.add_argument("--lens", default="1024,4096")
    ap.add_argument("--variants", default="all", help="'all' (candidates of each head dim) or 'default'")
    ap.add_argument("--samples", type=int, default=15)
    ap.add_argument("--sets", type=int, default=3, help="rotating input sets")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the matmul ceiling measurement")
    args = ap.parse_args(argv)

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
    prefill_rows = [] if args.skip_prefill else prefill_bench(args)
    torch.cuda.empty_cache()
    cupy.get_default_memory_pool().free_all_blocks()

    B, H = args.batch, args.heads
    rows = []
    for D in ([] if args.skip_kernel else [int(x) for x in args.dims.split(",")]):
        variants = fp.CANDIDATES[D] if args.variants == "all" else (fp.DEFAULT_VARIANT[D],)
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

    if prefill_rows:
        print(f"\ntime to first token, stablelm-3b-4e1t shapes, bf16, batch 1, {torch.cuda.get_device_name(0)}:")
        print("(the model's forward with logits_to_keep=1 and a KV cache, what generate's prefill runs; "
              "median wall ms)")
        print(f"{'L':>5} {'ours ms':>8} {'ours tok/s':>10} {'transformers SDPA ms':>20} {'tok/s':>8} {'ratio':>6}")
        for L, our_ms, hf_ms, _ in prefill_rows:
            print(f"{L:5d} {our_ms:8.2f} {L / our_ms * 1e3:10.0f} {hf_ms:20.2f} {L / hf_ms * 1e3:8.0f} "
                  f"{hf_ms / our_ms:6.2f}")


if __name__ == "__main__":
    main()
