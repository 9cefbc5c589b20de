"""Not implemented yet: arrives with the export issue (denoiser, training, ONNX export)."""

from __future__ import annotations

import argparse

DESCRIPTION = "NOT IMPLEMENTED YET: this command arrives with the export issue (denoiser, training, ONNX export). It does nothing today."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


def run(args: argparse.Namespace) -> int:
    raise RuntimeError("not implemented yet; it arrives with the export issue (denoiser, training, ONNX export)")
