"""cuda/cubin.py: CUDA source -> a cached cubin (nvcc, else NVRTC), on the CPU.

Compiling needs no GPU: with nvcc on PATH these tests build a tiny kernel for sm_90a into a temporary
cache, and check that it is an ELF file holding the kernel, that the second call reads it back without
compiling, that the cache key covers the source, both flag lists and the architecture, that a failed
compile names what each compiler said and writes nothing, and that without any compiler the message
names both attempts and what to do. The decode engine and the Hopper attention kernel, the two users,
run on a GPU in tests/gpu.
"""

import shutil
import sys

import pytest

from stablelm_ref.cuda import cubin
from stablelm_ref.errors import StableLmError

TINY = 'extern "C" __global__ void add_one(float* x, int n) {\n' \
       '    int i = blockIdx.x * blockDim.x + threadIdx.x;\n    if (i < n) x[i] += 1.0f;\n}\n'

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH: the compile tests "
                                "need CUDA's nvcc (no GPU); tests/gpu covers the NVRTC path")


@needs_nvcc
def test_a_kernel_is_compiled_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    path = cubin.compile_cached(TINY, "tiny", "90a", ("-O3",), (), tmp_path)
    assert path == cubin.cubin_path(TINY, "tiny", "90a", ("-O3",), (), tmp_path)
    assert path.name.startswith("tiny-") and path.name.endswith("-sm_90a.cubin")
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and b"add_one" in data                 # a cubin holding the kernel
    assert [p.name for p in tmp_path.iterdir()] == [path.name]           # no temporary file left behind

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again: the cache was not used")

    monkeypatch.setattr(cubin.subprocess, "run", no_compiler)
    monkeypatch.setitem(sys.modules, "cupy_backends", None)
    assert cubin.compile_cached(TINY, "tiny", "90a", ("-O3",), (), tmp_path) == path
    assert path.read_bytes() == data


def test_the_cache_key_covers_source_flags_and_architecture(tmp_path):
    key = dict(text=TINY, name="tiny", arch="90a", nvcc_flags=("-O3",), nvrtc_flags=("-std=c++17",))
    base = cubin.cubin_path(directory=tmp_path, **key)
    assert base == cubin.cubin_path(directory=tmp_path, **key)
    for change in (dict(text=TINY + "\n"), dict(arch="90"), dict(nvcc_flags=("-O2",)), dict(nvrtc_flags=())):
        assert cubin.cubin_path(directory=tmp_path, **{**key, **change}) != base, change
    assert cubin.cubin_path(**key).parent == cubin.cache_dir()


def test_the_cache_directory_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("STABLELM_REF_KERNEL_CACHE", str(tmp_path / "k"))
    assert cubin.cache_dir() == tmp_path / "k"


def test_without_nvcc_or_nvrtc_the_error_names_both_attempts_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))                    # no nvcc
    monkeypatch.setitem(sys.modules, "cupy_backends", None)                # no CuPy, so no NVRTC
    with pytest.raises(cubin.CompileError) as e:
        cubin.compile_cached(TINY, "tiny", "90a", directory=tmp_path / "cache", what="the tiny kernel",
                             advice="do this")
    text = str(e.value)
    assert text == ("could not build the tiny kernel for sm_90a (nvcc: not found on PATH; NVRTC: not available "
                    "(CuPy is not installed)); do this")
    assert isinstance(e.value, StableLmError) and isinstance(e.value, RuntimeError)
    assert list((tmp_path / "cache").iterdir()) == []


@needs_nvcc
def test_a_compile_error_says_what_nvcc_said_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy_backends", None)
    broken = TINY.replace("x[i] += 1.0f;", "x[i] += undeclared_name;")
    with pytest.raises(cubin.CompileError) as e:
        cubin.compile_cached(broken, "tiny", "90a", directory=tmp_path)
    text = str(e.value)
    assert text.startswith("could not build tiny for sm_90a (nvcc: ") and "undeclared_name" in text, text
    assert text.endswith("; NVRTC: not available (CuPy is not installed)); put CUDA's nvcc on PATH, or install "
                         "CuPy (its NVRTC)")
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_cache_is_a_compile_error_naming_the_directory_and_the_variable(tmp_path, monkeypatch):
    # A file where the cache directory should be: mkdir fails (as on a read-only $HOME) whoever runs this.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(cubin.CompileError) as e:
        cubin.compile_cached(TINY, "tiny", "90a", directory=blocker / "cache")
    text = str(e.value)
    assert text.startswith(f"cannot write the kernel cache {blocker / 'cache'} (") and \
        text.endswith("); set STABLELM_REF_KERNEL_CACHE to a writable directory"), text


@needs_nvcc
def test_a_cache_that_refuses_the_write_is_a_compile_error_and_leaves_no_file(tmp_path, monkeypatch):
    from stablelm_ref import checkpoint

    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint, "atomic_write", refuse)
    with pytest.raises(cubin.CompileError, match=r"^cannot write the kernel cache .*\(Permission denied\); set "
                                                 r"STABLELM_REF_KERNEL_CACHE to a writable directory$"):
        cubin.compile_cached(TINY, "tiny", "90a", directory=tmp_path)
    assert list(tmp_path.iterdir()) == []
