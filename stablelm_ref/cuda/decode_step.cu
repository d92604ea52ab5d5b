// decode_step_b1_d{D}: a whole batch-1 decode step (every layer, the final LayerNorm, lm_head) in one persistent
// kernel, one block per SM (launched cooperatively, so that every block is resident: the grid barriers
// below need it). Compiled after decode.cu's helpers (bf16 bits, warp_sum / warp_max, the PDL macros):
// launch.step_source() puts decode.cu's text before the "embedding" section in front of this file.
//
// Weights stream continuously. Warp MK_NCW of each block (the producer) copies, in the step's order, this
// block's share of every weight matrix (layer 0 q|k|v rows, o_proj rows, gate|up rows, down rows, layer 1,
// ..., lm_head) into a ring of shared-memory slots: lane 0's 1D bulk copies (cp.async.bulk, completing on the
// slot's "full" mbarrier), or the warp's 16-byte cp.async (each lane arriving on it when its copies land): the
// ring's shape (slot size, pieces a tile, which copies) is the host's choice (decode_kernels.STEP_SHAPES). It
// waits for nothing but free slots (the "empty" mbarriers the consumer warps arrive on), so memory stays busy
// across the phase boundaries and during the attention. (Measured on an H200: the consumers, not the copies,
// are the limit: docs/cuda_decode_notes.md, tenth session.)
// The consumer warps 0..MK_NCW-1 run the phases of each layer, separated by grid barriers:
//   1. h = LN1(x) (every block computes it from the float32 residual x, two-pass float statistics as
//      layernorm_rows, rounded to bf16 into shared memory); qkv[rows] = h . Wqkv[rows] (+ bias)     [barrier]
//   2. attention, one query head a block (blocks without one go to the barrier): q/k LayerNorm per head,
//      rotary, the new k/v rounded to bf16 (written at cache[len] by the first query head of each kv head;
//      the other heads of a kv head compute them too, so nothing is read across blocks), softmax(q K^T) V
//      over keys [0, len] with the key mask; each consumer warp its own chunks of 32 keys (lane = key for
//      the scores, lane = pairs of dims for p V, a chunk's loads issued before their use; the block's cache
//      rows prefetched into L2 at the layer's start), the warps' (max, sum, output) combined -> att bf16
//                                                                                                  [barrier]
//   3. x[rows] += att . Wo[rows] (the sums kept in shared memory, x updated once after the phase's last tile)
//                                                             [barrier; none with a parallel residual]
//   4. h2 = LN2(x) (parallel residual: h of phase 1, kept); mlp[rows / 2] = silu(h2 . Wg) * (h2 . Wu), over
//      interleaved gate/up rows (a block's rows start at an even row)                                 [barrier]
//   5. x[rows] += mlp . Wd[rows]                                                                       [barrier]
// then LN_f(x) and logits[rows] = h . W_lm[rows]. Block b owns rows [N b / G, N (b + 1) / G) of every matrix
// (gate|up: split at even rows): one contiguous byte range, streamed as tiles of whole rows (at most
// MK_MAXTR rows, at most one slot). Each output row has one owner, so x += needs no atomics.
// The roundings are those of the many-kernel step (bf16 h, att, mlp; float32 x, qkv, logits): specs.py's
// functions specify it; only the order of the float32 sums differs.
// Memory model: activations written by other blocks in this launch (x, qkv, att, mlp) are read with ld.cg
// (L2), never through the non-coherent path; pointers to them carry no __restrict__. The grid barrier is a
// counter: fence, atomicAdd, spin with ld.acquire.gpu until it reaches blocks x barriers so far; the last
// block to finish sets it back to zero (sync[1] counts the finished blocks), ready for the next step.
#define MK_NCW 8                       // consumer warps
#define MK_NCT (MK_NCW * 32)           // consumer threads
#define MK_THREADS (MK_NCT + 32)       // + the producer warp
#define MK_MAXTR 16                    // rows a tile at most
#define MK_MAXSLOT 16                  // ring slots at most
#define MK_LNV 6                       // float4 of x a consumer thread holds in a LayerNorm: hidden <= 6144
#define MK_YSUM 256                    // rows of an add-GEMV a block at most (hidden / blocks)
#define MK_HEAD 2560                   // mbarriers (256 B), red (1 KB), scr (256 B), ysum (1 KB); then h, vec, ring
#define MK_PTRS 16                     // entries a layer in the pointer table
#define MODE_STORE 0                   // decode.cu's GEMV epilogues (its GEMV section is not compiled in)
#define MODE_ADD 1
#define MODE_SWIGLU 2
enum { P_WQKV, P_WO, P_WGU, P_WD, P_LN1W, P_LN1B, P_LN2W, P_LN2B, P_BQKV, P_QN, P_KN, P_KC, P_VC };

// Probe-only build (tools/step_timeline.py defines MK_TIMELINE; the shipped module never does): consumer thread 0
// of each block records %globaltimer at each phase's end and after each grid barrier, the producer when it has
// issued a layer's last copy: mk_tl[block][MK_TL_PROD + layer].
#ifdef MK_TIMELINE
#define MK_TL_BLOCKS 160
#define MK_TL_N 1024
#define MK_TL_PROD 768
__device__ u64 mk_tl[MK_TL_BLOCKS][MK_TL_N];
__device__ __forceinline__ void mk_mark(int i) {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    if (blockIdx.x < MK_TL_BLOCKS && i < MK_TL_N) mk_tl[blockIdx.x][i] = t;
}
#define MK_MARK(i) do { if (threadIdx.x == 0) mk_mark(i); } while (0)
#define MK_MARK_PROD(l) mk_mark(MK_TL_PROD + (l))
// time (ns) summed into mk_tl[block][i] from MK_T0(v) to MK_ADD(i, v), by one thread (i >= MK_TL_SUMS)
#define MK_TL_SUMS 1000
#define MK_T0(v) u64 v; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(v))
#define MK_ADD(i, v) do { u64 t_; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_)); \
    if (blockIdx.x < MK_TL_BLOCKS) mk_tl[blockIdx.x][i] += t_ - (v); } while (0)
#else
#define MK_MARK(i)
#define MK_MARK_PROD(l)
#define MK_T0(v)
#define MK_ADD(i, v)
#endif

__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(u64* b, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u64* b, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u64* b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(u64* b, unsigned parity) {
    unsigned done = 0;
    while (!done)
        asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     " selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(smem_u32(b)), "r"(parity) : "memory");
}
// bytes (a multiple of 16) from global src (16-byte aligned) into shared dst, completing on bar's tx count.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, u64* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(smem_u32(dst)), "l"(src), "r"(bytes), "r"(smem_u32(bar)) : "memory");
}
// Arrives on bar once this thread's cp.async copies so far have landed (counted in bar's expected arrivals).
__device__ __forceinline__ void cp_async_arrive(u64* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
// A barrier among the consumer warps only (the producer warp never joins one).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(MK_NCT) : "memory"); }

// Every block's consumers reach the barrier (their writes fenced) before any goes on.
__device__ __forceinline__ void grid_sync(unsigned* counter, unsigned target) {
    consumers_sync();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(counter, 1u);
        while (ld_acquire(counter) < target) {
        }
        __threadfence();
    }
    consumers_sync();
}

// Sum over the consumer threads (the same order in every block, so every block gets the same value).
__device__ __forceinline__ float consumer_sum(float v, float* scr) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    consumers_sync();                       // scr may still be read from the previous call
    if (lane == 0) scr[warp] = v;
    consumers_sync();
    return warp_sum(lane < MK_NCW ? scr[lane] : 0.f);
}

// h = bf16((x - mean) * rstd * w + b) into shared memory, layernorm_rows' arithmetic (K % 4 == 0,
// K <= 4 * MK_LNV * MK_NCT); x read from L2 (other blocks wrote it). The caller syncs before reading h.
__device__ __forceinline__ void mk_layernorm(const float* x, const float* __restrict__ w, const float* __restrict__ b,
                                             u16* h, int K, float eps, float* scr) {
    const int t = threadIdx.x, K4 = K >> 2;
    float4 v[MK_LNV], g[MK_LNV], o[MK_LNV];
#pragma unroll
    for (int i = 0; i < MK_LNV; ++i) {             // one round of loads: x, the weight, the bias
        const int j = t + i * MK_NCT;
        if (j < K4) {
            v[i] = __ldcg(reinterpret_cast<const float4*>(x) + j);
            g[i] = reinterpret_cast<const float4*>(w)[j];
            o[i] = reinterpret_cast<const float4*>(b)[j];
        }
    }
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < MK_LNV; ++i)
        if (t + i * MK_NCT < K4) s += (v[i].x + v[i].y) + (v[i].z + v[i].w);
    const float mean = consumer_sum(s, scr) / (float)K;
    float q = 0.f;
#pragma unroll
    for (int i = 0; i < MK_LNV; ++i)
        if (t + i * MK_NCT < K4) q += sq_dev4(v[i], mean);
    const float rstd = rsqrtf(consumer_sum(q, scr) / (float)K + eps);
#pragma unroll
    for (int i = 0; i < MK_LNV; ++i) {
        const int j = t + i * MK_NCT;
        if (j < K4) reinterpret_cast<uint2*>(h)[j] = ln_pack4(v[i], mean, rstd, g[i], o[i]);
    }
}

// K bf16 values (K % 8 == 0) from global (written by other blocks: L2) into shared memory.
__device__ __forceinline__ void mk_stage(u16* dst, const u16* src, int K) {
    for (int c = threadIdx.x; c < (K >> 3); c += MK_NCT)
        reinterpret_cast<uint4*>(dst)[c] = __ldcg(reinterpret_cast<const uint4*>(src) + c);
}

// This block's rows [r0, r1) of an N-row matrix, and its tile height (rows of K bf16 a slot holds, at most
// MK_MAXTR; pairs: gate|up, split and tiled at even rows). Producer and consumers walk the same tiles.
struct MkRows { int r0, r1, tr; };
__device__ __forceinline__ MkRows mk_rows(int N, int K, bool pairs, int slot_bytes) {
    const long long G = gridDim.x, b = blockIdx.x;
    MkRows m;
    if (pairs) {
        m.r0 = 2 * (int)((N / 2) * b / G);
        m.r1 = 2 * (int)((N / 2) * (b + 1) / G);
    } else {
        m.r0 = (int)(N * b / G);
        m.r1 = (int)(N * (b + 1) / G);
    }
    m.tr = min(MK_MAXTR, slot_bytes / (2 * K));
    if (pairs) m.tr &= ~1;
    return m;
}

struct MkRing {
    u64* full;
    u64* empty;
    unsigned char* slots;
    int nslot, slot_bytes;
    unsigned piece;                             // bytes a bulk copy at most (a multiple of 16)
    int lanes;                                  // 1: bulk copies by lane 0; 32: 16-byte cp.async by every lane
    unsigned it;                                // tiles so far (producer and consumers count the same)
};

// The producer: this block's rows of W [N, K] into the ring, tile by tile: one lane's bulk copies (lanes 1),
// or every lane's 16-byte cp.async copies, each lane arriving on the slot's mbarrier when its copies land.
__device__ __forceinline__ void mk_stream(MkRing& ring, const u16* __restrict__ W, int N, int K, bool pairs) {
    const MkRows m = mk_rows(N, K, pairs, ring.slot_bytes);
    for (int r = m.r0; r < m.r1; r += m.tr, ++ring.it) {
        const int n = min(m.tr, m.r1 - r), s = ring.it % ring.nslot;
        MK_T0(tw);
        if (ring.it >= (unsigned)ring.nslot) mbar_wait(ring.empty + s, ((ring.it / ring.nslot) - 1) & 1);
        if ((threadIdx.x & 31) == 0) MK_ADD(MK_TL_SUMS + 2, tw);
        const unsigned bytes = (unsigned)n * K * 2;
        const unsigned char* src = reinterpret_cast<const unsigned char*>(W + (size_t)r * K);
        unsigned char* dst = ring.slots + (size_t)s * ring.slot_bytes;
        if (ring.lanes == 1) {
            mbar_expect_tx(ring.full + s, bytes);
            for (unsigned off = 0; off < bytes; off += ring.piece)     // pieces of a tile: one mbarrier
                bulk_copy(dst + off, src + off, min(ring.piece, bytes - off), ring.full + s);
        } else {
            for (unsigned off = 16 * (threadIdx.x & 31); off < bytes; off += 16 * 32)
                cp_async16(dst + off, src + off, 16);
            cp_async_arrive(ring.full + s);
        }
    }
}

// The consumers: this block's rows of y = in . W^T, in shared memory [K] bf16, tile by tile from the ring.
// Each thread takes 16-byte chunks c = t, t + MK_NCT, ... of every row of the tile (float32, fmaf per
// element as gemv_impl); warp sums, then the warps' in red (two buffers, alternating by tile: one consumer
// barrier a tile); the tile's threads t < rows finish: store (+bias) / SwiGLU of (gate, up) / add: the sum
// kept in ysum (shared), and x[rows] += ysum once after the last tile (one L2 round trip a phase, not a tile).
__device__ __forceinline__ void mk_gemv(MkRing& ring, const u16* in, int N, int K, int mode, float* red,
                                        const float* __restrict__ bias, float* yf, u16* yh, float* ysum) {
    const bool pairs = mode == MODE_SWIGLU;
    const MkRows m = mk_rows(N, K, pairs, ring.slot_bytes);
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5, KC = K >> 3;
    const uint4* xs = reinterpret_cast<const uint4*>(in);
    for (int r = m.r0; r < m.r1; r += m.tr, ++ring.it) {
        const int n = min(m.tr, m.r1 - r), s = ring.it % ring.nslot;
        MK_T0(tw);
        mbar_wait(ring.full + s, (ring.it / ring.nslot) & 1);
        if (t == 0) MK_ADD(MK_TL_SUMS, tw);
        const uint4* wt = reinterpret_cast<const uint4*>(ring.slots + (size_t)s * ring.slot_bytes);
        float acc[MK_MAXTR];
#pragma unroll
        for (int i = 0; i < MK_MAXTR; ++i) acc[i] = 0.f;
        for (int c = t; c < KC; c += MK_NCT) {
            float xf[8];
            unpack8(xs[c], xf);
#pragma unroll
            for (int i = 0; i < MK_MAXTR; ++i)
                if (i < n) {
                    float wf[8];
                    unpack8(wt[i * KC + c], wf);
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[i] = fmaf(wf[e], xf[e], acc[i]);
                }
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(ring.empty + s);   // this warp is done with the slot
        float* rb = red + (ring.it & 1) * MK_NCW * MK_MAXTR;
#pragma unroll
        for (int i = 0; i < MK_MAXTR; ++i)
            if (i < n) {
                const float v = warp_sum(acc[i]);
                if (lane == 0) rb[warp * MK_MAXTR + i] = v;
            }
        consumers_sync();
        if (t < n) {
            float sum = 0.f;
            for (int w = 0; w < MK_NCW; ++w) sum += rb[w * MK_MAXTR + t];
            const int row = r + t;
            if (mode == MODE_STORE) {
                yf[row] = sum + (bias ? bias[row] : 0.f);
            } else if (mode == MODE_ADD) {
                ysum[row - m.r0] = sum;
            } else if ((t & 1) == 0) {                  // gate row; its up row is t + 1 (n is even)
                float u = 0.f;
                for (int w = 0; w < MK_NCW; ++w) u += rb[w * MK_MAXTR + t + 1];
                yh[row >> 1] = f2bf(sum / (1.f + __expf(-sum)) * u);
            }
        }
        if (t == 0) MK_ADD(MK_TL_SUMS + 1, tw);
    }
    if (mode == MODE_ADD) {
        consumers_sync();
        for (int i = t; i < m.r1 - m.r0; i += MK_NCT) yf[m.r0 + i] = __ldcg(yf + m.r0 + i) + ysum[i];
    }
}

// The K and V cache rows [0, len) of the query heads this block will take in the attention, fetched into
// L2 at the start of the layer (no kernel writes them during the step), so that phase 2 reads L2, not DRAM.
__device__ __forceinline__ void mk_prefetch_cache(const u16* kc, const u16* vc, int len, int H, int KVH, int D,
                                                  int max_len) {
    const int lines = (len * D * 2 + 127) / 128, G = H / KVH;
    for (int h = blockIdx.x; h < H; h += gridDim.x) {
        const size_t cb = (size_t)(h / G) * max_len * D;
        for (int i = threadIdx.x; i < lines; i += MK_NCT) {
            asm volatile("prefetch.global.L2 [%0];" ::"l"(kc + cb + (size_t)i * 64));
            asm volatile("prefetch.global.L2 [%0];" ::"l"(vc + cb + (size_t)i * 64));
        }
    }
}

// Phase 2: attention of the query heads blockIdx.x, blockIdx.x + G, ... (attn_impl's numerics, see above).
// scratch: shared memory for q, k (float), cos | sin, each warp's output and (max, sum), new k / v (bf16).
template <int D>
__device__ __forceinline__ void mk_attention(const float* qkv, u16* kc, u16* vc, int len, int pos,
                                             const unsigned char* __restrict__ kmask,
                                             const float* __restrict__ inv_freq, int rot,
                                             const float* __restrict__ qn, const float* __restrict__ kn, int qk_ln,
                                             float eps, float scale, u16* att, int H, int KVH, int max_len,
                                             unsigned char* scratch) {
    constexpr int DV = (D + 31) / 32;                   // dims a lane (LayerNorm of a head vector)
    constexpr int DP = (D / 2 + 31) / 32;               // pairs of dims a lane (p V)
    const int G = H / KVH, t = threadIdx.x, lane = t & 31, warp = t >> 5, half = rot >> 1, n = len + 1;
    float* qs = reinterpret_cast<float*>(scratch);      // [D]
    float* ks = qs + D;                                 // [D]
    float* rc = ks + D;                                 // [D]: cos [0, half), sin [half, rot)
    float* ow = rc + D;                                 // [MK_NCW][D]
    float* mls = ow + MK_NCW * D;                       // [MK_NCW][2]
    u16* knb = reinterpret_cast<u16*>(mls + 2 * MK_NCW);   // [D]
    u16* vnb = knb + D;                                 // [D]
    for (int h = blockIdx.x; h < H; h += gridDim.x) {
        const int j = h / G;
        for (int i = t; i < half; i += MK_NCT) {
            float sn, cs;
            sincosf((float)pos * inv_freq[i], &sn, &cs);
            rc[i] = cs;
            rc[half + i] = sn;
        }
        consumers_sync();                               // rc written; the previous head's reads are done
        if (warp < 3) {                                 // warp 0: q, 1: the new k, 2: the new v
            const bool isq = warp == 0, isk = warp == 1;
            const float* src = qkv + (isq ? (size_t)h * D : isk ? (size_t)(H + j) * D : (size_t)(H + KVH + j) * D);
            float v[DV];
#pragma unroll
            for (int i = 0; i < DV; ++i) {
                const int d = lane + 32 * i;
                v[i] = d < D ? __ldcg(src + d) : 0.f;
            }
            if (qk_ln && warp < 2) {
                const float* wln = isq ? qn + (size_t)h * D : kn + (size_t)j * D;
                float sum = 0.f;
#pragma unroll
                for (int i = 0; i < DV; ++i) sum += v[i];
                const float mean = warp_sum(sum) / (float)D;
                float var = 0.f;
#pragma unroll
                for (int i = 0; i < DV; ++i)
                    if (lane + 32 * i < D) { const float a = v[i] - mean; var += a * a; }
                const float rstd = rsqrtf(warp_sum(var) / (float)D + eps);
#pragma unroll
                for (int i = 0; i < DV; ++i)
                    if (lane + 32 * i < D) v[i] = (v[i] - mean) * rstd * wln[lane + 32 * i];
            }
            if (warp == 2) {
#pragma unroll
                for (int i = 0; i < DV; ++i)
                    if (lane + 32 * i < D) vnb[lane + 32 * i] = f2bf(v[i]);
            } else {
                float* dst = isq ? qs : ks;
#pragma unroll
                for (int i = 0; i < DV; ++i)
                    if (lane + 32 * i < D) dst[lane + 32 * i] = v[i];
                __syncwarp();
                for (int i = lane; i < half; i += 32) {
                    const float cs = rc[i], sn = rc[half + i], x1 = dst[i], x2 = dst[i + half];
                    dst[i] = x1 * cs - x2 * sn;             // x * cos + rotate_half(x) * sin
                    dst[i + half] = x2 * cs + x1 * sn;
                }
                __syncwarp();
                if (isq) {
                    for (int d = lane; d < D; d += 32) dst[d] *= scale;
                } else {
                    for (int d = lane; d < D; d += 32) knb[d] = f2bf(dst[d]);   // the cache holds bf16
                }
            }
        }
        consumers_sync();
        const size_t cb = (size_t)j * max_len * D;     // batch row 0 of this layer's cache, kv head j
        if (h % G == 0)
            for (int d = t; d < D; d += MK_NCT) {
                kc[cb + (size_t)len * D + d] = knb[d];
                vc[cb + (size_t)len * D + d] = vnb[d];
            }
        // keys [0, n): warp w takes chunks of 32 keys w, w + MK_NCW, ...; the new key is read from knb / vnb
        float m = NEG_INF, l = 0.f, o[2 * DP];         // o: dims (2j, 2j + 1), j = lane + 32 q
#pragma unroll
        for (int i = 0; i < 2 * DP; ++i) o[i] = 0.f;
        for (int c0 = warp * 32; c0 < n; c0 += MK_NCT) {
            const int tk = c0 + lane;
            const bool valid = tk < n && (tk == len || kmask[tk] != 0);
            const uint4* kr = tk == len ? reinterpret_cast<const uint4*>(knb)
                                        : reinterpret_cast<const uint4*>(kc + cb + (size_t)(tk < len ? tk : 0) * D);
            uint4 kv[D / 8];                            // the key's row: every load issued before use
#pragma unroll
            for (int c = 0; c < D / 8; ++c) kv[c] = kr[c];
            float s0 = 0.f, s1 = 0.f;                   // two chains
#pragma unroll
            for (int c = 0; c < D / 8; ++c) {
                float kf[8];
                unpack8(kv[c], kf);
#pragma unroll
                for (int e = 0; e < 8; e += 2) {
                    s0 = fmaf(qs[c * 8 + e], kf[e], s0);
                    s1 = fmaf(qs[c * 8 + e + 1], kf[e + 1], s1);
                }
            }
            const float s = valid ? s0 + s1 : NEG_INF;   // masked keys may hold anything, NaN included
            const float mn = fmaxf(m, warp_max(s));
            if (mn == NEG_INF) continue;                 // every key so far masked (the whole warp)
            const float p = valid ? __expf(s - mn) : 0.f;
            const float alpha = __expf(m - mn);          // 0 while m is -inf
            l = l * alpha + warp_sum(p);
#pragma unroll
            for (int i = 0; i < 2 * DP; ++i) o[i] *= alpha;
#pragma unroll
            for (int half = 0; half < 2; ++half) {      // p V: 16 keys' values loaded, then used
                u32 vb[16][DP];
#pragma unroll
                for (int kk = 0; kk < 16; ++kk) {
                    const int tv = c0 + 16 * half + kk;
                    const u16* row = tv == len ? vnb : vc + cb + (size_t)(tv < len ? tv : 0) * D;
                    const u32* vr = reinterpret_cast<const u32*>(row);
#pragma unroll
                    for (int q = 0; q < DP; ++q) vb[kk][q] = lane + 32 * q < D / 2 ? vr[lane + 32 * q] : 0u;
                }
#pragma unroll
                for (int kk = 0; kk < 16; ++kk) {
                    const float pk = __shfl_sync(0xffffffffu, p, 16 * half + kk);
#pragma unroll
                    for (int q = 0; q < DP; ++q) {           // masked keys (p == 0) skipped: NaN stays out
                        o[2 * q] = pk > 0.f ? fmaf(pk, bf_lo(vb[kk][q]), o[2 * q]) : o[2 * q];
                        o[2 * q + 1] = pk > 0.f ? fmaf(pk, bf_hi(vb[kk][q]), o[2 * q + 1]) : o[2 * q + 1];
                    }
                }
            }
            m = mn;
        }
        if (lane == 0) { mls[2 * warp] = m; mls[2 * warp + 1] = l; }
#pragma unroll
        for (int q = 0; q < DP; ++q)
            if (lane + 32 * q < D / 2) {
                ow[warp * D + 2 * (lane + 32 * q)] = o[2 * q];
                ow[warp * D + 2 * (lane + 32 * q) + 1] = o[2 * q + 1];
            }
        consumers_sync();
        for (int d = t; d < D; d += MK_NCT) {            // the warps' results combined
            float M = NEG_INF;
            for (int w = 0; w < MK_NCW; ++w) M = fmaxf(M, mls[2 * w]);
            float L = 0.f, O = 0.f;
            for (int w = 0; w < MK_NCW; ++w) {
                const float mw = mls[2 * w];
                if (mw != NEG_INF) {                     // a warp with no key adds nothing
                    const float wgt = __expf(mw - M);
                    L = fmaf(wgt, mls[2 * w + 1], L);
                    O = fmaf(wgt, ow[w * D + d], O);
                }
            }
            att[(size_t)h * D + d] = f2bf(O * (1.f / L));
        }
    }
}

template <int D>
__device__ __forceinline__ void mk_step(const u64* __restrict__ lp, int nlayers, const u16* __restrict__ lm,
                                        const float* __restrict__ nf_w, const float* __restrict__ nf_b, float* x,
                                        float* qkv, u16* att, u16* mlp, float* logits, const int* lenp,
                                        const int* posp, const unsigned char* __restrict__ kmask,
                                        const float* __restrict__ inv_freq, int rot, int hidden, int inter,
                                        int vocab, int H, int KVH, int max_len, float eps, float scale, int qk_ln,
                                        int parallel, unsigned* sync, int nslot, int slot_bytes, int vec_bytes,
                                        unsigned piece_bytes, int async_copies) {
    extern __shared__ __align__(128) unsigned char mk_smem[];
    MkRing ring;
    ring.full = reinterpret_cast<u64*>(mk_smem);
    ring.empty = ring.full + MK_MAXSLOT;
    float* red = reinterpret_cast<float*>(mk_smem + 256);            // [2][MK_NCW][MK_MAXTR]
    float* scr = red + 2 * MK_NCW * MK_MAXTR;                        // [64]
    float* ysum = scr + 64;                                          // [MK_YSUM]
    u16* hs = reinterpret_cast<u16*>(mk_smem + MK_HEAD);             // [hidden] LayerNorm output
    const int hs_bytes = ((2 * hidden + 127) / 128) * 128;
    unsigned char* vec = mk_smem + MK_HEAD + hs_bytes;               // att / mlp staged; attention scratch
    ring.slots = vec + vec_bytes;
    ring.nslot = nslot;
    ring.slot_bytes = slot_bytes;
    ring.piece = piece_bytes > 0 ? piece_bytes : slot_bytes;
    ring.lanes = async_copies ? 32 : 1;
    ring.it = 0;
    if (threadIdx.x == 0) {
        for (int s = 0; s < nslot; ++s) {
            mbar_init(ring.full + s, ring.lanes);
            mbar_init(ring.empty + s, MK_NCW);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    MK_MARK(0);
    const int QKV = (H + 2 * KVH) * D, HD = H * D;
    if (threadIdx.x >= MK_NCT) {                     // the producer warp: weights only, never waits on data
        if ((int)threadIdx.x - MK_NCT < ring.lanes) {
            for (int l = 0; l < nlayers; ++l) {
                const u64* p = lp + (size_t)l * MK_PTRS;
                mk_stream(ring, reinterpret_cast<const u16*>(p[P_WQKV]), QKV, hidden, false);
                mk_stream(ring, reinterpret_cast<const u16*>(p[P_WO]), hidden, HD, false);
                mk_stream(ring, reinterpret_cast<const u16*>(p[P_WGU]), 2 * inter, hidden, true);
                mk_stream(ring, reinterpret_cast<const u16*>(p[P_WD]), hidden, inter, false);
                MK_MARK_PROD(l);
            }
            mk_stream(ring, lm, vocab, hidden, false);
        }
        return;
    }
    asm volatile("griddepcontrol.wait;" ::: "memory");   // a no-op unless launched as a programmatic dependent
    const int len = *lenp, pos = *posp;
    unsigned phase = 0;
    const unsigned G = gridDim.x;
    u16* vs = reinterpret_cast<u16*>(vec);
    auto residual_add = [&](const u16* act, int K) {     // act [K] (from other blocks) staged, x[rows] += act . W
        mk_stage(vs, act, K);
        consumers_sync();
        mk_gemv(ring, vs, hidden, K, MODE_ADD, red, nullptr, x, nullptr, ysum);
    };
    for (int l = 0; l < nlayers; ++l) {
        const u64* p = lp + (size_t)l * MK_PTRS;
        auto f32p = [&](int k) { return reinterpret_cast<const float*>(p[k]); };
        const int mark = 1 + 12 * l;                 // (the probe build's MK_MARK indices)
        (void)mark;
        mk_prefetch_cache(reinterpret_cast<const u16*>(p[P_KC]), reinterpret_cast<const u16*>(p[P_VC]), len, H, KVH,
                          D, max_len);
        mk_layernorm(x, f32p(P_LN1W), f32p(P_LN1B), hs, hidden, eps, scr);
        consumers_sync();
        MK_MARK(mark);
        mk_gemv(ring, hs, QKV, hidden, MODE_STORE, red, f32p(P_BQKV), qkv, nullptr, ysum);
        MK_MARK(mark + 1);
        grid_sync(sync, ++phase * G);
        MK_MARK(mark + 2);
        mk_attention<D>(qkv, reinterpret_cast<u16*>(p[P_KC]), reinterpret_cast<u16*>(p[P_VC]), len, pos, kmask,
                        inv_freq, rot, f32p(P_QN), f32p(P_KN), qk_ln, eps, scale, att, H, KVH, max_len, vec);
        MK_MARK(mark + 3);
        grid_sync(sync, ++phase * G);
        MK_MARK(mark + 4);
        residual_add(att, HD);                       // x += att . Wo
        MK_MARK(mark + 5);
        if (!parallel) {                             // parallel: gate|up reads h = LN1(x), kept in hs
            grid_sync(sync, ++phase * G);
            MK_MARK(mark + 6);
            mk_layernorm(x, f32p(P_LN2W), f32p(P_LN2B), hs, hidden, eps, scr);
            consumers_sync();
        }
        MK_MARK(mark + 7);
        mk_gemv(ring, hs, 2 * inter, hidden, MODE_SWIGLU, red, nullptr, nullptr, mlp, ysum);
        MK_MARK(mark + 8);
        grid_sync(sync, ++phase * G);
        MK_MARK(mark + 9);
        residual_add(mlp, inter);                    // x += mlp . Wd
        MK_MARK(mark + 10);
        grid_sync(sync, ++phase * G);
        MK_MARK(mark + 11);
    }
    mk_layernorm(x, nf_w, nf_b, hs, hidden, eps, scr);
    consumers_sync();
    mk_gemv(ring, hs, vocab, hidden, MODE_STORE, red, nullptr, logits, nullptr, ysum);
    consumers_sync();
    MK_MARK(1 + 12 * nlayers);
    if (threadIdx.x == 0) {                          // the last block out sets the barrier back to zero
        __threadfence();
        if (atomicAdd(sync + 1, 1u) == G - 1) {
            atomicExch(sync, 0u);
            atomicExch(sync + 1, 0u);
        }
    }
}

#define MK_INST(D)                                                                                          \
    extern "C" __global__ void __launch_bounds__(MK_THREADS, 1) decode_step_b1_d##D(                        \
        const u64* __restrict__ lp, int nlayers, const u16* __restrict__ lm, const float* __restrict__ nf_w,  \
        const float* __restrict__ nf_b, float* x, float* qkv, u16* att, u16* mlp, float* logits,            \
        const int* lenp, const int* posp, const unsigned char* __restrict__ kmask,                         \
        const float* __restrict__ inv_freq, int rot, int hidden, int inter, int vocab, int H, int KVH,      \
        int max_len, float eps, float scale, int qk_ln, int parallel, unsigned* sync, int nslot,           \
        int slot_bytes, int vec_bytes, unsigned piece_bytes, int async_copies) {                            \
        mk_step<D>(lp, nlayers, lm, nf_w, nf_b, x, qkv, att, mlp, logits, lenp, posp, kmask, inv_freq, rot, \
                   hidden, inter, vocab, H, KVH, max_len, eps, scale, qk_ln, parallel, sync, nslot,         \
                   slot_bytes, vec_bytes, piece_bytes, async_copies);                                       \
    }
MK_INST(64) MK_INST(80) MK_INST(96) MK_INST(128) MK_INST(160)
