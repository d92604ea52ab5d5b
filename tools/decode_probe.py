"""Where the time of one GPU decode step goes: ablations and compile-time variants, in one run.

    python tools/decode_probe.py                      # stablelm-3b-4e1t shapes, batch 1, bf16 random weights
    python tools/decode_probe.py --variants default no-kv   # these kernel variants (see VARIANTS)
    python tools/decode_probe.py --src-rev HEAD~3     # also a variant built from decode.cu of another commit
    python tools/decode_probe.py --variants default git:HEAD~3 default git:HEAD~3   # that, at one tuning
    python tools/decode_probe.py --batch 8 --variants default git:HEAD~1 default git:HEAD~1   # at batch 8
    python tools/decode_probe.py --shapes 2-1.6b      # another shape of the family (bench_gpu.FAMILY)
    python tools/decode_probe.py --splits 2 4 --ln-threads 512   # attention splits, LayerNorm block sizes
    python tools/decode_probe.py --fold-ab                    # LayerNorms folded into the GEMVs, or kernels
    python tools/decode_probe.py --final-fold-ab              # the final LayerNorm folded into lm_head, or not
    python tools/decode_probe.py --sweep o_proj gate_up       # every launch shape of a kind, within the step
    python tools/decode_probe.py --ab o_proj.persist=4 down.rows=8,down.carveout=50   # A/B within the step
    python tools/decode_probe.py --variants default --ablate --cluster-ab    # attention combine: cluster / global
    python tools/decode_probe.py --variants default --tune-ab 3     # the tuner: one stage-2 search / several
    python tools/decode_probe.py --variants default --tunings 4              # four tunings from scratch: the spread
    python tools/decode_probe.py --variants default --graph-steps 1 2 4 8     # k steps a graph launch
    python tools/decode_probe.py --batches 2 4 8 --variants  # the step at batch > 1, tuned with and without
                                                             #   the tensor-core GEMV (A/B in one run)

Each variant is decode.cu with a change to its text (see VARIANTS) or from another commit's source; the
engine keeps its weights and the first variant's GEMV shapes (--retune: tune each), and the decode step is
timed the way tools/bench_gpu.py times it (128-token prompt, 127 graph replays between CUDA events, median
of 3). With --src-rev every variant is tuned for itself (an older decode.cu may lack persistent GEMV blocks:
given a persistent grid it would compute only part of the rows).
Ablations replay the step's graph (PDL edges) with some kernels left out: the time a kind of kernel adds to
the step where it sits, which ncu (kernels serialised, caches flushed) cannot say. Ablated steps compute
nonsense and are only timed. Every variant's logits after the prompt + 4 steps are compared with the first's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import FAMILY, engine_config, random_params  # noqa: E402
from stablelm_ref.cuda import decode_engine as de, decode_kernels as kn, launch, tune  # noqa: E402

NO_KV_LINE = "const bool ok = t < t_end && t < len;"     # decode.cu: which cache rows a tile copies
# decode.cu's attention, where each timing-only variant below cuts the kernel short (every block returns there)
ATT_START = "    if (clustered) cluster_arrive_relaxed();\n    const int len = *lenp;"
ATT_WAIT = "    PDL_WAIT();                                          // qkv comes from the previous kernel\n"
ATT_PREPARED = "    if (!tc) {\n        for (int i = tid; i < NW * G * D; i += ATT_THREADS) Ow[i] = 0.f;\n"
ATT_LOOP_END = "    __syncthreads();                                     // every warp's (m, l, o)\n"
ATT_SPLIT_COMBINE = "    if (nsplit == 1) return;\n    u16* out_h"   # the splits' combine, clustered or not, starts here


def _insert(src, at, text, before=True):
    """src with text inserted before (or after) the one occurrence of `at`; None if `at` is not there once."""
    if src.count(at) != 1:
        return None
    return src.replace(at, text + at if before else at + text)


def _replace(src, at, text):
    """src with the one occurrence of `at` replaced by text; None if `at` is not there once."""
    return src.replace(at, text) if src.count(at) == 1 else None


def _then(*steps):
    """The changes `steps` (VARIANTS names, looked up when applied, or text -> text functions) one after another;
    None as soon as one finds no line to change."""
    def patch(src):
        for step in steps:
            src = (VARIANTS[step] if isinstance(step, str) else step)(src)
            if src is None:
                return None
        return src
    return patch


VARIANTS = {   # name -> a change to decode.cu's text (None: as the engine builds it)
    "default": None,
    # attention never reads the cache (wrong results): shows what the read costs
    "no-kv": lambda src: src.replace(NO_KV_LINE, "const bool ok = false;") if NO_KV_LINE in src else None,
    # timing only (wrong results): the attention kernel cut short at one phase, to see what its chain is made
    # of: launch and wait only; + its first tile landed; + the new token's q/k/v prepared; + every warp's tiles
    # (scores, softmax, p V; att-loop-exit); everything but the split combine (att-no-combine: the warps combined
    # and each split's partial published, into split 0's shared memory past the cluster barrier, or into global
    # memory; no fence, atomic or combine of the splits). Twenty-fourth session, same tuning, ms a step, in that order
    # with the whole kernel last: 3b-4e1t 1.4620, 1.4815, 1.5040, 1.5654, 1.5907, 1.6136 (us a layer: first tile 0.61,
    # q/k/v 0.70, the tile loop 1.92, warps' combine and publish 0.79, the splits' combine 0.72: 4.74 in all); 2-1.6b
    # 0.8855, 0.8934, 0.9039, 0.9436, 0.9600, 0.9750 (0.33, 0.44, 1.65, 0.68, 0.63: 3.73)
    "att-wait-exit": lambda src: _insert(src, ATT_START, "\n    if (H > 0) { PDL_WAIT(); return; }", before=False),
    "att-tile-exit": lambda src: _insert(src, ATT_WAIT,
                                         '    if (H > 0) { asm volatile("cp.async.wait_all;" ::: "memory"); '
                                         'return; }\n', before=False),
    "att-qkv-exit": lambda src: _insert(src, ATT_PREPARED, "    if (H > 0) { __syncthreads(); return; }\n"),
    "att-loop-exit": lambda src: _insert(src, ATT_LOOP_END, "    if (H > 0) return;\n"),
    "att-no-combine": lambda src: _insert(src, ATT_SPLIT_COMBINE,
                                          "    if (H > 0) { if (clustered && nsplit > 1) { cluster_arrive(); "
                                          "cluster_wait(); } return; }\n"),
}

# Variants whose kernel is built with other attention constants: decode_kernels' copies of them are changed
# while the variant runs (its launches' block size, shared memory and splits follow them).
ATT_BLOCK = "#define ATT_THREADS 128\n#define ATT_NW (ATT_THREADS / 32)\n#define ATT_TK 64 "


def _att_block(threads):
    return lambda src: (src.replace(ATT_BLOCK, f"#define ATT_THREADS {threads}\n#define ATT_NW (ATT_THREADS / 32)\n"
                                               f"#define ATT_TK {threads // 2} ") if ATT_BLOCK in src else None)


# wider attention blocks: 8 or 16 warps of 16 keys each, so that up to 128 / 256 keys need one split (no combine)
VARIANTS["att-w8"] = _att_block(256)
VARIANTS["att-w16"] = _att_block(512)
# narrower: 2 warps, 32-key tiles (twice the splits for the same keys)
VARIANTS["att-w2"] = _att_block(64)
# att-g1: the attention with one query head a kv head as a constant (G = 1: multi-head attention, as 3b-4e1t and
# 2-1.6b have; a timing variant, wrong for 2-12b's groups): the g loops and the ATT_MAXJ loops lose their trip
# counts, decode_attention_d80 its registers (110 -> 78) and 4% of its code; with att-w8 / att-w16, the wider blocks
# (one split up to 128 / 256 keys) at those registers. Twenty-fourth session, same tuning, two rounds, ms a step:
# 3b-4e1t default 1.6352 / 1.6355, att-g1 1.6546 / 1.6536, att-w8 1.6487 / 1.6487, att-w8-g1 1.6695 / 1.6693,
# att-w16-g1 1.6752 / 1.6751; 2-1.6b 0.9675 / 0.9677, 0.9831 / 0.9830, 0.9740 / 0.9749, 0.9879 / 0.9893, 0.9950 /
# 0.9961. Slower every one (att-g1's logits bit-identical): fewer registers and less code did not shorten the chain
ATT_G = "    const int G = H / KVH;\n"
VARIANTS["att-g1"] = lambda src: _replace(
    src, ATT_G, "    constexpr int G = 1;                                 // (probe: att-g1)\n")
VARIANTS["att-w8-g1"] = _then("att-w8", "att-g1")
VARIANTS["att-w16-g1"] = _then("att-w16", "att-g1")
# the attention's ATT_MAXJ loops unrolled again (143 KB of code a kernel, against 60: fetched from L2 by every
# block of each layer's launch, the GEMVs' code in between)
ATT_ROLLED = "#pragma unroll 1          // (one pass for most heads: unrolled, the kernel's code was 143 KB)\n"
VARIANTS["att-unrolled"] = lambda src: (src.replace(ATT_ROLLED, "#pragma unroll\n") if src.count(ATT_ROLLED) == 2
                                        else None)
ATT_BOUNDS = "__launch_bounds__(ATT_THREADS, 1) decode_attention_d"
# the attention's registers capped (blocks a SM asked of the compiler: 9 -> 56 registers, 40 bytes spilled), so
# that a block fits beside three persistent GEMV blocks of 160 threads x 120 registers (the twelfth session:
# 3b-4e1t 1.697 -> 2.086 ms a step). (Tiles of 32 keys cannot be had by the constants alone: a warp's 16 keys
# are scored two lanes a key: 32-key tiles are att-w2's 2 warps.)
ATT_TC_BOUNDS = "__launch_bounds__(ATT_THREADS, 1) decode_attention_tc_d"
VARIANTS["att-regs56"] = lambda src: (
    src.replace(ATT_BOUNDS, "__launch_bounds__(ATT_THREADS, 9) decode_attention_d")
    .replace(ATT_TC_BOUNDS, "__launch_bounds__(ATT_THREADS, 9) decode_attention_tc_d")
    if ATT_BOUNDS in src and ATT_TC_BOUNDS in src else None)
# the folded-LayerNorm GEMVs' register cap (decode.cu's GEMV_LN_BOUNDS, 104 since the seventeenth session; 114
# before): ln-launch-bounds the previous form (no cap below 128), ln-maxnreg96 (12 bytes spilled; 4 blocks of 160
# threads a SM), gemv-maxnreg96 that and the plain GEMV capped at 96 too. (Twenty-second session: with one early
# chunk a row ln-maxnreg96 no longer spills, and is still 3.5% slower at 3b, 4.4% at 2-1.6b)
LN_CAP = "#define GEMV_LN_BOUNDS __maxnreg__(104)"
GEMV_LB = "__launch_bounds__(GEMV_MAX_WARPS * 32)"
GEMV_BOUNDS = GEMV_LB + " gemv_b##BM##_r##R("


def _ln_cap(form, gemv=None):
    def patch(src):
        if LN_CAP not in src or (gemv and GEMV_BOUNDS not in src):    # (the plain GEMV's line only where changed)
            return None
        src = src.replace(LN_CAP, f"#define GEMV_LN_BOUNDS {form}")
        return src.replace(GEMV_BOUNDS, GEMV_BOUNDS.replace(GEMV_LB, gemv)) if gemv else src
    return patch


VARIANTS["ln-launch-bounds"] = _ln_cap(GEMV_LB)
VARIANTS["ln-maxnreg96"] = _ln_cap("__maxnreg__(96)")
VARIANTS["gemv-maxnreg96"] = _ln_cap("__maxnreg__(96)", gemv="__maxnreg__(96)")
# the GEMVs' L2 prefetch of their first row group moved after the PDL wait (the first two chunks a thread still
# load into registers before it), or every weight load after it: what flooding the memory system while the
# previous kernel (the attention, above all) finishes costs and buys. (Since the twenty-second session the
# folded-LayerNorm GEMVs' early loads are a branch of their own, which these two leave as it is.)
GEMV_WAIT = "    PDL_WAIT();                                  // x (and y for MODE_ADD) come from earlier kernels\n"
GEMV_POINT = "    point_at(g);\n"     # where a block points at its first row group
GEMV_FETCH = "    } else {\n        fetch();\n    }\n"      # the plain GEMVs' early loads (LN has its own branch)
VARIANTS["gemv-l2-after-wait"] = _then(
    lambda src: _replace(src, GEMV_FETCH, "    } else {\n        gemv_load<R>(wa, wb, wrow, tid, T, KC);\n    }\n"),
    lambda src: _insert(src, GEMV_WAIT, "    if constexpr (!LN)\n"
                                        "        gemv_prefetch_from<R>(wrow, tid + 2 * T, T, KC);\n",
                        before=False))
VARIANTS["gemv-all-after-wait"] = _then(
    lambda src: _replace(src, GEMV_FETCH, "    }\n"),
    lambda src: _insert(src, GEMV_WAIT, "    if constexpr (!LN)\n        fetch();\n", before=False))


def _gemv_early_groups(extra, cond="true", lines=False, at=None):
    """A persistent GEMV block also prefetches its next `extra` row groups into L2 before the PDL wait (where the
    C condition `cond` on the kernel's arguments holds: one kind of matrix); a prefetch a 16-byte chunk, or with
    `lines` a prefetch a 128-byte line. The loop goes right before the wait, or before the line `at`."""
    step = "8 * T" if lines else "T"
    code = ("    for (int e = 1; (%s) && e <= %d; ++e) {\n"
            "        const int ge = g + e * (int)gridDim.x;\n"
            "        if (ge >= groups) break;\n"
            "        for (int cc = %s; cc < KC; cc += %s)\n"
            "            for (int r = 0; r < R; ++r)\n"
            "                prefetch_weights(reinterpret_cast<const uint4*>(W) + (size_t)min(ge * R + r, N - 1) * KC + cc);\n"
            "    }\n" % (cond, extra, "8 * tid" if lines else "tid", step))
    return lambda src: _insert(src, at or GEMV_WAIT, code)


VARIANTS["gemv-early1"] = _gemv_early_groups(1)
VARIANTS["gemv-early2"] = _gemv_early_groups(2)
# o_proj alone (the only residual-add GEMV with N == K) prefetches every row group of its block, or one more,
# before its wait: it waits through the attention, whose few loads leave the memory system idle (6.5 us a 3b
# layer: ~28 MB at the copy bandwidth, o_proj's matrix is 13 MB); gate|up's blocks one more group
OPROJ = "mode == MODE_ADD && N == K"
VARIANTS["oproj-early-all"] = _gemv_early_groups(1 << 20, OPROJ)
VARIANTS["oproj-early1"] = _gemv_early_groups(1, OPROJ)
VARIANTS["gateup-early1"] = _gemv_early_groups(1, "mode == MODE_SWIGLU")
VARIANTS["oproj-early1-lines"] = _gemv_early_groups(1, OPROJ, lines=True)
# prefetch-lines: the GEMVs' L2 prefetch of the rest of a row group (gemv_prefetch_from) one prefetch a 128-byte line
# over the block's threads instead of one a 16-byte chunk (8 requests a line). Twenty-third session, same tuning:
# 3b-4e1t 1.6285 / 1.6285 against 1.6288 / 1.6281, 2-1.6b 0.9692 / 0.9685 against 0.9690 / 0.9690: no difference
# (the chunks' prefetches are likely merged per warp, as loads are); oproj-early1-lines, against oproj-early1's 1.83
# ms at 3b, is as slow, so the cost of o_proj's second group before the wait is not its request count
PREFETCH_FROM = ("    for (int cc = c0; cc < KC; cc += T)\n"
                 "#pragma unroll\n"
                 "        for (int r = 0; r < R; ++r) prefetch_weights(wrow[r] + cc);\n")
VARIANTS["prefetch-lines"] = lambda src: _replace(src, PREFETCH_FROM, (
    "    for (int l = (c0 - (int)threadIdx.x) / 8 + (int)threadIdx.x; 8 * l < KC; l += T)   // (probe: lines)\n"
    "#pragma unroll\n"
    "        for (int r = 0; r < R; ++r) prefetch_weights(wrow[r] + 8 * l);\n"))
# L2 eviction priorities: the weights' L2 prefetch at evict_normal instead of evict_last, and the weight loads
# (ld_stream, ld_stream_early) with an evict_first cache policy, alone and with one more group prefetched
PREFETCH = 'asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p));'
LD_STREAM = '"ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"'
LD_FIRST = ('"{ .reg .b64 pol; createpolicy.fractional.L2::evict_first.b64 pol, 1.0; '
            'ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], pol; }"')
VARIANTS["l2-prefetch-normal"] = lambda src: (src.replace(PREFETCH, PREFETCH.replace("::evict_last", "::evict_normal"))
                                              if PREFETCH in src else None)
VARIANTS["ld-evict-first"] = lambda src: src.replace(LD_STREAM, LD_FIRST) if src.count(LD_STREAM) == 2 else None
VARIANTS["ld-evict-first-early1"] = _then("ld-evict-first", "gemv-early1")
VARIANTS["oproj-early1-normal"] = _then("oproj-early1", "l2-prefetch-normal")
# Why oproj-early1 cost 6 us a 3b layer (twenty-fourth session, local `cuobjdump -res-usage`): its prefetch loop,
# placed between the early loads and the wait, raises gemv_b1_r4 from 64 to 80 registers (gemv_b1_r8 104 -> 125),
# so o_proj's (4, 320, 3) no longer fits three blocks a SM (3 x 320 x 80 > 65,536) and a third of its grid runs as
# a second wave; gemv-early1 / -early2 and oproj-early-all raise them the same way. The -bulk forms prefetch the same
# groups with no registers: one thread a block asks for each later group's R contiguous rows with one
# cp.async.bulk.prefetch.L2 (SASS UBLKPF on uniform registers; gemv_b1_r4 stays at 64). (-first, the chunked loop
# before the first group's loads, still takes 78.) Same tuning, two rounds (call 1), ms a step:
#   3b-4e1t: default 1.6247 / 1.6249, oproj-early1-bulk 1.6344 / 1.6344, gateup-early1-bulk 1.6877 / 1.6880,
#            gemv-early1-bulk 1.8324 / 1.8321, gemv-early2-bulk 1.9029 / 1.9029, oproj-early-all-bulk 1.8380 /
#            1.8389 (its unbounded loop raises gemv_b1_r4 to 75 registers: the second wave again)
#   2-1.6b:  default 0.9676 / 0.9684, oproj-early1-bulk 0.9761 / 0.9764, gateup-early1-bulk 0.9815 / 0.9828,
#            gemv-early1-bulk 1.0306 / 1.0307, gemv-early2-bulk 1.0453 / 1.0435, oproj-early-all-bulk 0.9986 / 0.9991
# So the registers explain oproj-early1's 11%, and the prefetch itself still loses: o_proj's late groups from L2
# +0.6% / +0.9%, every kind's next group +13% / +6.5% (57 MB a 3b layer of prefetches, more than the L2 keeps).
def _gemv_early_bulk(extra, cond="true"):
    """A persistent GEMV block's next `extra` row groups (R contiguous rows each) prefetched into L2 before the PDL
    wait by one thread with one bulk prefetch a group (where the C condition `cond` holds)."""
    code = ("    if ((%s) && tid == 0)\n"
            "        for (int e = 1; e <= %d; ++e) {\n"
            "            const int ge = g + e * (int)gridDim.x;\n"
            "            if (ge >= groups) break;\n"
            "            const unsigned bytes = (unsigned)(min(R, N - ge * R) * K) * 2u;\n"
            "            asm volatile(\"cp.async.bulk.prefetch.L2.global [%%0], %%1;\" ::\"l\"(W + (size_t)ge * R * K), \"r\"(bytes));\n"
            "        }\n" % (cond, extra))
    return lambda src: _insert(src, GEMV_WAIT, code)


VARIANTS["oproj-early1-first"] = _gemv_early_groups(1, OPROJ, at=GEMV_POINT)
VARIANTS["oproj-early1-bulk"] = _gemv_early_bulk(1, OPROJ)
VARIANTS["oproj-early-all-bulk"] = _gemv_early_bulk(1 << 20, OPROJ)
VARIANTS["gemv-early1-bulk"] = _gemv_early_bulk(1)
VARIANTS["gateup-early1-bulk"] = _gemv_early_bulk(1, "mode == MODE_SWIGLU")
VARIANTS["gemv-early2-bulk"] = _gemv_early_bulk(2)
# The folded LayerNorm's loads (gemv_ln): the statistics, then mean / rstd, then x, ln_w and ln_b (two L2 round
# trips after the PDL wait). ln-early-cg: each thread's first two chunks of x loaded with the statistics, through
# L2 (__ldcg, not the non-coherent path); ln-l1-wb: ln_w and ln_b prefetched into L1 before the wait
LN8 = "    auto ln8 = [&](int b, int c, float (&xf)[8]) {"
LN_X = "        const float4 x0 = xr[0], x1 = xr[1], w0 = wr[0]"
LN_STATS = "    if constexpr (LN) {\n#pragma unroll\n        for (int b = 0; b < BM; ++b) {\n"
# ln8's x from the registers loaded with the statistics for the thread's first two chunks (c = tid, tid + T)
LN_X_EARLY = ("        const int ie = (c - (int)threadIdx.x) / (int)blockDim.x;\n"
              "        const float4 x0 = ie == 0 ? xe[0][0] : ie == 1 ? xe[1][0] : xr[0], "
              "x1 = ie == 0 ? xe[0][1] : ie == 1 ? xe[1][1] : xr[1];\n"
              "        const float4 w0 = wr[0]")
LN_LOAD_EARLY = r"""    if constexpr (LN) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int c = tid + i * T;
            if (c < KC) {
                xe[i][0] = __ldcg(reinterpret_cast<const float4*>(x) + 2 * c);
                xe[i][1] = __ldcg(reinterpret_cast<const float4*>(x) + 2 * c + 1);
            }
        }
#pragma unroll
        for (int b = 0; b < BM; ++b) {
"""
VARIANTS["ln-early-cg"] = lambda src: (
    src.replace(LN8, "    float4 xe[2][2];\n" + LN8).replace(LN_X, LN_X_EARLY).replace(LN_STATS, LN_LOAD_EARLY)
    if all(src.count(t) == 1 for t in (LN8, LN_X, LN_STATS)) else None)
VARIANTS["ln-l1-wb"] = lambda src: _insert(src, GEMV_WAIT, (
    "    if constexpr (LN)\n"
    "        for (int l = tid; l < (K >> 5); l += T) {\n"
    '            asm volatile("prefetch.global.L1 [%0];" ::"l"(ln_w + 32 * l));\n'
    '            asm volatile("prefetch.global.L1 [%0];" ::"l"(ln_b + 32 * l));\n'
    "        }\n"))
# Timing only (wrong results): what the folded LayerNorm's start costs the step. ln-x-only: h = bf16(x / 16), x
# loaded alone (no statistics, no ln_w / ln_b: one L2 round trip after the wait, as a GEMV that applied the
# LayerNorm in its epilogue would need); ln-skip: h = 0, nothing loaded after the wait (the bound of any redesign)
LN_STATS_M = ("            const double2 st = reinterpret_cast<const double2*>(ln_stats)[b < nb ? b : 0];\n"
              "            const double Kd = K;\n"
              "            double m = st.x * rK, q = st.y * rK;           // RN(st / K): Markstein's correction\n"
              "            m = fma(fma(-Kd, m, st.x), rK, m);\n"
              "            q = fma(fma(-Kd, q, st.y), rK, q);\n"
              "            const double var = b < nb ? fmax(q - m * m, 0.0) : 0.0;\n"
              "            if (b >= nb) m = 0.0;\n")
# the statistics as decode.cu read them until the twenty-first session: two 8-byte loads, two float64 divisions
LN_STATS_DIV = ("            const double m = b < nb ? ln_stats[2 * b] / K : 0.0;\n"
                "            const double var = b < nb ? fmax(ln_stats[2 * b + 1] / K - m * m, 0.0) : 0.0;\n")
LN_H = "            ln8(0, c, h);\n"
LN_E = "            ln8(0, d, e);\n"       # h's loop takes a thread's chunks in pairs (c, d)


def _store_h(c, h, indent):
    """The line that writes h's chunk c (8 floats in the array named h) into shared memory as bf16, as decode.cu has
    it, indented by `indent` spaces."""
    return (" " * indent + f"hw[{c}] = make_uint4(pack_bf2({h}[0], {h}[1]), pack_bf2({h}[2], {h}[3]), "
            f"pack_bf2({h}[4], {h}[5]), pack_bf2({h}[6], {h}[7]));\n")


LN_X_ONLY = ("            const float4* xq = reinterpret_cast<const float4*>(x) + 2 * c;\n"
             "            const float4 q0 = xq[0], q1 = xq[1];\n"
             "            h[0] = q0.x * .0625f; h[1] = q0.y * .0625f; h[2] = q0.z * .0625f; h[3] = q0.w * .0625f;\n"
             "            h[4] = q1.x * .0625f; h[5] = q1.y * .0625f; h[6] = q1.z * .0625f; h[7] = q1.w * .0625f;\n")


def _ln_timing(h_code=None, stats=False):
    """The statistics' lines replaced by mean 0, rstd 1 (stats) and / or h's lines (ln8(0, c, h), ln8(0, d, e)) by
    h_code, written for chunk c into h and rewritten for d into e (in a scope of its own); None where decode.cu lacks
    a line it changes."""
    def patch(src):
        if (stats and src.count(LN_STATS_M) != 1) or (h_code and (src.count(LN_H) != 1 or src.count(LN_E) != 1)):
            return None
        if stats:
            src = src.replace(LN_STATS_M, "            const double m = 0.0, var = 1.0;\n")
        if h_code:
            src = src.replace(LN_H, "            {\n" + h_code + "            }\n")
            src = src.replace(LN_E, "            {\n" + h_code.replace("2 * c", "2 * d").replace("h[", "e[") +
                              "            }\n")
        return src
    return patch


VARIANTS["ln-x-only"] = _ln_timing(LN_X_ONLY, stats=True)
VARIANTS["ln-skip"] = _ln_timing("            for (int i = 0; i < 8; ++i) h[i] = 0.f;\n", stats=True)
# taking ln-x-only apart (timing only): ln-no-stats, x, ln_w and ln_b loaded but no statistics (mean 0, rstd 1);
# ln-no-wb, the statistics and x but no ln_w / ln_b (h = (x - mean) rstd)
VARIANTS["ln-no-stats"] = _ln_timing(stats=True)
VARIANTS["ln-no-wb"] = _ln_timing(LN_X_ONLY.replace(" * .0625f", " - mean[0]) * rstd[0]").replace("= q", "= (q"))
# ln-wb-bf16 (timing only): the shipped h with ln_w and ln_b read as bf16 pairs (w_k, b_k) packed in 4 bytes, half
# their bytes (the pairs are taken from ln_w's own 4K bytes, so the values are wrong): the traffic of a packed copy
VARIANTS["ln-wb-bf16"] = _ln_timing(
    "            const float4* xq = reinterpret_cast<const float4*>(x) + 2 * c;\n"
    "            const uint4* pq = reinterpret_cast<const uint4*>(ln_w) + 2 * c;\n"
    "            const float4 q0 = xq[0], q1 = xq[1];\n"
    "            const uint4 p0 = pq[0], p1 = pq[1];\n"
    "            const float v[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};\n"
    "            const u32 p[8] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};\n"
    "#pragma unroll\n"
    "            for (int i = 0; i < 8; ++i)\n"
    "                h[i] = (v[i] - mean[0]) * rstd[0] * __uint_as_float(p[i] << 16) + __uint_as_float(p[i] & 0xffff0000u);\n")
# Numerically the shipped kernel (correct variants). The SASS of gemv_ln_b1_r8 shows, after griddepcontrol.wait, the
# statistics' two loads one after the other (the second after the first's float64 division), then per chunk x,
# ln_w and ln_b. x and the statistics were written by the previous kernel (in L2); ln_w and ln_b were last read a
# step ago (5 GB of weights since: in DRAM), and are asked for behind every block's L2 prefetch of its rows.
# decode.cu now has each of the first 2K / 32 blocks prefetch one line of ln_w / ln_b into L2 before its weights
# (SHIPPED_PF, nineteenth session). ln-no-pf: without it (the kernel before); ln-wb-pf: every block prefetches every
# line (slower); ln-pf-bias: ln-wb-pf and each of the block's row groups' bias (q|k|v bias) prefetched too;
# ln-stats2: the two statistics in one 16-byte load through L2 (__ldcg, ordered after the wait; a plain double2
# load was placed before it and read stale statistics); ln-x-cg: ln8's x through L2 (__ldcg, where the shipped read
# is the non-coherent ld.global.nc); ln-cg: both
SHIPPED_PF = ("    if constexpr (LN)        // ln_w and ln_b into L2 first: see \"LN\" above\n"
              "        if (tid == 0)\n"
              "            for (int l = blockIdx.x; l < (K >> 4); l += gridDim.x) {\n"
              "                const float* v = l < (K >> 5) ? ln_w + 32 * l : ln_b + 32 * (l - (K >> 5));\n"
              '                asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(v));\n'
              "            }\n")
LN_PF = ("    if constexpr (LN)\n        for (int l = tid; l < (K >> 5); l += T) {\n"
         '            asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(ln_w + 32 * l));\n'
         '            asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(ln_b + 32 * l));\n'
         "        }\n")
BIAS_PF = ("    if (bias != nullptr && tid == 0)\n"
           "        for (int q = g; q < (N + R - 1) / R; q += gridDim.x)\n"
           '            asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(bias + q * R));\n')


def _pf(text):
    return lambda src: _replace(src, SHIPPED_PF, text)


VARIANTS["ln-no-pf"] = _pf("")
VARIANTS["ln-wb-pf"] = _pf(LN_PF)
VARIANTS["ln-pf-bias"] = _pf(LN_PF + BIAS_PF)


def _stats_one_load(load):
    """The statistics' two loads as one 16-byte load into st (`load`, a statement); None where decode.cu lacks them."""
    text = ("            double2 st = make_double2(0.0, 0.0);\n"
            f"            if (b < nb) {load}\n"
            "            const double m = st.x / K;\n"
            "            const double var = b < nb ? fmax(st.y / K - m * m, 0.0) : 0.0;\n")
    return lambda src: _replace(src, LN_STATS_M, text)   # (they replaced LN_STATS_DIV, and divided as it does)


LN_XR = "        const float4 x0 = xr[0], x1 = xr[1], w0 = wr[0]"
# ln-stats-nc2: the two statistics in one 16-byte load on the shipped (non-coherent) path, as a volatile asm so that
# it stays after the wait (ln-stats2's __ldcg measured far slower: is it the path, or the one load?)
VARIANTS["ln-stats-nc2"] = _stats_one_load(
    'asm volatile("ld.global.nc.v2.f64 {%0, %1}, [%2];" : "=d"(st.x), "=d"(st.y) : "l"(ln_stats + 2 * b));')
# (twentieth session: NaN logits; ptxas put that load before griddepcontrol.wait, volatile or not, as the SASS shows:
# a non-coherent load may move there, which is why decode.cu no longer reads step-written data that way)
# ln-x-nc-asm: x's two loads back on the non-coherent path as volatile asm (correct in that build, 0.2% faster than
# the nineteenth session's kernel; the position is ptxas's choice); ln-nc-asm: that and ln-stats-nc2 (NaN)
LD_NC4 = ("__device__ __forceinline__ float4 ld_nc4(const float4* p) {\n    float4 r;\n"
          '    asm volatile("ld.global.nc.v4.f32 {%0,%1,%2,%3}, [%4];" '
          ': "=f"(r.x), "=f"(r.y), "=f"(r.z), "=f"(r.w) : "l"(p));\n    return r;\n}\n')
VARIANTS["ln-x-cg"] = lambda src: _replace(src, LN_XR, LN_XR.replace("x0 = xr[0], x1 = xr[1]",
                                                                      "x0 = __ldcg(xr), x1 = __ldcg(xr + 1)"))
VARIANTS["ln-x-nc-asm"] = _then(
    lambda src: _replace(src, LN_XR, LN_XR.replace("x0 = xr[0], x1 = xr[1]", "x0 = ld_nc4(xr), x1 = ld_nc4(xr + 1)")),
    lambda src: _insert(src, GEMV_IMPL, LD_NC4))
VARIANTS["ln-nc-asm"] = _then("ln-stats-nc2", "ln-x-nc-asm")
# ln-stats-v2 (twenty-first session: the shipped form before its last step) and ln-stats-div (the form before): the
# statistics in one weak 16-byte load issued unconditionally (row 0 where b >= nb; in _stats_one_load's `if (b < nb)`
# form ptxas moved the 16 weight loads below the wait), still divided; and the two 8-byte loads with a division after
# each. SASS of both: ptxas does not hoist the x / ln_w / ln_b loads above the divisions' slow-path CALLs. decode.cu
# now takes 1 / K before the wait and corrects the product (Markstein): h bit-identical, no division after the load
# (3b-4e1t 1.6556 / 1.6564 against ln-stats-v2's 1.6669 / 1.6677 and ln-stats-div's 1.6715 / 1.6716 ms a step)
VARIANTS["ln-stats-div"] = lambda src: _replace(src, LN_STATS_M, LN_STATS_DIV)
VARIANTS["ln-stats-v2"] = lambda src: _replace(src, LN_STATS_M, (
    "            const double2 st = reinterpret_cast<const double2*>(ln_stats)[b < nb ? b : 0];\n"
    "            const double m = b < nb ? st.x / K : 0.0;\n"
    "            const double var = b < nb ? fmax(st.y / K - m * m, 0.0) : 0.0;\n"))


def _ln_early(E):
    """ln-early{E}: the statistics (decode.cu's one 16-byte load) and x, ln_w, ln_b of a thread's first E chunks
    issued together right after the wait, then mean and rstd as decode.cu computes them, h of those chunks, and the
    rest as before: one round trip where every thread has at most E chunks (3b: 2 at 160 threads), where decode.cu's
    start has three (statistics, then a chunk a round). Twenty-first session: ln-early2 spills 52 bytes at the
    104-register cap (and issues only one chunk with the statistics), 3b-4e1t 1.7225 against 1.6715 ms a step, 2-1.6b
    1.0273 against 0.9869 (against decode.cu before its division went); ln-early1 moves the 16 early weight loads
    below the wait (SASS), not run."""
    block = ("    if constexpr (LN) {\n"
             "        const double2 st = reinterpret_cast<const double2*>(ln_stats)[0];   // batch 1: BM == 1\n"
             f"        float4 ex[{E}][6];\n#pragma unroll\n        for (int i = 0; i < {E}; ++i) {{\n"
             "            const int c = min(tid + i * T, KC - 1);     // in bounds; h stored only where c < KC\n"
             "            const float4* xr = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(x))"
             " + 2 * c;\n"
             "            const float4* wr = reinterpret_cast<const float4*>(ln_w) + 2 * c;\n"
             "            const float4* br = reinterpret_cast<const float4*>(ln_b) + 2 * c;\n"
             "            ex[i][0] = xr[0]; ex[i][1] = xr[1]; ex[i][2] = wr[0]; ex[i][3] = wr[1];\n"
             "            ex[i][4] = br[0]; ex[i][5] = br[1];\n"
             "            // issued here, with the statistics: an empty asm that reads them keeps the compiler from\n"
             "            // sinking the loads into the `if (c < KC)` below (the statistics' arithmetic would go "
             "first)\n"
             "#pragma unroll\n            for (int j = 0; j < 6; ++j)\n"
             '                asm volatile("" ::"f"(ex[i][j].x), "f"(ex[i][j].y), "f"(ex[i][j].z), "f"(ex[i][j].w));\n'
             "        }\n        {\n            const int b = 0;\n" +
             LN_STATS_M.split("\n", 1)[1] +     # decode.cu's arithmetic, after its load (issued above)
             "            mean[0] = (float)m;\n            rstd[0] = rsqrtf((float)var + eps);\n        }\n"
             "        uint4* hw = reinterpret_cast<uint4*>(gemv_smem);\n"
             f"#pragma unroll\n        for (int i = 0; i < {E}; ++i) {{\n"
             "            const int c = tid + i * T;\n            if (c < KC) {\n"
             "                const float v[8] = {ex[i][0].x, ex[i][0].y, ex[i][0].z, ex[i][0].w, "
             "ex[i][1].x, ex[i][1].y, ex[i][1].z, ex[i][1].w};\n"
             "                const float g[8] = {ex[i][2].x, ex[i][2].y, ex[i][2].z, ex[i][2].w, "
             "ex[i][3].x, ex[i][3].y, ex[i][3].z, ex[i][3].w};\n"
             "                const float o[8] = {ex[i][4].x, ex[i][4].y, ex[i][4].z, ex[i][4].w, "
             "ex[i][5].x, ex[i][5].y, ex[i][5].z, ex[i][5].w};\n"
             "                float h[8];\n#pragma unroll\n"
             "                for (int j = 0; j < 8; ++j) h[j] = (v[j] - mean[0]) * rstd[0] * g[j] + o[j];\n" +
             _store_h("c", "h", 16) + "            }\n        }\n"
             f"        for (int c = tid + {E} * T; c < KC; c += T) {{\n            float h[8];\n" + LN_H +
             _store_h("c", "h", 12) + "        }\n")
    return lambda src: _replace(src, LN_BLOCK, block)


VARIANTS["ln-stats2"] = _stats_one_load("st = __ldcg(reinterpret_cast<const double2*>(ln_stats) + b);")
VARIANTS["ln-cg"] = _then("ln-stats2", "ln-x-cg")
# ln-keep-pf: ln_w and ln_b kept in L2 from step to step, read with an evict_last policy while the weights' prefetch
# goes to evict_normal (l2-prefetch-normal; whether evict_last lines need a persisting set-aside: --l2-persist-mb);
# ln-wb-keep: that without the shipped prefetch
LN_WR = "w0 = wr[0], w1 = wr[1], b0 = br[0], b1 = br[1];"
LN_KEEP = ("w0 = ld_keep(wr), w1 = ld_keep(wr + 1), b0 = ld_keep(br), b1 = ld_keep(br + 1);")
LD_KEEP = ("__device__ __forceinline__ float4 ld_keep(const float4* p) {\n    float4 r;\n"
           '    asm("{ .reg .b64 pol; createpolicy.fractional.L2::evict_last.b64 pol, 1.0; '
           'ld.global.nc.L2::cache_hint.v4.f32 {%0,%1,%2,%3}, [%4], pol; }" '
           ': "=f"(r.x), "=f"(r.y), "=f"(r.z), "=f"(r.w) : "l"(p));\n    return r;\n}\n')
GEMV_IMPL = "template <int BM, int R, bool LN>\n__device__ __forceinline__ void gemv_impl("
# ln-wb-const (timing only, and correct for the probe's random model, whose ln_w is 1 and ln_b 0): ln8 as decode.cu
# has it with ln_w / ln_b taken as constants instead of loaded: the bound of folding them into the weights and bias,
# without the rewrite of h's code that made ln-no-wb slower than the shipped kernel. Twenty-second session: slower
# too (3b-4e1t 1.6434 against 1.6253 ms a step, 2-1.6b 0.9989 against 0.9746; ptxas moves the rows' second
# chunks ahead of h's store)
VARIANTS["ln-wb-const"] = lambda src: _replace(src, LN_WR, "w0 = make_float4(1.f, 1.f, 1.f, 1.f), w1 = w0, "
                                                          "b0 = make_float4(0.f, 0.f, 0.f, 0.f), b1 = b0;")
VARIANTS["ln-keep-pf"] = _then(lambda src: _replace(src, LN_WR, LN_KEEP),
                               lambda src: _insert(src, GEMV_IMPL, LD_KEEP), "l2-prefetch-normal")
VARIANTS["ln-wb-keep"] = _then("ln-keep-pf", "ln-no-pf")
# ln-one-trip: the earlier form's h (the same arithmetic, bf16 in shared memory) with the statistics, x, ln_w and ln_b
# of a thread's two chunks a round loaded together after the wait (x and the statistics through L2), one round trip
LN_ONE_TRIP = """    if constexpr (LN) {
        const double s1 = __ldcg(ln_stats), s2 = __ldcg(ln_stats + 1);
        uint4* hw = reinterpret_cast<uint4*>(gemv_smem);
        const float4* xq = reinterpret_cast<const float4*>(x);
        const float4* wq = reinterpret_cast<const float4*>(ln_w);
        const float4* bq = reinterpret_cast<const float4*>(ln_b);
        auto h8 = [&](float4 x0, float4 x1, float4 w0, float4 w1, float4 b0, float4 b1) {
            const float v[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
            const float g[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
            const float o[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
            float h[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) h[i] = (v[i] - mean[0]) * rstd[0] * g[i] + o[i];
            return make_uint4(pack_bf2(h[0], h[1]), pack_bf2(h[2], h[3]), pack_bf2(h[4], h[5]), pack_bf2(h[6], h[7]));
        };
        for (int c = tid; c < KC; c += 2 * T) {
            const int d = c + T < KC ? c + T : c;
            const float4 x0 = __ldcg(xq + 2 * c), x1 = __ldcg(xq + 2 * c + 1), y0 = __ldcg(xq + 2 * d), y1 = __ldcg(xq + 2 * d + 1);
            const float4 w0 = wq[2 * c], w1 = wq[2 * c + 1], v0 = wq[2 * d], v1 = wq[2 * d + 1];
            const float4 b0 = bq[2 * c], b1 = bq[2 * c + 1], e0 = bq[2 * d], e1 = bq[2 * d + 1];
            const double m = s1 / K, var = fmax(s2 / K - m * m, 0.0);
            mean[0] = (float)m;
            rstd[0] = rsqrtf((float)var + eps);
            hw[c] = h8(x0, x1, w0, w1, b0, b1);
            hw[d] = h8(y0, y1, v0, v1, e0, e1);
        }
"""
VARIANTS["ln-one-trip"] = lambda src: _replace(src, LN_BLOCK, LN_ONE_TRIP)
VARIANTS["ln-one-trip-nocap"] = _then("ln-one-trip", "ln-launch-bounds")   # (12 bytes spilled at 104)
# h's loop and the early weights. decode.cu (since the twenty-second session, "LN weights" there) holds one weight
# chunk a row through the wait (LN_FETCH_ONE) and takes h's chunks in pairs, both chunks' x, ln_w and ln_b issued
# in one round (LN_H_PAIR), loading the rows' second chunks after h (LN_WB). The forms it replaced, as variants:
# ln-two-early, decode.cu before (two chunks a row through the wait, h a chunk a round: two round trips after the
# statistics at 3b); ln-h-pair, two chunks held and h in pairs (SASS at the 104-register cap: 6 + 3 + 3 loads, 8
# bytes spilled; twenty-first session, call 3: 3b-4e1t 1.6589 / 1.6601 against ln-two-early's 1.6469 / 1.6457,
# 2-1.6b 0.9922 / 0.9919 against 0.9870 / 0.9862); ln-wa-early, one chunk held and h a chunk a round (+0.019 ms at
# 3b, +0.004 at 1.6b against ln-two-early); ln-h-unroll2, ln-two-early with the compiler's unroll of h's loop (SASS:
# still a chunk a round). decode.cu against ln-two-early (each side tuned for itself, twenty-first session's call 6):
# 3b-4e1t 1.6359 / 1.6365 against 1.6549 / 1.6558, 2-1.6b 0.9670 / 0.9791 against 0.9795 / 0.9930. (The
# twenty-first session's ln-wa-pair is decode.cu now, its x-wa-pair is x-pair-lb and its ln-wa-early2 ln-early2.)
LN_H_PAIR = ("        for (int c = tid; c < KC; c += 2 * T) {\n"
             "            const int d = c + T < KC ? c + T : c;     // both chunks' loads in one round (d == c: stored "
             "twice,\n"
             "                                                      // the same value by the same thread)\n"
             "            float h[8], e[8];\n" + LN_H + LN_E + _store_h("c", "h", 12) + _store_h("d", "e", 12) +
             "        }\n")
LN_H_LOOP = "        for (int c = tid; c < KC; c += T) {\n            float h[8];\n" + LN_H
LN_H_SINGLE = LN_H_LOOP + _store_h("c", "h", 12) + "        }\n"
LN_FETCH_TWO = "    point_at(g);\n    fetch();\n    PDL_WAIT();"
LN_PREFETCH = "        gemv_prefetch_from<R>(wrow, tid + T, T, KC);\n"     # the rest of the rows into L2
LN_FETCH_ONE = ("    point_at(g);\n"
                "    if constexpr (LN) {                          // one chunk a row through the wait: \"LN weights\" "
                "above\n"
                "        gemv_load_chunk<R>(wa, wrow, tid, KC);\n" + LN_PREFETCH +
                "    } else {\n        fetch();\n    }\n    PDL_WAIT();")
LN_WB_LOAD = "        gemv_load_chunk<R>(wb, wrow, tid + T, KC);\n"
LN_HW = "        uint4* hw = reinterpret_cast<uint4*>(gemv_smem);  // h into shared memory once (batch 1)\n"
LN_WB = LN_WB_LOAD + "        __syncthreads();\n"
LN_BLOCK = ("    if constexpr (LN) {\n#pragma unroll\n        for (int b = 0; b < BM; ++b) {\n" + LN_STATS_M +
            "            mean[b] = (float)m;\n            rstd[b] = rsqrtf((float)var + eps);\n        }\n" +
            LN_HW + LN_H_PAIR)
VARIANTS["ln-wa-early"] = lambda src: _replace(src, LN_H_PAIR, LN_H_SINGLE)
# Where the rows' second chunks load (decode.cu: after h's stores, before the barrier; written after the barrier
# instead, ptxas moves them back: the same SASS): ln-wb-before-h right after the statistics, before h's loads.
# ln-no-h-sync drops the barrier after h: a thread reads only the chunks of h it wrote itself (c = tid + k T in
# both loops), so it orders nothing.
VARIANTS["ln-wb-before-h"] = _then(lambda src: _replace(src, LN_WB, "        __syncthreads();\n"),
                                   lambda src: _replace(src, LN_H_PAIR, LN_WB_LOAD + LN_H_PAIR))
VARIANTS["ln-no-h-sync"] = lambda src: _replace(src, LN_WB, LN_WB_LOAD)
VARIANTS["ln-h-pair"] = _then(lambda src: _replace(src, LN_FETCH_ONE, LN_FETCH_TWO),
                              lambda src: _replace(src, LN_WB, "        __syncthreads();\n"))
VARIANTS["ln-two-early"] = _then("ln-wa-early", "ln-h-pair")
VARIANTS["ln-h-unroll2"] = _then("ln-two-early", lambda src: _replace(src, LN_H_LOOP, "#pragma unroll 2\n" + LN_H_LOOP))
# x-pair: the batch-1 GEMVs that read x from global memory (o_proj, down: gemv_b1_r*) load both of a thread's x
# chunks (c, c + T) before the first product; decode.cu's SASS loads x[c], multiplies, then loads x[c + T] behind
# the `if (c + T < KC)` branch: two dependent round trips after the wait where one suffices. It raises gemv_b1_r4
# from 64 registers to 85 (no longer two 512-thread blocks a SM), so x-pair-lb holds R <= 4 to 64. Twenty-first
# session (call 4): x-pair-lb 1.7187 / 1.7191 against 1.6606 / 1.6611 (3b), 0.9985 / 0.9977 against 0.9794 / 0.9792
# (1.6b): slower, and x-wa-pair (with ln-wa-pair) 1.7073 / 0.9866; why was not looked at
GEMV_LOOP = ("            gemv_accum<BM, R>(acc, wa, load_x, c, nb);\n"
             "            if (c + T < KC) gemv_accum<BM, R>(acc, wb, load_x, c + T, nb);\n")
X_PAIR = ("            if constexpr (BM == 1 && !LN) {              // (probe: x-pair) both x chunks in flight\n"
          "                const uint4 xa = xv[c];\n"
          "                const uint4 xb = c + T < KC ? xv[c + T] : make_uint4(0u, 0u, 0u, 0u);\n"
          "                auto xa8 = [&](int, int, float (&xf)[8]) { unpack8(xa, xf); };\n"
          "                auto xb8 = [&](int, int, float (&xf)[8]) { unpack8(xb, xf); };\n"
          "                gemv_accum<BM, R>(acc, wa, xa8, c, nb);\n"
          "                if (c + T < KC) gemv_accum<BM, R>(acc, wb, xb8, c + T, nb);\n"
          "            } else {\n" + GEMV_LOOP.replace("            ", "                ") + "            }\n")
VARIANTS["x-pair"] = lambda src: _replace(src, GEMV_LOOP, X_PAIR)
# x-pair-lb: that, with the batch-1 GEMVs of R <= 4 held to 64 registers (two 512-thread blocks a SM, as decode.cu's
# build has them at 64; x-pair alone raises gemv_b1_r4 to 85)
GEMV_B_LB = 'extern "C" __global__ void __launch_bounds__(GEMV_MAX_WARPS * 32) gemv_b##BM##_r##R('
VARIANTS["x-pair-lb"] = _then("x-pair", lambda src: _replace(src, GEMV_B_LB, GEMV_B_LB.replace(
    "GEMV_MAX_WARPS * 32)", "GEMV_MAX_WARPS * 32, (BM) == 1 && (R) <= 4 ? 2 : 0)")))
VARIANTS["ln-early1"] = _ln_early(1)
VARIANTS["ln-early2"] = _ln_early(2)
# ln-wb-smem: ln_w and ln_b of a thread's chunks copied into shared memory by cp.async before the PDL wait (no kernel
# writes them; no registers held through the wait), read from there by h's loop, so that after the wait only the
# statistics and x come from L2 (ln-no-wb, the bound without ln_w / ln_b, was -0.030 ms at 3b before the L2
# prefetch). Static shared memory for K <= 2,560 (3b-4e1t, 2-1.6b). Twenty-second session: correct and far slower
# (3b-4e1t 2.3060 against 1.6359 ms a step, 2-1.6b 1.4369 against 0.9665; tuned for itself 1.9734 / 1.1632;
# suspected, not measured: 20 KB a block changes which kernels share a SM)
LN_WB_PTRS = ("        const float4* wr = reinterpret_cast<const float4*>(ln_w) + 2 * c;\n"
              "        const float4* br = reinterpret_cast<const float4*>(ln_b) + 2 * c;\n")
LN_WB_COPY = (LN_PREFETCH +
              "        for (int c = tid; c < KC && c < 320; c += T) {     // (probe: ln-wb-smem)\n"
              "            cp_async16(lnwb_s + 4 * c, reinterpret_cast<const float4*>(ln_w) + 2 * c, 16);\n"
              "            cp_async16(lnwb_s + 4 * c + 1, reinterpret_cast<const float4*>(ln_w) + 2 * c + 1, 16);\n"
              "            cp_async16(lnwb_s + 4 * c + 2, reinterpret_cast<const float4*>(ln_b) + 2 * c, 16);\n"
              "            cp_async16(lnwb_s + 4 * c + 3, reinterpret_cast<const float4*>(ln_b) + 2 * c + 1, 16);\n"
              "        }\n        cp_async_commit();\n")
VARIANTS["ln-wb-smem"] = _then(
    lambda src: _insert(src, "    __shared__ float red[GEMV_MAX_WARPS][BM * R];\n",
                        "    __shared__ __align__(16) float4 lnwb_s[LN ? 1280 : 1];   // (probe: ln-wb-smem)\n",
                        before=False),
    lambda src: _replace(src, LN_WB_PTRS, "        const float4* wr = lnwb_s + 4 * c;\n"
                                          "        const float4* br = wr + 2;\n"),
    lambda src: _replace(src, LN_FETCH_ONE, _replace(LN_FETCH_ONE, LN_PREFETCH, LN_WB_COPY)),
    lambda src: _replace(src, LN_HW, '        asm volatile("cp.async.wait_all;\\n" ::: "memory");\n' + LN_HW))
VARIANT_CONSTANTS = {"att-w2": dict(ATT_THREADS=64, ATT_TK=32, ATT_NW=2, ATT_RW=16),
                     "att-w8": dict(ATT_THREADS=256, ATT_TK=128, ATT_NW=8, ATT_RW=16),
                     "att-w16": dict(ATT_THREADS=512, ATT_TK=256, ATT_NW=16, ATT_RW=16)}
VARIANT_CONSTANTS.update({f"{base}-g1": VARIANT_CONSTANTS[base] for base in ("att-w8", "att-w16")})   # att-g1 on them


@contextlib.contextmanager
def constants(name):
    """decode_kernels' attention constants as variant `name` was built with, restored after."""
    new = VARIANT_CONSTANTS.get(name, {})
    saved = {k: getattr(kn, k) for k in new}
    for k, v in new.items():
        setattr(kn, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(kn, k, v)


ABLATIONS = {
    "full step": lambda tag: True,
    "no attention": lambda tag: tag != "attention",
    "no layernorm": lambda tag: tag != "layernorm",
    "no attention, no layernorm": lambda tag: tag not in ("attention", "layernorm"),
    "no o_proj": lambda tag: tag != "gemv:o_proj",
    "no down": lambda tag: tag != "gemv:down",
    "GEMVs only": lambda tag: tag.startswith("gemv"),
}


def log(*a):
    print(*a, flush=True)


def kernels_for(name, patch, src_rev=None):
    """DecodeKernels built from the working tree's decode.cu changed by `patch` (text -> text), or from another
    commit's (src_rev), or from a file (src_rev = 'file:PATH')."""
    if src_rev is None and patch is None:
        return kn.DecodeKernels()
    if src_rev is None:
        text = patch(launch.SOURCE.read_text())
        if text is None:
            raise SystemExit(f"variant {name}: decode.cu no longer has the line it changes")
    elif src_rev.startswith("file:"):
        text = Path(src_rev[5:]).read_text()
    else:
        text = subprocess.run(["git", "show", f"{src_rev}:stablelm_ref/cuda/decode.cu"], check=True,
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    with tempfile.TemporaryDirectory(prefix="decode-probe-") as folder:   # read (and built) by DecodeKernels()
        tmp = Path(folder) / "decode.cu"
        tmp.write_text(text)
        saved, launch.SOURCE = launch.SOURCE, tmp
        try:
            return kn.DecodeKernels()
        finally:
            launch.SOURCE = saved


def probe_source(cuh, source, hook, unit, macros):
    """A probe build's source: the probe's header `cuh` (a .cuh in tools/) put before `source`, the text of the
    shipped `unit` (decode.cu, or decode_step.cu's translation unit), whose empty `macros` give way to those the
    header defines, provided `source` still has the `hook` line that tests for them. Without it the unit's own
    macros would replace the probe's and nothing would be recorded: refused, saying what to do."""
    if hook not in source:
        raise SystemExit(f"{unit} has no line {hook!r}: without it its own {macros} would replace {cuh.name}'s "
                         "and nothing would be recorded; put the line back above their definitions")
    return cuh.read_text() + source


def time_graph(engine, ids, g, steps=127, reps=3):
    """ms per replay of g, `steps` replays after a fresh prefill, median of reps (after one warm-up)."""
    out = []
    for r in range(reps + 1):
        engine.prefill(ids, logits=None)
        ms = engine.replay_ms(g, replays=steps, reps=1, warmup=False)
        if r:
            out.append(ms)
    return float(np.median(out))


def print_tune_log(entries):
    """Per GEMV kind: the 3 best shapes alone (rows, threads, us, GB/s), then every timing within the step;
    then the attention's shapes timed within the step (the tuner's third stage; it is never timed alone)."""
    for kind in dict.fromkeys(e[2] for e in entries if e[0] == "alone"):
        best = [e[3] for e in entries if e[0] == "alone" and e[2] == kind][:3]
        log(f"    {kind:8s} alone, best 3: " + "; ".join(f"R{c[0]} T{c[1]}{' mma U%d' % c[5] if c[5] else ''} "
                                                    f"{c[3]:.1f} us {c[4]:.0f} GB/s" for c in best))
        for e in entries:
            if e[0] == "step" and e[2] == kind:
                c = e[3]
                log(f"    {kind:8s} in the step: R{c[0]} T{c[1]} persistent {c[2]}/SM"
                    f"{' mma U%d' % c[5] if c[5] else ''} -> {e[4]:.4f} ms")
    for e in entries:
        if e[0] == "step" and e[2] == "attention":
            log(f"    attention in the step: (split_tiles, nbuf) {e[3]} -> {e[4]:.4f} ms")
        if e[0] == "step" and e[2] == "whole-step kernel":
            log(f"    {f'whole-step kernel {e[3]}' if e[3] else 'per-layer launches'}: {e[4]:.4f} ms")


def batch_ab(cfg, params, batches, prompt, steps):
    """The decode step at each batch size, its GEMVs tuned among the CUDA-core shapes only (A) and with the
    tensor-core GEMV's offered too (B), in one engine: ms a step (graph replays of the captured step, as the
    tuner times it) and the ratio; B's choice per matrix kind."""
    engine = de.GpuDecodeEngine(cfg, params, max_batch=max(batches), max_len=prompt + steps + 9, pdl=True)
    engine.att_fit = False
    engine.tune_cache = False
    if not engine.k.tensor_cores:        # DecodeKernels: compute capability >= 8.0 (bf16 mma.sync)
        log(f"batch A/B skipped: {engine.k.device_name} has no bf16 tensor-core mma (compute capability < 8.0)")
        return {}
    out = {}
    for nb in batches:
        ids = np.random.default_rng(nb).integers(2, cfg.vocab_size, (nb, prompt))
        row = {}
        for label, tc in (("cuda cores", False), ("tensor cores offered", True)):
            engine.k.tensor_cores = tc
            engine.forget_tuning(nb)
            engine.prefill(ids, logits=None)
            engine.capture(nb)
            row[label] = engine.time_step(nb, replays=20, reps=5)
            row[label + " tuning"] = {n: (v.rows, v.threads, v.persist, v.unroll) for n, v in engine.tuning[nb].items()}
        row["speed-up"] = row["cuda cores"] / row["tensor cores offered"]
        out[nb] = row
        log(f"batch {nb}: step {row['cuda cores']:.4f} ms (CUDA-core GEMV) vs {row['tensor cores offered']:.4f} ms "
            f"(tensor cores offered): {row['speed-up']:.2f}x; "
            f"{nb * 1e3 / row['tensor cores offered']:.0f} tok/s total; "
            f"chosen (rows, threads, persist, unroll) {row['tensor cores offered tuning']}")
    return out


def fold_ab(engine, ids, steps, rounds=2, attr="fold_layernorm", what="the layers' LayerNorms", retune=True):
    """Batch 1, `what` folded into the GEMVs that read them (gemv_ln; engine.<attr> True) or as kernels, each
    tuned for itself (retune; else both with the engine's tuning: the fold's own cost, without the tuner's
    spread between two tunings), in alternating rounds (the device's speed drifts): ms a step for each, and the
    ratio of the medians."""
    times = {True: [], False: []}
    setattr(engine, attr, True)
    tunings = {True: engine.tuning_state()}           # the engine's (tuned with the fold, the engine's default)
    for _ in range(rounds):
        for fold in (True, False):
            setattr(engine, attr, fold)
            engine.set_tuning_state(tunings.get(fold if retune else True, ({}, {}, {})))
            engine.prefill(ids, logits=None)
            times[fold].append(time_graph(engine, ids, engine.capture(1), steps))
            tunings[fold] = engine.tuning_state()
    setattr(engine, attr, True)
    engine.set_tuning_state(tunings[True])
    on, off = float(np.median(times[True])), float(np.median(times[False]))
    log(f"    {what} folded into the GEMVs: {on:.4f} ms/step ({times[True]}); as kernels: {off:.4f} ms/step "
        f"({times[False]}): {off / on:.3f}x")
    return {"folded ms": on, "kernels ms": off, "rounds": {"folded": times[True], "kernels": times[False]}}


def carveout_sweep(engine, ids, steps, percents, res):
    """The step with every GEMV kernel's preferred shared-memory carveout set to each percent (the driver's
    default, -1, restored after): a GEMV block holds <= 48 KB, so the carveout decides how much shared memory
    is left on its SM for an attention block to start beside it before the GEMV ends."""
    fns = list(engine.k.gemv_fn.values()) + list(engine.k.gemv_ln_fn.values())
    for pct in list(percents) + [-1]:
        for f in fns:                                   # CuPy's RawKernel sets the driver attribute
            f.preferred_shared_memory_carveout = pct
        engine.reset_plans()
        cms = time_graph(engine, ids, engine.capture(1), steps)
        res[f"gemv carveout {pct}"] = cms
        log(f"    GEMV shared-memory carveout {pct:4d}%: {cms:.4f} ms/step {1e3 / cms:6.1f} tok/s")


GEMV_FIELDS = ("rows", "threads", "persist")


def parse_changes(spec):
    """'o_proj.persist=4,attention.carveout=100' -> [(kind, field, int value)]: GEMV shape fields (GEMV_FIELDS) of a
    kind's tuned shape, or `carveout` (the kind's launches' preferred shared-memory carveout, percent)."""
    out = []
    for item in spec.split(","):
        kind, _, rest = item.partition(".")
        field, _, value = rest.partition("=")
        if field not in GEMV_FIELDS + ("carveout",) or not value.lstrip("-").isdigit():
            raise SystemExit(f"--ab: {item!r} is not KIND.FIELD=INT with FIELD in {GEMV_FIELDS + ('carveout',)}")
        out.append((kind, field, int(value)))
    return out


@contextlib.contextmanager
def changed(engine, changes, nb=1):
    """The engine with batch nb's tuned GEMV shapes and the launches' carveouts changed as listed (parse_changes;
    a GEMV field as a (kind, field, value) triple), put back afterwards (plans and graphs dropped both times)."""
    state, carveout = engine.tuning_state(), dict(engine.carveout)
    tuning = dict(engine.tuning[nb])
    for kind, field, value in changes:
        if field == "carveout":
            engine.carveout[kind] = value
        else:
            tuning[kind] = tuning[kind]._replace(**{field: value})
    engine.tuning[nb] = tuning
    engine.reset_plans()
    try:
        yield
    finally:
        engine.set_tuning_state(state)
        engine.carveout = carveout


def ab_changes(engine, specs, res, rounds=3):
    """The step as tuned against the step with each spec's changes (parse_changes), in alternating rounds
    (time_step, 20 replays, medians)."""
    cases = [("tuned", [])] + [(spec, parse_changes(spec)) for spec in specs]
    times = {name: [] for name, _ in cases}
    for _ in range(rounds):
        for name, ch in cases:
            with changed(engine, ch):
                times[name].append(engine.time_step(1, replays=20))
    base = float(np.median(times["tuned"]))
    res["ab"] = {name: t for name, t in times.items()}
    for name, t in times.items():
        m = float(np.median(t))
        log(f"    A/B {name:48s} {m:.4f} ms/step ({m - base:+.4f}; {', '.join(f'{v:.4f}' for v in t)})")


def cluster_ab(engine, res, rounds=5):
    """The tuned step with the attention's splits as thread-block clusters (combined in shared memory) against
    the global-memory combine, alternating rounds (time_step, 20 replays, medians)."""
    was = engine.att_cluster
    times = {True: [], False: []}
    for _ in range(rounds):
        for on in (False, True):
            engine.att_cluster = on
            engine.reset_plans()
            times[on].append(engine.time_step(1, replays=20))
    engine.att_cluster = was
    engine.reset_plans()
    off, on = float(np.median(times[False])), float(np.median(times[True]))
    res["cluster A/B"] = {"global combine": times[False], "cluster combine": times[True]}
    log(f"    attention combine: global {off:.4f} ms/step, cluster {on:.4f} ({on - off:+.4f}); "
        f"rounds {', '.join(f'{a:.4f}/{b:.4f}' for a, b in zip(times[False], times[True]))}")


TUNER_FORMS = {   # name -> tune.py's constants for that form of the tuner ({}: as shipped)
    "previous": dict(TUNE_STARTS=1),           # one stage-2 search (the fourteenth session's tuner)
    "current": {},
}


def tune_ab(engine, ids, steps, res, rounds, forms=tuple(TUNER_FORMS)):
    """Batch 1 tuned from scratch `rounds` times with each of `forms` (TUNER_FORMS: the previous tuner, one
    stage-2 search, and the current one, tune.TUNE_STARTS searches), alternating: each tuning's step time
    (time_graph) and seconds of tuning. Two tunings of one engine can land on different optima (the ninth
    session's q|k|v / down pair), so one tuning each says little. forms=("current",): the current tuner alone,
    `rounds` times (its spread)."""
    saved = {k: getattr(tune, k) for form in TUNER_FORMS.values() for k in form}
    out = {name: [] for name in forms}
    try:
        for _ in range(rounds):
            for name in forms:
                for k, v in saved.items():
                    setattr(tune, k, TUNER_FORMS[name].get(k, v))
                engine.forget_tuning(1)
                engine.prefill(ids, logits=None)
                t0 = time.time()
                g = engine.capture(1)
                secs = time.time() - t0
                ms = time_graph(engine, ids, g, steps)
                shapes = {n: tuple(v[:3]) for n, v in engine.tuning[1].items()}
                ends = [round(e[3], 4) for e in engine.tune_log if e[0] == "end"]
                engine.tune_log.clear()
                out[name].append({"ms": ms, "tuning s": secs, "shapes": shapes, "searches' ends ms": ends})
                log(f"    tuner {name:8s} {ms:.4f} ms/step, tuned in {secs:.1f} s: {shapes}"
                    + (f"; the searches' ends {ends}" if ends else ""))
    finally:
        for k, v in saved.items():
            setattr(tune, k, v)
    res["tune A/B"] = out
    for name, runs in out.items():
        ms = [r["ms"] for r in runs]
        log(f"    tuner {name:8s}: median {np.median(ms):.4f} ms/step, worst {max(ms):.4f}, best {min(ms):.4f}; "
            f"tuning {np.median([r['tuning s'] for r in runs]):.1f} s")


def graph_steps(engine, ids, steps, counts, res, rounds=3):
    """ms a step with k whole steps (argmax included: each advances the cache) captured in one graph, in
    alternating rounds: what a graph launch costs between steps. Each step's embedding waits for the previous
    step in full (an ordinary edge: the attention reads the cache length before its PDL wait); "k+pdl" rows
    make that edge programmatic too (a race on the length: timing only)."""
    plan = engine._plan(1)

    def graph(k, boundary_pdl):
        pl = launch.PdlLauncher()
        bound = [pl.bind(fn, engine.stream.ptr, programmatic=engine.pdl and (i > 0 or (j > 0 and boundary_pdl)))
                 for j in range(k) for i, fn in enumerate(plan)]
        with engine.stream:
            engine.stream.begin_capture()
            try:
                for fn in bound:
                    fn()
            finally:
                g = engine.stream.end_capture()
        return g

    forms = [(k, False) for k in counts] + [(k, True) for k in counts if k > 1]
    graphs = {f: graph(*f) for f in forms}
    got = {f: [] for f in forms}
    for _ in range(rounds):
        for f in forms:
            got[f].append(time_graph(engine, ids, graphs[f], max(1, steps // f[0]), reps=1) / f[0])
    for f in forms:
        ms = float(np.median(got[f]))
        name = f"{f[0]}{'+pdl' if f[1] else ''} steps a graph"
        res[name] = ms
        log(f"    {name}: {ms:.4f} ms a step ({', '.join(f'{v:.4f}' for v in got[f])})")


def sweep_shapes(engine, kinds, res, top=3, rounds=3):
    """Batch 1: every launch shape of each GEMV kind (tune.gemv_candidates x persistent blocks 0 and
    TUNE_PERSIST) timed within the step as the tuner times it, the other kinds at the tuner's choice (the
    tuner itself tries only its TUNE_FINALISTS best-alone shapes there, then persistent blocks for the
    winner, then the winner at half its rows, tune.leaner); then the tuner's choice and the `top` best again,
    in alternating rounds (medians)."""
    base = dict(engine.tuning[1])

    def use(kind, c):
        return changed(engine, [(kind, f, v) for f, v in zip(GEMV_FIELDS, c)])

    for kind in kinds:
        Ws, mode = engine._gemv_shapes()[kind]
        timed = []
        for R, T, U in tune.gemv_candidates(Ws[0].shape[1], 1, mode):
            for P in (0,) + tune.TUNE_PERSIST:
                with use(kind, (R, T, P)):
                    timed.append((engine.time_step(1), (R, T, P)))
        timed.sort()
        chosen = (base[kind].rows, base[kind].threads, base[kind].persist)
        cands = [chosen] + [c for _, c in timed[:top] if c != chosen]
        times = {c: [] for c in cands}
        for _ in range(rounds):
            for c in cands:
                with use(kind, c):
                    times[c].append(engine.time_step(1, replays=20))
        res[f"sweep {kind}"] = {"all": [(c, ms) for ms, c in timed], "again": {str(c): t for c, t in times.items()}}
        log(f"    {kind}: {len(timed)} shapes in the step, (rows, threads, persist): best "
            + "; ".join(f"{c} {ms:.4f}" for ms, c in timed[:5]) + f"; worst {timed[-1][1]} {timed[-1][0]:.4f}")
        for c in cands:
            log(f"    {kind} {c}{' (the tuner' + chr(39) + 's)' if c == chosen else ''}: "
                f"{np.median(times[c]):.4f} ms/step ({', '.join(f'{t:.4f}' for t in times[c])})")


def use_kernels(engine, k, retune):
    engine.k = k
    if retune:
        engine.forget_tuning()
    engine.reset_plans()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--shapes", default="3b-4e1t", choices=list(FAMILY))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=127)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), metavar="VARIANT",
                    help="names from VARIANTS, or git:REV / file:PATH (decode.cu of that commit or file, timed at "
                         "the first variant's tuning, unlike --src-rev)")
    ap.add_argument("--batch", type=int, default=1,
                    help="the variants' step at this batch (rows of the random prompt; > 1 with the plain variant "
                         "loop and --ablate only)")
    ap.add_argument("--src-rev", default=None,
                    help="also time decode.cu of this git revision, or of file:PATH")
    ap.add_argument("--ablate", nargs="*", default=None, help="variants to ablate (default: the first)")
    ap.add_argument("--splits", type=int, nargs="*", default=[], help="attention splits to try (first of --variants)")
    ap.add_argument("--ln-threads", type=int, nargs="*", default=[],
                    help="LayerNorm block sizes to try (first of --variants; multiples of 32 up to 512)")
    ap.add_argument("--gemv-carveout", type=int, nargs="*", default=[],
                    help="shared-memory carveouts (percent) to try for every GEMV kernel (first of --variants)")
    ap.add_argument("--sweep", nargs="*", default=[], choices=["qkv", "o_proj", "gate_up", "down", "lm_head"],
                    help="every launch shape of these GEMV kinds timed within the step (first of --variants)")
    ap.add_argument("--persist", nargs="*", default=[], metavar="KIND:P",
                    help="persistent blocks per SM to try for one GEMV kind, e.g. o_proj:6 (first of --variants)")
    ap.add_argument("--ab", nargs="*", default=[], metavar="SPEC",
                    help="the tuned step against each SPEC's changes in alternating rounds, e.g. "
                         "o_proj.persist=4 or o_proj.rows=8,attention.carveout=100 (first of --variants)")
    ap.add_argument("--tunings", type=int, default=0, metavar="N",
                    help="the engine tuned from scratch N times (the current tuner): each tuning's step, its spread")
    ap.add_argument("--tune-ab", type=int, default=0, metavar="N",
                    help="tune batch 1 from scratch N times with the previous tuner (one stage-2 search) and N "
                         "times with the current one (tune.TUNE_STARTS searches), alternating (first of --variants)")
    ap.add_argument("--cluster-ab", action="store_true",
                    help="every variant: the attention's cluster combine against its global-memory combine")
    ap.add_argument("--graph-steps", type=int, nargs="*", default=[], metavar="K",
                    help="ms a step with K whole steps captured in one graph (e.g. 1 2 4 8)")
    ap.add_argument("--retune", action="store_true",
                    help="tune the GEMVs again for every variant (default: the first variant's choice for all)")
    ap.add_argument("--final-fold-ab", action="store_true",
                    help="the final LayerNorm folded into lm_head or as its kernel, one tuning (A/B, first variant)")
    ap.add_argument("--fold-ab", action="store_true",
                    help="batch 1: the step with the LayerNorms folded into the GEMVs vs as kernels")
    ap.add_argument("--batches", type=int, nargs="*", default=[],
                    help="batch sizes (2-8) to time with and without the tensor-core GEMV")
    ap.add_argument("--l2-persist-mb", type=int, default=0,
                    help="set aside this many MB of L2 for persisting (evict_last) lines first (cuCtxSetLimit)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.l2_persist_mb:
        import ctypes
        import cupy

        cupy.cuda.Device().use()                         # (the context exists)
        cupy.zeros(1)
        rc = ctypes.CDLL("libcuda.so.1").cuCtxSetLimit(ctypes.c_int(6), ctypes.c_size_t(args.l2_persist_mb << 20))
        print(f"L2 persisting set-aside {args.l2_persist_mb} MB: cuCtxSetLimit rc {rc}")

    t0 = time.time()
    cfg = engine_config(args.layers, FAMILY[args.shapes])
    max_len = args.prompt + args.steps + 9
    nb = args.batch
    batch1_only = [o for o in ("fold_ab", "final_fold_ab", "ln_threads", "splits", "gemv_carveout", "sweep", "persist",
                               "ab", "cluster_ab", "tune_ab", "tunings", "graph_steps") if getattr(args, o)]
    if nb > 1 and batch1_only:
        ap.error(f"--batch {nb}: these options time batch 1 only: {batch1_only}")
    ids = np.random.default_rng(0).integers(2, cfg.vocab_size, (nb, args.prompt))
    params = random_params(cfg)
    res = {}
    if args.batches:
        res["batches"] = batch_ab(cfg, params, args.batches, args.prompt, args.steps)
    bad = [v for v in args.variants if v not in VARIANTS and not v.startswith(("git:", "file:"))]
    if bad:
        ap.error(f"unknown variants {bad}: choose from {', '.join(VARIANTS)}, git:REV or file:PATH")
    todo = [(v, VARIANTS[v], None) if v in VARIANTS else (v, None, v.removeprefix("git:")) for v in args.variants]
    if args.src_rev:
        todo.insert(0, (f"rev {args.src_rev}", None, args.src_rev))
    engine = None
    ref_logits = None
    variant_constants = contextlib.ExitStack()
    for name, patch, rev in todo:
        variant_constants.close()                    # the previous variant's attention constants restored
        variant_constants.enter_context(constants(name))
        k = kernels_for(name, patch, rev)
        if engine is None:
            engine = de.GpuDecodeEngine(cfg, params, max_batch=nb, max_len=max_len, kernels=k, pdl=True)
            engine.tune_cache = False            # every variant timed by the tuner itself, never read from disk
            engine.att_fit = False               # one graph replayed over every length: the splits max_len needs
            log(f"GPU {k.device_name}; weights {engine.weight_bytes_per_step() / 1e9:.3f} GB per step "
                f"({time.time() - t0:.0f} s)")
        else:
            use_kernels(engine, k, args.retune or bool(args.src_rev))
        engine.prefill(ids, logits=None)
        engine.capture(nb)
        for _ in range(4):
            engine.decode_step()
        logits = engine.get_logits()
        if ref_logits is None:
            ref_logits, diff = logits, 0.0
        else:
            diff = float(np.abs(logits - ref_logits).max() / np.abs(ref_logits).max())
        plan = engine._plan(nb)
        ms = time_graph(engine, ids, engine.capture(nb), args.steps)
        tun = {n: (v.rows, v.threads, v.persist, round(v.us, 1), round(v.gbs))
               for n, v in engine.tuning[nb].items()}
        tun["step ms (tuner)"] = round(engine.step_ms.get(nb, float("nan")), 4)
        tun["attention (split_tiles, nbuf)"] = engine.att_shape.get(nb)
        res[name] = {"ms/step": ms, "tok/s": nb * 1e3 / ms, "logits rel diff vs first": diff, "tuning": tun,
                     "tune_log": list(engine.tune_log)}
        print_tune_log(engine.tune_log)
        engine.tune_log.clear()
        log(f"{name:12s} {ms:.4f} ms/step  {nb * 1e3 / ms:6.1f} tok/s  logits diff {diff:.2e}  tuning {tun} "
            f"({time.time() - t0:.0f} s)")
        if name in (args.ablate if args.ablate is not None else [todo[0][0]]):
            for aname, keep in ABLATIONS.items():
                sub = [fn for fn in plan if keep(fn.tag) or fn.tag in ("embed", "argmax")]
                if aname == "GEMVs only":
                    sub = [fn for fn in plan if keep(fn.tag)]
                ams = time_graph(engine, ids, engine.capture_launches(sub, pdl=True), args.steps)
                res[name][f"ablation {aname}"] = ams
                log(f"    {aname:28s} {len(sub):4d} launches {ams:.4f} ms  (step - this = {ms - ams:+.4f} ms)")
        if name == args.variants[0] and any(v.persist for v in engine.tuning[nb].values()):
            saved = dict(engine.tuning[nb])
            engine.tuning[nb] = {n: v._replace(persist=0) for n, v in saved.items()}
            engine.reset_plans()
            pms = time_graph(engine, ids, engine.capture(nb), args.steps)
            res[name]["no persistent blocks"] = pms
            log(f"    the same shapes, one block per row group: {pms:.4f} ms/step {nb * 1e3 / pms:6.1f} tok/s")
            engine.tuning[nb] = saved
            engine.reset_plans()
        if name == args.variants[0] and args.fold_ab:
            res[name]["fold A/B"] = fold_ab(engine, ids, args.steps)
        if name == args.variants[0] and args.final_fold_ab:
            res[name]["final fold A/B"] = fold_ab(engine, ids, args.steps, rounds=3, attr="fold_final_layernorm",
                                                  what="the final LayerNorm", retune=False)
        if name == args.variants[0] and args.ln_threads:
            for nt in args.ln_threads:
                for fn in engine._plan(1):
                    if fn.tag == "layernorm":
                        fn.block = (nt,)
                engine._graphs.clear()
                lms = time_graph(engine, ids, engine.capture(1), args.steps)
                res[name][f"layernorm threads {nt}"] = lms
                log(f"    layernorm threads {nt:4d}: {lms:.4f} ms/step {1e3 / lms:6.1f} tok/s")
            engine.reset_plans()
        if name == args.variants[0] and args.splits:
            real = engine.k.attention_splits
            for ns in args.splits:
                engine.k.attention_splits = lambda nb, kvh, ml, _ns=ns: _ns
                engine.reset_plans()
                sms = time_graph(engine, ids, engine.capture(1), args.steps)
                res[name][f"splits {ns}"] = sms
                log(f"    attention splits {ns:2d}: {sms:.4f} ms/step {1e3 / sms:6.1f} tok/s")
            engine.k.attention_splits = real
            engine.reset_plans()
        if name == args.variants[0] and args.gemv_carveout:
            carveout_sweep(engine, ids, args.steps, args.gemv_carveout, res[name])
        if name == args.variants[0] and args.sweep:
            sweep_shapes(engine, args.sweep, res[name])
        if name == args.variants[0] and args.persist:
            for item in args.persist:
                kind, p = item.split(":")
                was = engine.tuning[1][kind].persist
                with changed(engine, [(kind, "persist", int(p))]):
                    pms = time_graph(engine, ids, engine.capture(1), args.steps)
                res[name][f"persist {item}"] = pms
                log(f"    {kind} with {p} persistent blocks a SM (was {was}): {pms:.4f} ms/step")
        if name == args.variants[0] and args.ab:
            ab_changes(engine, args.ab, res[name])
        if args.cluster_ab:
            cluster_ab(engine, res[name])
        if name == args.variants[0] and args.tune_ab:
            tune_ab(engine, ids, args.steps, res[name], args.tune_ab)
        if name == args.variants[0] and args.tunings:
            tune_ab(engine, ids, args.steps, res[name], args.tunings, forms=("current",))
        if name == args.variants[0] and args.graph_steps:
            graph_steps(engine, ids, args.steps, args.graph_steps, res[name])
    variant_constants.close()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    log(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
