"""``diffseg export``: a trained PyTorch denoiser → a model package (needs the ``export`` extra: torch, onnx)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DESCRIPTION = """Export a trained denoiser to a model package: denoiser.onnx (fp32, fixed patch, dynamic batch,
opset 18), denoiser.fp16.onnx (fp16 with fp32 islands) and manifest.json (normalisation, diffusion settings,
sampling defaults, sha256 of every file, parity report). The package is written only if every graph check and
parity check passes (ONNX fp32 vs PyTorch: rel. error <= 1e-4; fp16: <= 1e-2, finite at t = 0, T/2, T-1).
Needs: pip install "diffseg[export]"."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint (.pt, loaded weights_only)")
    parser.add_argument("--config", required=True, type=Path, help="training config (JSON) of that checkpoint")
    parser.add_argument("-o", "--output", required=True, type=Path, help="model package folder to write")
    parser.add_argument("--validation", type=Path, help="JSON with accuracy figures to record in the manifest")
    parser.add_argument(
        "--parity-phantoms",
        type=int,
        default=2,
        help="validation phantoms whose patches join the parity inputs (default 2)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing package")


def run(args: argparse.Namespace) -> int:
    try:
        from diffseg.export.cli_support import export_from_checkpoint
    except ImportError as exc:
        raise RuntimeError(f'export needs torch and onnx: pip install "diffseg[export]" ({exc})') from None
    validation = json.loads(args.validation.read_text()) if args.validation else None
    out = export_from_checkpoint(
        args.checkpoint,
        args.config,
        args.output,
        validation=validation,
        parity_phantoms=args.parity_phantoms,
        overwrite=args.overwrite,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    for name, r in manifest["validation"]["parity"].items():
        print(f"{name}: rel. error {r['rel_error']:.2e} (limit {r['limit']:.0e}) {'ok' if r['passed'] else 'FAIL'}")
    print(f"model package written: {out}")
    return 0
