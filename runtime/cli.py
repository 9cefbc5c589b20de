"""The ``diffseg`` command line. Each sub-command lives in its own module and is imported only when run."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

# name -> (module under diffseg.runtime.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "Run the shipped default model on the shipped sample case and report Dice."),
    "predict": ("predict", "Segment one case (--ct/--pet) or a cohort (-i FOLDER_OR_CSV)."),
    "export": ("export", "Export a trained PyTorch denoiser to a model package (ONNX fp32 + fp16, manifest)."),
    "build-engine": ("build_engine", "Build and verify a GPU engine (TensorRT plan) for a model package."),
    "bench": ("bench", "Measure latency and throughput of a model package on a backend."),
    "serve": ("serve", "Run a DICOM node beside a PACS: receive studies, send back DICOM SEG."),
    "phantom": ("phantom", "Write synthetic head-and-neck PET/CT phantoms with ground truth."),
    "info": ("info", "Print the build, the backends that import and the devices they see."),
}


def build_parser() -> argparse.ArgumentParser:
    from diffseg import __version__

    parser = argparse.ArgumentParser(
        prog="diffseg",
        description="Diffusion-model tumour segmentation of 3D PET/CT: export, run, serve, benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"diffseg {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(f"diffseg.runtime.commands.{module}")
        p = sub.add_parser(
            name,
            help=help_text,
            description=getattr(mod, "DESCRIPTION", help_text),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(f"diffseg.runtime.commands.{args._module}")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        # Errors at the boundary name the input and the problem; no traceback for a user mistake.
        if args.verbose >= 2:
            raise
        print(f"diffseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
