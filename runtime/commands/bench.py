"""Not implemented yet: arrives with the benchmarking issue."""

from __future__ import annotations

import argparse

DESCRIPTION = "NOT IMPLEMENTED YET: this command arrives with the benchmarking issue. It does nothing today."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


def run(args: argparse.Namespace) -> int:
    raise RuntimeError("not implemented yet; it arrives with the benchmarking issue")
