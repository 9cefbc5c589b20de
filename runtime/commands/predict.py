"""``diffseg predict``: one case (--ct/--pet) or a cohort (-i FOLDER_OR_CSV), resumable and splittable."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

DESCRIPTION = """Segment tumours in PET/CT.

One case:   diffseg predict --ct CT --pet PET -o OUT     (image files, or two DICOM series folders)
A cohort:   diffseg predict -i FOLDER_OR_CSV -o OUT      (case folders with ct.*/pet.* or DICOM; or CSV case_id,ct,pet)

Per case: mask.nii.gz, probability.nii.gz, uncertainty.nii.gz (std over samples), entropy.nii.gz, lesions.json,
lesions.csv, preview.png, report.json (settings, backend, timings); for DICOM input also seg.dcm (DICOM SEG) and
lesions_dicom.json. Cohorts: finished cases (with report.json) are skipped, a failing case is reported in
OUT/failures.json and the rest go on; --num-parts/--part-id split a cohort across processes or machines."""

logger = logging.getLogger("diffseg")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by predict, demo and bench: model, backend and sampling overrides."""
    parser.add_argument("-m", "--model", default="default", help="model package (folder, .zip) or shipped name")
    parser.add_argument(
        "--backend",
        default="auto",
        help="auto, onnxruntime, openvino, torch, onnxruntime-cuda, "
        "onnxruntime-tensorrt, tensorrt (default: auto = fastest available)",
    )
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="engine precision (default: backend's)")
    parser.add_argument("--steps", type=int, help="reverse diffusion steps (default: the model's)")
    parser.add_argument("--samples", type=int, help="ensemble samples (default: the model's)")
    parser.add_argument("--eta", type=float, help="DDIM eta: 0 deterministic, > 0 adds noise (default: the model's)")
    parser.add_argument("--seed", type=int, help="noise seed (default: the model's)")
    parser.add_argument("--overlap", type=float, help="sliding-window overlap (default: the model's)")
    parser.add_argument("--threshold", type=float, help="probability threshold (default: the model's)")
    parser.add_argument("--min-lesion-ml", type=float, help="drop lesions smaller than this (ml)")
    parser.add_argument("--loop-order", choices=["step-major", "window-major"], default="step-major")
    parser.add_argument("--batch-size", type=int, help="windows x samples per engine call, >= 1 (default 2 x samples)")
    parser.add_argument("--no-skip", action="store_true", help="run every window, even without candidate tissue")
    parser.add_argument(
        "--retire-after",
        type=int,
        help="stop running a window's sample once its mask has been empty for N steps; 0 = off, the exact loop "
        "(default: the model's)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads for the engine (default: all cores)")
    parser.add_argument(
        "--device-loop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep x_t on the engine's device across steps (onnxruntime and torch backends; default: on where the "
        "engine runs on a GPU)",
    )


def make_segmenter(args: argparse.Namespace):
    from diffseg.runtime.segmenter import Segmenter

    return Segmenter(
        args.model,
        backend=args.backend,
        precision=args.precision,
        steps=args.steps,
        samples=args.samples,
        eta=args.eta,
        seed=args.seed,
        overlap=args.overlap,
        threshold=args.threshold,
        min_lesion_ml=args.min_lesion_ml,
        loop_order=args.loop_order,
        batch_size=args.batch_size,
        skip_empty_windows=not args.no_skip,
        retire_after=args.retire_after,
        threads=args.threads,
        device_loop=args.device_loop,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("input (one of)")
    src.add_argument("--ct", type=Path, help="CT image file or DICOM series folder")
    src.add_argument("--pet", type=Path, help="PET image file (SUV) or DICOM series folder")
    src.add_argument("-i", "--input", type=Path, help="cohort: folder of cases, a study folder, or a CSV")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    parser.add_argument("--num-parts", type=int, default=1, help="split the cohort into this many parts")
    parser.add_argument("--part-id", type=int, default=0, help="which part this process runs (0-based)")
    parser.add_argument("--overwrite", action="store_true", help="redo cases that already have a report.json")
    parser.add_argument(
        "--force-units",
        action="store_true",
        help="DICOM: use implausible SUV attributes (dose, weight, half-life, times) as written instead of refusing "
        "the case; each override is recorded in report.json",
    )
    parser.add_argument(
        "--nan-as",
        type=float,
        metavar="VALUE",
        help="set NaN and infinite voxels of an input image to VALUE instead of refusing the case (recorded in "
        "report.json)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_arguments(parser)


def input_checks(args: argparse.Namespace):
    """The overrides of the input checks that the command line gives."""
    from diffseg.runtime.input_checks import InputChecks

    return InputChecks(force_units=args.force_units, nan_as=args.nan_as)


def segment_case(segmenter, case, out_dir: Path, progress: bool, label: str, checks=None) -> dict:
    """One case through the pipeline with a progress bar of engine calls; returns the report."""
    from tqdm import tqdm

    from diffseg.runtime.pipeline import segment_files

    bar = tqdm(desc=f"{label} engine calls", unit="call", leave=False, disable=not progress)
    last = 0

    def tick(n: int) -> None:
        nonlocal last
        bar.update(n - last)
        last = n

    try:
        output = segment_files(
            segmenter, case.ct, case.pet, out_dir, case_id=case.case_id, progress=tick, checks=checks
        )
        return output.report
    finally:
        bar.close()


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from diffseg.runtime.atomic import write_json_atomic
    from diffseg.runtime.cases import Case, discover_cases, select_part
    from diffseg.runtime.outputs import REPORT_NAME

    if args.input is not None and (args.ct or args.pet):
        raise ValueError("give either -i/--input or --ct and --pet, not both")
    if args.input is None and not (args.ct and args.pet):
        raise ValueError("give --ct and --pet (one case) or -i FOLDER_OR_CSV (a cohort)")
    for name in ("ct", "pet"):
        path = getattr(args, name)
        if path is not None and not path.exists():
            raise FileNotFoundError(f"--{name} {path}: no such file or folder")

    if args.input is None:
        segmenter = make_segmenter(args)
        case = Case("case", args.ct, args.pet)
        report = segment_case(segmenter, case, args.output, not args.no_progress, "case", input_checks(args))
        print(
            f"{args.output}: {report['lesion_count']} lesion(s), {report['total_volume_ml']:.2f} ml; "
            f"backend {report['settings']['backend']} {report['settings']['precision']}; "
            f"{sum(report['timings_s'].values()):.1f} s"
        )
        return 0

    cases = select_part(discover_cases(args.input), args.num_parts, args.part_id)
    todo = [c for c in cases if args.overwrite or not (args.output / c.case_id / REPORT_NAME).is_file()]
    print(f"{len(cases)} case(s) in this part, {len(cases) - len(todo)} already done, {len(todo)} to run")
    if not todo:
        return 0
    segmenter = make_segmenter(args)
    checks = input_checks(args)
    failures = {}
    for case in tqdm(todo, desc="cases", unit="case", disable=args.no_progress):
        try:
            segment_case(segmenter, case, args.output / case.case_id, not args.no_progress, case.case_id, checks)
        except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
            logger.error("case %s failed: %s", case.case_id, exc)
            print(f"case {case.case_id} FAILED: {exc}")
            failures[case.case_id] = str(exc)
    if failures:
        name = "failures.json" if args.num_parts == 1 else f"failures.part{args.part_id}.json"
        write_json_atomic(args.output / name, failures)
    print(f"done: {len(todo) - len(failures)} ok, {len(failures)} failed")
    return 1 if failures else 0
