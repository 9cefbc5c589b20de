"""The torch-free runtime: I/O, preprocessing, sampler, sliding window, backends, postprocessing, CLI.

``diffseg.runtime.Segmenter`` is the entry point of the Python API; it is imported on first use so that
``import diffseg.runtime`` stays light.
"""

from __future__ import annotations

from typing import Any

from .volume import Volume, read_volume, write_volume

__all__ = ["SegmentationResult", "Segmenter", "Volume", "read_volume", "write_volume"]


def __getattr__(name: str) -> Any:
    if name in ("Segmenter", "SegmentationResult"):
        from . import segmenter

        return getattr(segmenter, name)
    raise AttributeError(f"module 'diffseg.runtime' has no attribute {name!r}")
