"""The step-major loop: a global x_t per sample and one blended sliding-window pass per step, on any executor.

Each step is one sliding-window pass in which windows × samples travel together in the batch dimension, the
prediction channel is blended with the Gaussian map, then one scheduler step updates the global x_t. Seamless; the
DDIM update is linear in (x_t, ε), so blending ε is exact when nothing is clipped. The orchestration (tasks,
retirement, the noise draws, the coefficients of each step, the engine's figures) is written once, here; the array
work is the executor's :class:`~diffseg.runtime.sampling.device_ops.DeviceOps`: host memory by default, the engine's
device with ``device_ops``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from ..diffusion_schedule import SamplerOptions, SchedulerConfig
from ..sliding_window import SlidingWindow, WindowOptions
from .conditioning import Conditioner
from .device_ops import DeviceLayout, DeviceOps
from .host_ops import HostOps
from .plan import Denoiser, Retirement, SampleResult, SamplingPlan

__all__ = ["layout_of", "sample_step_major"]

logger = logging.getLogger("diffseg")

DeviceOpsFactory = Callable[[DeviceLayout], DeviceOps]


def layout_of(plan: SamplingPlan) -> DeviceLayout:
    """The :class:`DeviceLayout` of a case's plan: every (window, sample) task of the windows that are run."""
    sw, k, config = plan.sw, plan.k, plan.config
    tasks = np.array([(int(w), i) for w in plan.ids for i in range(k)], np.int64).reshape(-1, 2)
    starts = np.array([(i, *sw.starts[w]) for w, i in tasks.tolist()], np.int64).reshape(-1, 4)
    interior = None
    if sw.needs_padding:
        interior = np.zeros(sw.padded_shape, bool)
        interior[sw.interior] = True
    return DeviceLayout(
        samples=k,
        padded=sw.padded_shape,
        patch=plan.window_options.patch_size,
        image_channels=plan.in_channels - plan.targets,
        noisy_channel=plan.noisy,
        prediction_channel=plan.pred,
        output_channels=config.output_channels * plan.targets,
        variance_channel=plan.var,
        clip=config.clip_range if config.clip_sample else None,
        weight=sw.weight,
        inv_weight_sum=sw.inv_weight_sum,
        interior=interior,
        pad_value=float(plan.window_options.pad_value),
        tasks=tasks,
        starts=starts,
        skip_weight=sw.weight_sum_of(~plan.active) if plan.ids.size < sw.num_windows else None,
        targets=plan.targets,
    )


def sample_step_major(
    image: np.ndarray,
    run: Denoiser | None,
    config: SchedulerConfig,
    options: SamplerOptions | None = None,
    window_options: WindowOptions | None = None,
    *,
    candidate: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    window: SlidingWindow | None = None,
    device_ops: DeviceOpsFactory | None = None,
    on_call: Callable[[int], None] | None = None,
    condition: Conditioner | None = None,
) -> SampleResult:
    """Sample K masks with a global x_t per sample and one blended sliding-window pass per step.

    Args:
        image: ``[C_img, *volume]`` model-grid image channels (e.g. normalised PET, CT), float.
        run: the denoiser ``run(x, t) -> y`` on numpy arrays (see :mod:`diffseg.runtime.sampling.plan`); not used
            with ``device_ops``, whose executor calls its own engine.
        config: the trained diffusion process and output-channel layout.
        options: sampler, steps, η, grid, ε convention, samples, channel order, seed; None → defaults.
        window_options: tiling, batch size and retirement; None → defaults (or ``window.options``).
        candidate: optional boolean ``[*volume]``; windows without a candidate voxel are not run.
        rng: the case's generator; None → ``np.random.default_rng(options.seed)``.
        window: a cached :class:`SlidingWindow` for this volume shape.
        device_ops: ``backend.device_ops``: keep x_t on the engine's device (None: host memory).
        on_call: called with the number of finished engine calls after each call.
        condition: a conditioned model's ``condition(images) → features`` (host loop only; the features of each
            window are computed once, see :mod:`.conditioning`).

    Returns:
        Per-sample probabilities, mean, std, entropy, counts and the engine's figures.

    Raises:
        ValueError: on mismatched shapes, a denoiser output of the wrong shape, or neither ``run`` nor
            ``device_ops``.
    """
    plan = SamplingPlan(image, config, options, window_options, candidate, window, rng, on_call, condition)
    wopt, scheduler = plan.window_options, plan.scheduler
    layout = layout_of(plan)
    if device_ops is not None and plan.conditioning is not None:
        from ..backends.base import BackendUnavailableError

        raise BackendUnavailableError("a model with a condition graph runs in the host loop (no device loop)")
    if device_ops is not None:
        ops = device_ops(layout)
    elif run is not None:
        engine = plan.engine.host_run(run)
        if plan.conditioning is not None:
            plan.conditioning.prepare(plan.ids)
        ops = HostOps(
            layout, engine, scheduler, plan.sw.slices, wopt.batch_size, wopt.input_cache_mb, plan.conditioning
        )
    else:
        raise ValueError("sample_step_major needs a denoiser run(x, t) or device_ops")
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "step-major on %s: %r, %d tasks, retire after %d",
            type(ops).__name__,
            plan.sw,
            len(layout.tasks),
            wopt.retire_after,
        )
    ops.begin(plan.initial_noise(), plan.image)  # draw 1
    noise = plan.noise_buffer()
    live = list(range(len(layout.tasks)))
    retirement = Retirement(len(layout.tasks), wopt, len(plan.pairs))
    for step, (t, t_prev) in enumerate(plan.pairs.tolist()):
        watch = retirement.watching(step)
        coef = scheduler.step_coefficients(t, t_prev)
        ops.reset(t, *scheduler.output_coefficients(t))
        for first in range(0, len(live), wopt.batch_size):
            batch = live[first : first + wopt.batch_size]
            rows = ops.gather(batch, first)
            y = plan.engine(ops.engine, rows, len(batch), t)
            peaks = ops.blend(y, batch, t, watch, coef["a_out"], coef["a_x"])
            if peaks is not None:
                for task, peak in zip(batch, peaks.tolist(), strict=True):
                    retirement.observe(task, peak)
        z = plan.draw_noise(noise) if scheduler.needs_noise(t, t_prev) else None  # draw 2
        ops.step(coef, z)
        keep, retiring = retirement.split(live) if watch else (live, [])
        if retiring:
            ops.retire(retiring, keep)
            plan.retired += len(retiring)
            live = keep
    return plan.result(ops.final_x(), "step_major")
