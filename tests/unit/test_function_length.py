"""Hygiene (issue 16): no function in the product packages is longer than 60 lines.

The product is what sites, aggregators, researchers and brokers install; tests, benchmarks and
scripts are not held to it. A function over the limit is listed with its file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("common", "broker", "node", "aggregators", "researcher")
MAX_LINES = 60


def long_functions(max_lines: int = MAX_LINES) -> list[str]:
    """`path:line name (N lines)` of every function in the product packages over `max_lines`."""
    found = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    if lines > max_lines:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_the_product_is_over_60_lines():
    assert long_functions() == []


if __name__ == "__main__":  # python tests/unit/test_function_length.py [N]: the list, longest first
    import sys

    for line in long_functions(int(sys.argv[1]) if len(sys.argv) > 1 else MAX_LINES):
        print(line)
