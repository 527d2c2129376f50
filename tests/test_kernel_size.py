"""The kernel stays small: ``flowserve_core/`` under 2,000 lines of code.

Counted as code: a line counts unless it is blank, holds only a comment, or belongs to a
docstring (of a module, class or function); ``flowserve_core/testing/``, the public path of
the plugin test kit, is not counted (the kit itself is the distribution flowserve-testing).
Docstrings are the public API's documentation (a test requires one on every hook), so they
are not what the budget limits. The failure message lists every file's count, largest first.
"""

from __future__ import annotations

import ast
from pathlib import Path

KERNEL = Path(__file__).resolve().parent.parent / "flowserve_core"
BUDGET = 2000


def docstring_lines(source: str) -> set[int]:
    """Line numbers (1-based) of the module's, classes' and functions' docstrings."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return lines


def code_lines(source: str) -> int:
    """Lines that are neither blank, comment-only nor docstring."""
    docs = docstring_lines(source)
    return sum(1 for number, line in enumerate(source.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and number not in docs)


def test_the_measure_counts_code_only():
    source = '''"""Module doc,
on two lines."""
# a comment

import os  # a comment after code


class A:
    """Class doc."""

    x = """data
    on two lines"""

    def f(self):
        """Function doc."""
        return 1
'''
    # import, class, x = (2 lines: data, not a docstring), def, return
    assert code_lines(source) == 6


def test_the_kernel_stays_under_its_budget():
    counts = {str(p.relative_to(KERNEL.parent)): code_lines(p.read_text()) for p in sorted(KERNEL.rglob("*.py"))
              if "testing" not in p.relative_to(KERNEL).parts}
    assert "flowserve_core/engine.py" in counts
    total = sum(counts.values())
    table = "\n".join(f"{n:6d}  {name}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    assert total < BUDGET, (f"the kernel has {total} lines of code, over its budget of {BUDGET}; "
                            f"move what only plugins or tests need out of it:\n{table}")
