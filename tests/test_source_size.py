"""Source size limits (issue 31): no module over 300 lines, no function or method
over 60, so that each file and function stays readable in one sitting.

"Source" is every .py under fedkd/, strategies/ and simulations/; tests/ is not
source (test modules grow with the behaviour they pin down, and long parametrised
tables are clearer in one place). A function's length is end_lineno - lineno + 1
of its `def` (decorators not counted). Pure AST: nothing is imported or run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("fedkd", "strategies", "simulations")
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 60


def oversized(path: Path, rel: str) -> dict[str, str]:
    """{offender: why} for one module: the module itself (`rel`) when over
    MAX_MODULE_LINES, and each function or method (`rel:Qual.name`) over
    MAX_FUNCTION_LINES."""
    text = path.read_text()
    found: dict[str, str] = {}
    lines = len(text.splitlines())
    if lines > MAX_MODULE_LINES:
        found[rel] = f"{rel}: module has {lines} lines (limit {MAX_MODULE_LINES})"

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                size = child.end_lineno - child.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    key = f"{rel}:{name}"
                    found[key] = f"{key}: function has {size} lines (limit {MAX_FUNCTION_LINES})"
                name += "."
            elif isinstance(child, ast.ClassDef):
                name = f"{prefix}{child.name}."
            visit(child, name)

    visit(ast.parse(text, filename=str(path)), "")
    return found


def source_offenders(root: Path = ROOT) -> dict[str, str]:
    found: dict[str, str] = {}
    for top in SOURCE_DIRS:
        for path in sorted((root / top).rglob("*.py")):
            found |= oversized(path, path.relative_to(root).as_posix())
    return found


def test_source_modules_and_functions_stay_under_the_limits():
    over = sorted(source_offenders().values())
    assert not over, "over the size limits:\n  " + "\n  ".join(over)


def test_the_checker_catches_a_long_function_and_a_long_module(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(59))
    func = f"def long():\n{body}\n    return 0\n"  # 61 lines
    (tmp_path / "fedkd").mkdir()
    (tmp_path / "fedkd" / "f.py").write_text(func)
    (tmp_path / "simulations").mkdir()
    (tmp_path / "simulations" / "m.py").write_text("x = 0\n" * 301)
    (tmp_path / "strategies").mkdir()
    method = "class A:\n    def short(self):\n" + "        y = 1\n" * 58 + "        return y\n"
    # a 60-line method in a 300-line module: within both limits
    (tmp_path / "strategies" / "ok.py").write_text(method + "z = 0\n" * 239)
    found = source_offenders(tmp_path)
    assert set(found) == {"fedkd/f.py:long", "simulations/m.py"}
    assert found["fedkd/f.py:long"].endswith("function has 61 lines (limit 60)")
    assert found["simulations/m.py"].endswith("module has 301 lines (limit 300)")
