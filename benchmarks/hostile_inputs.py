"""The hostile-input suite as a table: each case of ``tests/runtime/test_hostile_inputs.py`` run through
``diffseg predict``, with its exit code and the first line of what the user sees.

    python benchmarks/hostile_inputs.py        # writes benchmarks/results/hostile_inputs.{json,md}
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results

SUITE = Path(__file__).resolve().parent.parent / "tests" / "runtime" / "test_hostile_inputs.py"


def _suite():
    spec = importlib.util.spec_from_file_location("hostile_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> int:
    from diffseg.runtime.cli import main as diffseg_main

    suite = _suite()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clean = suite.build_clean(Path(tmp) / "clean")
        for i, case in enumerate(suite.CASES):
            work = Path(tmp) / f"case{i}"
            work.mkdir()
            args = [*case.build(clean, work), "-o", str(work / "out"), *suite.FAST, *case.extra]
            err, out = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                code = diffseg_main(["predict", *args])
            lines = [line for line in (err.getvalue() + out.getvalue()).splitlines() if line.strip()]
            first = next(
                (line for line in lines if "error" in line.lower() or "FAILED" in line), lines[-1] if lines else ""
            )
            first = first.replace(tmp, "…")
            rows.append({"case": case.name, "exit_code": code, "expected": case.exit_code, "message": first})
            print(f"{code} {case.name}: {first[:160]}", flush=True)
    table = "\n".join(f"| {r['case']} | {r['exit_code']} | {r['message'].replace('|', '/')} |" for r in rows)
    md = "# Hostile inputs against `diffseg predict`\n\n| case | exit | first line of the message |\n|---|---|---|\n"
    write_results("hostile_inputs", {"cases": rows}, md + table, RESULTS)
    return 0 if all(r["exit_code"] == r["expected"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
