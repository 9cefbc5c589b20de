"""The step-major loop's array work in host memory: numpy and the C++ step, for every backend.

Engine inputs: while they fit ``WindowOptions.input_cache_mb``, one array holds every live task's row with its image
channels written once, and rows of retired tasks are squeezed out so that each batch stays a contiguous slice;
otherwise one batch buffer is refilled for each call. Work on the global arrays is split by sample: sample i's
accumulator is only ever touched by one thread at a time, and each voxel is summed in the same order whatever the
thread count (bit-identical results).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ... import _ext
from ..diffusion_steps import thread_map
from ..scheduler import Scheduler
from .conditioning import ConditionCache
from .device_ops import DeviceLayout, DeviceOps

__all__ = ["HostOps"]


class HostOps(DeviceOps):
    """x_t, the accumulators and the engine rows as numpy arrays; the step is ``diffseg._ext.diffusion_step``.
    Runs every layout, learned variance included.

    Args:
        layout: the case's layout.
        engine: ``engine(rows, t) -> y``, numpy in and out (the backend's ``run`` behind the loop's counter).
        scheduler: the case's scheduler (the background output and the retirement peaks use its formulas).
        image_slices: the window slices of the tiling (``SlidingWindow.slices``).
        batch_size: tasks per engine call.
        cache_mb: the most MiB the cached engine rows may take.
        conditioning: the features of a conditioned model's windows (None: the model has no condition graph).
    """

    blends_variance = True
    blends_targets = True

    def __init__(
        self,
        layout: DeviceLayout,
        engine: Callable[[np.ndarray, int], np.ndarray],
        scheduler: Scheduler,
        image_slices: list[tuple[slice, ...]],
        batch_size: int,
        cache_mb: float,
        conditioning: ConditionCache | None = None,
    ) -> None:
        super().__init__(layout)
        self.run, self.scheduler, self.slices, self.batch_size = engine, scheduler, image_slices, batch_size
        self.conditioning = conditioning
        self.batch_features: tuple[np.ndarray, ...] = ()
        self.threads = scheduler.threads
        n, targets = len(layout.tasks), layout.targets
        row_bytes = (layout.image_channels + targets) * int(np.prod(layout.patch)) * 4
        self.cached = n * row_bytes <= cache_mb * 2**20
        self.noisy = slice(layout.noisy_channel, layout.noisy_channel + targets)
        first = 0 if layout.noisy_channel == layout.image_channels else targets
        self.img_ch = slice(first, first + layout.image_channels)
        self.pred = slice(layout.prediction_channel, layout.prediction_channel + targets)
        var = layout.variance_channel
        self.var = None if var is None else slice(var, var + 1)
        self.retired: list[list[int]] = [[] for _ in range(layout.samples)]  # per sample: its retired windows
        self.products = [np.empty((targets, *layout.patch), np.float32) for _ in range(layout.samples)]
        self.direct_x0 = scheduler.config.prediction_type == "sample"
        self.margin = None if layout.interior is None else ~layout.interior

    def _window(self, task: int) -> tuple[int, int]:
        w, i = self.layout.tasks[task].tolist()
        return int(w), int(i)

    def _rows(self, i: int) -> slice:
        """Sample i's rows of x_t (one per target)."""
        return slice(i * self.layout.targets, (i + 1) * self.layout.targets)

    def begin(self, x_init: np.ndarray, image: np.ndarray) -> None:
        lay = self.layout
        self.x, self.image = x_init, image
        self.acc = np.empty_like(x_init)  # Σ weight·prediction over windows; the step divides by Σ weight itself
        self.acc_var = np.empty_like(x_init) if lay.variance_channel is not None else None
        n = len(lay.tasks)
        self.live = list(range(n))  # task ids in row order
        rows = n if self.cached else min(self.batch_size, max(n, 1))
        self.rows = np.empty((rows, lay.image_channels + lay.targets, *lay.patch), np.float32)
        if self.cached:
            thread_map(self._fill_image, range(n), self.threads)

    def _fill_image(self, j: int) -> None:
        w, _ = self._window(j)
        self.rows[j, self.img_ch] = self.image[(slice(None), *self.slices[w])]

    def _add_background(self, i: int, w: int, t: int) -> None:
        region = (self._rows(i), *self.slices[w])
        self.scheduler.output_for_x0(-1.0, self.x[region], t, out=self.products[i])
        self.products[i] *= self.layout.weight
        self.acc[region] += self.products[i]

    def _reset_sample(self, i: int, t: int) -> None:
        rows = self._rows(i)
        if self.layout.skip_weight is None:
            self.acc[rows].fill(0.0)
        else:  # skipped windows predict background: the output consistent with x0 = -1
            self.scheduler.output_for_x0(-1.0, self.x[rows], t, out=self.acc[rows])
            self.acc[rows] *= self.layout.skip_weight
        for w in self.retired[i]:
            self._add_background(i, w, t)
        if self.acc_var is not None:
            self.acc_var[rows].fill(0.0)

    def reset(self, t: int, c_x: float, c_0: float) -> None:
        # The scheduler's output_for_x0 is c_x·x_t + c_0·x0 with these same coefficients.
        thread_map(lambda i: self._reset_sample(i, t), range(self.layout.samples), self.threads)

    def gather(self, batch: list[int], first: int) -> np.ndarray:
        buf = self.rows[first : first + len(batch)] if self.cached else self.rows[: len(batch)]

        def fill(job: tuple[int, int]) -> None:
            j, task = job
            w, i = self._window(task)
            if not self.cached:
                buf[j, self.img_ch] = self.image[(slice(None), *self.slices[w])]
            buf[j, self.noisy] = self.x[(self._rows(i), *self.slices[w])]

        thread_map(fill, list(enumerate(batch)), self.threads)
        if self.conditioning is not None:
            self.batch_features = self.conditioning.rows([self._window(task)[0] for task in batch])
        return buf

    def engine(self, rows: np.ndarray, t: int) -> np.ndarray:
        return self.run(rows, t, self.batch_features)

    def blend(self, y: np.ndarray, batch: list[int], t: int, watch: bool, a_out: float, a_x: float):
        lay = self.layout
        peaks = np.zeros(len(batch), np.float64) if watch else None

        def accumulate(i: int) -> None:
            for j, task in enumerate(batch):
                w, sample = self._window(task)
                if sample != i:
                    continue
                region = (self._rows(i), *self.slices[w])
                if peaks is not None:  # over every target's x0
                    if self.direct_x0:  # the output is x0; clipping to [-1, 1] cannot move its max across the level
                        peaks[j] = y[j, self.pred].max()
                    else:
                        x0 = self.scheduler.x0_for_output(y[j, self.pred], self.x[region], t, self.products[i])
                        peaks[j] = x0.max()
                for channels, target in ((self.pred, self.acc), (self.var, self.acc_var)):
                    if target is not None and channels is not None:
                        np.multiply(y[j, channels], lay.weight, out=self.products[i])
                        target[region] += self.products[i]

        samples = sorted({self._window(task)[1] for task in batch})
        thread_map(accumulate, samples, self.threads)
        return peaks

    def step(self, coef: dict[str, Any], noise: np.ndarray | None) -> None:
        lay = self.layout
        if self.acc_var is not None:
            self.acc_var *= lay.inv_weight_sum
        _ext.diffusion_step(
            self.acc,
            self.x,
            coef,
            x_prev=self.x,
            x0=None,
            noise=noise,
            variance=self.acc_var if coef["noise"] == "learned" else None,
            scale=lay.inv_weight_sum,
            threads=self.threads,
        )
        if self.margin is not None:  # the padded margin of x_t stays pad_value, as MONAI pads each pass's input
            np.copyto(self.x, np.float32(lay.pad_value), where=self.margin)

    def retire(self, retiring: list[int], live: list[int]) -> None:
        for task in retiring:
            w, i = self._window(task)
            self.retired[i].append(w)
        if self.cached:  # squeeze retired rows out, in order (a row only ever moves to a lower index)
            row_of = {task: row for row, task in enumerate(self.live)}
            for new_row, task in enumerate(live):
                old_row = row_of[task]
                if old_row != new_row:
                    self.rows[new_row, self.img_ch] = self.rows[old_row, self.img_ch]
        self.live = live

    def final_x(self) -> np.ndarray:
        return self.x
