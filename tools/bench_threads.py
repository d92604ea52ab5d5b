"""model.fast() on a shared machine: OpenBLAS's thread count, on a quiet machine and beside a busy process.

    python tools/bench_threads.py                          # small shape, 5 rounds
    python tools/bench_threads.py --shape slice --rounds 3

NumPy's OpenBLAS runs one thread per core by default. Its threads meet at a spin barrier inside every
threaded call and its worker spins ~0.1 s after each one, so when another process holds one of the cores a
threaded call waits for the scheduler to give the worker a turn: on this project's 2-core machine a small
decode step went from 13-17 ms to ~200 ms (docs/cpu_notes.md). A library cannot fix this for its user (the
thread count is the process's, read by OpenBLAS when it loads); the user can, with OPENBLAS_NUM_THREADS=1.
This tool measures what each setting costs and saves, for the README's advice.

Each round runs, for each setting (OPENBLAS_NUM_THREADS unset, i.e. OpenBLAS's default, and 1), a fresh
child process that builds tools/bench_cpu.py's random float32 model, makes one warm-up prefill, then times
--prefills prefills of 128 tokens (each after 0.5 s idle; make bench-llama's wait for a quiet moment idles
>= 0.3 s) and --steps decode steps (logits_to_keep=1, as generate): once on a quiet moment (the other
processes under --max-busy of the machine, waited for up to --wait s) and once beside a busy loop this tool starts (one Python process
spinning, a stand-in for another program on one core: a compile, a test suite), stopped after the child.
The settings alternate in order from round to round. Prints each child's medians, with the share of the
machine the other processes used before and while it ran, and at the end the medians over the children that
the other processes left alone (under --max-busy while they ran): prefill and decode tokens per second per
setting and condition.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from bench_cpu import machine_ticks, wait_quiet  # noqa: E402

PROMPT = 128
CHILD = r"""
import json, statistics, sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {tools!r})
import numpy as np
from bench_cpu import COMMON, SHAPES
from stablelm_ref import StableLmConfig, StableLmForCausalLM
from stablelm_ref.kv_cache import KVCache
config = StableLmConfig.from_dict({{**COMMON, **SHAPES[{shape!r}]}})
fast = StableLmForCausalLM.from_config(config, dtype="float32").fast()
ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, {prompt}))
def prefill():
    cache = KVCache(config, 1, {prompt} + {steps}, np.float32, np)
    time.sleep(0.5)
    t0 = time.perf_counter()
    out = fast(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0, cache, out.logits[:, -1].argmax(-1)[:, None]
prefill()                                                  # warm-up: work buffers, rotary table
ready_cpu = time.process_time()
print("ready", flush=True); sys.stdin.readline()           # the parent starts its busy loop (or not) here
pre = []
for _ in range({prefills}):
    seconds, cache, tok = prefill()
    pre.append(seconds)
steps = []
for _ in range({steps}):
    t0 = time.perf_counter()
    tok = fast(tok, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)[:, None]
    steps.append(time.perf_counter() - t0)
print(json.dumps(dict(prefill=statistics.median(pre), step=statistics.median(steps), ready_cpu=ready_cpu)), flush=True)
"""
SETTINGS = {"default (unset)": None, "OPENBLAS_NUM_THREADS=1": "1"}


def cpu_seconds():
    """(machine CPU seconds not idle, all machine CPU seconds, CPU seconds of this process's waited-for children)."""
    try:
        busy, total = machine_ticks()
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy / hz, total / hz, children.ru_utime + children.ru_stime


def run_child(args, threads, busy):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
    if threads is not None:
        env["OPENBLAS_NUM_THREADS"] = threads
    code = CHILD.format(root=ROOT, tools=os.path.join(ROOT, "tools"), shape=args.shape, prompt=PROMPT,
                        steps=args.steps, prefills=args.prefills)
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    hog = None
    try:
        if child.stdout.readline().strip() != "ready":
            raise SystemExit(f"the child process failed (exit {child.wait()})")
        before = wait_quiet(args.max_busy, args.wait)
        start = cpu_seconds()
        if busy:
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.2)
        child.stdin.write("go\n")
        child.stdin.flush()
        line = child.stdout.readline()
        if child.wait() != 0 or not line:
            raise SystemExit(f"the child process failed (exit {child.returncode})")
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        if child.poll() is None:
            child.kill()
            child.wait()
    end = cpu_seconds()
    res = json.loads(line)
    during = None                       # the other processes' share of the machine from "go" to the child's exit:
    if start and end:                   # all CPU not idle, less the child's (after its warm-up) and the busy loop's
        busy_s, all_s, ours = (e - s for e, s in zip(end, start))
        during = max(0.0, busy_s - (ours - res["ready_cpu"])) / max(all_s, 1e-9)
    return res, before, during


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--shape", default="small", choices=("small", "slice", "full"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prefills", type=int, default=3, help="timed prefills per child (median)")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per child (median)")
    ap.add_argument("--max-busy", type=float, default=0.10, help="start a child below this machine share used")
    ap.add_argument("--wait", type=float, default=30, help="seconds to wait for a quiet moment per child")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))          # so that the busy loop and child are stopped
    print(f"{args.shape}: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; per child {args.prefills} prefills "
          f"of {PROMPT} tokens and {args.steps} decode steps", flush=True)
    results = {(s, busy): [] for s in SETTINGS for busy in (False, True)}    # (prefill, decode tok/s, others)
    names = list(SETTINGS)
    for r in range(args.rounds):
        for busy in (False, True):
            for name in (names if r % 2 == 0 else names[::-1]):
                res, before, during = run_child(args, SETTINGS[name], busy)
                results[name, busy].append((PROMPT / res["prefill"], 1 / res["step"], during))
                print(f"  round {r + 1}, {'beside a busy loop' if busy else 'quiet':18s} {name:22s} prefill "
                      f"{PROMPT / res['prefill']:8.1f} tok/s, decode {1 / res['step']:6.2f} tok/s (others' CPU "
                      f"{'-' if before is None else f'{before:.0%}'} before, {'-' if during is None else f'{during:.0%}'} "
                      f"during; load {os.getloadavg()[0]:.1f})",
                      flush=True)
    # a child that other processes met (more than --max-busy of the machine while it ran) is left out of the
    # medians; how many were kept is printed with them
    print(f"\n| {args.shape}: medians over the children the other processes left alone | prefill tok/s (128 tokens) "
          f"| decode tok/s | children |")
    print("|---|---:|---:|---:|")
    for busy in (False, True):
        for name in names:
            runs = results[name, busy]
            kept = [r for r in runs if r[2] is None or r[2] <= args.max_busy]
            med = (lambda i: f"{statistics.median(r[i] for r in kept):.2f}") if kept else (lambda i: "-")
            print(f"| {name}, {'beside a busy loop' if busy else 'quiet'} | {med(0)} | {med(1)} | "
                  f"{len(kept)} of {len(runs)} |")


if __name__ == "__main__":
    main()
