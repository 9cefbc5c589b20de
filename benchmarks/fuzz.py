"""Fuzz each input path of diffseg with atheris for a given time; report executions, coverage and crashes.

    python benchmarks/fuzz.py --minutes 10                 # every target, 10 minutes each (the issue's figure)
    python benchmarks/fuzz.py --seconds 30 --out /tmp/fz   # the CI smoke (tests/fuzz/test_fuzz_smoke.py)

The targets are in ``tests/fuzz/targets.py`` (image readers, the DICOM series path, the manifest parser, the cohort
CSV). A crash is anything but diffseg's named errors; libFuzzer writes the input that caused it under the run's
``crashes/`` folder, where it becomes a regression input. Results go to ``benchmarks/results/fuzz.{json,md}``
unless ``--out`` is given. ``--parallel N`` runs N targets at once (libFuzzer uses one core each).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_header, write_results

TARGETS_FILE = Path(__file__).resolve().parent.parent / "tests" / "fuzz" / "targets.py"
TARGETS = ("image", "dicom", "manifest", "csv")


def run_target(name: str, seconds: int, folder: Path) -> dict:
    """One target for ``seconds`` in its own process; its figures from libFuzzer's output."""
    corpus, crashes = folder / "corpus" / name, folder / "crashes" / name
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    earlier = set(crashes.iterdir())  # crashes of an earlier run in this folder are not this run's
    command = [
        sys.executable,
        str(TARGETS_FILE),
        name,
        str(corpus),
        f"-max_total_time={seconds}",
        "-timeout=60",
        "-rss_limit_mb=4096",
        f"-artifact_prefix={crashes}/",
        "-print_final_stats=1",
    ]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 300)
    wall = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    (folder / f"{name}.log").write_text(log)
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log) or re.findall(r"Done (\d+) runs", log)
    cov = re.findall(r"\bcov: (\d+)", log)
    found = sorted(p.name for p in set(crashes.iterdir()) - earlier)
    crashed = proc.returncode != 0 or bool(found)
    first = next((line for line in log.splitlines() if "Uncaught Python exception" in line or "ERROR:" in line), "")
    return {
        "target": name,
        "seconds": round(wall, 1),
        "executions": int(runs[-1]) if runs else 0,
        "coverage_edges": int(cov[-1]) if cov else None,
        "corpus_inputs": sum(1 for _ in corpus.iterdir()),
        "crashes": len(found) if found else int(crashed),
        "crash_files": [str(crashes / f) for f in found],
        "returncode": proc.returncode,
        "first_error": first,
        "log": str(folder / f"{name}.log"),
    }


def _merged(rows: list[dict]) -> list[dict]:
    """These targets' rows in place of theirs in the recorded results (a rerun of some targets keeps the others)."""
    import json

    path = RESULTS / "fuzz.json"
    old = json.loads(path.read_text())["targets"] if path.is_file() else []
    new = {r["target"]: r for r in rows}
    kept = [new.pop(r["target"], r) for r in old]
    return kept + list(new.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    span = parser.add_mutually_exclusive_group()
    span.add_argument("--minutes", type=float, help="time per target (default 1 minute)")
    span.add_argument("--seconds", type=int, help="time per target in seconds")
    parser.add_argument("--target", action="append", choices=TARGETS, help="run only these (repeatable)")
    parser.add_argument("--parallel", type=int, default=1, help="targets run at once (each uses one core)")
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for corpus, crashes and logs; results not written to benchmarks/results when given",
    )
    args = parser.parse_args()
    seconds = args.seconds or int(60 * (args.minutes or 1))
    folder = args.out or Path("/tmp/diffseg-fuzz")
    folder.mkdir(parents=True, exist_ok=True)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        rows = list(pool.map(lambda name: run_target(name, seconds, folder), args.target or TARGETS))
    for row in rows:
        name = row["target"]
        print(
            f"{name}: {row['executions']} executions in {row['seconds']} s, {row['crashes']} crash(es) "
            f"{row['first_error']}",
            flush=True,
        )
    if args.out is None:
        from diffseg.runtime.bench.machine import machine_info

        machine = machine_info()
        rows = _merged(rows) if args.target else rows
        table = "\n".join(
            f"| {r['target']} | {r['seconds']:.0f} | {r['executions']} | {r['coverage_edges']} | {r['crashes']} |"
            for r in rows
        )
        md = (
            f"# Fuzzing (atheris)\n\nMachine: {machine_header(machine)}\n\n"
            "| target | seconds | executions | coverage edges | crashes |\n|---|---|---|---|---|\n" + table
        )
        write_results("fuzz", {"machine": machine, "seconds_per_target": seconds, "targets": rows}, md, RESULTS)
    return 1 if any(r["crashes"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
