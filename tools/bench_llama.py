"""CPU speed of stablelm-ref against llama.cpp (and transformers), side by side, on the same checkpoint.

    make bench-llama                                  # small, slice and full shapes; not in CI
    python tools/bench_llama.py --shapes small --rounds 3

llama.cpp comes from a registry, pinned: the llama.cpp tree that the llama-cpp-python source distribution
on PyPI vendors (LLAMA_CPP_PYTHON below, its sha256 checked), built once with cmake (target llama-bench,
-march=native, OpenMP) into ~/.cache/stablelm-ref/llama.cpp-<version> ($STABLELM_CACHE replaces
~/.cache/stablelm-ref) and reused from there. The build takes about 12 minutes on two quiet cores.

For each shape (tools/bench_cpu.py's: small, slice, full) a random float32 checkpoint is written by
transformers' save_pretrained, with the GPT-NeoX tokenizer beside it (llama.cpp's converter needs a
tokenizer; ../shared/data/gpt-neox-20b-tokenizer.json or $STABLELM_SHARED/data/...; vocabularies larger
than it are padded by the converter), and converted to an f32 GGUF by llama.cpp's own
convert_hf_to_gguf.py. Then --rounds rounds, the order of the sides rotating every round:

- stablelm-ref: model.fast() (NumPy float32). prefill = one forward of a 128-token random prompt into
  a fresh KV cache, logits of the last position only (what llama-bench's pp128 times); decode = after
  that prompt, 32 single-token steps (forward through the cache, logits_to_keep=1, argmax), tokens/s
  = 32 / their total time (llama-bench's tg32 at depth 128).
- llama.cpp: `llama-bench -m model.gguf -t THREADS -r 1 -o json`, once with `-p 128 -n 0` and once
  with `-p 0 -n 32 -d 128`; its own warm-up run each time, its defaults otherwise (the KV cache in f16,
  which halves its attention traffic, in its favour: llama-bench takes no f32 cache type, `-ctk f32` is
  "invalid parameter", its list being f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl).
- llama.cpp f32 KV: the same precision as ours, float32 weights and a float32 KV cache, through the same
  build's llama-batched-bench, which takes any cache type: `llama-batched-bench -m model.gguf -t THREADS
  -c 160 -b 2048 -ub 512 -npp 128 -ntg 32 -npl 1 -ctk f32 -ctv f32 --output-format jsonl` (a 16-token
  warm-up, then a 128-token prompt into an empty cache, logits of its last position, then 32 single-token
  steps: its speed_pp and speed_tg).
- transformers: tools/bench_cpu.py's side (float32, its default attention), the same prefill and
  32-step decode; left out where memory is short (all three models at full shapes need ~20 GB).

Each side's round starts once the other processes use less than --max-busy of the machine (read from
/proc/stat over 0.3 s, at most --wait seconds): on a shared machine a 2-thread BLAS or ggml step whose
second thread waits for a core runs 5 to 20 times slower, and a round that met it says nothing about
either side. The round lines print what the others used before each side.

All sides use --threads threads (NumPy's OpenBLAS through threadpoolctl, torch, llama.cpp -t). The
table gives medians over rounds and ratios stablelm-ref / peer (higher: stablelm-ref faster), and
stablelm-ref's peak resident memory (a fresh process: load, fast(), a 128-token prefill, 8 decode
steps) against the checkpoint's float32 bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import bench_cpu  # noqa: E402  (SHAPES, COMMON, the stablelm-ref and transformers sides)

LLAMA_CPP_PYTHON = "0.3.36"        # vendors llama.cpp with ggml 0.25.3
LLAMA_CPP_PYTHON_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]
PROMPT, STEPS = 128, 32
CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "amx_tile", "amx_bf16")


class SetupError(Exception):
    """Something the benchmark needs is missing; the message says what to do."""


# ---- llama.cpp: download, build, convert --------------------------------------------------------

def cache_root():
    return os.environ.get("STABLELM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "stablelm-ref")


TARGETS = ("llama-bench", "llama-batched-bench")


def llama_cpp(threads):
    """(source dir, {target: path} of TARGETS): built now where the cache has no build of the pinned version
    (a cache holding llama-bench alone, from before llama-batched-bench was measured, builds the other in
    about a minute: the libraries are there)."""
    src = os.path.join(cache_root(), f"llama.cpp-{LLAMA_CPP_PYTHON}")
    exes = {t: os.path.join(src, "build", "bin", t) for t in TARGETS}
    missing = [t for t, path in exes.items() if not os.path.exists(path)]
    if not missing:
        return src, exes
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise SetupError(f"building llama.cpp needs {tool} on PATH (apt-get install cmake g++)")
    sdist_dir = os.path.join(cache_root(), "sdist")
    sdist = os.path.join(sdist_dir, f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz")
    if not os.path.exists(sdist):
        print(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON} (source distribution, ~77 MB) from PyPI", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", sdist_dir], check=True)
    with open(sdist, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != LLAMA_CPP_PYTHON_SHA256:
        raise SetupError(f"{sdist}: sha256 {digest} is not the pinned {LLAMA_CPP_PYTHON_SHA256}; delete it and rerun")
    if not os.path.exists(os.path.join(src, "CMakeLists.txt")):
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        tmp = src + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix) and len(m.name) > len(prefix):
                    m.name = m.name[len(prefix):]
                    members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        shutil.rmtree(src, ignore_errors=True)
        os.rename(tmp, src)
    log = os.path.join(src, "build.log")
    print(f"building llama.cpp's {' and '.join(missing)} in {src} (about 12 minutes on two quiet cores; log: {log})",
          flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as out:
        if not os.path.exists(os.path.join(src, "build", "CMakeCache.txt")):
            generator = ["-G", "Ninja"] if shutil.which("ninja") else []
            subprocess.run(["cmake", "-S", src, "-B", os.path.join(src, "build"), *generator, *CMAKE_FLAGS],
                           stdout=out, stderr=subprocess.STDOUT, check=True)
        subprocess.run(["cmake", "--build", os.path.join(src, "build"), "--target", *missing, "-j",
                        str(threads)], stdout=out, stderr=subprocess.STDOUT, check=True)
    print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)
    return src, exes


def tokenizer_file():
    shared = os.environ.get("STABLELM_SHARED", os.path.join(ROOT, "..", "shared"))
    path = os.path.join(shared, "data", "gpt-neox-20b-tokenizer.json")
    if not os.path.exists(path):
        raise SetupError(f"{path} is missing: llama.cpp's converter needs a tokenizer beside the checkpoint. "
                         "Put the GPT-NeoX-20B tokenizer.json there, or set STABLELM_SHARED to the folder "
                         "whose data/ holds it")
    return path


def write_checkpoint(cfg, path, tokenizer):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.StableLmConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    model = transformers.StableLmForCausalLM(config).to(torch.float32)
    model.save_pretrained(path)
    del model
    shutil.copy(tokenizer, os.path.join(path, "tokenizer.json"))
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def convert(src, path, gguf):
    out = subprocess.run([sys.executable, os.path.join(src, "convert_hf_to_gguf.py"), path, "--outtype", "f32",
                          "--outfile", gguf], capture_output=True, text=True)
    if out.returncode != 0:
        raise SetupError(f"convert_hf_to_gguf.py failed:\n{out.stderr[-3000:]}")


def llama_bench(exe, gguf, threads, args):
    """One llama-bench run (-r 1) -> its JSON record (avg_ts = tokens/s)."""
    cmd = [exe, "-m", gguf, "-t", str(threads), "-r", "1", "-o", "json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SetupError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)[0]


def batched_bench(exe, gguf, threads, args):
    """One llama-batched-bench run -> its JSON record of the one (prompt, steps, batch) asked for (speed_pp,
    speed_tg = tokens/s)."""
    cmd = [exe, "-m", gguf, "-t", str(threads), "--output-format", "jsonl", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    records = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or len(records) != 1:
        raise SetupError(f"{' '.join(cmd)} failed (exit {out.returncode}, {len(records)} results):\n"
                         f"{out.stderr[-3000:]}")
    return json.loads(records[0])


# ---- the sides, one round each ----------------------------------------------------------------

class Ours(bench_cpu.Ours):
    def round(self, ids):
        seconds, cache, tok = self.prefill(ids, STEPS)
        prefill = PROMPT / seconds
        times = []
        for _ in range(STEPS):
            t0 = time.perf_counter()
            out = self.model(tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1)[:, None]
            times.append(time.perf_counter() - t0)
        return prefill, STEPS / sum(times)


class Theirs(bench_cpu.Theirs):
    def round(self, ids):
        prefill = PROMPT / self.prefill(ids)[0]
        times, _ = self.decode(ids, STEPS)
        return prefill, STEPS / sum(times)


class Llama:
    name = "llama.cpp"

    def __init__(self, exe, gguf, threads):
        self.exe, self.gguf, self.threads = exe, gguf, threads
        self.info = {}

    def round(self, ids):
        pp = llama_bench(self.exe, self.gguf, self.threads, ["-p", str(PROMPT), "-n", "0"])
        tg = llama_bench(self.exe, self.gguf, self.threads, ["-p", "0", "-n", str(STEPS), "-d", str(PROMPT)])
        self.info = {k: tg.get(k) for k in ("build_commit", "cpu_info", "backends", "n_threads", "type_k", "type_v",
                                            "flash_attn", "model_type", "n_batch", "n_ubatch")}
        return pp["avg_ts"], tg["avg_ts"]


class LlamaF32Cache(Llama):
    """llama.cpp with a float32 KV cache, as ours (llama-batched-bench; see the module doc)."""

    name = "llama.cpp f32 KV"

    def round(self, ids):
        r = batched_bench(self.exe, self.gguf, self.threads,
                          ["-c", str(PROMPT + STEPS), "-b", "2048", "-ub", "512", "-npp", str(PROMPT),
                           "-ntg", str(STEPS), "-npl", "1", "-ctk", "f32", "-ctv", "f32"])
        self.info = {k: r.get(k) for k in ("n_threads", "flash_attn", "n_batch", "n_ubatch", "n_kv")}
        return r["speed_pp"], r["speed_tg"]


# ---- one shape ----------------------------------------------------------------------------------

def bench_shape(name, args, src, exes, tokenizer, rows, notes):
    cfg = {**bench_cpu.COMMON, **bench_cpu.SHAPES[name]}
    weights = bench_cpu.n_params(cfg) * 4
    with tempfile.TemporaryDirectory(prefix=f"bench-llama-{name}-") as tmp:
        path, gguf = os.path.join(tmp, "ckpt"), os.path.join(tmp, "model-f32.gguf")
        t0 = time.perf_counter()
        size = write_checkpoint(cfg, path, tokenizer)
        convert(src, path, gguf)
        print(f"\n[{name}] {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']}: "
              f"checkpoint {size / 1e9:.2f} GB float32 and its f32 GGUF ({os.path.getsize(gguf) / 1e9:.2f} GB) "
              f"written in {time.perf_counter() - t0:.0f} s", flush=True)
        mem = bench_cpu.memory_probe("ours-decode", path)
        sides = [Ours(path), Llama(exes["llama-bench"], gguf, args.threads),
                 LlamaF32Cache(exes["llama-batched-bench"], gguf, args.threads)]
        # transformers too when this process can hold both models and the GGUF's page cache beside them
        with_hf = not args.no_transformers and bench_cpu.mem_available() > 2.2 * weights + size + 1.5 * 2**30
        if with_hf:
            sides.append(Theirs(path))
        else:
            notes.append(f"{name}: transformers left out ({bench_cpu.mem_available() / 2**30:.1f} GiB available; "
                         f"tools/bench_cpu.py measures it alone)" if not args.no_transformers else
                         f"{name}: transformers left out (--no-transformers)")
        rng = np.random.default_rng(0)
        results = {s.name: ([], []) for s in sides}
        rounds = args.full_rounds if name == "full" else args.rounds
        for r in range(rounds):
            ids = rng.integers(0, cfg["vocab_size"], (1, PROMPT))
            order = sides[r % len(sides):] + sides[:r % len(sides)]
            busy = []
            for s in order:
                if r == 0 and not isinstance(s, Llama):
                    s.round(ids)                              # warm: buffers, caches (llama.cpp warms itself)
                busy.append(bench_cpu.wait_quiet(args.max_busy, args.wait))   # each side starts on a quiet moment
                prefill, decode = s.round(ids)
                results[s.name][0].append(prefill)
                results[s.name][1].append(decode)
            print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[0][-1]:.1f} / {v[1][-1]:.2f}" for k, v in
                                                             results.items()) +
                  f" tok/s (prefill / decode), load {os.getloadavg()[0]:.1f}, others' CPU before each side "
                  f"{'/'.join('-' if b is None else f'{b:.0%}' for b in busy)}", flush=True)
        med = {k: (statistics.median(v[0]), statistics.median(v[1])) for k, v in results.items()}
        for i, metric in enumerate((f"prefill tok/s (B=1, {PROMPT} tokens)", f"decode tok/s (B=1, {STEPS} after {PROMPT})")):
            ours, llama, f32 = med["stablelm-ref"][i], med["llama.cpp"][i], med["llama.cpp f32 KV"][i]
            hf = med["transformers"][i] if "transformers" in med else None
            rows.append((name, metric, ours, llama, ours / llama, f32, ours / f32, hf,
                         None if hf is None else ours / hf))
        rows.append((name, "peak RSS / float32 weights", mem["peak"] / size, None, None, None, None, None, None))
        notes.append(f"{name}: llama.cpp (llama-bench) {sides[1].info}")
        notes.append(f"{name}: llama.cpp f32 KV (llama-batched-bench) {sides[2].info}")
        del sides


def describe_machine(threads):
    from threadpoolctl import threadpool_info

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    print(f"CPU: {cpu}, {os.cpu_count()} cores; SIMD flags: {' '.join(f for f in CPU_FLAGS if f in flags) or 'none'}")
    for i in threadpool_info():
        if i["user_api"] == "blas":
            print(f"NumPy {np.__version__} BLAS: {i['internal_api']} {i.get('version')} kernel {i.get('architecture')} "
                  f"threads {i['num_threads']} ({os.path.basename(i['filepath'])})")
    print(f"threads: {threads} on every side; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')} "
          f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '(unset)')}")
    print(f"llama.cpp: llama-cpp-python {LLAMA_CPP_PYTHON} source distribution (sha256 {LLAMA_CPP_PYTHON_SHA256[:12]}...), "
          f"cmake {' '.join(CMAKE_FLAGS)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--shapes", default="small,slice,full", help="comma list of small, slice, full")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per shape (median), small and slice")
    ap.add_argument("--full-rounds", type=int, default=3, help="rounds at full stablelm-2-1_6b shapes")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--no-transformers", action="store_true", help="leave transformers out")
    ap.add_argument("--max-busy", type=float, default=0.1,
                    help="start each side's round once other processes use less than this share of the machine")
    ap.add_argument("--wait", type=float, default=5, help="seconds to wait for that, at most, per side and round")
    args = ap.parse_args()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in bench_cpu.SHAPES:
            ap.error(f"unknown shape {s!r}; choose from {', '.join(bench_cpu.SHAPES)}")

    torch, transformers = bench_cpu.quiet_peers(args.threads)
    try:
        tokenizer = tokenizer_file()
        src, exes = llama_cpp(args.threads)
    except (SetupError, subprocess.CalledProcessError) as e:
        print(f"bench_llama: {e}", file=sys.stderr)
        sys.exit(2)
    describe_machine(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    load0 = os.getloadavg()
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)

    rows, notes = [], []
    for s in shapes:
        cfg = {**bench_cpu.COMMON, **bench_cpu.SHAPES[s]}
        need = 2.3 * bench_cpu.n_params(cfg) * 4 + 1.5 * 2**30       # ours + GGUF page cache + a probe
        if bench_cpu.mem_available() < need:
            notes.append(f"{s}: skipped, {bench_cpu.mem_available() / 2**30:.1f} GiB available, needs about "
                         f"{need / 2**30:.1f} GiB")
            print(notes[-1], flush=True)
            continue
        try:
            bench_shape(s, args, src, exes, tokenizer, rows, notes)
        except SetupError as e:
            print(f"bench_llama: {e}", file=sys.stderr)
            sys.exit(2)
    load1 = os.getloadavg()

    def f(v, digits=2):
        return "" if v is None else f"{v:.{digits}f}"

    print("\n| shape | metric | stablelm-ref | llama.cpp f32 (f16 KV) | vs llama.cpp | llama.cpp f32, f32 KV | vs it | "
          "transformers | vs transformers |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape, metric, ours, llama, r1, f32, r3, hf, r2 in rows:
        print(f"| {shape} | {metric} | {f(ours)} | {f(llama)} | {f(r1)}{'x' if r1 else ''} | {f(f32)} | "
              f"{f(r3)}{'x' if r3 else ''} | {f(hf)} | {f(r2)}{'x' if r2 else ''} |")
    print(f"\nratios = stablelm-ref / peer (higher: stablelm-ref faster); medians of {args.rounds} rounds "
          f"({args.full_rounds} at full shapes), sides interleaved. Targets: vs llama.cpp >= 1.0x (floor 0.85x), "
          f"vs transformers >= 1.5x, peak RSS <= 1.3x the float32 weights.")
    print(f"load average: {load0[0]:.2f} at start, {load1[0]:.2f} at end ({os.cpu_count()} cores)")
    for n in notes:
        print("note:", n)


if __name__ == "__main__":
    main()
