"""Does an L2 prefetch (or a read) made from one set of SMs turn later reads from another set of SMs into hits?

    python tools/l2_probe.py 8       # 8 MB; one CuPy kernel, no project code

H100 / H200's L2 is two partitions, each said to cache data for the SMs wired to it; if a prefetch served only its
own side, a kernel prefetching for another (the eighth session's lever 2 in docs/cuda_decode_notes.md) would miss.
For four splits of the SMs into halves by %smid (below / above the middle, even / odd, id mod 4, pairs), after a
256 MB read that flushes L2: the time half B takes to read the buffer cold, after a prefetch (or read) by B itself,
after one by the other half A, and after one by every SM; medians of 7 (us, CUDA events). Twentieth session, H200:
at 8 MB the other half's prefetch served B's reads as well as B's own.
"""
import sys

import cupy as cp
import numpy as np

SRC = r'''
extern "C" __global__ void touch(const uint4* __restrict__ buf, long long n16, int mode, const int* __restrict__ sel,
                                 unsigned* ticket, float* sink) {
    unsigned smid; asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    if (!sel[smid]) return;
    __shared__ unsigned chunk;
    const long long CH = 4096;               // uint4 a chunk (64 KB)
    float acc = 0.f;
    while (true) {
        __syncthreads();
        if (threadIdx.x == 0) chunk = atomicAdd(ticket, 1u);
        __syncthreads();
        const long long base = (long long)chunk * CH;
        if (base >= n16) break;
        for (long long i = base + threadIdx.x; i < base + CH && i < n16; i += blockDim.x) {
            if (mode == 0) {
                if ((i & 7) == 0) asm volatile("prefetch.global.L2 [%0];" :: "l"(buf + i));
            } else {
                uint4 v; asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(buf + i));
                acc += __uint_as_float(v.x ^ v.w);
            }
        }
    }
    if (acc == 1.2345f) sink[0] = acc;
}
'''
k = cp.RawKernel(SRC, "touch")
nsm = cp.cuda.Device().attributes["MultiProcessorCount"]
MB = int(sys.argv[1]) if len(sys.argv) > 1 else 8
buf = cp.arange(MB * 2**20 // 4, dtype=cp.uint32)
flush = cp.zeros(256 * 2**20 // 4, dtype=cp.uint32)
n16 = buf.size // 4
ticket = cp.zeros(1, cp.uint32); sink = cp.zeros(1, cp.float32)
def run(mode, sel, arr=buf):
    ticket[...] = 0
    k((nsm * 8,), (256,), (arr, np.int64(arr.size // 4), np.int32(mode), sel, ticket, sink))
def timed_read(sel):
    s, e = cp.cuda.Event(), cp.cuda.Event()
    ticket[...] = 0
    s.record(); k((nsm * 8,), (256,), (buf, np.int64(n16), np.int32(1), sel, ticket, sink)); e.record(); e.synchronize()
    return cp.cuda.get_elapsed_time(s, e) * 1000
allsm = cp.ones(256, cp.int32)
def sel_of(f):
    return cp.asarray(np.array([1 if (i < nsm and f(i)) else 0 for i in range(256)], np.int32))
splits = {"lo/hi": (lambda i: i < nsm // 2), "even/odd": (lambda i: i % 2 == 0), "mod4<2": (lambda i: i % 4 < 2),
          "tpc-pairs(i//2 even)": (lambda i: (i // 2) % 2 == 0)}
for name, f in splits.items():
    A, B = sel_of(lambda i: not f(i)), sel_of(f)
    res = {}
    for case in ("cold", "pf-same", "pf-other", "rd-same", "rd-other", "pf-all"):
        ts = []
        for rep in range(7):
            run(1, allsm, flush); cp.cuda.Device().synchronize()
            if case == "pf-same": run(0, B)
            if case == "pf-other": run(0, A)
            if case == "pf-all": run(0, allsm)
            if case == "rd-same": run(1, B)
            if case == "rd-other": run(1, A)
            cp.cuda.Device().synchronize()
            ts.append(timed_read(B))
        res[case] = float(np.median(ts))
    print(f"{MB} MB read by {name} set B ({int(B.sum())} SMs), us:", "  ".join(f"{c} {v:.2f}" for c, v in res.items()), flush=True)
