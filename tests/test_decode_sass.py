"""The compiled decode kernels' order around the PDL wait, read from their SASS (no GPU needed).

Under programmatic dependent launch (decode.cu's PDL macros) a kernel starts while its predecessor still runs: it
may read weights before `griddepcontrol.wait` (SASS `ACQBULK`), and must read what the step writes after it. The
source says where each load is; the SASS says where ptxas put it, and the two can differ: ptxas treats a
non-coherent load (weights, through `const __restrict__`) as free to move across the wait, both ways. On sm_90 with
CUDA 13.0 it moved a load of the LayerNorm statistics above the wait (NaN logits; decode.cu now reads step data
through coherent loads), and it puts every tensor-core GEMV's first weight loads below the wait (an L2 prefetch that
kept them above measured 1.4% slower at batch 8, each form tuned for itself: left so). These tests read the cubin
nvcc builds for sm_90 with cuobjdump:

- no kernel issues a coherent global load (step data) before its wait;
- every CUDA-core GEMV (the batch-1 step's) loads its first weights into registers, and prefetches the rest of its
  first row group into L2, before the wait (about 10% of a 3b-4e1t step on the H200: the twelfth session's
  `gemv-all-after-wait` in docs/cuda_decode_notes.md);
- the attention issues its first K/V tile's copies (cp.async) before the wait;
- the folded LayerNorm's GEMV reads its statistics in one load after the wait and calls nothing (a float64
  division's slow path) before it writes h: ptxas does not hoist h's loads above such a CALL, which made the start
  two round trips longer (1.3% of a 3b-4e1t step, the twenty-first session).

They need CUDA's nvcc on PATH and cuobjdump with nvdisasm (on PATH, or the nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm wheels of the test extra); without them they are skipped, saying which is missing.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stablelm_ref.cuda import launch


def _tool(name: str) -> str | None:
    """A CUDA binary on PATH, else in an installed nvidia wheel's bin folder (nvidia/cu13/bin, nvidia/cu12/bin)."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        return None
    for root in getattr(nvidia, "__path__", []):
        for cand in sorted(Path(root).glob(f"*/bin/{name}")):
            if not os.access(cand, os.X_OK):
                try:
                    cand.chmod(cand.stat().st_mode | 0o111)   # (a wheel unpacked without its modes)
                except OSError:
                    continue
            return str(cand)
    return None


# nvcc from PATH only: that is where cubin.compile_cached looks
TOOLS = {"nvcc": shutil.which("nvcc"), "cuobjdump": _tool("cuobjdump"), "nvdisasm": _tool("nvdisasm")}
MISSING = [n for n, path in TOOLS.items() if path is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not found: reading the decode kernels' "
                                "SASS needs CUDA's nvcc on PATH, and cuobjdump with nvdisasm (on PATH or from the "
                                "test extra's nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels)")

LOAD = re.compile(r"\b(LDGSTS|LDG|CCTL)(\.[\w.]+)?\b")


@pytest.fixture(scope="module")
def sass_lines(tmp_path_factory):
    """{kernel: [SASS instruction lines]} for decode.cu's sm_90 cubin, in program order."""
    cubin = launch.build_cubin("90", out_dir=tmp_path_factory.mktemp("cubin"))
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(TOOLS["nvdisasm"]).parent), os.environ.get("PATH", "")]))
    text = subprocess.run([TOOLS["cuobjdump"], "-sass", str(cubin)], check=True, capture_output=True, text=True,
                          env=env).stdout
    out, name = collections.defaultdict(list), None
    for line in text.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            name = m.group(1)
        elif name is not None and re.match(r"\s*/\*[0-9a-f]{4,}\*/", line):
            out[name].append(line)
    assert any(k.startswith("gemv_ln_b1_r") for k in out), f"no GEMV found in the SASS: {sorted(out)}"
    return out


@pytest.fixture(scope="module")
def sass(sass_lines):
    """{kernel: [(instruction, before_wait)]}: each kernel's global loads, L2 prefetches and async copies, marked by
    whether they come before its first ACQBULK."""
    out = collections.defaultdict(list)
    for name, lines in sass_lines.items():
        waited = False
        for line in lines:
            waited = waited or "ACQBULK" in line
            m = LOAD.search(line)
            if m:
                out[name].append((m.group(0), not waited))
    return out


def _before(ins, pred):
    return sum(1 for op, before in ins if before and pred(op))


def _global_load(op):
    return op.startswith("LDG") and not op.startswith("LDGSTS")


def _nc_load(op):
    return _global_load(op) and "CONSTANT" in op


def _prefetch(op):
    return op.startswith("CCTL") and "PML2" in op


def test_no_kernel_reads_step_data_before_its_pdl_wait(sass):
    early = {k: n for k, ins in sass.items() if (n := _before(ins, lambda op: _global_load(op) and not _nc_load(op)))}
    assert not early, f"coherent loads (data the step writes) before griddepcontrol.wait, by kernel: {early}"


def test_every_cuda_core_gemv_loads_its_first_weights_before_the_pdl_wait(sass):
    gemvs = {k: int(m.group(1)) for k in sass if (m := re.fullmatch(r"gemv_(?:ln_)?b\d+_r(\d+)", k))}
    assert len(gemvs) >= 8
    # gemv_load into registers: chunks c and c + T of each of the R rows (the folded-LayerNorm GEMVs: chunk c,
    # the registers of c + T go to h's loads; decode.cu's "LN weights"); fetch's L2 prefetch of the rest
    need = {k: r if k.startswith("gemv_ln_") else 2 * r for k, r in gemvs.items()}
    got = {k: _before(sass[k], _nc_load) for k in gemvs}
    short = {k: (got[k], need[k]) for k in gemvs if got[k] < need[k]}
    assert not short, f"GEMVs whose first weights are loaded only after griddepcontrol.wait (got, need): {short}"
    nopf = [k for k in gemvs if _before(sass[k], _prefetch) == 0]
    assert not nopf, f"GEMVs with no L2 prefetch of their first row group before griddepcontrol.wait: {nopf}"


def test_the_attention_copies_its_first_tile_before_the_pdl_wait(sass):
    kernels = [k for k in sass if k.startswith("decode_attention_")]
    assert len(kernels) == 2 * 5, kernels   # float32 and tensor-core tiles, five head dims
    late = [k for k in kernels if _before(sass[k], lambda op: op.startswith("LDGSTS")) == 0]
    assert not late, f"attention kernels with no cp.async before griddepcontrol.wait: {late}"


def test_the_folded_layernorm_starts_with_one_load_then_one_round_and_no_call(sass_lines):
    kernels = [k for k in sass_lines if re.fullmatch(r"gemv_ln_b1_r\d+", k)]
    assert kernels
    for k in kernels:
        lines = sass_lines[k]
        wait = next(i for i, line in enumerate(lines) if "ACQBULK" in line)
        h = next(i for i in range(wait, len(lines)) if re.search(r"\bSTS\b", lines[i]))
        start = lines[wait:h]
        calls = [line.split(";")[0].strip() for line in start if re.search(r"\bCALL\b", line)]
        assert not calls, f"{k}: a CALL between griddepcontrol.wait and the first store of h: {calls}"
        loads = [m.group(0) for line in start if (m := LOAD.search(line)) and _global_load(m.group(0))]
        assert loads and loads[0].startswith("LDG.E.128"), \
            f"{k}: the statistics are not read in one 16-byte load first after the wait: {loads}"
        # then both of a thread's first two chunks of h: x, ln_w and ln_b, two 16-byte loads each, in one round
        assert len(loads) >= 13, f"{k}: h's first two chunks are not all loaded before h's first store: {loads}"
        local = [line.split(";")[0].strip() for line in lines if re.search(r"\b(LDL|STL)\b", line)]
        assert not local, f"{k}: spills to local memory: {local}"
