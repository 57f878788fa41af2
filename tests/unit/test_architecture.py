"""The layers of the code base point one way: no import cycle between modules, no import upwards or sideways
between packages, no TensorFlow in the base, and no old top-level import name left anywhere.

Reads the source with `ast` (lazy imports inside functions count: they hide a cycle, they do not remove it).
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Folder -> import name, as setup.py maps them.
SOURCE_ROOTS = {"conveyor_ml": "conveyor_ml", "components": "conveyor_ml.components",
                "pipelines": "conveyor_ml.pipelines"}
# Lower numbers are lower layers; a package may import only packages of a lower layer (and itself).
LAYERS = {
    "conveyor_ml.base": 0,
    "conveyor_ml.formats": 1, "conveyor_ml.metadata": 1,
    "conveyor_ml.data": 2, "conveyor_ml.components": 2, "conveyor_ml.serving": 2,
    "conveyor_ml.pipelines": 3, "conveyor_ml.operations": 3,
    "conveyor_ml.cli": 4,
}
TENSORFLOW_STACK = ("tensorflow", "tfx", "tensorflow_serving", "tensorflow_model_analysis",
                    "tensorflow_data_validation", "tensorflow_transform", "tfx_bsl", "keras", "tf_keras")


def _modules() -> dict[str, Path]:
    found = {}
    for folder, import_name in SOURCE_ROOTS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([import_name, *parts])] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in a file, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _resolve(name: str) -> str | None:
    """The project module an imported name refers to (a submodule, else its package), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in MODULES.items():
        for name, _ in _imports(module, path):
            target = _resolve(name)
            if target and target != module and not module.startswith(target + "."):
                graph[module].add(target)
    return graph


def _layer_of(module: str) -> str | None:
    """The layer package a module belongs to (None for the root package, which sets the environment)."""
    return next((package for package in sorted(LAYERS, key=len, reverse=True)
                 if module == package or module.startswith(package + ".")), None)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(MODULES):
        if node not in index:
            visit(node)
    return found


def test_every_module_belongs_to_a_layer():
    assert MODULES, "no source found"
    orphans = [m for m in MODULES if m != "conveyor_ml" and _layer_of(m) is None]
    assert orphans == []


def test_no_import_cycle_between_modules():
    assert _cycles(_graph()) == []


def test_packages_import_only_lower_layers():
    upward = []
    for module, targets in _graph().items():
        for target in targets:
            source_layer, target_layer = _layer_of(module), _layer_of(target)
            if source_layer is None or target_layer is None:
                continue
            if source_layer != target_layer and LAYERS[target_layer] >= LAYERS[source_layer]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_base_layer_does_not_import_tensorflow():
    offenders = [f"{module}:{line} imports {name}"
                 for module, path in MODULES.items() if _layer_of(module) == "conveyor_ml.base"
                 for name, line in _imports(module, path) if name.split(".")[0] in TENSORFLOW_STACK]
    assert offenders == []


@pytest.mark.parametrize("folder", ["conveyor_ml", "components", "pipelines", "tests", "benchmarks"])
def test_no_code_uses_the_old_top_level_import_names(folder):
    old = []
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            old += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                    if n.split(".")[0] in ("pipelines", "components", "serving")]
    assert old == []


def test_the_checker_finds_a_cycle_and_an_upward_import():
    """The checks above can fail: a planted cycle and a planted upward edge are found."""
    planted = {"conveyor_ml.base.errors": {"conveyor_ml.base.spec"}, "conveyor_ml.base.spec": {"conveyor_ml.base.errors"}}
    assert _cycles(planted) == [["conveyor_ml.base.errors", "conveyor_ml.base.spec"]]
    assert LAYERS[_layer_of("conveyor_ml.serving.rest")] > LAYERS[_layer_of("conveyor_ml.base.errors")]
    assert _layer_of("conveyor_ml.components.trainer.executor") == "conveyor_ml.components"


def test_the_readme_architecture_table_names_every_module():
    """The README's folder table is where a newcomer learns the layout: a module it leaves out is one they
    will not find (it left out a dozen before)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Architecture"):readme.index("### JSON output")]
    folders = [ROOT / "conveyor_ml" / name for name in ("base", "formats", "metadata", "data", "serving", "operations")]
    folders += [ROOT / "components", ROOT / "pipelines"]
    missing = [str(path.relative_to(ROOT)) for folder in folders for path in sorted(folder.glob("*.py"))
               if path.name != "__init__.py" and f"`{path.name}`" not in section]
    assert missing == []
