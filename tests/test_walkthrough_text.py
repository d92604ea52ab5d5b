"""What the walkthrough's text says, checked against the code where a sentence states a fact a reader relies
on (the chapters' own asserts check their numbers; these check words that no chapter computes)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WALK = ROOT / "walkthrough"
CHAPTERS = sorted(p for p in WALK.iterdir() if re.match(r"^\d\d_\w+\.py$", p.name))


def test_the_attention_scale_is_written_with_the_head_size():
    """d is the hidden size (chapters 02, 04, 08, 11) and rotary_ndims (06); the attention scale is the head
    size's, head_dim ** -0.5 in attention.py. Before, chapters 07, 16 and 18 and the chapter map wrote
    sqrt(d)."""
    lower_d = re.compile(r"\\sqrt\{d\}|\\sqrt d\b|√d(?!_head)|sqrt\(d\)")
    texts = {p.name: p.read_text() for p in CHAPTERS + [WALK / "README.md", ROOT / "README.md"]}
    found = {name: lower_d.findall(text) for name, text in texts.items() if lower_d.search(text)}
    assert not found, f"the attention scale written with d (the hidden size / rotary dims): {found}"


def test_the_readme_names_the_chapters_that_draw_no_figure():
    """walkthrough/README.md said every chapter draws a figure; chapter 12 draws none. The chapters without a
    savefig call must be exactly the ones it names as the exception."""
    without = [p.name[:2] for p in CHAPTERS if "savefig(fig" not in p.read_text()]
    readme = (WALK / "README.md").read_text()
    named = re.findall(r"all but chapters? ([\d, and]+?) \(", readme)
    assert named, "walkthrough/README.md no longer says which chapters draw no figure"
    assert without == re.findall(r"\d\d", named[0]), (without, named)
