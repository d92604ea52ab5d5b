"""The Python face of each kernel in decode.cu: argument checks, grid and block, a bound Launch.

    k = DecodeKernels()
    k.gemv_launch(x, W, nb=1, mode=MODE_ADD, yf=x_resid)   # y (+)= x W^T: store / add / SwiGLU epilogue
    k.gemv_launch(x, W, nb=8, ..., rows=16, unroll=4)      #   the same on the tensor cores (gemv_mma)
    k.gemv_launch(x_f32, W, nb=1, ..., ln=(w, b, stats, eps))   #   LayerNorm(x) W^T, the LayerNorm folded in
    k.attention_launch(qkv, kc, vc, ...)                   # q/k LayerNorm, rotary, cache write, flash-decoding
    k.layernorm_launch(x, w, b, h, nb=1, eps=1e-5)         # float32 rows -> bf16 rows
    k.embed_launch(tok, E, x, nb=1)                        # x = E[tok]
    k.step_launch(ptrs, lm, ..., shape=STEP_SHAPES[0])     # batch 1: every layer + lm_head in one kernel
    k.argmax_launch(logits, tok, history, ...)             # greedy pick + step bookkeeping
    k.sample_launch(logits, present, u, tok, ...)          # generate's processors + sampler (1 or 2 launches)

Each returns a Launch (launch.py; sample_launch a list of them) to call eagerly or capture into the step's
graph. The float64 spec of every kernel is in specs.py; tests/gpu/test_decode_engine.py compares them.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import GenerationError
from . import xp
from .launch import NULL, Launch, build_step_cubin, i32, load_module

MODE_STORE, MODE_ADD, MODE_SWIGLU = 0, 1, 2
GEMV_BATCHES = (1, 2, 4, 8)                 # compiled batch widths (BM); a batch of 3 uses BM = 4
GEMV_ROWS = (1, 2, 4, 8)                    # compiled rows per block (R)
GEMV_MAX_THREADS = 512
GEMV_MMA = ((1, 2), (1, 4), (2, 2), (2, 4))   # tensor-core GEMV: (16-row tiles a block, k steps in flight)
ATT_DIMS = (64, 80, 96, 128, 160)           # compiled head dims
ATT_THREADS, ATT_TK, ATT_MAXJ, ATT_MAXBUF = 128, 64, 8, 4   # must match decode.cu
ATT_TC_G = 8                                # decode.cu: query heads a kv head the tensor-core kernel takes
ATT_NW, ATT_RW = ATT_THREADS // 32, ATT_TK // (ATT_THREADS // 32)   # warps a block, keys of a tile a warp
ATT_SHAPES = ((1, 1), (2, 2), (4, 4))       # (split_tiles, nbuf) the tuner times within the step
ATT_MAX_CLUSTER = 8                         # splits a cluster at most (the portable cluster size)
SAMPLE_THREADS, SAMPLE_KMAX = 1024, 1024    # must match decode.cu
ARGMAX_THREADS = 1024                       # argmax_step's block (must match decode.cu)
ARGMAX_CLUSTER, ARGMAX_CLUSTER_THREADS = 8, 512   # its cluster launch: blocks a row (<= decode.cu's
#                                                   ARGMAX_MAX_CLUSTER), threads a block
PICK_RING = 4                               # slots of the host ring the step's picks go to (must match decode.cu)
SAMPLE_PART_THREADS, SAMPLE_SLICE = 256, 2048   # sample_topk_partial's block and slice (must match decode.cu)
MAX_BATCH = 8
# the whole-step kernel (decode_step.cu; must match it): warps a block, rows a group, a segment's multiple,
# ring slots a warp at most, warps a block with an attention part at most, parts a head at most, float4 of x
# a thread holds in a LayerNorm, the fixed head of its shared memory, pointers a layer; a part's scratch bytes
# (q, k, cos | sin as float, the new k / v, a chunk's 32 keys and values as bf16)
MK_NW, MK_R, MK_SEG, MK_MAXSLOT, MK_AW, MK_PMAX, MK_LNV, MK_HEAD, MK_PTRS = 16, 4, 256, 6, 2, 8, 3, 1024, 16
MK_THREADS = 32 * MK_NW
MK_ATT_SCRATCH = 144                        # x head_dim
MK_MAX_HIDDEN = 4 * MK_LNV * MK_THREADS     # the LayerNorm holds x in registers
STEP_SHAPES = ((4096, "bulk"), (4096, "cp.async"), (6144, "bulk"), (3072, "bulk"))
#              (bytes a ring slot (each warp's ring: as many as fit, <= MK_MAXSLOT), copies) the tuner times; the
#              first is the default


def _align128(n: int) -> int:
    return (n + 127) // 128 * 128


def step_layout(hidden: int, inter: int, D: int, max_smem: int, slot: int = STEP_SHAPES[0][0]):
    """decode_step.cu's shared memory: (vec_bytes, nslot, total bytes) for these shapes, or a str saying why
    they do not fit. Layout: MK_HEAD (mbarriers, block sums), h [hidden] bf16, vec (att or mlp [max(hidden,
    inter)] bf16, or MK_AW warps' attention scratch), then MK_NW rings of nslot slots of `slot` bytes (as many
    as fit, <= MK_MAXSLOT; at least two)."""
    if hidden > MK_MAX_HIDDEN:
        return f"hidden_size {hidden} > {MK_MAX_HIDDEN} (its LayerNorm holds x in registers)"
    if slot < 2 * MK_R * MK_SEG or slot % 128:
        return f"a ring slot of {slot} bytes: at least {2 * MK_R * MK_SEG} (MK_R rows of a segment), a multiple of 128"
    vec = _align128(max(2 * max(hidden, inter), MK_AW * MK_ATT_SCRATCH * D))
    fixed = MK_HEAD + _align128(2 * hidden) + vec
    nslot = min(MK_MAXSLOT, (max_smem - fixed) // (MK_NW * slot))
    if nslot < 2:
        return (f"{fixed + 2 * MK_NW * slot} bytes of shared memory needed for two ring slots of {slot} bytes a "
                f"warp, {max_smem} a block here")
    return vec, nslot, fixed + MK_NW * nslot * slot


def step_parts(H: int, ns: int, blocks: int) -> int:
    """The attention's parts a head at most in decode_step.cu: the partials' buffers hold ns a head, each of
    the MK_AW first warps of a block takes one part at most (H x parts <= MK_AW x blocks), MK_PMAX at most (the
    combine holds each part's output in registers)."""
    return min(ns, MK_AW * blocks // H, MK_PMAX)


class DecodeKernels:
    """The compiled decode.cu module and one launcher per kernel (also used by the tests); decode_step.cu's
    module is built on first use (step_problem)."""

    def __init__(self):
        cp = self.cp = xp.cupy()
        self.module, self.source = load_module(cp)
        f = self.module.get_function
        self.gemv_fn = {(bm, r): f(f"gemv_b{bm}_r{r}") for bm in GEMV_BATCHES for r in GEMV_ROWS
                        if not (bm == 8 and r == 8)}
        self.mma_fn = {(mt, u): f(f"gemv_mma_t{mt}_u{u}") for mt, u in GEMV_MMA}
        self.gemv_ln_fn = {r: f(f"gemv_ln_b1_r{r}") for r in GEMV_ROWS}
        self.attn_fn = {d: f(f"decode_attention_d{d}") for d in ATT_DIMS}
        self.attn_tc_fn = {d: f(f"decode_attention_tc_d{d}") for d in ATT_DIMS}     # G <= ATT_TC_G
        self.layernorm_fn = f("layernorm_rows")
        self.embed_fn = f("embed_rows")
        self.argmax_fn = f("argmax_step")
        self.sample_fn = f("sample_step")
        self.sample_partial_fn = f("sample_topk_partial")
        self.sample_merge_fn = f("sample_topk_merge")
        dev = cp.cuda.Device()
        self.tensor_cores = int(dev.compute_capability) >= 80      # bf16 mma.sync (gemv_mma)
        self.num_sms = dev.attributes["MultiProcessorCount"]
        self.max_smem = dev.attributes["MaxSharedMemoryPerBlockOptin"]
        self._att_smem = {}                 # kernel name -> the dynamic shared memory allowed it
        self.device_name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
        self.compute_capability = int(dev.compute_capability)
        self._step_fn = None                # decode_step.cu's functions, built on first use (step_problem)

    # -- GEMV ---------------------------------------------------------------------------------
    @staticmethod
    def gemv_batch_width(nb: int) -> int:
        for bm in GEMV_BATCHES:
            if nb <= bm:
                return bm
        raise GenerationError(f"decode batch {nb} is larger than {GEMV_BATCHES[-1]}")

    def gemv_launch(self, x, W, *, nb, mode, yf=None, yh=None, bias=None, rows=4, threads=256, persist=0,
                    unroll=0, stats_out=None, ln=None, tag="gemv"):
        """y[b, n] (+)= x[b, :] @ W[n, :] for b < nb.  x: uint16 bf16 bits [>= nb, K] (C-contiguous rows),
        W: uint16 [N, K]; yf: float32 [>= nb, N] (store/add); yh: uint16 [>= nb, N/2] (swiglu).
        persist: 0 = one block per group of `rows` rows; p > 0 = p blocks per SM, each taking several groups.
        unroll: 0 = gemv_b{B}_r{rows} on the CUDA cores; 2 or 4 = gemv_mma (tensor cores) with that many 32-wide
        k steps in flight a thread and rows = 16 or 32 (one or two 16-row tiles a block).
        stats_out (MODE_ADD, CUDA-core GEMV): float64 [>= nb, 2] += (sum, sum of squares) of the new rows y[b].
        ln = (w, b, stats, eps) (batch 1, CUDA-core GEMV): x is the float32 residual [1, K] and the product is
        taken with its LayerNorm, mean and variance from stats [1, 2] = (sum x, sum x^2) (gemv_ln_b1_r{rows})."""
        N, K = W.shape
        if K % 8 or x.shape[-1] != K or x.dtype.itemsize != (4 if ln else 2) or W.dtype.itemsize != 2:
            raise ValueError(f"gemv: need {'float32' if ln else 'bf16'} x [nb, K] and bf16 W [N, K] with K % 8 == 0, "
                             f"got {x.dtype} {x.shape}, {W.dtype} {W.shape}")
        if (ln is not None or stats_out is not None) and (unroll or (ln is not None and nb != 1)):
            raise ValueError("gemv: the folded LayerNorm (ln) runs at batch 1 and, like stats_out, on the "
                             "CUDA-core GEMV only")
        if threads % 32 or not 32 <= threads <= GEMV_MAX_THREADS:
            raise ValueError(f"gemv: threads must be a multiple of 32 in [32, {GEMV_MAX_THREADS}]")
        bm = self.gemv_batch_width(nb)
        if mode == MODE_SWIGLU:
            if rows % 2 or N % 2:
                raise ValueError("gemv swiglu needs an even number of rows per block and of W rows")
            ldy = yh.shape[-1]
        else:
            ldy = yf.shape[-1]
        args = (x, i32(K), i32(nb), W, i32(N), i32(K),
                bias if bias is not None else NULL,
                yf if yf is not None else NULL, yh if yh is not None else NULL, i32(ldy), i32(mode))
        if unroll:
            if (rows // 16, unroll) not in self.mma_fn or rows % 16 or not self.tensor_cores:
                raise ValueError(f"gemv_mma: (rows, unroll) must be one of "
                                 f"{[(16 * t, u) for t, u in GEMV_MMA]} on a GPU of compute capability >= 8.0, "
                                 f"got ({rows}, {unroll})")
            fn = self.mma_fn[(rows // 16, unroll)]
        else:
            args += (stats_out if stats_out is not None else NULL,)
            if ln is not None:
                w, b, stats, eps = ln
                args += (w, b, stats, np.float32(eps))
            fn = self.gemv_fn[(bm, rows)] if ln is None else self.gemv_ln_fn[rows]
            if ln is not None and 2 * K > 48 * 1024:       # the block's h in shared memory
                raise NotImplementedError(f"gemv with a folded LayerNorm: K = {K} is over 24,576")
        groups = (N + rows - 1) // rows
        grid = min(groups, persist * self.num_sms) if persist else groups
        return Launch(fn, (grid,), (threads,), args, smem=2 * K if ln is not None else 0, tag=tag)

    # -- attention ----------------------------------------------------------------------------
    def attention_splits(self, nb: int, kv_heads: int, max_len: int) -> int:
        """Splits of the key axis (grid x; the partials' buffers are sized for it): about two blocks per SM,
        at most one tile each. The kernel uses as many as the device-side length needs (fewer when
        attention_launch's split_tiles > 1)."""
        want = math.ceil(2 * self.num_sms / max(1, nb * kv_heads))
        return int(max(1, min(want, math.ceil(max_len / ATT_TK))))

    @staticmethod
    def attention_smem(G: int, D: int, nbuf: int = 1, cluster: int = 0) -> int:
        """Dynamic shared memory of decode_attention_d{D} (decode.cu's carve-up): nbuf K/V tiles (rows padded to
        D + 8 bf16: ldmatrix without bank conflicts), the new k/v in bf16, then floats: q, each warp's output,
        k/v scratch, each warp's p, (m, l, alpha), rotary, and launched as clusters of `cluster` splits, the
        splits' partials (o, m, l) that the first one combines."""
        tiles = nbuf * ATT_TK * 2 * (D + 8) * 2
        floats = G * D * (1 + ATT_NW) + 3 * D + ATT_NW * G * ATT_RW + 3 * ATT_NW * G
        if cluster > 1:
            floats += G * cluster * (D + 2)
        return tiles + 4 * D + 4 * floats

    def attention_fits(self, G: int, D: int, nbuf: int, cluster: int = 0) -> bool:
        return self.attention_smem(G, D, nbuf, cluster) <= self.max_smem

    def attention_cluster(self, nsplit: int) -> int:
        """The cluster size attention_launch(cluster=True) uses for nsplit splits: all of a kv head's splits
        (2 to ATT_MAX_CLUSTER, the portable limit) on a GPU with thread-block clusters (compute capability
        >= 9.0), else 0 (no cluster: the splits combine through global memory)."""
        ok = getattr(self, "compute_capability", 0) >= 90 and 1 < nsplit <= ATT_MAX_CLUSTER
        return nsplit if ok else 0

    def attention_launch(self, qkv, kc, vc, cache_len, pos, kmask, inv_freq, rot, *, nb, H, KVH, D,
                         out, part_o, part_ml, counters, nsplit, qn_w=None, kn_w=None, eps=1e-5,
                         scale=None, split_tiles=1, nbuf=1, cluster=False, tag="attention"):
        """Flash-decoding over nsplit blocks (grid x) a kv head at most: a split takes split_tiles tiles of
        ATT_TK keys before the keys spread over more splits (the live count comes from the device's length),
        and holds nbuf tiles in shared memory, the first nbuf copied before the PDL wait. With cluster (where
        attention_cluster allows it, and the partials fit in shared memory beside the tiles) a kv head's splits
        are one thread-block cluster and the first split combines the partials in its shared memory; else the
        last split to finish combines them from part_o / part_ml (global memory) behind a fence and an atomic
        counter. At batch 1 with up to ATT_TC_G query heads a kv head it runs decode_attention_tc_d{D} (each
        warp's 16 keys as two tensor-core products), else decode_attention_d{D} (float32 FMA tiles)."""
        if D not in self.attn_fn:
            raise NotImplementedError(f"decode attention is compiled for head_dim in {ATT_DIMS}, not {D}")
        if H % KVH:
            raise ValueError(f"num_attention_heads {H} is not a multiple of num_key_value_heads {KVH}")
        G = H // KVH
        if G * D > 2 * ATT_MAXJ * ATT_THREADS:
            raise NotImplementedError(f"decode attention supports (heads per kv head) * head_dim <= "
                                      f"{2 * ATT_MAXJ * ATT_THREADS}, got {G} * {D}")
        if not (1 <= nbuf <= ATT_MAXBUF and split_tiles >= 1):
            raise ValueError(f"decode attention: nbuf must be in [1, {ATT_MAXBUF}] and split_tiles >= 1, "
                             f"got {nbuf}, {split_tiles}")
        max_len = kc.shape[-2]
        csize = self.attention_cluster(nsplit) if cluster else 0
        if csize and not self.attention_fits(G, D, nbuf, csize):
            csize = 0               # the partials do not fit beside the tiles: the global combine (what the
            #                         tuner's attention_fits(G, D, nbuf) promised it could launch)
        smem = self.attention_smem(G, D, nbuf, csize)
        if not self.attention_fits(G, D, nbuf, csize):
            raise ValueError(f"decode attention: {nbuf} tiles at head_dim {D} with {G} query heads a kv head "
                             f"need {smem} bytes of shared memory, this GPU has {self.max_smem} a block")
        # The tensor-core tiles at batch 1 (3b-4e1t shapes, each tuned: 1.6059 against 1.6240 ms a step; 2-1.6b
        # equal); at batch 8 their 145 registers a thread (d80) fit fewer blocks a SM, and the float32 kernel's
        # step was 5% faster (2.2595 against 2.3740 ms)
        tc = G <= ATT_TC_G and nb == 1
        fn = (self.attn_tc_fn if tc else self.attn_fn)[D]
        name = f"decode_attention{'_tc' if tc else ''}_d{D}"
        if smem > 48 * 1024 and smem > self._att_smem.get(name, 0):     # never lowered: a captured graph may
            fn.max_dynamic_shared_size_bytes = smem                     # hold a launch with more
            self._att_smem[name] = smem
        qk_ln = qn_w is not None
        scale = D ** -0.5 if scale is None else scale
        args = (qkv, kc, vc, cache_len, pos, kmask, inv_freq, i32(rot),
                qn_w if qk_ln else NULL, kn_w if qk_ln else NULL, i32(qk_ln), np.float32(eps),
                part_o, part_ml, counters, out, i32(H), i32(KVH), i32(max_len), np.float32(scale),
                i32(split_tiles), i32(nbuf))
        return Launch(fn, (nsplit, KVH, nb), (ATT_THREADS,), args, smem=smem, tag=tag, cluster=csize)

    # -- the whole step at batch 1 (decode_step.cu) -------------------------------------------------
    def step_problem(self, *, hidden, inter, H, KVH, D, slot=STEP_SHAPES[0][0]) -> str | None:
        """Why the whole-step kernel cannot run these shapes on this GPU (None: it can). Builds its module on
        first use (a compile error is a reason too)."""
        cc = getattr(self, "compute_capability", 0)
        if cc < 90:
            return f"needs bulk copies and mbarriers (compute capability >= 9.0), this GPU is {cc / 10:.1f}"
        if D not in ATT_DIMS:
            return f"head_dim {D} not in {ATT_DIMS}"
        if H > MK_AW * self.num_sms:
            return f"{H} query heads > {MK_AW} a SM (its attention takes one warp a head at least)"
        lay = step_layout(hidden, inter, D, self.max_smem, slot)
        if isinstance(lay, str):
            return lay
        if self._step_fn is None:
            try:
                module = self.cp.RawModule(path=str(build_step_cubin(str(cc))))
                self._step_fn = {d: module.get_function(f"decode_step_b1_d{d}") for d in ATT_DIMS}
            except Exception as e:  # noqa: BLE001 - no compiler, a compile error: the per-layer step instead
                self._step_fn = {}
                self._step_error = f"could not build decode_step.cu: {e}"
        if not self._step_fn:
            return self._step_error
        return None

    def step_launch(self, ptrs, lm, norm_w, norm_b, x, qkv, part_o, part_ml, mlp, logits, cache_len, pos, kmask,
                    inv_freq, rot, *, hidden, inter, vocab, H, KVH, D, eps, qk_ln, parallel, sync,
                    shape=STEP_SHAPES[0], tag="step"):
        """The whole decode step at batch 1 in one cooperative launch of decode_step_b1_d{D}, one block a SM.
        ptrs: uint64 [layers, MK_PTRS] (decode_step.cu's P_* order: each layer's weights, norms, bias, q/k norms,
        its cache's first row (batch row 0)); kc/vc [KVH, max_len, D] a layer; sync: uint32 [2], zero (the kernel
        leaves it zero). x is read as the residual after the embedding; qkv, mlp and the attention's partials
        (part_o float32 [>= 1, H, ns, D], part_ml [>= 1, H, ns, 2], attention_launch's) are scratch; logits
        float32 [>= 1, vocab]. shape = (bytes a ring slot (each warp's ring holds as many as fit), copies): how
        the rings are filled: "bulk" = lane 0's bulk copies, "cp.async" = 16-byte copies of the warp's 32 lanes."""
        slot, copies = shape
        problem = self.step_problem(hidden=hidden, inter=inter, H=H, KVH=KVH, D=D, slot=slot)
        if problem is not None:
            raise NotImplementedError(f"the whole-step decode kernel: {problem}")
        vec, nslot, smem = step_layout(hidden, inter, D, self.max_smem, slot)
        ns = part_o.shape[-2]
        if part_o.shape[-3:] != (H, ns, D) or part_ml.shape[-3:] != (H, ns, 2):
            raise ValueError(f"step_launch: part_o [.., {H}, ns, {D}] and part_ml [.., {H}, ns, 2], got "
                             f"{part_o.shape} and {part_ml.shape}")
        fn = self._step_fn[D]
        if smem > self._att_smem.get(("step", D), 0):       # never lowered (as attention_launch's)
            fn.max_dynamic_shared_size_bytes = smem
            self._att_smem[("step", D)] = smem
        max_len = kmask.shape[-1]
        args = (ptrs, i32(ptrs.shape[0]), lm, norm_w, norm_b, x, qkv, part_o, part_ml, i32(ns),
                i32(step_parts(H, ns, self.num_sms)), mlp, logits, cache_len, pos, kmask, inv_freq, i32(rot),
                i32(hidden), i32(inter), i32(vocab), i32(H), i32(KVH), i32(max_len), np.float32(eps),
                np.float32(D ** -0.5), i32(bool(qk_ln)), i32(bool(parallel)), sync, i32(nslot), i32(slot), i32(vec),
                i32(copies == "cp.async"))
        return Launch(fn, (self.num_sms,), (MK_THREADS,), args, smem=smem, tag=tag, cooperative=True)

    # -- small kernels ------------------------------------------------------------------------
    def layernorm_launch(self, x, w, b, y, *, nb, eps, tag="layernorm"):
        K = x.shape[-1]
        threads = 256 if K <= 4096 else 512     # the register-resident fast path holds 16 floats a thread
        return Launch(self.layernorm_fn, (nb,), (threads,),
                      (x, i32(K), w, b, y, i32(y.shape[-1]), i32(K), np.float32(eps)), tag=tag)

    def embed_launch(self, tok, E, x, *, nb, stats=None, tag="embed"):
        """x = E[tok]; stats (float64 [instances, >= nb, 2], or None): instance 0 = (sum x, sum x^2) a row, the
        later instances zeroed (the folded LayerNorms' statistics, see gemv_launch)."""
        st = (stats, i32(stats.shape[0]), i32(stats.shape[1])) if stats is not None else (NULL, i32(0), i32(0))
        return Launch(self.embed_fn, (nb,), (256,), (tok, E, i32(E.shape[1]), x, *st), tag=tag)

    def argmax_cluster(self) -> int:
        """Blocks a row argmax_launch(cluster=True) reads the logits with, launched as one thread-block cluster:
        ARGMAX_CLUSTER on a GPU with clusters (compute capability >= 9.0), else 0 (one block a row)."""
        return ARGMAX_CLUSTER if getattr(self, "compute_capability", 0) >= 90 else 0

    def argmax_launch(self, logits, tok, history, step, cache_len, pos, counter, *, nb, bad=None, ring=None,
                      cluster=False, tag="argmax"):
        """bad: int32 [>= nb], set to 1 where a row's logits hold NaN or Inf (else 0), or None. ring: int32
        [PICK_RING, 3, history's row length] in host memory mapped for the device, or None: slot step % PICK_RING
        receives each row's pick, its flag and the step number (decode.cu's finish_row). cluster: each row read
        by argmax_cluster() blocks of ARGMAX_CLUSTER_THREADS as one cluster, where the GPU has clusters."""
        V = logits.shape[-1]
        self._check_ring(ring, history)
        c = self.argmax_cluster() if cluster else 0
        return Launch(self.argmax_fn, (max(1, c), nb), (ARGMAX_CLUSTER_THREADS if c > 1 else ARGMAX_THREADS,),
                      (logits, i32(V), tok, history, i32(history.shape[1]), i32(history.shape[0]),
                       step, cache_len, pos, counter, bad if bad is not None else NULL,
                       ring if ring is not None else NULL), tag=tag, cluster=c if c > 1 else 0)

    @staticmethod
    def _check_ring(ring, history):
        if ring is not None and tuple(ring.shape) != (PICK_RING, 3, history.shape[1]):
            raise ValueError(f"the picks' ring {tuple(ring.shape)} must be ({PICK_RING}, 3, {history.shape[1]})")

    @staticmethod
    def sampler_covers(settings, vocab: int) -> bool:
        """Whether sample_step implements these generate settings (else generate processes on the host side
        with CuPy): greedy with a repetition penalty; sampling with top_k in [1, SAMPLE_KMAX], or top_k 0 (or
        >= vocab) with top_p 1."""
        if not settings["do_sample"]:
            return True
        k = settings["top_k"]
        return 1 <= k <= SAMPLE_KMAX and k < vocab or (k == 0 or k >= vocab) and settings["top_p"] >= 1.0

    @staticmethod
    def sample_scratch_size(vocab: int) -> int:
        """Entries per row of the top-k union buffer: every slice's logits at most (ceil(V / slice) slices)."""
        return -(-vocab // SAMPLE_SLICE) * SAMPLE_SLICE

    def sample_scratch(self, max_batch: int, vocab: int):
        """The top-k path's buffers: the union's values and ids [max_batch, size]; per row its count and a
        non-finite flag [2, max_batch] (zero between steps: sample_topk_merge resets them)."""
        cp, n = self.cp, self.sample_scratch_size(vocab)
        return (cp.zeros((max_batch, n), cp.float32), cp.zeros((max_batch, n), cp.int32),
                cp.zeros((2, max_batch), cp.int32))

    def sample_launch(self, logits, present, u, tok, history, step, cache_len, pos, counter, *, nb, settings,
                      scratch=None, bad=None, ring=None, tag="sample"):
        """generate's processors and sampler on logits [>= nb, V] (see decode.cu); present: uint8 [>= nb, V]
        (ids already in each row) or None without a repetition penalty; u: float64 shaped like history
        [max_steps, ldh], the draws by step (the kernels read row `step`: every step's draws uploaded once).
        Sampling with top_k in [1, SAMPLE_KMAX]: sample_topk_partial over ceil(V / SAMPLE_SLICE) blocks a row,
        then sample_topk_merge, on scratch (sample_scratch(); made here if None); otherwise sample_step, one
        block a row. bad, ring: as argmax_launch's. Returns the launches, in order."""
        V = logits.shape[-1]
        if tuple(u.shape) != tuple(history.shape):
            raise ValueError(f"the draws u {tuple(u.shape)} must be shaped like history {tuple(history.shape)}")
        k = settings["top_k"] if settings["top_k"] < V else 0
        self._check_ring(ring, history)
        book = (tok, history, i32(history.shape[1]), i32(history.shape[0]), step, cache_len, pos, counter,
                bad if bad is not None else NULL, ring if ring is not None else NULL)
        pres = present if present is not None else NULL
        if settings["do_sample"] and 1 <= k <= SAMPLE_KMAX:
            val, idx, count = scratch if scratch is not None else self.sample_scratch(nb, V)
            ucap = val.shape[-1]
            if ucap < self.sample_scratch_size(V) or val.shape[0] < nb:
                raise ValueError(f"sample scratch {val.shape} is too small for {nb} rows of {V} logits")
            part = Launch(self.sample_partial_fn, (-(-V // SAMPLE_SLICE), nb), (SAMPLE_PART_THREADS,),
                          (logits, i32(V), pres, np.float32(settings["repetition_penalty"]),
                           np.float32(settings["temperature"]), i32(k), val, idx, count[0], count[1], i32(ucap)),
                          tag=tag)
            merge = Launch(self.sample_merge_fn, (nb,), (SAMPLE_THREADS,),
                           (val, idx, count[0], count[1], i32(ucap), i32(k), np.float32(settings["top_p"]), u, pres,
                            i32(V), *book), tag=tag)
            return [part, merge]
        return [Launch(self.sample_fn, (nb,), (SAMPLE_THREADS,),
                       (logits, i32(V), pres, np.float32(settings["repetition_penalty"]),
                        i32(bool(settings["do_sample"])), np.float32(settings["temperature"]), i32(k),
                        np.float32(settings["top_p"]), u, *book), tag=tag)]
