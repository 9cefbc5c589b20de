"""The torch-free runtime: I/O, preprocessing, sampler, sliding window, backends, postprocessing, CLI."""

from __future__ import annotations

from .volume import Volume, read_volume, write_volume

__all__ = ["Volume", "read_volume", "write_volume"]
