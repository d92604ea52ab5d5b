"""Where the whole-step decode kernel's time goes (decode_step.cu, batch 1): per-phase times and the ring's waits.

    python tools/step_timeline.py                     # stablelm-3b-4e1t shapes, bf16 random weights, 128 cached keys
    python tools/step_timeline.py --shapes 2-1.6b --ab   # only ms a step: per-layer (untuned), each ring shape

decode_step.cu's translation unit is built again with step_timeline.cuh (beside this file) put before it: its
MK_MARK / MK_T0 / MK_ADD / MK_ZERO / MK_FLUSH take the place of decode_step.cu's hooks (empty unless defined
before them: the shipped decode_step.cu has none of the probe's code). With them thread 0 of each block (lane
0 of warp 0) records %globaltimer at each phase's end and after each grid barrier (MARKS a layer), and sums,
over the step (in shared memory, flushed at the end), the time its warp waits for a full slot of its ring, the
time it spends inside tiles (from that wait's return to the end of the tile's refill and epilogue; of it,
issuing the refill's copies: lane 0's bulk copies, or its own cp.async in a cp.async ring shape) and the time it
spends inside grid barriers.
Printed: each ring shape's step time and those sums (median over blocks), then the per-layer phases (median
over blocks, mean over layers 1 .. L-2) of the default shape. The probe build's step is a few percent slower
than the shipped one (both printed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_probe import probe_source  # noqa: E402

MARKS = ("LN1", "q|k|v", "barrier", "attention", "barrier", "o_proj", "barrier", "LN2", "gate|up", "barrier",
         "down", "barrier")          # decode_step.cu's MK_MARK(1 + 12 l + i): the end of each of these
TIMELINE_CUH = Path(__file__).with_name("step_timeline.cuh")
HOOK = "#if !defined(MK_MARK)"       # decode_step.cu keeps probe macros defined before it
TL_BLOCKS, TL_N, TL_SUMS = 160, 1024, 1000      # step_timeline.cuh's MK_TL_BLOCKS, MK_TL_N, MK_TL_SUMS


def timeline_source(step_src):
    """The timeline build's source: step_timeline.cuh, then decode_step.cu's translation unit (step_src,
    launch.step_source()); refused without the hook line (decode_probe.probe_source)."""
    return probe_source(TIMELINE_CUH, step_src, HOOK, "decode_step.cu", "MK_MARK / MK_T0 / MK_ADD / MK_ZERO / MK_FLUSH")


def phase_table(marks, layers, parallel):
    """Per-layer phase durations (us) from the marks [blocks, >= 2 + 12 layers] (ns; mark 0 = the block's start,
    1 + 12 l + i = the end of MARKS[i] of layer l, 1 + 12 layers = lm_head done): {phase name: mean over
    layers 1 .. L-2 of the median over blocks}, the layer's total, and lm_head's phase. With a parallel
    residual there is no barrier after o_proj (mark 6 unset): LN2's segment starts at o_proj's end."""
    rel = (np.asarray(marks, np.float64) - np.min(marks[:, 0])) / 1e3
    segs = {}
    for l in range(1, layers - 1):
        b = 1 + 12 * l
        for i, name in enumerate(MARKS):
            if parallel and i == 6:
                continue
            start = b - 1 if i == 0 else (b + 5 if parallel and i == 7 else b + i - 1)
            segs.setdefault((i, name), []).append(np.median(rel[:, b + i] - rel[:, start]))
    table = {f"{name} ({i})": float(np.mean(v)) for (i, name), v in segs.items()}
    layer = float(np.median(rel[:, 1 + 12 * (layers - 1)] - rel[:, 13]) / max(1, layers - 2))
    lm_head = float(np.median(rel[:, 1 + 12 * layers] - rel[:, 12 * layers]))
    return table, layer, lm_head


def main():
    import cupy as cp

    from bench_gpu import FAMILY, engine_config, random_params
    from stablelm_ref.cuda import decode_engine as de, decode_kernels as kn
    from stablelm_ref.cuda.cubin import compile_cached
    from stablelm_ref.cuda.launch import step_source

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="3b-4e1t", choices=list(FAMILY))
    ap.add_argument("--prompt", type=int, default=128, help="cached keys")
    ap.add_argument("--ab", action="store_true", help="only the step times, shipped build, two alternating rounds")
    args = ap.parse_args()
    cfg = engine_config(shapes=FAMILY[args.shapes])
    k = kn.DecodeKernels()
    e = de.GpuDecodeEngine(cfg, random_params(cfg), max_batch=1, max_len=args.prompt + 64, kernels=k, autotune=False)
    problem = e.step_kernel_problem()
    if problem:
        sys.exit(f"the whole-step kernel cannot run here: {problem}")
    e.prefill(np.random.default_rng(0).integers(2, cfg.vocab_size, (1, args.prompt)), logits=None)

    def step_ms(mk, shape=kn.STEP_SHAPES[0]):
        e.megakernel, e.step_shape = mk, shape
        e.reset_plans()
        return e.time_step(1)

    for _ in range(2 if args.ab else 1):
        print(f"{args.shapes} ms a step: per-layer (untuned) {step_ms(False):.4f}; "
              + "; ".join(f"{sh} {step_ms(True, sh):.4f}" for sh in kn.STEP_SHAPES), flush=True)
    if args.ab:
        return
    path = compile_cached(timeline_source(step_source()), "decode_step_tl", str(k.compute_capability),
                          nvcc_flags=("-O3",))
    mod = cp.RawModule(path=str(path))
    k._step_fn = {d: mod.get_function(f"decode_step_b1_d{d}") for d in kn.ATT_DIMS}
    for key in [key for key in k._att_smem if isinstance(key, tuple)]:      # new functions: set their smem again
        del k._att_smem[key]
    buf = cp.ndarray((TL_BLOCKS, TL_N), cp.uint64, mod.get_global("mk_tl"))
    G, L, reps = k.num_sms, len(e.layers), 10
    for shape in kn.STEP_SHAPES:
        buf[...] = 0
        e.megakernel, e.step_shape = True, shape
        e.reset_plans()
        ms = e.time_step(1, replays=reps, reps=1)            # one warm-up replay + reps timed: reps + 1 in sums
        sums = buf[:G, TL_SUMS:TL_SUMS + 4].get() / 1e6 / (reps + 1)
        print(f"probe build, ring {shape}: {ms:.4f} ms a step; median over blocks, ms a step, warp 0: "
              f"waiting for a full slot {np.median(sums[:, 0]):.3f}, inside tiles {np.median(sums[:, 1]):.3f} "
              f"(of which issuing copies {np.median(sums[:, 3]):.3f}), inside grid barriers "
              f"{np.median(sums[:, 2]):.3f}", flush=True)
    buf[...] = 0
    e.megakernel, e.step_shape = True, kn.STEP_SHAPES[0]
    e.reset_plans()
    e.prefill(np.random.default_rng(0).integers(2, cfg.vocab_size, (1, args.prompt)), logits=None)
    e.decode_step()
    e.synchronize()
    marks = buf[:G].get().astype(np.int64)
    table, layer, lm_head = phase_table(marks[:, :2 + 12 * L], L, e.parallel)
    print(f"ring {kn.STEP_SHAPES[0]}, per layer (us, median over blocks, mean over layers 1..{L - 2}):")
    print("  " + "  ".join(f"{name} {v:.2f}" for name, v in table.items()))
    print(f"  a layer {layer:.2f} us; lm_head {lm_head:.2f} us")


if __name__ == "__main__":
    main()
