"""The house: the installed import names, and an import graph of `get` without circles."""

import ast
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_kernels_install_as_get_kernels(tmp_path):
    top_level = importlib.metadata.distribution("get").read_text("top_level.txt").split()
    assert "get_kernels" in top_level and "kernels" not in top_level  # PyPI's `kernels` keeps its own name
    # A fresh interpreter outside the repository sees what is installed: get_kernels is our folder, and whatever
    # `kernels` resolves to (nothing, or PyPI's package) is not.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import importlib.util, get_kernels; s = importlib.util.find_spec('kernels'); "
            "print(get_kernels.__file__); print(s.origin if s else None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ours, other = out.stdout.split("\n")[:2]
    assert Path(ours).resolve() == (REPO / "kernels" / "__init__.py").resolve()
    assert other == "None" or Path(other).resolve().parent != (REPO / "kernels").resolve()


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The modules of `get` that a module imports (at any depth of its code: lazy imports count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up node.level - 1 packages from this one
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            # Importing get.edm.checkpoint from outside get.edm first runs get/edm/__init__.py.
            parts = t.split(".")
            found |= {a for a in (".".join(parts[:i]) for i in range(2, len(parts) + 1))
                      if a in modules and a != name and not name.startswith(a + ".")}
    return found


def test_import_graph_of_get_has_no_cycle():
    files = {_module_name(p): p for p in sorted((REPO / "get").rglob("*.py"))}
    graph = {name: _imports(path, name, set(files)) for name, path in files.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    # And every module imports on its own in a fresh interpreter.
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)"
    out = subprocess.run([sys.executable, "-c", code, *sorted(files)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
