"""Imports go down the layers only (DESIGN.md section 4), the master never loads app code, and
no module imports itself back through others (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "fcgi_engine"

LAYER = {
    "protocol": 0,
    "config": 0,
    "system": 1,
    "control": 1,
    "channel": 1,
    "client": 1,
    "handoff": 1,
    "status_pass": 1,
    "metrics": 1,
    "reloader": 1,
    "serving": 2,
    "master": 2,
    "manager": 2,
    "top": 3,
    "cli": 3,
    "__main__": 3,
    "__init__": 0,
}
FORBIDDEN = {
    "master": {"serving"},
    "serving": {"master", "manager"},
    "manager": {"serving"},
}


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
            if node.module == "fcgi_engine":
                # `from fcgi_engine import top` imports the module fcgi_engine.top.
                found += [
                    f"fcgi_engine.{a.name}"
                    for a in node.names
                    if (PACKAGE / f"{a.name}.py").exists() or (PACKAGE / a.name).is_dir()
                ]
    return [name for name in found if name == "fcgi_engine" or name.startswith("fcgi_engine.")]


def test_imports_go_down_the_layers() -> None:
    problems = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts)
        own = part_of(module)
        own_name = own.removesuffix(".py")
        for target in imports_of(path):
            other = part_of(target)
            if other == own_name or other == "__init__":
                continue
            if LAYER.get(other, 9) > LAYER.get(own_name, 9) or (
                LAYER.get(other) == LAYER.get(own_name) and LAYER.get(own_name) == 0
            ):
                problems.append(f"{module} imports {target} (layer {LAYER.get(other)})")
            if other in FORBIDDEN.get(own_name, set()):
                problems.append(f"{module} must not import {target}")
    assert not problems, "\n".join(problems)


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Each module of ours and the modules of ours it imports, wherever in it the import is."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in paths}
            elif isinstance(node, ast.ImportFrom) and node.module in paths:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in paths else node.module)
        graph[module] = targets - {module}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_module_imports_itself_back() -> None:
    cycles = import_cycles(import_graph())
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_circle_check_finds_a_lazy_import_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
