// The timeline build's PDL macros (tools/decode_timeline.py): this text is put before decode.cu, whose own
// PDL_LAUNCH / PDL_WAIT give way to macros defined before it. The shipped module never includes it.
//
// Every block of every kernel records its launch (%gridid), SM, start, return from the PDL wait and exit, as
// %globaltimer (ns) and its SM's clock64, into tl_rec[atomicAdd(tl_count)]. The exit is the latest of its
// warps' (each warp's lane 0, when the kernel's scope ends); a block that returns before the wait leaves tw 0.
// Before sm_90 nothing is defined here (no PDL, no records): decode.cu's empty macros apply.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
struct TlRec { unsigned long long grid, t0, tw, te, c0, cw, ce; unsigned int sm, blk; };
#define TL_MAX (1 << 19)
__device__ TlRec tl_rec[TL_MAX];
__device__ unsigned int tl_count;
__device__ __forceinline__ unsigned long long tl_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ unsigned long long tl_clock() { return (unsigned long long)clock64(); }
struct TlBlock {
    TlRec* r;
    __device__ TlBlock() {
        __shared__ TlRec* slot;
        if (threadIdx.x == 0) {
            const unsigned long long t = tl_now(), c = tl_clock();
            const unsigned i = atomicAdd(&tl_count, 1u);
            TlRec* p = i < TL_MAX ? tl_rec + i : nullptr;
            if (p) {
                unsigned long long g;
                unsigned int sm;
                asm volatile("mov.u64 %0, %%gridid;" : "=l"(g));
                asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
                p->grid = g; p->t0 = t; p->c0 = c; p->tw = 0; p->cw = 0; p->te = 0; p->ce = 0; p->sm = sm;
                p->blk = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
            }
            slot = p;
        }
        __syncthreads();
        r = slot;
    }
    __device__ void waited() { if (r && threadIdx.x == 0) { r->tw = tl_now(); r->cw = tl_clock(); } }
    __device__ ~TlBlock() {
        if (r && (threadIdx.x & 31) == 0) { atomicMax(&r->te, tl_now()); atomicMax(&r->ce, tl_clock()); }
    }
};
#define PDL_LAUNCH() TlBlock tl_block_; asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#define PDL_WAIT() do { asm volatile("griddepcontrol.wait;" ::: "memory"); tl_block_.waited(); } while (0)
#endif
