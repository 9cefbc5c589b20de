"""``diffseg export``: a trained PyTorch denoiser → a model package (needs the ``export`` extra: torch, onnx)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DESCRIPTION = """Export a trained denoiser to a model package: denoiser.onnx (fp32, fixed patch, dynamic batch,
opset 18), denoiser.fp16.onnx (fp16 with fp32 islands), denoiser.pt2 (a torch.export program: the torch backend
runs it with no architecture registry), denoiser.pt (the weights) and manifest.json (normalisation, diffusion
settings, sampling defaults, sha256 of every file, parity report). The package is written only if every graph check
and parity check passes (ONNX fp32 vs PyTorch: rel. error <= 1e-4; fp16: <= 1e-2, finite at t = 0, T/2, T-1; the
saved torch.export program vs PyTorch: <= 1e-5), after the model's output was checked against the declared contract
([B, output_channels, *patch], float32). The model is a --checkpoint of an architecture diffseg knows (a bare
state_dict, ours ({"model": ...}), Lightning ({"state_dict": ...}), DDP (module.) or EMA weights (--weights ema);
read with weights_only=True) or a --program saved with torch.export.save (any architecture; its config needs no
architecture or model section; loaded without running pickled or other code from the file). The config needs no
train section; provenance comes from the flags or the config's provenance section, else is written as "not stated".
Needs: pip install "diffseg[export]"."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        type=Path,
        help="checkpoint (.pt/.ckpt: a state_dict, ours, Lightning, DDP or EMA; loaded weights_only) of an "
        "architecture diffseg knows (the config's architecture and model)",
    )
    source.add_argument(
        "--program",
        type=Path,
        help="a torch.export program (.pt2, torch.export.save of torch.export.export(model.eval(), (x, t)) with a "
        "dynamic batch): any architecture, no architecture/model section in the config",
    )
    parser.add_argument(
        "--config",
        required=True,
        type=Path,
        help="config (JSON) of that model: patch_size, spacing_mm, modalities, normalisation, diffusion, and for a "
        "--checkpoint architecture and model; optional sampling and provenance (no train section needed)",
    )
    parser.add_argument("-o", "--output", required=True, type=Path, help="model package folder to write")
    parser.add_argument("--validation", type=Path, help="JSON with accuracy figures to record in the manifest")
    parser.add_argument(
        "--parity-phantoms",
        type=int,
        default=2,
        help="validation phantoms whose patches join the parity inputs (default 2)",
    )
    parser.add_argument(
        "--weights",
        choices=("model", "ema"),
        help="which weights of the --checkpoint to export: the trained network (model, default) or its EMA copy",
    )
    parser.add_argument("--licence", help="licence of the weights (else the config's provenance, else 'not stated')")
    parser.add_argument("--intended-use", help="intended use (else the config's provenance, else 'not stated')")
    parser.add_argument(
        "--training-data", help="what it was trained on (else the config's provenance, else 'not stated')"
    )
    parser.add_argument("--model-version", help="the model's version (else the config's, else 'not stated')")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing package")


def run(args: argparse.Namespace) -> int:
    if args.program is not None and args.weights is not None:
        raise ValueError("--weights picks the weights inside a --checkpoint; a --program holds its own")
    try:
        from diffseg.export.cli_support import export_from_checkpoint, export_from_program
    except ImportError as exc:
        raise RuntimeError(f'export needs torch and onnx: pip install "diffseg[export]" ({exc})') from None
    validation = json.loads(args.validation.read_text()) if args.validation else None
    common = {
        "validation": validation,
        "parity_phantoms": args.parity_phantoms,
        "overwrite": args.overwrite,
        "provenance": {
            "licence": args.licence,
            "intended_use": args.intended_use,
            "training_data": args.training_data,
            "model_version": args.model_version,
        },
    }
    if args.program is not None:
        out = export_from_program(args.program, args.config, args.output, **common)
    else:
        weights = args.weights or "model"
        out = export_from_checkpoint(args.checkpoint, args.config, args.output, weights=weights, **common)
    manifest = json.loads((out / "manifest.json").read_text())
    if args.program is not None:
        program = manifest["provenance"].get("program", {})
        print(f"program: {program.get('file', '?')} (sha256 {program.get('sha256', '?')[:12]}…)")
    else:
        ckpt = manifest["provenance"].get("checkpoint", {})
        print(f"weights: {ckpt.get('weights', 'model')} ({ckpt.get('source', '?')} of {ckpt.get('file', '?')})")
    for key in ("training_data", "intended_use", "licence", "model_version"):
        print(f"{key}: {manifest['provenance'].get(key)}")
    for name, r in manifest["validation"]["parity"].items():
        print(f"{name}: rel. error {r['rel_error']:.2e} (limit {r['limit']:.0e}) {'ok' if r['passed'] else 'FAIL'}")
    print(f"model package written: {out}")
    return 0
