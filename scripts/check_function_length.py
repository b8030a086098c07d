"""Fails when a function in the given packages is longer than the limit (default 40 lines).

ruff checks complexity (C901); this checks length, which ruff has no rule for. Lines are counted
from the ``def`` to the function's last line, docstring included, blank lines not.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def long_functions(path: Path, limit: int) -> list[str]:
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            end = node.end_lineno or node.lineno
            length = sum(1 for line in lines[node.lineno - 1 : end] if line.strip())
            if length > limit:
                found.append(f"{path}:{node.lineno}: {node.name} is {length} lines (limit {limit})")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("packages", nargs="+", type=Path)
    parser.add_argument("--limit", type=int, default=40)
    args = parser.parse_args()
    found = [f for package in args.packages for path in sorted(package.rglob("*.py")) for f in long_functions(path, args.limit)]
    print("\n".join(found) or f"no function over {args.limit} lines")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
