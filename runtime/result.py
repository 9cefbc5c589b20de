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
from .model_contract import TargetSpec
from .postprocess import PostprocessOptions
from .preprocess import CandidateRule
from .sliding_window import WindowOptions
from .volume import Volume

__all__ = ["LOOP_ORDER_NAMES", "STAGES", "SampleCounts", "SegmentOptions", "SegmentationResult", "TargetResult"]

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
        condition_calls, condition_forwards, condition_seconds: the condition graph's calls, windows run and wall
            time (0 for a model without one).
    """

    windows: int
    windows_skipped: int
    retired: int
    engine_calls: int
    patch_forwards: int
    engine_seconds: float
    sampler_seconds: float
    condition_calls: int = 0
    condition_forwards: int = 0
    condition_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(self).items()}


def _read_only(mapping: Mapping[str, float]) -> Mapping[str, float]:
    from types import MappingProxyType

    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class TargetResult:
    """One target's maps and lesions, for a model of several targets (``SegmentationResult.targets``).

    Attributes:
        target: the manifest's target (name, coded concepts for DICOM SEG).
        mask: uint8, 1 = this target (its own threshold and small-component removal).
        labels: its lesion ids (those of the case's lesion table).
        probability, uncertainty, entropy: its mean probability, the samples' std, the binary entropy.
        lesions: its rows of the case's lesion table.
    """

    target: TargetSpec
    mask: Volume
    labels: Volume
    probability: Volume
    uncertainty: Volume
    entropy: Volume
    lesions: tuple[dict[str, Any], ...]

    @property
    def name(self) -> str:
        return self.target.name


@dataclass(frozen=True)
class SegmentationResult:
    """One case's result; every image is on the reference input's own grid (the CT's for a PET/CT model).

    For a model of several targets, ``targets`` holds each target's own maps and lesions and the top-level maps
    combine them: ``mask`` is a target label map (c + 1 where target c is found; a voxel found for several goes to
    the one of highest probability), ``labels`` and ``lesions`` every target's lesions (each row names its
    ``target``), ``probability``, ``uncertainty`` and ``entropy`` the largest value over the targets.

    Attributes:
        mask: uint8, 1 = tumour (after threshold and small-component removal); a target label map with several.
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
        targets: each target's result, for a model of several targets; empty for one.
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
    targets: tuple[TargetResult, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "lesions", tuple(self.lesions))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "timings", _read_only(self.timings))
        if any(not math.isfinite(v) or v < 0 for v in self.timings.values()):
            raise ValueError(f"timings must be finite seconds >= 0, got {dict(self.timings)}")

    @property
    def total_volume_ml(self) -> float:
        return float(sum(row["volume_ml"] for row in self.lesions))
