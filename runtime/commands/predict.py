"""``diffseg predict``: one case (--ct/--pet) or a cohort (-i FOLDER_OR_CSV), resumable and splittable."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

DESCRIPTION = """Segment tumours in PET/CT.

One case:   diffseg predict --ct CT --pet PET -o OUT     (image files, or two DICOM series folders)
            diffseg predict --image MR=t1.nii.gz -o OUT  (a model with other inputs: one --image CODE=PATH each;
                                                          a CT-only model takes --ct alone)
A cohort:   diffseg predict -i FOLDER_OR_CSV -o OUT      (case folders with ct.*/pet.* or DICOM; or CSV case_id,ct,pet)

Per case: mask.nii.gz, probability.nii.gz, uncertainty.nii.gz (std over samples), entropy.nii.gz, lesions.json,
lesions.csv, preview.png, report.json (settings, backend, timings); for DICOM input also lesions_dicom.json and the
DICOM outputs of --dicom-outputs: seg.dcm (DICOM SEG) and rtstruct.dcm (RTSTRUCT, one ROI per lesion and one for
the tumour) by default, seg_labelmap.dcm (LABELMAP SEG, one segment per lesion) and seg_fractional.dcm
(probability SEG) on request. Cohorts: finished cases (with report.json) are skipped, a failing case is reported in
OUT/failures.json and the rest go on; --num-parts/--part-id split a cohort across processes or machines.
Beyond one machine: --ray [ADDRESS] runs the cohort on a Ray cluster (pip install "diffseg[ray]"), same outputs."""

logger = logging.getLogger("diffseg")

# The names of diffseg.runtime.outputs.DICOM_OUTPUTS, spelled here so that building the parser imports nothing
# heavy (tests/runtime/dicom/test_dicom_rtstruct.py checks that the two agree).
DICOM_OUTPUT_NAMES = ("seg", "rtstruct", "labelmap", "fractional")
DEFAULT_DICOM_OUTPUTS = ("seg", "rtstruct")


def image_arg(text: str) -> tuple[str, Path]:
    """``--image CODE=PATH`` → (code, path); the code as DICOM writes a modality (CT, PT, MR, ...)."""
    import re

    code, sep, path = text.partition("=")
    if not sep or not path or not re.fullmatch(r"[A-Z0-9_]{1,16}", code):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give CODE=PATH with the modality code in capitals as the model's manifest names it "
            "(e.g. MR=t1.nii.gz)"
        )
    return code, Path(path)


def dicom_outputs_arg(text: str) -> tuple[str, ...]:
    """``--dicom-outputs``: a comma list of DICOM output names; ``none`` (or nothing) for no DICOM output."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if names == ["none"]:
        return ()
    bad = [name for name in names if name not in DICOM_OUTPUT_NAMES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown DICOM output {', '.join(map(repr, bad))}; allowed: {', '.join(DICOM_OUTPUT_NAMES)} "
            "(a comma list), or none"
        )
    return tuple(dict.fromkeys(names))  # in the order given, each once


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
        "--no-condition-cache",
        dest="cache_conditioning",
        action="store_false",
        help="a model with a condition graph: compute its features again at every step and for every sample, as "
        "a paper's loop does (for measuring; the cache computes them once per window)",
    )
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


def segmenter_kwargs(args: argparse.Namespace) -> dict:
    """The :class:`~diffseg.runtime.segmenter.Segmenter` arguments the command line gives (also sent to Ray actors)."""
    return dict(
        model=args.model,
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
        cache_conditioning=args.cache_conditioning,
    )


def make_segmenter(args: argparse.Namespace):
    from diffseg.runtime.segmenter import Segmenter

    return Segmenter(**segmenter_kwargs(args))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("input (one of)")
    src.add_argument("--ct", type=Path, help="CT image file or DICOM series folder")
    src.add_argument("--pet", type=Path, help="PET image file (SUV) or DICOM series folder")
    src.add_argument(
        "--image",
        type=image_arg,
        action="append",
        default=[],
        metavar="CODE=PATH",
        help="an input of the model by its modality code (MR=t1.nii.gz), an image file or a DICOM folder holding one "
        "series of that modality; repeat for each input (CT=... and PT=... are --ct and --pet)",
    )
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
    parser.add_argument(
        "--dicom-outputs",
        type=dicom_outputs_arg,
        default=DEFAULT_DICOM_OUTPUTS,
        metavar="LIST",
        help="DICOM input: the DICOM outputs to write, a comma list of seg (seg.dcm, BINARY SEG), rtstruct "
        "(rtstruct.dcm, RT Structure Set), labelmap (seg_labelmap.dcm, LABELMAP SEG of the lesions), fractional "
        "(seg_fractional.dcm, probability SEG); 'none' writes none (default: seg,rtstruct)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_ray_arguments(parser)
    add_model_arguments(parser)


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ray [ADDRESS]`` and the resources of each sampling actor (Ray's names: num_gpus, num_cpus)."""
    ray = parser.add_argument_group('Ray cluster, for a cohort (-i) beyond one machine; pip install "diffseg[ray]"')
    ray.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the cohort on Ray Data: without ADDRESS start a Ray cluster on this machine for the run (and "
        "stop it); 'auto' or host:port joins a running cluster (every node needs diffseg, the model, the inputs "
        "and -o at the same paths). Same outputs and resume rule as a local run",
    )
    ray.add_argument(
        "--ray-actors",
        type=int,
        metavar="N",
        help="sampling actors, one model each (default: one per GPU of the cluster, or its CPUs less one divided "
        "by --ray-cpus-per-actor)",
    )
    ray.add_argument(
        "--ray-gpus-per-actor",
        type=float,
        metavar="G",
        help="GPUs per actor (num_gpus; default: 1 where the cluster has GPUs and the backend is not a CPU one)",
    )
    ray.add_argument(
        "--ray-cpus-per-actor",
        type=float,
        default=1.0,
        metavar="C",
        help="CPUs per actor (num_cpus; on CPU actors also the engine's threads unless --threads; default 1)",
    )


def input_checks(args: argparse.Namespace):
    """The overrides of the input checks that the command line gives."""
    from diffseg.runtime.input_checks import InputChecks

    return InputChecks(force_units=args.force_units, nan_as=args.nan_as)


def write_options(args: argparse.Namespace):
    """The :class:`~diffseg.runtime.outputs.WriteOptions` the command line gives (all outputs, and the DICOM
    outputs of ``--dicom-outputs``)."""
    from diffseg.runtime.outputs import WriteOptions

    return WriteOptions(dicom_outputs=tuple(args.dicom_outputs))


def segment_case(segmenter, case, out_dir: Path, progress: bool, label: str, checks=None, write=None) -> dict:
    """One case through the pipeline with a progress bar of engine calls; returns the report (``write``: the
    outputs, None: all with the default DICOM outputs)."""
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
            segmenter,
            case.ct,
            case.pet,
            out_dir,
            images=case.images,
            case_id=case.case_id,
            write=write,
            progress=tick,
            checks=checks,
        )
        return output.report
    finally:
        bar.close()


def single_case_images(args: argparse.Namespace) -> dict[str, Path]:
    """The ``--image`` inputs by code (CT and PT folded into ``args.ct``/``args.pet``), each checked to exist.

    Raises:
        ValueError: a code given twice (or as --ct/--pet and --image too).
        FileNotFoundError: a path that does not exist.
    """
    from diffseg.runtime.cases import INPUT_ARGUMENTS

    images: dict[str, Path] = {}
    for code, path in args.image:
        flag = INPUT_ARGUMENTS.get(code)
        if code in images or (flag and getattr(args, flag) is not None):
            raise ValueError(f"--image {code}=...: the {code} input is given twice")
        if not path.exists():
            raise FileNotFoundError(f"--image {code}={path}: no such file or folder")
        if flag:
            setattr(args, flag, path)
        else:
            images[code] = path
    return images


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from diffseg.runtime.cases import Case, discover_cases, select_part
    from diffseg.runtime.output_paths import case_is_done, case_output_dir
    from diffseg.runtime.outputs import REPORT_NAME

    images = single_case_images(args)
    if args.input is not None and (args.ct or args.pet or images):
        raise ValueError("give either -i/--input or the inputs of one case (--ct, --pet, --image), not both")
    if args.input is None and not (args.ct or args.pet or images):
        raise ValueError("give the inputs of one case (--ct and --pet, or --image CODE=PATH) or -i FOLDER_OR_CSV")
    for name in ("ct", "pet"):
        path = getattr(args, name)
        if path is not None and not path.exists():
            raise FileNotFoundError(f"--{name} {path}: no such file or folder")
    if args.output.exists() and not args.output.is_dir():
        raise ValueError(f"-o {args.output}: exists and is not a folder; give a folder for the outputs")
    ray_options = ray_options_of(args)  # before anything runs: a bad option, or Ray missing, is said at once

    if args.input is None:
        segmenter = make_segmenter(args)
        case = Case("case", args.ct, args.pet, images)
        report = segment_case(
            segmenter, case, args.output, not args.no_progress, "case", input_checks(args), write_options(args)
        )
        print(
            f"{args.output}: {report['lesion_count']} lesion(s), {report['total_volume_ml']:.2f} ml; "
            f"backend {report['settings']['backend']} {report['settings']['precision']}; "
            f"{sum(report['timings_s'].values()):.1f} s"
        )
        return 0

    cases = select_part(discover_cases(args.input), args.num_parts, args.part_id)
    todo = [c for c in cases if args.overwrite or not case_is_done(args.output, c.case_id, REPORT_NAME)]
    print(f"{len(cases)} case(s) in this part, {len(cases) - len(todo)} already done, {len(todo)} to run")
    if not todo:
        return 0
    if ray_options is not None:
        return finish_cohort(args, todo, run_on_ray(args, todo, ray_options))
    segmenter = make_segmenter(args)
    checks = input_checks(args)
    write = write_options(args)
    failures = {}
    for case in tqdm(todo, desc="cases", unit="case", disable=args.no_progress):
        try:
            out_dir = case_output_dir(args.output, case.case_id)  # under -o, or refused
            segment_case(segmenter, case, out_dir, not args.no_progress, case.case_id, checks, write)
        except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
            logger.error("case %s failed: %s", case.case_id, exc)
            print(f"case {case.case_id} FAILED: {exc}")
            failures[case.case_id] = str(exc)
    return finish_cohort(args, todo, failures)


def _part_name(args: argparse.Namespace, stem: str) -> str:
    return f"{stem}.json" if args.num_parts == 1 else f"{stem}.part{args.part_id}.json"


def finish_cohort(args: argparse.Namespace, todo: list, failures: dict[str, str]) -> int:
    """``failures.json`` (``failures.partK.json`` with --num-parts) if a case failed; the last line; the exit code."""
    from diffseg.runtime.atomic import write_json_atomic

    if failures:
        write_json_atomic(args.output / _part_name(args, "failures"), failures)
    print(f"done: {len(todo) - len(failures)} ok, {len(failures)} failed")
    return 1 if failures else 0


def ray_options_of(args: argparse.Namespace):
    """The Ray options of the command line (None without --ray); Ray must import when --ray is given."""
    flags = {
        "--ray-actors": args.ray_actors,
        "--ray-gpus-per-actor": args.ray_gpus_per_actor,
        "--ray-cpus-per-actor": None if args.ray_cpus_per_actor == 1.0 else args.ray_cpus_per_actor,
    }
    given = [flag for flag, value in flags.items() if value is not None]
    if args.ray is None:
        if given:
            raise ValueError(f"{', '.join(given)}: only with --ray [ADDRESS] (they size the Ray actors)")
        return None
    if args.input is None:
        raise ValueError("--ray runs a cohort: give -i FOLDER_OR_CSV (one case runs here, without --ray)")
    from diffseg.runtime.distributed import RayOptions, require_ray

    require_ray()
    return RayOptions(
        address=args.ray,
        actors=args.ray_actors,
        num_gpus_per_actor=args.ray_gpus_per_actor,
        num_cpus_per_actor=args.ray_cpus_per_actor,
    )


def run_on_ray(args: argparse.Namespace, todo: list, options) -> dict[str, str]:
    """The cases to run on Ray (:func:`diffseg.runtime.distributed.run_cohort_on_ray`); returns the failures.

    Each failing case is said as the local loop says it; the run's figures go to ``ray_run.json`` under -o.
    """
    from diffseg.runtime.atomic import write_json_atomic
    from diffseg.runtime.distributed import run_cohort_on_ray

    def said(record: dict) -> None:
        if record["error"]:
            logger.error("case %s failed: %s", record["case_id"], record["error"])
            print(f"case {record['case_id']} FAILED: {record['error']}")

    run = run_cohort_on_ray(
        todo,
        args.output,
        segmenter_kwargs(args),
        options=options,
        checks=input_checks(args),
        write=write_options(args),
        progress=not args.no_progress,
        on_case=said,
    )
    if run.figures:
        path = write_json_atomic(args.output / _part_name(args, "ray_run"), run.as_dict())
        print(ray_summary(run, path))
    return run.failures


def ray_summary(run, path: Path) -> str:
    """One line: actors and nodes, throughput, Ray's overhead per case, peak RSS by role, where the figures are."""
    f, r = run.figures, run.ray
    overhead = f["ray_overhead_s"] or {"mean": float("nan"), "p95": float("nan")}
    rss = ", ".join(f"{role} {mb:.0f} MB" for role, mb in f["peak_rss_mb"].items() if mb is not None)
    return (
        f"ray {r['address']}: {r['actors']} actor(s) on {f['nodes']} node(s); {f['ok']} case(s) in {f['wall_s']:.1f} s "
        f"({f['cases_per_minute'] or 0:.1f}/min); Ray's overhead per case {overhead['mean']:.3f} s (p95 "
        f"{overhead['p95']:.3f} s); peak RSS per worker: {rss}; figures in {path}"
    )
