"""The Hopper attention kernel's host side, on the CPU: variant bookkeeping, the generated source, the
choice between the wgmma and mma.sync kernels. (The kernel itself is tested on the GPU, in
tests/gpu/test_flash_prefill.py, against the float64 reference and the mma.sync kernel.)"""

import re
import warnings

import pytest

from stablelm_ref.cuda import flash_hopper, flash_prefill

SMEM_PER_BLOCK = 227 * 1024     # Hopper (sm_90): the most dynamic shared memory one block may ask for
SMEM_PER_SM = 228 * 1024        # ... and per multiprocessor, of which the driver keeps 1 KB per block


@pytest.mark.parametrize("D", flash_prefill.HEAD_DIMS)
def test_every_candidate_fits_shared_memory_and_its_blocks_per_sm(D):
    for variant in flash_hopper.CANDIDATES[D]:
        smem = flash_hopper.smem_bytes(D, variant)
        blocks = flash_hopper.VARIANTS[variant][3]
        assert smem <= SMEM_PER_BLOCK, (D, variant, smem)
        assert blocks * (smem + 1024) <= SMEM_PER_SM, (D, variant, smem, blocks)


def test_shared_memory_counts_padded_columns_and_stages():
    # D = 80 is stored as 128 columns; h4 (pipelined): Q 128 rows, 3 stages of K and V (128 keys) and
    # 128 mask bytes, plus 1024 bytes of alignment slack
    assert flash_hopper.smem_bytes(80, "h4") == 128 * 128 * 2 + 3 * (2 * 128 * 128 * 2 + 128) + 1024
    assert flash_hopper.smem_bytes(160, "h2") == 128 * 192 * 2 + 2 * (2 * 64 * 192 * 2 + 64) + 1024
    # warp-specialised (h24, h26): no mask bytes in shared memory; two stages, four 8-byte mbarriers each
    # (K full, V full, K empty, V empty)
    assert flash_hopper.smem_bytes(128, "h24") == 128 * 128 * 2 + 2 * (2 * 128 * 128 * 2 + 32) + 1024
    assert flash_hopper.smem_bytes(160, "h26") == 128 * 192 * 2 + 2 * (2 * 112 * 192 * 2 + 32) + 1024


def test_warp_specialised_register_split_fits_the_register_file():
    # setmaxnreg hands registers from the producer warpgroup to the consumers; together they must not
    # ask for more than the launch reserved (a setmaxnreg.inc that cannot be granted waits forever), and
    # each count is a multiple of 8 in [24, 256] (PTX ISA, setmaxnreg)
    for D, variants in flash_hopper.CANDIDATES.items():
        for variant in variants:
            bc, nwg, pipe, minb, ws = flash_hopper.VARIANTS[variant]
            n = flash_hopper.threads(variant)
            assert n == 128 * (nwg + (1 if ws else 0))
            entry, producer, consumer = flash_hopper.register_split(D, variant)
            if not ws:
                assert (entry, producer, consumer) == (0, 0, 0)
                continue
            assert pipe and minb == 1, variant           # one block per SM: the register cap at entry
            assert entry * n <= 65536 and entry % 8 == 0
            assert all(x % 8 == 0 and 24 <= x <= 256 for x in (producer, consumer))
            assert 128 * producer + 128 * nwg * consumer <= entry * n
            assert consumer >= entry                      # the consumers gain what the producer gives
    assert flash_hopper.register_split(128, "h24") == (168, 24, 240)      # FlashAttention-3's split
    assert flash_hopper.register_split(160, "h26") == (168, 24, 240)


def test_tma_variants_fall_back_to_a_cp_async_variant_of_the_same_head_dim():
    for D, variants in flash_hopper.CANDIDATES.items():
        fallback = flash_hopper.TMA_FALLBACK[D]
        assert fallback in variants and not flash_hopper.VARIANTS[fallback][4], D


def test_tensor_map_declines_what_the_copy_engine_cannot_address():
    # the copy engine needs a 16-byte aligned base and byte strides that are multiples of 16 (checked
    # before the driver is asked, so no GPU is needed here); size-1 dimensions are never stepped
    assert flash_hopper.tensor_map("bf16", 8, (64, 10, 2, 1), (64, 640, 1280), 128) is None
    assert flash_hopper.tensor_map("bf16", 256, (64, 10, 2, 2), (68, 680, 1360), 128) is None


def test_tensor_map_without_the_driver_function_is_none(monkeypatch):
    # a driver library without cuTensorMapEncodeTiled (before CUDA 12), or none: launch then runs the
    # cp.async fallback instead of failing
    import ctypes

    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(flash_hopper, "_encode", [])
    monkeypatch.setattr(flash_hopper, "_tmaps", {})
    monkeypatch.setattr(ctypes, "CDLL", no_library)
    assert flash_hopper.tensor_map("bf16", 256, (64, 10, 2, 2), (64, 640, 1280), 128) is None
    assert flash_hopper._encode == [None]                          # decided once


@pytest.mark.parametrize("kind", ["bf16", "fp16"])
def test_generated_source_has_each_wgmma_shape_and_entry_point(kind):
    ty = "bf16" if kind == "bf16" else "f16"
    for D, variants in flash_hopper.CANDIDATES.items():
        for variant in variants:
            bc, nwg, pipe, minb, ws = flash_hopper.VARIANTS[variant]
            text = flash_hopper.source(kind, D, variant)
            # S = Q K^T: m64 n{BC} k16, BC / 2 accumulators; O += P V: m64 n{D} k16, D / 2, B transposed
            ss = re.search(rf"wgmma\.mma_async\.sync\.aligned\.m64n{bc}k16\.f32\.{ty}\.{ty} \{{([^}}]*)\}}, "
                           r"%\d+, %\d+, p, 1, 1, 0, 0;", text)
            rs = re.search(rf"wgmma\.mma_async\.sync\.aligned\.m64n{D}k16\.f32\.{ty}\.{ty} \{{([^}}]*)\}}, "
                           r"\{%\d+, %\d+, %\d+, %\d+\}, %\d+, p, 1, 1, 1;", text)
            assert ss and len(ss.group(1).split(",")) == bc // 2, (D, variant)
            assert rs and len(rs.group(1).split(",")) == D // 2, (D, variant)
            name = flash_hopper.kernel_name(kind, D, variant)
            # warp-specialised: a producer warpgroup beside the NWG computing ones
            assert f"__launch_bounds__({128 * (nwg + (1 if ws else 0))}, {minb})\n{name}(" in text
            _, preg, creg = flash_hopper.register_split(D, variant)
            assert (f"flash_hopper_body<{D}, {'true' if kind == 'bf16' else 'false'}, {bc}, {nwg}, "
                    f"{'true' if pipe else 'false'}, {ws}, {preg}, {creg}>") in text
            assert "// WGMMA_WRAPPERS" not in text


def test_cubin_name_follows_the_source(monkeypatch):
    """build's cache file (cubin.compile_cached's, given what build passes it) is named after the kernel and
    keyed by its source: bf16 and fp16 differ, the same specialisation is the same file."""
    from stablelm_ref.cuda import cubin

    monkeypatch.setattr(cubin, "compile_cached", lambda text, name, arch, nvcc, nvrtc, directory, **kw:
                        cubin.cubin_path(text, name, arch, nvcc, nvrtc, directory))
    a = flash_hopper.build("bf16", 128, "h24", "/x")
    assert a == flash_hopper.build("bf16", 128, "h24", "/x")
    assert a != flash_hopper.build("fp16", 128, "h24", "/x")
    assert a.name.startswith("flash_hopper_bf16_d128_h24-") and a.name.endswith("-sm_90a.cubin")


def test_without_a_hopper_gpu_the_mma_sync_kernel_is_the_default(monkeypatch):
    monkeypatch.setattr(flash_hopper, "usable", lambda: False)
    for D in flash_prefill.HEAD_DIMS:
        assert flash_prefill.default_variant(D) == flash_prefill.DEFAULT_VARIANT[D]
    monkeypatch.setattr(flash_hopper, "usable", lambda: True)
    for D in flash_prefill.HEAD_DIMS:
        want = flash_hopper.HOPPER_DEFAULT.get(D, flash_prefill.DEFAULT_VARIANT[D])
        assert flash_prefill.default_variant(D) == want
    for D, variant in flash_hopper.HOPPER_DEFAULT.items():
        assert variant in flash_hopper.CANDIDATES[D]


def test_no_compiler_is_an_error_that_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))                             # no nvcc
    monkeypatch.setitem(__import__("sys").modules, "cupy_backends", None)   # no NVRTC either
    with pytest.raises(RuntimeError, match="nvcc.*sm_90a|sm_90a.*nvcc"):
        flash_hopper.build("bf16", 64, "h2", tmp_path)


def test_a_failed_build_on_a_hopper_gpu_is_reported_once(monkeypatch):
    # on an sm_90 GPU whose sm_90a build fails, the mma.sync kernel runs and the user is told why
    import sys
    import types

    device = types.SimpleNamespace(compute_capability="90")
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda: device))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(flash_hopper, "_usable", [])

    def no_compiler(*args):
        raise RuntimeError("could not build the Hopper attention kernel ... put CUDA 12.3+'s nvcc on PATH")

    monkeypatch.setattr(flash_hopper, "get_kernel", no_compiler)
    with pytest.warns(RuntimeWarning, match="mma.sync kernel runs instead: could not build"):
        assert flash_hopper.usable() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # decided once: no second warning, no rebuild
        assert flash_hopper.usable() is False
    assert flash_prefill.default_variant(80) == flash_prefill.DEFAULT_VARIANT[80]


def test_usable_builds_the_kernel_the_default_path_runs(monkeypatch):
    """The test build is the default path's kernel at D = 128 (HOPPER_DEFAULT[128], h24 now), not a variant the
    default no longer runs (it was h4): usable() says whether that kernel builds."""
    import sys
    import types

    device = types.SimpleNamespace(compute_capability="90")
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda: device)))
    monkeypatch.setattr(flash_hopper, "_usable", [])
    built = []
    monkeypatch.setattr(flash_hopper, "get_kernel", lambda *key: built.append(key))
    assert flash_hopper.usable() is True and flash_hopper.usable() is True
    assert built == [("bf16", 128, flash_hopper.HOPPER_DEFAULT[128])]
