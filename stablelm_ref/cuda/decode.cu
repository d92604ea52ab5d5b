// Raw CUDA kernels for one StableLM decode step (batch 1..8), driven by decode_engine.py.
//
// Everything a step needs is read from device memory (token ids, positions, the cache length),
// so a single captured CUDA graph replays every step with no host work in between.
//
//   embed_rows         x[b, :]  = E[tok[b], :]                                    (f32 residual stream)
//   layernorm_rows     h[b, :]  = (x - mean) / sqrt(var + eps) * w + beta         (f32 statistics, bf16 out)
//   gemv_b{B}_r{R}     y[b, n]  = sum_k x[b, k] W[n, k]   (W in the checkpoint's [out, in] layout)
//                      epilogues: store (+bias), add into the residual, SwiGLU over interleaved gate/up rows
//   gemv_mma_t{MT}_u{U}  the same product and epilogues on the tensor cores (mma.sync), for batches of 2-8
//   gemv_ln_b1_r{R}    y = LayerNorm(x) W^T at batch 1, the LayerNorm folded into the GEMV's reads (its
//                      statistics accumulated by the residual-add GEMVs before it, and by embed_rows)
//   decode_attention_d{D}   per (row, kv head, split): q/k LayerNorm per head, rotary (GPT-NeoX
//                      rotate_half on the first rotary_ndims dims), write k/v at cache[len], attention
//                      over keys [0, len] of one split with an online softmax per warp (each warp its own
//                      keys), the warps combined; with several splits their partial (max, sum, output)
//                      combined (flash-decoding): launched as one thread-block cluster a kv head (sm_90,
//                      up to 8 splits) by the first split, in its shared memory, else by the last to finish
//   argmax_step        greedy token per row + step bookkeeping (len += 1, pos += 1, token history), and a
//                      flag per row: NaN / Inf among its logits
//   sample_step        in argmax_step's place when generate processes the logits: repetition penalty,
//                      temperature, top-k, top-p, a draw from softmax (or argmax) + the same bookkeeping
//   sample_topk_partial + sample_topk_merge   the same for top-k sampling, the search spread over many
//                      blocks a row (each slice's top-k, then the union's)
//
// The batch-1 whole-step kernel, decode_step_b1_d{D}, is decode_step.cu: a module of its own, compiled after
// this file's helpers (everything above the "embedding" section; launch.step_source()).
//
// Header-free on purpose (bf16 handled as raw 16-bit patterns), so NVRTC and nvcc both build it.
// Build: nvcc -cubin -arch=sm_90 -O3 decode.cu   (launch.build_cubin -> cubin.compile_cached: nvcc, else NVRTC).

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF (-__int_as_float(0x7f800000))

// Programmatic dependent launch (sm_90). Under a PDL launch the next kernel may start while this one
// finishes: every kernel lets its dependents launch at once and waits for its predecessor (to finish and
// flush its writes) before it reads anything an earlier kernel wrote or writes anything. Before the wait a
// kernel only reads data no kernel of the step writes (weights, and the cache below the current length).
// Under an ordinary launch both instructions do nothing.
// What an earlier kernel of the step writes (x, qkv, the attention's output, mlp, the LayerNorm statistics, the
// logits, the sampler's candidates) is read through pointers that are not `const __restrict__`, so with weak,
// coherent loads: given a const __restrict__ pointer (or __ldg, or ld.global.nc) the compiler uses the
// non-coherent path, which takes the data as unchanging for the kernel's life, and ptxas may then schedule the
// load before griddepcontrol.wait, while the predecessor is still writing it (seen on sm_90 with CUDA 13.0: an
// ld.global.nc of the statistics placed before the wait, even as a volatile asm after it in the source; NaN
// logits). Weights, biases and norms keep const __restrict__: no kernel writes them.
// Before sm_90 there is no PDL: the macros are empty, so the module builds for older GPUs too.
// A probe build may define both macros before this file (tools/decode_timeline.cuh: each block records its
// start, wait and exit); the shipped module never does.
#if defined(PDL_LAUNCH)  // the probe's own: kept
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_LAUNCH() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#define PDL_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#else
#define PDL_LAUNCH()
#define PDL_WAIT()
#endif

// ---------------------------------------------------------------- bf16 as raw bits
__device__ __forceinline__ float bf2f(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ float bf_lo(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf_hi(u32 v) { return __uint_as_float(v & 0xffff0000u); }
__device__ __forceinline__ u16 f2bf(float f) {           // round to nearest even, NaN stays NaN
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}
__device__ __forceinline__ u32 pack_bf2(float lo, float hi) {
    return (u32)f2bf(lo) | ((u32)f2bf(hi) << 16);
}
__device__ __forceinline__ void unpack8(const uint4 v, float (&f)[8]) {
    f[0] = bf_lo(v.x); f[1] = bf_hi(v.x); f[2] = bf_lo(v.y); f[3] = bf_hi(v.y);
    f[4] = bf_lo(v.z); f[5] = bf_hi(v.z); f[6] = bf_lo(v.w); f[7] = bf_hi(v.w);
}

// Weights are read exactly once per step: stream them past L1.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

// Asynchronous 16-byte global -> shared copy (sm_80+); src_bytes 0 fills zeros and reads nothing.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// The same load as a volatile asm: it stays ordered before griddepcontrol.wait (a prefetch).
__device__ __forceinline__ uint4 ld_stream_early(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

// LayerNorm pieces on 4 values (layernorm_rows, decode_step.cu's mk_layernorm): the squared deviations from
// the mean, and bf16((v - mean) * rstd * w + b) packed.
__device__ __forceinline__ float sq_dev4(const float4 v, float mean) {
    const float a = v.x - mean, b = v.y - mean, c = v.z - mean, d = v.w - mean;
    return (a * a + b * b) + (c * c + d * d);
}
__device__ __forceinline__ uint2 ln_pack4(const float4 v, float mean, float rstd, const float4 w, const float4 b) {
    uint2 o;
    o.x = pack_bf2((v.x - mean) * rstd * w.x + b.x, (v.y - mean) * rstd * w.y + b.y);
    o.y = pack_bf2((v.z - mean) * rstd * w.z + b.z, (v.w - mean) * rstd * w.w + b.w);
    return o;
}

template <typename T>                      // float or double
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Sum over the block; every thread gets the result. `buf` holds >= 32 values.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* buf) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();                       // buf may still be read from a previous call
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    T t = (lane < nw) ? buf[lane] : T(0);
    return warp_sum(t);
}

// The register LayerNorm (layernorm_rows' fast path, decode_step.cu's mk_layernorm): thread t of T holds
// float4 j = t + i T (i < NV, j < K4) of x in v, of the weight in w and of the bias in b; two-pass float32
// statistics, `sum` a block's sum (the same value in every thread); bf16 results packed into y[j].
template <int NV, typename Sum>
__device__ __forceinline__ void ln_regs(const float4 (&v)[NV], const float4 (&w)[NV], const float4 (&b)[NV], int t,
                                        int T, int K4, float eps, Sum sum, uint2* y) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i)
        if (t + i * T < K4) s += (v[i].x + v[i].y) + (v[i].z + v[i].w);
    const float mean = sum(s) / (float)(4 * K4);
    float q = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i)
        if (t + i * T < K4) q += sq_dev4(v[i], mean);
    const float rstd = rsqrtf(sum(q) / (float)(4 * K4) + eps);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
        const int j = t + i * T;
        if (j < K4) y[j] = ln_pack4(v[i], mean, rstd, w[i], b[i]);
    }
}

// One head vector held by a warp in registers (lane + 32 i, zeros past D), normalised by its own LayerNorm
// of weight wln (float32 [D], no bias): the mean, then the mean of squared deviations, over the warp. The
// per-head q / k LayerNorm of attn_impl and of the whole-step kernel (decode_step.cu).
template <int D>
__device__ __forceinline__ void head_layernorm(float (&v)[(D + 31) / 32], const float* __restrict__ wln, float eps) {
    constexpr int DV = (D + 31) / 32;
    const int lane = threadIdx.x & 31;
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < DV; ++i) sum += v[i];                          // (zeros past D)
    const float mean = warp_sum(sum) / (float)D;
    float var = 0.f;
#pragma unroll
    for (int i = 0; i < DV; ++i)
        if (lane + 32 * i < D) { const float t = v[i] - mean; var += t * t; }
    const float rstd = rsqrtf(warp_sum(var) / (float)D + eps);
#pragma unroll
    for (int i = 0; i < DV; ++i)
        if (lane + 32 * i < D) v[i] = (v[i] - mean) * rstd * wln[lane + 32 * i];
}

// Rotary on the first 2 half dims of a head vector in shared memory (float32), by a warp:
// x * cos + rotate_half(x) * sin, rc = cos | sin (half entries each); then __syncwarp.
__device__ __forceinline__ void rotate_half_smem(float* dst, const float* rc, int half) {
    for (int i = threadIdx.x & 31; i < half; i += 32) {
        const float cs = rc[i], sn = rc[half + i], x1 = dst[i], x2 = dst[i + half];
        dst[i] = x1 * cs - x2 * sn;
        dst[i + half] = x2 * cs + x1 * sn;
    }
    __syncwarp();
}

// ---------------------------------------------------------------- embedding
// x[b, :] = float(E[tok[b], :])          grid (B), block (256)
// With stats (the folded LayerNorms' statistics, [n_stats, ld_stats, 2] float64, see gemv_impl): row b of
// instance 0 = (sum_k x[b, k], sum_k x[b, k]^2), and of every later instance zero (the residual-add GEMVs
// accumulate those during the step).
// The row is read as 16-byte chunks, all of a thread's loads issued before the first is used (hidden % 8 == 0,
// hidden <= 8 EMBED_MAXC blockDim: every shape of the family): one memory round trip. A loop of 2-byte loads
// compiled to one load in flight a thread, 10 dependent round trips at hidden 2560 (7.9 us of a 3b-4e1t step).
#define EMBED_MAXC 4
extern "C" __global__ void embed_rows(const int* __restrict__ tok, const u16* __restrict__ E,
                                      int hidden, float* __restrict__ x, double* __restrict__ stats,
                                      int n_stats, int ld_stats) {
    __shared__ double buf[32];
    PDL_LAUNCH();
    PDL_WAIT();
    const int b = blockIdx.x, T = blockDim.x;
    const u16* erow = E + (size_t)tok[b] * hidden;   // never written: __ldg
    float* xr = x + (size_t)b * hidden;
    double s1 = 0.0, s2 = 0.0;
    if ((hidden & 7) == 0 && hidden <= 8 * EMBED_MAXC * T) {
        const int nc = hidden >> 3;
        uint4 c[EMBED_MAXC];
#pragma unroll
        for (int i = 0; i < EMBED_MAXC; ++i)
            if (threadIdx.x + i * T < nc) c[i] = __ldg(reinterpret_cast<const uint4*>(erow) + threadIdx.x + i * T);
#pragma unroll
        for (int i = 0; i < EMBED_MAXC; ++i) {
            const int j = threadIdx.x + i * T;
            if (j < nc) {
                float f[8];
                unpack8(c[i], f);
                reinterpret_cast<float4*>(xr)[2 * j] = make_float4(f[0], f[1], f[2], f[3]);
                reinterpret_cast<float4*>(xr)[2 * j + 1] = make_float4(f[4], f[5], f[6], f[7]);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    s1 += f[e];
                    s2 += (double)f[e] * f[e];
                }
            }
        }
    } else {
        for (int k = threadIdx.x; k < hidden; k += T) {
            const float v = bf2f(erow[k]);
            xr[k] = v;
            s1 += v;
            s2 += (double)v * v;
        }
    }
    if (stats == nullptr) return;
    for (int i = 1 + threadIdx.x; i < n_stats; i += T)
        stats[((size_t)i * ld_stats + b) * 2] = stats[((size_t)i * ld_stats + b) * 2 + 1] = 0.0;
    s1 = block_sum(s1, buf);
    s2 = block_sum(s2, buf);
    if (threadIdx.x == 0) {
        stats[(size_t)b * 2] = s1;
        stats[(size_t)b * 2 + 1] = s2;
    }
}

// ---------------------------------------------------------------- LayerNorm (+bias), bf16 out
// grid (B), block (LN_THREADS). Two-pass float32 statistics like torch (mean, then the mean of squared
// deviations). Fast path (K % 4 == 0, K <= 4 * LN_MAXV * LN_THREADS): the row, weight and bias are
// loaded once into registers as float4 (one round of loads), so the kernel costs two block reductions.
#define LN_THREADS 512
#define LN_MAXV 4
extern "C" __global__ void __launch_bounds__(LN_THREADS) layernorm_rows(
    const float* x, int ldx, const float* __restrict__ w, const float* __restrict__ beta,
    u16* __restrict__ y, int ldy, int K, float eps) {
    __shared__ float buf[32];
    PDL_LAUNCH();
    const int tid = threadIdx.x, T = blockDim.x;
    const float* xr = x + (size_t)blockIdx.x * ldx;
    u16* yr = y + (size_t)blockIdx.x * ldy;
    if ((K & 3) == 0 && (ldx & 3) == 0 && (ldy & 3) == 0 && K <= 4 * LN_MAXV * T) {
        const int K4 = K >> 2;
        float4 v[LN_MAXV], wv[LN_MAXV], bv[LN_MAXV];
#pragma unroll
        for (int i = 0; i < LN_MAXV; ++i) {          // parameters first: no kernel writes them
            const int j = tid + i * T;
            if (j < K4) {
                wv[i] = reinterpret_cast<const float4*>(w)[j];
                bv[i] = reinterpret_cast<const float4*>(beta)[j];
            }
        }
        PDL_WAIT();
#pragma unroll
        for (int i = 0; i < LN_MAXV; ++i)
            if (tid + i * T < K4) v[i] = reinterpret_cast<const float4*>(xr)[tid + i * T];
        ln_regs(v, wv, bv, tid, T, K4, eps, [&](float a) { return block_sum(a, buf); }, reinterpret_cast<uint2*>(yr));
        return;
    }
    PDL_WAIT();
    float s = 0.f;                                    // general path: any K, three passes
    for (int k = tid; k < K; k += T) s += xr[k];
    const float mean = block_sum(s, buf) / (float)K;
    float v = 0.f;
    for (int k = tid; k < K; k += T) { float d = xr[k] - mean; v += d * d; }
    const float rstd = rsqrtf(block_sum(v, buf) / (float)K + eps);
    for (int k = tid; k < K; k += T) yr[k] = f2bf((xr[k] - mean) * rstd * w[k] + beta[k]);
}

// ---------------------------------------------------------------- GEMV / skinny GEMM
// y[b, n] = sum_k x[b, k] * W[n, k],  b < nb <= BM,  W bf16 [N, K] row-major, K % 8 == 0.
// A block works on groups of R consecutive rows of W; its threads stride over K in 16-byte chunks (8 bf16),
// two chunks per row in flight per iteration, float32 accumulation, then a block reduction. With a grid of
// fewer blocks than groups (persistent blocks) block i takes groups i, i + grid, ... and loads the next
// group's first weights while it reduces the current one.
// Block size (a multiple of 32, <= 512), R and the grid are picked per matrix shape by an autotuner.
#define GEMV_MAX_WARPS 16
#define MODE_STORE 0   // yf[b, n] = acc + bias[n]            (bias may be null)
#define MODE_ADD 1     // yf[b, n] += acc                     (residual stream)
#define MODE_SWIGLU 2  // rows (2i, 2i+1) = (gate_i, up_i):  yh[b, i] = bf16(silu(gate) * up)

// An L2 prefetch of weights (evict_normal instead of evict_last measured the same on the H100).
__device__ __forceinline__ void prefetch_weights(const uint4* p) {
    asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p));
}

// The epilogue of output (b, n), s its accumulated sum, shared by gemv_impl and gemv_mma_impl:
//   MODE_STORE  yf[b, n] = s + bias[n];   MODE_ADD  yf[b, n] += s (returns the new value, for the row statistics);
//   MODE_SWIGLU at a gate row n (even; n + 1 its up row, whose sum up_sum() returns): yh[b, n / 2] = silu(s) up.
template <typename UpSum>
__device__ __forceinline__ float gemv_epilogue(int mode, int b, int n, int N, float s, UpSum up_sum,
                                               const float* __restrict__ bias, float* __restrict__ yf,
                                               u16* __restrict__ yh, int ldy) {
    if (mode == MODE_SWIGLU) {
        if ((n & 1) == 0 && n + 1 < N) {
            const float u = up_sum();
            const float act = s / (1.f + __expf(-s));
            yh[(size_t)b * ldy + (n >> 1)] = f2bf(act * u);
        }
        return 0.f;
    }
    if (n >= N) return 0.f;
    if (mode == MODE_ADD) {
        const float y = yf[(size_t)b * ldy + n] + s;
        yf[(size_t)b * ldy + n] = y;
        return y;
    }
    yf[(size_t)b * ldy + n] = s + (bias ? bias[n] : 0.f);
    return 0.f;
}

template <int BM, int R, typename LoadX>
__device__ __forceinline__ void gemv_accum(float (&acc)[BM][R], const uint4 (&w)[R], LoadX load_x, int c, int nb) {
    float wf[R][8];
#pragma unroll
    for (int r = 0; r < R; ++r) unpack8(w[r], wf[r]);
#pragma unroll
    for (int b = 0; b < BM; ++b) {
        if (b < nb) {
            float xf[8];
            load_x(b, c, xf);
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[b][r] = fmaf(wf[r][i], xf[i], acc[b][r]);
        }
    }
}

// Chunk c of each of the R rows, 16 bytes each; a chunk past the row reads nothing.
template <int R>
__device__ __forceinline__ void gemv_load_chunk(uint4 (&w)[R], const uint4* const (&wrow)[R], int c, int KC) {
#pragma unroll
    for (int r = 0; r < R; ++r) w[r] = c < KC ? ld_stream_early(wrow[r] + c) : make_uint4(0u, 0u, 0u, 0u);
}
// Two chunks (c, c + T) of each of the R rows.
template <int R>
__device__ __forceinline__ void gemv_load(uint4 (&wa)[R], uint4 (&wb)[R], const uint4* const (&wrow)[R],
                                          int c, int T, int KC) {
    gemv_load_chunk<R>(wa, wrow, c, KC);
    gemv_load_chunk<R>(wb, wrow, c + T, KC);
}
// Chunks c0, c0 + T, ... of each of the R rows into L2.
template <int R>
__device__ __forceinline__ void gemv_prefetch_from(const uint4* const (&wrow)[R], int c0, int T, int KC) {
    for (int cc = c0; cc < KC; cc += T)
#pragma unroll
        for (int r = 0; r < R; ++r) prefetch_weights(wrow[r] + cc);
}

// LN (gemv_ln_b1_r{R}): x is the float32 residual stream and the GEMV's input is its LayerNorm,
// h = bf16((x - mean) * rstd * ln_w + ln_b), the layernorm_rows kernel's arithmetic, with mean and rstd from
// ln_stats[b] = (sum x, sum x^2) (float64, accumulated by the producers below: var = E[x^2] - mean^2 in
// float64). So the LayerNorm kernel and its launch go (the engine folds the layers' LayerNorms this way at
// batch 1). Each block writes h into shared memory once (K bf16, dynamic shared memory) while its first
// weights are in flight, then runs the plain GEMV loop on it (computing h per chunk as the chunks are read,
// every row group reading x, ln_w and ln_b again, measured 2.9% slower a step).
// ln_w and ln_b were last read a step ago (gigabytes of weights since: in DRAM), and a read after the wait queues
// behind every block's L2 prefetch of its rows; so before its own weights each of the first 2K / 32 blocks
// prefetches one 128-byte line of them into L2 (each line asked for once: the same lines prefetched by every block
// measured 2% slower a step). H200, nineteenth session, same tuning, ms a step: 3b-4e1t 1.6665 against 1.6774 and
// 1.6538 against 1.6750 (two machines), 2-1.6b 0.9946 against 1.0033 (the bound, not reading them at all: 1.6514 /
// 0.9689). An evict_last read instead, keeping them in L2 from step to step, measured the same as this.
// LN statistics: one 16-byte load of (sum x, sum x^2) right after the wait (coherent: see the PDL macros), issued
// for every b (row 0 where b >= nb: under `if (b < nb)` ptxas moved the 16 early weight loads below the wait), and
// mean = RN(sum x / K) without a division after it: rK = RN(1 / K) is taken before the wait, then q0 = s rK and
// q = q0 + (s - K q0) rK, Markstein's correction, which is RN(s / K) (the division's own fast path; its slow path is
// for quotients near the exponent range's ends, which sums of K float32 values never are), so h is bit for bit
// what two divisions give. Two float64 divisions after the load cost more than their arithmetic: each has a
// slow-path CALL, and ptxas does not hoist the x / ln_w / ln_b loads above a CALL (SASS: load, division, load,
// division, then h's loads). H200, twenty-first session, same tuning, ms a step (`decode_probe.py --variants
// default ln-stats-div default ln-stats-div`, ln-stats-div the previous form): 3b-4e1t 1.6446 / 1.6451 against
// 1.6661 / 1.6664, 2-1.6b 0.9861 / 0.9846 against 0.9888 / 0.9892 (another machine: 1.6556 / 1.6564 against 1.6715
// / 1.6716, 0.9781 / 0.9780 against 0.9869 / 0.9864; one load still dividing took 1.6669 / 1.6677); logits
// bit-identical. The bound, no statistics at all (ln-no-stats), was -0.018 at 3b.
// LN weights and h's loads: a folded-LayerNorm GEMV holds one weight chunk a row through the wait, not two (the
// second is prefetched into L2 with the rest and loaded into registers once h is written); the 4R registers that
// frees hold h's loads, both of a thread's chunks (c, c + T: x, ln_w and ln_b, twelve 16-byte loads) issued in one
// round after the statistics where a chunk a round took two (3b-4e1t: 320 chunks, 160 threads). With two chunks a
// row held and h's chunks paired, ptxas spilled at the 104-register cap; with one chunk held and h a chunk a round,
// the step was slower (+0.019 ms at 3b). H200, twenty-second session, each side tuned for itself, ms a step
// (`decode_probe.py --src-rev file:OLD --variants default ln-two-early default`, OLD the decode.cu before): 3b-4e1t
// 1.6296 / 1.6392 against 1.6510 / 1.6481, 2-1.6b 0.9624 / 0.9612 against 0.9758 / 0.9847 (the twenty-first
// session's probe of the same code: 1.6359 / 1.6365 against 1.6549 / 1.6558, 0.9670 / 0.9791 against 0.9795 /
// 0.9930); logits bit-identical at one tuning. These loads are written with gemv_load_chunk / gemv_prefetch_from,
// as the plain GEMVs' are (twenty-third session; the same loads, and ptxas schedules every GEMV kernel a little
// differently from the loops written out in place: same tuning, `decode_probe.py --variants default file:OLD ...`,
// 3b-4e1t 1.6287 / 1.6289 against 1.6378 / 1.6382 ms a step, 2-1.6b 0.9680 / 0.9676 against 0.9671 / 0.9672).
// stats_out (MODE_ADD, may be null): stats_out[b] += (sum_n y_new[b, n], sum_n y_new[b, n]^2) over this
// launch's rows, one float64 atomic pair a block and row: the next LayerNorm's statistics, zeroed by
// embed_rows at the step's start.
template <int BM, int R, bool LN>
__device__ __forceinline__ void gemv_impl(const void* x, int ldx, int nb,
                                          const u16* __restrict__ W, int N, int K,
                                          const float* __restrict__ bias,
                                          float* __restrict__ yf, u16* __restrict__ yh, int ldy,
                                          int mode, double* __restrict__ stats_out,
                                          const float* __restrict__ ln_w, const float* __restrict__ ln_b,
                                          const double* ln_stats, float eps) {
    __shared__ float red[GEMV_MAX_WARPS][BM * R];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, T = blockDim.x;
    const int nwarps = T >> 5;
    const int KC = K >> 3;                       // 16-byte chunks per row
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    const int ldxv = ldx >> 3;
    float mean[BM], rstd[BM];
    extern __shared__ __align__(16) unsigned char gemv_smem[];
    const uint4* hs = reinterpret_cast<const uint4*>(gemv_smem);   // LN: h [K] bf16 (batch 1)
    auto ln8 = [&](int b, int c, float (&xf)[8]) {                   // h[b, 8c .. 8c + 7]
        const float4* xr = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(x) + (size_t)b * ldx) + 2 * c;
        const float4* wr = reinterpret_cast<const float4*>(ln_w) + 2 * c;
        const float4* br = reinterpret_cast<const float4*>(ln_b) + 2 * c;
        const float4 x0 = xr[0], x1 = xr[1], w0 = wr[0], w1 = wr[1], b0 = br[0], b1 = br[1];
        const float v[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
        const float g[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
        const float o[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) xf[i] = (v[i] - mean[b]) * rstd[b] * g[i] + o[i];
    };
    auto load_x = [&](int b, int c, float (&xf)[8]) {
        if constexpr (LN) {
            unpack8(hs[c], xf);                  // batch 1
        } else {
            unpack8(xv[(size_t)b * ldxv + c], xf);
        }
    };
    double st1 = 0.0, st2 = 0.0;                 // this thread's share of stats_out (epilogue threads)
    const int groups = (N + R - 1) / R;          // groups of R rows; block i takes groups i, i + grid, ...
    int g = blockIdx.x;
    const uint4* wrow[R];
    auto point_at = [&](int grp) {
#pragma unroll
        for (int r = 0; r < R; ++r)              // rows past N re-read row N-1; never stored
            wrow[r] = reinterpret_cast<const uint4*>(W) + (size_t)min(grp * R + r, N - 1) * KC;
    };
    // Fetch the first two chunks of each row into registers (LN: one, see "LN weights" above) and the rest into
    // L2. Before the wait this overlaps the previous kernel (no kernel writes W); later, it overlaps this group's
    // reduction. (ptxas may move these non-coherent loads past the wait; tests/test_decode_sass.py checks the SASS
    // keeps them before.)
    uint4 wa[R], wb[R];
    auto fetch = [&]() {
        gemv_load<R>(wa, wb, wrow, tid, T, KC);
        gemv_prefetch_from<R>(wrow, tid + 2 * T, T, KC);
    };

    PDL_LAUNCH();
    if constexpr (LN)        // ln_w and ln_b into L2 first: see "LN" above
        if (tid == 0)
            for (int l = blockIdx.x; l < (K >> 4); l += gridDim.x) {
                const float* v = l < (K >> 5) ? ln_w + 32 * l : ln_b + 32 * (l - (K >> 5));
                asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(v));
            }
    [[maybe_unused]] const double rK = 1.0 / K;  // LN: 1 / K before the wait (see "LN statistics" above)
    point_at(g);
    if constexpr (LN) {                          // one chunk a row through the wait: "LN weights" above
        gemv_load_chunk<R>(wa, wrow, tid, KC);
        gemv_prefetch_from<R>(wrow, tid + T, T, KC);
    } else {
        fetch();
    }
    PDL_WAIT();                                  // x (and y for MODE_ADD) come from earlier kernels
    if constexpr (LN) {
#pragma unroll
        for (int b = 0; b < BM; ++b) {
            const double2 st = reinterpret_cast<const double2*>(ln_stats)[b < nb ? b : 0];
            const double Kd = K;
            double m = st.x * rK, q = st.y * rK;           // RN(st / K): Markstein's correction
            m = fma(fma(-Kd, m, st.x), rK, m);
            q = fma(fma(-Kd, q, st.y), rK, q);
            const double var = b < nb ? fmax(q - m * m, 0.0) : 0.0;
            if (b >= nb) m = 0.0;
            mean[b] = (float)m;
            rstd[b] = rsqrtf((float)var + eps);
        }
        uint4* hw = reinterpret_cast<uint4*>(gemv_smem);  // h into shared memory once (batch 1)
        for (int c = tid; c < KC; c += 2 * T) {
            const int d = c + T < KC ? c + T : c;     // both chunks' loads in one round (d == c: stored twice,
                                                      // the same value by the same thread)
            float h[8], e[8];
            ln8(0, c, h);
            ln8(0, d, e);
            hw[c] = make_uint4(pack_bf2(h[0], h[1]), pack_bf2(h[2], h[3]), pack_bf2(h[4], h[5]), pack_bf2(h[6], h[7]));
            hw[d] = make_uint4(pack_bf2(e[0], e[1]), pack_bf2(e[2], e[3]), pack_bf2(e[4], e[5]), pack_bf2(e[6], e[7]));
        }
        gemv_load_chunk<R>(wb, wrow, tid + T, KC);
        __syncthreads();
    }
    while (true) {
        float acc[BM][R];
#pragma unroll
        for (int b = 0; b < BM; ++b)
#pragma unroll
            for (int r = 0; r < R; ++r) acc[b][r] = 0.f;
        int c = tid;
        while (c < KC) {
            gemv_accum<BM, R>(acc, wa, load_x, c, nb);
            if (c + T < KC) gemv_accum<BM, R>(acc, wb, load_x, c + T, nb);
            c += 2 * T;
            if (c < KC) gemv_load<R>(wa, wb, wrow, c, T, KC);
        }
        const int n0 = g * R, next = g + gridDim.x;
        if (next < groups) {                     // the next group's weights load during the reduction
            point_at(next);
            fetch();
        }
#pragma unroll
        for (int b = 0; b < BM; ++b)
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float v = warp_sum(acc[b][r]);
                if (lane == 0) red[warp][b * R + r] = v;
            }
        __syncthreads();
        if (tid < nb * R) {
            const int b = tid / R, n = n0 + tid % R;   // (swiglu: n0 even, so n is even at gate rows)
            float s = 0.f;
            for (int w = 0; w < nwarps; ++w) s += red[w][tid];
            auto up_sum = [&] { float u = 0.f; for (int w = 0; w < nwarps; ++w) u += red[w][tid + 1]; return u; };
            const float y = gemv_epilogue(mode, b, n, N, s, up_sum, bias, yf, yh, ldy);
            if (mode == MODE_ADD && n < N) {
                st1 += y;
                st2 += (double)y * y;
            }
        }
        if (next >= groups) break;
        __syncthreads();                         // red is written again by the next group
        g = next;
    }
    if (stats_out != nullptr && warp == 0) {     // epilogue threads tid = b * R + r (nb * R <= 32)
#pragma unroll
        for (int o = 1; o < R; o <<= 1) {        // sum over the R lanes of each batch row
            st1 += __shfl_xor_sync(0xffffffffu, st1, o);
            st2 += __shfl_xor_sync(0xffffffffu, st2, o);
        }
        if (tid < nb * R && tid % R == 0) {
            atomicAdd(stats_out + 2 * (tid / R), st1);
            atomicAdd(stats_out + 2 * (tid / R) + 1, st2);
        }
    }
}

#define GEMV_INST(BM, R)                                                                                    \
    extern "C" __global__ void __launch_bounds__(GEMV_MAX_WARPS * 32) gemv_b##BM##_r##R(                    \
        const u16* x, int ldx, int nb, const u16* __restrict__ W, int N, int K,                            \
        const float* __restrict__ bias, float* __restrict__ yf, u16* __restrict__ yh, int ldy, int mode,    \
        double* __restrict__ stats_out) {                                                                   \
        gemv_impl<BM, R, false>(x, ldx, nb, W, N, K, bias, yf, yh, ldy, mode, stats_out, nullptr, nullptr,  \
                                nullptr, 0.f);                                                              \
    }
GEMV_INST(1, 1) GEMV_INST(1, 2) GEMV_INST(1, 4) GEMV_INST(1, 8)
GEMV_INST(2, 1) GEMV_INST(2, 2) GEMV_INST(2, 4) GEMV_INST(2, 8)
GEMV_INST(4, 1) GEMV_INST(4, 2) GEMV_INST(4, 4) GEMV_INST(4, 8)
GEMV_INST(8, 1) GEMV_INST(8, 2) GEMV_INST(8, 4)

// x: the float32 residual [nb, ldx]; the LayerNorm folded in (see gemv_impl). Batch 1 only.
// Registers capped at 104 where the compiler has __maxnreg__ (CUDA >= 12.4; 512 threads x 104 still launch):
// gemv_ln_b1_r8 took 114 (120 allocated), so three blocks of 160 threads left a SM too few registers for an
// attention block (110 x 128) beside them; at 104 (no spills) one fits. Same tuning, alternating (seventeenth
// session): 3b-4e1t 1.6751 against 1.6776 ms a step, 2-1.6b 1.0097 against 1.0094 (96: spills, 8% slower).
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define GEMV_LN_BOUNDS __maxnreg__(104)
#else
#define GEMV_LN_BOUNDS __launch_bounds__(GEMV_MAX_WARPS * 32)
#endif
#define GEMV_LN_INST(R)                                                                                     \
    extern "C" __global__ void GEMV_LN_BOUNDS gemv_ln_b1_r##R(                                             \
        const float* x, int ldx, int nb, const u16* __restrict__ W, int N, int K,                          \
        const float* __restrict__ bias, float* __restrict__ yf, u16* __restrict__ yh, int ldy, int mode,    \
        double* __restrict__ stats_out, const float* __restrict__ ln_w, const float* __restrict__ ln_b,     \
        const double* ln_stats, float eps) {                                                                \
        gemv_impl<1, R, true>(x, ldx, nb, W, N, K, bias, yf, yh, ldy, mode, stats_out, ln_w, ln_b,          \
                              ln_stats, eps);                                                               \
    }
GEMV_LN_INST(1) GEMV_LN_INST(2) GEMV_LN_INST(4) GEMV_LN_INST(8)

// ---------------------------------------------------------------- skinny GEMM on the tensor cores (nb 2..8)
// The same product and epilogues as gemv_b{B}_r{R}, for the batch's rows at once: at nb = 8 the GEMV above
// does 8 FMAs per weight (plus the unpacking) on the CUDA cores and is ALU-bound; here the tensor cores
// multiply, with mma.sync m16n8k16 (bf16 in, float32 accumulate): 16 weight rows are the A operand
// (16 x 16), the batch's 8 rows of x the B operand (16 x 8: the batch is the n axis; rows past nb are zero).
// The order of the 16 k terms inside one mma does not change its sum, so both operands come from plain
// 16-byte loads: lane (g = lane / 4, t = lane % 4) loads 8 consecutive k at k0 + 8t of weight rows g and
// g + 8 and of x row g (batch g), and hands k0 + 8t .. +3 to one mma as fragment slots 2t, 2t+1, 2t+8,
// 2t+9, and k0 + 8t + 4 .. +7 to a second. Slot -> k depends on t alone, the same for A and B, so each
// mma sums W[row, k] x[b, k] over 16 distinct k and the two together over the 32 k of the step.
// Weights stream from global memory straight into the fragments (read once: no shared memory stage);
// x (at most 8 rows, read by every warp) comes through L1.
// A block of T threads owns MT tiles of 16 rows; its warps split K (warp w takes 32-wide steps w, w + NW,
// ..., U steps in flight a thread), sum their partial tiles in shared memory, then the epilogue
// (a persistent block then takes its next tile group, as gemv_impl does).
#define MMA_MAX_WARPS 16

// (bf16 mma needs sm_80: DecodeKernels offers these kernels only there; older GPUs trap if called)
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

template <int MT, int U>
__device__ __forceinline__ void gemv_mma_impl(const u16* x, int ldx, int nb,
                                              const u16* __restrict__ W, int N, int K,
                                              const float* __restrict__ bias,
                                              float* __restrict__ yf, u16* __restrict__ yh, int ldy, int mode) {
    __shared__ float red[MMA_MAX_WARPS][MT * 128];       // per warp: its partial [MT][16 rows][8 batch]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, NW = blockDim.x >> 5, T = blockDim.x;
    const int g = lane >> 2, t = lane & 3;
    const int KC = K >> 3;                               // 16-byte chunks per row
    const int KS = (KC + 3) >> 2;                        // 32-wide k steps
    const int rows = 16 * MT, groups = (N + rows - 1) / rows;
    const uint4* xrow = reinterpret_cast<const uint4*>(x) + (size_t)min(g, nb - 1) * (ldx >> 3);
    const uint4* wrow[MT][2];
    auto point_at = [&](int grp) {
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int h = 0; h < 2; ++h)                  // rows past N re-read row N-1; never stored
                wrow[m][h] = reinterpret_cast<const uint4*>(W) +
                             (size_t)min(grp * rows + m * 16 + h * 8 + g, N - 1) * KC;
    };
    uint4 wv[U][MT][2];
    auto load_w = [&](int s0) {                          // steps s0, s0 + NW, ... (U of them) of this warp
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = (s0 + u * NW) * 4 + t;
#pragma unroll
            for (int m = 0; m < MT; ++m)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    wv[u][m][h] = c < KC ? ld_stream_early(wrow[m][h] + c) : make_uint4(0u, 0u, 0u, 0u);
        }
    };

    PDL_LAUNCH();
    int grp = blockIdx.x;
    point_at(grp);
    // Before the wait in the source (no kernel writes W). ptxas (CUDA 13.0) puts these non-coherent loads after
    // griddepcontrol.wait in every gemv_mma kernel; an L2 prefetch of the same lines here, which it leaves before
    // the wait, made the step 5% faster at one tuning and 1.4% slower with each form tuned for itself (twentieth
    // session, 3b-4e1t batch 8): not kept.
    load_w(warp);
    PDL_WAIT();                                          // x (and y for MODE_ADD) come from earlier kernels
    while (true) {
        float acc[MT][4];
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0.f;
        for (int s0 = warp; s0 < KS; s0 += U * NW) {
            uint4 xr[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = (s0 + u * NW) * 4 + t;
                xr[u] = (c < KC && g < nb) ? xrow[c] : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int u = 0; u < U; ++u)
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    mma_bf16_16816(acc[m], wv[u][m][0].x, wv[u][m][1].x, wv[u][m][0].y, wv[u][m][1].y, xr[u].x,
                                   xr[u].y);
                    mma_bf16_16816(acc[m], wv[u][m][0].z, wv[u][m][1].z, wv[u][m][0].w, wv[u][m][1].w, xr[u].z,
                                   xr[u].w);
                }
            if (s0 + U * NW < KS) load_w(s0 + U * NW);
        }
        const int next = grp + gridDim.x;
        if (next < groups) {                             // the next group's weights load during the reduction
            point_at(next);
            load_w(warp);
        }
        // accumulator (m, i): row m*16 + g + 8*(i >> 1), batch 2t + (i & 1)
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            float* r = red[warp] + m * 128;
            r[g * 8 + 2 * t] = acc[m][0];
            r[g * 8 + 2 * t + 1] = acc[m][1];
            r[(g + 8) * 8 + 2 * t] = acc[m][2];
            r[(g + 8) * 8 + 2 * t + 1] = acc[m][3];
        }
        __syncthreads();
        for (int e = tid; e < MT * 128; e += T) {        // e = (m * 16 + row) * 8 + b
            const int b = e & 7, n = grp * rows + (e >> 3);
            if (b >= nb) continue;
            float s = 0.f;
            for (int w = 0; w < NW; ++w) s += red[w][e];
            // (swiglu: rows (2i, 2i+1) = (gate_i, up_i), both in this tile: the up row's sums are 8 entries on)
            auto up_sum = [&] { float u = 0.f; for (int w = 0; w < NW; ++w) u += red[w][e + 8]; return u; };
            gemv_epilogue(mode, b, n, N, s, up_sum, bias, yf, yh, ldy);
        }
        if (next >= groups) break;
        __syncthreads();                                 // red is written again by the next group
        grp = next;
    }
}

#define GEMV_MMA_INST(MT, U)                                                                   \
    extern "C" __global__ void __launch_bounds__(MMA_MAX_WARPS * 32) gemv_mma_t##MT##_u##U(    \
        const u16* x, int ldx, int nb, const u16* __restrict__ W, int N, int K,               \
        const float* __restrict__ bias, float* __restrict__ yf, u16* __restrict__ yh, int ldy, \
        int mode) {                                                                            \
        gemv_mma_impl<MT, U>(x, ldx, nb, W, N, K, bias, yf, yh, ldy, mode);                    \
    }
GEMV_MMA_INST(1, 2) GEMV_MMA_INST(1, 4) GEMV_MMA_INST(2, 2) GEMV_MMA_INST(2, 4)

// ---------------------------------------------------------------- decode attention
// grid (NS splits, KVH, nb), block (128). The query heads g*... of one kv head share its K/V tiles.
//   qkv     [B, (H + 2 KVH) D] f32    q heads | k heads | v heads of the new token (bias included)
//   kc, vc  [B, KVH, max_len, D] bf16 this layer's cache; the new k/v go to position len
//   lenp    device int: tokens already cached (the new token sits at index len)
//   posp    [B] device int: rotary position of the new token of each row
//   kmask   [B, max_len] u8: 1 = key may be attended (0 = left padding)
//   part_o  [B, H, NS, D] f32, part_ml [B, H, NS, 2] f32, counters [B * KVH] int (zero between launches)
//   out     [B, H * D] bf16
//   split_tiles  tiles of ATT_TK keys a split takes before the keys spread over more splits (<= NS)
//   nbuf    tiles held in shared memory at once (1..ATT_MAXBUF); the first nbuf are copied before the wait
// Each warp owns rows [16 w, 16 w + 16) of every tile, from the copy to the weighted sum of V: it copies
// them, scores them, keeps its own online softmax (m, l) and output, so the tiles need no block-wide
// barrier; the four warps' results are combined once at the end (then, with several splits, the splits' by
// split 0 of a cluster, or in global memory by the last block to finish).
// Up to ATT_TC_G query heads a kv head (every StableLM), a warp's tile is two tensor-core products
// (mma.m16n8k16, bf16 in, float32 sums): S = q K^T with the heads' q as rows 0..G-1 of A in bf16 and rows
// 8..8+G-1 their remainders (q - bf16(q), so S carries ~16 bits of q, not bf16's 8), and o += p V with p split
// the same way; the softmax runs on S's accumulator fragments, whose layout is p's A fragment, and the warp's
// (m, l, o) stay in registers until the tiles end. With more heads a kv head, and at batch > 1 (attention_launch's
// choice), the float32 loop: two lanes a key for the scores, pairs of dimensions a lane for p V.
#define ATT_THREADS 128
#define ATT_NW (ATT_THREADS / 32)
#define ATT_TK 64          // keys per tile
#define ATT_RW (ATT_TK / ATT_NW)   // keys of a tile per warp
#define ATT_MAXJ 8         // (G * D / 2) <= ATT_MAXJ * ATT_THREADS
#define ATT_MAXBUF 4       // tiles in shared memory at most
#define ATT_TC_G 8         // query heads a kv head up to which the tiles run on tensor cores

__device__ __forceinline__ void attn_split_range(int len, int NS, int split_tiles, int& nsplit, int& tiles_per) {
    const int n = len + 1;
    const int ntiles = (n + ATT_TK - 1) / ATT_TK;
    const int nact = max(1, min(NS, (ntiles + split_tiles - 1) / split_tiles));
    tiles_per = (ntiles + nact - 1) / nact;
    nsplit = (ntiles + tiles_per - 1) / tiles_per;     // no split left empty
}

// This warp starts copying its ATT_RW keys/values of the tile at t0 into shared memory (rows t < len; the
// rest zero-filled; the new token's row is read from knb/vnb instead), one cp.async group. Returns the
// warp's key mask (the same in every lane): bit r set if the key of row r0 + r may be attended.
template <int D>
__device__ __forceinline__ int attn_issue_rows(u16* Kt, u16* Vt, const u16* __restrict__ kc,
                                               const u16* __restrict__ vc, size_t cbase,
                                               const unsigned char* __restrict__ mrow, int t0, int t_end, int len) {
    constexpr int KPAD = D + 8, DC = D / 8;
    const int lane = threadIdx.x & 31, r0 = (threadIdx.x >> 5) * ATT_RW;
    for (int c = lane; c < ATT_RW * DC; c += 32) {
        const int r = r0 + c / DC, col = c % DC, t = t0 + r;
        const bool ok = t < t_end && t < len;
        const size_t off = ok ? cbase + (size_t)t * D + col * 8 : cbase;
        cp_async16(Kt + r * KPAD + col * 8, kc + off, ok ? 16 : 0);
        cp_async16(Vt + r * KPAD + col * 8, vc + off, ok ? 16 : 0);
    }
    cp_async_commit();
    const int t = t0 + r0 + (lane & (ATT_RW - 1));
    const bool ok = t < t_end && (t < len ? mrow[t] != 0 : t == len);
    return (int)(__ballot_sync(0xffffffffu, ok) & ((1u << ATT_RW) - 1));
}

// Tensor-core pieces of the attention's tiles (sm_80+, as cp.async): ldmatrix gives four 8x8 bf16 matrices,
// lane l naming row l % 8 of matrix l / 8 (.trans: each matrix transposed); split_bf2 writes two floats as
// bf16 pairs hi + lo (lo = x - hi, rounded), whose sum keeps ~16 of the 24 bits of x.
__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], const u16* p) {
    const u32 a = static_cast<u32>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(u32 (&r)[4], const u16* p) {
    const u32 a = static_cast<u32>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
}
__device__ __forceinline__ u32 cvt_bf2(float lo, float hi) {     // round to nearest even, one instruction
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ void split_bf2(float x0, float x1, u32& hi, u32& lo) {
    hi = cvt_bf2(x0, x1);
    lo = cvt_bf2(x0 - bf_lo(hi), x1 - bf_hi(hi));
}

// Thread-block clusters (sm_90): the splits of one kv head launched as one cluster combine their partials
// through the first split's shared memory instead of global memory (no fence, atomic counter or L2 round
// trips after the tiles). Before sm_90 the size reads 1, so the global combine is the only path.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ u32 cluster_size() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ void cluster_arrive_relaxed() { asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory"); }
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }
// Store v at the address p has in the shared memory of the cluster's block `rank`.
__device__ __forceinline__ void st_cluster(const float* p, u32 rank, float v) {
    u32 a = static_cast<u32>(__cvta_generic_to_shared(p)), r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
    asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(r), "f"(v) : "memory");
}
__device__ __forceinline__ void st_cluster_int(const int* p, u32 rank, int v) {
    u32 a = static_cast<u32>(__cvta_generic_to_shared(p)), r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
    asm volatile("st.shared::cluster.s32 [%0], %1;" ::"r"(r), "r"(v) : "memory");
}
#else
__device__ __forceinline__ u32 cluster_size() { return 1; }
__device__ __forceinline__ void cluster_arrive_relaxed() {}
__device__ __forceinline__ void cluster_arrive() {}
__device__ __forceinline__ void cluster_wait() {}
__device__ __forceinline__ void st_cluster(const float*, u32, float) {}
__device__ __forceinline__ void st_cluster_int(const int*, u32, int) {}
#endif

// The splits' partials (max m, sum l, unnormalised output o) of the block's G query heads combined and written
// as bf16: pairs (d, d+1) over the block's threads, splits in rounds of 8 with all loads of a round issued
// together. Partial s of head g: o at po + (g NS + s) D, (m, l) at pml + (g NS + s) 2; `out` points at the
// block's first query head. GLOBAL: the partials are in global memory (read through L2), else in shared.
template <int D, bool GLOBAL>
__device__ __forceinline__ void attn_combine(const float* po, const float* pml, int G, int NS, int nsplit,
                                             u16* __restrict__ out) {
    const int GD2 = G * (D / 2);
#pragma unroll 1          // (one pass for most heads: unrolled, the kernel's code was 143 KB)
    for (int j = 0; j < ATT_MAXJ; ++j) {
        const int p = threadIdx.x + j * ATT_THREADS;
        if (p < GD2) {
            const int g = p / (D / 2), dp = p % (D / 2);
            float M = NEG_INF, L = 0.f, o0 = 0.f, o1 = 0.f;       // running combine, 8 splits a round
            for (int s0 = 0; s0 < nsplit; s0 += 8) {
                float ms[8], ls[8], a0[8], a1[8];
#pragma unroll
                for (int u = 0; u < 8; ++u) {                      // all loads of a round issued together
                    const int sp = s0 + u;
                    ms[u] = NEG_INF;
                    if (sp < nsplit) {
                        const float* ml = pml + ((size_t)g * NS + sp) * 2;
                        const float* o = po + ((size_t)g * NS + sp) * D + 2 * dp;
                        ms[u] = GLOBAL ? __ldcg(ml) : ml[0];
                        ls[u] = GLOBAL ? __ldcg(ml + 1) : ml[1];
                        a0[u] = GLOBAL ? __ldcg(o) : o[0];
                        a1[u] = GLOBAL ? __ldcg(o + 1) : o[1];
                    }
                }
                float mx = M;
#pragma unroll
                for (int u = 0; u < 8; ++u) mx = fmaxf(mx, ms[u]);
                if (mx == NEG_INF) continue;                       // every key so far masked
                const float sc = __expf(M - mx);                   // 0 while M is -inf
                L *= sc; o0 *= sc; o1 *= sc;
#pragma unroll
                for (int u = 0; u < 8; ++u)
                    if (ms[u] != NEG_INF) {                        // a split with no key left adds nothing
                        const float wgt = __expf(ms[u] - mx);
                        L = fmaf(wgt, ls[u], L);
                        o0 = fmaf(wgt, a0[u], o0);
                        o1 = fmaf(wgt, a1[u], o1);
                    }
                M = mx;
            }
            const float inv = 1.f / L;
            *reinterpret_cast<u32*>(out + (size_t)g * D + 2 * dp) = pack_bf2(o0 * inv, o1 * inv);
        }
    }
}

// Wait until at most `pending` (0..ATT_MAXBUF - 1) of this thread's latest cp.async groups are in flight.
__device__ __forceinline__ void cp_async_wait_pending(int pending) {
    switch (pending) {
        case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
        case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
        case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
        default: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
    }
}

template <int D, bool TC>               // TC: the tiles on tensor cores (H / KVH <= ATT_TC_G)
__device__ __forceinline__ void attn_impl(
    const float* qkv, u16* __restrict__ kc, u16* __restrict__ vc,
    const int* __restrict__ lenp, const int* __restrict__ posp, const unsigned char* __restrict__ kmask,
    const float* __restrict__ inv_freq, int rot,
    const float* __restrict__ qn_w, const float* __restrict__ kn_w, int qk_ln, float eps,
    float* __restrict__ part_o, float* __restrict__ part_ml, int* __restrict__ counters,
    u16* __restrict__ out, int H, int KVH, int max_len, float scale, int split_tiles, int nbuf) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    constexpr int KPAD = D + 8;                          // padded K row (bank-conflict-free 16B reads)
    constexpr int HC = D / 16;                           // 16-byte chunks in half a row (a lane's share)
    const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, NS = gridDim.x;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    constexpr int NW = ATT_NW;
    const int G = H / KVH;
    const int GD2 = G * (D / 2);

    PDL_LAUNCH();
    // Launched as clusters of the NS splits of each kv head (attention_launch's cluster): the first split
    // combines the others' partials in its shared memory. Every block signals that it runs (a block may write
    // into another's shared memory only once that one has started) and, with several live splits, arrives
    // once more after its partial is written; only the first split waits for that.
    const bool clustered = NS > 1 && cluster_size() == (u32)NS;
    if (clustered) cluster_arrive_relaxed();
    const int len = *lenp;                               // changes only at the end of a step (argmax_step)
    int nsplit, tiles_per;
    attn_split_range(len, NS, split_tiles, nsplit, tiles_per);
    if (split >= nsplit) {
        if (clustered && nsplit > 1) { cluster_wait(); cluster_arrive(); }
        return;
    }
    const int n = len + 1;
    const int t_begin = split * tiles_per * ATT_TK;
    const int t_end = min(n, t_begin + tiles_per * ATT_TK);
    const int ntile = (t_end - t_begin + ATT_TK - 1) / ATT_TK;

    // shared memory carve-up (16-byte aligned pieces first)
    u16* Kb = reinterpret_cast<u16*>(smem_raw);                      // [nbuf][TK][KPAD]
    u16* Vb = Kb + nbuf * ATT_TK * KPAD;                              // [nbuf][TK][KPAD]
    u16* knb = Vb + nbuf * ATT_TK * KPAD;                             // [D] the new key, bf16
    u16* vnb = knb + D;                                               // [D] the new value, bf16
    float* qs = reinterpret_cast<float*>(vnb + D);                    // [G][D]
    float* Ow = qs + G * D;                                           // [NW][G][D] each warp's output
    float* kn = Ow + NW * G * D;                                      // [D]
    float* vn = kn + D;                                               // [D]
    float* S = vn + D;                                                // [NW][G][RW] each warp's p
    float* m_s = S + NW * G * ATT_RW;                                 // [NW][G]
    float* l_s = m_s + NW * G;                                        // [NW][G]
    float* a_s = l_s + NW * G;                                        // [NW][G]
    float* rc = a_s + NW * G;                                         // [rot]: cos, then sin
    float* cpo = rc + D;                                              // clustered: [G][NS][D] partial o,
    float* cpml = cpo + G * NS * D;                                   //   [G][NS][2] (m, l): split 0's
    __shared__ int is_last;
    __shared__ __align__(16) u16 zrow[8];                // 16 zero bytes: a masked key's V row for ldmatrix
    constexpr bool tc = TC;
    static_assert(!TC || ATT_RW == 16, "a warp's tile is one 16-key k step of p V");
    if (TC && G > ATT_TC_G) __trap();                    // (attention_launch picks the kernel by G)

    const size_t cbase = ((size_t)b * KVH + kvh) * (size_t)max_len * D;
    const unsigned char* mrow = kmask + (size_t)b * max_len;
    // This warp's rows of the first nbuf tiles, copied while the previous kernel finishes (no kernel of the
    // step writes cache rows t < len). mk[i]: the warp's key mask of buffer i (bit r: row r0 + r).
    int mk[ATT_MAXBUF];
#pragma unroll
    for (int i = 0; i < ATT_MAXBUF; ++i)
        mk[i] = (i < nbuf && i < ntile)
                    ? attn_issue_rows<D>(Kb + i * ATT_TK * KPAD, Vb + i * ATT_TK * KPAD, kc, vc, cbase, mrow,
                                         t_begin + i * ATT_TK, t_end, len)
                    : 0;
    // The rotary angles of this row's position: no kernel of the step writes pos or inv_freq.
    const int pos = posp[b], half = rot >> 1;
    for (int i = tid; i < half; i += ATT_THREADS) {
        float sn, cs;
        sincosf((float)pos * inv_freq[i], &sn, &cs);
        rc[i] = cs;
        rc[half + i] = sn;
    }
    __syncthreads();
    PDL_WAIT();                                          // qkv comes from the previous kernel

    // 1. the new token: per-head LayerNorm, rotary, scale; one warp per head vector
    const size_t row = (size_t)b * (H + 2 * KVH) * D;
    constexpr int DV = (D + 31) / 32;                    // elements per lane
    for (int item = warp; item < G + 2; item += NW) {
        const bool isq = item < G, isk = item == G;
        float* dst = isq ? qs + item * D : (isk ? kn : vn);
        const float* src = qkv + row + (isq ? (size_t)(kvh * G + item) * D
                                            : (isk ? (size_t)(H + kvh) * D : (size_t)(H + KVH + kvh) * D));
        float v[DV];
#pragma unroll
        for (int i = 0; i < DV; ++i) {                   // one round of loads
            const int d = lane + 32 * i;
            v[i] = d < D ? src[d] : 0.f;
        }
        if (qk_ln && item <= G)
            head_layernorm<D>(v, isq ? qn_w + (size_t)(kvh * G + item) * D : kn_w + (size_t)kvh * D, eps);
#pragma unroll
        for (int i = 0; i < DV; ++i)
            if (lane + 32 * i < D) dst[lane + 32 * i] = v[i];
        __syncwarp();
        if (item <= G && half > 0) rotate_half_smem(dst, rc, half);
        if (isq) {
            for (int d = lane; d < D; d += 32) dst[d] *= scale;
        } else {                                             // the cache holds bf16: use the rounded value
            u16* dstb = isk ? knb : vnb;
            for (int d = lane; d < D; d += 32) dstb[d] = f2bf(dst[d]);
        }
        __syncwarp();
    }
    // The float32 tiles accumulate each warp's (m, l, o) in shared memory from these starting values; the
    // tensor-core tiles keep them in registers and write every entry after the loop, and only they read zrow.
    if (!tc) {
        for (int i = tid; i < NW * G * D; i += ATT_THREADS) Ow[i] = 0.f;
        for (int i = tid; i < NW * G; i += ATT_THREADS) { m_s[i] = NEG_INF; l_s[i] = 0.f; }
    } else if (tid < 8) {
        zrow[tid] = 0;
    }
    __syncthreads();

    if (split == 0)
        for (int d = tid; d < D; d += ATT_THREADS) {
            kc[cbase + (size_t)len * D + d] = knb[d];
            vc[cbase + (size_t)len * D + d] = vnb[d];
        }

    // 2. tiles of keys [t_begin, t_end): each warp its own rows, its own online softmax and output
    float* Sw = S + warp * G * ATT_RW;
    float* Owp = Ow + warp * G * D;
    float* mw = m_s + warp * G;
    float* lw = l_s + warp * G;
    float* aw = a_s + warp * G;
    const int r0 = warp * ATT_RW, rl = lane >> 1, hf = lane & 1;
    // tensor cores: lane (grp, tig) = (lane / 4, lane % 4) holds row grp of A's and C's fragments; its query
    // head is grp (rows grp + 8: the remainders), its keys 2 tig, 2 tig + 1, 2 tig + 8, 2 tig + 9 of the 16
    constexpr int KS = D / 16, DN = D / 8;               // k steps of q K^T, n tiles of p V
    const int grp = lane >> 2, tig = lane & 3;
    u32 qa[KS][4];                                       // A fragments of q (heads past G repeat head G-1)
    float oacc[DN][4];                                   // C fragments of o: rows grp (p's bf16) + grp + 8 (rest)
    float m_run = NEG_INF, l_run = 0.f;                  // row grp's online softmax
    if (tc) {
        const float* q = qs + min(grp, G - 1) * D + 2 * tig;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            split_bf2(q[ks * 16], q[ks * 16 + 1], qa[ks][0], qa[ks][1]);
            split_bf2(q[ks * 16 + 8], q[ks * 16 + 9], qa[ks][2], qa[ks][3]);
        }
#pragma unroll
        for (int dn = 0; dn < DN; ++dn) oacc[dn][0] = oacc[dn][1] = oacc[dn][2] = oacc[dn][3] = 0.f;
    }
    for (int i = 0; i < ntile; ++i) {
        const int buf = i % nbuf, t0 = t_begin + i * ATT_TK;
        cp_async_wait_pending(min(nbuf, ntile - i) - 1);    // this tile's group has landed
        __syncwarp();                                        // (the other lanes' copies too)
        const u16* Kt = Kb + buf * ATT_TK * KPAD;
        const u16* Vt = Vb + buf * ATT_TK * KPAD;
        int km = 0;
#pragma unroll
        for (int j = 0; j < ATT_MAXBUF; ++j) km = j == buf ? mk[j] : km;
        if (tc) {
            const int rn = len - (t0 + r0);                  // the new token's row among the warp's (if 0..15)
            // S (16 x 16 keys, two n tiles): ldmatrix x4 = keys 0-7 dims lo / hi, keys 8-15 dims lo / hi
            float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
            {
                const int key = ((lane >> 4) << 3) + (lane & 7);
                const u16* krow = (key == rn ? knb : Kt + (r0 + key) * KPAD) + ((lane >> 3) & 1) * 8;
#pragma unroll
                for (int ks = 0; ks < KS; ++ks) {
                    u32 kb[4];
                    ldsm_x4(kb, krow + ks * 16);
                    mma_bf16_16816(sc[0], qa[ks][0], qa[ks][1], qa[ks][2], qa[ks][3], kb[0], kb[1]);
                    mma_bf16_16816(sc[1], qa[ks][0], qa[ks][1], qa[ks][2], qa[ks][3], kb[2], kb[3]);
                }
            }
            // softmax of row grp over its quad's 16 scores; masked keys -inf (K rows there may hold NaN)
            float s[4], mx = NEG_INF;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = (e >> 1) * 8 + 2 * tig + (e & 1);
                s[e] = (km >> key) & 1 ? sc[e >> 1][e & 1] + sc[e >> 1][2 + (e & 1)] : NEG_INF;
                mx = fmaxf(mx, s[e]);
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m_run, mx);
            const bool none = (m_new == NEG_INF);
            float p[4], sum = 0.f;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                p[e] = none ? 0.f : __expf(s[e] - m_new);
                sum += p[e];
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const float alpha = none ? 1.f : __expf(m_run - m_new);
            l_run = l_run * alpha + sum;
            m_run = m_new;
            // p as A: row grp keys (2 tig, +1) | row grp + 8 the same keys' remainders | keys (2 tig + 8, +9) ...
            u32 pa[4];
            split_bf2(p[0], p[1], pa[0], pa[1]);
            split_bf2(p[2], p[3], pa[2], pa[3]);
#pragma unroll
            for (int dn = 0; dn < DN; ++dn)
#pragma unroll
                for (int e = 0; e < 4; ++e) oacc[dn][e] *= alpha;
            // o += p V: ldmatrix x4 .trans = keys 0-7 / 8-15 of dims tile dn, then of dn + 1. A masked key's row
            // is read as zeros (p is 0 there, but 0 x NaN is NaN)
            {
                const int key = (((lane >> 3) & 1) << 3) + (lane & 7);
                const bool ok = (km >> key) & 1;
                const u16* vrow = (key == rn ? vnb : Vt + (r0 + key) * KPAD) + (lane >> 4) * 8;
#pragma unroll
                for (int dn = 0; dn < DN; dn += 2) {
                    u32 vb[4];
                    ldsm_x4_trans(vb, ok ? vrow + dn * 8 : zrow);
                    mma_bf16_16816(oacc[dn], pa[0], pa[1], pa[2], pa[3], vb[0], vb[1]);
                    mma_bf16_16816(oacc[dn + 1], pa[0], pa[1], pa[2], pa[3], vb[2], vb[3]);
                }
            }
        } else {
            const int attend = (km >> rl) & 1;
            // scores of this lane's key (two lanes a key, half a row each; q already scaled); masked -> -inf
            const int tk = t0 + r0 + rl;
            const u16* krow = (tk == len ? knb : Kt + (r0 + rl) * KPAD) + hf * (D / 2);
            uint4 kv[HC];
#pragma unroll
            for (int c = 0; c < HC; ++c) kv[c] = *reinterpret_cast<const uint4*>(krow + c * 8);
            for (int g = 0; g < G; ++g) {
                const float* q = qs + g * D + hf * (D / 2);
                float s0 = 0.f, s1 = 0.f;                        // two chains
#pragma unroll
                for (int c = 0; c < HC; ++c) {
                    float kf[8];
                    unpack8(kv[c], kf);
#pragma unroll
                    for (int e = 0; e < 8; e += 2) {
                        s0 = fmaf(q[c * 8 + e], kf[e], s0);
                        s1 = fmaf(q[c * 8 + e + 1], kf[e + 1], s1);
                    }
                }
                float s = s0 + s1;
                s += __shfl_xor_sync(0xffffffffu, s, 1);
                if (!attend) s = NEG_INF;
                const float m_old = mw[g];
                const float m_new = fmaxf(m_old, warp_max(s));
                const bool none = (m_new == NEG_INF);
                const float p = none ? 0.f : __expf(s - m_new);
                const float sum = warp_sum(hf ? 0.f : p);
                if (!hf) Sw[g * ATT_RW + rl] = p;
                __syncwarp();   // every lane has read mw[g] before lane 0 rewrites it
                if (lane == 0) {
                    const float alpha = none ? 1.f : __expf(m_old - m_new);
                    aw[g] = alpha;
                    lw[g] = lw[g] * alpha + sum;
                    mw[g] = m_new;
                }
            }
            __syncwarp();
            // o[g][d] = alpha o[g][d] + sum_r p[g][r] v[r][d] over this warp's keys; each lane owns pairs (d, d+1).
            // Masked keys (p == 0) are skipped: their cache slots may hold anything, NaN included.
            for (int item = lane; item < GD2; item += 32) {
                const int g = item / (D / 2), dp = item % (D / 2);
                const float* prow = Sw + g * ATT_RW;
                float o0 = 0.f, o1 = 0.f;
#pragma unroll
                for (int r = 0; r < ATT_RW; ++r) {
                    const float pr = prow[r];
                    const u16* vrow = t0 + r0 + r == len ? vnb : Vt + (r0 + r) * KPAD;
                    const u32 v2 = *reinterpret_cast<const u32*>(vrow + 2 * dp);
                    o0 = pr > 0.f ? fmaf(pr, bf_lo(v2), o0) : o0;
                    o1 = pr > 0.f ? fmaf(pr, bf_hi(v2), o1) : o1;
                }
                float2* o = reinterpret_cast<float2*>(Owp + g * D + 2 * dp);
                const float a = aw[g];
                const float2 prev = *o;
                *o = make_float2(fmaf(prev.x, a, o0), fmaf(prev.y, a, o1));
            }
        }
        if (i + nbuf < ntile) {                              // this warp's rows of tile i + nbuf, same buffer
            __syncwarp();                                    // every lane is done reading it
            const int m = attn_issue_rows<D>(Kb + buf * ATT_TK * KPAD, Vb + buf * ATT_TK * KPAD, kc, vc, cbase,
                                             mrow, t0 + nbuf * ATT_TK, t_end, len);
#pragma unroll
            for (int j = 0; j < ATT_MAXBUF; ++j) mk[j] = j == buf ? m : mk[j];
        }
    }
    if (tc && grp < G) {                                 // the warp's (m, l, o) of head grp, as the loop below
        float* o = Ow + (warp * G + grp) * D + 2 * tig;  // leaves them: rows grp + 8 added to rows grp
#pragma unroll
        for (int dn = 0; dn < DN; ++dn)
            *reinterpret_cast<float2*>(o + dn * 8) =
                make_float2(oacc[dn][0] + oacc[dn][2], oacc[dn][1] + oacc[dn][3]);
        if (tig == 0) { m_s[warp * G + grp] = m_run; l_s[warp * G + grp] = l_run; }
    }
    __syncthreads();                                     // every warp's (m, l, o)

    // 3. the warps' results combined (pairs (d, d+1) of the block's G heads over its threads). One split:
    // normalise and write. Several: publish the split's partial (max, sum, output), into split 0's shared
    // memory when clustered (split 0 combines once every live split has arrived), else into global memory
    // (the last block to finish combines).
    if (clustered && nsplit > 1) cluster_wait();          // split 0 has started: its shared memory exists
#pragma unroll 1          // (one pass for most heads: unrolled, the kernel's code was 143 KB)
    for (int j = 0; j < ATT_MAXJ; ++j) {
        const int p = tid + j * ATT_THREADS;
        if (p < GD2) {
            const int g = p / (D / 2), dp = p % (D / 2);
            float M = NEG_INF;
#pragma unroll
            for (int w = 0; w < NW; ++w) M = fmaxf(M, m_s[w * G + g]);
            float L = 0.f, o0 = 0.f, o1 = 0.f;
#pragma unroll
            for (int w = 0; w < NW; ++w) {
                const float mw_ = m_s[w * G + g];
                if (mw_ != NEG_INF) {                        // a warp with no key left adds nothing
                    const float wgt = __expf(mw_ - M);
                    const float2 o = *reinterpret_cast<const float2*>(Ow + (w * G + g) * D + 2 * dp);
                    L = fmaf(wgt, l_s[w * G + g], L);
                    o0 = fmaf(wgt, o.x, o0);
                    o1 = fmaf(wgt, o.y, o1);
                }
            }
            const size_t hb = (size_t)b * H + kvh * G + g;
            if (nsplit == 1) {
                const float inv = 1.f / L;
                *reinterpret_cast<u32*>(out + hb * D + 2 * dp) = pack_bf2(o0 * inv, o1 * inv);
            } else if (clustered) {
                const float* po = cpo + ((size_t)g * NS + split) * D + 2 * dp;
                st_cluster(po, 0, o0);
                st_cluster(po + 1, 0, o1);
                if (dp == 0) {
                    st_cluster(cpml + ((size_t)g * NS + split) * 2, 0, M);
                    st_cluster(cpml + ((size_t)g * NS + split) * 2 + 1, 0, L);
                }
            } else {
                float* po = part_o + (hb * NS + split) * D + 2 * dp;
                po[0] = o0; po[1] = o1;
                if (dp == 0) { part_ml[(hb * NS + split) * 2] = M; part_ml[(hb * NS + split) * 2 + 1] = L; }
            }
        }
    }
    if (nsplit == 1) return;
    u16* out_h = out + ((size_t)b * H + kvh * G) * D;    // the block's first query head
    if (clustered) {
        cluster_arrive();                                 // release: this split's partial is in split 0's memory
        if (split != 0) return;
        cluster_wait();                                   // acquire: every live split's is
        attn_combine<D, false>(cpo, cpml, G, NS, nsplit, out_h);
        return;
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        const int prev = atomicAdd(counters + b * KVH + kvh, 1);
        is_last = (prev == nsplit - 1);
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    const size_t hb0 = (size_t)b * H + kvh * G;
    attn_combine<D, true>(part_o + hb0 * NS * D, part_ml + hb0 * NS * 2, G, NS, nsplit, out_h);
    if (tid == 0) counters[b * KVH + kvh] = 0;          // ready for the next launch
}

// Two kernels a head dim: decode_attention_d{D} (any G, the float32 tiles) and decode_attention_tc_d{D}
// (G <= ATT_TC_G, the tensor-core tiles; each its own kernel, so that neither holds the other's registers:
// one kernel with both loops took 188 at D 80, the tensor-core one alone 145; capped at 128 it was slower).
#define ATT_PARAMS                                                                                \
    const float *qkv, u16 *__restrict__ kc, u16 *__restrict__ vc, const int *__restrict__ lenp,   \
        const int *__restrict__ posp, const unsigned char *__restrict__ kmask,                    \
        const float *__restrict__ inv_freq, int rot, const float *__restrict__ qn_w,              \
        const float *__restrict__ kn_w, int qk_ln, float eps, float *__restrict__ part_o,         \
        float *__restrict__ part_ml, int *__restrict__ counters, u16 *__restrict__ out, int H,    \
        int KVH, int max_len, float scale, int split_tiles, int nbuf
#define ATT_ARGS                                                                                  \
    qkv, kc, vc, lenp, posp, kmask, inv_freq, rot, qn_w, kn_w, qk_ln, eps, part_o, part_ml, counters, out, H, \
        KVH, max_len, scale, split_tiles, nbuf
#define ATT_INST(D)                                                                                   \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS, 1) decode_attention_d##D(ATT_PARAMS) {  \
        attn_impl<D, false>(ATT_ARGS);                                                                \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS, 1) decode_attention_tc_d##D(ATT_PARAMS) {    \
        attn_impl<D, true>(ATT_ARGS);                                                                 \
    }
ATT_INST(64) ATT_INST(80) ATT_INST(96) ATT_INST(128) ATT_INST(160)

// ---------------------------------------------------------------- greedy argmax + step bookkeeping
// The (value, lowest index) maximum over a block, left in rv[0], ri[0] (rv, ri: 32 entries of shared
// memory); every thread returns with it. Ties go to the lower index, as numpy's argmax.
__device__ __forceinline__ void argmax_merge(float& best, int& idx, float ov, int oi) {
    if (ov > best || (ov == best && oi < idx)) { best = ov; idx = oi; }
}
__device__ __forceinline__ void warp_argmax(float& best, int& idx) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        argmax_merge(best, idx, __shfl_xor_sync(0xffffffffu, best, o), __shfl_xor_sync(0xffffffffu, idx, o));
}
__device__ __forceinline__ void block_argmax(float& best, int& idx, float* rv, int* ri) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    warp_argmax(best, idx);
    __syncthreads();                                  // rv, ri may still be read from an earlier call
    if (lane == 0) { rv[warp] = best; ri[warp] = idx; }
    __syncthreads();
    if (warp == 0) {
        best = lane < nw ? rv[lane] : NEG_INF;
        idx = lane < nw ? ri[lane] : 0x7fffffff;
        warp_argmax(best, idx);
        if (lane == 0) { rv[0] = best; ri[0] = idx; }
    }
    __syncthreads();
    best = rv[0];
    idx = ri[0];
}

// The step's bookkeeping once row b's token is chosen (one thread per row): tok, history[step, b], pos += 1;
// with a ring (generate's host memory, mapped: PICK_RING slots [3][ldh], slot step % PICK_RING), the token, the
// row's non-finite flag and the step number there too, so that the host reads them without a copy in the stream.
// One row: step and length advanced here; several: the last row to finish advances them (and resets the
// counter). Every load first (one round trip), then the stores.
#define PICK_RING 4
__device__ __forceinline__ void finish_row(int b, int idx, int bad_b, int* __restrict__ tok, int* __restrict__ history,
                                           int ldh, int max_steps, int* __restrict__ stepp,
                                           int* __restrict__ lenp, int* __restrict__ posp,
                                           int* __restrict__ counter, int rows, int* __restrict__ ring) {
    const int s = *stepp;
    const int p = posp[b];
    const int l = rows == 1 ? *lenp : 0;
    tok[b] = idx;
    if (s < max_steps) history[(size_t)s * ldh + b] = idx;
    posp[b] = p + 1;
    if (ring != nullptr) {
        int* slot = ring + (size_t)(s % PICK_RING) * 3 * ldh;
        slot[b] = idx;
        slot[ldh + b] = bad_b;
        slot[2 * ldh + b] = s;
    }
    if (rows == 1) {
        *stepp = s + 1;
        *lenp = l + 1;
        return;
    }
    __threadfence();
    const int prev = atomicAdd(counter, 1);
    if (prev == rows - 1) {
        *stepp = s + 1;
        *lenp += 1;
        *counter = 0;
    }
}

// grid (C, nb), block (ARGMAX_THREADS or fewer). Row b: tok[b] = argmax logits[b] (lowest index on ties),
// history[step, b] (row stride ldh), pos[b] += 1, bad[b] = 1 if any logit of the row is NaN or Inf (else 0), and
// generate's ring slot (finish_row); the last row to finish advances the step counter and the cache length.
// C = 1: one block reads the row. C > 1 (sm_90, launched as a cluster of the C blocks of a row): each block
// reads every C-th stretch of T float4, and the first combines the blocks' (max, index, flag) in its shared
// memory: the 200-400 KB of a row then come in over C SMs, not one (one block spent 5.4 us a step on it).
#define ARGMAX_THREADS 1024
#define ARGMAX_INFLIGHT 8
#define ARGMAX_MAX_CLUSTER 8
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)
argmax_step(const float* logits, int V, int* __restrict__ tok, int* __restrict__ history, int ldh,
            int max_steps, int* __restrict__ stepp, int* __restrict__ lenp, int* __restrict__ posp,
            int* __restrict__ counter, int* __restrict__ bad, int* __restrict__ ring) {
    __shared__ float rv[32];
    __shared__ int ri[32];
    __shared__ float cv[ARGMAX_MAX_CLUSTER];          // clustered: each block's (max, index, flag), in block 0's
    __shared__ int ci[ARGMAX_MAX_CLUSTER], cb[ARGMAX_MAX_CLUSTER];
    const int C = gridDim.x, rank = blockIdx.x;
    const bool clustered = C > 1 && cluster_size() == (u32)C && C <= ARGMAX_MAX_CLUSTER;
    if (C > 1 && !clustered) __trap();                // the blocks of a row could not combine
    PDL_LAUNCH();
    if (clustered) cluster_arrive_relaxed();          // "I run": block 0 may be written into once all have
    PDL_WAIT();
    const int b = blockIdx.y, tid = threadIdx.x, T = blockDim.x, first = rank * T + tid, stride = C * T;
    const float* row = logits + (size_t)b * V;
    float best = NEG_INF;
    int idx = 0x7fffffff;
    bool finite = true;
    if ((V & 3) == 0) {                             // float4 loads, ARGMAX_INFLIGHT in flight per thread
        const float4* row4 = reinterpret_cast<const float4*>(row);
        const int V4 = V >> 2;
        // Every load of a round issued before the first is compared (an unrolled loop of load-then-compare
        // kept one in flight: 13 dependent round trips to L2 over 50k logits).
        for (int k0 = first; k0 < V4; k0 += ARGMAX_INFLIGHT * stride) {
            float4 v[ARGMAX_INFLIGHT];
#pragma unroll
            for (int u = 0; u < ARGMAX_INFLIGHT; ++u)
                if (k0 + u * stride < V4) v[u] = row4[k0 + u * stride];
#pragma unroll
            for (int u = 0; u < ARGMAX_INFLIGHT; ++u) {
                const int k = k0 + u * stride;
                if (k < V4) {                             // k increases: first maximum per thread
                    if (v[u].x > best) { best = v[u].x; idx = 4 * k; }
                    if (v[u].y > best) { best = v[u].y; idx = 4 * k + 1; }
                    if (v[u].z > best) { best = v[u].z; idx = 4 * k + 2; }
                    if (v[u].w > best) { best = v[u].w; idx = 4 * k + 3; }
                    finite = finite && isfinite(v[u].x) && isfinite(v[u].y) && isfinite(v[u].z) && isfinite(v[u].w);
                }
            }
        }
    } else {
        for (int k = first; k < V; k += stride) {
            const float v = row[k];
            if (v > best) { best = v; idx = k; }
            finite = finite && isfinite(v);
        }
    }
    int any_bad = __syncthreads_or(!finite);
    block_argmax(best, idx, rv, ri);
    if (clustered) {
        cluster_wait();                               // every block has started: block 0's memory exists
        if (tid == 0) {
            st_cluster(cv + rank, 0, best);
            st_cluster_int(ci + rank, 0, idx);
            st_cluster_int(cb + rank, 0, any_bad);
        }
        cluster_arrive();                             // release: this block's result is in block 0's memory
        if (rank != 0) return;
        cluster_wait();                               // acquire: every block's is
        if (tid == 0)
            for (int r = 0; r < C; ++r) {
                argmax_merge(best, idx, cv[r], ci[r]);
                any_bad |= cb[r];
            }
    }
    if (tid == 0) {                                   // all NaN: emit token 0 rather than garbage
        if (bad != nullptr) bad[b] = any_bad;
        finish_row(b, idx == 0x7fffffff ? 0 : idx, any_bad, tok, history, ldh, max_steps, stepp, lenp, posp,
                   counter, (int)gridDim.y, ring);
    }
}

// ---------------------------------------------------------------- logits processing + sampling + bookkeeping
// generation.py's processors and sampler for row b, in transformers' order, on the step's float32 logits
// (in argmax_step's place in the graph when generate processes logits):
//   z_v = logits_v;  z_v = z_v < 0 ? z_v * penalty : z_v / penalty   where present[b, v] (penalty != 1)
//   do_sample = 0: tok = argmax z (lowest index on ties)
//   do_sample = 1: z /= temperature; top_k in [1, SAMPLE_KMAX]: keep z_v >= the k-th largest (ties kept,
//     at most SAMPLE_CMAX candidates); top_p < 1: sort the kept ascending (ties by index), drop those
//     whose cumulative probability (float32) is <= 1 - top_p, the most likely always kept;
//     or top_k = 0 with top_p = 1: every token. Then p = softmax(z) in float64, cdf in vocabulary order,
//     tok = the first index whose cdf > u_b * cdf_last, u_b = u[step, b] in [0, 1): the draws of every step
//     of a generate call, drawn at once by the host's generator and uploaded once, laid out like history
//     [max_steps, ldh]; the step reads its own row (the device step counter), so no host work a step.
// Then as argmax_step: history, pos, step and length; and present[b, tok] = 1 for the next step.
// Two ways: sample_step, one block per row, does it all (greedy with a penalty, top_k 0); with top_k in
// [1, SAMPLE_KMAX] the top-k search is spread over many blocks per row: sample_topk_partial (grid
// (ceil(V / SAMPLE_SLICE), nb)) keeps each slice's own top-k (ties kept) in a per-row union buffer, and
// sample_topk_merge (grid nb) selects the k-th largest of the union (every value of the row's top-k lies in
// its slice's top-k, so the threshold and the kept set are the row's), then top-p and the draw.
#define SAMPLE_THREADS 1024
#define SAMPLE_KMAX 1024
#define SAMPLE_CMAX 2048
#define SAMPLE_PART_THREADS 256
#define SAMPLE_PART_PER_THREAD 8
#define SAMPLE_SLICE (SAMPLE_PART_THREADS * SAMPLE_PART_PER_THREAD)     // logits per partial block

// This step's draw for row b: u[step, b] (the last row past the table's end).
__device__ __forceinline__ double step_draw(const double* __restrict__ u, int b, int ldh, int max_steps,
                                            const int* stepp) {
    return u[(size_t)min(*stepp, max_steps - 1) * ldh + b];
}

__device__ __forceinline__ float process_logit(float z, bool present, float penalty, int do_sample, float temperature) {
    if (present) z = z < 0.f ? z * penalty : z / penalty;
    return do_sample ? z / temperature : z;
}
__device__ __forceinline__ float processed_logit(const float* row, const unsigned char* pres, int v,
                                                 float penalty, int do_sample, float temperature) {
    return process_logit(row[v], pres != nullptr && pres[v], penalty, do_sample, temperature);
}

// f(v, logit, present) for v = first, first + stride, ... < end, in that order, SAMPLE_INFLIGHT at a time with
// all of a round's loads issued before the first f: a loop of load-then-use keeps one load in flight a thread
// (50 dependent round trips to L2 over a 50k vocabulary at 1024 threads, as argmax_step's loop had 13).
#define SAMPLE_INFLIGHT 8
template <typename F>
__device__ __forceinline__ void for_each_logit(const float* row, const unsigned char* pres, int first,
                                               int stride, int end, F f) {
    for (int v0 = first; v0 < end; v0 += SAMPLE_INFLIGHT * stride) {
        float x[SAMPLE_INFLIGHT];
        unsigned char pr[SAMPLE_INFLIGHT];
#pragma unroll
        for (int u = 0; u < SAMPLE_INFLIGHT; ++u) {
            const int v = v0 + u * stride;
            x[u] = v < end ? row[v] : 0.f;
            pr[u] = pres != nullptr && v < end ? pres[v] : 0;
        }
#pragma unroll
        for (int u = 0; u < SAMPLE_INFLIGHT; ++u)
            if (v0 + u * stride < end) f(v0 + u * stride, x[u], pr[u] != 0);
    }
}

__device__ __forceinline__ unsigned int order_key(float f) {     // a > b  <=>  key(a) > key(b)
    const unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// One round of a radix select, run by one whole warp: hist[d] counts the candidates whose current 8-bit digit
// is d. Returns the digit of the need-th largest candidate and lowers need by the count of larger digits.
__device__ __forceinline__ unsigned int radix_digit(const unsigned int* hist, int& need) {
    const int lane = threadIdx.x & 31;
    int c[8], s = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) { c[i] = (int)hist[255 - 8 * lane - i]; s += c[i]; }   // descending digits
    int incl = s;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
    }
    const int excl = incl - s;
    const unsigned int owner = __ballot_sync(0xffffffffu, excl < need && need <= incl);
    const int src = owner ? __ffs(owner) - 1 : 31;
    int d = 0, left = need;
    if (lane == src) {
        int acc = excl;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            if (acc + c[i] >= need) { d = 255 - 8 * lane - i; left = need - acc; break; }
            acc += c[i];
        }
    }
    need = __shfl_sync(0xffffffffu, left, src);
    return (unsigned int)__shfl_sync(0xffffffffu, d, src);
}

// The smallest key of the need largest among the n keys key_at(0..n-1) the block's threads hold (8 bits at a
// time; ties counted). need <= n.  hist: 256 shared counters; sh: 2 shared ints.
template <typename KeyAt>
__device__ unsigned int block_radix_select(KeyAt key_at, int n, int need, unsigned int* hist, int* sh) {
    unsigned int prefix = 0u, mask = 0u;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0u;
        __syncthreads();
        key_at([&](unsigned int key) {
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        });
        __syncthreads();
        if ((threadIdx.x >> 5) == 0) {
            const unsigned int d = radix_digit(hist, need);
            if (threadIdx.x == 0) { sh[0] = (int)d; sh[1] = need; }
        }
        __syncthreads();
        prefix |= (unsigned int)sh[0] << shift;
        need = sh[1];
        mask |= 0xFFu << shift;
        __syncthreads();                              // sh is written again in the next round
    }
    return prefix;
}

// (value, index) ascending, index breaking ties (numpy's stable argsort); n2 a power of two <= SAMPLE_CMAX
__device__ void bitonic_sort(float* val, int* idx, int n2, bool by_index) {
    for (int k = 2; k <= n2; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < n2; i += blockDim.x) {
                const int l = i ^ j;
                if (l > i) {
                    const bool up = (i & k) == 0;
                    const bool greater = by_index ? idx[i] > idx[l]
                                                  : (val[i] > val[l] || (val[i] == val[l] && idx[i] > idx[l]));
                    if (greater == up) {
                        const float tv = val[i]; val[i] = val[l]; val[l] = tv;
                        const int ti = idx[i]; idx[i] = idx[l]; idx[l] = ti;
                    }
                }
            }
            __syncthreads();
        }
    }
}

__device__ __forceinline__ double warp_scan_incl(double v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const double t = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += t;
    }
    return v;
}

// The top-k candidates cval/cidx[0, n) (shared, n <= SAMPLE_CMAX, any order) -> the draw: top-p over them
// sorted ascending (padding sorts first: -inf, and is never kept), then softmax in float64 (zmax: the row's
// largest processed logit) and the cdf in vocabulary order at u * total. Returns the pick (every thread),
// or fallback if nothing is kept.  s_pick: a shared int.
__device__ int draw_from_candidates(float* cval, int* cidx, int n, float top_p, double u, float zmax, int fallback,
                                    int* s_pick) {
    int n2 = 1;
    while (n2 < n) n2 <<= 1;
    for (int i = n + threadIdx.x; i < n2; i += blockDim.x) { cval[i] = NEG_INF; cidx[i] = 0x7fffffff; }
    __syncthreads();
    if (top_p < 1.f) {
        bitonic_sort(cval, cidx, n2, false);
        if (threadIdx.x == 0) {
            const float m = cval[n2 - 1];
            float s = 0.f;
            for (int i = n2 - n; i < n2; ++i) s += expf(cval[i] - m);
            float cum = 0.f;
            for (int i = n2 - n; i < n2 - 1; ++i) {
                cum += expf(cval[i] - m) / s;
                if (cum <= 1.f - top_p) cval[i] = NEG_INF;       // dropped: probability exactly 0 below
            }
        }
        __syncthreads();
    }
    bitonic_sort(cval, cidx, n2, true);
    if (threadIdx.x == 0) {
        double total = 0.0;
        int last = -1;
        for (int i = 0; i < n2; ++i)
            if (cval[i] != NEG_INF) { total += exp((double)cval[i] - (double)zmax); last = i; }
        const double target = u * total;
        double c = 0.0;
        int pick = last;
        for (int i = 0; i < n2; ++i) {
            if (cval[i] == NEG_INF) continue;
            c += exp((double)cval[i] - (double)zmax);
            if (c > target) { pick = i; break; }
        }
        *s_pick = pick >= 0 ? cidx[pick] : fallback;
    }
    __syncthreads();
    return *s_pick;
}

// grid (nb), block (SAMPLE_THREADS): every setting sampler_covers(), one block per row. bad[b] as argmax_step's
// (the raw logits).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_step(const float* logits, int V, unsigned char* __restrict__ present, float penalty,
            int do_sample, float temperature, int top_k, float top_p, const double* __restrict__ u,
            int* __restrict__ tok, int* __restrict__ history, int ldh, int max_steps, int* __restrict__ stepp,
            int* __restrict__ lenp, int* __restrict__ posp, int* __restrict__ counter, int* __restrict__ bad,
            int* __restrict__ ring) {
    __shared__ float cval[SAMPLE_CMAX];
    __shared__ int cidx[SAMPLE_CMAX];
    __shared__ unsigned int hist[256];
    __shared__ float rv[32];
    __shared__ int ri[32];
    __shared__ double rd[32];
    __shared__ int sh[2];
    __shared__ int s_n, s_choice;
    PDL_LAUNCH();
    PDL_WAIT();
    const int b = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    const float* row = logits + (size_t)b * V;
    unsigned char* pres = present != nullptr ? present + (size_t)b * V : nullptr;
    if (tid == 0) s_choice = -1;

    // the largest processed logit and its lowest index (greedy's choice; the full path's max)
    float zmax = NEG_INF;
    int bidx = 0x7fffffff;
    bool finite = true;
    for_each_logit(row, pres, tid, blockDim.x, V, [&](int v, float x, bool pr) {
        const float z = process_logit(x, pr, penalty, do_sample, temperature);
        if (z > zmax) { zmax = z; bidx = v; }
        finite = finite && isfinite(x);
    });
    const int any_bad = __syncthreads_or(!finite);
    if (tid == 0 && bad != nullptr) bad[b] = any_bad;
    block_argmax(zmax, bidx, rv, ri);
    if (bidx == 0x7fffffff) bidx = 0;
    if (!do_sample) {
        if (tid == 0) s_choice = bidx;
    } else if (top_k > 0 && top_k < V) {
        // the k-th largest key, then every z with a key >= it (at most SAMPLE_CMAX kept)
        auto each_key = [&](auto f) {
            for (int v = tid; v < V; v += blockDim.x)
                f(order_key(processed_logit(row, pres, v, penalty, 1, temperature)));
        };
        const unsigned int kth = block_radix_select(each_key, V, top_k, hist, sh);
        if (tid == 0) s_n = 0;
        __syncthreads();
        for (int v = tid; v < V; v += blockDim.x) {
            const float z = processed_logit(row, pres, v, penalty, 1, temperature);
            if (order_key(z) >= kth) {
                const int i = atomicAdd(&s_n, 1);
                if (i < SAMPLE_CMAX) { cval[i] = z; cidx[i] = v; }
            }
        }
        __syncthreads();
        const int pick = draw_from_candidates(cval, cidx, min(s_n, SAMPLE_CMAX), top_p,
                                              step_draw(u, b, ldh, max_steps, stepp), zmax, bidx, &s_n);
        if (tid == 0) s_choice = pick;
    } else {
        // every token (top_k 0, top_p 1): per-thread contiguous ranges keep the vocabulary order
        const int chunk = (V + blockDim.x - 1) / blockDim.x;
        const int v0 = min(V, tid * chunk), v1 = min(V, v0 + chunk);
        double local = 0.0;
        int last_pos = -1;
        for_each_logit(row, pres, v0, 1, v1, [&](int v, float x, bool pr) {
            const float z = process_logit(x, pr, penalty, 1, temperature);
            if (z != NEG_INF) { local += exp((double)z - (double)zmax); last_pos = v; }
        });
        const double incl = warp_scan_incl(local);
        if (lane == 31) rd[warp] = incl;
        __syncthreads();
        if (warp == 0) {
            const double w = lane < nw ? rd[lane] : 0.0;
            const double wi = warp_scan_incl(w);
            if (lane < nw) rd[lane] = wi - w;                    // exclusive prefix of the warps
        }
        __syncthreads();
        const double before = rd[warp] + incl - local;           // sum over every earlier range
        __shared__ double s_total;
        if (tid == blockDim.x - 1) s_total = before + local;
        __syncthreads();
        const double target = step_draw(u, b, ldh, max_steps, stepp) * s_total;
        if (before <= target && target < before + local) {       // exactly one range holds it
            double c = before;
            for (int v = v0; v < v1; ++v) {
                const float z = processed_logit(row, pres, v, penalty, 1, temperature);
                if (z == NEG_INF) continue;
                c += exp((double)z - (double)zmax);
                if (c > target) { s_choice = v; break; }
            }
        }
        // rounding guard (target at the very end): the last token of positive probability
        int lp = last_pos;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) lp = max(lp, __shfl_xor_sync(0xffffffffu, lp, o));
        if (lane == 0) ri[warp] = lp;
        __syncthreads();
        if (tid == 0 && s_choice < 0) {
            int m = -1;
            for (int w = 0; w < nw; ++w) m = max(m, ri[w]);
            s_choice = m >= 0 ? m : 0;
        }
    }
    __syncthreads();
    if (tid == 0) {
        const int idx = s_choice < 0 ? 0 : s_choice;
        if (pres != nullptr) pres[idx] = 1;
        finish_row(b, idx, any_bad, tok, history, ldh, max_steps, stepp, lenp, posp, counter, (int)gridDim.x, ring);
    }
}

// grid (ceil(V / SAMPLE_SLICE), nb), block (SAMPLE_PART_THREADS); do_sample with top_k in [1, SAMPLE_KMAX].
// Block p of row b: the processed logits of its slice [p * SAMPLE_SLICE, +SAMPLE_SLICE), held in registers;
// those with a key >= the slice's k-th largest (all of them if the slice has <= k) are appended to the row's
// union: cand_val/cand_idx[b, count[b] + i] (count[b] advanced by one atomic per block; the merge resets it).
// cand_bad[b] |= 1 where the slice holds a NaN or Inf logit (the merge passes it on to bad[b] and resets it).
extern "C" __global__ void __launch_bounds__(SAMPLE_PART_THREADS)
sample_topk_partial(const float* logits, int V, const unsigned char* __restrict__ present,
                    float penalty, float temperature, int top_k, float* __restrict__ cand_val,
                    int* __restrict__ cand_idx, int* __restrict__ cand_count, int* __restrict__ cand_bad, int ucap) {
    __shared__ unsigned int hist[256];
    __shared__ float lval[SAMPLE_SLICE];
    __shared__ int lidx[SAMPLE_SLICE];
    __shared__ int sh[2];
    __shared__ int s_n, s_base;
    PDL_LAUNCH();
    PDL_WAIT();
    const int p = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
    const float* row = logits + (size_t)b * V;
    const unsigned char* pres = present != nullptr ? present + (size_t)b * V : nullptr;
    const int v0 = p * SAMPLE_SLICE, n = min(SAMPLE_SLICE, V - v0);
    float z[SAMPLE_PART_PER_THREAD];
    unsigned char pr[SAMPLE_PART_PER_THREAD];
    bool finite = true;
#pragma unroll
    for (int i = 0; i < SAMPLE_PART_PER_THREAD; ++i) {          // every load first (for_each_logit's reason)
        const int j = tid + i * SAMPLE_PART_THREADS;
        z[i] = j < n ? row[v0 + j] : 0.f;
        pr[i] = pres != nullptr && j < n ? pres[v0 + j] : 0;
    }
#pragma unroll
    for (int i = 0; i < SAMPLE_PART_PER_THREAD; ++i) {
        const int j = tid + i * SAMPLE_PART_THREADS;
        finite = finite && (j >= n || isfinite(z[i]));
        z[i] = j < n ? process_logit(z[i], pr[i] != 0, penalty, 1, temperature) : 0.f;
    }
    if (__syncthreads_or(!finite) && tid == 0) atomicOr(cand_bad + b, 1);
    unsigned int kth = 0u;                                       // keep all: every key is >= 0
    if (n > top_k) {
        auto each_key = [&](auto f) {
#pragma unroll
            for (int i = 0; i < SAMPLE_PART_PER_THREAD; ++i)
                if (tid + i * SAMPLE_PART_THREADS < n) f(order_key(z[i]));
        };
        kth = block_radix_select(each_key, n, top_k, hist, sh);
    }
    if (tid == 0) s_n = 0;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < SAMPLE_PART_PER_THREAD; ++i) {
        const int j = tid + i * SAMPLE_PART_THREADS;
        if (j < n && order_key(z[i]) >= kth) {
            const int k = atomicAdd(&s_n, 1);                    // k < n <= SAMPLE_SLICE
            lval[k] = z[i];
            lidx[k] = v0 + j;
        }
    }
    __syncthreads();
    if (tid == 0) s_base = atomicAdd(cand_count + b, s_n);
    __syncthreads();
    for (int k = tid; k < s_n; k += SAMPLE_PART_THREADS) {
        const int at = s_base + k;                               // at < ucap: the union of every slice
        if (at < ucap) {
            cand_val[(size_t)b * ucap + at] = lval[k];
            cand_idx[(size_t)b * ucap + at] = lidx[k];
        }
    }
}

// grid (nb), block (SAMPLE_THREADS), after sample_topk_partial: the union's k-th largest, the kept
// candidates (at most SAMPLE_CMAX), top-p and the draw; the bookkeeping; bad[b] = cand_bad[b]; count[b] and
// cand_bad[b] back to 0.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_topk_merge(const float* cand_val, const int* cand_idx, int* __restrict__ cand_count,
                  int* __restrict__ cand_bad, int ucap, int top_k, float top_p, const double* __restrict__ u,
                  unsigned char* __restrict__ present, int V, int* __restrict__ tok, int* __restrict__ history,
                  int ldh, int max_steps, int* __restrict__ stepp, int* __restrict__ lenp, int* __restrict__ posp,
                  int* __restrict__ counter, int* __restrict__ bad, int* __restrict__ ring) {
    __shared__ float cval[SAMPLE_CMAX];
    __shared__ int cidx[SAMPLE_CMAX];
    __shared__ unsigned int hist[256];
    __shared__ float rv[32];
    __shared__ int ri[32];
    __shared__ int sh[2];
    __shared__ int s_n;
    PDL_LAUNCH();
    PDL_WAIT();
    const int b = blockIdx.x, tid = threadIdx.x;
    const int n = min(cand_count[b], ucap);
    const float* uv = cand_val + (size_t)b * ucap;
    const int* ui = cand_idx + (size_t)b * ucap;
    float zmax = NEG_INF;                                        // the row's largest: it is in the union
    int bidx = 0x7fffffff;
    for (int e = tid; e < n; e += blockDim.x) argmax_merge(zmax, bidx, uv[e], ui[e]);
    block_argmax(zmax, bidx, rv, ri);
    if (bidx == 0x7fffffff) bidx = 0;
    unsigned int kth = 0u;
    if (n > top_k) {
        auto each_key = [&](auto f) {
            for (int e = tid; e < n; e += blockDim.x) f(order_key(uv[e]));
        };
        kth = block_radix_select(each_key, n, top_k, hist, sh);
    }
    if (tid == 0) s_n = 0;
    __syncthreads();
    for (int e = tid; e < n; e += blockDim.x) {
        const float z = uv[e];
        if (order_key(z) >= kth) {
            const int i = atomicAdd(&s_n, 1);
            if (i < SAMPLE_CMAX) { cval[i] = z; cidx[i] = ui[e]; }
        }
    }
    __syncthreads();
    const int pick = draw_from_candidates(cval, cidx, min(s_n, SAMPLE_CMAX), top_p,
                                          step_draw(u, b, ldh, max_steps, stepp), zmax, bidx, &s_n);
    if (tid == 0) {
        cand_count[b] = 0;                                       // every thread read it (barriers since)
        const int row_bad = cand_bad[b];
        if (bad != nullptr) bad[b] = row_bad;
        cand_bad[b] = 0;
        if (present != nullptr) present[(size_t)b * V + pick] = 1;
        finish_row(b, pick, row_bad, tok, history, ldh, max_steps, stepp, lenp, posp, counter, (int)gridDim.x, ring);
    }
}
