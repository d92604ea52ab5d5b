// Fused causal PREFILL attention for Hopper (sm_90a): the same function as flash_prefill.cu's
// tensor-core kernel, with the two matrix products on wgmma (FlashAttention-3 style, simplified).
//
//     out[b, h, i] = sum_j softmax_j( scale * q[b, h, i] . k[b, h // rep, j] + mask(i, j) ) v[b, h // rep, j]
//
// Contract, strides and semantics: exactly those of flash_prefill_kernel (see flash_prefill.cu): q
// [B, H, T, D], k, v [B, KVH, S, D] through (batch, head, row) element strides, the T queries are the
// last T of the S positions, causal and key-padding masks, GQA (rep = H / KVH), a query row with no
// allowed key outputs zeros. bfloat16 and float16 in, float32 accumulation and softmax.
//
// What is different from the mma.sync kernel (flash_prefill.cu), and why it is faster on Hopper:
//
//   * wgmma.mma_async: one instruction per 16-wide k-step computes a 64 x N tile for a WARPGROUP
//     (4 warps, 128 threads), reading its B operand (and here Q too) straight from shared memory, with
//     no ldmatrix into registers. mma.sync issues a 16 x 8 x 16 product per warp and needs every
//     operand fragment in registers first: on an H100/H200 it reaches about two thirds of wgmma's rate.
//   * Each block has NWG warpgroups; warpgroup w owns query rows [64 w, 64 w + 64) of the block's
//     BR = 64 NWG rows, all of them sharing the K/V tiles.
//   * Shared memory in the layout wgmma's descriptors read, the "128-byte swizzle": a tile of R rows
//     and DP = D rounded up to 64 columns is stored as DP / 64 column blocks [R][64] (128 bytes per row);
//     inside a block, the 16-byte chunk c of row r sits at chunk position c ^ (r % 8). Eight rows (1024
//     bytes, 1024-aligned) are one swizzle atom. The swizzle spreads a column over all 32 banks.
//         element (r, col):  block col / 64, byte r * 128 + (((col % 64) / 8) ^ (r % 8)) * 16 + (col % 8) * 2
//   * S = Q K^T: A = Q (the warpgroup's 64 rows) and B = K (BC keys), both "K-major" (the reduction
//     index, d, contiguous) in shared memory; k-step kk of 16 d's starts (kk % 4) * 32 bytes into a row
//     of column block kk / 4. Descriptor: stride between 8-row atoms (SBO) 1024 bytes, swizzle 128B.
//   * O += P V: A = P from REGISTERS (the S accumulators, rounded to bf16/fp16 — the accumulator layout
//     of two 8-column groups is the A-fragment layout of one 16-wide k-step, as for mma.sync), B = V in
//     the same swizzled [keys][d] layout, read "N-major" (transposed, imm-trans-b = 1): the descriptor's
//     SBO (1024 bytes) steps 8 keys, its LBO (BC * 128 bytes) steps 64 d's (one column block); k-step kk
//     of 16 keys starts kk * 2048 bytes in.
//   * D = 80 and 160 are stored padded to 128 and 192 columns (the padding is never read: the reduction
//     of Q K^T runs over D / 16 k-steps, and P V's N is D itself, a legal wgmma N).
//   * K/V tiles stream in while earlier ones are computed. Without warp specialisation every thread
//     copies (cp.async, 16 bytes per copy, written straight to its swizzled place); cp.async writes
//     through the generic proxy and wgmma reads through the async proxy, so each thread runs
//     fence.proxy.async after its copies land, then the block barrier. With it, TMA (below).
//   * Two schedules (template parameter PIPE). Plain: per tile, S_j = Q K_j^T, softmax, O += P_j V_j,
//     each wgmma waited for; two K/V stages. Pipelined (FlashAttention-3's intra-warpgroup overlap):
//     S_j and P_{j-1} V_{j-1} are issued back to back and tile j's softmax runs while the second is on
//     the tensor cores; three K/V stages, as tile j - 1's V is still read while tile j + 1 loads.
//   * Softmax as in flash_prefill.cu: base 2 with log2(e) folded into the scale, online rescale,
//     causal tiles past the diagonal never visited, masks only on tiles that need them.
//   * Warp specialisation with TMA (template parameter WS, with the pipelined schedule; FlashAttention-3's
//     producer/consumer split): a third warpgroup only loads, and of it one thread: it issues Q and each
//     K and V tile as [rows][64 columns] boxes on the bulk tensor copy engine (cp.async.bulk.tensor, from
//     tensor maps that flash_hopper.py encodes on the host), which writes them in the 128-byte swizzle,
//     zero-fills rows past T or S, and completes each tile's bytes on a "full" mbarrier. The two computing
//     warpgroups wait on "full" and each of their warps arrives on an "empty" mbarrier once its wgmmas no
//     longer read the tile: K's half of a stage is free once S_j has landed, V's once P_j V_j has, so two
//     stages keep the next load in flight (and fit 112-key tiles at D = 160). No block-wide barrier is
//     left in the main loop, so the two consumers drift apart and one's softmax runs under the other's
//     GEMMs; setmaxnreg gives the producer 24 registers and the consumers 240 (none spilled; the plain
//     pipelined kernel spills at 255 at D = 128). The key-padding mask is read from global memory there.
//     (The first warp-specialised kernel's producer was 128 threads of cp.async: ncu showed its consumers
//     waiting on it; docs/cuda_prefill_notes.md, fifth round.)
//   * Tried and not kept (docs/cuda_prefill_notes.md): explicit ping-pong of the two consumers on named
//     barriers, O rescaled under Q K_j^T, shorter reduction chains, three consumers.
//
// No CUDA headers: nvcc or NVRTC (-arch=sm_90a, through cubin.compile_cached) compiles the
// text flash_hopper.py assembles: flash_prefill.cu's shared helpers, this file with the generated wgmma
// wrappers at the WGMMA_WRAPPERS line (one per shape: PTX spells out the 32-80 accumulator registers),
// and an extern "C" entry point that fixes the template parameters.

// The types (u16, u32, u8, i64), DEVI, smem_addr, cp_async16, cp_async_commit, pack2, exp2_approx,
// neg_inf and imin are flash_prefill.cu's (its "shared helpers" section, put in front of this text).
typedef unsigned long long u64;

template <int N>
DEVI void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
DEVI void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

DEVI void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
DEVI void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
DEVI void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Keep the compiler from moving reads or writes of accumulator registers across the asynchronous
// wgmma (it sees the asm as done when issued): an empty asm that "uses and redefines" each register.
template <int N>
DEVI void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
DEVI void fence_regs(u32 (&r)[N][4]) {  // register A fragments read by an asynchronous wgmma
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(r[i][e])::"memory");
}

// mbarriers (warp-specialised schedule): a 64-bit counter in shared memory; a phase completes when its
// expected number of arrivals has come, and a waiter names the parity of the phase it waits for.
DEVI void mbar_init(u32 bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
DEVI void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
DEVI void mbar_arrive(u32 bar) { asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory"); }
DEVI void mbar_wait(u32 bar, u32 parity) {
    asm volatile("{\n.reg .pred done;\nWAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
template <int N>
DEVI void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N>
DEVI void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }

// TMA (the bulk tensor copy engine; WS = 1): a tensor map (CUtensorMap, 128 opaque bytes made on the host
// by cuTensorMapEncodeTiled, flash_hopper.py) passed as a __grid_constant__ kernel parameter. One thread
// issues a whole [rows][64 columns] box; the engine writes it in the 128-byte swizzle and zero-fills what
// lies outside the tensor (rows past T or S, columns past D); its bytes complete the transaction count that
// an mbarrier was armed with (expect_tx). The copies write through the async proxy, as wgmma reads: no
// proxy fence on the consumers' side.
struct __align__(64) TmaMap { u64 v[16]; };
DEVI void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
DEVI void tma_prefetch(const TmaMap* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<u64>(map)) : "memory");
}
// box at coordinates (c0 column, c1 row, c2 head, c3 batch) into shared `dst`, completing on `bar`
DEVI void tma_load(u32 dst, const TmaMap* map, int c0, int c1, int c2, int c3, u32 bar) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4, %5}], [%6];\n"
                 ::"r"(dst), "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
                 : "memory");
}

DEVI u64 opaque(u64 x) {
    asm volatile("" : "+l"(x));
    return x;
}

// Shared-memory matrix descriptor (PTX ISA "matrix descriptor"; CUTLASS's GmmaDescriptor):
//   bits 0-13 start address >> 4, 16-29 leading byte offset >> 4, 32-45 stride byte offset >> 4,
//   62-63 layout (1 = 128-byte swizzle). The atom base must be 1024-aligned (base offset 0).
DEVI u64 smem_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)((lbo & 0x3FFFF) >> 4) << 16) |
           ((u64)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

// Rows [row0, row0 + NROWS) of a [nvalid, D] matrix (row stride ld elements) into a swizzled tile at
// shared address `sdst` (NROWS rows, column blocks of 64); rows >= nvalid are zero-filled. Chunks past
// D in the last column block (D = 80, 160) are not written: nothing reads them.
// Each thread copies one fixed 16-byte chunk column of rows r0, r0 + RPP, r0 + 2 RPP, ... (RPP rows per
// pass of the block), so its source pointer just advances by RPP rows: few registers held across the
// main loop (a per-copy 64-bit address would be kept live for every copy of the tile).
template <int D, int NROWS, int NTHREADS>
DEVI void load_tile_swizzled(u32 sdst, const u16* __restrict__ gsrc, i64 ld, int row0, int nvalid, int tid) {
    constexpr int CHUNKS = D / 8;              // 16-byte chunks per row
    constexpr int RPP = NTHREADS / CHUNKS;     // rows per pass
    const int ch = tid % CHUNKS, r0 = tid / CHUNKS;
    if (r0 >= RPP) return;                     // (RPP * CHUNKS may be < NTHREADS: D = 80, 160)
    const u16* src = gsrc + (i64)(row0 + r0) * ld + ch * 8;
    const u32 dst0 = sdst + (ch >> 3) * (NROWS * 128), c7 = ch & 7;
#pragma unroll
    for (int r = r0, pass = 0; pass < (NROWS + RPP - 1) / RPP; ++pass, r += RPP, src += RPP * ld) {
        if (NROWS % RPP == 0 || r < NROWS) {
            const bool ok = row0 + r < nvalid;
            cp_async16(dst0 + r * 128 + ((c7 ^ (r & 7)) << 4), ok ? src : gsrc, ok);
        }
    }
}

template <int N, bool BF16>
DEVI void wgmma_ss(float (&d)[N / 2], u64 desc_a, u64 desc_b, int accumulate);  // d (+)= A B, A and B in smem
template <int N, bool BF16>
DEVI void wgmma_rs(float (&d)[N / 2], const u32 (&a)[4], u64 desc_b);           // d += A B, A in registers,
                                                                                 // B N-major (transposed)
// WGMMA_WRAPPERS (generated by flash_hopper.py)

// ----------------------------------------------------------------------------------------------
// grid = (ceil(T / BR), H, B), block = 128 * NWG threads (128 * (NWG + 1) with WS), dynamic smem =
// flash_hopper.smem_bytes(...).
// Accumulator layout of wgmma m64nNk16 (f32), thread = 128 wg + 32 w + 4 g + t: element i holds
// row 16 w + g + 8 ((i / 2) % 2), column 8 (i / 4) + 2 t + i % 2 (mma.sync's C layout per warp, repeated
// over N / 8 column groups).

// WS = 0: every warpgroup loads and computes. WS = 1: warp-specialised (FlashAttention-3): warpgroup 0
// is the producer, one thread of which issues Q and the K/V tiles on TMA into NSTG stages, each half
// signalled "full" on an mbarrier; the NWG consumer warpgroups (1 ...) compute and hand each half back on
// an "empty" mbarrier, so no block-wide barrier holds them in step; setmaxnreg moves registers from the
// producer to the consumers. (Measured and not kept, docs/cuda_prefill_notes.md: a producer of 128
// threads issuing cp.async, code in commit dc092dd; in commit 2dca1a9: ping-pong of the two consumers on
// named barriers, the row reductions in four partial chains, no proxy fence after "full", three
// consumers, O rescaled under Q K_j^T as FlashAttention-3 places it.)
// PREG, CREG (WS): registers per thread after setmaxnreg, producer and consumers (flash_hopper.py's
// register_split: 384 threads start with 168 each; the consumers take what the producer gives back).
// tq, tk, tv (WS): the tensor maps of Q, K, V (kernel parameters, flash_hopper.tensor_map).
template <int D, bool BF16, int BC, int NWG, bool PIPE, int WS = 0, int PREG = 0, int CREG = 0>
DEVI void flash_hopper_body(const u16* __restrict__ Q, const u16* __restrict__ K, const u16* __restrict__ V,
                            const u8* __restrict__ key_mask, u16* __restrict__ O,
                            int H, int KVH, int T, int S, float scale_log2, int causal, int has_mask,
                            i64 q_sb, i64 q_sh, i64 q_sr, i64 kv_sb, i64 kv_sh, i64 kv_sr,
                            i64 o_sb, i64 o_sh, i64 o_sr,
                            const TmaMap* tq = nullptr, const TmaMap* tk = nullptr, const TmaMap* tv = nullptr) {
    static_assert(D % 16 == 0, "head dim must be a multiple of 16");
    static_assert(BC % 16 == 0 && BC <= 128, "key tile: a multiple of 16 keys, at most 128");
    static_assert(WS == 0 || PIPE, "warp specialisation: the pipelined schedule");
    constexpr int NT = 128 * NWG;            // threads that load when WS == 0
    constexpr int BR = 64 * NWG;             // query rows per block
    constexpr int DP = (D + 63) / 64 * 64;   // columns in shared memory (whole 64-column blocks)
    constexpr int Q_BYTES = BR * DP * 2, KV_BYTES = BC * DP * 2;
    constexpr int NS = BC / 2, NO = D / 2;   // accumulator registers per thread: S, O
    // K/V stages in shared memory. WS frees K's and V's halves of a stage separately (K once S_j has
    // landed, V once P_j V_j has), so two stages keep a load in flight.
    constexpr int NSTG = (PIPE && !WS) ? 3 : 2;

    extern __shared__ __attribute__((aligned(16))) unsigned char smem_raw[];
    // swizzle atoms must be 1024-aligned: round the base up (the launch asks for 1024 bytes more)
    const u32 base = (smem_addr(smem_raw) + 1023u) & ~1023u;
    u8* const base_ptr = smem_raw + (base - smem_addr(smem_raw));
    const u32 sQ = base;                                     // [DP / 64][BR][64]
    const u32 sK0 = sQ + Q_BYTES;                            // NSTG stages of [DP / 64][BC][64]
    const u32 sV0 = sK0 + NSTG * KV_BYTES;                   // NSTG stages
    u8* const sM = base_ptr + Q_BYTES + 2 * NSTG * KV_BYTES;  // NSTG stages of BC key-mask bytes

    // wg: this thread's computing warpgroup (-1: WS's producer, warpgroup 0); tid: its index among the
    // threads that load (WS = 0; WS: its index in its warpgroup)
    const int wg = (int)(threadIdx.x >> 7) - (WS ? 1 : 0), wt = threadIdx.x & 127;
    const int tid = WS ? wt : threadIdx.x;
    const int w = wt >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int qb = gridDim.x - 1 - blockIdx.x;  // heaviest (last) causal query blocks start first
    const int h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (H / KVH);
    const int q0 = qb * BR;
    const int off = S - T;  // absolute position of query 0

    const u16* Qg = Q + b * q_sb + h * q_sh;
    const u16* Kg = K + b * kv_sb + kvh * kv_sh;
    const u16* Vg = V + b * kv_sb + kvh * kv_sh;
    u16* Og = O + b * o_sb + h * o_sh;
    const u8* Mg = key_mask + (i64)b * S;  // only read when has_mask

    const int q_end = imin(q0 + BR, T);
    int n_tiles = (S + BC - 1) / BC;
    if (causal) n_tiles = imin(n_tiles, (off + q_end - 1) / BC + 1);  // skip fully masked tiles

    auto load_kv = [&](int j) {  // tile j (keys j BC ...) into stage j % NSTG
        const int st = j % NSTG;
        load_tile_swizzled<D, BC, NT>(sK0 + st * KV_BYTES, Kg, kv_sr, j * BC, S, tid);
        load_tile_swizzled<D, BC, NT>(sV0 + st * KV_BYTES, Vg, kv_sr, j * BC, S, tid);
        if (has_mask)
            for (int i = tid; i < BC; i += NT) sM[st * BC + i] = (j * BC + i < S) ? Mg[j * BC + i] : (u8)0;
    };

    const int wrow0 = 64 * wg;                       // first row of this warpgroup inside the block
    const int wpos_min = off + q0 + wrow0;           // smallest query position of the warpgroup
    const int wpos_max = wpos_min + 63;              // largest
    // a warpgroup whose rows all precede a tile's first key has nothing to add from it (causal)
    auto active = [&](int j) { return j < n_tiles && (!causal || j * BC <= wpos_max); };

    float o[NO], s[NS];
    u32 pa[BC / 16][4];
#pragma unroll
    for (int i = 0; i < NO; ++i) o[i] = 0.f;
    float m_run[2] = {neg_inf(), neg_inf()}, l_run[2] = {0.f, 0.f};  // rows g and g + 8 of this warp
    float alpha[2];

    // Descriptors: the start address is the low field, so a byte offset `off` inside the tile is added
    // to a descriptor as off >> 4. opaque() keeps the compiler from precomputing (and holding in
    // registers across the main loop) one 64-bit descriptor per k-step.
    const u64 desc_q = smem_desc(sQ + wrow0 * 128, 16, 1024);
    const u64 desc_k = smem_desc(sK0, 16, 1024), desc_v = smem_desc(sV0, BC * 128, 1024);
    // S = Q K_j^T on wgmma (issued, not waited for)
    auto issue_qk = [&](int j) {
        const u64 dq = opaque(desc_q), dk = opaque(desc_k + (u64)((j % NSTG) * KV_BYTES >> 4));
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            // k-step kk: column block kk / 4, 32 bytes per k-step inside its 128-byte rows
            wgmma_ss<BC, BF16>(s, dq + (u64)(((kk >> 2) * (BR * 128) + (kk & 3) * 32) >> 4),
                               dk + (u64)(((kk >> 2) * (BC * 128) + (kk & 3) * 32) >> 4), kk > 0);
        }
        wgmma_commit();
    };
    // O += P V_j on wgmma, P (pa) from registers (issued, not waited for)
    auto issue_pv = [&](int j) {
        const u64 dv = opaque(desc_v + (u64)((j % NSTG) * KV_BYTES >> 4));
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) wgmma_rs<D, BF16>(o, pa[kk], dv + (u64)(kk * 2048 >> 4));  // 16 keys
        wgmma_commit();
    };
    // mask tile j's scores, online softmax (base 2): s becomes P (unnormalised), alpha the rescale of O
    auto softmax = [&](int j) {
        const int k0 = j * BC, st = j % NSTG;
        // mask: only tiles that hold padding keys, keys past S, or the causal diagonal
        const bool need_mask = has_mask || (k0 + BC > S) || (causal && k0 + BC - 1 > wpos_min);
        if (need_mask) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int pos = wpos_min + 16 * w + g + 8 * r;  // query position of this row
                const int lim = causal ? imin(S, pos + 1) : S;
#pragma unroll
                for (int n = 0; n < BC / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int kt = n * 8 + 2 * t + e;  // key inside the tile
                        bool ok = k0 + kt < lim;
                        // (WS: the mask from global memory; the producer's stores would need their own barrier)
                        if (has_mask) ok = ok && (WS ? Mg[k0 + kt] : sM[st * BC + kt]) != 0;
                        s[4 * n + 2 * r + e] = ok ? s[4 * n + 2 * r + e] : neg_inf();
                    }
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = neg_inf();
#pragma unroll
            for (int n = 0; n < BC / 8; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * r], s[4 * n + 2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes of a row
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m_run[r], mx * scale_log2);
            // a row with no allowed key so far keeps m = -inf: subtract 0 instead (no NaN)
            const float mb = (m_new == neg_inf()) ? 0.f : m_new;
            alpha[r] = exp2_approx(m_run[r] - mb);
            m_run[r] = m_new;
            float rs = 0.f;
#pragma unroll
            for (int n = 0; n < BC / 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float pv = exp2_approx(fmaf(s[4 * n + 2 * r + e], scale_log2, -mb));
                    s[4 * n + 2 * r + e] = pv;
                    rs += pv;
                }
            l_run[r] = l_run[r] * alpha[r] + rs;  // per-thread partial; summed over the 4 lanes at the end
        }
    };
    // O *= alpha (rows g, g + 8), and P to bf16/fp16 A fragments: the accumulators of column groups
    // 2 kk and 2 kk + 1 are the A fragment of k-step kk
    auto rescale_and_pack = [&]() {
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) o[4 * n + i] *= alpha[i >> 1];
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            pa[kk][0] = pack2<BF16>(s[8 * kk + 0], s[8 * kk + 1]);  // row g,     keys 16 kk + 2t, +1
            pa[kk][1] = pack2<BF16>(s[8 * kk + 2], s[8 * kk + 3]);  // row g + 8, same keys
            pa[kk][2] = pack2<BF16>(s[8 * kk + 4], s[8 * kk + 5]);  // row g,     keys + 8
            pa[kk][3] = pack2<BF16>(s[8 * kk + 6], s[8 * kk + 7]);  // row g + 8, keys + 8
        }
    };

    // epilogue: out = o / l (0 for a row with no allowed key)
    auto store_out = [&]() {
    #pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = l_run[r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const float inv = l > 0.f ? 1.f / l : 0.f;
            const int row = q0 + wrow0 + 16 * w + g + 8 * r;
            if (row < T) {
                u16* orow = Og + (i64)row * o_sr + 2 * t;
    #pragma unroll
                for (int n = 0; n < D / 8; ++n)
                    *reinterpret_cast<u32*>(orow + n * 8) =
                        pack2<BF16>(o[4 * n + 2 * r] * inv, o[4 * n + 2 * r + 1] * inv);
            }
        }
    };

    // The pipelined schedule (FlashAttention-3's intra-warpgroup overlap): in step j the tensor cores get
    // S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back, and tile j's softmax runs while the second is
    // in flight. O is rescaled by tile j's alpha after P_{j-1} V_{j-1} has landed: the same sum as the
    // plain schedule's. No warpgroup skips a tile here (a tile past a warpgroup's rows is fully masked:
    // P = 0, alpha = 1), because a wgmma issued on one side of a branch and waited for on the other
    // makes ptxas serialise every wgmma of the kernel (its advisory C7520). tile_ready(j): tile j is in
    // shared memory and visible to wgmma; tile_done(j): this warp's wgmmas no longer read tile j's stage.
    // (WS splits tile_ready into K's and V's: v_ready(j) before P_j V_j is issued; k_done(j): S_j has
    // landed, so K_j's half of the stage is free; tile_done(j) then frees V_j's.)
    auto pipelined = [&](auto tile_ready, auto tile_done, auto v_ready, auto k_done) {
        tile_ready(0);
        wgmma_fence();
        issue_qk(0);
        wgmma_wait<0>();
        fence_regs(s);
        k_done(0);
        softmax(0);
        rescale_and_pack();
        for (int j = 1; j < n_tiles; ++j) {
            tile_ready(j);
            v_ready(j - 1);
            wgmma_fence();
            issue_qk(j);
            issue_pv(j - 1);
            wgmma_wait<1>();  // S_j (the older group) has landed; P_{j-1} V_{j-1} may still run
            fence_regs(s);
            k_done(j);
            softmax(j);
            wgmma_wait<0>();
            fence_regs(o);
            fence_regs(pa);
            tile_done(j - 1);
            rescale_and_pack();
        }
        v_ready(n_tiles - 1);
        wgmma_fence();
        issue_pv(n_tiles - 1);
        wgmma_wait<0>();
        fence_regs(o);
    };
    auto none = [](int) {};

    if constexpr (WS == 0) {  // prologue: Q tile and tile 0
        load_tile_swizzled<D, BR, NT>(sQ, Qg, q_sr, q0, T, tid);
        load_kv(0);
        cp_async_commit();
    }

    if constexpr (WS) {
        // TMA: per stage st four mbarriers: K full, V full (one arrival each: the producer's expect_tx, then
        // the copies' bytes), K empty, V empty (one arrival per consumer warp). Tile j uses stage j % NSTG
        // for the (j / NSTG)-th time: phase parity (j / NSTG) & 1.
        const u32 bars = sV0 + NSTG * KV_BYTES;
        auto bar = [&](int kind, int j) { return bars + 8 * (kind * NSTG + j % NSTG); };  // 0 K full, 1 V full,
        if (threadIdx.x == 0) {                                                          // 2 K empty, 3 V empty
            for (int st = 0; st < NSTG; ++st) {
                mbar_init(bar(0, st), 1);
                mbar_init(bar(1, st), 1);
                mbar_init(bar(2, st), 4 * NWG);
                mbar_init(bar(3, st), 4 * NWG);
            }
            mbar_init_fence();
        }
        __syncthreads();
        if (wg < 0) {  // ---- producer: one thread issues every copy
            setmaxnreg_dec<PREG>();
            if (threadIdx.x == 0) {
                tma_prefetch(tq);
                tma_prefetch(tk);
                tma_prefetch(tv);
                for (int j = 0; j < n_tiles; ++j) {
                    const int st = j % NSTG;
                    const u32 phase_free = ((j / NSTG) + 1) & 1;
                    if (j >= NSTG) mbar_wait(bar(2, j), phase_free);  // S_{j - NSTG} has landed everywhere
                    mbar_expect_tx(bar(0, j), KV_BYTES + (j == 0 ? Q_BYTES : 0));
                    if (j == 0)
                        for (int c = 0; c < DP / 64; ++c)
                            tma_load(sQ + c * (BR * 128), tq, 64 * c, q0, h, b, bar(0, 0));
                    for (int c = 0; c < DP / 64; ++c)
                        tma_load(sK0 + st * KV_BYTES + c * (BC * 128), tk, 64 * c, j * BC, kvh, b, bar(0, j));
                    if (j >= NSTG) mbar_wait(bar(3, j), phase_free);  // P_{j - NSTG} V_{j - NSTG} is done
                    mbar_expect_tx(bar(1, j), KV_BYTES);
                    for (int c = 0; c < DP / 64; ++c)
                        tma_load(sV0 + st * KV_BYTES + c * (BC * 128), tv, 64 * c, j * BC, kvh, b, bar(1, j));
                }
            }
        } else {  // ---- consumers
            setmaxnreg_inc<CREG>();
            pipelined([&](int j) { mbar_wait(bar(0, j), (j / NSTG) & 1); },
                      [&](int j) { if (lane == 0) mbar_arrive(bar(3, j)); },
                      [&](int j) { mbar_wait(bar(1, j), (j / NSTG) & 1); },
                      [&](int j) { if (lane == 0) mbar_arrive(bar(2, j)); });
            store_out();
        }
    } else if constexpr (!PIPE) {
        // one tile after the other: S_j, softmax, P_j V_j; tile j + 1 streams in meanwhile
        for (int j = 0; j < n_tiles; ++j) {
            if (j + 1 < n_tiles) load_kv(j + 1);
            cp_async_commit();                     // (an empty group on the last tile keeps the count)
            cp_async_wait<1>();                    // this thread's copies of tile j (and Q) have landed
            fence_proxy_async();                   // ... and are visible to wgmma (the async proxy)
            __syncthreads();                       // ... for every thread's copies
            if (active(j)) {
                wgmma_fence();
                issue_qk(j);
                wgmma_wait<0>();
                fence_regs(s);
                softmax(j);
                rescale_and_pack();
                fence_regs(o);
                wgmma_fence();
                issue_pv(j);
                wgmma_wait<0>();
                fence_regs(o);
            }
            __syncthreads();  // every warpgroup is done with stage j % 2 before tile j + 2 is loaded into it
        }
    } else {
        // the pipelined schedule on block barriers. Three stages: tile j + 1 loads while tile j (S) and
        // tile j - 1 (V) are read.
        auto next_tile = [&](int j) {  // tile j has landed for all; step j - 1 is done everywhere
            cp_async_wait<0>();
            fence_proxy_async();
            __syncthreads();
            if (j + 1 < n_tiles) load_kv(j + 1);  // into the stage of tile j - 2
            cp_async_commit();
        };
        pipelined(next_tile, none, none, none);
    }
    if constexpr (!WS) store_out();  // (WS: in the consumers' branch, so that each setmaxnreg region is one
                                     // branch that reaches the kernel's end)

}
