"""Building decode.cu and decode_step.cu and launching their kernels: a cached cubin (cubin.py: nvcc or NVRTC),
one bound launch per kernel call, programmatic dependent launches (PDL) and cooperative launches through the
driver, graph capture and replay timing.

    kernels = load_module(cupy)                       # decode.cu's cubin cached for this source and GPU
    build_step_cubin("90")                            # decode_step.cu after decode.cu's helpers (step_source())
    step = [Launch(fn, grid, block, args), ...]      # a decode step as a list of bound launches
    graph = capture_launches(stream, step, pdl=True) # one CUDA graph; with PDL each launch may start while
    replay_ms(stream, graph, replays=10)             #   its predecessor drains (decode.cu's PDL_WAIT)

CuPy's launcher has no launch attributes, hence PdlLauncher: cuLaunchKernelEx through ctypes, with the
struct layouts of cuda.h (CUDA 12/13); it also makes the whole-step kernel's cooperative launch (every block
resident: its grid barriers need it), the attention's cluster launch (the splits of a kv head as one
thread-block cluster) and applies a launch's shared-memory carveout.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import xp
from .cubin import compile_cached

SOURCE = Path(__file__).with_name("decode.cu")
STEP_SOURCE = Path(__file__).with_name("decode_step.cu")      # the batch-1 whole-step kernel (sm_90+)
HELPERS_END = "// ---------------------------------------------------------------- embedding"


def build_cubin(compute_capability: str, out_dir: str | os.PathLike | None = None) -> Path:
    """decode.cu's cubin for sm_{compute_capability} in out_dir (default: the kernel cache, cubin.cache_dir()),
    compiled if it is not there yet (cubin.compile_cached: nvcc, else NVRTC; a machine without a GPU can
    prepare it)."""
    return compile_cached(SOURCE.read_text(), "decode", compute_capability, nvcc_flags=("-O3",),
                          nvrtc_flags=("--std=c++17",), directory=out_dir, what="the decode kernels (decode.cu)")


def step_source() -> str:
    """decode_step.cu's translation unit: decode.cu's helpers (everything before its embedding section: bf16
    bits, warp sums, the PDL macros) followed by decode_step.cu, so the helpers are written once."""
    text = SOURCE.read_text()
    if HELPERS_END not in text:
        raise RuntimeError(f"{SOURCE.name} has no line {HELPERS_END!r}: decode_step.cu is compiled after the "
                           "helpers above it; put the marker back above the embedding kernel")
    return text[: text.index(HELPERS_END)] + STEP_SOURCE.read_text()


def build_step_cubin(compute_capability: str, out_dir: str | os.PathLike | None = None) -> Path:
    """The whole-step kernel's cubin (step_source()) for sm_{compute_capability}, like build_cubin."""
    return compile_cached(step_source(), "decode_step", compute_capability, nvcc_flags=("-O3",),
                          nvrtc_flags=("--std=c++17",), directory=out_dir,
                          what="the whole-step decode kernel (decode_step.cu)")


def load_module(cp):
    """decode.cu's module for this GPU, from its cached cubin (build_cubin), and where it came from.
    (tools/decode_probe.py times variants of decode.cu by pointing SOURCE at a patched copy.)"""
    cubin = build_cubin(cp.cuda.Device().compute_capability)
    return cp.RawModule(path=str(cubin)), f"cubin {cubin.name}"


def i32(v):
    return np.int32(v)


NULL = np.uint64(0)   # a null device pointer as a kernel argument


class Launch:
    """One kernel launch with its arguments bound (replayed eagerly or captured into a graph). carveout: the
    launch's preferred shared-memory carveout (percent of the SM's L1/shared memory), or None for the
    driver's choice; it takes effect where the launch goes through PdlLauncher (captures with a carveout or
    PDL, and a cooperative or cluster launch's eager call), not in an ordinary eager call. cluster: blocks
    along grid x launched as one thread-block cluster (sm_90; 0: none), always through PdlLauncher."""

    __slots__ = ("fn", "grid", "block", "args", "smem", "tag", "carveout", "cooperative", "cluster")

    def __init__(self, fn, grid, block, args, smem=0, tag="", carveout=None, cooperative=False, cluster=0):
        self.fn, self.grid, self.block, self.args, self.smem, self.tag = fn, grid, block, args, smem, tag
        self.carveout = carveout
        self.cooperative = cooperative      # every block resident at once (a grid barrier inside): PdlLauncher
        self.cluster = cluster

    def __call__(self):
        if self.cooperative or self.cluster:
            PdlLauncher().bind(self, xp.cupy().cuda.get_current_stream().ptr, programmatic=False)()
        else:
            self.fn(self.grid, self.block, self.args, shared_mem=self.smem)


class PdlLauncher:
    """Launches through the driver's cuLaunchKernelEx with programmatic stream serialization, so that in
    a captured graph each kernel may start while its predecessor drains (decode.cu's PDL_LAUNCH/PDL_WAIT).
    CuPy's launcher has no launch attributes, hence ctypes. Struct layouts as in cuda.h (CUDA 12/13)."""

    ATTR_COOPERATIVE = 2
    ATTR_CLUSTER_DIMENSION = 4
    ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6
    ATTR_PREFERRED_SHARED_MEMORY_CARVEOUT = 14

    def __init__(self):
        import ctypes as C
        self.C = C

        class Dim(C.Structure):
            _fields_ = [("x", C.c_uint), ("y", C.c_uint), ("z", C.c_uint)]

        class Value(C.Union):
            _fields_ = [("pad", C.c_char * 64), ("val", C.c_int), ("dim", Dim), ("_align", C.c_void_p)]

        class Attr(C.Structure):
            _fields_ = [("id", C.c_int), ("pad", C.c_char * 4), ("value", Value)]

        class Config(C.Structure):
            _fields_ = [("gridDimX", C.c_uint), ("gridDimY", C.c_uint), ("gridDimZ", C.c_uint),
                        ("blockDimX", C.c_uint), ("blockDimY", C.c_uint), ("blockDimZ", C.c_uint),
                        ("sharedMemBytes", C.c_uint), ("hStream", C.c_void_p), ("attrs", C.POINTER(Attr)),
                        ("numAttrs", C.c_uint)]

        self.Attr, self.Config = Attr, Config
        self.fn = C.CDLL("libcuda.so.1").cuLaunchKernelEx
        self.fn.restype = C.c_int
        self.fn.argtypes = [C.POINTER(Config), C.c_void_p, C.POINTER(C.c_void_p), C.c_void_p]

    def bind(self, launch: "Launch", stream_ptr: int, programmatic: bool):
        """A callable that launches `launch` on the stream (as a programmatic dependent if asked)."""
        C, cp = self.C, xp.cupy()
        vals = []
        for a in launch.args:
            if isinstance(a, cp.ndarray):
                vals.append(C.c_void_p(a.data.ptr))
            elif isinstance(a, np.uint64):
                vals.append(C.c_uint64(int(a)))
            elif isinstance(a, np.int32):
                vals.append(C.c_int32(int(a)))
            elif isinstance(a, np.float32):
                vals.append(C.c_float(float(a)))
            else:
                raise TypeError(f"PdlLauncher: unsupported kernel argument {type(a)}")
        params = (C.c_void_p * len(vals))(*[C.cast(C.pointer(v), C.c_void_p) for v in vals])
        want = [(self.ATTR_PROGRAMMATIC_STREAM_SERIALIZATION, 1)] if programmatic else []
        if getattr(launch, "cooperative", False):
            want.append((self.ATTR_COOPERATIVE, 1))
        if launch.carveout is not None:
            want.append((self.ATTR_PREFERRED_SHARED_MEMORY_CARVEOUT, int(launch.carveout)))
        if getattr(launch, "cluster", 0):
            want.append((self.ATTR_CLUSTER_DIMENSION, (int(launch.cluster), 1, 1)))
        attr = (self.Attr * max(1, len(want)))()
        for i, (aid, val) in enumerate(want):
            attr[i].id = aid
            if isinstance(val, tuple):
                attr[i].value.dim.x, attr[i].value.dim.y, attr[i].value.dim.z = val
            else:
                attr[i].value.val = val
        g = tuple(launch.grid) + (1,) * (3 - len(launch.grid))
        b = tuple(launch.block) + (1,) * (3 - len(launch.block))
        cfg = self.Config(g[0], g[1], g[2], b[0], b[1], b[2], launch.smem, stream_ptr, attr, len(want))
        func = launch.fn.kernel.ptr

        def run(_keep=(vals, params, attr, cfg)):
            rc = self.fn(C.byref(cfg), C.c_void_p(func), params, None)
            if rc != 0:
                raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {rc} ({launch.tag})")
        return run


def capture_launches(stream, launches, pdl: bool = False):
    """`launches` captured on `stream` as one CUDA graph; with pdl, each launch after the first is a
    programmatic dependent of its predecessor (PdlLauncher, which also applies a launch's carveout and
    cluster), except next to a cooperative launch (the whole-step kernel), which follows and precedes its
    neighbours fully."""
    coop = [bool(getattr(fn, "cooperative", False)) for fn in launches]
    if (pdl or any(coop) or any(getattr(fn, "carveout", None) is not None for fn in launches)
            or any(getattr(fn, "cluster", 0) for fn in launches)):
        pl = PdlLauncher()
        launches = [pl.bind(fn, stream.ptr, programmatic=pdl and i > 0 and not coop[i] and not coop[i - 1])
                    for i, fn in enumerate(launches)]
    with stream:
        stream.begin_capture()
        try:
            for fn in launches:
                fn()
        finally:
            g = stream.end_capture()
    return g


def replay_ms(stream, graph, replays: int = 1, reps: int = 3, warmup: bool = True) -> float:
    """Milliseconds per replay of `graph`: reps timings of `replays` back-to-back replays between CUDA
    events (after one untimed replay if warmup), median."""
    cp = xp.cupy()
    with stream:
        if warmup:
            graph.launch(stream)
        times = []
        for _ in range(reps):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record(stream)
            for _ in range(replays):
                graph.launch(stream)
            e1.record(stream)
            e1.synchronize()
            times.append(cp.cuda.get_elapsed_time(e0, e1) / replays)
    return float(np.median(times))
