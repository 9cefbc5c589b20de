"""``diffseg demo``: the shipped default model on the shipped sample phantom, with its Dice against the truth."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DESCRIPTION = """Run the shipped default model on the shipped sample case (synthetic head-and-neck PET/CT phantom,
seed 1 of the held-out test split) with the model's default settings, write every output, and print where they are
and the Dice against the phantom's ground truth. Synthetic data and a synthetic-data model: not for clinical use."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .predict import add_model_arguments

    parser.add_argument(
        "-o", "--output", type=Path, default=Path("diffseg_demo"), help="output folder (default: ./diffseg_demo)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser)


def sample_case_dir() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "models" / "sample_case"


def run(args: argparse.Namespace) -> int:
    from diffseg.runtime.cases import Case
    from diffseg.runtime.postprocess import dice
    from diffseg.runtime.volume import read_volume

    from .predict import make_segmenter, segment_case

    case_dir = sample_case_dir()
    if not (case_dir / "ct.nii.gz").is_file():
        raise FileNotFoundError(f"{case_dir}: the sample case is missing from this installation")
    start = time.perf_counter()
    segmenter = make_segmenter(args)
    report = segment_case(
        segmenter,
        Case("sample", case_dir / "ct.nii.gz", case_dir / "pet.nii.gz"),
        args.output,
        not args.no_progress,
        "demo",
    )
    elapsed = time.perf_counter() - start
    mask = read_volume(args.output / "mask.nii.gz").array
    truth = read_volume(case_dir / "mask.nii.gz").array
    s = report["settings"]
    print(
        f"model {s['model']['name']} on {s['backend']} ({s['precision']}, {s['device']}); "
        f"{s['sampler']['sampler']} {s['sampler']['steps']} steps x {s['sampler']['num_samples']} samples"
    )
    print(
        f"lesions found: {report['lesion_count']} ({report['total_volume_ml']:.2f} ml); "
        f"Dice vs ground truth: {dice(mask, truth):.3f}"
    )
    print(f"time: {elapsed:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in report["timings_s"].items()) + ")")
    print(f"outputs in {args.output.resolve()}:")
    for name in sorted(p.name for p in args.output.iterdir()):
        print(f"  {name}")
    return 0
