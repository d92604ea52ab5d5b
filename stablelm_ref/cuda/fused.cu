// Fused elementwise and row kernels for the GPU forward: each replaces a chain of array operations
// (one launch and one round trip through device memory per operation) by one pass. Each computes in
// float32 and rounds once to the output dtype; each is the CuPy implementation of a seam
// (stablelm_ref/kernels.py) and is tested against its array-API reference in tests/gpu/test_fused.py.
//
//   layer_norm_kernel      y = (x - mean) / sqrt(var + eps) * w + b       one block per row, stats in float32
//   add_layer_norm_kernel  s = x + delta; y = layer_norm(s)               the residual add and the LayerNorm after it
//   rotary_kernel          y[:d] = x[:d] cos + rotate_half(x[:d]) sin,  y[d:] = x[d:]   (reads x through strides)
//   rotary_qk_kernel       rotary_kernel on q and on k in one launch
//   silu_gate_kernel       y = silu(gate) * up
//
// Dtypes are template tags (0 float32, 1 bfloat16, 2 float16); 16-bit values travel as raw words and
// are converted with PTX cvt, so no CUDA header is needed (NVRTC compiles the file as it is).

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define DEVI __device__ __forceinline__

template <int K> struct Elem;
template <> struct Elem<0> {
    typedef float T;
    static DEVI float load(const T* p, i64 i) { return p[i]; }
    static DEVI void store(T* p, i64 i, float v) { p[i] = v; }
};
template <> struct Elem<1> {  // bfloat16: the high half of a float32
    typedef u16 T;
    static DEVI float load(const T* p, i64 i) { return __uint_as_float(((u32)p[i]) << 16); }
    static DEVI void store(T* p, i64 i, float v) {
        u16 r;
        asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(r) : "f"(v));
        p[i] = r;
    }
};
template <> struct Elem<2> {  // float16
    typedef u16 T;
    static DEVI float load(const T* p, i64 i) {
        float f;
        asm("cvt.f32.f16 %0, %1;\n" : "=f"(f) : "h"(p[i]));
        return f;
    }
    static DEVI void store(T* p, i64 i, float v) {
        u16 r;
        asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(r) : "f"(v));
        p[i] = r;
    }
};

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
DEVI float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    __syncthreads();  // scratch may still be read from the previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One row of LayerNorm: x, y [n] at offset `row`; w, b: [n] (b only when has_bias). Two passes over the
// row for the statistics, as the reference: mean, then the mean of squared deviations (no
// E[x^2] - mean^2). Each thread reads only the elements i = threadIdx.x + k * blockDim.x, so x may be
// what this thread has just written (add_layer_norm_kernel); it is read through plain loads.
template <int XK, int WK>
DEVI void layer_norm_row(const typename Elem<XK>::T* x, const typename Elem<WK>::T* __restrict__ w,
                         const typename Elem<WK>::T* __restrict__ b, typename Elem<XK>::T* __restrict__ y,
                         i64 row, int n, float eps, int has_bias, float* scratch) {
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += Elem<XK>::load(x, row + i);
    const float mean = block_sum(s, scratch) / n;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float d = Elem<XK>::load(x, row + i) - mean;
        ss += d * d;
    }
    const float den = sqrtf(block_sum(ss, scratch) / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = (Elem<XK>::load(x, row + i) - mean) / den * Elem<WK>::load(w, i);
        if (has_bias) v += Elem<WK>::load(b, i);
        Elem<XK>::store(y, row + i, v);
    }
}

// x, y: [rows, n] contiguous; one block per row.
template <int XK, int WK>
__global__ void layer_norm_kernel(const typename Elem<XK>::T* __restrict__ x,
                                  const typename Elem<WK>::T* __restrict__ w,
                                  const typename Elem<WK>::T* __restrict__ b,
                                  typename Elem<XK>::T* __restrict__ y, int n, float eps, int has_bias) {
    __shared__ float scratch[32];
    layer_norm_row<XK, WK>(x, w, b, y, (i64)blockIdx.x * n, n, eps, has_bias, scratch);
}

// The residual add and the LayerNorm after it: s = x + delta, rounded to x's dtype as the array
// reference's add rounds, then y = layer_norm(s); x, delta, s, y: [rows, n] contiguous, one block per row.
template <int XK, int WK>
__global__ void add_layer_norm_kernel(const typename Elem<XK>::T* __restrict__ x,
                                      const typename Elem<XK>::T* __restrict__ delta,
                                      const typename Elem<WK>::T* __restrict__ w,
                                      const typename Elem<WK>::T* __restrict__ b,
                                      typename Elem<XK>::T* s, typename Elem<XK>::T* __restrict__ y,
                                      int n, float eps, int has_bias) {
    __shared__ float scratch[32];
    const i64 row = (i64)blockIdx.x * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        Elem<XK>::store(s, row + i, Elem<XK>::load(x, row + i) + Elem<XK>::load(delta, row + i));
    layer_norm_row<XK, WK>(s, w, b, y, row, n, eps, has_bias, scratch);
}

// One output element of rotary for head (b, h): x [B, H, T, hd] through element strides (sb, sh, st;
// the hd elements of a row contiguous); cos, sin: [B or 1, T, d] contiguous (cos_sb = 0 broadcasts
// one row over the batch); y: [B, H, T, hd] contiguous; i = t * hd + j < T * hd (32-bit: T * hd < 2^31,
// the Python side checks).
template <int XK, int CK>
DEVI void rotary_element(const typename Elem<XK>::T* __restrict__ x, const typename Elem<CK>::T* __restrict__ cos,
                         const typename Elem<CK>::T* __restrict__ sin, typename Elem<XK>::T* __restrict__ y,
                         int b, int h, int H, int i, int T, int hd, int d, i64 sb, i64 sh, i64 st, i64 cos_sb) {
    const int t = i / hd, j = i - t * hd;
    const i64 src = b * sb + h * sh + t * st;
    float v = Elem<XK>::load(x, src + j);
    if (j < d) {
        const int half = d >> 1;
        const i64 c = b * cos_sb + (i64)t * d + j;
        const float turned = j < half ? -Elem<XK>::load(x, src + j + half) : Elem<XK>::load(x, src + j - half);
        v = v * Elem<CK>::load(cos, c) + turned * Elem<CK>::load(sin, c);
    }
    Elem<XK>::store(y, ((i64)b * H + h) * T * hd + i, v);
}

// y = rotary(x): grid = (ceil(T * hd / blockDim.x), B * H), one thread per output element of one head.
template <int XK, int CK>
__global__ void rotary_kernel(const typename Elem<XK>::T* __restrict__ x, const typename Elem<CK>::T* __restrict__ cos,
                              const typename Elem<CK>::T* __restrict__ sin, typename Elem<XK>::T* __restrict__ y,
                              int H, int T, int hd, int d, i64 sb, i64 sh, i64 st, i64 cos_sb) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;  // element of this head: t * hd + j
    if (i >= T * hd) return;
    const int b = blockIdx.y / H, h = blockIdx.y - b * H;
    rotary_element<XK, CK>(x, cos, sin, y, b, h, H, i, T, hd, d, sb, sh, st, cos_sb);
}

// The queries' and the keys' rotary in one launch: grid = (ceil(T * hd / blockDim.x), B * (H + KVH));
// rows y < B * H of the grid rotate q [B, H, T, hd] into yq, the others k [B, KVH, T, hd] into yk.
template <int XK, int CK>
__global__ void rotary_qk_kernel(const typename Elem<XK>::T* __restrict__ q, const typename Elem<XK>::T* __restrict__ k,
                                 const typename Elem<CK>::T* __restrict__ cos,
                                 const typename Elem<CK>::T* __restrict__ sin, typename Elem<XK>::T* __restrict__ yq,
                                 typename Elem<XK>::T* __restrict__ yk, int B, int H, int KVH, int T, int hd, int d,
                                 i64 q_sb, i64 q_sh, i64 q_st, i64 k_sb, i64 k_sh, i64 k_st, i64 cos_sb) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= T * hd) return;
    const int r = blockIdx.y;
    if (r < B * H) {
        const int b = r / H;
        rotary_element<XK, CK>(q, cos, sin, yq, b, r - b * H, H, i, T, hd, d, q_sb, q_sh, q_st, cos_sb);
    } else {
        const int b = (r - B * H) / KVH;
        rotary_element<XK, CK>(k, cos, sin, yk, b, r - B * H - b * KVH, KVH, i, T, hd, d, k_sb, k_sh, k_st, cos_sb);
    }
}

// gate, up, y: n contiguous elements. silu(g) = g * sigmoid(g) = g / (1 + e^-g) (e^-g = inf gives -0).
// Each thread takes 16-byte chunks (8 bfloat16/float16 or 4 float32 values) of the first nvec * V
// elements (nvec = 0 when the arrays are not 16-byte aligned), then the rest one by one.
struct alignas(16) Chunk {
    u32 w[4];
};

template <int XK>
__global__ void silu_gate_kernel(const typename Elem<XK>::T* __restrict__ gate, const typename Elem<XK>::T* __restrict__ up,
                                 typename Elem<XK>::T* __restrict__ y, i64 n, i64 nvec) {
    typedef typename Elem<XK>::T T;
    constexpr int V = 16 / sizeof(T);
    const i64 stride = (i64)gridDim.x * blockDim.x, first = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    for (i64 c = first; c < nvec; c += stride) {
        const Chunk g = reinterpret_cast<const Chunk*>(gate)[c], u = reinterpret_cast<const Chunk*>(up)[c];
        Chunk o;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const float gv = Elem<XK>::load(reinterpret_cast<const T*>(&g), k);
            Elem<XK>::store(reinterpret_cast<T*>(&o), k,
                            gv / (1.f + expf(-gv)) * Elem<XK>::load(reinterpret_cast<const T*>(&u), k));
        }
        reinterpret_cast<Chunk*>(y)[c] = o;
    }
    for (i64 i = nvec * V + first; i < n; i += stride) {
        const float gv = Elem<XK>::load(gate, i);
        Elem<XK>::store(y, i, gv / (1.f + expf(-gv)) * Elem<XK>::load(up, i));
    }
}
