"""``Segmenter``: a model package loaded once on a backend, with the options of every case it segments.

It resolves the options (the manifest's defaults, then the caller's overrides, each checked) and loads the engine;
:meth:`Segmenter.predict` runs one case through :func:`diffseg.runtime.pipeline.segment_volumes`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from .backends import Backend, get_backend
from .diffusion_schedule import SamplerOptions, SchedulerConfig
from .input_checks import InputChecks
from .manifest import Manifest, ModelPackage, load_package
from .postprocess import PostprocessOptions
from .preprocess import CandidateRule
from .result import LOOP_ORDER_NAMES, SegmentationResult, SegmentOptions
from .sliding_window import WindowOptions
from .volume import Volume

__all__ = ["SegmentationResult", "Segmenter", "resolve_options"]

logger = logging.getLogger("diffseg")


def _override(value: Any, default: Any) -> Any:
    return default if value is None else value


def resolve_options(
    manifest: Manifest,
    loop_order: str,
    overrides: Mapping[str, Any],
    skip_empty_windows: bool,
    retire_after: int | None,
    cache_conditioning: bool = True,
) -> SegmentOptions:
    """The options of a run: the manifest's defaults, then the caller's overrides (None: keep the default).

    Args:
        manifest: the model package's manifest.
        loop_order: ``step-major`` or ``window-major`` (``_`` spellings too).
        overrides: ``steps``, ``samples``, ``eta``, ``seed``, ``overlap``, ``threshold``, ``min_lesion_ml``,
            ``batch_size`` (see :class:`Segmenter`).
        skip_empty_windows: apply the manifest's candidate rule.
        retire_after: see :class:`Segmenter`.
        cache_conditioning: see :class:`Segmenter`.

    Raises:
        ValueError: a bad value or a combination that would be ignored (named, with what is allowed).
    """
    d, o = manifest.defaults, overrides
    order = str(loop_order).replace("-", "_")
    if order not in LOOP_ORDER_NAMES:
        raise ValueError(f"loop_order must be step-major or window-major, got {loop_order!r}")
    sampler = SamplerOptions(
        sampler=d["sampler"],
        steps=_override(o.get("steps"), d["steps"]),
        eta=float(_override(o.get("eta"), d.get("eta", 0.0))),
        timestep_spacing=d.get("timestep_spacing", "leading"),
        eps_convention=d.get("eps_convention", "raw"),
        num_samples=_override(o.get("samples"), d["samples"]),
        channel_order=manifest.channel_order,
        activation=manifest.activation,
        targets=len(manifest.targets),
        seed=_override(o.get("seed"), d.get("seed", 0)),
    )
    batch_size = o.get("batch_size")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1 (None: 2 x samples), got {batch_size!r}")
    if not isinstance(cache_conditioning, bool):
        raise ValueError(f"cache_conditioning must be True or False, got {cache_conditioning!r}")
    if retire_after is None:  # the manifest's retirement is a step-major rule; window-major runs every chain
        retire_after = int(d.get("retire_after", 0)) if order == "step_major" else 0
    window = WindowOptions(
        patch_size=tuple(manifest.patch_size),
        overlap=float(_override(o.get("overlap"), d["overlap"])),
        batch_size=batch_size or 2 * sampler.num_samples,
        mode=manifest.blending,
        retire_after=retire_after,
        cache_conditioning=cache_conditioning,
    )
    post = PostprocessOptions(
        threshold=float(_override(o.get("threshold"), d["threshold"])),
        min_lesion_ml=float(_override(o.get("min_lesion_ml"), d["min_lesion_ml"])),
    )
    candidate = CandidateRule.from_manifest(d.get("candidate"), manifest.modalities) if skip_empty_windows else None
    return SegmentOptions(sampler, window, post, order, candidate)


class Segmenter:
    """A model loaded once on a backend, reused for every case.

    Args:
        model: a model package (folder, .zip) or the name of a shipped one (``default``).
        backend: ``auto`` (the fastest available, logged and recorded) or a backend name.
        precision: ``fp32``, ``bf16`` or ``fp16``; None: the backend's (or auto's) choice.
        steps, samples, eta, overlap, threshold, min_lesion_ml: override the manifest's defaults.
        seed: the case seed of the noise (same seed, same mask on every backend up to engine precision).
        loop_order: ``step-major`` (default) or ``window-major`` (``_`` spellings too).
        batch_size: windows × samples per engine call, >= 1 (None: 2 × samples).
        skip_empty_windows: do not run windows without candidate tissue (the manifest's candidate rule).
        retire_after: step-major only: stop running a (window, sample) once its predicted mask has been empty for
            this many consecutive steps (0 = off, exact; None = the manifest's ``retire_after`` for step-major, 0 for
            window-major). A value > 0 with window-major is an error. See ``WindowOptions.retire_after``.
        threads: CPU threads for the engine, an int >= 1 (None: all cores).
        device_loop: step-major only: keep x_t and the accumulators on the engine's device across steps (the
            backend's device ops; onnxruntime and torch). None: on where the engine runs on a GPU, off on the CPU
            (where the host loop is as fast). True on a backend or loop that cannot is an error.
        cache_conditioning: a model with a condition graph: compute each window's features once and reuse them at
            every step and for every sample (False: again for every row of every engine call, the naive loop, for
            measuring; the result is the same). See ``WindowOptions.cache_conditioning``.

    Raises:
        ValueError: a bad option (named, with what is allowed).
        BackendUnavailableError: the backend or precision cannot run here.
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
        cache_conditioning: bool = True,
    ) -> None:
        self.package: ModelPackage = load_package(model)
        m = self.package.manifest
        self.scheduler_config = SchedulerConfig.from_dict(m.diffusion)
        overrides = {"steps": steps, "samples": samples, "eta": eta, "seed": seed, "overlap": overlap}
        overrides.update(threshold=threshold, min_lesion_ml=min_lesion_ml, batch_size=batch_size)
        options = resolve_options(m, loop_order, overrides, skip_empty_windows, retire_after, cache_conditioning)
        order = options.loop_order
        t0 = time.perf_counter()
        self.backend: Backend = get_backend(backend, self.package, precision, threads)
        self.load_seconds = time.perf_counter() - t0
        try:
            self.options = replace(options, device_loop=self._device_loop(device_loop, order))
        except ValueError:
            self.backend.close()
            raise
        self.closed = False
        logger.info("model %s on %s", m.name, self.backend.describe())

    def _device_loop(self, wanted: bool | None, order: str) -> bool:
        c, sampler = self.scheduler_config, self.package.manifest.defaults["sampler"]
        learned = sampler == "ddpm" and c.variance_type == "learned_range"
        able = self.backend.has_device_ops and not learned and order == "step_major"
        if wanted is None:
            return able and self.backend.device != "cpu"
        if wanted and not able:
            raise ValueError(
                "device_loop needs a backend with device ops (onnxruntime, torch), the step-major loop and no "
                f"learned variance; got backend {self.backend.name!r}, loop {order}"
            )
        return bool(wanted)

    @property
    def device_loop(self) -> bool:
        return self.options.device_loop

    def close(self) -> None:
        """Release the backend's engine; a second call does nothing. ``predict`` and ``backend.run`` then raise a
        ``RuntimeError``."""
        self.backend.close()
        self.closed = True

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def settings(self, options: SegmentOptions | None = None) -> dict[str, Any]:
        """Model, backend and options (``options`` or the segmenter's), JSON-ready."""
        m = self.package.manifest
        return {
            "model": {"name": m.name, "version": m.version, "path": str(self.package.root)},
            **self.backend.describe(),
            **(options or self.options).as_dict(),
        }

    def predict(
        self,
        ct: Volume | str | Path | None = None,
        pet: Volume | str | Path | None = None,
        *,
        images: Mapping[str, Volume | str | Path] | None = None,
        seed: int | None = None,
        progress: Callable[[int], None] | None = None,
        checks: InputChecks | None = None,
    ) -> SegmentationResult:
        """Segment one case (:func:`diffseg.runtime.pipeline.segment_volumes`).

        Args:
            ct: CT in HU (Volume or image file); None for a model without a CT input.
            pet: PET in SUVbw on its own grid (Volume or image file); None for a model without a PET input.
            images: the model's other inputs by modality code (``{"MR": "t1.nii.gz"}``).
            seed: this case's noise seed (None: the Segmenter's).
            progress: called with the number of finished engine calls after each call.
            checks: the overrides of the input checks (None: none); each use is in ``result.overrides``.

        Raises:
            ValueError, FileNotFoundError: unreadable or implausible inputs, an input the model needs missing (the
                message names it) or one it does not take, or inputs that do not overlap.
            RuntimeError: the segmenter was closed.
        """
        from .pipeline import segment_volumes

        if self.closed:
            raise RuntimeError("this Segmenter was closed; create a new one to segment more cases")
        return segment_volumes(self, ct, pet, images=images, seed=seed, progress=progress, checks=checks)


def describe_timings(timings: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
