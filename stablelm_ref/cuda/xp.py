"""The array module the GPU code runs on: CuPy, or a NumPy stand-in the CPU tests put here.

tests/test_decode_engine_emulated.py sets BACKEND to a NumPy namespace with fake streams and graphs, so
the engine's plumbing (buffers, plans, bookkeeping, capture and replay) runs where there is no GPU.
"""

BACKEND = None


def cupy():
    """CuPy (imported on first use), or the stand-in in BACKEND."""
    if BACKEND is not None:
        return BACKEND
    try:
        import cupy as cp
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError("the GPU decode engine needs CuPy: in a checkout, .venv/bin/pip install -e '.[gpu]'; "
                          "where stablelm-ref is installed as a package, pip install 'stablelm-ref[gpu]'") from e
    return cp


class _HostBlock:
    """Pinned host memory from cudaHostAlloc, freed when the last view of it goes."""

    def __init__(self, runtime, ptr):
        self.runtime, self.ptr = runtime, ptr

    def __del__(self):
        try:
            self.runtime.freeHost(self.ptr)
        except Exception:  # noqa: BLE001 - interpreter shutdown, a context already gone
            pass


def mapped_host(cp, shape, dtype):
    """(host view, device view) of one zeroed array in pinned host memory mapped for the device (cudaHostAlloc
    portable | mapped): kernels write it through the device view, the host reads the numpy view once an event
    after them has completed, without a copy in the stream. None where the runtime gives no mapped memory (the
    stand-in backend, a platform without it): callers copy instead."""
    import ctypes

    import numpy as np

    runtime = getattr(getattr(cp, "cuda", None), "runtime", None)
    if runtime is None or not hasattr(runtime, "hostAlloc"):
        return None
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        ptr = runtime.hostAlloc(n, 1 | 2)                     # cudaHostAllocPortable | cudaHostAllocMapped
    except Exception:  # noqa: BLE001 - no mapped memory here: the copy path
        return None
    block = _HostBlock(runtime, ptr)
    try:
        dptr = runtime.pointerGetAttributes(ptr).devicePointer
    except Exception:  # noqa: BLE001
        return None
    if not dptr:                                              # not mapped after all: the copy path
        return None
    raw = (ctypes.c_byte * n).from_address(ptr)
    raw.block = block                                         # the numpy view keeps the memory
    host = np.frombuffer(raw, dtype).reshape(shape)
    host[...] = 0
    dev = cp.ndarray(shape, dtype, cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(dptr, n, block), 0))
    return host, dev
