// The step timeline build's probe macros (tools/step_timeline.py): this text is put before decode_step.cu's
// translation unit (launch.step_source()), whose MK_MARK / MK_T0 / MK_ADD / MK_ZERO / MK_FLUSH are empty
// unless defined before it. The shipped module never includes it.
//
// Thread 0 of each block (lane 0 of warp 0) records %globaltimer at each phase's end and after each grid
// barrier (MK_MARK(i): mk_tl[block][i]), and sums (ns) its waits for a full slot, its time inside tiles, its
// time inside grid barriers and its time issuing the ring's copies (MK_T0(v) ... MK_ADD(i, v), in shared memory:
// no global round trip a tile), added to mk_tl[block][MK_TL_SUMS + i] at the end (MK_FLUSH).
#define MK_TL_BLOCKS 160
#define MK_TL_N 1024
__device__ unsigned long long mk_tl[MK_TL_BLOCKS][MK_TL_N];
__device__ __forceinline__ void mk_mark(int i) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    if (blockIdx.x < MK_TL_BLOCKS && i < MK_TL_N) mk_tl[blockIdx.x][i] = t;
}
#define MK_MARK(i) do { if (threadIdx.x == 0) mk_mark(i); } while (0)
#define MK_TL_SUMS 1000
__shared__ unsigned long long mk_sum[4];
#define MK_T0(v) unsigned long long v; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(v))
#define MK_ADD(i, v) do { unsigned long long t_; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_)); \
    if (threadIdx.x == 0) mk_sum[i] += t_ - (v); } while (0)
#define MK_ZERO() do { if (threadIdx.x < 4) mk_sum[threadIdx.x] = 0; } while (0)
#define MK_FLUSH() do { if (threadIdx.x < 4 && blockIdx.x < MK_TL_BLOCKS) \
    mk_tl[blockIdx.x][MK_TL_SUMS + threadIdx.x] += mk_sum[threadIdx.x]; } while (0)
