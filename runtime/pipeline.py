"""The one orchestration of a case, layered by stage; every entry point (predict, demo, bench, serve) runs it.

- :func:`segment_files`: read the input files (image files, DICOM series or a DICOM study) → :func:`segment_loaded`
  → :func:`write_case` (:func:`~diffseg.runtime.outputs.write_outputs` with the case's id and inputs);
- :func:`segment_volumes`: CT and PET volumes → :func:`~diffseg.runtime.preprocess.prepare_input` (model grid, body
  box, candidate rule, normalisation) → :func:`sample` → back onto the CT grid (each map once, the PET once) →
  :func:`~diffseg.runtime.postprocess.postprocess` → a :class:`SegmentationResult`;
- :func:`sample`: the model input through the chosen loop order on the segmenter's backend.

The Ray cohort runner (:mod:`diffseg.runtime.distributed`) calls the same stages on different workers:
``load_case`` + :func:`prepare_case` in CPU tasks, :func:`sample_case` in an actor that holds the segmenter,
:func:`finish_case` + :func:`write_case` in CPU tasks; :func:`segment_loaded` chains the first three here.

Each stage is timed here and the sampler counts its engine calls itself; nothing replaces a backend's methods.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cases import INPUT_ARGUMENTS, LoadedCase, input_argument, load_case
from .input_checks import InputChecks, check_inputs
from .model_contract import TargetSpec
from .outputs import WriteOptions, write_outputs
from .postprocess import postprocess
from .preprocess import ModelInput, prepare_input, resample_to
from .result import SampleCounts, SegmentationResult, SegmentOptions
from .sampling import LOOP_ORDERS, SampleResult
from .targets import combine_targets
from .volume import Volume, read_volume

if TYPE_CHECKING:
    from .manifest import Manifest
    from .segmenter import Segmenter

__all__ = [
    "CaseOutput",
    "PreparedCase",
    "SampledCase",
    "finish_case",
    "prepare_case",
    "sample",
    "sample_case",
    "segment_files",
    "segment_loaded",
    "segment_volumes",
    "write_case",
]

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
    if backend.conditioner is not None:
        kwargs["condition"] = backend.conditioner
    if options.device_loop:
        kwargs["device_ops"] = backend.device_ops
    return loop(model_input.image, backend.run, segmenter.scheduler_config, sampler, options.window, **kwargs)


@dataclass(frozen=True)
class PreparedCase:
    """A case ready for the sampler: what was read, the model input, and the stages so far.

    Attributes:
        loaded: the case as read (volumes, DICOM study, overrides of the reader's checks).
        model_input: the case on the model grid.
        seed: the case's noise seed.
        overrides: every input check overridden, reading included, said in words.
        timings: seconds of the ``read`` and ``prepare`` stages.
        targets: the model's targets, in channel order.
    """

    loaded: LoadedCase
    model_input: ModelInput
    seed: int
    overrides: tuple[str, ...]
    timings: dict[str, float]
    targets: tuple[TargetSpec, ...] = ()


def _how_to_give(code: str) -> str:
    return f"--{INPUT_ARGUMENTS[code]} PATH" if code in INPUT_ARGUMENTS else f"--image {code}=PATH"


def check_input_set(manifest: Manifest, volumes: Mapping[str, Volume], sources: Mapping[str, str]) -> None:
    """Refuse a case whose inputs are not the model's: a required input missing, or one the model does not take.

    Raises:
        ValueError: naming the model, the input missing (and how to give it) or the one it would not use.
    """
    given = ", ".join(f"{c} ({sources.get(c, c)})" for c in volumes) or "none"
    missing = [s for s in manifest.inputs if not s.optional and s.code not in volumes]
    if missing:
        needs = ", ".join(f"{s.name} ({_how_to_give(s.code)})" for s in missing)
        raise ValueError(
            f"model {manifest.name!r} needs {needs}; given: {given}. Its inputs: "
            + ", ".join(s.name + (" (optional)" if s.optional else "") for s in manifest.inputs)
        )
    unused = [c for c in volumes if c not in manifest.modalities]
    if unused:
        raise ValueError(
            f"model {manifest.name!r} takes {', '.join(manifest.modalities)}, not {', '.join(unused)}: leave "
            f"{' and '.join(sources.get(c, c) for c in unused)} out (given: {given})"
        )


def prepare_case(
    manifest: Manifest,
    options: SegmentOptions,
    loaded: LoadedCase,
    *,
    seed: int | None = None,
    checks: InputChecks | None = None,
    read_seconds: float = 0.0,
) -> PreparedCase:
    """The first stage: the volumes a model needs, checked, onto the model grid (needs no backend).

    Args:
        manifest: the model package's manifest (modalities, normalisation, spacing).
        options: the segment options (candidate rule, the default seed).
        loaded: the case as read.
        seed: this case's noise seed (None: ``options.sampler.seed``).
        checks: the overrides of the input checks (None: none).
        read_seconds: time spent reading (the ``read`` stage).
    """
    stages = _Stages(read_seconds)
    check_input_set(manifest, loaded.volumes, loaded.sources)
    volumes, overrides = check_inputs(loaded.volumes, loaded.sources, checks or InputChecks())
    loaded = replace(loaded, volumes=volumes, reference=manifest.reference)
    absent = {s.code: s.missing_value for s in manifest.inputs if s.optional}
    try:
        model_input = prepare_input(
            volumes,
            manifest.modalities,
            manifest.normalisation,
            manifest.spacing_mm,
            candidate=options.candidate,
            reference=manifest.reference,
            absent=absent,
        )
    except ValueError as exc:  # about the inputs together (overlap, a missing modality): name them all
        raise ValueError(f"{' and '.join(loaded.sources.get(c, c) for c in volumes)}: {exc}") from None
    stages.lap("prepare")
    seed = options.sampler.seed if seed is None else int(seed)
    targets = tuple(manifest.targets)
    return PreparedCase(loaded, model_input, seed, (*loaded.overrides, *overrides), stages.seconds, targets)


def finish_case(
    prepared: PreparedCase,
    samples: SampleResult,
    options: SegmentOptions,
    settings: Mapping[str, Any],
    sample_seconds: float,
) -> SegmentationResult:
    """The last stage: the sampler's maps back onto the CT grid (each once, the PET once), then postprocessing.

    Args:
        prepared: the case as :func:`prepare_case` gave it.
        samples: the sampler's result for ``prepared.model_input``.
        options: the segment options the samples were drawn with.
        settings: the segmenter's settings for ``options`` (model, backend, precision), for the report.
        sample_seconds: time the sampler took (the ``sample`` stage).
    """
    stages = _Stages()
    stages.seconds = {**prepared.timings, "sample": sample_seconds}
    ct_grid = prepared.loaded.grid_volume.grid
    uncrop = prepared.model_input.uncrop
    s = samples
    pet = prepared.loaded.pet
    pet_on_ct = None if pet is None else resample_to(pet, ct_grid, "linear", default=0.0)
    if len(prepared.targets) > 1:  # [T, *volume] maps: each target on its own, then combined
        per_target = [
            [resample_to(uncrop(a[c]), ct_grid, "linear") for c in range(len(a))] for a in (s.mean, s.std, s.entropy)
        ]
        post = combine_targets(prepared.targets, *per_target, pet_on_ct, options.postprocess)
        probability, uncertainty, entropy, targets = post.probability, post.uncertainty, post.entropy, post.targets
    else:
        maps = (resample_to(uncrop(a), ct_grid, "linear") for a in (s.mean, s.std, s.entropy))
        probability, uncertainty, entropy = maps
        post, targets = postprocess(probability, pet_on_ct, options.postprocess), ()
    stages.lap("postprocess")
    options = replace(options, sampler=replace(options.sampler, seed=prepared.seed))
    counts = SampleCounts(
        windows=s.windows,
        windows_skipped=s.windows_skipped,
        retired=s.retired,
        engine_calls=s.engine_calls,
        patch_forwards=s.patch_forwards,
        engine_seconds=s.engine_seconds,
        sampler_seconds=s.total_seconds,
        condition_calls=s.condition_calls,
        condition_forwards=s.condition_forwards,
        condition_seconds=s.condition_seconds,
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
        settings=settings,
        counts=counts,
        timings=stages.seconds,
        engine_log=s.engine_log,
        overrides=prepared.overrides,
        targets=targets,
    )


@dataclass(frozen=True)
class SampledCase:
    """What the sample stage gives :func:`finish_case`: the samples and what they were drawn with.

    Attributes:
        samples: the sampler's result.
        options: the segmenter's options (``finish_case`` sets the case's seed in them).
        settings: the segmenter's settings with the case's seed, for the report.
        seconds: time the sampler took (the ``sample`` stage).
    """

    samples: SampleResult
    options: SegmentOptions
    settings: dict[str, Any]
    seconds: float


def sample_case(
    segmenter: Segmenter, model_input: ModelInput, seed: int, progress: Callable[[int], None] | None = None
) -> SampledCase:
    """The sample stage: :func:`sample`, timed, with the settings the report records (the seed the case's)."""
    start = time.perf_counter()
    samples = sample(segmenter, model_input, seed, progress)
    seconds = time.perf_counter() - start
    options = segmenter.options
    used = replace(options, sampler=replace(options.sampler, seed=int(seed)))
    return SampledCase(samples, options, segmenter.settings(used), seconds)


def segment_loaded(
    segmenter: Segmenter,
    loaded: LoadedCase,
    *,
    seed: int | None = None,
    progress: Callable[[int], None] | None = None,
    checks: InputChecks | None = None,
    read_seconds: float = 0.0,
) -> SegmentationResult:
    """A case as read through the three stages: :func:`prepare_case` → :func:`sample_case` → :func:`finish_case`."""
    options = segmenter.options
    prepared = prepare_case(
        segmenter.package.manifest, options, loaded, seed=seed, checks=checks, read_seconds=read_seconds
    )
    sampled = sample_case(segmenter, prepared.model_input, prepared.seed, progress)
    return finish_case(prepared, sampled.samples, sampled.options, sampled.settings, sampled.seconds)


def segment_volumes(
    segmenter: Segmenter,
    ct: Volume | str | Path | None,
    pet: Volume | str | Path | None,
    *,
    images: Mapping[str, Volume | str | Path] | None = None,
    seed: int | None = None,
    progress: Callable[[int], None] | None = None,
    checks: InputChecks | None = None,
) -> SegmentationResult:
    """Segment one case given as volumes (or image files).

    Args:
        segmenter: the loaded model, backend and options.
        ct: CT in HU (Volume or image file); None for a model without a CT input.
        pet: PET in SUVbw on its own grid (Volume or image file); None for a model without a PET input.
        images: the other inputs by modality code (``{"MR": ...}``), each a Volume or an image file.
        seed: this case's noise seed (None: the segmenter's).
        progress: called with the number of finished engine calls after each call.
        checks: the overrides of the input checks (None: none).

    Raises:
        ValueError, FileNotFoundError: unreadable or implausible inputs, an input the model needs missing (or one
            it does not take), or inputs that do not overlap.
    """
    start = time.perf_counter()
    given = {code: v for code, v in {"CT": ct, "PT": pet, **(images or {})}.items() if v is not None}
    # a Volume is called by its argument (ct, pet) or its code in messages
    named = {code: INPUT_ARGUMENTS.get(code, code) for code in given}
    sources = {code: str(v) if isinstance(v, str | Path) else named[code] for code, v in given.items()}
    volumes = {code: _as_volume(v, code) for code, v in given.items()}
    loaded = LoadedCase(volumes, sources=sources)
    read_seconds = time.perf_counter() - start
    return segment_loaded(segmenter, loaded, seed=seed, progress=progress, checks=checks, read_seconds=read_seconds)


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
    ct: Path | None,
    pet: Path | None,
    out_dir: Path,
    *,
    images: Mapping[str, Path] | None = None,
    case_id: str = "case",
    write: WriteOptions | None = None,
    seed: int | None = None,
    progress: Callable[[int], None] | None = None,
    checks: InputChecks | None = None,
) -> CaseOutput:
    """Read, segment and write one case.

    Args:
        segmenter: the loaded model, backend and options.
        ct: CT image file or DICOM series folder, or a DICOM study folder holding CT and PET (``pet`` None); None
            for a model without a CT.
        pet: PET image file (SUVbw) or DICOM series folder; None with a study folder or for a model without a PET.
        images: the other inputs by modality code (image files or DICOM folders of one series).
        out_dir: where the outputs go (created).
        case_id: recorded in the report.
        write: which outputs to write (None: all).
        seed: this case's noise seed (None: the segmenter's).
        progress: called with the number of finished engine calls after each call.
        checks: the overrides of the input checks (None: none); each use goes into the report.

    Raises:
        ValueError, FileNotFoundError: unreadable or implausible inputs.
    """
    start = time.perf_counter()
    manifest = segmenter.package.manifest
    loaded = load_case(ct, pet, images=images, modalities=manifest.modalities, checks=checks)
    loaded = replace(loaded, reference=manifest.reference)
    read_seconds = time.perf_counter() - start
    result = segment_loaded(segmenter, loaded, seed=seed, progress=progress, checks=checks, read_seconds=read_seconds)
    inputs = {"ct": ct, "pet": pet, **{input_argument(code): path for code, path in (images or {}).items()}}
    return write_case(result, loaded, out_dir, case_id=case_id, inputs=inputs, write=write)


def write_case(
    result: SegmentationResult,
    loaded: LoadedCase,
    out_dir: Path,
    *,
    case_id: str,
    inputs: Mapping[str, str | Path | None],
    write: WriteOptions | None = None,
    extra: Mapping[str, Any] | None = None,
) -> CaseOutput:
    """The write stage of a case (:func:`segment_files` and the Ray cohort runner): its outputs, the report last.

    Args:
        result: the case's result (:func:`finish_case`).
        loaded: the case as read (the CT the preview lies on, the DICOM study a SEG refers to).
        out_dir: where the outputs go (created).
        case_id: recorded in the report.
        inputs: the inputs as given (``ct``, ``pet``, others by lower-case code), recorded in the report.
        write: which outputs to write (None: all).
        extra: more report fields after ``case_id`` and ``inputs`` (the Ray runner's options).

    Raises:
        ValueError: an output path that leaves ``out_dir``.
        OSError: a write failed (the message names the file).
    """
    given = {name: None if path is None else str(path) for name, path in inputs.items()}
    fields: dict[str, Any] = {"case_id": case_id, "inputs": given}
    fields.update(extra or {})
    start = time.perf_counter()
    grid = loaded.grid_volume
    paths, report = write_outputs(result, out_dir, ct=grid, study=loaded.study, options=write, extra=fields)
    write_seconds = time.perf_counter() - start
    logger.info("case %s: %d lesion(s), %.2f ml", case_id, len(result.lesions), result.total_volume_ml)
    return CaseOutput(result, paths, report, write_seconds)
