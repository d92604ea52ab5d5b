// Fused causal PREFILL attention, flash-attention-2 style, for bfloat16 and float16.
//
//     out[b, h, i] = sum_j softmax_j( scale * q[b, h, i] . k[b, h // rep, j] + mask(i, j) ) v[b, h // rep, j]
//
//   q: [B, H, T, D], k, v: [B, KVH, S, D], S >= T, rep = H / KVH (transformers' repeat_kv order).
//   Each of q, k/v (one layout for both) and out is addressed by element strides (batch, head, row;
//   the D elements of a row are contiguous), so q may be read straight out of the [B, T, H*D]
//   projection, k and v out of a larger KV cache [B, KVH, max_len, D], and out written straight
//   into [B, T, H*D] for the output projection: no copies around the kernel.
//   The T queries are the LAST T of the S positions: query i sits at position S - T + i and may
//   attend keys j <= S - T + i (causal), j < S, and key_mask[b, j] != 0 (when a mask is given).
//   A query row with no allowed key outputs zeros (the reference in reference.py does the same).
//
// The algorithm (Dao 2023, FlashAttention-2), per block of BR = 16 * MT * NW query rows:
//
//   load the Q tile (cp.async) ............................. smem sQ [BR][D + 8]
//   for each key tile of BC keys that some query of the block may see (causal tiles skipped):
//       S = Q K^T            mma.sync m16n8k16, fp32 accumulators in registers   [16*MT x BC] per warp
//       mask (only on the tiles that need it), online softmax in base 2:
//           m_new = max(m, rowmax(S)),  P = 2^(S - m_new),  l = l * 2^(m - m_new) + rowsum(P)
//           acc  *= 2^(m - m_new)
//       acc += P V           P goes from the S accumulators straight into mma A fragments (bf16/fp16)
//   out = acc / l   (0 where l == 0)
//
// K and V each have one shared-memory buffer; loads overlap compute as in FlashAttention-2:
// V_j streams in while S_j = Q K_j^T is computed, K_{j+1} while P_j V_j is.
// Rows of every shared tile are padded by 8 elements (16 bytes), which makes the ldmatrix
// accesses of every head dim used here (64, 80, 128, 160) free of bank conflicts.
//
// Variants (template parameters), compared in tools/bench_attention.py:
//   NW  warps per block;   MT  16-row m-tiles per warp (MT = 2 halves the shared-memory traffic
//   per FLOP: each K/V fragment read feeds two mma);   QREG  keep Q fragments in registers
//   (otherwise re-read them from shared memory each key tile, which saves D/4*MT registers);
//   MINB  the minimum resident blocks per SM asked of the register allocator (__launch_bounds__);
//   BC  keys per tile (64, or 32 to halve the score registers so that MT = 2 fits at D = 128).
//
// No CUDA headers are included (the file compiles under NVRTC as is): bf16/fp16 values are handled
// as raw 16-bit words and converted with PTX cvt instructions.

// BEGIN shared helpers (flash_hopper.py puts this section in front of flash_hopper.cu)
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned char u8;
typedef long long i64;

#define DEVI __device__ __forceinline__

// ----------------------------------------------------------------------------------------------
// PTX helpers

DEVI u32 smem_addr(const void* p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

// 16-byte async copy global -> shared; when !pred nothing is read and the 16 bytes are zero-filled.
DEVI void cp_async16(u32 dst, const void* src, bool pred) {
    int n = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
DEVI void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
DEVI void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

DEVI void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
DEVI void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// d[16x8] += a[16x16] * b[16x8], fp32 accumulate.
template <bool BF16>
DEVI void mma16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if constexpr (BF16) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// Two floats -> one register of two 16-bit values, `lo` in the low half (round to nearest even).
template <bool BF16>
DEVI u32 pack2(float lo, float hi) {
    u32 r;
    if constexpr (BF16) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

DEVI float exp2_approx(float x) {  // 2^x, max rel. error 2^-22; 2^-inf = 0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

DEVI float neg_inf() { return __int_as_float(0xff800000); }
DEVI int imin(int a, int b) { return a < b ? a : b; }
// END shared helpers

// ----------------------------------------------------------------------------------------------
// Strides in elements of one [B, heads, rows, D] operand (a row's D elements are contiguous).
struct Layout {
    i64 batch, head, row;
};

// Tile loader: rows [row0, row0 + NROWS) of a [nvalid, D] matrix with row stride ld (elements) into
// smem [NROWS][D + 8]; rows >= nvalid are zero-filled.

template <int D, int NROWS, int NTHREADS>
DEVI void load_tile(u16* sdst, const u16* __restrict__ gsrc, i64 ld, int row0, int nvalid, int tid) {
    constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
    constexpr int DP = D + 8;
#pragma unroll
    for (int c0 = 0; c0 < NROWS * CHUNKS; c0 += NTHREADS) {
        const int c = c0 + tid;
        if ((NROWS * CHUNKS) % NTHREADS == 0 || c < NROWS * CHUNKS) {
            const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
            const bool ok = row0 + r < nvalid;
            const u16* src = ok ? gsrc + (i64)(row0 + r) * ld + col : gsrc;
            cp_async16(smem_addr(sdst + r * DP + col), src, ok);
        }
    }
}

// ----------------------------------------------------------------------------------------------
// The tensor-core kernel.
//
// grid = (ceil(T / BR), H, B), block = 32 * NW threads, dynamic smem = smem_bytes(D, BR) (see .py).
// Fragment layouts (PTX ISA, mma.m16n8k16): lane = 4 * g + t;
//   A (16x16): a0 = (row g, cols 2t, 2t+1), a1 = (row g+8, same), a2 = (row g, cols 2t+8, +9), a3 = (g+8, ..)
//   B (16x8):  b0 = (k 2t, 2t+1; col g), b1 = (k 2t+8, 2t+9; col g)
//   C (16x8):  c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, same cols)
// so the C fragments of two neighbouring 8-key n-tiles of S are exactly the A fragment of P for a
// 16-key k-step of P V: no shuffle, no shared memory round trip.

template <int D, bool BF16, int NW, int MT, bool QREG, int MINB, int BC>
__global__ void __launch_bounds__(NW * 32, MINB)
flash_prefill_kernel(const u16* __restrict__ Q, const u16* __restrict__ K, const u16* __restrict__ V,
                     const u8* __restrict__ key_mask, u16* __restrict__ O,
                     int H, int KVH, int T, int S, float scale_log2, int causal, int has_mask,
                     i64 q_sb, i64 q_sh, i64 q_sr, i64 kv_sb, i64 kv_sh, i64 kv_sr,
                     i64 o_sb, i64 o_sh, i64 o_sr) {
    const Layout lq{q_sb, q_sh, q_sr}, lkv{kv_sb, kv_sh, kv_sr}, lo{o_sb, o_sh, o_sr};
    static_assert(D % 16 == 0, "head dim must be a multiple of 16");
    static_assert(BC % 16 == 0 && BC <= 128, "key tile must be 16..128 keys");
    constexpr int NT = NW * 32;        // threads
    constexpr int BR = 16 * MT * NW;   // query rows per block
    constexpr int DP = D + 8;          // padded smem row
    constexpr int KSTEPS = D / 16;     // k-steps of Q K^T
    constexpr int NTILE_S = BC / 8;    // n-tiles of S per m-tile
    constexpr int NTILE_O = D / 8;     // n-tiles of the output per m-tile

    extern __shared__ __attribute__((aligned(16))) unsigned char smem_raw[];
    u16* sQ = reinterpret_cast<u16*>(smem_raw);  // [BR][DP]
    u16* sK = sQ + BR * DP;                      // [BC][DP]
    u16* sV = sK + BC * DP;                      // [BC][DP]
    u8* sM = reinterpret_cast<u8*>(sV + BC * DP);  // [BC] key mask of the current K tile

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int qb = gridDim.x - 1 - blockIdx.x;  // heaviest (last) causal query blocks start first
    const int h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (H / KVH);
    const int q0 = qb * BR;
    const int off = S - T;  // absolute position of query 0

    const u16* Qg = Q + b * lq.batch + h * lq.head;
    const u16* Kg = K + b * lkv.batch + kvh * lkv.head;
    const u16* Vg = V + b * lkv.batch + kvh * lkv.head;
    u16* Og = O + b * lo.batch + h * lo.head;
    const u8* Mg = key_mask + (i64)b * S;  // only read when has_mask

    const int q_end = imin(q0 + BR, T);
    int n_tiles = (S + BC - 1) / BC;
    if (causal) n_tiles = imin(n_tiles, (off + q_end - 1) / BC + 1);  // skip fully masked tiles

    auto load_mask = [&](int k0) {
        if (has_mask)
            for (int i = tid; i < BC; i += NT) sM[i] = (k0 + i < S) ? Mg[k0 + i] : (u8)0;
    };

    // prologue: Q tile and K tile 0
    load_tile<D, BR, NT>(sQ, Qg, lq.row, q0, T, tid);
    load_tile<D, BC, NT>(sK, Kg, lkv.row, 0, S, tid);
    load_mask(0);
    cp_async_commit();

    const int wrow0 = warp * 16 * MT;                // first row of this warp inside the block
    const int wpos_min = off + q0 + wrow0;           // smallest query position of the warp
    const int wpos_max = wpos_min + 16 * MT - 1;     // largest

    float acc[MT][NTILE_O][4];
    float m_run[MT][2], l_run[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < NTILE_O; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][n][e] = 0.f;
        m_run[mt][0] = m_run[mt][1] = neg_inf();
        l_run[mt][0] = l_run[mt][1] = 0.f;
    }

    // ldmatrix lane addresses (shared-space byte addresses), see the layouts above; the offsets of
    // each m-tile / k-step / n-tile pair are compile-time constants added to these.
    // A fragment from row-major Q: lanes 0-15 give rows 0-15 at col 0, lanes 16-31 rows 0-15 at col 8.
    const u32 q_lane = smem_addr(sQ) + 2 * ((wrow0 + (lane & 15)) * DP + (lane >> 4) * 8);
    // B fragments of two n-tiles from K rows (keys): matrices (keys 0-7, d 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15)
    const u32 k_lane = smem_addr(sK) + 2 * (((lane & 7) + (lane >> 4) * 8) * DP + ((lane >> 3) & 1) * 8);
    // B fragments of two n-tiles from V rows, transposed: (keys 0-7, d 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
    const u32 v_lane = smem_addr(sV) + 2 * (((lane & 7) + ((lane >> 3) & 1) * 8) * DP + (lane >> 4) * 8);

    cp_async_wait_all();
    __syncthreads();

    u32 qf[QREG ? MT : 1][QREG ? KSTEPS : 1][4];
    if constexpr (QREG) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk)
                ldmatrix_x4(qf[mt][kk], q_lane + 2 * (mt * 16 * DP + kk * 16));
    }

    for (int j = 0; j < n_tiles; ++j) {
        const int k0 = j * BC;
        if (j > 0) {
            cp_async_wait_all();  // K_j (issued during the previous P V) has landed
            __syncthreads();      // ... for every thread; and every warp is done reading sV
        }
        load_tile<D, BC, NT>(sV, Vg, lkv.row, k0, S, tid);  // V_j streams in during S = Q K_j^T
        cp_async_commit();

        // a warp whose rows all precede the tile's first key has nothing to add (causal)
        const bool active = !causal || k0 <= wpos_max;
        float s[MT][NTILE_S][4];
        if (active) {
            // ---- S = Q K^T -------------------------------------------------------------------
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < NTILE_S; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[mt][n][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk) {
                u32 qa[MT][4];
                if constexpr (!QREG) {
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
                        ldmatrix_x4(qa[mt], q_lane + 2 * (mt * 16 * DP + kk * 16));
                }
#pragma unroll
                for (int p = 0; p < NTILE_S / 2; ++p) {
                    u32 kb[4];  // b0, b1 of n-tile 2p, then of n-tile 2p + 1
                    ldmatrix_x4(kb, k_lane + 2 * (p * 16 * DP + kk * 16));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        if constexpr (QREG) {
                            mma16816<BF16>(s[mt][2 * p], qf[mt][kk], kb[0], kb[1]);
                            mma16816<BF16>(s[mt][2 * p + 1], qf[mt][kk], kb[2], kb[3]);
                        } else {
                            mma16816<BF16>(s[mt][2 * p], qa[mt], kb[0], kb[1]);
                            mma16816<BF16>(s[mt][2 * p + 1], qa[mt], kb[2], kb[3]);
                        }
                    }
                }
            }

            // ---- mask: only tiles that hold padding keys, keys past S, or the causal diagonal ----
            // branch-free: key j of the tile is allowed for a query at `pos` iff k0 + j < lim(pos)
            // (lim = min(S, pos + 1) when causal, else S) and bit j of the key-mask word is set.
            const bool need_mask = has_mask || (k0 + BC > S) || (causal && k0 + BC - 1 > wpos_min);
            if (need_mask) {
                u32 mbits = 0xffffffffu;  // bit 2n + e: key n * 8 + 2t + e of the tile is a real token
                if (has_mask) {
                    mbits = 0;
#pragma unroll
                    for (int n = 0; n < NTILE_S; ++n) {
                        const u32 w = *reinterpret_cast<const u16*>(sM + n * 8 + 2 * t);  // 2 keys, 0/1 bytes
                        mbits |= ((w & 1u) | ((w >> 7) & 2u)) << (2 * n);
                    }
                }
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        const int pos = wpos_min + mt * 16 + g + 8 * r;  // query position of this row
                        const int lim = causal ? imin(S, pos + 1) : S;
#pragma unroll
                        for (int n = 0; n < NTILE_S; ++n)
#pragma unroll
                            for (int e = 0; e < 2; ++e) {
                                const int key = k0 + n * 8 + 2 * t + e;
                                const bool ok = (key < lim) & (((mbits >> (2 * n + e)) & 1u) != 0u);
                                s[mt][n][2 * r + e] = ok ? s[mt][n][2 * r + e] : neg_inf();
                            }
                    }
            }

            // ---- online softmax (base 2), two rows (g and g + 8) per m-tile per thread ----------
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float mx = neg_inf();
#pragma unroll
                    for (int n = 0; n < NTILE_S; ++n)
                        mx = fmaxf(mx, fmaxf(s[mt][n][2 * r], s[mt][n][2 * r + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes of a row
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    const float m_new = fmaxf(m_run[mt][r], mx * scale_log2);
                    // a row with no allowed key so far keeps m = -inf: subtract 0 instead (no NaN)
                    const float base = (m_new == neg_inf()) ? 0.f : m_new;
                    const float alpha = exp2_approx(m_run[mt][r] - base);
                    m_run[mt][r] = m_new;
                    float rs = 0.f;
#pragma unroll
                    for (int n = 0; n < NTILE_S; ++n)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const float pv = exp2_approx(fmaf(s[mt][n][2 * r + e], scale_log2, -base));
                            s[mt][n][2 * r + e] = pv;
                            rs += pv;
                        }
                    l_run[mt][r] = l_run[mt][r] * alpha + rs;  // per-thread partial; summed at the end
#pragma unroll
                    for (int n = 0; n < NTILE_O; ++n) {
                        acc[mt][n][2 * r] *= alpha;
                        acc[mt][n][2 * r + 1] *= alpha;
                    }
                }
        }

        cp_async_wait_all();  // V_j has landed
        __syncthreads();      // ... for every thread; and every warp is done with sK and sM
        if (j + 1 < n_tiles) {
            load_tile<D, BC, NT>(sK, Kg, lkv.row, k0 + BC, S, tid);  // K_{j+1} streams in during P V_j
            load_mask(k0 + BC);
            cp_async_commit();
        }

        if (active) {
            // ---- acc += P V ---------------------------------------------------------------------
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk) {
                u32 pa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    pa[mt][0] = pack2<BF16>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    pa[mt][1] = pack2<BF16>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    pa[mt][2] = pack2<BF16>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    pa[mt][3] = pack2<BF16>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    u32 vb[4];  // b0, b1 of output n-tile 2dp, then of n-tile 2dp + 1
                    ldmatrix_x4_trans(vb, v_lane + 2 * (kk * 16 * DP + dp * 16));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma16816<BF16>(acc[mt][2 * dp], pa[mt], vb[0], vb[1]);
                        mma16816<BF16>(acc[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
                    }
                }
            }
        }
    }

    // ---- epilogue: out = acc / l (0 for a row with no allowed key) ------------------------------
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = l_run[mt][r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const float inv = l > 0.f ? 1.f / l : 0.f;
            const int row = q0 + wrow0 + mt * 16 + g + 8 * r;
            if (row < T) {
                u16* orow = Og + (i64)row * lo.row + 2 * t;
#pragma unroll
                for (int n = 0; n < NTILE_O; ++n)
                    *reinterpret_cast<u32*>(orow + n * 8) =
                        pack2<BF16>(acc[mt][n][2 * r] * inv, acc[mt][n][2 * r + 1] * inv);
            }
        }
}

// ----------------------------------------------------------------------------------------------
// float32 variant: simple and slower (no tensor cores), same semantics.
// One warp per query row; lane j scores key c0 + j of a 32-key chunk, then the warp accumulates
// p_j * v_j with each lane owning the output dims lane, lane + 32, ...
// grid = (ceil(T / 4), H, B), block = 128 threads.

template <int D>
__global__ void __launch_bounds__(128)
attention_prefill_f32_kernel(const float* __restrict__ Q, const float* __restrict__ K,
                             const float* __restrict__ V, const u8* __restrict__ key_mask,
                             float* __restrict__ O, int H, int KVH, int T, int S, float scale_log2,
                             int causal, int has_mask, i64 q_sb, i64 q_sh, i64 q_sr, i64 kv_sb,
                             i64 kv_sh, i64 kv_sr, i64 o_sb, i64 o_sh, i64 o_sr) {
    const Layout lq{q_sb, q_sh, q_sr}, lkv{kv_sb, kv_sh, kv_sr}, lo{o_sb, o_sh, o_sr};
    constexpr int PER = (D + 31) / 32;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * 4 + warp, h = blockIdx.y, b = blockIdx.z;
    if (row >= T) return;
    const int kvh = h / (H / KVH);
    const float* q = Q + b * lq.batch + h * lq.head + row * lq.row;
    const float* Kg = K + b * lkv.batch + kvh * lkv.head;
    const float* Vg = V + b * lkv.batch + kvh * lkv.head;
    const u8* Mg = key_mask + (i64)b * S;
    float* o = O + b * lo.batch + h * lo.head + row * lo.row;

    const int kend = causal ? imin(S, S - T + row + 1) : S;
    float acc[PER];
#pragma unroll
    for (int i = 0; i < PER; ++i) acc[i] = 0.f;
    float m = neg_inf(), l = 0.f;

    for (int c0 = 0; c0 < kend; c0 += 32) {
        const int key = c0 + lane;
        float sc = neg_inf();
        if (key < kend && (!has_mask || Mg[key] != 0)) {
            const float* kr = Kg + (i64)key * lkv.row;
            float dot = 0.f;
            for (int d = 0; d < D; ++d) dot = fmaf(q[d], kr[d], dot);
            sc = dot * scale_log2;
        }
        float mx = sc;
#pragma unroll
        for (int o2 = 16; o2 > 0; o2 >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o2));
        const float m_new = fmaxf(m, mx);
        const float base = (m_new == neg_inf()) ? 0.f : m_new;
        const float alpha = exp2f(m - base);
        const float p = exp2f(sc - base);
        float ps = p;
#pragma unroll
        for (int o2 = 16; o2 > 0; o2 >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o2);
        l = l * alpha + ps;
        m = m_new;
#pragma unroll
        for (int i = 0; i < PER; ++i) acc[i] *= alpha;
        const int nk = imin(32, kend - c0);
        for (int jj = 0; jj < nk; ++jj) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
            if (pj != 0.f) {  // warp-uniform
                const float* vr = Vg + (i64)(c0 + jj) * lkv.row;
#pragma unroll
                for (int i = 0; i < PER; ++i) {
                    const int d = lane + 32 * i;
                    if (d < D) acc[i] = fmaf(pj, vr[d], acc[i]);
                }
            }
        }
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int d = lane + 32 * i;
        if (d < D) o[d] = acc[i] * inv;
    }
}
