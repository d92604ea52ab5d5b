"""CUDA source -> a cubin on disk, compiled once and kept: the kernel cache of decode.cu (launch.py) and
flash_hopper.cu (flash_hopper.py).

    path = compile_cached(text, "decode", "90", nvcc_flags=("-O3",))      # .../decode-<digest>-sm_90.cubin
    module = cupy.RawModule(path=str(path))

The cubin is kept in cache_dir() ($STABLELM_REF_KERNEL_CACHE, default ~/.cache/stablelm_ref), or the
`directory` given, named `{name}-{digest}-sm_{arch}.cubin` where digest hashes the source text, both flag
lists and the architecture: a change to any of them builds a new file, an unchanged one is read back.
The compiler is nvcc (`nvcc -cubin -arch=sm_{arch}`) where it is on PATH; where it is not, or it fails,
NVRTC through CuPy's binding (`-arch=sm_{arch}`). A machine with nvcc and no GPU can fill the cache for
one that has a GPU. The cubin is written to a temporary file beside its final name and renamed
(checkpoint.atomic_write), so a process reading the cache never sees half a file, and two processes
building the same kernel both leave a whole one. When neither compiler builds it, CompileError says what
each attempt answered and what to do.

CuPy's RawModule(code=...) (flash_prefill.py, fused.py) compiles with NVRTC into CuPy's own cache; this
module is for the sources that need nvcc's -O3 or an arch-specific target (sm_90a's wgmma), which
RawModule's NVRTC call does not name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import StableLmError


class CompileError(StableLmError, RuntimeError):
    """A CUDA source could not be compiled to a cubin by nvcc or NVRTC."""


def cache_dir() -> Path:
    """Where compiled kernels are kept: $STABLELM_REF_KERNEL_CACHE, default ~/.cache/stablelm_ref."""
    return Path(os.environ.get("STABLELM_REF_KERNEL_CACHE", Path.home() / ".cache" / "stablelm_ref"))


def cubin_path(text: str, name: str, arch: str, nvcc_flags=(), nvrtc_flags=(), directory=None) -> Path:
    """The cache file of `text` compiled for sm_{arch} with these flags (see the module docstring)."""
    key = "\0".join([text, " ".join(nvcc_flags), " ".join(nvrtc_flags), arch])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(directory or cache_dir()) / f"{name}-{digest}-sm_{arch}.cubin"


def compile_cached(text: str, name: str, arch: str, nvcc_flags=(), nvrtc_flags=(), directory=None,
                   what: str | None = None, advice: str = "put CUDA's nvcc on PATH, or install CuPy (its NVRTC)",
                   verbose: bool = False) -> Path:
    """The cached cubin of `text` for sm_{arch} (arch "90", "90a", ...), compiled if it is not there yet:
    nvcc with `nvcc_flags` where it is on PATH, else (or where it fails) NVRTC with `nvrtc_flags`.
    `what` names the kernel in the error ("the Hopper attention kernel ..."; default `name`), `advice` says
    what to do; verbose passes -Xptxas -v to nvcc and prints its report (registers, spills)."""
    target = cubin_path(text, name, arch, nvcc_flags, nvrtc_flags, directory)
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(target, e) from e
    attempts = []
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        attempts.append("nvcc: not found on PATH")
    else:
        with tempfile.TemporaryDirectory(prefix="stablelm-ref-nvcc-") as tmp:
            src, out = Path(tmp) / f"{name}.cu", Path(tmp) / f"{name}.cubin"
            src.write_text(text)
            flags = (*nvcc_flags, "-Xptxas", "-v") if verbose else tuple(nvcc_flags)
            done = subprocess.run([nvcc, "-cubin", f"-arch=sm_{arch}", *flags, "-o", str(out), str(src)],
                                  capture_output=True, text=True)
            if verbose:
                print(done.stderr)
            if done.returncode == 0:
                return _keep(target, out.read_bytes())
            attempts.append(f"nvcc: {done.stderr.strip()[-2000:]}")
    try:
        cubin = _nvrtc_cubin(text, name, [f"-arch=sm_{arch}", *nvrtc_flags])
    except ImportError:
        attempts.append("NVRTC: not available (CuPy is not installed)")
    except Exception as e:  # noqa: BLE001 - no NVRTC library, or a compile error: reported below
        attempts.append(f"NVRTC: {type(e).__name__}: {str(e).strip()[-2000:]}")
    else:
        return _keep(target, cubin)
    raise CompileError(f"could not build {what or name} for sm_{arch} ({'; '.join(attempts)}); {advice}")


def _unwritable(target: Path, e: OSError) -> CompileError:
    return CompileError(f"cannot write the kernel cache {target.parent} ({e.strerror or e}); set "
                        f"STABLELM_REF_KERNEL_CACHE to a writable directory")


def _keep(target: Path, cubin: bytes) -> Path:
    """Write a built cubin into the cache (atomically); an unwritable cache is a CompileError that says
    which directory and what to do, not an OSError from deep inside a model's first GPU step."""
    from ..checkpoint import atomic_write

    try:
        atomic_write(target, cubin)
    except OSError as e:
        raise _unwritable(target, e) from e
    return target


def _nvrtc_cubin(text: str, name: str, options) -> bytes:
    """NVRTC (CuPy's binding) -> cubin bytes; a failed compile raises with NVRTC's log."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(text, f"{name}.cu", (), ())
    try:
        try:
            nvrtc.compileProgram(prog, list(options))
        except Exception as e:
            raise RuntimeError(f"{e}: {nvrtc.getProgramLog(prog).strip()}") from None
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
