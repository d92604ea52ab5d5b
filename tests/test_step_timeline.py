"""tools/step_timeline.py's phase table on synthetic marks (the GPU side needs the device): known per-phase
durations, drawn per block, come back as their medians; a parallel residual's missing barrier is skipped."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

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
