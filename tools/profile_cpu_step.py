"""Where a CPU decode step's (or prefill's) time goes: every NumPy call of fast_cpu.py, timed by source line.

    python tools/profile_cpu_step.py --shape small        # 8 layers, hidden 512, vocab 50304
    python tools/profile_cpu_step.py --shape slice        # stablelm-2-1_6b width, 4 layers, qkv bias

A random float32 model (no checkpoint, no transformers) is prefilled with a 128-token prompt, then
decodes one token at a time through the KV cache with logits_to_keep=1, as generate does. For the
profiled steps the module-level `np` of fast_cpu.py is replaced by a proxy that times each call
(perf_counter around it) and files it under the line that made it; `model._prepare_inputs` and the
helpers fast_cpu imports from the concept files are timed the same way. Lines are grouped into:

- GEMV: np.matmul/@ against a weight matrix (qkv, o, gate_up, down, lm_head), the memory-bound part;
- the rest: everything else NumPy does (LayerNorm, rotary, attention over the cache, SiLU, adds);
- Python: the step's wall time minus all timed calls (interpreter, attribute lookups, method calls
  on arrays such as .reshape, which the proxy does not see).

The proxy costs about a microsecond per call, so the profiled step is slower than a plain one; both
medians are printed, and the per-line figures are what to compare before and after a change. Each
per-line figure is that line's median over the profiled steps, and the GEMV / rest / Python figures are
medians of each step's sums: one step that met another process's burst (a 2-thread OpenBLAS call can
take 10-50 times longer then) moves a median by one place, where it dominated a mean.

Each prefill follows --idle seconds of sleep (make bench-llama's wait for a quiet moment sleeps at least
0.3 s before each side), so that OpenBLAS's worker thread, which spins ~0.1 s after a threaded call, is
asleep when it starts.

--torch profiles transformers' StableLmForCausalLM instead (same shape, random weights, sdpa attention,
torch's own threads set to --threads), with torch.profiler: the same prefill or decode steps, and per op
(aten::mm, aten::silu, ...) its self time per step and calls per step, beside the step's plain median. This
is the peer the prefill target is measured against (make bench, make bench-llama); its per-op table is what
to set beside this tool's own for the same shape (docs/cpu_notes.md, eighth pass).

--without-gemv skips the GEMVs against the weight matrices (their outputs keep whatever they held, the
logits are zeros): the plain step's time is then what everything else costs, plus the proxy passing each
call through (a Python call, well under a microsecond, in plain steps too). Its figures are compared
with each other (before and after a change), not with a step timed without the proxy.
"""

from __future__ import annotations

import argparse
import collections
import linecache
import os
import re
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from bench_cpu import COMMON, SHAPES, cache_keyword, quiet_peers  # noqa: E402  (the benchmark's shapes, its peers)
from stablelm_ref import StableLmConfig, StableLmForCausalLM, fast_cpu  # noqa: E402
from stablelm_ref.kv_cache import KVCache  # noqa: E402


CLOCK = time.perf_counter


class Timings:
    def __init__(self):
        self.total = collections.defaultdict(float)     # (file, line, name) -> seconds, this step
        self.calls = collections.defaultdict(int)
        self.steps = []                                 # one `total` per profiled step
        self.on = False

    def end_step(self):
        self.steps.append(self.total)
        self.total = collections.defaultdict(float)

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            caller = sys._getframe(1)
            while caller.f_code.co_filename == __file__:        # through TimedUfunc.__call__
                caller = caller.f_back
            t0 = CLOCK()
            try:
                return fn(*args, **kwargs)
            finally:
                key = (caller.f_code.co_filename, caller.f_lineno, name)
                self.total[key] += CLOCK() - t0
                self.calls[key] += 1
        return timed


class TimedUfunc:
    def __init__(self, timings, name, ufunc):
        self._call = timings.wrap(f"np.{name}", ufunc)
        self._methods = {m: timings.wrap(f"np.{name}.{m}", getattr(ufunc, m)) for m in ("reduce", "accumulate", "outer", "at")}
        self._ufunc = ufunc

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return self._methods.get(name) or getattr(self._ufunc, name)


class TimedNumpy:
    """numpy, with every function and ufunc timed (types, dtypes and constants passed through); with
    `skip` (ids of weight matrices), np.matmul against one of them returns at once."""

    def __init__(self, timings, skip=frozenset()):
        self._t, self._cache = timings, {}
        if skip:
            def matmul(a, b, *args, **kwargs):
                if id(b) not in skip:
                    return np.matmul(a, b, *args, **kwargs)
                out = kwargs.get("out")
                return np.zeros(a.shape[:-1] + b.shape[-1:], a.dtype) if out is None else out
            self._cache["matmul"] = timings.wrap("np.matmul", matmul)

    def __getattr__(self, name):
        if name not in self._cache:
            obj = getattr(np, name)
            if isinstance(obj, np.ufunc):                       # np.add(...) and np.add.reduce(...)
                self._cache[name] = TimedUfunc(self._t, name, obj)
            elif callable(obj) and not isinstance(obj, type):
                self._cache[name] = self._t.wrap(f"np.{name}", obj)
            else:
                self._cache[name] = obj
        return self._cache[name]


WEIGHTS = re.compile(r"\b(layer\.(in_t|o_t|gate_up_t|down_t)|lm_head_t)\b")     # fast_cpu's weight matrices


def is_gemv(key, source):
    """A product against a weight matrix (not attention's q k^T or P V, which read the KV cache)."""
    return key[2] == "np.matmul" and WEIGHTS.search(source) is not None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=40, help="decode steps per pass (median over steps)")
    ap.add_argument("--threads", type=int, default=None, help="BLAS threads (threadpoolctl); default: as is")
    ap.add_argument("--prefill", action="store_true", help="profile the 128-token prefill instead of a decode step")
    ap.add_argument("--idle", type=float, default=0.3, help="seconds of sleep before each prefill")
    ap.add_argument("--top", type=int, default=25, help="lines to show")
    ap.add_argument("--without-gemv", action="store_true", help="skip the GEMVs against weights: time the rest")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this thread's CPU time (time.thread_time), which other processes on a busy "
                         "machine do not inflate; meaningful with --threads 1 only")
    ap.add_argument("--torch", action="store_true", help="profile transformers' forward instead (torch.profiler)")
    args = ap.parse_args()
    if args.torch:
        return profile_torch(args)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads, user_api="blas")

    config = StableLmConfig.from_dict({**COMMON, **SHAPES[args.shape]})
    fast = StableLmForCausalLM.from_config(config, dtype="float32").fast()
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, 128))
    cache = KVCache(config, 1, 128 + 3 * args.steps + 8, np.float32, np)
    out = fast(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1)[:, None]

    timings = Timings()
    skip = frozenset()
    if args.without_gemv:                                   # the weights are these arrays and views of them
        skip = frozenset(id(a) for layer in fast.layers for a in vars(layer).values()
                         if isinstance(a, np.ndarray) and a.ndim == 2) | {id(fast.lm_head_t)}
    patched = {"np": TimedNumpy(timings, skip)}
    for name in dir(fast_cpu):                              # helpers imported from the concept files
        obj = getattr(fast_cpu, name)
        if callable(obj) and getattr(obj, "__module__", "").startswith("stablelm_ref.") and \
                obj.__module__ != "stablelm_ref.fast_cpu" and not isinstance(obj, type):
            patched[name] = timings.wrap(name, obj)
    prepare = fast.model._prepare_inputs
    timed_prepare = timings.wrap("model._prepare_inputs", prepare)

    def step(profiled):
        nonlocal tok
        timings.on = profiled
        if args.prefill:                                    # a fresh 128-token prompt into a fresh cache
            fresh = KVCache(config, 1, 128, np.float32, np)
            time.sleep(args.idle)
            t0 = CLOCK()
            fast(ids, past_key_values=fresh, use_cache=True, logits_to_keep=1)
            return CLOCK() - t0
        t0 = CLOCK()
        o = fast(tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = o.logits[:, -1].argmax(-1)[:, None]
        return CLOCK() - t0

    plain, profiled = [], []
    originals = {name: getattr(fast_cpu, name) for name in patched}
    for name, obj in patched.items():
        setattr(fast_cpu, name, obj)
    fast.model._prepare_inputs = timed_prepare
    try:
        for _ in range(3):
            step(False)
        for _ in range(args.steps):                         # interleaved: plain, profiled, plain, ...
            plain.append(step(False))
            profiled.append(step(True))
            timings.end_step()
    finally:
        for name, obj in originals.items():
            setattr(fast_cpu, name, obj)
        del fast.model._prepare_inputs

    # Each line's figure is its median over the profiled steps (one step that met another process's burst
    # would otherwise dominate a mean); the group figures are medians of each step's group sums.
    n = args.steps
    keys = set().union(*timings.steps)
    sources = {key: linecache.getline(key[0], key[1]).strip() for key in keys}
    rows = []
    for key in keys:
        rows.append((statistics.median(s.get(key, 0.0) for s in timings.steps) * 1e6, timings.calls[key] / n, key,
                     sources[key]))
    rows.sort(key=lambda r: -r[0])
    gemv_steps = [sum(v for k, v in s.items() if is_gemv(k, sources[k])) * 1e6 for s in timings.steps]
    timed_steps = [sum(s.values()) * 1e6 for s in timings.steps]
    gemv = statistics.median(gemv_steps)
    rest = statistics.median(t - g for t, g in zip(timed_steps, gemv_steps))
    python = statistics.median(p * 1e6 - t for p, t in zip(profiled, timed_steps))
    step_prof = statistics.median(profiled) * 1e6
    step_plain = statistics.median(plain) * 1e6
    weights = sum(sum(a.nbytes for a in vars(layer).values() if isinstance(a, np.ndarray) and a.ndim == 2 and a.shape[0] > 1)
                  for layer in fast.layers) + fast.model.lm_head_weight.nbytes
    calls = sum(r[1] for r in rows)

    print(f"shape {args.shape}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab "
          f"{config.vocab_size}; weights read per step {weights / 1e6:.0f} MB; load {os.getloadavg()[0]:.1f}")
    what = ("prefill of 128 tokens" if args.prefill else "decode step") + (" WITHOUT the weight GEMVs" if skip else "")
    print(f"{what}, median of {n}: plain {step_plain:.0f} us ({(128 if args.prefill else 1) * 1e6 / step_plain:.1f} tok/s); profiled "
          f"{step_prof:.0f} us, {calls:.0f} timed calls")
    rate = "skipped" if skip else f"{weights / gemv / 1e3:.1f} GB/s"
    print(f"  GEMV        {gemv:8.0f} us  {100 * gemv / step_prof:5.1f}%   ({rate})")
    print(f"  rest NumPy  {rest:8.0f} us  {100 * rest / step_prof:5.1f}%")
    print(f"  Python      {python:8.0f} us  {100 * python / step_prof:5.1f}%")
    print(f"(each figure the median over the {n} profiled steps)\n{'us/step':>9} {'calls':>6}  line  call / source")
    for us, c, key, source in rows[:args.top]:
        where = os.path.basename(key[0])
        print(f"{us:9.1f} {c:6.0f}  {where}:{key[1]:<4d} {key[2]:<22s} {source[:70]}")


def profile_torch(args):
    """transformers' forward at the same shape: plain steps interleaved with profiled ones, as main() does for
    ours; per op its median self time per profiled step."""
    from torch.profiler import ProfilerActivity, profile

    torch, transformers = quiet_peers(args.threads or os.cpu_count())      # its warnings off, `threads` threads
    config = {k: v for k, v in {**COMMON, **SHAPES[args.shape]}.items() if k != "model_type"}
    model = transformers.StableLmForCausalLM(transformers.StableLmConfig(**config, attn_implementation="sdpa")).eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, config["vocab_size"], (1, 128)))
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    key = cache_keyword(model)                                              # `cache` in transformers 5.24
    state = {"cache": out[key], "tok": out.logits[:, -1].argmax(-1, keepdim=True)}

    def step():
        with torch.inference_mode():
            if args.prefill:
                time.sleep(args.idle)
                t0 = time.perf_counter()
                model(input_ids=ids, use_cache=True, logits_to_keep=1)
                return time.perf_counter() - t0
            t0 = time.perf_counter()
            o = model(input_ids=state["tok"], **{key: state["cache"]}, use_cache=True, logits_to_keep=1)
            state["cache"], state["tok"] = o[key], o.logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - t0

    for _ in range(3):
        step()
    plain, per_op, calls = [], collections.defaultdict(list), collections.Counter()
    for _ in range(args.steps):
        plain.append(step())
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        for e in prof.key_averages():
            per_op[e.key].append(e.self_cpu_time_total)                     # us, on the calling thread
            calls[e.key] += e.count
    n = args.steps
    rows = sorted(((statistics.median(v + [0.0] * (n - len(v))), calls[k] / n, k) for k, v in per_op.items()),
                  reverse=True)
    what = "prefill of 128 tokens" if args.prefill else "decode step"
    step_plain = statistics.median(plain) * 1e6
    print(f"transformers {transformers.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"shape {args.shape}; load {os.getloadavg()[0]:.1f}")
    print(f"{what}, median of {n}: plain {step_plain:.0f} us ({(128 if args.prefill else 1) * 1e6 / step_plain:.1f} "
          f"tok/s); per op, median self time over the {n} profiled steps:\n{'us/step':>9} {'calls':>6}  op")
    for us, c, key in rows[:args.top]:
        print(f"{us:9.1f} {c:6.0f}  {key}")


if __name__ == "__main__":
    main()
