"""The package's shape: imports run one way through the layers, no module imports itself in a circle,
and functions and modules stay short enough to read.

Every import counts, the ones inside functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "soragen"

# Lowest first: a module may import from its own layer and the ones before it, never after.
LAYERS = ["core", "layers", "models", "diffusion", "families", "io", "pipeline", "train", "tools", "cli"]
# Modules that sit at the package's root, and the layer each belongs to.
ROOT_MODULES = {"soragen": "core", "soragen.pipeline": "pipeline", "soragen.__main__": "cli"}

MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500


def module_name(path: Path) -> str:
    parts = ["soragen", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(name: str) -> str:
    if name in ROOT_MODULES:
        return ROOT_MODULES[name]
    layer = name.split(".")[1]
    assert layer in LAYERS, f"{name} is in no layer: add its folder to LAYERS"
    return layer


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The soragen modules `path` imports, anywhere in it (`from soragen.x import y` is soragen.x.y
    where that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("soragen")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("soragen"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; soragen imports by absolute name")
    return {name for name in found if name in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def test_every_import_runs_down_the_layers():
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            if LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(name)):
                wrong.append(f"{name} ({layer_of(name)}) imports {target} ({layer_of(target)})")
    assert not wrong, "imports that run up the layers:\n" + "\n".join(sorted(wrong))


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_circle():
    edges = graph()
    for package in [n for n, p in modules().items() if p.name == "__init__.py"]:
        edges[package] = {t for t in edges[package] if not t.startswith(package + ".")}  # a package lists its parts
    cycle = find_cycle(edges)
    assert cycle is None, "modules that import each other in a circle: " + " -> ".join(cycle)


def test_the_checks_can_fail():
    """The cycle finder and the layer order catch what they are for."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert LAYERS.index(layer_of("soragen.cli")) > LAYERS.index(layer_of("soragen.core.config"))
    with pytest.raises(AssertionError):
        layer_of("soragen.nowhere.module")


def long_functions() -> list[str]:
    out = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(f"{name}.{node.name}")
    return out


def long_modules() -> list[str]:
    return [name for name, path in modules().items() if len(path.read_text().splitlines()) > MAX_MODULE_LINES]


# What is still over the limits; this list only shrinks.
STILL_LONG: set[str] = set()


def test_functions_and_modules_stay_short():
    over = set(long_functions()) | set(long_modules())
    assert not over - STILL_LONG, f"over {MAX_FUNCTION_LINES} lines a function or {MAX_MODULE_LINES} a module: " \
                                  f"{sorted(over - STILL_LONG)}"
    assert not STILL_LONG - over, f"no longer over the limits (take them off STILL_LONG): {sorted(STILL_LONG - over)}"
