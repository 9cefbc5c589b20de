"""CI's 30-second smoke of each fuzz target (``benchmarks/fuzz.py``): it runs, executes inputs, and finds no crash.

The long runs (``python benchmarks/fuzz.py --minutes 10``) are a benchmark, not a test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parents[2]
SECONDS = 30


@pytest.mark.slow
@pytest.mark.parametrize("target", ["image", "dicom", "manifest", "csv"])
def test_fuzz_target_finds_no_crash(target: str, tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "fuzz.py"), "--seconds", str(SECONDS), "--target", target]
    proc = subprocess.run([*command, "--out", str(tmp_path)], capture_output=True, text=True, timeout=SECONDS + 600)
    log = (tmp_path / f"{target}.log").read_text() if (tmp_path / f"{target}.log").is_file() else proc.stderr
    crashes = sorted((tmp_path / "crashes" / target).glob("*"))
    assert proc.returncode == 0 and not crashes, f"{proc.stdout}\n{log[-6000:]}"
    runs = [int(line.split(":")[-1]) for line in log.splitlines() if "number_of_executed_units" in line]
    assert runs and runs[-1] > 10, f"the target executed too few inputs: {runs}\n{log[-3000:]}"
