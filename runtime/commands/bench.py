"""``diffseg bench``: latency, throughput, memory and achieved GFLOP/s of a model package on a backend."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .predict import add_model_arguments, make_segmenter

DESCRIPTION = """Measure a model package on a backend and precision.

  engine load time; one denoiser call at each --batch-sizes (p50/p95/min/max over --repeats after --warmup);
  one sampler step; end to end per case split by stage (read, resample, normalise, sample, postprocess, write);
  throughput (CT voxels/s, patch-forwards/s); peak host memory (and CUDA memory with the torch backend);
  achieved GFLOP/s (FLOPs from the ONNX graph) against the machine's measured peak.

Cases: synthetic phantoms (--seeds, --ct-size, --ct-slices) or your own files (--ct CT --pet PET).
Writes OUT/bench.json (machine, versions, settings, every figure) and OUT/bench.png (needs matplotlib).

  diffseg bench                                   # default model, auto backend, phantom 1
  diffseg bench --backend openvino --precision fp32 --batch-sizes 1 5 10 --seeds 1 2
  diffseg bench --steps 1 --samples 1 --ct-size 128 --ct-slices 40 --repeats 3    # a quick look"""

logger = logging.getLogger("diffseg")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", type=Path, default=Path("bench"), help="output folder (default ./bench)")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 2, 5, 10], help="engine batch sizes (default 1 2 5 10)"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per batch size (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per batch size first (default 2)")
    cases = parser.add_argument_group("cases (phantoms unless --ct/--pet)")
    cases.add_argument("--seeds", type=int, nargs="+", default=[1], help="phantom seeds (default 1)")
    cases.add_argument("--ct-size", type=int, default=256, help="phantom CT matrix in plane (default 256)")
    cases.add_argument("--ct-slices", type=int, help="phantom CT slices (default: random 56-72)")
    cases.add_argument("--ct", type=Path, help="CT image file of a case to run instead of phantoms")
    cases.add_argument("--pet", type=Path, help="PET image file (SUV) of that case")
    parser.add_argument("--no-peak", action="store_true", help="do not measure the machine's peak GFLOP/s")
    parser.add_argument("--no-write", action="store_true", help="leave the write stage out of the end-to-end run")
    parser.add_argument("--no-plot", action="store_true", help="no PNG plot")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from diffseg.runtime.atomic import write_json_atomic
    from diffseg.runtime.bench import BenchCase, BenchOptions, format_report, plot_report, run_bench

    if (args.ct is None) != (args.pet is None):
        raise ValueError("give both --ct and --pet (one case of your own), or neither (phantoms)")
    cases = None
    if args.ct is not None:
        for name in ("ct", "pet"):
            if not getattr(args, name).is_file():
                raise FileNotFoundError(f"--{name} {getattr(args, name)}: no such file")
        cases = [BenchCase(args.ct.name.split(".")[0], args.ct, args.pet)]
    options = BenchOptions(
        batch_sizes=tuple(args.batch_sizes),
        repeats=args.repeats,
        warmup=args.warmup,
        seeds=tuple(args.seeds),
        ct_size_xy=args.ct_size,
        ct_slices=args.ct_slices,
        measure_peak=not args.no_peak,
        write_outputs=not args.no_write,
    )
    report = run_bench(lambda: make_segmenter(args), options, cases=cases)
    report["command"] = " ".join(["diffseg", *sys.argv[1:]])
    args.output.mkdir(parents=True, exist_ok=True)
    json_path = write_json_atomic(args.output / "bench.json", report)
    print(format_report(report))
    print(f"\nwrote {json_path}")
    if not args.no_plot:
        try:
            print(f"wrote {plot_report(report, args.output / 'bench.png')}")
        except RuntimeError as exc:  # matplotlib missing: the figures are in the JSON; say so and go on
            print(f"no plot: {exc}")
    return 0
