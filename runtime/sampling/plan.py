"""What both loop orders of the sampler share: the validated plan of a case, the engine counter, retirement, results.

The denoiser is any callable ``run(x, t) -> y`` (the Backend interface): ``x`` float32 ``[B, C_img + 1, *patch]``
(image channels and the noisy mask in ``channel_order``), ``t`` float32 ``[B]`` holding the original training
timestep, ``y`` ``[B, output_channels, *patch]``. The mask lives in [−1, 1] during diffusion (x0 = 2·mask − 1); a
sample's foreground probability is the model's activation of ``x_final`` (:func:`probability_of`: ``affine``
``clip((x_final + 1)/2, 0, 1)``, or ``sigmoid``), where ``x_final`` is the chain's last ``x_prev`` (equal to the last
predicted x0 when ᾱ_prev = 1 at the end).

Random draws, all from the one ``np.random.Generator`` of the case (``default_rng(options.seed)`` unless given), in
this order, so that a PyTorch reference loop can take the same numbers:

1. ``x_T = rng.standard_normal((K, *volume), dtype=np.float32)``: the initial noise of all K samples;
2. step-major: at each step (in order) where :meth:`Scheduler.needs_noise` is true,
   ``z = rng.standard_normal((K, *volume), dtype=np.float32)``;
3. window-major instead: if any step needs noise, ``seeds = rng.integers(0, 2**63, size=num_windows, dtype=np.int64)``
   (every window of the tiling, skipped ones included); window ``w`` then draws
   ``np.random.default_rng(seeds[w]).standard_normal((K, *patch), dtype=np.float32)`` at each such step, so the
   result does not depend on the batch size.

A model of T > 1 targets (``SamplerOptions.targets``) takes T noisy channels (in place of the one, in the same
channel order) and returns T predictions (channels 0 … T−1); x_t then holds K·T rows, sample-major, and every
draw above is of ``(K·T, …)``, the same numbers as ``(K, T, …)``.

Windows without a candidate voxel are not run. In step-major they predict "background": the output consistent with
x0 = −1 at the current (x_t, t) (and 0 for a learned-variance channel); in window-major their stitched sample is −1.
Uncertainty: ``std`` is the population standard deviation of the K probabilities; ``entropy`` is the binary entropy
of the mean probability in bits, −p̄·log2 p̄ − (1 − p̄)·log2(1 − p̄) (0 … 1).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..diffusion_schedule import SamplerOptions, SchedulerConfig
from ..diffusion_steps import thread_map
from ..scheduler import Scheduler
from ..sliding_window import SlidingWindow, WindowOptions
from .conditioning import ConditionCache, Conditioner

__all__ = ["EngineCounter", "Retirement", "SampleResult", "SamplingPlan", "binary_entropy", "probability_of"]

logger = logging.getLogger("diffseg")

Denoiser = Callable[..., np.ndarray]  # run(x, t) -> y; a conditioned model's run(x, t, features) -> y


@dataclass(frozen=True)
class SampleResult:
    """What the sampling loops return.

    Attributes:
        probabilities: per-sample foreground probability ``[K, *volume]``, float32; ``[K, T, *volume]`` for a model
            of T > 1 targets (``SamplerOptions.targets``).
        mean: mean probability over samples ``[*volume]`` (``[T, *volume]`` for T > 1 targets).
        std: population standard deviation over samples (same shape).
        entropy: binary entropy (bits) of the mean probability, per target (same shape).
        timesteps: the ``[N, 2]`` (t, t_prev) pairs that were run.
        windows: windows in the tiling.
        windows_skipped: windows not run (no candidate voxel).
        retired: (window, sample) tasks retired early as background (``WindowOptions.retire_after``).
        engine_calls: calls of the denoiser.
        patch_forwards: patches run through the denoiser (the sum of the calls' batch sizes).
        engine_seconds: wall time inside the denoiser.
        engine_log: one row per engine call, ``[calls, 4]`` float64: start and end (``time.perf_counter``), batch
            size, timestep.
        total_seconds: wall time of the whole loop (engine included).
        loop_order: ``step_major`` or ``window_major``.
        options: sampler options used.
        window_options: window options used.
        condition_calls: calls of the model's condition graph (0 without one).
        condition_forwards: windows run through it: the windows run, with the cache; rows × engine calls without.
        condition_seconds: wall time inside it.
    """

    probabilities: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    entropy: np.ndarray
    timesteps: np.ndarray
    windows: int
    windows_skipped: int
    retired: int
    engine_calls: int
    patch_forwards: int
    engine_seconds: float
    engine_log: np.ndarray = field(repr=False)
    total_seconds: float
    loop_order: str
    options: SamplerOptions = field(repr=False)
    window_options: WindowOptions = field(repr=False)
    condition_calls: int = 0
    condition_forwards: int = 0
    condition_seconds: float = 0.0

    @property
    def overhead_fraction(self) -> float:
        """Share of the loop's wall time spent outside the denoiser."""
        return 1.0 - self.engine_seconds / self.total_seconds if self.total_seconds > 0 else 0.0


def probability_of(x: np.ndarray, activation: str) -> np.ndarray:
    """A sample's final x as a foreground probability, in place (float32): ``affine`` clip((x + 1)/2, 0, 1), the mask
    trained in [−1, 1]; ``sigmoid`` 1/(1 + e^−x), as Diff-UNet reads its x0; ``softmax`` over the targets, axis 1 of
    ``x`` [K, T, ...] (shifted by its maximum, so that no exponential overflows)."""
    if activation == "softmax":
        x -= x.max(axis=1, keepdims=True)
        np.exp(x, out=x)
        x /= x.sum(axis=1, keepdims=True)
        return x
    if activation == "sigmoid":
        np.clip(x, -80.0, 80.0, out=x)  # e^80 fits float32; beyond, the probability is 0 or 1 to float32 precision
        np.negative(x, out=x)
        np.exp(x, out=x)
        x += 1.0
        np.reciprocal(x, out=x)
        return x
    x += 1.0
    x *= 0.5
    np.clip(x, 0.0, 1.0, out=x)
    return x


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Binary entropy in bits (float32): 0 at p ∈ {0, 1}, 1 at p = 0.5."""
    p = np.asarray(p, np.float32)
    h = np.zeros_like(p)
    q = np.empty_like(p)
    inner = (p > 0) & (p < 1)
    # −p·log2 p − (1 − p)·log2(1 − p), computed only where both logs are finite (whole-array ufuncs, no gathers)
    np.log2(p, out=q, where=inner)
    np.multiply(p, q, out=h, where=inner)
    np.subtract(1.0, p, out=q)
    np.log2(q, out=q, where=inner)
    q *= 1.0 - p
    np.add(h, q, out=h, where=inner)
    np.negative(h, out=h, where=inner)
    return h


class Retirement:
    """The retirement rule of the step-major loops (``WindowOptions.retire_after``), shared by the host and device
    loops: a task (window, sample) retires once its peak predicted x0 has been at most the background level
    (2·retire_level − 1) for ``retire_after`` consecutive watched steps."""

    def __init__(self, tasks: int, options: WindowOptions, steps: int) -> None:
        self.streak = np.zeros(tasks, np.int32)
        self.patience = options.retire_after
        self.level = np.float32(2.0 * options.retire_level - 1.0)
        self.steps = steps

    def watching(self, step: int) -> bool:
        """Worth watching only while a later step could skip the engine for the task."""
        return self.patience > 0 and step < self.steps - 1

    def observe(self, task: int, peak: float) -> None:
        self.streak[task] = self.streak[task] + 1 if peak <= self.level else 0

    def split(self, live: list[int]) -> tuple[list[int], list[int]]:
        """(tasks that keep running, tasks that retire now), each in ``live`` 's order."""
        due = self.streak[live] >= self.patience
        return [t for t, d in zip(live, due, strict=True) if not d], [t for t, d in zip(live, due, strict=True) if d]


class EngineCounter:
    """Calls the denoiser and keeps the figures of every call: count, patch-forwards, seconds, and a log of
    (start, end, batch, t). The loops time the engine here, never by replacing a backend's methods."""

    def __init__(self, out_channels: int, patch: tuple[int, ...], on_call: Callable[[int], None] | None) -> None:
        self.out_channels, self.patch, self.on_call = out_channels, patch, on_call
        self.calls, self.forwards, self.seconds = 0, 0, 0.0
        self.log: list[tuple[float, float, int, float]] = []

    def __call__(self, engine: Callable[[object, int], object], rows: object, batch: int, t: int) -> object:
        """``engine(rows, t)`` for ``batch`` patches, timed and counted."""
        start = time.perf_counter()
        y = engine(rows, t)
        end = time.perf_counter()
        self.seconds += end - start
        self.calls += 1
        self.forwards += batch
        self.log.append((start, end, batch, float(t)))
        if self.on_call is not None:
            self.on_call(self.calls)
        return y

    def host_run(self, run: Denoiser) -> Callable[..., np.ndarray]:
        """A numpy denoiser as an engine of (rows, t, features), with its output shape checked."""

        def engine(x: np.ndarray, t: int, features: tuple[np.ndarray, ...] = ()) -> np.ndarray:
            t_rows = np.full(x.shape[0], t, np.float32)
            y = np.asarray(run(x, t_rows, features) if features else run(x, t_rows))
            want = (x.shape[0], self.out_channels, *self.patch)
            if y.shape != want:
                raise ValueError(f"denoiser returned shape {y.shape}, expected {want}")
            return y

        return engine

    def as_array(self) -> np.ndarray:
        return np.array(self.log, np.float64).reshape(-1, 4)


class SamplingPlan:
    """What both loop orders share: validated inputs, tiling, scheduler, channel layout, the case's generator.

    Args:
        image: ``[C_img, *volume]`` model-grid image channels, float.
        config: the trained diffusion process and output-channel layout.
        options: sampler options; None → defaults.
        window_options: tiling and batch size; None → defaults (or ``window.options``).
        candidate: optional boolean ``[*volume]``; windows without a candidate voxel are not run.
        window: a cached :class:`SlidingWindow` for this volume shape.
        rng: the case's generator; None → ``np.random.default_rng(options.seed)``.
        on_call: called with the number of finished engine calls after each call.
        condition: the model's condition graph ``condition(images) → features`` (None: the model has none); its
            features come from a :class:`~.conditioning.ConditionCache` (``WindowOptions.cache_conditioning``).

    Raises:
        ValueError: on mismatched shapes or options.
    """

    def __init__(
        self,
        image: np.ndarray,
        config: SchedulerConfig,
        options: SamplerOptions | None,
        window_options: WindowOptions | None,
        candidate: np.ndarray | None,
        window: SlidingWindow | None,
        rng: np.random.Generator | None,
        on_call: Callable[[int], None] | None = None,
        condition: Conditioner | None = None,
    ) -> None:
        self.start = time.perf_counter()
        self.options = options or SamplerOptions()
        if window is not None and window_options is not None and window.options != window_options:
            raise ValueError("window was built with other WindowOptions than window_options")
        self.window_options = window_options or (window.options if window is not None else WindowOptions())
        patch = self.window_options.patch_size
        image = np.asarray(image)
        if image.ndim != len(patch) + 1 or image.shape[0] < 1:
            raise ValueError(f"image must be [C_img, *spatial] with {len(patch)} spatial axes, got shape {image.shape}")
        self.spatial = image.shape[1:]
        self.sw = window or SlidingWindow(self.spatial, self.window_options)
        if self.sw.image_shape != self.spatial:
            raise ValueError(f"window was built for shape {self.sw.image_shape}, image has {self.spatial}")
        self.image = self.sw.pad(image.astype(np.float32, copy=False))
        self.active = self.sw.active(candidate)
        self.ids = np.flatnonzero(self.active)
        self.scheduler = Scheduler(config, self.options)
        self.pairs = self.scheduler.pairs()
        self.rng = rng if rng is not None else np.random.default_rng(self.options.seed)
        self.k = self.options.num_samples
        self.targets = t = self.options.targets
        c_img = image.shape[0]
        self.in_channels = c_img + t
        image_first = self.options.channel_order == "image_first"
        self.noisy = c_img if image_first else 0  # the first of the T noisy channels
        self.noisy_ch = slice(self.noisy, self.noisy + t)
        self.img_ch = slice(0, c_img) if image_first else slice(t, c_img + t)
        self.pred = config.prediction_channel
        learned = self.options.sampler == "ddpm" and config.variance_type == "learned_range"
        self.var = config.variance_channel if learned else None
        if t > 1 and (config.output_channels != 1 or self.pred != 0):
            raise ValueError(
                f"a model of {t} targets predicts them in output channels 0-{t - 1} (output_channels 1 per target, "
                f"no learned variance); got output_channels {config.output_channels}, prediction_channel {self.pred}"
            )
        self.config = config
        self.engine = EngineCounter(config.output_channels * t, patch, on_call)
        self.retired = 0
        wopt = self.window_options
        self.conditioning = None
        if condition is not None:
            batch = max(1, wopt.batch_size // self.k)  # windows per call: about an engine call's patches
            self.conditioning = ConditionCache(condition, self.image_window, batch, wopt.cache_conditioning)

    @property
    def rows(self) -> int:
        """Rows of x_t: K samples × T targets, sample-major (row ``i·T + c`` is target c of sample i)."""
        return self.k * self.targets

    def initial_noise(self) -> np.ndarray:
        """Draw 1: x_T for all samples (and targets) on the volume, placed in the padded grid (margin = pad_value)."""
        noise = self.rng.standard_normal((self.rows, *self.spatial), dtype=np.float32)
        if not self.sw.needs_padding:
            return noise
        x = np.full((self.rows, *self.sw.padded_shape), self.window_options.pad_value, np.float32)
        x[(slice(None), *self.sw.interior)] = noise
        return x

    def noise_buffer(self) -> np.ndarray | None:
        """The padded ``[K·T, *padded]`` buffer that draw 2 fills (margin 0), or None when no step adds noise."""
        if not any(self.scheduler.needs_noise(t, t_prev) for t, t_prev in self.pairs.tolist()):
            return None
        return np.zeros((self.rows, *self.sw.padded_shape), np.float32)

    def draw_noise(self, buffer: np.ndarray) -> np.ndarray:
        """Draw 2 of a stochastic step into ``buffer`` (from :meth:`noise_buffer`), in the documented order."""
        if self.sw.needs_padding:
            buffer[(slice(None), *self.sw.interior)] = self.rng.standard_normal((self.rows, *self.spatial), np.float32)
        else:
            self.rng.standard_normal(dtype=np.float32, out=buffer)
        return buffer

    def image_window(self, w: int) -> np.ndarray:
        return self.image[(slice(None), *self.sw.slices[w])]

    def _condition_figures(self) -> dict[str, float | int]:
        c = self.conditioning
        return (
            {}
            if c is None
            else {"condition_calls": c.calls, "condition_forwards": c.forwards, "condition_seconds": c.seconds}
        )

    def result(self, x_final: np.ndarray, loop_order: str) -> SampleResult:
        t = self.targets
        cropped = np.ascontiguousarray(self.sw.crop(x_final))  # [K·T, *volume]
        probabilities = cropped if t == 1 else cropped.reshape(self.k, t, *self.spatial)
        mean = np.empty(self.spatial if t == 1 else (t, *self.spatial), np.float32)
        std = np.empty_like(mean)
        entropy = np.empty_like(mean)
        activation = self.options.activation

        def summarise(rows: slice) -> None:
            """Probabilities, mean, population std and entropy of a slab of first-axis rows (the voxels are
            independent, so slabs go to threads with results that do not depend on the thread count)."""
            region = (slice(None), rows) if t == 1 else (slice(None), slice(None), rows)
            p = probability_of(probabilities[region], activation)
            m = mean[region[1:]]
            np.mean(p, axis=0, dtype=np.float32, out=m)
            var = std[region[1:]]  # population variance, one sample at a time (no [K, *slab] temporaries)
            var.fill(0.0)
            diff = np.empty_like(m)
            for sample in p:
                np.subtract(sample, m, out=diff)
                diff *= diff
                var += diff
            var *= 1.0 / len(p)
            np.sqrt(var, out=var)
            entropy[region[1:]] = binary_entropy(m)

        n = self.spatial[0]
        parts = max(1, min(self.scheduler.threads, n))
        thread_map(summarise, [slice(n * i // parts, n * (i + 1) // parts) for i in range(parts)], parts)
        result = SampleResult(
            probabilities=probabilities,
            mean=mean,
            std=std,
            entropy=entropy,
            timesteps=self.pairs,
            windows=self.sw.num_windows,
            windows_skipped=int(self.sw.num_windows - self.ids.size),
            retired=self.retired,
            engine_calls=self.engine.calls,
            patch_forwards=self.engine.forwards,
            engine_seconds=self.engine.seconds,
            engine_log=self.engine.as_array(),
            total_seconds=time.perf_counter() - self.start,
            loop_order=loop_order,
            options=self.options,
            window_options=self.window_options,
            **self._condition_figures(),
        )
        logger.debug(
            "%s: %d windows (%d skipped), %d tasks retired, %d engine calls, %.3f s (%.1f%% outside the engine)",
            loop_order,
            result.windows,
            result.windows_skipped,
            result.retired,
            result.engine_calls,
            result.total_seconds,
            100 * result.overhead_fraction,
        )
        return result
