"""The package's folders show its dependency direction, and its imports keep to it.

core → clients → steps → orchestration → tools; dev beside tools and above them; the command line on top.
Every import counts, also those inside functions, and no module imports itself back through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "clickhouse_etl"
LAYERS = ["core", "clients", "steps", "orchestration", "tools", "dev", "cli"]
PRODUCTION = {"core", "clients", "steps", "orchestration", "tools"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    part = module.split(".")[1] if "." in module else ""
    return part if part in LAYERS else "package"


def project_imports() -> dict[str, set[str]]:
    """module → the project modules it imports (anywhere in the file)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found |= {name for name in names if name in modules and name != module}
        graph[module] = found
    return graph


def test_every_module_lives_in_a_layer() -> None:
    stray = [m for m in project_imports() if layer_of(m) == "package" and m != "clickhouse_etl"]
    assert stray == []


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = []
    for module, imported in project_imports().items():
        if module == "clickhouse_etl":
            continue
        for target in imported:
            if LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(module)):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_production_code_never_imports_the_dev_tooling() -> None:
    leaks = [
        f"{module} -> {target}"
        for module, imported in project_imports().items()
        if layer_of(module) in PRODUCTION
        for target in imported
        if layer_of(target) in ("dev", "cli")
    ]
    assert leaks == []


def test_there_is_no_import_cycle() -> None:
    graph = project_imports()
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append([*path[path.index(target) :], target] if target in path else [module, target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
