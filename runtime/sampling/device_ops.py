"""The per-step work of the step-major loop, behind one interface that each executor implements where its data lives.

:func:`diffseg.runtime.sampling.sample_step_major` orchestrates a step (which tasks run, retirement, the order of the
noise draws, the step's coefficients) and leaves the array work to a :class:`DeviceOps`:

- :class:`~diffseg.runtime.sampling.host_ops.HostOps`: numpy and the C++ step, x_t in host memory (every backend);
- ``OrtDeviceOps`` (:mod:`diffseg.runtime.backends.ort_ops`): small ONNX graphs through IO binding, x_t an OrtValue
  on the session's device;
- ``TorchDeviceOps`` (:mod:`diffseg.runtime.backends.torch_backend`): tensor operations on the engine's device.

A task is one (window, sample) pair; the loop names tasks by their index in ``DeviceLayout.tasks``. Device ops keep
x_t, the accumulator and the image where the engine runs; what crosses the bus per step is the task ids of each batch,
the peaks that decide retirement, the step's coefficients and, for stochastic steps only, the noise (drawn on the host
with the case's generator, so that every executor takes the same numbers). Every executor applies the step's
float64 coefficients from :mod:`diffseg.runtime.diffusion_steps` in the same element-wise form, in double.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = ["DeviceLayout", "DeviceOps", "step_vector"]


@dataclass(frozen=True)
class DeviceLayout:
    """What the per-step work needs to know of one case: shapes, channels, the tasks and the tiling's maps.

    Attributes:
        samples: K.
        padded: the padded volume shape.
        patch: the window shape.
        image_channels: C_img.
        noisy_channel: where the noisy window goes in an engine row (0 or C_img).
        prediction_channel: the engine output channel that is blended.
        output_channels: engine output channels.
        variance_channel: the learned-variance channel that is blended too (DDPM ``learned_range``), else None.
        clip: the bound of the predicted x0 (None: no clipping).
        weight: the importance map ``[*patch]``.
        inv_weight_sum: 1/Σ weight ``[*padded]``.
        interior: ``[*padded]`` bool, true inside the unpadded volume; None when nothing is padded.
        pad_value: the value of the padded margin of x_t.
        tasks: ``[n, 2]`` int64 (window, sample) of every task that is run, samples of a window side by side.
        starts: ``[n, 4]`` int64 (sample, z, y, x): where each task's window lies in x_t.
        skip_weight: Σ weight ``[*padded]`` of the windows that are never run (no candidate), None if all run.
        targets: the model's noisy channels T: engine rows hold T noisy channels from ``noisy_channel`` on, the
            output T predictions from channel 0, and x_t ``K·T`` rows, sample-major.
    """

    samples: int
    padded: tuple[int, ...]
    patch: tuple[int, ...]
    image_channels: int
    noisy_channel: int
    prediction_channel: int
    output_channels: int
    variance_channel: int | None
    clip: float | None
    weight: np.ndarray
    inv_weight_sum: np.ndarray
    interior: np.ndarray | None
    pad_value: float
    tasks: np.ndarray
    starts: np.ndarray
    skip_weight: np.ndarray | None
    targets: int = 1

    @property
    def full(self) -> tuple[int, ...]:
        """Shape of x_t and of the accumulator: ``(K·T, *padded)``."""
        return (self.samples * self.targets, *self.padded)

    def region(self, task: int) -> tuple[int | slice, ...]:
        """Index of a task's window in x_t: ``(sample, z-slice, y-slice, x-slice)``."""
        i, *start = self.starts[task].tolist()
        return (i, *(slice(a, a + p) for a, p in zip(start, self.patch, strict=True)))


def step_vector(coef: dict[str, Any]) -> np.ndarray:
    """The six float64 step coefficients (a_out, a_x, A, B, C, σ) of :mod:`diffusion_steps`' element-wise form."""
    return np.array([coef["a_out"], coef["a_x"], coef["A"], coef["B"], coef["C"], coef.get("sigma", 0.0)])


class DeviceOps(ABC):
    """The step-major loop's array work on one executor. Arrays stay the executor's own between calls.

    Call order per case: :meth:`begin` once; per step :meth:`reset`, then per batch :meth:`gather`, :meth:`engine`,
    :meth:`blend`; then :meth:`step` and, when tasks retire, :meth:`retire`; :meth:`final_x` at the end.

    Attributes:
        blends_variance: the executor can blend and step a learned-variance channel (DDPM ``learned_range``).
        blends_targets: the executor runs models of T > 1 targets.

    Raises:
        BackendUnavailableError: a learned-variance or multi-target layout on an executor that cannot run it.
    """

    blends_variance: ClassVar[bool] = False
    blends_targets: ClassVar[bool] = False

    def __init__(self, layout: DeviceLayout) -> None:
        from ..backends.base import BackendUnavailableError

        if layout.variance_channel is not None and not self.blends_variance:
            raise BackendUnavailableError(
                f"{type(self).__name__} does not run DDPM with a learned variance; use the host loop (no device loop)"
            )
        if layout.targets > 1 and not self.blends_targets:
            raise BackendUnavailableError(
                f"{type(self).__name__} runs one target per model, this one has {layout.targets}; use the host loop "
                "(no device loop)"
            )
        self.layout = layout

    @abstractmethod
    def begin(self, x_init: np.ndarray, image: np.ndarray) -> None:
        """Take x_T ``[K, *padded]`` and the padded image ``[C_img, *padded]`` (host arrays) for the case."""

    @abstractmethod
    def reset(self, t: int, c_x: float, c_0: float) -> None:
        """Start the accumulator with the "background" output ``c_x·x_t − c_0`` (x0 = −1) of every window that is
        not run (skipped, or retired), each weighted by its importance map."""

    @abstractmethod
    def gather(self, batch: list[int], first: int) -> Any:
        """Engine rows ``[len(batch), C_img + 1, *patch]`` of the tasks ``batch``, which start at position ``first``
        of the live tasks."""

    @abstractmethod
    def engine(self, rows: Any, t: int) -> Any:
        """The denoiser on ``rows`` at timestep t; returns its output once it has finished."""

    @abstractmethod
    def blend(self, y: Any, batch: list[int], t: int, watch: bool, a_out: float, a_x: float) -> np.ndarray | None:
        """Add ``weight·y[j, prediction]`` (and the variance channel, if any) at each task's window; with ``watch``,
        return each task's peak predicted x0 ``max(a_out·y + a_x·x_window)`` (host float64 ``[len(batch)]``)."""

    @abstractmethod
    def step(self, coef: dict[str, Any], noise: np.ndarray | None) -> None:
        """x_t ← x_prev: m = acc·(1/Σ weight), x0 = clip(a_out·m + a_x·x_t), x_prev = A·x0 + B·m + C·x_t (+ σ·z),
        in double, with ``coef`` from :meth:`Scheduler.step_coefficients`; the padded margin set to ``pad_value``."""

    @abstractmethod
    def retire(self, retiring: list[int], live: list[int]) -> None:
        """Tasks ``retiring`` predict background from the next step on; ``live`` are the tasks that keep running,
        in order."""

    @abstractmethod
    def final_x(self) -> np.ndarray:
        """A host copy of x_t ``[K, *padded]``."""
