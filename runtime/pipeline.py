"""The one orchestration of a case, layered by stage; every entry point (predict, demo, bench, serve) runs it.

- :func:`segment_files`: read the input files (image files, DICOM series or a DICOM study) → :func:`segment_volumes`
  → :func:`~diffseg.runtime.outputs.write_outputs`;
- :func:`segment_volumes`: CT and PET volumes → :func:`~diffseg.runtime.preprocess.prepare_input` (model grid, body
  box, candidate rule, normalisation) → :func:`sample` → back onto the CT grid (each map once, the PET once) →
  :func:`~diffseg.runtime.postprocess.postprocess` → a :class:`SegmentationResult`;
- :func:`sample`: the model input through the chosen loop order on the segmenter's backend.

Each stage is timed here and the sampler counts its engine calls itself; nothing replaces a backend's methods.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cases import load_case
from .outputs import WriteOptions, write_outputs
from .postprocess import postprocess
from .preprocess import ModelInput, prepare_input, resample_to
from .result import SampleCounts, SegmentationResult
from .sampling import LOOP_ORDERS, SampleResult
from .volume import Volume, read_volume

if TYPE_CHECKING:
    from .segmenter import Segmenter

__all__ = ["CaseOutput", "sample", "segment_files", "segment_volumes"]

logger = logging.getLogger("diffseg")


class _Stages:
    """Seconds per stage, lap by lap."""

    def __init__(self, read_seconds: float = 0.0) -> None:
        self.seconds: dict[str, float] = {"read": read_seconds} if read_seconds else {}
        self.tick = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.tick
        self.tick = now


def _as_volume(value: Volume | str | Path, name: str) -> Volume:
    if isinstance(value, Volume):
        return value
    if isinstance(value, str | Path):
        return read_volume(value)
    raise TypeError(f"{name} must be a Volume or a path to an image file, got {type(value).__name__}")


def sample(
    segmenter: Segmenter, model_input: ModelInput, seed: int, progress: Callable[[int], None] | None = None
) -> SampleResult:
    """Run the segmenter's loop order over a prepared case with the case's noise seed.

    Args:
        segmenter: the loaded model, backend and options.
        model_input: the case on the model grid.
        seed: the case's noise seed.
        progress: called with the number of finished engine calls after each call.
    """
    options = segmenter.options
    sampler = replace(options.sampler, seed=int(seed))
    loop = LOOP_ORDERS[options.loop_order]
    backend = segmenter.backend
    kwargs: dict[str, Any] = {"candidate": model_input.candidate, "on_call": progress}
    if options.device_loop:
        kwargs["device_ops"] = backend.device_ops
    return loop(model_input.image, backend.run, segmenter.scheduler_config, sampler, options.window, **kwargs)


def segment_volumes(
    segmenter: Segmenter,
    ct: Volume | str | Path,
    pet: Volume | str | Path | None,
    *,
    seed: int | None = None,
    progress: Callable[[int], None] | None = None,
    read_seconds: float = 0.0,
) -> SegmentationResult:
    """Segment one case given as volumes (or image files).

    Args:
        segmenter: the loaded model, backend and options.
        ct: CT in HU (Volume or image file).
        pet: PET in SUVbw on its own grid (Volume or image file); None for a model without a PET input.
        seed: this case's noise seed (None: the segmenter's).
        progress: called with the number of finished engine calls after each call.
        read_seconds: time the caller spent reading the inputs (recorded as the ``read`` stage).

    Raises:
        ValueError, FileNotFoundError: unreadable inputs, an input the model needs missing, or inputs that do not
            overlap.
    """
    stages = _Stages(read_seconds)
    ct_v = _as_volume(ct, "ct")
    pet_v = None if pet is None else _as_volume(pet, "pet")
    stages.lap("read")
    m = segmenter.package.manifest
    volumes = {"CT": ct_v} if pet_v is None else {"CT": ct_v, "PT": pet_v}
    model_input = prepare_input(
        volumes, m.modalities, m.normalisation, m.spacing_mm, candidate=segmenter.options.candidate
    )
    stages.lap("prepare")
    seed = segmenter.options.sampler.seed if seed is None else int(seed)
    s = sample(segmenter, model_input, seed, progress)
    stages.lap("sample")
    ct_grid = ct_v.grid
    probability, uncertainty, entropy = (
        resample_to(model_input.uncrop(a), ct_grid, "linear") for a in (s.mean, s.std, s.entropy)
    )
    pet_on_ct = None if pet_v is None else resample_to(pet_v, ct_grid, "linear", default=0.0)
    post = postprocess(probability, pet_on_ct, segmenter.options.postprocess)
    stages.lap("postprocess")
    options = replace(segmenter.options, sampler=replace(segmenter.options.sampler, seed=seed))
    counts = SampleCounts(
        windows=s.windows,
        windows_skipped=s.windows_skipped,
        retired=s.retired,
        engine_calls=s.engine_calls,
        patch_forwards=s.patch_forwards,
        engine_seconds=s.engine_seconds,
        sampler_seconds=s.total_seconds,
    )
    return SegmentationResult(
        mask=post.mask,
        labels=post.labels,
        probability=probability,
        uncertainty=uncertainty,
        entropy=entropy,
        pet_on_ct=pet_on_ct,
        lesions=tuple(post.lesions),
        options=options,
        settings=segmenter.settings(options),
        counts=counts,
        timings=stages.seconds,
        engine_log=s.engine_log,
    )


@dataclass(frozen=True)
class CaseOutput:
    """What :func:`segment_files` gives back.

    Attributes:
        result: the case's result.
        paths: every file written, by output name.
        report: the run report written as ``report.json`` (empty when no report was asked for).
        write_seconds: time spent writing.
    """

    result: SegmentationResult
    paths: dict[str, Path]
    report: dict[str, Any]
    write_seconds: float


def segment_files(
    segmenter: Segmenter,
    ct: Path,
    pet: Path | None,
    out_dir: Path,
    *,
    case_id: str = "case",
    write: WriteOptions | None = None,
    seed: int | None = None,
    progress: Callable[[int], None] | None = None,
    force_units: bool = False,
) -> CaseOutput:
    """Read, segment and write one case.

    Args:
        segmenter: the loaded model, backend and options.
        ct: CT image file or DICOM series folder, or a DICOM study folder holding CT and PET (``pet`` None).
        pet: PET image file (SUVbw) or DICOM series folder; None with a study folder.
        out_dir: where the outputs go (created).
        case_id: recorded in the report.
        write: which outputs to write (None: all).
        seed: this case's noise seed (None: the segmenter's).
        progress: called with the number of finished engine calls after each call.
        force_units: DICOM: use implausible SUV attributes as written; each override goes into the report.

    Raises:
        ValueError, FileNotFoundError: unreadable or implausible inputs.
    """
    start = time.perf_counter()
    loaded = load_case(ct, pet, force_units=force_units)
    read_seconds = time.perf_counter() - start
    result = segment_volumes(segmenter, loaded.ct, loaded.pet, seed=seed, progress=progress, read_seconds=read_seconds)
    extra: dict[str, Any] = {"case_id": case_id, "inputs": {"ct": str(ct), "pet": None if pet is None else str(pet)}}
    if loaded.study is not None:
        extra["overrides"] = list(loaded.study.overrides)
    start = time.perf_counter()
    paths, report = write_outputs(result, out_dir, ct=loaded.ct, study=loaded.study, options=write, extra=extra)
    write_seconds = time.perf_counter() - start
    logger.info("case %s: %d lesion(s), %.2f ml", case_id, len(result.lesions), result.total_volume_ml)
    return CaseOutput(result, paths, report, write_seconds)
