"""The config is a schema: `fedkd.config` imports no component (strategies,
mitigations) and not the composition layer (`fedkd.compose`), so there is no import
cycle between the config and the components. Checked statically: every `import` and
`from ... import` in fedkd/, strategies/ and simulations/ (inside functions and
`TYPE_CHECKING` blocks too) resolved to the project's modules."""

from __future__ import annotations

import ast
import os
from pathlib import Path

PACKAGES = ("fedkd", "strategies", "simulations")
CONFIG = "fedkd.config"
FORBIDDEN = ("strategies", "fedkd.mitigations", "fedkd.compose")
# the root to walk (FEDKD_IMPORT_ROOT: another checkout, e.g. a worktree of an old commit)
ROOT = Path(os.environ.get("FEDKD_IMPORT_ROOT") or Path(__file__).resolve().parent.parent)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def project_modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _with_parents(name: str, known: dict[str, Path]) -> set[str]:
    """Importing a.b.c runs a, a.b and a.b.c: those of them that are the project's."""
    parts = name.split(".")
    return {m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in known}


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules that `module` imports anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found |= _with_parents(alias.name, known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            found |= _with_parents(source, known)
            for alias in node.names:  # `from pkg import submodule`
                found |= _with_parents(f"{source}.{alias.name}", known)
    found.discard(module)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    known = project_modules(root)
    return {m: imports_of(m, p, known) for m, p in known.items()}


def reachable(graph: dict[str, set[str]], start: set[str]) -> dict[str, list[str]]:
    """Every module reachable from `start`, with one import path to it."""
    paths = {m: [m] for m in start}
    todo = list(start)
    while todo:
        here = todo.pop(0)  # breadth first: the shortest chain
        for there in sorted(graph.get(here, ())):
            if there not in paths:
                paths[there] = [*paths[here], there]
                todo.append(there)
    return paths


def forbidden_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a config module of a component or of the composition layer."""
    return sorted(
        f"{m} imports {dep}"
        for m, deps in graph.items()
        if _within(m, CONFIG)
        for dep in deps
        if any(_within(dep, f) for f in FORBIDDEN)
    )


def cycles(graph: dict[str, set[str]], package: str, others: tuple[str, ...]) -> list[str]:
    """One import chain package -> ... -> other -> ... -> package for each of `others`
    that `package` reaches and that reaches `package` back."""
    inside = {m for m in graph if _within(m, package)}
    from_package = reachable(graph, inside)
    found = []
    for other in others:
        members = sorted(m for m in from_package if _within(m, other))
        if not members:
            continue
        back = reachable(graph, {members[0]})
        home = sorted(m for m in back if m in inside)
        if home:
            found.append(" -> ".join(from_package[members[0]] + back[home[0]][1:]))
    return found


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph(ROOT)
    assert "fedkd.config" in graph["strategies"] or "fedkd.config" in graph["strategies.base"]
    assert "fedkd.errors" in graph["fedkd.config.checks"]
    assert graph["fedkd.config.learning"] >= {"fedkd.models"}  # a function-level import


def test_config_imports_no_component_and_not_compose():
    found = forbidden_imports(import_graph(ROOT))
    assert not found, "\n".join(found)


def test_no_import_cycle_between_config_and_components():
    found = cycles(import_graph(ROOT), CONFIG, ("strategies", "fedkd.mitigations"))
    assert not found, "\n".join(found)


def test_no_import_cycle_between_compose_and_components():
    graph = import_graph(ROOT)
    found = cycles(graph, "fedkd.compose", ("strategies", "fedkd.mitigations"))
    assert not found, "\n".join(found)
