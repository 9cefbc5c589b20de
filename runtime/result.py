"""What the pipeline takes and gives back: the options of a run and the result of one case.

Both are frozen: the result records the options it was computed with, the backend that ran it, the counts of the
sampling and the seconds of each stage, all measured by the pipeline and the sampler themselves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .diffusion_schedule import SamplerOptions
from .postprocess import PostprocessOptions
from .preprocess import CandidateRule
from .sliding_window import WindowOptions
from .volume import Volume

__all__ = ["LOOP_ORDER_NAMES", "STAGES", "SampleCounts", "SegmentOptions", "SegmentationResult"]

LOOP_ORDER_NAMES = ("step_major", "window_major")
# Stages of one case, in order; each is timed by the pipeline (``write`` by the writer).
STAGES = ("read", "prepare", "sample", "postprocess", "write")


@dataclass(frozen=True)
class SegmentOptions:
    """How a case is segmented, resolved from the manifest's defaults and the caller's overrides.

    Attributes:
        sampler: the reverse process, its grid and the ensemble.
        window: tiling, blending, batch size and retirement.
        postprocess: threshold, minimum lesion volume, connectivity.
        loop_order: ``step_major`` or ``window_major``.
        candidate: the rule for windows worth sampling; None runs every window.
        device_loop: step-major only: the backend's device ops keep x_t on the engine's device.
    """

    sampler: SamplerOptions
    window: WindowOptions
    postprocess: PostprocessOptions
    loop_order: str = "step_major"
    candidate: CandidateRule | None = None
    device_loop: bool = False

    def __post_init__(self) -> None:
        if self.loop_order not in LOOP_ORDER_NAMES:
            raise ValueError(f"loop_order must be one of {LOOP_ORDER_NAMES}, got {self.loop_order!r}")
        if self.loop_order == "window_major" and self.window.retire_after:
            raise ValueError(
                f"retire_after applies to the step-major loop only, got retire_after={self.window.retire_after} "
                "with loop_order window_major (pass retire_after=0)"
            )
        if self.device_loop and self.loop_order != "step_major":
            raise ValueError("device_loop runs the step-major loop only, got loop_order window_major")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for reports."""
        w = self.window
        return {
            "loop_order": self.loop_order,
            "device_loop": self.device_loop,
            "sampler": vars(self.sampler).copy(),
            "window": {
                "patch_size": list(w.patch_size),
                "overlap": w.overlap,
                "batch_size": w.batch_size,
                "mode": w.mode,
                "skip_empty": self.candidate is not None,
                "candidate": None if self.candidate is None else vars(self.candidate).copy(),
                "retire_after": w.retire_after,
                "retire_level": w.retire_level,
            },
            "postprocess": vars(self.postprocess).copy(),
        }


@dataclass(frozen=True)
class SampleCounts:
    """Counts and engine figures of one case's sampling (from :class:`~diffseg.runtime.sampling.SampleResult`).

    Attributes:
        windows: windows in the tiling.
        windows_skipped: windows not run (no candidate voxel).
        retired: (window, sample) tasks retired early as background.
        engine_calls: calls of the denoiser.
        patch_forwards: patches run through the denoiser.
        engine_seconds: wall time inside the denoiser.
        sampler_seconds: wall time of the whole sampling loop.
    """

    windows: int
    windows_skipped: int
    retired: int
    engine_calls: int
    patch_forwards: int
    engine_seconds: float
    sampler_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(self).items()}


def _read_only(mapping: Mapping[str, float]) -> Mapping[str, float]:
    from types import MappingProxyType

    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class SegmentationResult:
    """One case's result; every image is on the CT's own grid.

    Attributes:
        mask: uint8, 1 = tumour (after threshold and small-component removal).
        labels: lesion ids 1..n.
        probability: mean foreground probability over the samples.
        uncertainty: standard deviation of the samples' probabilities.
        entropy: binary entropy (bits) of the mean probability.
        pet_on_ct: the PET (SUVbw) resampled onto the CT grid, once (lesion SUVs, the preview); None for models
            without a PET input.
        lesions: one row per lesion (see :func:`~diffseg.runtime.postprocess.postprocess`).
        options: the options used (seed included).
        settings: model, backend, precision, device and the options, JSON-ready (for reports).
        counts: windows, skipped, retired, engine calls, patch-forwards, engine and sampler seconds.
        timings: seconds per stage (:data:`STAGES` up to ``postprocess``; ``write`` is the writer's).
        engine_log: ``[calls, 4]`` (start, end, batch, timestep) of every engine call.
        overrides: every input check overridden for this case (``force_units``, ``nan_as``), said in words.
    """

    mask: Volume
    labels: Volume
    probability: Volume
    uncertainty: Volume
    entropy: Volume
    pet_on_ct: Volume | None
    lesions: tuple[dict[str, Any], ...]
    options: SegmentOptions
    settings: Mapping[str, Any]
    counts: SampleCounts
    timings: Mapping[str, float]
    engine_log: np.ndarray = field(repr=False)
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "lesions", tuple(self.lesions))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "timings", _read_only(self.timings))
        if any(not math.isfinite(v) or v < 0 for v in self.timings.values()):
            raise ValueError(f"timings must be finite seconds >= 0, got {dict(self.timings)}")

    @property
    def total_volume_ml(self) -> float:
        return float(sum(row["volume_ml"] for row in self.lesions))
