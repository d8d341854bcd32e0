"""The package's layering: no module of ``bundle`` imports one of a higher layer (function-local imports included),
and the configs name only what exists."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "bundle"
#: layer of each top-level module or package of ``bundle`` (bundle/__init__.py documents them)
LAYERS = {"_lazy": 0, "constants": 0, "utils": 0, "metadata": 0, "tracking": 0,
          "data": 1, "tasks": 1, "transforms": 1, "metrics": 1, "stats": 1, "visualize": 1,
          "networks": 2, "explain": 2,
          "handlers": 3,
          "doll": 4,
          "workflows": 5,
          "reporting": 6}


def bundle_imports(path: Path) -> set[str]:
    """The top-level ``bundle`` modules that ``path`` imports (absolute or relative, at any depth of the file)."""
    rel = path.relative_to(ROOT.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts] if node.module else [base + [a.name] for a in node.names]
            else:
                names = [node.module.split(".")] if node.module else []
            for parts in names:
                if parts and parts[0] == "bundle" and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "bundle" and len(parts) > 1:
                    found.add(parts[1])
    return found


def module_layer(path: Path) -> tuple[str, int]:
    top = path.relative_to(ROOT).parts[0].removesuffix(".py")
    return top, LAYERS[top]


@pytest.mark.parametrize("path", sorted(p for p in ROOT.rglob("*.py") if p.name != "__init__.py" or p.parent != ROOT),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_from_a_higher_layer(path: Path) -> None:
    top, layer = module_layer(path)
    higher = sorted(m for m in bundle_imports(path) if LAYERS.get(m, -1) > layer)
    assert not higher, f"{path.relative_to(ROOT)} (layer {layer}, {top}) imports higher layers: {higher}"


def test_every_module_has_a_layer() -> None:
    tops = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.rglob("*.py")} - {"__init__"}
    assert tops <= set(LAYERS), f"modules without a layer: {tops - set(LAYERS)}"


def test_the_checker_sees_relative_and_local_imports(tmp_path: Path) -> None:
    """A known answer: a relative import two levels up and a function-local absolute import are both found."""
    probe = ROOT / "data" / "_layering_probe.py"
    probe.write_text("from ..reporting import report\n\ndef f():\n    import bundle.handlers.tracking\n")
    try:
        assert bundle_imports(probe) == {"reporting", "handlers"}
    finally:
        probe.unlink()
