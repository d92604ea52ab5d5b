"""GPU tests: collected only where CuPy imports and a CUDA device is visible.

Elsewhere (CI, the CPU machines) the whole folder is skipped: collect_ignore_glob keeps pytest from
importing the test modules (which import cupy at the top), and the report header says why.
"""

import os

import pytest


def _why_no_gpu():
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        return f"cupy is not importable ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"no CUDA device visible ({type(e).__name__})"
    return None if n > 0 else "no CUDA device visible"


_REASON = _why_no_gpu()
collect_ignore_glob = ["test_*.py"] if _REASON else []

if not _REASON and os.environ.get("STABLELM_GPU_NO_POOL"):
    # for compute-sanitizer: give every array its own cudaMalloc (no CuPy memory pool), so that
    # an out-of-bounds access by a kernel lands outside any allocation and memcheck reports it
    import cupy

    cupy.cuda.set_allocator(None)


def pytest_report_header(config):
    if _REASON:
        return f"tests/gpu skipped: {_REASON}"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
