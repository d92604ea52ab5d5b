"""The walkthrough's committed figures: one small PNG and one record per savefig call, and a stale check
that ignores rounding but catches a change in what a figure draws (walkthrough/_common.py).

The first test needs nothing but the files; the others build figures and need matplotlib (the `plots`
extra, which `make walkthrough` installs), so they skip without it.
"""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WALK = ROOT / "walkthrough"
CHAPTER = re.compile(r"^\d\d_\w+\.py$")
SAVED = re.compile(r'savefig\(fig, "(\w+)"')


def test_every_chapter_figure_is_committed_small_with_its_record():
    names = [n for p in sorted(WALK.iterdir()) if CHAPTER.match(p.name) for n in SAVED.findall(p.read_text())]
    assert len(names) >= 20 and len(set(names)) == len(names), names
    for name in names:
        png, record = WALK / "figures" / f"{name}.png", WALK / "figures" / f"{name}.json"
        assert png.is_file() and record.is_file(), f"{name}: run `make walkthrough` and commit walkthrough/figures/"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000, name
        fp = json.loads(record.read_text())
        assert fp["version"] == 1 and fp["axes"], name


@pytest.fixture(scope="module")
def common():
    pytest.importorskip("matplotlib", reason="the figure records are read from matplotlib figures (plots extra)")
    import matplotlib

    matplotlib.use("Agg")
    sys.path.insert(0, str(WALK))
    import _common

    return _common


def draw(scale=1.0, title="t", measured=False, rounding=False):
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2)
    x = np.linspace(0, 1, 50)
    a.plot(x, np.sin(7 * x) * scale, label="sin")
    a.set_title(title)
    a.legend()
    b.imshow(np.outer(x, x) * scale)
    b.bar([0, 1], [1.0, 2.0 * scale])
    if measured:
        a.set_gid("measured")
    if rounding:
        b.set_gid("rounding")
    return fig


def test_rounding_is_not_staleness(common):
    # float32 rounding (1e-7) and different BLAS sums (~1e-6 relative) stay far below the 1e-3 threshold
    old = common.fingerprint(draw())
    assert common.fingerprint_differences(old, common.fingerprint(draw(scale=1 + 1e-6))) == []
    assert common.fingerprint_differences(json.loads(json.dumps(old)), old) == []   # survives the JSON file


def test_a_change_in_what_is_drawn_is_stale(common):
    old = common.fingerprint(draw())
    moved = common.fingerprint_differences(old, common.fingerprint(draw(scale=1.01)))
    assert moved and all("values moved" in d for d in moved), moved
    assert common.fingerprint_differences(old, common.fingerprint(draw(title="layer 0")))
    assert common.fingerprint_differences(old, common.fingerprint(draw(measured=True)))  # the numbers go: a change


def test_measured_axes_compare_only_their_texts(common):
    old = common.fingerprint(draw(measured=True))
    new = common.fingerprint(draw(scale=1.5, measured=True))
    assert [d for d in common.fingerprint_differences(old, new) if d.startswith("axes 0")] == []
    assert common.fingerprint_differences(old, new)          # the other axes still count


def test_rounding_axes_allow_the_summation_orders_spread_and_no_more(common):
    # chapter 15's bf16 logits errors move by up to ~22% of their scale between OpenBLAS kernels (AVX2 / AVX-512)
    old = common.fingerprint(draw(rounding=True))
    near = common.fingerprint(draw(rounding=True, scale=1.25))
    assert [d for d in common.fingerprint_differences(old, near) if d.startswith("axes 1")] == []
    assert [d for d in common.fingerprint_differences(old, near) if d.startswith("axes 0")]   # the others are strict
    far = common.fingerprint(draw(rounding=True, scale=2.0))
    assert [d for d in common.fingerprint_differences(old, far) if d.startswith("axes 1")]
