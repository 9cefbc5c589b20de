"""CI's 30-second smoke of each fuzz target (``benchmarks/fuzz.py``): it runs, executes inputs, and finds no crash.

The four targets run two at a time (libFuzzer uses one core each). The long runs
(``python benchmarks/fuzz.py --minutes 10``) are a benchmark, not a test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parents[2]
SECONDS = 30
TARGETS = ("image", "dicom", "manifest", "csv")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("fuzz")
    command = [sys.executable, str(ROOT / "benchmarks" / "fuzz.py"), "--seconds", str(SECONDS), "--parallel", "2"]
    proc = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=4 * SECONDS + 900)
    return out, proc


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_finds_no_crash(target: str, smoke) -> None:
    out, proc = smoke
    log_file = out / f"{target}.log"
    log = log_file.read_text() if log_file.is_file() else proc.stdout + proc.stderr
    crashes = sorted((out / "crashes" / target).glob("*"))
    assert not crashes, f"{proc.stdout}\n{log[-6000:]}"
    runs = [int(line.split(":")[-1]) for line in log.splitlines() if "number_of_executed_units" in line]
    assert runs and runs[-1] > 10, f"the target executed too few inputs: {runs}\n{log[-3000:]}"
