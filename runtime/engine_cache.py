"""Where built GPU engines are cached, and the key that makes a cached plan valid for a machine and a model."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["cache_dir", "plan_key"]


def cache_dir(kind: str) -> Path:
    """``$DIFFSEG_CACHE`` or ``~/.cache/diffseg``, one folder per kind of engine."""
    root = Path(os.environ.get("DIFFSEG_CACHE", Path.home() / ".cache" / "diffseg"))
    path = root / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def plan_key(
    *,
    gpu_name: str,
    compute_capability: str,
    trt_version: str,
    onnx_sha256: str,
    precision: str,
    shapes: dict[str, list[int]],
) -> str:
    """A file-name-safe key: a plan is valid only for the same GPU, TensorRT, ONNX file, precision and shapes."""
    doc = json.dumps(
        {
            "gpu": gpu_name,
            "cc": compute_capability,
            "trt": trt_version,
            "onnx": onnx_sha256,
            "precision": precision,
            "shapes": shapes,
        },
        sort_keys=True,
    )
    return hashlib.sha256(doc.encode()).hexdigest()[:32]
