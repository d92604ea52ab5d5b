// decode_step_b1_d{D}: a whole batch-1 decode step (every layer, the final LayerNorm, lm_head) in one persistent
// kernel, one block per SM (launched cooperatively, so that every block is resident: the grid barriers
// below need it). Compiled after decode.cu's helpers (bf16 bits, warp_sum / warp_max, the register LayerNorm,
// the PDL macros): launch.step_source() puts decode.cu's text before the "embedding" section in front of this file.
//
// Every warp works alone inside a phase. Warp w of block b is warp gw = b MK_NW + w of the grid's GW and owns
// rows [N gw / GW, N (gw + 1) / GW) of every weight matrix (gate|up: split at even rows). It streams them
// itself: its lane 0 copies tiles (MK_R rows x a segment of K, one 1D bulk copy a row segment, or one for whole
// rows: cp.async.bulk completing on the slot's "full" mbarrier; or, the host's choice, its 32 lanes' 16-byte
// cp.async, each arriving on that mbarrier when its copies land) into the warp's own ring of shared-memory slots,
// in the step's order (layer 0 q|k|v, o_proj, gate|up, down, layer 1, ..., lm_head), and refills a slot as soon
// as it has read it, with the next tile of that order: the tiles of the next phase are in flight before the
// grid barrier, since weights never depend on activations. Each lane takes the 16-byte chunks c with c mod 32 =
// lane of every row (the order of a row's float32 sum does not depend on the segments), MK_R accumulators sharing
// each load of the input vector (shared memory); at a row group's end one transposing butterfly leaves row i's
// sum in lanes [i 32 / MK_R, (i + 1) 32 / MK_R) (the same additions as warp_sum), and those lanes store it
// (+bias), add it to x, or take SwiGLU of an interleaved (gate, up) pair. No warp waits for another except at
// the block's barriers between phases (the LayerNorms' block sums, att and mlp staged in shared memory) and the
// grid barriers.
// The phases of each layer, separated by grid barriers:
//   1. h = LN1(x) (every block computes it from the float32 residual x, two-pass float statistics as
//      layernorm_rows, rounded to bf16 into shared memory); qkv[rows] = h . Wqkv[rows] (+ bias)     [barrier]
//   2. attention, spread over the grid: query head h's keys [0, len] split into P parts of whole 32-key chunks
//      (P <= pmax, as many as the keys need), part p of head h taken by one warp (item h P + p: block
//      item % gridDim.x, warp item / gridDim.x, one of the block's first MK_AW). It computes q (q/k LayerNorm
//      per head, rotary, scale) itself; the part that holds key len also the new k / v (rounded to bf16; written
//      at cache[len] by the first query head of each kv head); lane = key for the scores, lane = pairs of dims
//      for p V; its (max, sum, output) go to part_ml / part_o (float32, L2)                           [barrier]
//   3. att = the parts combined (every block, into shared memory, rounded to bf16);
//      x[rows] += att . Wo[rows]                              [barrier; none with a parallel residual]
//   4. h2 = LN2(x) (parallel residual: h of phase 1, kept); mlp[rows / 2] = silu(h2 . Wg) * (h2 . Wu), over
//      interleaved gate/up rows                                                                       [barrier]
//   5. x[rows] += mlp . Wd[rows]                                                                       [barrier]
// then LN_f(x) and logits[rows] = h . W_lm[rows]. Each output row has one owner, so x += needs no atomics.
// The roundings are those of the many-kernel step (bf16 h, att, mlp; float32 x, qkv, logits): specs.py's
// functions specify it; only the order of the float32 sums differs.
// Memory model: activations written by other blocks in this launch (x, qkv, the attention's parts, mlp) are
// read with ld.cg (L2), never through the non-coherent path; pointers to them carry no __restrict__. The grid
// barrier is a counter: fence, atomicAdd, spin with ld.acquire.gpu until it reaches blocks x barriers so far;
// the last block to finish sets it back to zero (sync[1] counts the finished blocks), ready for the next step.
#define MK_NW 16                       // warps a block
#define MK_NT (MK_NW * 32)             // threads a block
#define MK_R 4                         // rows a group (accumulators a lane; even: gate|up pairs)
#define MK_SEG 256                     // a segment of K is a multiple of this many bf16 (32 lanes x 8)
#define MK_MAXSLOT 6                   // ring slots a warp at most
#define MK_AW 2                        // warps a block that take attention parts at most (their scratch)
#define MK_ATT_SCRATCH(D) (144 * (D))  // bytes of a part's scratch: q, k, cos | sin (float), new k / v, 32 keys, values
#define MK_PMAX 8                      // attention parts a head at most
#define MK_LNV 3                       // float4 of x a thread holds in a LayerNorm: hidden <= 4 * 3 * 512
#define MK_HEAD 1024                   // mbarriers (MK_NW x MK_MAXSLOT x 8 B), scr (256 B); then h, vec, rings
#define MK_PTRS 16                     // entries a layer in the pointer table
#define MODE_STORE 0                   // decode.cu's GEMV epilogues (its GEMV section is not compiled in)
#define MODE_ADD 1
#define MODE_SWIGLU 2
enum { P_WQKV, P_WO, P_WGU, P_WD, P_LN1W, P_LN1B, P_LN2W, P_LN2B, P_BQKV, P_QN, P_KN, P_KC, P_VC };

// Probe hooks, empty here: a probe build may define them before this file (tools/step_timeline.cuh: thread 0
// of each block marks the phases' ends and sums its waits); the shipped module never does.
#if !defined(MK_MARK)
#define MK_MARK(i)
#define MK_T0(v)
#define MK_ADD(i, v)
#define MK_ZERO()
#define MK_FLUSH()
#endif

__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(u64* b, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u64* b, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
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
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Every block reaches the barrier (its writes fenced) before any goes on.
__device__ __forceinline__ void grid_sync(unsigned* counter, unsigned target) {
    __syncthreads();
    if (threadIdx.x == 0) {
        MK_T0(tb);
        __threadfence();
        atomicAdd(counter, 1u);
        while (ld_acquire(counter) < target) {
        }
        __threadfence();
        MK_ADD(2, tb);
    }
    __syncthreads();
}

// h = bf16(LayerNorm(x)) into shared memory (K % 4 == 0, K <= 4 * MK_LNV * MK_NT); x read from L2 (other
// blocks wrote it). The caller syncs before reading h.
__device__ __forceinline__ void mk_layernorm(const float* x, const float* __restrict__ w, const float* __restrict__ b,
                                             u16* h, int K, float eps, float* scr) {
    const int t = threadIdx.x, K4 = K >> 2;
    float4 v[MK_LNV], g[MK_LNV], o[MK_LNV];
#pragma unroll
    for (int i = 0; i < MK_LNV; ++i) {             // one round of loads: x, the weight, the bias
        const int j = t + i * MK_NT;
        if (j < K4) {
            v[i] = __ldcg(reinterpret_cast<const float4*>(x) + j);
            g[i] = reinterpret_cast<const float4*>(w)[j];
            o[i] = reinterpret_cast<const float4*>(b)[j];
        }
    }
    ln_regs(v, g, o, t, MK_NT, K4, eps, [&](float a) { return block_sum(a, scr); }, reinterpret_cast<uint2*>(h));
}

// K bf16 values (K % 8 == 0) from global (written by other blocks: L2) into shared memory.
__device__ __forceinline__ void mk_stage(u16* dst, const u16* src, int K) {
    for (int c = threadIdx.x; c < (K >> 3); c += MK_NT)
        reinterpret_cast<uint4*>(dst)[c] = __ldcg(reinterpret_cast<const uint4*>(src) + c);
}

// The step's matrices in streaming order: m = 4 l + (0 q|k|v, 1 o_proj, 2 gate|up, 3 down), m = 4 L lm_head.
struct MkDims {
    const u64* lp;
    const u16* lm;
    int L, hidden, inter, vocab, QKV, HD;
};
struct MkMat { const u16* W; int N, K; bool pairs; };
__device__ __forceinline__ MkMat mk_mat(const MkDims& d, int m) {
    if (m == 4 * d.L) return {d.lm, d.vocab, d.hidden, false};
    const u64* p = d.lp + (size_t)(m >> 2) * MK_PTRS;
    switch (m & 3) {
        case 0: return {reinterpret_cast<const u16*>(p[P_WQKV]), d.QKV, d.hidden, false};
        case 1: return {reinterpret_cast<const u16*>(p[P_WO]), d.hidden, d.HD, false};
        case 2: return {reinterpret_cast<const u16*>(p[P_WGU]), 2 * d.inter, d.hidden, true};
        default: return {reinterpret_cast<const u16*>(p[P_WD]), d.hidden, d.inter, false};
    }
}

// A warp's walk over its tiles: matrix m, its row group [r, r + MK_R) within the warp's rows [r, r1), the
// segment [k0, k0 + seg) of K. The issuing lane and the computing warp each keep one (the same walk).
struct MkCursor {
    int m, r, r1, k0, K, seg;
    const u16* W;
};
// A group's segment: a multiple of MK_SEG bf16 that fits its n rows in a slot, or all of K.
__device__ __forceinline__ int mk_seg(int n, int K, int slot_bytes) {
    const int fit = slot_bytes / (2 * n) / MK_SEG * MK_SEG;
    return fit >= K ? K : fit;
}
// Position c at the first tile of matrix m or, where this warp has no rows of it, of a later one (m = 4 L + 1:
// the walk is over).
__device__ __forceinline__ void mk_enter(MkCursor& c, const MkDims& d, int m, int slot_bytes) {
    const long long GW = (long long)gridDim.x * MK_NW, gw = (long long)blockIdx.x * MK_NW + (threadIdx.x >> 5);
    for (; m <= 4 * d.L; ++m) {
        const MkMat a = mk_mat(d, m);
        int r0, r1;
        if (a.pairs) {
            r0 = 2 * (int)((a.N / 2) * gw / GW);
            r1 = 2 * (int)((a.N / 2) * (gw + 1) / GW);
        } else {
            r0 = (int)(a.N * gw / GW);
            r1 = (int)(a.N * (gw + 1) / GW);
        }
        if (r0 < r1) {
            c = {m, r0, r1, 0, a.K, mk_seg(min(MK_R, r1 - r0), a.K, slot_bytes), a.W};
            return;
        }
    }
    c.m = 4 * d.L + 1;
}
__device__ __forceinline__ void mk_advance(MkCursor& c, const MkDims& d, int slot_bytes) {
    c.k0 += c.seg;
    if (c.k0 < c.K) return;
    c.k0 = 0;
    c.r += MK_R;
    if (c.r >= c.r1) mk_enter(c, d, c.m + 1, slot_bytes);
    else c.seg = mk_seg(min(MK_R, c.r1 - c.r), c.K, slot_bytes);
}

struct MkRing {
    u64* full;                                  // this warp's nslot mbarriers
    unsigned char* slots;                       // this warp's nslot slots
    int nslot, slot_bytes;
    int lanes;                                  // 1: lane 0's bulk copies; 32: every lane's 16-byte cp.async
    unsigned it;                                // tiles consumed so far by this warp
    MkCursor issue;                             // the next tile to copy
};

// The issue cursor's tile into slot s, then the cursor to the tile after it (nothing once the walk is over):
// lane 0's bulk copies (ring.lanes 1), or every lane's 16-byte cp.async, each lane arriving on the slot's
// mbarrier when its copies have landed (ring.lanes 32: every lane calls this).
__device__ __forceinline__ void mk_issue(MkRing& ring, const MkDims& d, int s) {
    MkCursor& c = ring.issue;
    if (c.m > 4 * d.L) return;
    const int n = min(MK_R, c.r1 - c.r), len = min(c.seg, c.K - c.k0);
    unsigned char* dst = ring.slots + (size_t)s * ring.slot_bytes;
    if (ring.lanes == 32) {
        for (int i = 0; i < n; ++i)
            for (int q = threadIdx.x & 31; q < (len >> 3); q += 32)
                cp_async16(dst + ((size_t)i * len + 8 * q) * 2, c.W + (size_t)(c.r + i) * c.K + c.k0 + 8 * q, 16);
        asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_u32(ring.full + s)) : "memory");
        mk_advance(c, d, ring.slot_bytes);
        return;
    }
    mbar_expect_tx(ring.full + s, (unsigned)(n * len * 2));
    if (len == c.K)                             // whole rows: one contiguous copy
        bulk_copy(dst, c.W + (size_t)c.r * c.K, (unsigned)(n * len * 2), ring.full + s);
    else
        for (int i = 0; i < n; ++i)
            bulk_copy(dst + (size_t)i * len * 2, c.W + (size_t)(c.r + i) * c.K + c.k0, (unsigned)(len * 2),
                      ring.full + s);
    mk_advance(c, d, ring.slot_bytes);
}

// Row i of a group's sums left in lanes [i 32 / MK_R, (i + 1) 32 / MK_R): a transposing butterfly (at each of the
// first log2(MK_R) levels a lane keeps half of its rows and adds its partner's copy of them), then the plain
// one; every row's sum takes warp_sum's additions (xor 16, 8, 4, 2, 1), so the same bits.
__device__ __forceinline__ float mk_group_sum(float (&acc)[MK_R], int lane) {
#pragma unroll
    for (int half = MK_R / 2, off = 16; half >= 1; half >>= 1, off >>= 1) {
        const bool hi = (lane & off) != 0;
#pragma unroll
        for (int i = 0; i < half; ++i) {
            const float send = hi ? acc[i] : acc[i + half], keep = hi ? acc[i + half] : acc[i];
            acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
        }
    }
    float v = acc[0];
#pragma unroll
    for (int off = 16 / MK_R; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// This warp's rows of matrix m (none where its walk has passed m): y = in . W^T, in: shared memory [K] bf16
// (16-byte loads), W's tiles from the warp's ring (each slot refilled with the walk's next tile right after it is
// read). Epilogues as decode.cu's gemv_epilogue: store (+bias) into yf, add into yf (the residual x; its old value
// loaded at the group's start), SwiGLU of (gate, up) rows into yh.
__device__ __forceinline__ void mk_gemv(MkRing& ring, MkCursor& c, const MkDims& d, int m, const u16* in, int mode,
                                        const float* __restrict__ bias, float* yf, u16* yh) {
    const int lane = threadIdx.x & 31, owner = lane / (32 / MK_R);
    const bool lead = lane % (32 / MK_R) == 0;
    const uint4* xs = reinterpret_cast<const uint4*>(in);
    float acc[MK_R], old = 0.f;
    while (c.m == m) {
        const int n = min(MK_R, c.r1 - c.r), len = min(c.seg, c.K - c.k0), s = ring.it % ring.nslot;
        if (c.k0 == 0) {
#pragma unroll
            for (int i = 0; i < MK_R; ++i) acc[i] = 0.f;
            if (mode == MODE_ADD && lead && owner < n) old = __ldcg(yf + c.r + owner);
        }
        MK_T0(tw);
        mbar_wait(ring.full + s, (ring.it / ring.nslot) & 1);
        MK_ADD(0, tw);
        MK_T0(tt);
        const uint4* wt = reinterpret_cast<const uint4*>(ring.slots + (size_t)s * ring.slot_bytes);
        const int lc = len >> 3, c0 = c.k0 >> 3;
        for (int j = lane; j < lc; j += 32) {
            float xf[8];
            unpack8(xs[c0 + j], xf);
#pragma unroll
            for (int i = 0; i < MK_R; ++i)
                if (i < n) {
                    float wf[8];
                    unpack8(wt[i * lc + j], wf);
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[i] = fmaf(wf[e], xf[e], acc[i]);
                }
        }
        __syncwarp();                                   // every lane has read the slot: refill it
        MK_T0(ti);
        if (lane < ring.lanes) mk_issue(ring, d, s);
        MK_ADD(3, ti);
        __syncwarp();
        ++ring.it;
        if (c.k0 + len >= c.K) {                        // the group's last segment: its epilogue
            const float v = mk_group_sum(acc, lane);
            const int row = c.r + owner;
            if (mode == MODE_SWIGLU) {
                const float u = __shfl_down_sync(0xffffffffu, v, 32 / MK_R);   // the up row's sum
                if (lead && owner < n && (owner & 1) == 0) yh[row >> 1] = f2bf(v / (1.f + __expf(-v)) * u);
            } else if (lead && owner < n) {
                yf[row] = mode == MODE_ADD ? old + v : v + (bias ? bias[row] : 0.f);
            }
        }
        MK_ADD(1, tt);
        mk_advance(c, d, ring.slot_bytes);
    }
}

// How many parts the attention's keys [0, n) split into: whole 32-key chunks, at most pmax parts.
__device__ __forceinline__ int mk_parts(int n, int pmax) { return min((n + 31) >> 5, pmax); }

// The K and V cache rows [0, len) of this block's attention parts, fetched into L2 at the start of the layer (no
// kernel writes them during the step), so that phase 2 reads L2, not DRAM.
__device__ __forceinline__ void mk_prefetch_cache(const u16* kc, const u16* vc, int len, int H, int KVH, int D,
                                                  int max_len, int pmax) {
    const int n = len + 1, P = mk_parts(n, pmax), nc = (n + 31) >> 5, G = H / KVH;
    for (int item = blockIdx.x; item < H * P; item += gridDim.x) {
        const int h = item / P, p = item % P;
        const int k0 = 32 * (nc * p / P), k1 = min(len, 32 * (nc * (p + 1) / P));
        const size_t cb = (size_t)(h / G) * max_len * D;
        const int lo = (k0 * D * 2) / 128, hi = (k1 * D * 2 + 127) / 128;
        for (int i = lo + threadIdx.x; i < hi; i += MK_NT) {
            asm volatile("prefetch.global.L2 [%0];" ::"l"(kc + cb + (size_t)i * 64));
            asm volatile("prefetch.global.L2 [%0];" ::"l"(vc + cb + (size_t)i * 64));
        }
    }
}

// A head vector of qkv (float32, from L2) into registers: lane + 32 i.
template <int D>
__device__ __forceinline__ void mk_head_load(const float* src, float (&v)[(D + 31) / 32]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < (D + 31) / 32; ++i) v[i] = lane + 32 * i < D ? __ldcg(src + lane + 32 * i) : 0.f;
}
// ... into dst (shared, float32), with the head's LayerNorm of weight wln where wln is not null
// (decode.cu's head_layernorm).
template <int D>
__device__ __forceinline__ void mk_head_vec(float (&v)[(D + 31) / 32], const float* __restrict__ wln, float eps,
                                            float* dst) {
    constexpr int DV = (D + 31) / 32;
    const int lane = threadIdx.x & 31;
    if (wln != nullptr) head_layernorm<D>(v, wln, eps);
#pragma unroll
    for (int i = 0; i < DV; ++i)
        if (lane + 32 * i < D) dst[lane + 32 * i] = v[i];
    __syncwarp();
}

// Phase 2, one part: query head h, keys [32 (nc p / P), min(n, 32 (nc (p + 1) / P))) by this warp alone
// (attn_impl's numerics). scratch (MK_ATT_SCRATCH(D) bytes): this warp's q, k (float), cos | sin, new k / v (bf16),
// then a chunk's 32 cached keys and values (bf16), copied with cp.async (rows >= len zero-filled: nothing read)
// while q is prepared. Its (max, sum) go to part_ml[h, p], its unnormalised output to part_o[h, p, :] (ns parts
// a head in those buffers).
template <int D>
__device__ __forceinline__ void mk_attention_part(int h, int p, int P, const float* qkv, u16* kc, u16* vc, int len,
                                                  int pos, const unsigned char* __restrict__ kmask,
                                                  const float* __restrict__ inv_freq, int rot,
                                                  const float* __restrict__ qn, const float* __restrict__ kn,
                                                  float eps, float scale, int H, int KVH, int max_len,
                                                  float* part_o, float* part_ml, int ns, unsigned char* scratch) {
    constexpr int DP = (D / 2 + 31) / 32;               // pairs of dims a lane (p V)
    constexpr int DV = (D + 31) / 32;                   // dims a lane (q, k, v)
    const int G = H / KVH, j = h / G, lane = threadIdx.x & 31, half = rot >> 1, n = len + 1, nc = (n + 31) >> 5;
    const int c_lo = nc * p / P, c_hi = nc * (p + 1) / P;
    const bool has_new = 32 * c_hi >= n;                // this part holds key len, the new one
    float* qs = reinterpret_cast<float*>(scratch);      // [D]
    float* ks = qs + D;                                 // [D]
    float* rc = ks + D;                                 // [D]: cos [0, half), sin [half, rot)
    u16* knb = reinterpret_cast<u16*>(rc + D);          // [D]
    u16* vnb = knb + D;                                 // [D]
    u16* kt = vnb + D;                                  // [32][D]: the chunk's keys
    u16* vt = kt + 32 * D;                              // [32][D]: its values
    const size_t cb = (size_t)j * max_len * D;          // batch row 0 of this layer's cache, kv head j
    auto stage_chunk = [&](int c0) {
        for (int q = lane; q < 4 * D; q += 32) {        // 32 rows x D / 8 pieces of 16 bytes
            const int r = q / (D / 8), c = q - r * (D / 8);
            const bool cached = c0 + r < len;
            const size_t off = cb + (size_t)(cached ? c0 + r : 0) * D + 8 * c;
            cp_async16(kt + r * D + 8 * c, kc + off, cached ? 16 : 0);
            cp_async16(vt + r * D + 8 * c, vc + off, cached ? 16 : 0);
        }
        cp_async_commit();
    };
    stage_chunk(32 * c_lo);                             // the first chunk, q, the new k / v: one round of loads
    float qv[DV], kv_new[DV], vv_new[DV];
    mk_head_load<D>(qkv + (size_t)h * D, qv);
    if (has_new) {
        mk_head_load<D>(qkv + (size_t)(H + j) * D, kv_new);
        mk_head_load<D>(qkv + (size_t)(H + KVH + j) * D, vv_new);
    }
    for (int i = lane; i < half; i += 32) {
        float sn, cs;
        sincosf((float)pos * inv_freq[i], &sn, &cs);
        rc[i] = cs;
        rc[half + i] = sn;
    }
    mk_head_vec<D>(qv, qn ? qn + (size_t)h * D : nullptr, eps, qs);
    rotate_half_smem(qs, rc, half);
    for (int d = lane; d < D; d += 32) qs[d] *= scale;
    if (has_new) {
        mk_head_vec<D>(kv_new, kn ? kn + (size_t)j * D : nullptr, eps, ks);
        rotate_half_smem(ks, rc, half);
#pragma unroll
        for (int i = 0; i < DV; ++i)
            if (lane + 32 * i < D) {
                knb[lane + 32 * i] = f2bf(ks[lane + 32 * i]);   // the cache holds bf16
                vnb[lane + 32 * i] = f2bf(vv_new[i]);
            }
        __syncwarp();
        if (h % G == 0)
            for (int d = lane; d < D; d += 32) {
                kc[cb + (size_t)len * D + d] = knb[d];
                vc[cb + (size_t)len * D + d] = vnb[d];
            }
    }
    float m = NEG_INF, l = 0.f, o[2 * DP];              // o: dims (2i, 2i + 1), i = lane + 32 q
#pragma unroll
    for (int i = 0; i < 2 * DP; ++i) o[i] = 0.f;
    for (int c0 = 32 * c_lo; c0 < min(n, 32 * c_hi); c0 += 32) {
        if (c0 != 32 * c_lo) {
            __syncwarp();                               // every lane is done with the previous chunk
            stage_chunk(c0);
        }
        asm volatile("cp.async.wait_group 0;" ::: "memory");
        __syncwarp();                                   // every lane's copies (and q, knb, vnb) visible
        const int tk = c0 + lane;
        const bool valid = tk < n && (tk == len || kmask[tk] != 0);
        const uint4* kr = reinterpret_cast<const uint4*>(tk == len ? knb : kt + lane * D);
        float s0 = 0.f, s1 = 0.f;                       // two chains
#pragma unroll
        for (int c = 0; c < D / 8; ++c) {
            float kf[8];
            unpack8(kr[c], kf);
#pragma unroll
            for (int e = 0; e < 8; e += 2) {
                s0 = fmaf(qs[c * 8 + e], kf[e], s0);
                s1 = fmaf(qs[c * 8 + e + 1], kf[e + 1], s1);
            }
        }
        const float s = valid ? s0 + s1 : NEG_INF;       // masked keys may hold anything, NaN included
        const float mn = fmaxf(m, warp_max(s));
        if (mn == NEG_INF) continue;                     // every key so far masked
        const float pk_own = valid ? __expf(s - mn) : 0.f;
        const float alpha = __expf(m - mn);              // 0 while m is -inf
        l = l * alpha + warp_sum(pk_own);
#pragma unroll
        for (int i = 0; i < 2 * DP; ++i) o[i] *= alpha;
#pragma unroll 8
        for (int kk = 0; kk < 32; ++kk) {                // p V
            const float pk = __shfl_sync(0xffffffffu, pk_own, kk);
            const u32* vr = reinterpret_cast<const u32*>(c0 + kk == len ? vnb : vt + kk * D);
#pragma unroll
            for (int q = 0; q < DP; ++q) {               // masked keys (p == 0) skipped: NaN stays out
                const u32 vb = lane + 32 * q < D / 2 ? vr[lane + 32 * q] : 0u;
                o[2 * q] = pk > 0.f ? fmaf(pk, bf_lo(vb), o[2 * q]) : o[2 * q];
                o[2 * q + 1] = pk > 0.f ? fmaf(pk, bf_hi(vb), o[2 * q + 1]) : o[2 * q + 1];
            }
        }
        m = mn;
    }
    const size_t slot = (size_t)h * ns + p;
    if (lane == 0) { part_ml[2 * slot] = m; part_ml[2 * slot + 1] = l; }
#pragma unroll
    for (int q = 0; q < DP; ++q)
        if (lane + 32 * q < D / 2) {
            part_o[slot * D + 2 * (lane + 32 * q)] = o[2 * q];
            part_o[slot * D + 2 * (lane + 32 * q) + 1] = o[2 * q + 1];
        }
}

// Phase 3's input: att = bf16(the P parts of each head combined), every block into its shared memory: warp w
// takes heads w, w + MK_NW, ...; lane p < P loads part p's (max, sum), every lane its dims' outputs of each part
// (one round of loads); weights exp(m_p - M) (0 for a part with no key) summed over the parts in order.
template <int D>
__device__ __forceinline__ void mk_combine(u16* att, const float* part_o, const float* part_ml, int H, int P, int ns) {
    constexpr int DV = (D + 31) / 32;
    const int lane = threadIdx.x & 31;
    for (int h = threadIdx.x >> 5; h < H; h += MK_NW) {
        const float* ml = part_ml + (size_t)2 * h * ns;
        const float* po = part_o + (size_t)h * ns * D;
        const float2 own = lane < P ? __ldcg(reinterpret_cast<const float2*>(ml) + lane) : make_float2(NEG_INF, 0.f);
        float O[DV];
#pragma unroll
        for (int i = 0; i < DV; ++i) O[i] = 0.f;
        float ov[MK_PMAX][DV];
#pragma unroll
        for (int p = 0; p < MK_PMAX; ++p)
#pragma unroll
            for (int i = 0; i < DV; ++i)
                ov[p][i] = p < P && lane + 32 * i < D ? __ldcg(po + (size_t)p * D + lane + 32 * i) : 0.f;
        const float M = warp_max(own.x);
        float L = 0.f;
#pragma unroll
        for (int p = 0; p < MK_PMAX; ++p) {
            if (p >= P) break;
            const float mp = __shfl_sync(0xffffffffu, own.x, p), lp = __shfl_sync(0xffffffffu, own.y, p);
            if (mp != NEG_INF) {                         // a part with no key adds nothing
                const float wgt = __expf(mp - M);
                L = fmaf(wgt, lp, L);
#pragma unroll
                for (int i = 0; i < DV; ++i) O[i] = fmaf(wgt, ov[p][i], O[i]);
            }
        }
#pragma unroll
        for (int i = 0; i < DV; ++i)
            if (lane + 32 * i < D) att[(size_t)h * D + lane + 32 * i] = f2bf(O[i] * (1.f / L));
    }
}

template <int D>
__device__ __forceinline__ void mk_step(const u64* __restrict__ lp, int nlayers, const u16* __restrict__ lm,
                                        const float* __restrict__ nf_w, const float* __restrict__ nf_b, float* x,
                                        float* qkv, float* part_o, float* part_ml, int ns, int pmax, u16* mlp,
                                        float* logits, const int* lenp, const int* posp,
                                        const unsigned char* __restrict__ kmask, const float* __restrict__ inv_freq,
                                        int rot, int hidden, int inter, int vocab, int H, int KVH, int max_len,
                                        float eps, float scale, int qk_ln, int parallel, unsigned* sync, int nslot,
                                        int slot_bytes, int vec_bytes, int async_copies) {
    extern __shared__ __align__(128) unsigned char mk_smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const MkDims dims = {lp, lm, nlayers, hidden, inter, vocab, (H + 2 * KVH) * D, H * D};
    float* scr = reinterpret_cast<float*>(mk_smem + 8 * MK_NW * MK_MAXSLOT);     // [64]
    u16* hs = reinterpret_cast<u16*>(mk_smem + MK_HEAD);             // [hidden] LayerNorm output
    const int hs_bytes = ((2 * hidden + 127) / 128) * 128;
    unsigned char* vec = mk_smem + MK_HEAD + hs_bytes;               // att / mlp staged; attention scratch
    u16* vs = reinterpret_cast<u16*>(vec);
    MkRing ring;
    ring.full = reinterpret_cast<u64*>(mk_smem) + warp * MK_MAXSLOT;
    ring.slots = vec + vec_bytes + (size_t)warp * nslot * slot_bytes;
    ring.nslot = nslot;
    ring.slot_bytes = slot_bytes;
    ring.lanes = async_copies ? 32 : 1;
    ring.it = 0;
    MkCursor c;                                      // the tile this warp computes next
    mk_enter(c, dims, 0, slot_bytes);
    ring.issue = c;
    MK_ZERO();
    if (lane == 0) {
        for (int s = 0; s < nslot; ++s) mbar_init(ring.full + s, ring.lanes);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncwarp();
    if (lane < ring.lanes)
        for (int s = 0; s < nslot; ++s) mk_issue(ring, dims, s);    // weights: before the wait for the embedding
    MK_MARK(0);
    asm volatile("griddepcontrol.wait;" ::: "memory");   // a no-op unless launched as a programmatic dependent
    const int len = *lenp, pos = *posp;
    const int P = mk_parts(len + 1, pmax);
    unsigned phase = 0;
    const unsigned NB = gridDim.x;
    for (int l = 0; l < nlayers; ++l) {
        const u64* p = lp + (size_t)l * MK_PTRS;
        auto f32p = [&](int k) { return reinterpret_cast<const float*>(p[k]); };
        const int mark = 1 + 12 * l;                 // (the probe build's MK_MARK indices)
        (void)mark;
        u16* kc = reinterpret_cast<u16*>(p[P_KC]);
        u16* vc = reinterpret_cast<u16*>(p[P_VC]);
        mk_prefetch_cache(kc, vc, len, H, KVH, D, max_len, pmax);
        mk_layernorm(x, f32p(P_LN1W), f32p(P_LN1B), hs, hidden, eps, scr);
        __syncthreads();
        MK_MARK(mark);
        mk_gemv(ring, c, dims, 4 * l, hs, MODE_STORE, f32p(P_BQKV), qkv, nullptr);
        MK_MARK(mark + 1);
        grid_sync(sync, ++phase * NB);
        MK_MARK(mark + 2);
        const int item = blockIdx.x + warp * NB;     // at most one part a warp (the host's pmax: H P <= MK_AW NB)
        if (warp < MK_AW && item < H * P)
            mk_attention_part<D>(item / P, item % P, P, qkv, kc, vc, len, pos, kmask, inv_freq, rot,
                                 qk_ln ? f32p(P_QN) : nullptr, qk_ln ? f32p(P_KN) : nullptr, eps, scale, H, KVH,
                                 max_len, part_o, part_ml, ns, vec + (size_t)warp * MK_ATT_SCRATCH(D));
        MK_MARK(mark + 3);
        grid_sync(sync, ++phase * NB);
        MK_MARK(mark + 4);
        mk_combine<D>(vs, part_o, part_ml, H, P, ns);
        __syncthreads();
        mk_gemv(ring, c, dims, 4 * l + 1, vs, MODE_ADD, nullptr, x, nullptr);   // x += att . Wo
        MK_MARK(mark + 5);
        if (!parallel) {                             // parallel: gate|up reads h = LN1(x), kept in hs
            grid_sync(sync, ++phase * NB);
            MK_MARK(mark + 6);
            mk_layernorm(x, f32p(P_LN2W), f32p(P_LN2B), hs, hidden, eps, scr);
            __syncthreads();
        }
        MK_MARK(mark + 7);
        mk_gemv(ring, c, dims, 4 * l + 2, hs, MODE_SWIGLU, nullptr, nullptr, mlp);
        MK_MARK(mark + 8);
        grid_sync(sync, ++phase * NB);
        MK_MARK(mark + 9);
        mk_stage(vs, mlp, inter);
        __syncthreads();
        mk_gemv(ring, c, dims, 4 * l + 3, vs, MODE_ADD, nullptr, x, nullptr);   // x += mlp . Wd
        MK_MARK(mark + 10);
        grid_sync(sync, ++phase * NB);
        MK_MARK(mark + 11);
    }
    mk_layernorm(x, nf_w, nf_b, hs, hidden, eps, scr);
    __syncthreads();
    mk_gemv(ring, c, dims, 4 * nlayers, hs, MODE_STORE, nullptr, logits, nullptr);
    __syncthreads();
    MK_MARK(1 + 12 * nlayers);
    MK_FLUSH();
    if (threadIdx.x == 0) {                          // the last block out sets the barrier back to zero
        __threadfence();
        if (atomicAdd(sync + 1, 1u) == NB - 1) {
            atomicExch(sync, 0u);
            atomicExch(sync + 1, 0u);
        }
    }
}

#define MK_INST(D)                                                                                          \
    extern "C" __global__ void __launch_bounds__(MK_NT, 1) decode_step_b1_d##D(                             \
        const u64* __restrict__ lp, int nlayers, const u16* __restrict__ lm, const float* __restrict__ nf_w,  \
        const float* __restrict__ nf_b, float* x, float* qkv, float* part_o, float* part_ml, int ns, int pmax, \
        u16* mlp, float* logits, const int* lenp, const int* posp, const unsigned char* __restrict__ kmask,  \
        const float* __restrict__ inv_freq, int rot, int hidden, int inter, int vocab, int H, int KVH,      \
        int max_len, float eps, float scale, int qk_ln, int parallel, unsigned* sync, int nslot,           \
        int slot_bytes, int vec_bytes, int async_copies) {                                                  \
        mk_step<D>(lp, nlayers, lm, nf_w, nf_b, x, qkv, part_o, part_ml, ns, pmax, mlp, logits, lenp, posp, \
                   kmask, inv_freq, rot, hidden, inter, vocab, H, KVH, max_len, eps, scale, qk_ln, parallel, \
                   sync, nslot, slot_bytes, vec_bytes, async_copies);                                       \
    }
MK_INST(64) MK_INST(80) MK_INST(96) MK_INST(128) MK_INST(160)
