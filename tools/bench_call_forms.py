"""Which call form OpenBLAS runs on both cores, for the one-thread products of a small decode step.

    python tools/bench_call_forms.py                 # o's GEMV forms, then decode attention's forms
    python tools/bench_call_forms.py --rounds 12 --only o

A small decode step (tools/bench_cpu.py's "small": hidden 512, 8 heads of 64) has two kinds of product that
OpenBLAS 0.3.31 runs on one thread while the other GEMVs use two:

- o, [1, 512] x [512, 512]: interface/gemv.c threads a GEMV only when m n >= 115200 x
  GEMM_MULTITHREAD_THRESHOLD (4) = 460800; 512 x 512 = 262144. interface/gemm.c threads a GEMM when
  m n k > 65536 x 4 = 262144, so the same product with 2 rows (a zero second row) or as W^T x^T with 2 columns
  is threaded; on x86-64 OpenBLAS does not forward m = 1 GEMMs to GEMV (GEMM_GEMV_FORWARD is arm64 / riscv /
  power only), and NumPy's matmul calls gemv for a [1, K] operand anyway.
- attention's q k^T and P V over the KV cache: 8 per-head [1, 64] x [64, S] products a call, far under
  either threshold. The one threaded form: a cache laid out [S, KVH D] (position-major) and one GEMM per
  product against block-diagonal queries, [S, KVH D] x [KVH D, H] -> [S, H] scores and [H, S] x [S, KVH D]
  -> [H, KVH D], of which the diagonal blocks are the heads' outputs (KVH times the arithmetic, the
  cache read once).

Each form runs in a layer-like sequence, cold as in a step: 40 layers' weights (one allocation per layer,
qkv, o, gate|up, down back to back, 512 MB: every pass reads DRAM), the qkv GEMV (two threads, so that
OpenBLAS's worker spins as it does in a step), ~60 small ufuncs, then the form under test, then gate|up and
down. Attention reads 8 layers' caches with one layer's weights (13 MB) streamed between layers. The forms
alternate in order round by round; each round starts once the other processes use less than --max-busy of
the machine. --threads 1 shows the forms' own cost without OpenBLAS's second thread. Prints per form the
median time of the timed call and its process CPU time / wall time (about 1.0: one thread; about 2.0: both;
under 1: waiting for a core that another process holds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
from numpy.lib.stride_tricks import as_strided

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cpu import wait_quiet  # noqa: E402

F32 = np.float32
HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 512, 1408, 8, 8, 64


def timed(fn, *args):
    c0, t0 = time.process_time(), time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0


def o_forms(rng):
    """{name: fn(o [in, out])} for o's product, and a check that each gives x @ o."""
    h = HIDDEN
    x = rng.standard_normal((1, h), dtype=F32)
    x2 = np.zeros((2, h), F32)
    x2[0] = x[0]
    x2t = np.ascontiguousarray(x2.T)
    y, y2, y2t = np.empty((1, h), F32), np.empty((2, h), F32), np.empty((h, 2), F32)
    forms = {
        "x @ W, gemv (as fast_cpu)": (lambda w: np.matmul(x, w, out=y), lambda: y[0]),
        "x @ W with a zero 2nd row (gemm m=2)": (lambda w: np.matmul(x2, w, out=y2), lambda: y2[0]),
        "W^T @ [x; 0]^T (gemm n=2)": (lambda w: np.matmul(w.T, x2t, out=y2t), lambda: y2t[:, 0]),
    }
    w = rng.standard_normal((h, h), dtype=F32)
    for name, (fn, result) in forms.items():
        fn(w)
        np.testing.assert_allclose(result(), (x @ w)[0], rtol=1e-4, atol=1e-4, err_msg=name)
    return {name: fn for name, (fn, _) in forms.items()}


def bench_o(args, rng):
    h, i = HIDDEN, INTER
    sizes = [h * 3 * h, h * h, h * 2 * i, h * i]
    layers = []
    for _ in range(40):                                    # 40 x 12.8 MB: a pass over them reads DRAM
        memory, at, mats = np.empty(sum(sizes), F32), 0, []
        memory[:] = 0.01
        for (r, c), n in zip([(h, 3 * h), (h, h), (h, 2 * i), (h, i)], sizes):   # down [hidden, I], as fast_cpu
            mats.append(memory[at:at + n].reshape(r, c))
            at += n
        layers.append(mats)
    x = np.full((1, h), 0.5, F32)
    act = np.full((1, i), 0.5, F32)
    y_qkv, y_gu, y_down, small = (np.empty((1, n), F32) for n in (3 * h, 2 * i, h, h))
    forms = o_forms(rng)
    wall = {name: [] for name in forms}
    cpu = {name: [] for name in forms}
    for r in range(args.rounds):
        for name in (list(forms) if r % 2 == 0 else list(forms)[::-1]):
            wait_quiet(args.max_busy, args.wait)
            fn = forms[name]
            for qkv, o, gate_up, down in layers:
                np.matmul(x, qkv, out=y_qkv)                     # two threads: the worker spins after it
                for _ in range(30):
                    np.multiply(small, 1.0, out=small)
                    np.add(small, 0.0, out=small)
                w_s, c_s = timed(fn, o)
                wall[name].append(w_s)
                cpu[name].append(c_s)
                np.matmul(x, gate_up, out=y_gu)
                np.matmul(act, down.T, out=y_down)
    print(f"o, [1, {h}] x [{h}, {h}] float32 (1 MB), cold in a layer-like sequence, {args.rounds} rounds x 40 "
          f"layers; load {os.getloadavg()[0]:.2f}")
    for name in forms:
        med = statistics.median(wall[name])
        print(f"  {name:40s} {med * 1e6:7.1f} us  {h * h * 4 / med / 1e9:5.1f} GB/s  "
              f"cpu/wall {sum(cpu[name]) / sum(wall[name]):.2f}")


def bench_attention(args, rng):
    layers, kvh, heads, d, s = 8, KV_HEADS, HEADS, HEAD_DIM, args.positions
    g = heads // kvh
    max_len = s + 16
    keys = [rng.standard_normal((1, kvh, max_len, d), dtype=F32) for _ in range(layers)]   # as KVCache
    values = [rng.standard_normal((1, kvh, max_len, d), dtype=F32) for _ in range(layers)]
    keys_pm = [np.ascontiguousarray(k[0].transpose(1, 0, 2)) for k in keys]                # [max_len, KVH, D]
    values_pm = [np.ascontiguousarray(v[0].transpose(1, 0, 2)) for v in values]
    q = rng.standard_normal((heads, d), dtype=F32) * d ** -0.5
    weights = np.ones(13 * 2 ** 20 // 4, F32)              # one small layer's matrices, read between layers

    # per head, as fast_cpu._attend: [1, KVH, G, 1, D] x [1, KVH, 1, D, S]
    q_groups = q.reshape(1, kvh, g, 1, d)
    scores, out = np.empty((1, kvh, g, 1, s), F32), np.empty((1, kvh, g, 1, d), F32)
    row_max, row_sum = np.empty((1, kvh, g, 1, 1), F32), np.empty((1, kvh, g, 1, 1), F32)

    def per_head(i):
        np.matmul(q_groups, keys[i][:, :, None, :s].swapaxes(-1, -2), out=scores)
        np.maximum.reduce(scores, axis=-1, keepdims=True, out=row_max)
        np.subtract(scores, row_max, out=scores)
        np.exp(scores, out=scores)
        np.add.reduce(scores, axis=-1, keepdims=True, out=row_sum)
        np.matmul(scores, values[i][:, :, None, :s], out=out)
        np.divide(out, row_sum, out=out)
        return out.reshape(heads, d)

    # one GEMM a product over a position-major cache, block-diagonal queries
    it = q.itemsize
    q_block = np.zeros((kvh * d, heads), F32)              # q_block[k D + j, k G + r] = q[k G + r, j]
    np.copyto(as_strided(q_block, (kvh, g, d), ((d * heads + g) * it, it, heads * it)), q.reshape(kvh, g, d))
    scores_t, row_max_t, row_sum_t = np.empty((s, heads), F32), np.empty((1, heads), F32), np.empty((1, heads), F32)
    both = np.empty((heads, kvh * d), F32)                 # every head's P against every head's V
    diagonal = as_strided(both, (kvh, g, d), ((g * kvh * d + d) * it, kvh * d * it, it))
    out_bd = np.empty((kvh, g, d), F32)

    def one_gemm(i):
        k_flat, v_flat = keys_pm[i][:s].reshape(s, kvh * d), values_pm[i][:s].reshape(s, kvh * d)
        np.matmul(k_flat, q_block, out=scores_t)                                 # [S, H]
        np.maximum.reduce(scores_t, axis=0, keepdims=True, out=row_max_t)
        np.subtract(scores_t, row_max_t, out=scores_t)
        np.exp(scores_t, out=scores_t)
        np.add.reduce(scores_t, axis=0, keepdims=True, out=row_sum_t)
        np.matmul(scores_t.T, v_flat, out=both)                                  # [H, KVH D]
        np.divide(diagonal, row_sum_t.reshape(kvh, g, 1), out=out_bd)
        return out_bd.reshape(heads, d)

    forms = {"per head, 8 BLAS calls a product (as fast_cpu)": per_head,
             "one GEMM a product, position-major cache": one_gemm}
    for i in range(layers):
        np.testing.assert_allclose(per_head(i), one_gemm(i), rtol=1e-4, atol=1e-5)
    wall = {name: [] for name in forms}
    cpu = {name: [] for name in forms}
    for r in range(args.rounds * 2):
        for name in (list(forms) if r % 2 == 0 else list(forms)[::-1]):
            wait_quiet(args.max_busy, args.wait)
            for i in range(layers):
                weights += 1.0                                                   # evicts the cache, as a step
                w_s, c_s = timed(forms[name], i)
                wall[name].append(w_s)
                cpu[name].append(c_s)
    print(f"decode attention over {s} cached positions (keys and values {2 * kvh * s * d * 4 / 1e3:.0f} KB a layer), "
          f"cold; {args.rounds * 2} rounds x {layers} layers; load {os.getloadavg()[0]:.2f}")
    for name in forms:
        print(f"  {name:48s} {statistics.median(wall[name]) * 1e6:7.1f} us a layer  "
              f"cpu/wall {sum(cpu[name]) / sum(wall[name]):.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--only", choices=("o", "attention"), default=None)
    ap.add_argument("--threads", type=int, default=None, help="BLAS threads (threadpoolctl); default: as is")
    ap.add_argument("--positions", type=int, default=150, help="cached positions for attention")
    ap.add_argument("--max-busy", type=float, default=0.1, help="wait for the other processes to use less than this")
    ap.add_argument("--wait", type=float, default=10.0, help="at most this many seconds of waiting per round")
    args = ap.parse_args()
    if args.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads, user_api="blas")
    rng = np.random.default_rng(0)
    if args.only in (None, "o"):
        bench_o(args, rng)
    if args.only in (None, "attention"):
        bench_attention(args, rng)


if __name__ == "__main__":
    main()
