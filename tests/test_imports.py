"""The package's house rules, read from the source: no import cycle inside stablelm_ref/, and the
reference model does not know its fast forms, trace files or the command line.

Imports are parsed with ast, every one of them: module level, inside functions (lazy imports) and
`importlib.import_module("stablelm_ref.x")` by name (a string constant that names a module of the
package, dotted, counts as an import of it, which is how cli.py lists its command modules). An edge A -> B
means A names B in an import; `from . import __version__` names the package itself (its __init__).
Importing a submodule also runs its parents' __init__ files; that implicit step is not an edge (else
every module would form a cycle with the package root).

    python tests/test_imports.py          prints the graph: module -> what it imports in the package
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "stablelm_ref"


def module_files(root: Path) -> dict[str, Path]:
    """{dotted module name: file} for every .py under root (a package dir); __init__ is the package."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _target(name: str, modules: dict) -> str | None:
    """The module of the package that `name` (a dotted name) runs: itself, or its nearest parent."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict) -> set[str]:
    """The package modules that `module` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    here = module if is_package else module.rpartition(".")[0]          # the package a relative import starts in
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.add(_target(alias.name, modules))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:                                    # `from pkg import submodule`
                full = f"{base}.{alias.name}"
                out.add(full if full in modules else _target(base, modules))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value \
                and node.value in modules:                              # importlib.import_module("stablelm_ref.x")
            out.add(node.value)
    out.discard(None)
    out.discard(module)
    return out


def import_graph(root: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    modules = module_files(root)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for n in graph.get(todo.pop(), ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


# ---- the finder itself can fail -------------------------------------------------------------------

def _write_package(tmp_path, files):
    root = tmp_path / "pkg"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_finder_sees_lazy_relative_and_by_name_cycles(tmp_path):
    root = _write_package(tmp_path, {
        "__init__.py": "from .a import f\n",
        "a.py": "def f():\n    from .b import g\n    return g\n",                 # lazy
        "b.py": "import importlib\nNAMES = ['pkg.c']\n",                          # by name
        "c.py": "from . import __version__\n",                                     # the package: __init__ -> a
        "sub/__init__.py": "",
        "sub/d.py": "from ..a import f\nfrom .. import b\n",
    })
    graph = import_graph(root)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg"},
                     "pkg.sub": set(), "pkg.sub.d": {"pkg.a", "pkg.b"}}
    assert find_cycle(graph) == ["pkg", "pkg.a", "pkg.b", "pkg.c", "pkg"]
    graph["pkg.c"] = set()
    assert find_cycle(graph) is None


# ---- the package ----------------------------------------------------------------------------------

def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert {"stablelm_ref", "stablelm_ref.heads", "stablelm_ref.cuda.decode_engine"} <= set(graph)  # it read them
    assert "stablelm_ref.trace" in graph["stablelm_ref.cli"]                 # COMMAND_MODULES, by name
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("reference", ["stablelm_ref.model", "stablelm_ref.heads"])
def test_the_reference_imports_no_fast_form_trace_or_cli(reference):
    below = reachable(import_graph(), reference)
    assert reference != "stablelm_ref.heads" or "stablelm_ref.model" in below   # the walk does walk
    for other in ("stablelm_ref.fast_cpu", "stablelm_ref.trace", "stablelm_ref.cli", "stablelm_ref.cuda.decode_engine",
                  "stablelm_ref.cuda.flash_prefill", "stablelm_ref.cuda.fused", "stablelm_ref"):
        assert other not in below, f"{reference} reaches {other}: " + ", ".join(sorted(below))


@pytest.mark.parametrize("module", ["stablelm_ref.cli", "stablelm_ref.trace"])
def test_python_dash_m_runs_the_module_once(module):
    """`python -m stablelm_ref.trace` (docs/tracing.md) must not find its module already imported by the
    package's __init__ (runpy warns, and the module would run twice): the package does not import them."""
    import subprocess

    r = subprocess.run([sys.executable, "-W", "error", "-m", module, "--help"], capture_output=True, text=True,
                       timeout=120, cwd=PACKAGE_DIR.parent)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


def test_public_names_at_the_top():
    import stablelm_ref
    from stablelm_ref.generation import TextStreamer
    from stablelm_ref.heads import StableLmForCausalLM
    from stablelm_ref.tokenizer import Tokenizer

    assert stablelm_ref.Tokenizer is Tokenizer and stablelm_ref.TextStreamer is TextStreamer
    assert stablelm_ref.StableLmForCausalLM is StableLmForCausalLM
    assert stablelm_ref.DEFAULT_MODEL == "stablelm-ref:default"
    assert all(hasattr(stablelm_ref, name) for name in stablelm_ref.__all__)
    assert {"StableLmConfig", "StableLmModel", "StableLmForSequenceClassification", "StableLmForTokenClassification",
            "KVCache", "StableLmError"} <= set(stablelm_ref.__all__)


if __name__ == "__main__":
    graph = import_graph()
    short = {m: m.removeprefix("stablelm_ref.") if m != "stablelm_ref" else "__init__" for m in graph}
    for m in sorted(graph, key=lambda m: short[m]):
        print(f"{short[m]:26s} -> {', '.join(sorted(short[n] for n in graph[m])) or '-'}")
    cycle = find_cycle(graph)
    print("cycle: " + " -> ".join(cycle) if cycle else "no cycle")
    sys.exit(1 if cycle else 0)


def test_the_cupy_install_hints_speak_to_a_checkout_and_to_an_installed_package(monkeypatch):
    """Before, both said only pip install 'stablelm-ref[gpu]' (a package index), wrong in a checkout, where the
    extra is installed into .venv with -e '.[gpu]'."""
    import sys

    from stablelm_ref import StableLmError, model
    from stablelm_ref.cuda import xp

    monkeypatch.setitem(sys.modules, "cupy", None)                      # import cupy raises ImportError
    monkeypatch.setattr(xp, "BACKEND", None)
    for call, error in ((lambda: model.array_module("gpu"), StableLmError), (xp.cupy, ImportError)):
        with pytest.raises(error) as info:
            call()
        assert "in a checkout, .venv/bin/pip install -e '.[gpu]'" in str(info.value)
        assert "installed as a package, pip install 'stablelm-ref[gpu]'" in str(info.value)
