"""Module and function sizes (README, "Contributing"): no module in volattack/ over 500 lines
and no function over 80 lines, unless its docstring says why in a line starting with
"Size:" (modules) or "Length:" (functions)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "volattack"
MAX_MODULE, MAX_FUNCTION = 500, 80


def _reason(doc: str | None, marker: str) -> bool:
    return any(line.strip().startswith(marker) for line in (doc or "").splitlines())


def oversized(package: Path = PACKAGE) -> list[str]:
    """Every module and function over its limit without a stated reason."""
    bad = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        rel = path.relative_to(package.parent)
        n = len(text.splitlines())
        if n > MAX_MODULE and not _reason(ast.get_docstring(tree), "Size:"):
            bad.append(f"{rel}: {n} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION and not _reason(ast.get_docstring(node), "Length:"):
                    bad.append(f"{rel}:{node.lineno}: {node.name}() {length} lines")
    return bad


def test_modules_and_functions_are_small() -> None:
    assert oversized() == []


def test_the_checker_counts_and_accepts_a_stated_reason(tmp_path) -> None:
    pkg = tmp_path / "volattack"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(85))
    (pkg / "long.py").write_text(f"def f():\n{body}\n")
    (pkg / "ok.py").write_text(f'def g():\n    """Builds a table.\n\n    Length: one literal.\n    """\n{body}\n')
    (pkg / "big.py").write_text("\n".join(f"y{i} = {i}" for i in range(501)) + "\n")
    assert oversized(pkg) == ["volattack/big.py: 501 lines", "volattack/long.py:1: f() 86 lines"]
