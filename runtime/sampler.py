"""Reverse-diffusion sampling of a segmentation mask over a whole volume, in two loop orders.

The denoiser is any callable ``run(x, t) -> y`` (the Backend interface): ``x`` float32 ``[B, C_img + 1, *patch]``
(image channels and the noisy mask in ``channel_order``), ``t`` float32 ``[B]`` holding the original training
timestep, ``y`` ``[B, output_channels, *patch]``. The mask lives in [−1, 1] during diffusion (x0 = 2·mask − 1); a
sample's foreground probability is ``clip((x_final + 1)/2, 0, 1)``, where ``x_final`` is the chain's last ``x_prev``
(equal to the last predicted x0 when ᾱ_prev = 1 at the end).

- :func:`sample_step_major` (default): a global x_t per sample; each step is one sliding-window pass in which windows
  × samples travel together in the batch dimension, the prediction channel is blended with the Gaussian map, then one
  scheduler step updates the global x_t. Seamless; the DDIM update is linear in (x_t, ε), so blending ε is exact when
  nothing is clipped.
- :func:`sample_window_major`: the whole chain per window (as Diff-UNet), final samples stitched with the map.

Random draws, all from the one ``np.random.Generator`` of the case (``default_rng(options.seed)`` unless given), in
this order, so that a PyTorch reference loop can take the same numbers:

1. ``x_T = rng.standard_normal((K, *volume), dtype=np.float32)``: the initial noise of all K samples;
2. step-major: at each step (in order) where :meth:`Scheduler.needs_noise` is true,
   ``z = rng.standard_normal((K, *volume), dtype=np.float32)``;
3. window-major instead: if any step needs noise, ``seeds = rng.integers(0, 2**63, size=num_windows, dtype=np.int64)``
   (every window of the tiling, skipped ones included); window ``w`` then draws
   ``np.random.default_rng(seeds[w]).standard_normal((K, *patch), dtype=np.float32)`` at each such step, so the
   result does not depend on the batch size.

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

from .diffusion_steps import thread_map
from .scheduler import SamplerOptions, Scheduler, SchedulerConfig
from .sliding_window import SlidingWindow, WindowOptions

__all__ = [
    "LOOP_ORDERS",
    "Retirement",
    "SampleResult",
    "SamplerOptions",
    "WindowOptions",
    "binary_entropy",
    "sample_step_major",
    "sample_window_major",
]

logger = logging.getLogger("diffseg")

Denoiser = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SampleResult:
    """What the sampling loops return.

    Attributes:
        probabilities: per-sample foreground probability ``[K, *volume]``, float32.
        mean: mean probability over samples ``[*volume]``.
        std: population standard deviation over samples.
        entropy: binary entropy (bits) of the mean probability.
        timesteps: the ``[N, 2]`` (t, t_prev) pairs that were run.
        windows: windows in the tiling.
        windows_skipped: windows not run (no candidate voxel).
        retired: (window, sample) tasks retired early as background (``WindowOptions.retire_after``).
        engine_calls: calls of the denoiser.
        patch_forwards: patches run through the denoiser (the sum of the calls' batch sizes).
        engine_seconds: wall time inside the denoiser.
        total_seconds: wall time of the whole loop (engine included).
        loop_order: ``step_major`` or ``window_major``.
        options: sampler options used.
        window_options: window options used.
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
    total_seconds: float
    loop_order: str
    options: SamplerOptions = field(repr=False)
    window_options: WindowOptions = field(repr=False)

    @property
    def overhead_fraction(self) -> float:
        """Share of the loop's wall time spent outside the denoiser."""
        return 1.0 - self.engine_seconds / self.total_seconds if self.total_seconds > 0 else 0.0


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


class _Engine:
    """Calls the denoiser, checks the output shape, counts calls and seconds."""

    def __init__(self, run: Denoiser, out_channels: int, patch: tuple[int, ...]) -> None:
        self.run, self.out_channels, self.patch = run, out_channels, patch
        self.calls, self.forwards, self.seconds = 0, 0, 0.0

    def __call__(self, x: np.ndarray, t: int) -> np.ndarray:
        start = time.perf_counter()
        y = np.asarray(self.run(x, np.full(x.shape[0], t, np.float32)))
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.forwards += x.shape[0]
        if y.shape != (x.shape[0], self.out_channels, *self.patch):
            raise ValueError(
                f"denoiser returned shape {y.shape}, expected {(x.shape[0], self.out_channels, *self.patch)}"
            )
        return y


class _Setup:
    """What both loop orders share: validated inputs, tiling, scheduler, channel layout, the case's generator."""

    def __init__(self, image, run, config, options, window_options, candidate, window, rng) -> None:
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
        c_img = image.shape[0]
        self.in_channels = c_img + 1
        image_first = self.options.channel_order == "image_first"
        self.noisy = c_img if image_first else 0
        self.img_ch = slice(0, c_img) if image_first else slice(1, c_img + 1)
        self.pred = config.prediction_channel
        learned = self.options.sampler == "ddpm" and config.variance_type == "learned_range"
        self.var = config.variance_channel if learned else None
        self.engine = _Engine(run, config.output_channels, patch)
        self.retired = 0

    def initial_noise(self) -> np.ndarray:
        """Draw 1: x_T for all samples on the volume, placed in the padded grid (margin = pad_value)."""
        noise = self.rng.standard_normal((self.k, *self.spatial), dtype=np.float32)
        if not self.sw.needs_padding:
            return noise
        x = np.full((self.k, *self.sw.padded_shape), self.window_options.pad_value, np.float32)
        x[(slice(None), *self.sw.interior)] = noise
        return x

    def image_window(self, w: int) -> np.ndarray:
        return self.image[(slice(None), *self.sw.slices[w])]

    def result(self, x_final: np.ndarray, loop_order: str) -> SampleResult:
        probabilities = np.ascontiguousarray(self.sw.crop(x_final))
        mean = np.empty(self.spatial, np.float32)
        std = np.empty_like(mean)
        entropy = np.empty_like(mean)

        def summarise(rows: slice) -> None:
            """Probabilities, mean, population std and entropy of a slab of first-axis rows (the voxels are
            independent, so slabs go to threads with results that do not depend on the thread count)."""
            p = probabilities[:, rows]
            p += 1.0
            p *= 0.5
            np.clip(p, 0.0, 1.0, out=p)
            m = mean[rows]
            np.mean(p, axis=0, dtype=np.float32, out=m)
            var = std[rows]  # population variance, one sample at a time (no [K, *slab] temporaries)
            var.fill(0.0)
            diff = np.empty_like(m)
            for sample in p:
                np.subtract(sample, m, out=diff)
                diff *= diff
                var += diff
            var *= 1.0 / len(p)
            np.sqrt(var, out=var)
            entropy[rows] = binary_entropy(m)

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
            total_seconds=time.perf_counter() - self.start,
            loop_order=loop_order,
            options=self.options,
            window_options=self.window_options,
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


def sample_step_major(
    image: np.ndarray,
    run: Denoiser,
    config: SchedulerConfig,
    options: SamplerOptions | None = None,
    window_options: WindowOptions | None = None,
    *,
    candidate: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    window: SlidingWindow | None = None,
) -> SampleResult:
    """Sample K masks with a global x_t per sample and one blended sliding-window pass per step.

    Args:
        image: ``[C_img, *volume]`` model-grid image channels (e.g. normalised PET, CT), float.
        run: the denoiser ``run(x, t) -> y`` (see the module docstring).
        config: the trained diffusion process and output-channel layout.
        options: sampler, steps, η, grid, ε convention, samples, channel order, seed; None → defaults.
        window_options: tiling and batch size; None → defaults (or ``window.options``).
        candidate: optional boolean ``[*volume]``; windows without a candidate voxel are not run.
        rng: the case's generator; None → ``np.random.default_rng(options.seed)``.
        window: a cached :class:`SlidingWindow` for this volume shape.

    Returns:
        Per-sample probabilities, mean, std, entropy and counts.

    Raises:
        ValueError: on mismatched shapes or a denoiser output of the wrong shape.
    """
    s = _Setup(image, run, config, options, window_options, candidate, window, rng)
    sw, k, wopt = s.sw, s.k, s.window_options
    patch = wopt.patch_size
    x = s.initial_noise()
    tasks = [(int(w), i) for w in s.ids for i in range(k)]  # (window, sample), samples of a window side by side
    # Engine inputs: while they fit the cache, one array holds every live task's row with its image channels written
    # once; rows of retired tasks are squeezed out so that each batch stays a contiguous slice. Otherwise one batch
    # buffer is refilled for each call.
    cached = len(tasks) * s.in_channels * int(np.prod(patch)) * 4 <= wopt.input_cache_mb * 2**20
    num_rows = len(tasks) if cached else min(wopt.batch_size, max(len(tasks), 1))
    rows = np.empty((num_rows, s.in_channels, *patch), np.float32)
    threads = s.scheduler.threads
    if cached:

        def fill_image(j: int) -> None:
            rows[j, s.img_ch] = s.image_window(tasks[j][0])

        thread_map(fill_image, range(len(tasks)), threads)
    live = list(range(len(tasks)))  # task ids in row order
    retired: list[list[int]] = [[] for _ in range(k)]  # per sample: its retired windows
    retirement = Retirement(len(tasks), wopt, len(s.pairs))
    direct_x0 = config.prediction_type == "sample"
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "step-major: %r, %d tasks, inputs cached: %s, retire after %d", sw, len(tasks), cached, wopt.retire_after
        )
    acc = np.empty_like(x)  # Σ weight·prediction over windows; the step divides by Σ weight itself
    acc_var = np.empty_like(x) if s.var is not None else None
    noisy = any(s.scheduler.needs_noise(t, t_prev) for t, t_prev in s.pairs.tolist())
    noise = np.zeros_like(x) if noisy else x[:0]
    noise_view = noise[(slice(None), *sw.interior)] if sw.needs_padding and noisy else noise
    skip_weight = sw.weight_sum_of(~s.active) if s.ids.size < sw.num_windows else None
    margin = None
    if sw.needs_padding:
        margin = np.ones(sw.padded_shape, bool)
        margin[sw.interior] = False
    # Work on the global arrays is split by sample: sample i's accumulator is only ever touched by one thread at a
    # time, and each voxel is summed in the same order whatever the thread count (bit-identical results).
    products = [np.empty(patch, np.float32) for _ in range(k)]

    def add_background(i: int, w: int, t: int) -> None:
        """A window that is not run predicts "background": the output consistent with x0 = −1 at (x_t, t)."""
        region = (i, *sw.slices[w])
        s.scheduler.output_for_x0(-1.0, x[region], t, out=products[i])
        products[i] *= sw.weight
        acc[region] += products[i]

    def reset(i: int, t: int) -> None:
        if skip_weight is None:
            acc[i].fill(0.0)
        else:  # skipped windows predict background: the output consistent with x0 = -1
            s.scheduler.output_for_x0(-1.0, x[i], t, out=acc[i])
            acc[i] *= skip_weight
        for w in retired[i]:
            add_background(i, w, t)
        if acc_var is not None:
            acc_var[i].fill(0.0)

    def gather(buf: np.ndarray, j: int, task: int) -> None:
        w, i = tasks[task]
        if not cached:
            buf[j, s.img_ch] = s.image_window(w)
        buf[j, s.noisy] = x[(i, *sw.slices[w])]

    def accumulate(i: int, batch: list[int], y: np.ndarray, t: int, watch: bool) -> None:
        for j, task in enumerate(batch):
            w, sample = tasks[task]
            if sample != i:
                continue
            if watch:
                if direct_x0:  # the output is x0; clipping to [-1, 1] cannot move its max across the level
                    peak = y[j, s.pred].max()
                else:
                    peak = s.scheduler.x0_for_output(y[j, s.pred], x[(i, *sw.slices[w])], t, out=products[i]).max()
                retirement.observe(task, peak)
            for channel, target in ((s.pred, acc), (s.var, acc_var)):
                if target is not None:
                    np.multiply(y[j, channel], sw.weight, out=products[i])
                    target[(i, *sw.slices[w])] += products[i]

    for step, (t, t_prev) in enumerate(s.pairs.tolist()):
        watch = retirement.watching(step)
        thread_map(lambda i, t=t: reset(i, t), range(k), threads)
        for b in range(0, len(live), wopt.batch_size):
            batch = live[b : b + wopt.batch_size]
            buf = rows[b : b + len(batch)] if cached else rows[: len(batch)]
            thread_map(lambda job, buf=buf: gather(buf, *job), [(j, task) for j, task in enumerate(batch)], threads)
            y = s.engine(buf, t)
            samples = sorted({tasks[task][1] for task in batch})
            thread_map(lambda i, b=batch, y=y, t=t, w=watch: accumulate(i, b, y, t, w), samples, threads)
        if acc_var is not None:
            acc_var *= sw.inv_weight_sum
        z = None
        if s.scheduler.needs_noise(t, t_prev):  # draw 2
            z = noise
            if sw.needs_padding:
                noise_view[...] = s.rng.standard_normal((k, *s.spatial), dtype=np.float32)
            else:
                s.rng.standard_normal(dtype=np.float32, out=noise)
        s.scheduler.step(acc, x, t, t_prev, noise=z, variance_output=acc_var, scale=sw.inv_weight_sum, out=(x, None))
        if margin is not None:  # the padded margin of x_t stays pad_value, as MONAI pads each pass's input
            np.copyto(x, np.float32(wopt.pad_value), where=margin)
        keep, retiring = retirement.split(live) if watch else (live, [])
        if retiring:
            for task in retiring:
                retired[tasks[task][1]].append(tasks[task][0])
            if cached:  # squeeze retired rows out, in order (a row only ever moves to a lower index)
                row_of = {task: row for row, task in enumerate(live)}
                for new_row, task in enumerate(keep):
                    old_row = row_of[task]
                    if old_row != new_row:
                        rows[new_row, s.img_ch] = rows[old_row, s.img_ch]
            live = keep
    s.retired = sum(len(r) for r in retired)
    return s.result(x, "step_major")


def sample_window_major(
    image: np.ndarray,
    run: Denoiser,
    config: SchedulerConfig,
    options: SamplerOptions | None = None,
    window_options: WindowOptions | None = None,
    *,
    candidate: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    window: SlidingWindow | None = None,
) -> SampleResult:
    """Sample K masks running the whole chain per window, then stitching the final samples (Diff-UNet order).

    Windows are processed in groups of ``max(1, batch_size // K)`` windows; the K samples of a window stay together.
    Each window's chain starts from the crop of the global x_T (so overlapping windows start from the same noise) and
    then evolves on its own, padded margin included.

    Args:
        image: ``[C_img, *volume]`` model-grid image channels, float.
        run: the denoiser ``run(x, t) -> y``.
        config: the trained diffusion process and output-channel layout.
        options: sampler options; None → defaults.
        window_options: tiling and batch size; None → defaults (or ``window.options``).
        candidate: optional boolean ``[*volume]``; windows without a candidate voxel are not run (stitched as −1).
        rng: the case's generator; None → ``np.random.default_rng(options.seed)``.
        window: a cached :class:`SlidingWindow` for this volume shape.

    Returns:
        Per-sample probabilities, mean, std, entropy and counts.

    Raises:
        ValueError: on mismatched shapes or a denoiser output of the wrong shape.
    """
    s = _Setup(image, run, config, options, window_options, candidate, window, rng)
    sw, k, wopt = s.sw, s.k, s.window_options
    if wopt.retire_after:
        raise ValueError("retire_after applies to the step-major loop only; window-major runs every chain to the end")
    patch = wopt.patch_size
    x_init = s.initial_noise()
    pairs = s.pairs.tolist()
    noisy_steps = [s.scheduler.needs_noise(t, t_prev) for t, t_prev in pairs]
    seeds = s.rng.integers(0, 2**63, size=sw.num_windows, dtype=np.int64) if any(noisy_steps) else None
    acc = np.zeros_like(x_init)
    if s.ids.size < sw.num_windows:  # skipped windows stitch x = -1 (background)
        acc -= sw.weight_sum_of(~s.active)
    per_group = max(1, wopt.batch_size // k)
    for first in range(0, s.ids.size, per_group):
        group = [int(w) for w in s.ids[first : first + per_group]]
        n = len(group) * k
        buf = np.empty((n, s.in_channels, *patch), np.float32)
        x = np.empty((n, *patch), np.float32)
        for g, w in enumerate(group):
            buf[g * k : (g + 1) * k, s.img_ch] = s.image_window(w)[None]
            x[g * k : (g + 1) * k] = x_init[(slice(None), *sw.slices[w])]
        model_out = np.empty_like(x)
        model_var = np.empty_like(x) if s.var is not None else None
        noise = np.empty_like(x)
        generators = [np.random.default_rng(int(seeds[w])) for w in group] if seeds is not None else []
        for (t, t_prev), noisy in zip(pairs, noisy_steps, strict=True):
            buf[:, s.noisy] = x
            for c0 in range(0, n, wopt.batch_size):
                c1 = min(c0 + wopt.batch_size, n)
                y = s.engine(buf[c0:c1], t)
                model_out[c0:c1] = y[:, s.pred]
                if model_var is not None:
                    model_var[c0:c1] = y[:, s.var]
            if noisy:  # draw 3: each window's own generator
                for g, generator in enumerate(generators):
                    generator.standard_normal(dtype=np.float32, out=noise[g * k : (g + 1) * k])
            z = noise if noisy else None
            s.scheduler.step(model_out, x, t, t_prev, noise=z, variance_output=model_var, out=(x, None))
        for g, w in enumerate(group):
            target = acc[(slice(None), *sw.slices[w])]
            target += x[g * k : (g + 1) * k] * sw.weight
    acc *= sw.inv_weight_sum
    return s.result(acc, "window_major")


LOOP_ORDERS: dict[str, Callable[..., SampleResult]] = {
    "step_major": sample_step_major,
    "window_major": sample_window_major,
}
