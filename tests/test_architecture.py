"""The import direction of docs/ARCHITECTURE.md: a layer imports only lower layers (and its own package).

Every import is counted, including those inside functions (lazy imports are still dependencies).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qpeft_deploy"

# Rank of each top-level part of the package, lowest first. Parts of equal rank must not import each other.
LAYERS = {
    "__init__": 0,
    "errors": 0,
    "installed": 0,
    "atomic": 1,
    "core": 1,
    "models": 2,
    "peft_native": 2,
    "data": 3,
    "io": 3,
    "training": 4,
    "merge": 4,
    "export": 5,
    "runtime": 5,
    "serve": 6,
    "cli": 7,
}


def part(module: str) -> str:
    """The top-level part of ``qpeft_deploy.<part>....`` (``__init__`` for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        dotted = path.relative_to(PACKAGE.parent).with_suffix("").as_posix().replace("/", ".")
        found.append((dotted.removesuffix(".__init__"), path))
    return found


def imported(module: str, path: Path) -> set[str]:
    """The qpeft_deploy modules ``module`` imports (absolute and relative, at any depth of the file)."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n == "qpeft_deploy" or n.startswith("qpeft_deploy.")}


def test_every_part_has_a_layer():
    assert {part(m) for m, _ in modules()} <= LAYERS.keys()


@pytest.mark.parametrize("module,path", modules(), ids=[m for m, _ in modules()])
def test_imports_go_down(module, path):
    own = part(module)
    wrong = []
    for name in sorted(imported(module, path)):
        other = part(name)
        if other not in LAYERS or other == own:  # a name inside a module, or the module's own package
            continue
        if LAYERS[other] >= LAYERS[own] and name != "qpeft_deploy":
            wrong.append(name)
    assert not wrong, f"{module} (layer {own}) imports {wrong}: lower layers never import higher ones"


def test_only_lora_calibration_among_the_exporters_imports_training():
    importers = {
        module
        for module, path in modules()
        if part(module) == "export" and "training" in {part(n) for n in imported(module, path)}
    }
    assert importers <= {"qpeft_deploy.export.lora.calibrate"}, importers


def test_core_is_free_of_the_upper_layers():
    upper = {"export", "serve", "training", "runtime", "merge", "cli", "io", "data", "models"}
    for module, path in modules():
        if part(module) == "core":
            assert not {part(n) for n in imported(module, path)} & upper, module
