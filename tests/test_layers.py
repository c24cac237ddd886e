"""The package's tree shows its layers, and a module imports only from its own layer or those below."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "aioli_repro"

# Lowest first. A top-level module not listed here is a command-line entry point (the top layer).
LAYERS = [
    {"fileio", "world"},
    {"model", "data"},
    {"config"},
    {"mixing"},
    {"training"},
    {"pipeline"},
    {"results"},
]
CLI = len(LAYERS)


def layer_of(module: str) -> int:
    """`aioli_repro.training.run` -> the index of the layer "training" is in."""
    part = module.split(".")[1]
    return next((i for i, names in enumerate(LAYERS) if part in names), CLI)


def imports_of(path: Path) -> set[str]:
    """Every `aioli_repro.*` module a file imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aioli_repro."):
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.module == "aioli_repro":
            found |= {f"aioli_repro.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("aioli_repro.")}
    return found


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__")


def violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name == "aioli_repro":
            continue
        for imported in sorted(imports_of(path)):
            if layer_of(imported) > layer_of(name):
                bad.append(f"{name} (layer {layer_of(name)}) imports {imported} (layer {layer_of(imported)})")
    return bad


def test_no_module_imports_a_higher_layer() -> None:
    assert violations() == []


def test_every_subpackage_is_a_known_layer() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages <= set().union(*LAYERS)


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from aioli_repro.pipeline.stage import stage_hash\n")
    assert imports_of(f) == {"aioli_repro.pipeline.stage"}
    assert layer_of("aioli_repro.pipeline.stage") > layer_of("aioli_repro.training.run")
    assert layer_of("aioli_repro.reproduce") == CLI
