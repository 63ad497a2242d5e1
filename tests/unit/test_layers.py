"""Imports go down the layers only (DESIGN.md section 4); the master never loads app code."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "fcgi_engine"

LAYER = {
    "protocol": 0,
    "config": 0,
    "system": 1,
    "control": 1,
    "client": 1,
    "serving": 2,
    "master": 2,
    "manager": 2,
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
