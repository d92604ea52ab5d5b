"""tools/step_timeline.py's phase table on synthetic marks (the GPU side needs the device): known per-phase
durations, drawn per block, come back as their medians; a parallel residual's missing barrier is skipped. And
its build: the probe's code lives in tools/step_timeline.cuh (the shipped decode_step.cu keeps only empty
hooks), and in the timeline build every hook of decode_step.cu records (checked through nvcc's preprocessor,
no GPU)."""

import importlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from stablelm_ref.cuda.launch import step_source

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
st = importlib.import_module("step_timeline")


def marks(durations_us, layers, blocks=5, lm_head_us=50.0, seed=0):
    """[blocks, 2 + 12 layers] ns: each block's phases of every layer take durations_us[i] (None: no mark,
    zero) plus a block's jitter of up to 0.1 us, from a start of 1e6 ns plus the block's offset."""
    rng = np.random.default_rng(seed)
    out = np.zeros((blocks, 2 + 12 * layers), np.int64)
    for b in range(blocks):
        t = 1e6 + 100 * b
        out[b, 0] = t
        for l in range(layers):
            for i, d in enumerate(durations_us):
                if d is None:
                    continue
                t += 1e3 * d + rng.uniform(0, 100)
                out[b, 1 + 12 * l + i] = t
        out[b, 1 + 12 * layers] = t + 1e3 * lm_head_us
    return out


@pytest.mark.parametrize("parallel", [False, True])
def test_phase_table_recovers_the_phase_durations(parallel):
    d = [2.0, 25.0, 1.5, 14.0, 3.0, 10.0, 2.5, 1.5, 43.0, 3.5, 27.0, 2.0]
    if parallel:
        d[6] = None
    table, layer, lm_head = st.phase_table(marks(d, 6), 6, parallel)
    want = [(i, v) for i, v in enumerate(d) if v is not None]
    assert list(table) == [f"{st.MARKS[i]} ({i})" for i, _ in want]
    for (i, v), got in zip(want, table.values()):
        assert abs(got - v) < 0.11, (i, got, v)                 # + the jitter, 0-0.1 us
    assert abs(layer - sum(v for _, v in want)) < 12 * 0.11
    assert abs(lm_head - 50.0) < 1e-6


STEP_CU = Path(__file__).resolve().parents[1] / "stablelm_ref" / "cuda" / "decode_step.cu"
PROBE_ONLY = ("%globaltimer", "mk_tl", "mk_sum", "mk_mark")     # the timeline build's clock reads and records
HOOKS = ("MK_MARK", "MK_T0", "MK_ADD", "MK_ZERO", "MK_FLUSH")


def test_the_timing_code_is_in_the_tool_and_not_in_the_shipped_kernel():
    """decode_step.cu ships without the timeline's code: the tool puts step_timeline.cuh before the step's
    translation unit, whose empty hooks give way to the macros defined there (they come after the hook line)."""
    shipped = step_source()
    assert STEP_CU.read_text() in shipped and [w for w in PROBE_ONLY if w in shipped] == []
    text = st.timeline_source(shipped)
    assert text.endswith(shipped) and all(w in text[: -len(shipped)] for w in PROBE_ONLY)
    assert text.index("#define MK_MARK(i) do") < text.index(st.HOOK) < text.index("#define MK_MARK(i)\n")
    for name, value in zip(("MK_TL_BLOCKS", "MK_TL_N", "MK_TL_SUMS"), (st.TL_BLOCKS, st.TL_N, st.TL_SUMS)):
        assert f"#define {name} {value}\n" in text                 # the buffer main() maps and reads


def test_a_step_source_without_the_hook_is_refused_with_what_to_do():
    with pytest.raises(SystemExit, match=r"decode_step.cu has no line '#if !defined\(MK_MARK\)'.*put the line back"):
        st.timeline_source(step_source().replace(st.HOOK, "#if 1"))


def test_every_hook_records_in_the_timeline_build_and_is_empty_in_the_shipped_one(nvcc_expand):
    """The step's translation unit and the timeline build through nvcc's device preprocessor (-E, sm_90: the
    step kernel needs it): each use of a hook in decode_step.cu becomes the probe's mark, clock read or sum in
    the timeline build and nothing in the shipped one, with no macro redefined."""
    shipped = step_source()
    uses = {h: len(re.findall(rf"^\s*{h}\(.*\);", STEP_CU.read_text(), re.M)) for h in HOOKS}
    assert uses["MK_MARK"] > 10 and uses["MK_T0"] == uses["MK_ADD"] > 0 and uses["MK_ZERO"] == uses["MK_FLUSH"] == 1
    ship, probe = nvcc_expand("shipped", shipped), nvcc_expand("timeline", st.timeline_source(shipped))
    assert [w for w in (*PROBE_ONLY, *HOOKS) if w in ship] == []
    assert probe.count("do { if (threadIdx.x == 0) mk_mark(") == uses["MK_MARK"]
    assert len(re.findall(r"if \(threadIdx.x == 0\) mk_sum\[\d\] \+= t_ - \(\w+\)", probe)) == uses["MK_ADD"]
    assert probe.count("%%globaltimer") == uses["MK_T0"] + uses["MK_ADD"] + 1          # + mk_mark's own read
    assert probe.count("mk_sum[threadIdx.x] = 0") == uses["MK_ZERO"]
    assert probe.count("mk_tl[blockIdx.x][1000 + threadIdx.x] += mk_sum[threadIdx.x]") == uses["MK_FLUSH"]
