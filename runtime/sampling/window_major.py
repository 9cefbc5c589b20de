"""The window-major loop: the whole reverse chain per window, then the final samples stitched (Diff-UNet's order).

Kept for parity with the research code that runs this order (Diff-UNet, the Gong lab code); the default is the
step-major loop (:mod:`diffseg.runtime.sampling.step_major`), which is seamless and lets windows retire.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..diffusion_schedule import SamplerOptions, SchedulerConfig
from ..sliding_window import SlidingWindow, WindowOptions
from .conditioning import Conditioner
from .plan import Denoiser, SampleResult, SamplingPlan

__all__ = ["sample_window_major"]


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
    on_call: Callable[[int], None] | None = None,
    condition: Conditioner | None = None,
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
        on_call: called with the number of finished engine calls after each call.
        condition: a conditioned model's ``condition(images) → features`` (each window's once, see
            :mod:`.conditioning`).

    Returns:
        Per-sample probabilities, mean, std, entropy and counts.

    Raises:
        ValueError: on mismatched shapes or a denoiser output of the wrong shape.
    """
    s = SamplingPlan(image, config, options, window_options, candidate, window, rng, on_call, condition)
    cond = s.conditioning
    engine = s.engine.host_run(run)
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
    targets = s.targets
    for first in range(0, s.ids.size, per_group):
        group = [int(w) for w in s.ids[first : first + per_group]]
        n = len(group) * k
        buf = np.empty((n, s.in_channels, *patch), np.float32)
        x = np.empty((n, targets, *patch), np.float32)  # the window's chains: K samples × T targets each
        for g, w in enumerate(group):
            buf[g * k : (g + 1) * k, s.img_ch] = s.image_window(w)[None]
            x[g * k : (g + 1) * k] = x_init[(slice(None), *sw.slices[w])].reshape(k, targets, *patch)
        model_out = np.empty_like(x)
        model_var = np.empty_like(x) if s.var is not None else None
        noise = np.empty_like(x)
        generators = [np.random.default_rng(int(seeds[w])) for w in group] if seeds is not None else []
        row_windows = [w for w in group for _ in range(k)]
        if cond is not None:
            cond.prepare(group)
        for (t, t_prev), noisy in zip(pairs, noisy_steps, strict=True):
            buf[:, s.noisy_ch] = x
            for c0 in range(0, n, wopt.batch_size):
                c1 = min(c0 + wopt.batch_size, n)
                feats = () if cond is None else cond.rows(row_windows[c0:c1])
                y = s.engine(lambda rows, t, f=feats: engine(rows, t, f), buf[c0:c1], c1 - c0, t)
                model_out[c0:c1] = y[:, s.pred : s.pred + targets]
                if model_var is not None:
                    model_var[c0:c1] = y[:, s.var : s.var + 1]
            if noisy:  # draw 3: each window's own generator
                for g, generator in enumerate(generators):
                    generator.standard_normal(dtype=np.float32, out=noise[g * k : (g + 1) * k])
            z = noise if noisy else None
            s.scheduler.step(model_out, x, t, t_prev, noise=z, variance_output=model_var, out=(x, None))
        for g, w in enumerate(group):
            target = acc[(slice(None), *sw.slices[w])]
            target += x[g * k : (g + 1) * k].reshape(k * targets, *patch) * sw.weight
    acc *= sw.inv_weight_sum
    return s.result(acc, "window_major")
