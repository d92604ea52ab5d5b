"""tools/decode_timeline.py's analysis on synthetic block records (the GPU side is tools-only: it needs the
device; here the grouping, the matching with the plan, the spans, and the clock64-on-globaltimer calibration
against block times drawn with known values), and its build: the timing code lives in tools/ (the shipped
decode.cu has none), and in the timeline build every PDL_LAUNCH / PDL_WAIT of decode.cu records (checked
through nvcc's preprocessor, no GPU)."""

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
tl = importlib.import_module("decode_timeline")


def records(blocks, ghz=1.98, quantum=0, seed=0):
    """uint64 [n, 8] records (decode_timeline.FIELDS) from blocks = [(grid, sm, t0, tw, te) in ns] (tw None: no
    wait): each SM's clock64 runs at ghz from its own origin; the globaltimer reads the true time floored to
    `quantum` ns (0: exact) on an arbitrary origin."""
    rng = np.random.default_rng(seed)
    origin = {sm: int(rng.integers(10**9, 10**12)) for sm in {b[1] for b in blocks}}
    t_base = 5 * 10**15
    out = np.zeros((len(blocks), 8), np.uint64)

    def gt(t):
        v = t_base + t
        return int(v // quantum * quantum) if quantum else int(round(v))

    for i, (grid, sm, t0, tw, te) in enumerate(blocks):
        clk = [origin[sm] + int(round(t * ghz)) for t in (t0, tw if tw is not None else 0, te)]
        out[i] = [grid, gt(t0), gt(tw) if tw is not None else 0, gt(te), clk[0],
                  clk[1] if tw is not None else 0, clk[2], sm | (i << 32)]
    return out


def plan(*spec):
    return [SimpleNamespace(tag=tag, grid=(n,)) for tag, n in spec]


def test_spans_dep_and_early_from_exact_times():
    # launch 7 (qkv): two blocks, exit at 10 and 12 us; launch 9 (attention): one block resident early (start 5),
    # one late (start 13), waits released at 12.5 / 13.2, exits 14 / 15; launch 11 (o_proj): starts at 14.5 and
    # (the block that returns before its wait) at 11, while qkv still ran
    us = 1000.0
    blocks = [(7, 0, 0, 1 * us, 10 * us), (7, 1, 0.2 * us, 1.1 * us, 12 * us),
              (9, 2, 5 * us, 12.5 * us, 14 * us), (9, 0, 13 * us, 13.2 * us, 15 * us),
              (11, 1, 14.5 * us, 15.4 * us, 20 * us), (11, 3, 11 * us, None, 16 * us)]
    rows = tl.analyse(records(blocks), plan(("gemv:qkv", 2), ("attention", 2), ("gemv:o_proj", 2)))
    assert [r["kind"] for r in rows] == ["qkv", "attention", "o_proj"]
    a, o = rows[1], rows[2]
    # exact inputs: only float64 rounding of microsecond figures
    assert rows[0]["span"] == pytest.approx(12.0) and a["span"] == pytest.approx(3.0)
    assert o["span"] == pytest.approx(5.0)
    assert sum(r["span"] for r in rows) == pytest.approx(rows[-1]["exit"] - rows[0]["start"])
    assert a["dep"] == pytest.approx(0.5) and a["lastwait"] == pytest.approx(1.2) and a["late"] == pytest.approx(1.0)
    assert a["early"] == pytest.approx(50.0) and o["early"] == pytest.approx(100.0)
    # early2: o_proj's blocks against qkv's last exit (12): one of two started before it
    assert o["early2"] == pytest.approx(50.0) and a["early2"] == 0.0 and rows[0]["early2"] == 0.0
    assert o["dep"] == pytest.approx(0.4) and o["work"] == pytest.approx(4.6)   # the block without a wait: left out
    kinds = tl.by_kind(rows)
    assert kinds["attention"]["span_sum"] == pytest.approx(3.0) and "bytes" not in kinds["qkv"]
    kinds = tl.by_kind(rows, {"qkv": 40_000_000, "o_proj": 13_000_000}, gbs=4000.0)   # 10 us and 3.25 us
    assert kinds["qkv"]["bytes"] == pytest.approx(10.0) and kinds["qkv"]["over"] == pytest.approx(2.0)
    assert kinds["o_proj"]["over"] == pytest.approx(1.75) and "bytes" not in kinds["attention"]
    tl.print_tables(rows, "test", 20.0, launch_bytes={"qkv": 40_000_000}, gbs=4000.0)


def test_launches_are_ordered_by_first_start_not_grid_id():
    blocks = [(50, 0, 0.0, 10.0, 100.0), (3, 1, 120.0, 130.0, 300.0)]
    rows = tl.analyse(records(blocks), plan(("embed", 1), ("gemv:qkv", 1)))
    assert [r["kind"] for r in rows] == ["embed", "qkv"]
    assert rows[1]["span"] == pytest.approx(0.2)


def test_coarse_globaltimer_uses_each_sms_clock():
    """A globaltimer of 1 us ticks: the times come from clock64 put on its axis. With ~240 stamps an SM at
    uniformly spread phases, each SM's offset (the upper envelope of globaltimer - clock / rate) falls short of
    the truth by about tick / 240 ~ 4 ns; the rate is fitted over ~2 ms of every SM's samples. 40 ns allows
    ten times that (a shortfall over 40 ns needs all 240 phases in the last 96% of a tick: < 1e-4)."""
    rng = np.random.default_rng(1)
    blocks = []
    for grid in range(80):                                 # 80 launches of 24 blocks over 8 SMs, 25 us apart
        for j in range(24):
            t0 = grid * 25_000 + rng.uniform(0, 5_000)
            tw = t0 + rng.uniform(100, 3_000)
            blocks.append((grid + 1, j % 8, t0, tw, tw + rng.uniform(500, 15_000)))
    recs = records(blocks, quantum=1000)
    (t0, tw, te), note = tl.block_times(recs)
    assert "clock64" in note
    true = np.array([b[2] for b in blocks]), np.array([b[3] for b in blocks]), np.array([b[4] for b in blocks])
    base = true[0].min()
    for got, want in zip((t0, tw, te), true):
        assert np.max(np.abs(got - (want - base))) < 40.0
    # a fine globaltimer is used as it is
    (f0, _, fe), note = tl.block_times(records(blocks, quantum=0))
    assert "globaltimer" in note and np.max(np.abs(fe - (true[2] - base))) < 1.0


def test_tail_is_the_last_exit_after_the_median_exit():
    """tail = last exit - median exit of a launch's blocks: exits at 10, 11 and 16 us trail by 5 us (the mean, 12.33,
    would give 3.67; the first exit, 6)."""
    us = 1000.0
    blocks = [(3, 0, 0, 1 * us, 10 * us), (3, 1, 0, 1 * us, 11 * us), (3, 2, 0, 1 * us, 16 * us)]
    (row,) = tl.analyse(records(blocks), plan(("gemv:qkv", 3)))
    assert row["tail"] == pytest.approx(5.0)


DECODE_CU = Path(__file__).resolve().parents[1] / "stablelm_ref" / "cuda" / "decode.cu"
PROBE_ONLY = ("%globaltimer", "%gridid", "tl_rec", "TlBlock")      # the timeline build's clock reads and records


def test_the_timing_code_is_in_the_tool_and_not_in_the_shipped_kernels():
    """decode.cu ships without the timeline's code: the tool puts decode_timeline.cuh before decode.cu, whose PDL
    macros give way to the ones defined there (its first PDL_LAUNCH definition comes after the hook)."""
    shipped = DECODE_CU.read_text()
    assert [w for w in PROBE_ONLY if w in shipped] == []
    text = tl.timeline_source(shipped)
    assert text.endswith(shipped) and all(w in text[: -len(shipped)] for w in PROBE_ONLY)
    assert text.index("#define PDL_LAUNCH() TlBlock") < text.index(tl.HOOK) < text.index("#define PDL_LAUNCH() asm")
    assert f"#define TL_MAX (1 << {tl.TL_MAX.bit_length() - 1})" in text            # the buffer read_records maps


def test_a_decode_cu_without_the_hook_is_refused_with_what_to_do():
    shipped = DECODE_CU.read_text()
    with pytest.raises(SystemExit, match=r"decode.cu has no line '#if defined\(PDL_LAUNCH\)'.*put the line back"):
        tl.timeline_source(shipped.replace(tl.HOOK, "#if 0"))


@pytest.mark.parametrize("arch", ["90", "80"])
def test_every_pdl_launch_and_wait_records_in_the_timeline_build_and_nowhere_else(nvcc_expand, arch):
    """decode.cu and the timeline build through nvcc's device preprocessor (-E): at sm_90 each of decode.cu's
    PDL_LAUNCH(); / PDL_WAIT(); uses becomes the probe's block record and wait mark in the timeline build and a
    bare griddepcontrol in the shipped one; before sm_90 both builds expand them to nothing (no PDL)."""
    shipped = DECODE_CU.read_text()
    launches, waits = shipped.count("PDL_LAUNCH();"), shipped.count("PDL_WAIT();")
    assert launches > 5 and waits >= launches
    ship, probe = nvcc_expand("shipped", shipped, arch), nvcc_expand("timeline", tl.timeline_source(shipped), arch)
    pdl = arch == "90"                   # (the CUDA headers nvcc includes have griddepcontrol of their own)
    assert ship.count('asm volatile("griddepcontrol.launch_dependents;" ::: "memory")') == (launches if pdl else 0)
    assert ship.count('asm volatile("griddepcontrol.wait;" ::: "memory")') == (waits if pdl else 0)
    assert "tl_block_" not in ship and "%%globaltimer" not in ship
    assert probe.count("TlBlock tl_block_; asm volatile(\"griddepcontrol.launch_dependents") == (launches if pdl else 0)
    assert probe.count("griddepcontrol.wait;\" ::: \"memory\"); tl_block_.waited()") == (waits if pdl else 0)
