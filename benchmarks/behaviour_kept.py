"""Behaviour kept across a change: ``diffseg predict`` outputs of one checkout against another's.

``record`` runs the installed ``diffseg predict`` (the CLI: the interface both checkouts share) on test phantoms
with each backend and keeps every output; ``compare`` checks a second recording against the first: masks identical,
probability, uncertainty and entropy maps within ``--map-tol`` (1e-6), lesion tables equal (floats to 1e-6
relative), the same counts of windows, skipped windows, retired tasks, engine calls and patch-forwards.

    git worktree add /tmp/before OLD_COMMIT && pip install /tmp/before   # the old code, installed
    python benchmarks/behaviour_kept.py record -o /tmp/kept/before
    pip install .                                                      # the new code
    python benchmarks/behaviour_kept.py record -o /tmp/kept/after
    python benchmarks/behaviour_kept.py compare /tmp/kept/before /tmp/kept/after
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _common import machine_header, write_results

BACKENDS = ("openvino:bf16", "onnxruntime:fp32")
MAPS = ("probability", "uncertainty", "entropy")
COUNTS = ("windows", "windows_skipped", "retired", "engine_calls", "patch_forwards")


def record(out: Path, seeds: list[int], backends: list[str]) -> None:
    cases = out / "cases"
    for seed in seeds:
        if not (cases / f"case_{seed}" / "ct.nii.gz").is_file():
            subprocess.run(["diffseg", "phantom", "--seed", str(seed), "-o", str(cases / f"case_{seed}")], check=True)
    for spec in backends:
        backend, precision = spec.split(":")
        for seed in seeds:
            case = cases / f"case_{seed}"
            target = out / spec.replace(":", "-") / f"case_{seed}"
            command = ["diffseg", "predict", "--ct", str(case / "ct.nii.gz"), "--pet", str(case / "pet.nii.gz")]
            command += ["-o", str(target), "--backend", backend, "--precision", precision, "--no-progress"]
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True)


def _read(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _lesions_equal(a: Any, b: Any, rel: float = 1e-6) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_lesions_equal(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_lesions_equal(x, y, rel) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=1e-9)
    return a == b


def compare_case(before: Path, after: Path, map_tol: float) -> dict[str, Any]:
    mask_a, mask_b = _read(before / "mask.nii.gz"), _read(after / "mask.nii.gz")
    row: dict[str, Any] = {
        "mask_identical": bool(mask_a.shape == mask_b.shape and np.array_equal(mask_a, mask_b)),
        "mask_voxels_differing": int(np.count_nonzero(mask_a != mask_b)) if mask_a.shape == mask_b.shape else None,
    }
    for name in MAPS:
        a, b = _read(before / f"{name}.nii.gz"), _read(after / f"{name}.nii.gz")
        row[f"{name}_max_abs_diff"] = float(np.abs(a.astype(np.float64) - b).max())
    lesions_a = json.loads((before / "lesions.json").read_text())
    lesions_b = json.loads((after / "lesions.json").read_text())
    row["lesions"] = len(lesions_b)
    row["lesions_equal"] = _lesions_equal(lesions_a, lesions_b)
    report_a = json.loads((before / "report.json").read_text())
    report_b = json.loads((after / "report.json").read_text())
    row["counts_before"] = {k: report_a[k] for k in COUNTS}
    row["counts_after"] = {k: report_b[k] for k in COUNTS}
    row["kept"] = (
        row["mask_identical"]
        and row["lesions_equal"]
        and all(row[f"{name}_max_abs_diff"] <= map_tol for name in MAPS)
        and row["counts_before"] == row["counts_after"]
    )
    return row


def compare(before: Path, after: Path, map_tol: float, name: str) -> int:
    rows = []
    for spec_dir in sorted(p for p in after.iterdir() if p.is_dir() and p.name != "cases"):
        for case in sorted(p for p in spec_dir.iterdir() if p.is_dir()):
            figures = compare_case(before / spec_dir.name / case.name, case, map_tol)
            rows.append({"backend": spec_dir.name, "case": case.name, **figures})
    lines = [
        "| backend | case | mask identical | max abs Δ probability | uncertainty | entropy | lesions equal | counts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['case']} | {r['mask_identical']} | {r['probability_max_abs_diff']:.2e} | "
            f"{r['uncertainty_max_abs_diff']:.2e} | {r['entropy_max_abs_diff']:.2e} | {r['lesions_equal']} "
            f"({r['lesions']}) | {r['counts_before'] == r['counts_after']} |"
        )
    kept = all(r["kept"] for r in rows) and bool(rows)
    from diffseg.runtime.bench.machine import machine_info

    machine = machine_info()
    lines.insert(0, f"Machine: {machine_header(machine)}. Recordings: before `{before}`, after `{after}`.\n")
    lines.append("")
    lines.append(f"Behaviour kept (masks identical, maps within {map_tol:g}, lesions and counts equal): **{kept}**")
    doc = {
        "machine": machine,
        "before": str(before),
        "after": str(after),
        "map_tol": map_tol,
        "rows": rows,
        "kept": kept,
    }
    write_results(name, doc, "\n".join(lines))
    print("\n".join(lines))
    return 0 if kept else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run diffseg predict on the phantoms and keep the outputs")
    rec.add_argument("-o", "--output", type=Path, required=True)
    rec.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    rec.add_argument("--backends", nargs="+", default=list(BACKENDS), help="BACKEND:PRECISION pairs")
    cmp_ = sub.add_parser("compare", help="compare two recordings")
    cmp_.add_argument("before", type=Path)
    cmp_.add_argument("after", type=Path)
    cmp_.add_argument("--map-tol", type=float, default=1e-6)
    cmp_.add_argument("--name", default="behaviour_kept")
    args = parser.parse_args()
    if args.command == "record":
        record(args.output, args.seeds, args.backends)
        return 0
    return compare(args.before, args.after, args.map_tol, args.name)


if __name__ == "__main__":
    sys.exit(main())
