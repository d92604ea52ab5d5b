"""Benchmark the fused prefill attention kernel against torch SDPA (causal, bf16) on the GPU.

    python tools/bench_attention.py [--batch 4] [--heads 32] [--dims 64,80,128,160] [--lens 1024,4096]
                                    [--variants all|default] [--samples 15]

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


def main(argv=None):
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
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

    B, H = args.batch, args.heads
    rows = []
    for D in [int(x) for x in args.dims.split(",")]:
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


if __name__ == "__main__":
    main()
