"""The layout shows the data flow, and a test keeps it so: imports in switcher/ point one
way (cli → ops → core and adapters; the router only to model, state, errors), with no
cycle, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "switcher"
ROUTER_MAY_IMPORT = {"switcher.model", "switcher.state", "switcher.errors"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every switcher module and the switcher modules it imports (anywhere in it)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        found[name] = {t for t in targets if t.startswith("switcher")}
    modules = set(found)
    return {name: {t for t in targets if t in modules and t != name}
            for name, targets in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a depth-first walk), or None."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        for target in sorted(graph.get(name, ())):
            if target in path:
                return [*path[path.index(target):], target]
            if target not in done:
                found = visit(target, [*path, target])
                if found:
                    return found
        done.add(name)
        return None

    for name in sorted(graph):
        if name not in done and (cycle := visit(name, [name])):
            return cycle
    return None


def test_there_is_no_import_cycle_in_switcher() -> None:
    assert find_cycle(imports()) is None


def test_the_cycle_walk_finds_a_cycle() -> None:
    """Its negative control: the walk above is not blind."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_cli_and_ops_import_ops() -> None:
    outside = {name: sorted(t for t in targets if t.startswith("switcher.ops"))
               for name, targets in imports().items()
               if not name.startswith("switcher.ops") and name != "switcher.cli"}
    assert {n: t for n, t in outside.items() if t} == {}


def in_router(name: str) -> bool:
    """switcher.router and below; not switcher.routerctl, the CLI's adapter to it."""
    return name == "switcher.router" or name.startswith("switcher.router.")


def test_the_router_imports_only_model_state_and_errors() -> None:
    for name, targets in imports().items():
        if in_router(name):
            foreign = {t for t in targets if not in_router(t)}
            assert foreign <= ROUTER_MAY_IMPORT | {"switcher"}, (name, foreign)
