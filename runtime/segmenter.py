"""``Segmenter``: a model package on a backend, from CT and PET volumes to mask, probability, uncertainty, lesions.

Stages (each timed in the result): read → resample (PET and CT onto the model grid) → normalise → sample (reverse
diffusion, sliding window) → postprocess (back onto the CT grid, threshold, components, lesion table).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Backend, get_backend
from .device_sampler import sample_step_major_on_device
from .manifest import ModelPackage, load_package
from .postprocess import PostprocessOptions, postprocess
from .preprocess import model_grid_for, normalise, resample_to
from .sampler import LOOP_ORDERS
from .scheduler import SamplerOptions, SchedulerConfig
from .sliding_window import WindowOptions
from .volume import Volume, read_volume

__all__ = ["SegmentationResult", "Segmenter"]

logger = logging.getLogger("diffseg")

_SCHEDULER_KEYS = {
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "beta_dtype",
    "prediction_type",
    "clip_sample",
    "clip_range",
    "set_alpha_to_one",
    "steps_offset",
    "variance_type",
    "output_channels",
    "prediction_channel",
}


@dataclass
class SegmentationResult:
    """What ``Segmenter.predict`` returns; every image is on the CT's own grid.

    Attributes:
        mask: uint8, 1 = tumour (after threshold and small-component removal).
        labels: lesion ids 1..n.
        probability: mean foreground probability over the samples.
        uncertainty: standard deviation of the samples' probabilities.
        entropy: binary entropy (bits) of the mean probability.
        lesions: one row per lesion (see ``postprocess``).
        settings: model, backend, precision, device, sampler and post-processing settings used.
        timings: seconds per stage.
        windows, windows_skipped, retired, engine_calls, patch_forwards: sliding-window counts of the sampling.
    """

    mask: Volume
    labels: Volume
    probability: Volume
    uncertainty: Volume
    entropy: Volume
    lesions: list[dict[str, Any]]
    settings: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    windows: int = 0
    windows_skipped: int = 0
    retired: int = 0
    engine_calls: int = 0
    patch_forwards: int = 0


def _as_volume(value: Volume | str | Path, name: str) -> Volume:
    if isinstance(value, Volume):
        return value
    if isinstance(value, str | Path):
        return read_volume(value)
    raise TypeError(f"{name} must be a Volume or a path to an image file, got {type(value).__name__}")


class Segmenter:
    """A model loaded once on a backend, reused for every case.

    Args:
        model: a model package (folder, .zip) or the name of a shipped one (``default``).
        backend: ``auto`` (the fastest available, logged and recorded) or a backend name.
        precision: ``fp32``, ``bf16`` or ``fp16``; None: the backend's (or auto's) choice.
        steps, samples, eta, overlap, threshold, min_lesion_ml: override the manifest's defaults.
        seed: the case seed of the noise (same seed, same mask on every backend up to engine precision).
        loop_order: ``step-major`` (default) or ``window-major`` (``_`` spellings too).
        batch_size: windows × samples per engine call (None: 2 × samples).
        skip_empty_windows: do not run windows without candidate tissue (PET below the manifest's level).
        retire_after: step-major only: stop running a (window, sample) once its predicted mask has been empty for
            this many consecutive steps (0 = off, exact; None = the manifest's ``retire_after``, else 0). See
            ``WindowOptions.retire_after``.
        threads: CPU threads for the engine (None: all cores).
        device_loop: step-major only: keep x_t and the accumulators on the engine's device across steps
            (:mod:`diffseg.runtime.device_sampler`; onnxruntime and torch backends). None: on where the engine runs
            on a GPU, off on the CPU (where the host loop is as fast). True on a backend that cannot is an error.
    """

    def __init__(
        self,
        model: str | Path = "default",
        backend: str = "auto",
        precision: str | None = None,
        *,
        steps: int | None = None,
        samples: int | None = None,
        eta: float | None = None,
        seed: int | None = None,
        overlap: float | None = None,
        threshold: float | None = None,
        min_lesion_ml: float | None = None,
        loop_order: str = "step-major",
        batch_size: int | None = None,
        skip_empty_windows: bool = True,
        retire_after: int | None = None,
        threads: int | None = None,
        device_loop: bool | None = None,
    ) -> None:
        self.package: ModelPackage = load_package(model)
        m = self.package.manifest
        d = m.defaults
        self.loop_order = loop_order.replace("-", "_")
        if self.loop_order not in LOOP_ORDERS:
            raise ValueError(f"loop_order must be step-major or window-major, got {loop_order!r}")
        self.scheduler_config = SchedulerConfig.from_dict(
            {k: v for k, v in m.diffusion.items() if k in _SCHEDULER_KEYS}
        )
        self.sampler_options = SamplerOptions(
            sampler=d["sampler"],
            steps=int(steps if steps is not None else d["steps"]),
            eta=float(eta if eta is not None else d.get("eta", 0.0)),
            timestep_spacing=d.get("timestep_spacing", "leading"),
            eps_convention=d.get("eps_convention", "raw"),
            num_samples=int(samples if samples is not None else d["samples"]),
            channel_order=m.channel_order.replace("-", "_"),
            seed=int(seed if seed is not None else d.get("seed", 0)),
        )
        k = self.sampler_options.num_samples
        self.window_options = WindowOptions(
            patch_size=tuple(m.patch_size),
            overlap=float(overlap if overlap is not None else d["overlap"]),
            batch_size=int(batch_size or max(2 * k, 1)),
            retire_after=self._retire_after(retire_after, d),
        )
        self.post_options = PostprocessOptions(
            threshold=float(threshold if threshold is not None else d["threshold"]),
            min_lesion_ml=float(min_lesion_ml if min_lesion_ml is not None else d["min_lesion_ml"]),
        )
        self.skip_empty_windows = skip_empty_windows
        t0 = time.perf_counter()
        self.backend: Backend = get_backend(backend, self.package, precision, threads)
        self.load_seconds = time.perf_counter() - t0
        self.device_loop = self._device_loop(device_loop)
        logger.info("model %s on %s", m.name, self.backend.describe())

    def _device_loop(self, wanted: bool | None) -> bool:
        able = getattr(self.backend, "device_loop", False) and self.loop_order == "step_major"
        learned = self.sampler_options.sampler == "ddpm" and self.scheduler_config.variance_type == "learned_range"
        able = able and not learned
        if wanted is None:
            return bool(able and self.backend.device != "cpu")
        if wanted and not able:
            self.backend.close()
            raise ValueError(
                "device_loop needs a backend that has one (onnxruntime, torch), the step-major loop and no learned "
                f"variance; got backend {self.backend.name!r}, loop {self.loop_order}"
            )
        return bool(wanted)

    def _retire_after(self, value: int | None, defaults: Mapping[str, Any]) -> int:
        if value is None:
            value = int(defaults.get("retire_after", 0))
        if self.loop_order == "window_major":
            return 0  # window-major runs every chain to the end
        return int(value)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def settings(self) -> dict[str, Any]:
        m = self.package.manifest
        return {
            "model": {"name": m.name, "version": m.version, "path": str(self.package.root)},
            **self.backend.describe(),
            "loop_order": self.loop_order,
            "device_loop": self.device_loop,
            "sampler": vars(self.sampler_options).copy(),
            "window": {
                "patch_size": list(self.window_options.patch_size),
                "overlap": self.window_options.overlap,
                "batch_size": self.window_options.batch_size,
                "skip_empty": self.skip_empty_windows,
                "retire_after": self.window_options.retire_after,
                "retire_level": self.window_options.retire_level,
            },
            "postprocess": vars(self.post_options).copy(),
        }

    def _candidate(self, pet_model_grid: np.ndarray) -> np.ndarray | None:
        rule = self.package.manifest.defaults.get("candidate")
        if not self.skip_empty_windows or not rule:
            return None
        if rule.get("modality") != "PT":
            raise ValueError(f"candidate rule must use modality PT, got {rule}")
        return pet_model_grid >= np.float32(rule["min_value"])

    def predict(
        self,
        ct: Volume | str | Path,
        pet: Volume | str | Path,
        *,
        seed: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> SegmentationResult:
        """Segment one case.

        Args:
            ct: CT in HU (Volume or image file).
            pet: PET in SUVbw on its own grid (Volume or image file).
            seed: this case's noise seed (None: the Segmenter's).
            progress: called with the number of finished engine calls after each call.

        Raises:
            ValueError, FileNotFoundError: unreadable inputs or inputs that do not overlap.
        """
        timings: dict[str, float] = {}
        tick = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal tick
            now = time.perf_counter()
            timings[stage] = timings.get(stage, 0.0) + now - tick
            tick = now

        ct_v, pet_v = _as_volume(ct, "ct"), _as_volume(pet, "pet")
        lap("read")
        m = self.package.manifest
        grid = model_grid_for(ct_v, m.spacing_mm)
        sources = {"CT": ct_v, "PT": pet_v}
        norms = m.normalisation
        raw = {c: resample_to(sources[c], grid, "linear", default=norms[c].low).array for c in m.modalities}
        lap("resample")
        if "PT" in raw and float(raw["PT"].max(initial=0.0)) <= 0.0:
            raise ValueError("the PET holds no uptake on the CT's field of view (do PET and CT overlap in space?)")
        box = body_box(raw["CT"]) if "CT" in raw else tuple(slice(0, n) for n in grid.shape)
        candidate = self._candidate(raw["PT"][box]) if "PT" in raw else None
        shape = tuple(b.stop - b.start for b in box)
        image = np.empty((len(m.modalities), *shape), dtype=np.float32)
        for c, code in enumerate(m.modalities):
            normalise(raw[code][box], norms[code], out=image[c])
        del raw
        lap("normalise")

        options = self.sampler_options
        if seed is not None:
            options = SamplerOptions(**{**vars(options), "seed": int(seed)})
        calls = 0

        def run(x: np.ndarray, t: np.ndarray) -> np.ndarray:
            nonlocal calls
            y = self.backend.run(x, t)
            calls += 1
            if progress is not None:
                progress(calls)
            return y

        if self.device_loop:
            s = sample_step_major_on_device(
                image,
                self.backend,
                self.scheduler_config,
                options,
                self.window_options,
                candidate=candidate,
                on_call=progress,
            )
        else:
            s = LOOP_ORDERS[self.loop_order](
                image, run, self.scheduler_config, options, self.window_options, candidate=candidate
            )
        del image
        lap("sample")

        def back(cropped: np.ndarray) -> Volume:
            full = np.zeros(grid.shape, dtype=np.float32)  # outside the body box: background, certain
            full[box] = cropped
            return resample_to(Volume(full, grid.spacing, grid.origin, grid.direction), _grid(ct_v), "linear")

        probability = back(s.mean)
        uncertainty = back(s.std)
        entropy = back(s.entropy)
        pet_on_ct = resample_to(pet_v, _grid(ct_v), "linear", default=0.0)
        post = postprocess(probability, pet_on_ct, self.post_options)
        lap("postprocess")
        settings = self.settings()
        settings["sampler"]["seed"] = options.seed
        return SegmentationResult(
            mask=post.mask,
            labels=post.labels,
            probability=probability,
            uncertainty=uncertainty,
            entropy=entropy,
            lesions=post.lesions,
            settings=settings,
            timings=timings,
            windows=s.windows,
            windows_skipped=s.windows_skipped,
            retired=s.retired,
            engine_calls=s.engine_calls,
            patch_forwards=s.patch_forwards,
        )


BODY_HU = -500.0
BODY_MARGIN = 4


def body_box(ct_hu: np.ndarray, level: float = BODY_HU, margin: int = BODY_MARGIN) -> tuple[slice, slice, slice]:
    """Bounding box (with a margin, in voxels) of the tissue above ``level`` HU: the air around the patient is
    background by definition, so sampling it only costs time. The whole grid if nothing is above the level."""
    inside = ct_hu > level
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(inside.any(axis=other))
        n = ct_hu.shape[axis]
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, n)) if hit.size else slice(0, n))
    return tuple(box)  # type: ignore[return-value]


def _grid(volume: Volume):
    from .kernels import GridSpec

    return GridSpec.of(volume)


def describe_timings(timings: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
