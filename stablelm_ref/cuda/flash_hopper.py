"""The Hopper (sm_90a, wgmma) prefill attention kernel: build, cache and launch flash_hopper.cu.

The same function as flash_prefill.flash_attention_prefill (flash_prefill.py checks the arguments and
calls `launch` here for the variants named "h..."), with both matrix products on wgmma; the mma.sync
kernel in flash_prefill.cu stays the readable one and the fallback. flash_hopper.cu's header says how
the kernel works.

Building. wgmma exists only in the arch-specific target sm_90a, which CuPy's own NVRTC call does not
name, so each specialisation (dtype, head dim, variant) is compiled here into a cubin:
`nvcc -cubin -arch=sm_90a` where nvcc is on PATH, else NVRTC (through CuPy's binding) with
-arch=sm_90a (cubin.compile_cached); the cubin is cached on disk (STABLELM_REF_KERNEL_CACHE, default
~/.cache/stablelm_ref) under a hash of its source and flags, so a machine without a GPU can prepare
them (`python -m stablelm_ref.cuda.flash_hopper --build DIR`). Where neither compiler works, or the GPU
is not compute capability 9.0, `usable()` is False and flash_prefill runs its mma.sync kernel.

The wgmma wrappers are generated (`_wgmma_wrappers`): a PTX wgmma names each of its 32 to 80
accumulator registers, one asm per shape. The warp-specialised variants (h24, h26: a producer warpgroup,
one thread of which loads every tile on TMA, and two consumers on mbarriers) take their setmaxnreg
register counts from `register_split` as template arguments and three tensor maps (`tensor_map`: the
driver's cuTensorMapEncodeTiled through ctypes) as kernel parameters.
"""

from __future__ import annotations

import pathlib
import warnings

from . import cubin

_SOURCE = pathlib.Path(__file__).with_name("flash_hopper.cu")

# (keys per tile BC, computing warpgroups per block NWG, pipelined, blocks per SM asked of the register
# allocator, warp-specialised WS 0/1): query rows per block = 64 * NWG, threads = 128 * NWG (+ 128
# for WS's producer warpgroup). Pipelined: FlashAttention-3's intra-warpgroup overlap (tile j's softmax
# while P_{j-1} V_{j-1} runs on the tensor cores), three K/V stages; otherwise one tile after the other,
# two stages. WS 1: one thread of a producer warpgroup loads Q, K and V on TMA into two stages whose K and
# V halves are freed apart, on mbarriers; setmaxnreg gives the consumers its registers (flash_hopper_body's
# comment).
VARIANTS = {
    "h1": (128, 2, False, 1, 0),  # 128 x 128 tiles, two warpgroups (FlashAttention-3's tile for D = 128)
    "h2": (64, 2, False, 1, 0),   # 128 x 64: half the S registers and shared memory per stage
    "h4": (128, 2, True, 1, 0),   # h1, pipelined
    "h5": (64, 2, True, 1, 0),    # h2, pipelined
    "h7": (64, 2, True, 2, 0),    # h5 in 128 registers: two blocks per SM (D = 64)
    "h24": (128, 2, True, 1, 1),  # h4 warp-specialised: a TMA producer and two consumers (D = 64, 80, 128)
    "h26": (112, 2, True, 1, 1),  # the same with 112-key tiles, so that two stages fit at D = 160
}
# Variants that fit each head dim (shared memory: D = 160 is stored as 192 columns, and 227 KB hold
# h1's two stages but not three at D = 160; registers: h7 fits 128 only at D = 64). Measured and not
# kept (docs/cuda_prefill_notes.md): h3/h6 (192 x 128, three warpgroups: spills in 168 registers), h8
# (96-key tiles), h9/h11/h12 (one warpgroup per block, 2-3 blocks per SM); warp-specialised with a
# cp.async producer of 128 threads (code in commit dc092dd): h15 (h4's tiles, the default at D = 80 and
# 128 before h24), h16 (h5's); h25 (h24 with 64-key tiles, below h26 at D = 160; also dc092dd); in commit
# 2dca1a9: h13/h14 (ping-pong of the two consumers), h17/h21 (row reductions in four chains), h18 (no
# proxy fence after "full"), h20 (three consumers), h22/h23 (O rescaled under Q K_j^T, FlashAttention-3's
# order).
CANDIDATES = {64: ("h1", "h2", "h4", "h5", "h7", "h24"), 80: ("h1", "h2", "h4", "h5", "h24"),
              128: ("h1", "h2", "h4", "h5", "h24"), 160: ("h2", "h5", "h26")}

# On a compute capability 9.0 GPU where this kernel builds (usable()): the variant flash_prefill runs per head
# dim, at the head dims where it measured faster than flash_prefill's mma.sync default
# (docs/cuda_prefill_notes.md).
# H200, B=4 H=32 L=4096 bf16 causal, TFLOP/s (wgmma variant vs the mma.sync default; SDPA's cuDNN kernel),
# all four warp-specialised with a TMA producer: 64: h24 357 vs v3 244 and h7 336 (SDPA 428), 80: h24 394
# vs v3 263 (371), 128: h24 517 vs v6 247 (587), 160: h26 515 vs v6 242 and h5 374 (527) (fifth round,
# call 2). docs/cuda_prefill_notes.md has every variant.
HOPPER_DEFAULT = {64: "h24", 80: "h24", 128: "h24", 160: "h26"}

_FLAGS_NVCC = ("-O3", "-std=c++17")     # cubin.compile_cached adds -cubin -arch=sm_90a (NVRTC: -arch=sm_90a)
_FLAGS_NVRTC = ("-std=c++17",)

_kernels: dict = {}     # (kind, D, variant) -> (cupy Function, threads, rows per block, smem bytes)
_usable: list = []      # [bool] once decided


def smem_bytes(D: int, variant: str) -> int:
    """Dynamic shared memory of one block: Q, two or three stages of K, V (D padded to whole 64-column
    blocks) and key-mask bytes (WS: two stages, four 8-byte mbarriers each instead), and 1024 bytes to
    align the swizzle atoms."""
    bc, nwg, pipe, _, ws = VARIANTS[variant]
    dp, stages = (D + 63) // 64 * 64, 3 if pipe and not ws else 2
    return 64 * nwg * dp * 2 + stages * (2 * bc * dp * 2 + (32 if ws else bc)) + 1024


def threads(variant: str) -> int:
    """Threads per block: 128 per computing warpgroup, and WS's producer warpgroup."""
    _, nwg, _, _, ws = VARIANTS[variant]
    return 128 * (nwg + (1 if ws else 0))


def register_split(D: int, variant: str) -> tuple:
    """(at launch, producer, consumers): registers per thread of a warp-specialised variant. The launch
    gives every thread the same share of the 64K registers (a multiple of 8; one block per SM); then
    setmaxnreg lowers the producer's to 24 (its one loading thread issues a copy per 64 columns of a tile)
    and the consumers take what it gave back. (0, 0, 0) for the other variants."""
    _, nwg, _, _, ws = VARIANTS[variant]
    if not ws:
        return (0, 0, 0)
    n, producer = threads(variant), 24
    entry = 65536 // n // 8 * 8
    return entry, producer, (entry * n - 128 * producer) // (128 * nwg) // 8 * 8


def kernel_name(kind: str, D: int, variant: str) -> str:
    return f"flash_hopper_{kind}_d{D}_{variant}"


def _wgmma_wrappers(n_s: int, n_o: int, bf16: bool) -> str:
    """The specialisations of wgmma_ss<n_s, bf16> (S = Q K^T, both operands in shared memory, K-major)
    and wgmma_rs<n_o, bf16> (O += P V, P in registers, V N-major: imm-trans-b = 1)."""
    ty = "bf16" if bf16 else "f16"
    flag = "true" if bf16 else "false"

    def regs(n, first=0):
        return ", ".join(f"%{first + i}" for i in range(n))

    def outs(n):
        return ", ".join(f'"+f"(d[{i}])' for i in range(n))

    ns, no = n_s // 2, n_o // 2
    return (
        f"template <> DEVI void wgmma_ss<{n_s}, {flag}>(float (&d)[{ns}], u64 desc_a, u64 desc_b,"
        f" int accumulate) {{\n"
        f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{ns + 2}, 0;\\n"\n'
        f'        "wgmma.mma_async.sync.aligned.m64n{n_s}k16.f32.{ty}.{ty} {{{regs(ns)}}}, '
        f'%{ns}, %{ns + 1}, p, 1, 1, 0, 0;\\n}}\\n"\n'
        f'        : {outs(ns)}\n'
        f'        : "l"(desc_a), "l"(desc_b), "r"(accumulate));\n'
        f"}}\n"
        f"template <> DEVI void wgmma_rs<{n_o}, {flag}>(float (&d)[{no}], const u32 (&a)[4], u64 desc_b) {{\n"
        f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{no + 5}, 0;\\n"\n'
        f'        "wgmma.mma_async.sync.aligned.m64n{n_o}k16.f32.{ty}.{ty} {{{regs(no)}}}, '
        f'{{{regs(4, no)}}}, %{no + 4}, p, 1, 1, 1;\\n}}\\n"\n'
        f'        : {outs(no)}\n'
        f'        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));\n'
        f"}}\n"
    )


def source(kind: str, D: int, variant: str) -> str:
    """flash_hopper.cu, behind flash_prefill.cu's shared helpers, with the wgmma wrappers and one
    extern "C" entry point for this specialisation."""
    bc, nwg, pipe, minb, ws = VARIANTS[variant]
    _, preg, creg = register_split(D, variant)
    bf16 = kind == "bf16"
    prefill = _SOURCE.with_name("flash_prefill.cu").read_text()
    shared = prefill[prefill.index("// BEGIN shared helpers"):prefill.index("// END shared helpers")]
    text = shared + _SOURCE.read_text().replace("// WGMMA_WRAPPERS (generated by flash_hopper.py)",
                                                _wgmma_wrappers(bc, D, bf16))
    params = ("const u16* __restrict__ Q, const u16* __restrict__ K, const u16* __restrict__ V, "
              "const u8* __restrict__ key_mask, u16* __restrict__ O, int H, int KVH, int T, int S, "
              "float scale_log2, int causal, int has_mask, i64 q_sb, i64 q_sh, i64 q_sr, "
              "i64 kv_sb, i64 kv_sh, i64 kv_sr, i64 o_sb, i64 o_sh, i64 o_sr")
    args = ("Q, K, V, key_mask, O, H, KVH, T, S, scale_log2, causal, has_mask, q_sb, q_sh, q_sr, "
            "kv_sb, kv_sh, kv_sr, o_sb, o_sh, o_sr")
    if ws:  # the three tensor maps, by value
        params += (", const __grid_constant__ TmaMap tq, const __grid_constant__ TmaMap tk, "
                   "const __grid_constant__ TmaMap tv")
        args += ", &tq, &tk, &tv"
    return text + (
        f'\nextern "C" __global__ void __launch_bounds__({threads(variant)}, {minb})\n'
        f"{kernel_name(kind, D, variant)}({params}) {{\n"
        f"    flash_hopper_body<{D}, {str(bf16).lower()}, {bc}, {nwg}, {str(pipe).lower()}, {ws}, {preg}, {creg}>({args});\n}}\n"
    )


def build(kind: str, D: int, variant: str, directory=None, verbose: bool = False) -> pathlib.Path:
    """The cached cubin of one specialisation, compiled (nvcc, else NVRTC: cubin.compile_cached) if it is not
    there yet. Raises cubin.CompileError (a RuntimeError), naming the compilers tried and their messages,
    when neither can build it."""
    name = kernel_name(kind, D, variant)
    return cubin.compile_cached(source(kind, D, variant), name, "90a", _FLAGS_NVCC, _FLAGS_NVRTC, directory,
                                what=f"the Hopper attention kernel {name}", advice="put CUDA 12.3+'s nvcc on "
                                "PATH, or use the mma.sync variants (flash_prefill.VARIANTS)", verbose=verbose)


def usable() -> bool:
    """True on a compute capability 9.0 GPU where the kernel builds (tried once: bf16 at D = 128 in
    HOPPER_DEFAULT[128], the variant the default path runs there). On such a GPU a failed build is reported
    once as a RuntimeWarning (the mma.sync kernel then runs)."""
    if not _usable:
        ok = False
        try:
            import cupy

            hopper = cupy.cuda.Device().compute_capability == "90"
        except Exception:  # noqa: BLE001  (no CuPy, no GPU: nothing to choose)
            hopper = False
        if hopper:
            try:
                get_kernel("bf16", 128, HOPPER_DEFAULT[128])
                ok = True
            except Exception as e:  # noqa: BLE001  (no compiler for sm_90a: the mma.sync kernel runs)
                warnings.warn(f"the Hopper (wgmma) attention kernel is not used, the slower mma.sync kernel "
                              f"runs instead: {e}", RuntimeWarning, stacklevel=2)
        _usable.append(ok)
    return _usable[0]


def get_kernel(kind: str, D: int, variant: str):
    key = (kind, D, variant)
    if key not in _kernels:
        import cupy

        if D not in CANDIDATES or variant not in CANDIDATES[D]:
            raise ValueError(f"Hopper variant {variant!r} does not fit head dim {D}; "
                             f"candidates: {CANDIDATES.get(D, ())}")
        module = cupy.RawModule(path=str(build(kind, D, variant)))
        fn = module.get_function(kernel_name(kind, D, variant))
        smem = smem_bytes(D, variant)
        fn.max_dynamic_shared_size_bytes = smem
        _kernels[key] = (fn, threads(variant), 64 * VARIANTS[variant][1], smem)
    return _kernels[key]


# The TMA variants (WS) fall back, per head dim, to these where a tensor map cannot describe an operand
# (an address or a stride that is not a multiple of 16 bytes, or the driver refuses): the fastest variant
# whose threads all load with cp.async (the fourth round's defaults, h4 where that round chose h15).
TMA_FALLBACK = {64: "h7", 80: "h4", 128: "h4", 160: "h5"}
_CU_DTYPE = {"bf16": 9, "fp16": 6}  # CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, _FLOAT16
_tmaps: dict = {}  # (kind, pointer, dims, strides, rows) -> encoded tensor map (a 128-byte numpy scalar array)
_encode: list = []  # [cuTensorMapEncodeTiled] once loaded


def tensor_map(kind: str, ptr: int, dims: tuple, strides: tuple, box_rows: int):
    """The tensor map (CUtensorMap, 128 bytes, from the driver's cuTensorMapEncodeTiled) of a 4-D bf16/fp16
    operand: dims (D, rows, heads, batch), element strides (row, head, batch); boxes of 64 columns (128
    bytes) x box_rows rows, written to shared memory in the 128-byte swizzle, zeros outside the operand.
    None where TMA cannot describe it (address or byte strides not multiples of 16, or the driver refuses
    or has no cuTensorMapEncodeTiled).
    Cached per operand (pointer, dims, strides, box): repeated calls on the same buffers and length reuse the
    map; a forward over new lengths or other buffers encodes its maps again."""
    import ctypes

    import numpy as np

    stride_bytes = [2 * st for st in strides]
    for i, n in enumerate(dims[1:]):  # a dimension of size 1 is never stepped: any legal stride will do
        if n == 1:
            stride_bytes[i] = 2 * dims[0] if i == 0 else stride_bytes[i - 1] * dims[i]
    key = (kind, ptr, dims, tuple(stride_bytes), box_rows)
    if key in _tmaps:
        return _tmaps[key]
    if ptr % 16 or any(st % 16 or not 0 < st < 2**40 for st in stride_bytes):
        return None
    if not _encode:
        try:
            fn = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
        except (OSError, AttributeError):  # no driver library by that name, or a driver before CUDA 12
            fn = None
        else:
            u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p,
                           u32p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
            fn.restype = ctypes.c_int
        _encode.append(fn)
    if _encode[0] is None:
        return None
    buf = (ctypes.c_uint64 * 24)()  # 192 bytes: room for 128 at a 64-byte aligned address
    at = (ctypes.addressof(buf) + 63) // 64 * 64
    status = _encode[0](ctypes.c_void_p(at), _CU_DTYPE[kind], 4, ctypes.c_void_p(ptr),
                        (ctypes.c_uint64 * 4)(*dims), (ctypes.c_uint64 * 3)(*stride_bytes),
                        (ctypes.c_uint32 * 4)(64, box_rows, 1, 1), (ctypes.c_uint32 * 4)(1, 1, 1, 1),
                        0, 3, 2, 0)  # no interleave, 128-byte swizzle, L2 promotion 128 bytes, zero fill
    if status != 0:
        return None
    value = np.frombuffer(ctypes.string_at(at, 128), dtype=np.dtype((np.void, 128)))  # passed by value
    if len(_tmaps) >= 512:
        _tmaps.clear()
    _tmaps[key] = value
    return value


def launch(kind: str, D: int, variant: str, grid_T: int, H: int, B: int, args) -> None:
    """Launch on `args` (flash_prefill's argument tuple, the same as its mma.sync kernel's); a TMA variant
    appends the tensor maps of q, k and v (or runs TMA_FALLBACK's variant where they cannot be made)."""
    bc, nwg, _, _, ws = VARIANTS[variant]
    if ws:
        q, k, v = args[:3]
        KVH, T, S = (int(a) for a in args[6:9])
        q_sb, q_sh, q_sr, kv_sb, kv_sh, kv_sr = (int(a) for a in args[12:18])
        maps = (tensor_map(kind, q.data.ptr, (D, T, H, B), (q_sr, q_sh, q_sb), 64 * nwg),
                tensor_map(kind, k.data.ptr, (D, S, KVH, B), (kv_sr, kv_sh, kv_sb), bc),
                tensor_map(kind, v.data.ptr, (D, S, KVH, B), (kv_sr, kv_sh, kv_sb), bc))
        if any(m is None for m in maps):
            variant = TMA_FALLBACK[D]
        else:
            args = (*args, *maps)
    fn, threads, rows, smem = get_kernel(kind, D, variant)
    fn(((grid_T + rows - 1) // rows, H, B), (threads,), args, shared_mem=smem)


def _main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="build the Hopper attention cubins (no GPU needed)")
    ap.add_argument("--build", metavar="DIR", help="cache directory (default: STABLELM_REF_KERNEL_CACHE)")
    ap.add_argument("--kinds", default="bf16,fp16")
    ap.add_argument("-v", action="store_true", help="print ptxas's register and spill report")
    a = ap.parse_args(argv)
    for kind in a.kinds.split(","):
        for D, variants in CANDIDATES.items():
            for variant in variants:
                p = build(kind, D, variant, a.build, verbose=a.v)
                print(p)


if __name__ == "__main__":
    _main()
