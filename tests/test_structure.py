"""The package's shape (issue 15): no import cycle among edged's modules, each module about one concept in size.

Both walk the source with `ast`, so they hold for every module, also those no other test imports.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PKG = ROOT / "edged"
BUDGET = 420  # STYLE: one concept per module, about 400 lines; a little slack, not a second concept


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _module_level_imports(path: Path, name: str, known: set[str]) -> set[str]:
    """edged modules imported when `name` is imported: top-level statements, not functions or TYPE_CHECKING."""
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(stmts: list[ast.stmt]) -> None:
        for node in stmts:
            if isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                if base in known:
                    out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)

    visit(tree.body)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PKG.rglob("*.py")}
    known = set(files)
    return {m: _module_level_imports(p, m, known) for m, p in files.items()}


def test_the_walk_sees_the_imports_it_must():
    g = _graph()
    assert "edged.admission" in g["edged.daemon"] and "edged.supervision" in g["edged.daemon"], g["edged.daemon"]
    assert "edged.benchpaths" in g["edged.bench_e2e"]


def test_no_import_cycle_among_edged_modules():
    g = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def dfs(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                cycles.append([*stack[stack.index(n):], n])
            elif n not in state:
                dfs(n, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            dfs(m, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_module_is_about_one_concept_in_size():
    big = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > BUDGET}
    assert not big, f"modules over {BUDGET} lines: {big}"


def test_every_package_of_edged_is_installed():
    """A subpackage missing from [tool.setuptools] packages is missing from every non-editable install (make
    install, the device image, the contract checks) while the editable one used by the tests still works."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module(p.parent / "__init__.py") for p in PKG.rglob("__init__.py")}
    assert found <= listed, f"packages not installed: {sorted(found - listed)}"
