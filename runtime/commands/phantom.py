"""``diffseg phantom``: synthetic head-and-neck PET/CT cases with ground truth."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DESCRIPTION = """Write synthetic head-and-neck FDG PET/CT phantoms: ct.nii.gz (HU), pet.nii.gz (SUVbw, own
grid), mask.nii.gz (ground truth on the CT grid) and case.json (lesions with volume in ml and SUVmax).

Seed split: test 1-20, validation 101-120, training >= 1000 (diffseg.runtime.phantom.SPLITS).
With several seeds, each case goes to OUT/case_<seed>.

--dicom also writes the CT and the PET as DICOM series (one file per slice) in ct/ and pet/ beside the NIfTI
files, which are still written (the ground-truth mask exists only as mask.nii.gz). Both series share one study
and frame of reference; PET is stored in Bq/ml (Units BQML, DecayCorrection START) with weight 75 kg, 370 MBq
FDG injected 60 min before the scan, so that reading it gives back the phantom SUVbw. UIDs are deterministic
per seed (diffseg.runtime.dicom.synthetic)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, nargs="+", default=[1], help="case seed(s) (default: 1)")
    parser.add_argument("--split", choices=["test", "validation"], help="write every case of a split instead")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    parser.add_argument("--ct-size", type=int, default=256, help="CT matrix in plane (default 256; scanners: 512)")
    parser.add_argument("--ct-slices", type=int, default=None, help="CT slices (default: random 56-72)")
    parser.add_argument(
        "--dicom",
        action="store_true",
        help="also write ct/ and pet/ DICOM series beside the NIfTI files",
    )


def run(args: argparse.Namespace) -> int:
    from diffseg.runtime.phantom import PhantomOptions, make_phantom, split_seeds, write_phantom

    seeds = split_seeds(args.split) if args.split else args.seed
    options = PhantomOptions(ct_size_xy=args.ct_size, ct_slices=args.ct_slices)
    for seed in seeds:
        start = time.perf_counter()
        phantom = make_phantom(seed, options)
        out = args.output if len(seeds) == 1 else args.output / f"case_{seed:05d}"
        write_phantom(phantom, out)
        if args.dicom:
            from diffseg.runtime.dicom.synthetic import write_phantom_dicom

            write_phantom_dicom(phantom, out)
        lesions = ", ".join(
            f"{les.kind} {les.volume_ml:.1f} ml SUVmax {les.suv_max_pet:.1f}" for les in phantom.lesions
        )
        print(f"seed {seed}: {out}  ({time.perf_counter() - start:.1f} s)  lesions: {lesions or 'none'}")
    return 0
