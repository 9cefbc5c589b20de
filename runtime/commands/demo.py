"""Not implemented yet: arrives with the runtime issue (sampler, backends, Segmenter)."""

from __future__ import annotations

import argparse

DESCRIPTION = "NOT IMPLEMENTED YET: this command arrives with the runtime issue (sampler, backends, Segmenter). It does nothing today."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


def run(args: argparse.Namespace) -> int:
    raise RuntimeError("not implemented yet; it arrives with the runtime issue (sampler, backends, Segmenter)")
