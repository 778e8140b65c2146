"""The shape of the code: layers that only import downwards, no import cycles, private APIs in one module."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"
# Top to bottom; a module may import its own layer and those below it, never one above.
LAYERS = [
    ("entry points", ("hydra_plugins", "mlplab.cli")),
    ("sweeps and search", ("mlplab.sweeps",)),
    ("one run", ("mlplab.run",)),
    ("model and data", ("mlplab.model", "mlplab.data")),
    ("shared", ("mlplab.errors", "mlplab.files", "mlplab.compat", "mlplab")),
]
LIBRARIES = (
    "hydra",
    "lightning",
    "torch",
    "optuna",
    "omegaconf",
    "tensorboard",
    "torchvision",
    "torchmetrics",
    "wandb",
)
COMPAT = "mlplab.compat"


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(SOURCE.rglob("*.py")):
        name = ".".join(path.relative_to(SOURCE).with_suffix("").parts).removesuffix(".__init__")
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS")


def project_imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The project's modules a module imports (functions' imports included)."""
    imported = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        imported |= {name for name in names if name in known}
    return imported


def test_layers_import_only_downwards_and_without_cycles():
    trees = modules()
    graph = {name: project_imports(tree, set(trees)) - {name} for name, tree in trees.items()}
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) < layer_of(module)
    ]
    assert not upward, "imports that climb a layer:\n" + "\n".join(upward)

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for target in sorted(graph[path[-1]]):
            if target == start:
                return [*path, start]
            if target not in path and (found := cycle_from(start, [*path, target])):
                return found
        return None

    cycles = [" -> ".join(cycle) for name in graph if (cycle := cycle_from(name, [name]))]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_private_apis_of_libraries_are_used_only_in_compat():
    uses = []
    trees = modules()
    ours = {
        node.name
        for tree in trees.values()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.ClassDef))
    }
    ours |= {
        target.attr
        for tree in trees.values()
        for node in ast.walk(tree)
        for target in (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if isinstance(target, ast.Attribute)
    }
    ours |= {"_exit"}  # os._exit: the standard library's documented exit without clean-up
    ours |= {node.id for tree in trees.values() for node in ast.walk(tree) if isinstance(node, ast.Name)}
    for name, tree in trees.items():
        if name == COMPAT:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
                if any(_is_private(part) for part in node.module.split(".")) or any(
                    _is_private(a.name) for a in node.names
                ):
                    uses.append(f"{name}: from {node.module} import {', '.join(a.name for a in node.names)}")
            if isinstance(node, ast.Attribute) and _is_private(node.attr) and node.attr not in ours:
                uses.append(f"{name}: .{node.attr} (line {node.lineno})")
            if isinstance(node, ast.ClassDef):  # overriding a library class's private method
                module = importlib.import_module(name)
                cls = getattr(module, node.name, None)
                for method in (item.name for item in node.body if isinstance(item, ast.FunctionDef)):
                    bases = [
                        base
                        for base in (cls.__mro__[1:] if inspect.isclass(cls) else [])
                        if not base.__module__.startswith(("mlplab", "hydra_plugins"))
                    ]
                    if _is_private(method) and any(hasattr(base, method) for base in bases):
                        uses.append(f"{name}: {node.name}.{method} overrides a library's private method")
    assert not uses, f"private APIs outside {COMPAT}:\n" + "\n".join(uses)


@pytest.mark.parametrize("layer", ["mlplab.run", "mlplab.model", "mlplab.data"])
def test_hydra_stops_at_the_entry_points(layer):
    trees = modules()
    users = [
        name
        for name, tree in trees.items()
        if name.startswith(layer)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(
            n.split(".")[0] in ("hydra", "omegaconf")
            for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
        )
    ]
    assert not users, f"{layer} imports Hydra or OmegaConf: {sorted(set(users))}"
