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
