"""The package's shape: imports go one way, and modules stay small.

An import of a project module inside a function counts as a cycle (it is how one is dodged);
a lazy import of a heavy third-party library or of a stdlib module is fine.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
#: Packages and modules held to "no project import inside a function" and "at most 600 lines": all of src/.
CLEAN = ("infercache/",)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _project_imports(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "infercache"]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "infercache":
        return [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
    return []


def _scan(path: Path) -> tuple[set[str], list[str]]:
    """(module-level project imports outside TYPE_CHECKING, 'line: statement' of those inside functions)."""
    top: set[str] = set()
    inside: list[str] = []

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            f = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            tc = type_checking or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            names = _project_imports(child)
            if names and f:
                inside.append(f"{child.lineno}: {ast.unparse(child)}")
            elif names and not tc:
                top.update(names)
            visit(child, f, tc)

    visit(ast.parse(path.read_text()), False, False)
    return top, inside


def _in_clean_scope(path: Path) -> bool:
    rel = path.relative_to(SRC).as_posix()
    return any(rel == c or (c.endswith("/") and rel.startswith(c)) for c in CLEAN)


def test_no_import_cycle_in_src() -> None:
    modules = _modules()
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = {d for d in _scan(path)[0] if d in modules and d != name}
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        deps |= {".".join(d.split(".")[:i]) for d in set(deps) for i in range(2, d.count(".") + 1)} - {name}
        edges[name] = {d for d in deps if d in modules and not name.startswith(d + ".")}
    seen: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for dep in sorted(edges[node]):
            if seen.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in seen:
                walk(dep)
        stack.pop()
        seen[node] = 2

    for name in sorted(edges):
        if name not in seen:
            walk(name)


@pytest.mark.parametrize("path", [p for p in sorted(SRC.rglob("*.py")) if _in_clean_scope(p)],
                         ids=lambda p: p.relative_to(SRC).as_posix())
def test_no_project_import_inside_a_function(path: Path) -> None:
    assert _scan(path)[1] == []


@pytest.mark.parametrize("path", [p for p in sorted(SRC.rglob("*.py")) if _in_clean_scope(p)],
                         ids=lambda p: p.relative_to(SRC).as_posix())
def test_module_at_most_600_lines(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 600
