"""fast_cpu.py at a git revision against the working tree's, in one process, steps interleaved.

    python tools/ab_fast_cpu.py                       # HEAD's fast_cpu.py against the working tree's, small
    python tools/ab_fast_cpu.py --rev main --shape slice --threads 1
    python tools/ab_fast_cpu.py --rev main --tied     # tie_word_embeddings (the shapes are untied otherwise)

On a shared machine wall times move by 10-50% from minute to minute (other processes, and a VM's memory
bandwidth), so two benchmark runs made a minute apart compare the minutes, not the code. Here both
versions of FastCpuModel wrap the same random float32 model (tools/bench_cpu.py's shapes) in one
process; each round prefills both with the same 128 tokens (the two prefills timed back to back, in
alternating order) and then runs their decode steps alternately, one step each, so that a slow moment
costs both sides alike. A round starts only once the other processes use less than --max-busy of the
machine (read from /proc/stat over 0.3 s; at most --wait seconds). Prints per-round medians and, at the
end, the median step and prefill of each side and their ratio (> 1: the working tree is faster).

Resolution (docs/cpu_notes.md): with the same code on both sides (--rev HEAD, nothing changed) a quiet
run read decode 0.989x (the model built first, the revision's, ran 1% faster) and prefill 1.123x: a
decode difference under ~2% and a prefill difference under ~15% (6 rounds) are not shown by one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from bench_cpu import COMMON, SHAPES, wait_quiet  # noqa: E402
from stablelm_ref import StableLmConfig, StableLmForCausalLM, fast_cpu, fast_forms  # noqa: E402
from stablelm_ref.kv_cache import KVCache  # noqa: E402

PROMPT = 128


def module_at(rev):
    """stablelm_ref/fast_cpu.py as of git revision `rev`, imported as a module beside the current one."""
    source = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:stablelm_ref/fast_cpu.py"], capture_output=True,
                            text=True, check=True).stdout
    register = fast_forms.register
    fast_forms.register = lambda *args, **kwargs: None                     # leave "cpu" to the working tree's
    try:
        with tempfile.TemporaryDirectory(prefix="ab-fast-cpu-") as folder:  # removed once the module is loaded
            path = os.path.join(folder, "fast_cpu_at_rev.py")
            with open(path, "w") as f:
                f.write(source)
            spec = importlib.util.spec_from_file_location("stablelm_ref._fast_cpu_at_rev", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
    finally:
        fast_forms.register = register
    return module


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--rev", default="HEAD", help="git revision of the other fast_cpu.py (default HEAD)")
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--threads", type=int, default=2, help="BLAS threads (threadpoolctl)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=40, help="decode steps per side per round")
    ap.add_argument("--max-busy", type=float, default=0.08, help="start a round below this machine share used")
    ap.add_argument("--wait", type=float, default=60, help="seconds to wait for a quiet moment per round")
    ap.add_argument("--idle", type=float, default=0.3,
                    help="seconds to sleep before each timed prefill, so that OpenBLAS's worker thread, which "
                         "spins ~0.1 s after a threaded call, has gone to sleep (make bench-llama's wait for a quiet "
                         "moment sleeps at least 0.3 s before each side)")
    ap.add_argument("--tied", action="store_true", help="tie_word_embeddings (bench_cpu's shapes are untied)")
    ap.add_argument("--build-first", choices=("rev", "tree"), default="rev",
                    help="whose model is built (and its memory mapped) first: the first ran ~1-4%% faster in "
                         "identical-code runs, so a difference that small needs a run of each order")
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads, user_api="blas")
    config = StableLmConfig.from_dict({**COMMON, **SHAPES[args.shape], "tie_word_embeddings": args.tied})
    other = module_at(args.rev)
    builders = {args.rev: other.FastCpuModel, "working tree": fast_cpu.FastCpuModel}
    order = list(builders) if args.build_first == "rev" else list(builders)[::-1]
    sides = {k: builders[k](StableLmForCausalLM.from_config(config, dtype="float32")) for k in order}
    names = list(builders)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, PROMPT))
    steps = {k: [] for k in names}
    prefills = {k: [] for k in names}
    print(f"{args.shape}, {args.threads} BLAS threads: {args.rev} against the working tree, {args.rounds} rounds "
          f"of a {PROMPT}-token prefill and {args.steps} interleaved decode steps each", flush=True)
    for r in range(args.rounds):
        busy = wait_quiet(args.max_busy, args.wait)
        order = names if r % 2 == 0 else names[::-1]
        caches, toks = {}, {}
        for k in order:
            caches[k] = KVCache(config, 1, PROMPT + args.steps, np.float32, np)
            time.sleep(args.idle)
            t0 = time.perf_counter()
            out = sides[k](ids, past_key_values=caches[k], use_cache=True, logits_to_keep=1)
            prefills[k].append(time.perf_counter() - t0)
            toks[k] = out.logits[:, -1].argmax(-1)[:, None]
        for i in range(args.steps):
            for k in (order if i % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                out = sides[k](toks[k], past_key_values=caches[k], use_cache=True, logits_to_keep=1)
                toks[k] = out.logits[:, -1].argmax(-1)[:, None]
                steps[k].append(time.perf_counter() - t0)
        print(f"  round {r + 1}: " + ", ".join(f"{k} step {statistics.median(steps[k][-args.steps:]) * 1e3:.2f} ms "
                                                f"prefill {prefills[k][-1] * 1e3:.1f} ms" for k in names) +
              f" (machine {busy or 0:.0%} busy before, load {os.getloadavg()[0]:.1f})", flush=True)
    step = {k: statistics.median(v) for k, v in steps.items()}
    pre = {k: statistics.median(v) for k, v in prefills.items()}
    a, b = names
    print(f"decode step: {a} {step[a] * 1e3:.2f} ms, working tree {step[b] * 1e3:.2f} ms: {step[a] / step[b]:.3f}x "
          f"(medians of {len(steps[b])} steps)")
    print(f"prefill:     {a} {pre[a] * 1e3:.1f} ms, working tree {pre[b] * 1e3:.1f} ms: {pre[a] / pre[b]:.3f}x "
          f"(medians of {args.rounds})")


if __name__ == "__main__":
    main()
