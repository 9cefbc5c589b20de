"""List runtime modules over a line budget and functions over a code-line budget (docstrings not counted).

python scripts/check_sizes.py                 # modules > 400 lines, functions > 60 code lines
python scripts/check_sizes.py --module 300 --function 40
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "runtime"


def code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", type=int, default=400, help="module line budget (default 400)")
    parser.add_argument("--function", type=int, default=60, help="function code-line budget (default 60)")
    args = parser.parse_args()
    over = 0
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text()
        if (n := text.count("\n")) > args.module:
            print(f"module {path.relative_to(ROOT.parent)}: {n} lines")
            over += 1
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and code_lines(node) > args.function:
                print(f"function {path.relative_to(ROOT.parent)}:{node.lineno} {node.name}: {code_lines(node)} lines")
                over += 1
    print(f"{over} over budget (modules > {args.module} lines, functions > {args.function} code lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
