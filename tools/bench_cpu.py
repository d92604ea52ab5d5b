"""CPU speed of stablelm-ref against transformers, side by side, on the same checkpoint.

    make bench                                   # = python tools/bench_cpu.py, OpenBLAS env overrides unset
    python tools/bench_cpu.py --shapes small --quick

For each shape a random float32 checkpoint is written once by transformers' save_pretrained, then
loaded by this project (StableLmForCausalLM.from_pretrained(dir, dtype="float32").fast()) and by
transformers (AutoModelForCausalLM, float32, its default attention implementation, printed). Both run
with the same number of threads (torch.set_num_threads = the BLAS threads of NumPy's OpenBLAS),
runs alternate between the two sides (order swapped every repeat) and the table shows medians.

- prefill: one forward of a 128-token prompt, batch 1, writing the KV cache, logits of the last
  position only (what generate does): tokens/s = 128 / time.
- decode: after the prefill of a 128-token prompt, N greedy steps through a manual loop on both
  sides, each step = one forward of the B newest tokens with the KV cache and logits_to_keep=1, then
  argmax. Each step is timed; decode tokens/s for N = B * N / (sum of the first N step times), so
  N = 32 and N = 256 come from the same 256-step run. This project uses a preallocated KVCache sized
  prompt + N (as its generate does); transformers its default DynamicCache.
- memory: peak resident set (VmHWM) of a fresh subprocess that imports the library, loads the model
  and runs one 16-token forward, against the checkpoint's float32 bytes (transformers memory-maps
  safetensors, so right after loading its weights are not resident yet; both figures are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {
    "small": dict(num_hidden_layers=8, hidden_size=512, intermediate_size=1408, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=50304, use_qkv_bias=False),
    # stablelm-2-1_6b at full width, 4 of its 24 layers
    "slice": dict(num_hidden_layers=4, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=100352, use_qkv_bias=True),
    "full": dict(num_hidden_layers=24, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=100352, use_qkv_bias=True),
}
COMMON = dict(model_type="stablelm", max_position_embeddings=4096, partial_rotary_factor=0.25, rope_theta=10000,
              layer_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False, initializer_range=0.02,
              bos_token_id=0, eos_token_id=0)
PROMPT = 128


def n_params(c):
    h, i, v, l = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i + 4 * h + (h + 2 * kv) * c["use_qkv_bias"]
    return 2 * v * h + l * per_layer + 2 * h


def mem_available():
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


MEMORY_PROBE = r"""
import sys, json, resource
sys.path.insert(0, {root!r})
def status():
    d = {{}}
    for line in open('/proc/self/status'):
        k, _, v = line.partition(':')
        if k in ('VmHWM', 'VmRSS'):
            d[k] = int(v.split()[0]) * 1024
    return d
side, path = sys.argv[1], sys.argv[2]
if side == 'ours':
    from stablelm_ref import StableLmForCausalLM
    base = status()
    model = StableLmForCausalLM.from_pretrained(path, dtype='float32').fast()
    loaded = status()
    model([list(range(16))])
elif side == 'ours-decode':                  # a 128-token prefill into a cache, then 8 decode steps
    import numpy as np
    from stablelm_ref import KVCache, StableLmForCausalLM
    base = status()
    model = StableLmForCausalLM.from_pretrained(path, dtype='float32').fast()
    loaded = status()
    cache = KVCache(model.config, 1, 136, np.float32, np)
    out = model([list(range(128))], past_key_values=cache, use_cache=True, logits_to_keep=1)
    for _ in range(8):
        out = model(out.logits[:, -1].argmax(-1)[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
else:
    import torch, transformers
    base = status()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    loaded = status()
    with torch.inference_mode():
        model(torch.arange(16)[None])
after = status()
print(json.dumps(dict(base=base['VmRSS'], load=loaded['VmHWM'], peak=after['VmHWM'], rss=after['VmRSS'],
                      ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def memory_probe(side, path):
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE.format(root=ROOT), side, path], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"the memory probe ({side}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the two sides -----------------------------------------------------------------------------

class Ours:
    name = "stablelm-ref"

    def __init__(self, path):
        from stablelm_ref import StableLmForCausalLM

        self.model = StableLmForCausalLM.from_pretrained(path, dtype="float32").fast()

    def prefill(self, ids, extra):
        from stablelm_ref.kv_cache import KVCache

        cache = KVCache(self.model.config, ids.shape[0], ids.shape[1] + extra, np.float32, np)
        t0 = time.perf_counter()
        out = self.model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1)[:, None]
        return time.perf_counter() - t0, cache, tok

    def decode(self, ids, steps):
        _, cache, tok = self.prefill(ids, steps)
        times, toks = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            out = self.model(tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1)[:, None]
            times.append(time.perf_counter() - t0)
            toks.append(tok[:, 0])
        return times, np.stack(toks, 1)

    def logits(self, ids):
        return self.model(ids).logits


class Theirs:
    name = "transformers"

    def __init__(self, path):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.attn = self.model.config._attn_implementation
        self.cache = cache_keyword(self.model)

    def prefill(self, ids, extra=0):
        torch = self.torch
        x = torch.from_numpy(ids)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(input_ids=x, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - t0, out[self.cache], tok

    def decode(self, ids, steps):
        torch = self.torch
        _, cache, tok = self.prefill(ids)
        times, toks = [], []
        with torch.inference_mode():
            for _ in range(steps):
                t0 = time.perf_counter()
                out = self.model(input_ids=tok, **{self.cache: cache}, use_cache=True, logits_to_keep=1)
                cache = out[self.cache]
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                times.append(time.perf_counter() - t0)
                toks.append(tok[:, 0].numpy())
        return times, np.stack(toks, 1)

    def logits(self, ids):
        with self.torch.inference_mode():
            return self.model(input_ids=self.torch.from_numpy(ids)).logits.numpy()


# ---- one shape ---------------------------------------------------------------------------------

def bench_shape(name, args, rows, notes):
    import torch
    import transformers

    cfg = {**COMMON, **SHAPES[name]}
    weights = n_params(cfg) * 4
    need = 2.3 * weights + 1.5 * 2**30                  # both models in this process + the probe + slack
    avail = mem_available()
    if avail < need:
        notes.append(f"{name}: skipped, {avail / 2**30:.1f} GiB available, needs about {need / 2**30:.1f} GiB")
        print(notes[-1], flush=True)
        return
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as path:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        config = transformers.StableLmConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
        hf = transformers.StableLmForCausalLM(config).to(torch.float32)
        hf.save_pretrained(path)
        del hf
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
        print(f"\n[{name}] {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']}:"
              f" checkpoint {size / 1e9:.2f} GB float32 written in {time.perf_counter() - t0:.0f} s", flush=True)

        mem = {side: memory_probe(side, path) for side in ("ours", "theirs")}
        sides = [Ours(path), Theirs(path)]
        rng = np.random.default_rng(0)
        ids1 = rng.integers(0, cfg["vocab_size"], (1, PROMPT))
        diff = float(np.abs(sides[0].logits(ids1[:, :16]) - sides[1].logits(ids1[:, :16])).max())
        notes.append(f"{name}: transformers attention = {sides[1].attn}; max |logits difference| on a 16-token "
                     f"prompt = {diff:.2e}")
        print(notes[-1], flush=True)

        repeats = 1 if args.quick else (args.full_repeats if name == "full" else args.repeats)
        steps_list = (32,) if args.quick else (32, 256)
        max_steps = max(steps_list)
        prefill = {s.name: [] for s in sides}
        decode = {(s.name, b, n): [] for s in sides for b in (1, 4) for n in steps_list}
        agree = []
        for r in range(repeats):
            order = sides if r % 2 == 0 else sides[::-1]
            for s in order:
                s.prefill(ids1, 0)                                   # warm: buffers, caches
                prefill[s.name].append(PROMPT / s.prefill(ids1, 0)[0])
            for b in (1, 4):
                ids = rng.integers(0, cfg["vocab_size"], (b, PROMPT))
                got = {}
                for s in order:
                    times, toks = s.decode(ids, max_steps)
                    got[s.name] = toks
                    for n in steps_list:
                        decode[(s.name, b, n)].append(b * n / sum(times[:n]))
                a, t = got["stablelm-ref"], got["transformers"]
                agree.append(float(np.mean(np.cumprod(a == t, axis=1)[:, -1])))  # rows identical to the end
            print(f"  repeat {r + 1}/{repeats} done, load {os.getloadavg()[0]:.1f}", flush=True)

        def row(metric, ours, theirs, higher_better=True):
            ratio = ours / theirs if higher_better else theirs / ours
            rows.append((name, metric, ours, theirs, ratio))
            print(f"  {metric:<28} {ours:10.2f} {theirs:10.2f} {ratio:6.2f}x", flush=True)

        med = statistics.median
        row("prefill tok/s (B=1, T=128)", med(prefill["stablelm-ref"]), med(prefill["transformers"]))
        for b in (1, 4):
            for n in steps_list:
                row(f"decode tok/s (B={b}, N={n})", med(decode[("stablelm-ref", b, n)]),
                    med(decode[("transformers", b, n)]))
        rows.append((name, "peak RSS, load + 1 forward / weights", mem["ours"]["peak"] / size,
                     mem["theirs"]["peak"] / size, None))
        rows.append((name, "peak RSS, load + 1 forward, GB", mem["ours"]["peak"] / 1e9, mem["theirs"]["peak"] / 1e9,
                     None))
        notes.append(f"{name}: peak RSS right after loading: ours {mem['ours']['load'] / 1e9:.2f} GB, transformers "
                     f"{mem['theirs']['load'] / 1e9:.2f} GB (transformers memory-maps the file: its weights become "
                     "resident when first used, hence the measurement after one forward)")
        notes.append(f"{name}: greedy tokens identical on both sides in {100 * np.mean(agree):.0f}% of rows "
                     f"(random weights: near-ties may flip); process RSS before loading: ours "
                     f"{mem['ours']['base'] / 1e6:.0f} MB, transformers {mem['theirs']['base'] / 1e6:.0f} MB")
        del sides


def machine_ticks():
    """(the machine's CPU time not idle nor iowait, all its CPU time), in clock ticks, from /proc/stat's first
    line; OSError where it is missing."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


def busy_fraction(window=0.3):
    """The share of the machine's CPU time that was not idle over `window` seconds (this process sleeping
    meanwhile): what the other processes use. None where /proc/stat is missing."""
    try:
        b0, t0 = machine_ticks()
        time.sleep(window)
        b1, t1 = machine_ticks()
    except OSError:
        return None
    return (b1 - b0) / max(1, t1 - t0)


def wait_quiet(max_busy, timeout):
    """Sleep until the other processes use less than max_busy of the machine, or timeout seconds passed;
    returns the share last seen (None without /proc/stat)."""
    end = time.time() + timeout
    while True:
        busy = busy_fraction()
        if busy is None or busy < max_busy or time.time() > end:
            return busy


def cache_keyword(model):
    """The name a transformers causal LM takes its KV cache by and returns it under: `cache` since transformers
    5.24 (`past_key_values` still works there, but warns that 5.40 removes it), `past_key_values` before (the
    crosscheck extra allows any transformers >= 5)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def quiet_peers(threads):
    """Import torch and transformers with transformers' warnings and progress bars off, and give BLAS
    and torch `threads` threads each (both sides of a benchmark run with the same threads)."""
    import warnings

    import torch
    import transformers
    from threadpoolctl import threadpool_limits

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    threadpool_limits(threads, user_api="blas")
    torch.set_num_threads(threads)
    return torch, transformers


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--shapes", default="small,slice,full", help="comma list of small, slice, full")
    ap.add_argument("--quick", action="store_true", help="one repeat, 32 new tokens only")
    ap.add_argument("--repeats", type=int, default=3, help="repeats per measurement (median), small and slice")
    ap.add_argument("--full-repeats", type=int, default=1, help="repeats at full 1.6B shapes (slow)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")

    from threadpoolctl import threadpool_info

    torch, transformers = quiet_peers(args.threads)
    blas = [i for i in threadpool_info() if i["user_api"] == "blas" and "numpy" in i["filepath"]] or \
        [i for i in threadpool_info() if i["user_api"] == "blas"]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"CPU: {cpu}, {os.cpu_count()} cores; threads used: {args.threads} (numpy BLAS and torch)")
    for i in blas:
        print(f"NumPy {np.__version__} BLAS: {i['internal_api']} {i.get('version')} kernel "
              f"{i.get('architecture')} threads {i['num_threads']}")
    print(f"torch {torch.__version__} (threads {torch.get_num_threads()}), transformers {transformers.__version__}")
    print(f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')} "
          f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '(unset)')}")
    load0 = os.getloadavg()
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)

    rows, notes = [], []
    for s in shapes:
        bench_shape(s, args, rows, notes)
    load1 = os.getloadavg()

    print("\n| shape | metric | stablelm-ref | transformers | ratio |")
    print("|---|---|---:|---:|---:|")
    for shape, metric, ours, theirs, ratio in rows:
        r = "" if ratio is None else f"{ratio:.2f}x"
        print(f"| {shape} | {metric} | {ours:.2f} | {theirs:.2f} | {r} |")
    print(f"\nratio = stablelm-ref / transformers (higher is faster). Targets: decode >= 1.0x, prefill >= 0.9x, "
          f"peak RSS <= 1.3x the float32 weights.")
    print(f"load average: {load0[0]:.2f} at start, {load1[0]:.2f} at end ({os.cpu_count()} cores)")
    for n in notes:
        print("note:", n)


if __name__ == "__main__":
    main()
