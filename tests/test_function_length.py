"""No function in flaxlm/ runs past 80 lines, so each one reads on a screen: a longer one is
split into named steps (see ../shared/STYLE.md). Lines count from ``def`` (decorators not
included) to the function's last line, docstring and comments included. A nested function
counts on its own and as part of the function around it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flaxlm"
MAX_LINES = 80


def long_functions(root: Path = PACKAGE, limit: int = MAX_LINES) -> list[str]:
    """``module:qualname (N lines)`` for each function of the package over ``limit`` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        found += [
            f"{module}:{name} ({lines} lines)"
            for name, lines in _function_lengths(ast.parse(path.read_text(), str(path)))
            if lines > limit
        ]
    return found


def _function_lengths(node: ast.AST, prefix: str = "") -> list[tuple[str, int]]:
    """(qualified name, line count) of every function under ``node``, nested ones included."""
    out = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            name = prefix + child.name
            out.append((name, child.end_lineno - child.lineno + 1))
            out += _function_lengths(child, f"{name}.<locals>.")
        elif isinstance(child, ast.ClassDef):
            out += _function_lengths(child, f"{prefix}{child.name}.")
        else:  # functions defined under if/try/with blocks
            out += _function_lengths(child, prefix)
    return out


def _function(name: str, lines: int, indent: str = "") -> str:
    """Source of a function ``lines`` long, its ``def`` line included."""
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(lines - 2))
    return f"{indent}def {name}():\n{body}{indent}    return 0\n"


def test_finds_a_planted_long_function(tmp_path):
    pkg = tmp_path / "flaxlm"
    (pkg / "tools").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "tools" / "long.py").write_text(
        "class Runner:\n" + _function("step", 81, "    ") + "\n\n"
        + _function("fits", 80) + "\n\n"  # exactly the limit: fine
        + "if True:\n    async def outer():\n" + _function("inner", 81, "        ")
        + "        return inner\n"
    )  # fmt: skip
    assert long_functions(pkg) == [
        "flaxlm.tools.long:Runner.step (81 lines)",
        "flaxlm.tools.long:outer (83 lines)",  # inner's 81 lines count within outer too
        "flaxlm.tools.long:outer.<locals>.inner (81 lines)",
    ]


def test_no_function_is_longer_than_80_lines():
    long = long_functions()
    assert not long, f"functions over {MAX_LINES} lines (split them into named steps):\n" + (
        "\n".join(long)
    )
