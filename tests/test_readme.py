"""Every code block of README.md runs as written, where it needs no GPU and no network.

Python blocks run in a fresh namespace from an empty working directory (the default model's name must
work from anywhere). A bare expression followed by a comment that starts with a literal is checked
against it, so the numbers the README shows are the numbers the code gives:

    out.logits.shape                 # (1, 9, 4096)        -> equal
    out.logits.mean(-1).round(4)     # [[-1.6774, ...]]    -> equal to half a unit of the last digit shown
    len(out.hidden_states)           # 9: the embeddings…  -> the literal before the colon

Shell blocks run one command at a time in bash from the repository root, with this interpreter's
environment first on PATH (as after `source .venv/bin/activate`) and HF_HUB_OFFLINE=1; each must exit 0.

Not run, each with its reason in the test's skip list (pytest -rs): a Hub repo id (network), the GPU,
`make` (its targets build .venv and run suites, this one included; CI runs them itself), and any block right after
an HTML comment `<!-- not run by tests/test_readme.py: REASON -->`.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OPT_OUT = re.compile(r"<!--\s*not run by tests/test_readme\.py:\s*(.*?)\s*-->")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")       # owner/name, as the Hub spells them


def code_blocks(text):
    """[(language, first line number, code, opt-out reason or None)] for every fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        opt_out = OPT_OUT.search(before)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append((m.group(1), i + 2, "\n".join(lines[i + 1:end]), opt_out.group(1) if opt_out else None))
        i = end + 1
    return blocks


def _names_a_hub_repo(word):
    return bool(REPO_ID.match(word)) and not (ROOT / word).exists() and not word.startswith(("path/", "/"))


def python_skip_reason(code):
    if re.search(r"device\s*=\s*['\"]gpu['\"]|cupy", code):
        return "needs a GPU"
    strings = [n.value for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    hub = [s for s in strings if _names_a_hub_repo(s)]
    return f"names the Hub repo {hub[0]} (network)" if hub else None


def shell_commands(code):
    """The commands of a shell block: continuation lines joined, comment-only lines and a leading '$ ' dropped."""
    commands, current = [], ""
    for line in code.splitlines():
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
            continue
        command = current.strip().removeprefix("$ ").strip()
        current = ""
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def shell_skip_reason(command):
    words = command.split("#")[0].split()
    if words[:1] == ["make"]:
        return "a make target (they build .venv and run suites; CI runs them itself)"
    if "--device" in words and words[words.index("--device") + 1:][:1] == ["gpu"]:
        return "needs a GPU"
    hub = [w.strip("'\"") for w in words if _names_a_hub_repo(w.strip("'\""))]
    return f"names the Hub repo {hub[0]} (network)" if hub else None


BLOCKS = code_blocks(README.read_text())
PYTHON = [(line, code, reason or python_skip_reason(code)) for lang, line, code, reason in BLOCKS if lang == "python"]
SHELL = [(line, cmd, reason or shell_skip_reason(cmd))
         for lang, line, code, reason in BLOCKS if lang in ("sh", "bash", "shell") for cmd in shell_commands(code)]


def test_the_readme_has_blocks_that_run():
    """Guards the walk itself: the README's Python examples and some commands do run (not all skipped)."""
    assert sum(reason is None for _, _, reason in PYTHON) >= 2
    assert sum(reason is None for _, _, reason in SHELL) >= 4
    assert shell_commands("a \\\n  b  # c\n# only a comment\n$ d") == ["a b  # c", "d"]
    assert python_skip_reason('m.from_pretrained("stabilityai/stablelm-3b-4e1t")').startswith("names the Hub")
    assert shell_skip_reason("stablelm-ref generate --model acme/tiny x").startswith("names the Hub")
    assert shell_skip_reason("stablelm-ref generate --model path/to/model x") is None


# ---- Python --------------------------------------------------------------------------------------

def _expected(comment):
    """The literal a comment starts with ('9: the embeddings' -> 9), or None."""
    for text in (comment, comment.split(":")[0]):
        try:
            return ast.literal_eval(text.strip()), text.strip()
        except (ValueError, SyntaxError):
            continue
    return None


def _check(actual, expected, text, where):
    if isinstance(expected, bool) or isinstance(expected, (int, tuple)) and "." not in text:
        assert (bool(actual) if isinstance(expected, bool) else actual) == expected, where
        return
    decimals = max((len(d) for d in re.findall(r"\.(\d+)", text)), default=0)
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=0, atol=0.5 * 10.0**-decimals, err_msg=where)   # as far as the README prints


@pytest.mark.parametrize("line, code, reason", PYTHON, ids=[f"line{b[0]}" for b in PYTHON])
def test_python_block(line, code, reason, tmp_path, monkeypatch, capsys):
    if reason:
        pytest.skip(f"README.md line {line}: {reason}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = {"__name__": "__readme__"}
    checked = 0
    source_lines = code.splitlines()
    for node in ast.parse(code).body:
        segment = "\n".join(source_lines[node.lineno - 1:node.end_lineno])
        where = f"README.md line {line + node.lineno - 1}: {segment.strip()}"
        comment = source_lines[node.end_lineno - 1][node.end_col_offset:].strip()
        expected = _expected(comment[1:]) if isinstance(node, ast.Expr) and comment.startswith("#") else None
        if expected is None:
            exec(compile(ast.Module([node], []), where, "exec"), namespace)
            continue
        actual = eval(compile(ast.Expression(node.value), where, "eval"), namespace)
        _check(actual, *expected, where)
        checked += 1
    capsys.readouterr()
    assert checked or "print(" in code, f"README.md line {line}: a block that shows nothing checkable"


# ---- shell ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, command, reason", SHELL, ids=[f"line{b[0]}-{b[1][:40]}" for b in SHELL])
def test_shell_command(line, command, reason):
    if reason:
        pytest.skip(f"README.md block at line {line}: {command}: {reason}")
    if command.startswith("source .venv/") and not (ROOT / ".venv").is_dir():
        pytest.skip("no .venv in this checkout (the suite runs from another environment)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    r = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"README.md block at line {line}: {command}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
