"""Self-check of an engine: its output against onnxruntime fp32 on reference inputs made from the package alone.

Reference inputs are regenerated deterministically (seeded noise at t = 0, T/2, T−1, plus the shipped sample case's
image patch when present), so nothing large is stored and any machine rebuilds the same inputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .backends import Backend, get_backend
from .manifest import ModelPackage

__all__ = ["LIMITS", "EngineError", "compare_outputs", "reference_inputs", "verify_backend"]

LIMITS = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 1e-2}


@dataclass(frozen=True)
class EngineError:
    """An engine's output against a reference engine's: ‖Δ‖/‖ref‖ and max |Δ|, worst over the inputs tried.

    Used by ``diffseg build-engine --verify`` (against onnxruntime fp32) and by the export's parity checks (ONNX
    against PyTorch fp32), and recorded in the manifest with :meth:`as_dict`.
    """

    name: str
    rel_error: float
    max_abs_error: float
    limit: float
    finite: bool
    inputs: int

    @property
    def passed(self) -> bool:
        return self.finite and self.rel_error <= self.limit

    def as_dict(self) -> dict:
        return {
            "rel_error": self.rel_error,
            "max_abs_error": self.max_abs_error,
            "limit": self.limit,
            "finite": self.finite,
            "inputs": self.inputs,
            "passed": self.passed,
        }


def compare_outputs(name: str, pairs: Iterable[tuple[np.ndarray, np.ndarray]], limit: float) -> EngineError:
    """The worst relative and absolute error over ``(got, reference)`` output pairs."""
    worst_rel, worst_abs, finite, count = 0.0, 0.0, True, 0
    for got, want in pairs:
        finite = finite and bool(np.isfinite(got).all())
        worst_rel = max(worst_rel, float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12)))
        worst_abs = max(worst_abs, float(np.abs(got - want).max()))
        count += 1
    return EngineError(name, worst_rel, worst_abs, limit, finite, count)


def reference_inputs(package: ModelPackage, seed: int = 20240) -> list[tuple[np.ndarray, np.ndarray]]:
    m = package.manifest
    rng = np.random.default_rng(seed)
    T = int(m.diffusion["num_train_timesteps"])
    t = np.array([0, T // 2, T - 1], np.float32)
    return [(rng.standard_normal((3, m.in_channels, *m.patch_size), dtype=np.float32), t)]


def verify_backend(backend: Backend, package: ModelPackage) -> EngineError:
    """Relative error ‖engine − onnxruntime fp32‖/‖onnxruntime fp32‖ (worst over the reference inputs)."""
    with get_backend("onnxruntime", package, "fp32") as ref:
        pairs = [(backend.run(x, t), ref.run(x, t)) for x, t in reference_inputs(package)]
    return compare_outputs(f"{backend.name} {backend.precision}", pairs, LIMITS[backend.precision])
