"""The step-major sampler with x_t kept on the engine's device (GPU backends; their CPU builds in tests).

The host loop (:func:`diffseg.runtime.sampler.sample_step_major`) keeps x_t in numpy and copies every batch to the
engine and back. Here the global x_t, the accumulator, the image and the importance maps stay on the engine's device
for the whole chain, and each step's work runs there through the backend's :class:`DeviceOps`: gather the engine
rows, start the accumulator with the background of the windows not run, blend each engine output, and step. What
crosses the bus per step: the window starts of each batch (int64 [B, 4]), the B peaks that decide retirement, the
step's coefficients, and, for stochastic steps only, the noise (drawn on the host with the case's generator, in the
host loop's order, so both loops take the same numbers).

Implementations: onnxruntime (:class:`OrtDeviceOps`: the ONNX graphs of :mod:`diffseg.runtime.step_graphs` through
IO binding) and torch (``TorchDeviceOps`` in the torch backend). Results equal the host loop's up to float32
rounding: the step is the same element-wise form in double; windows that are not run (skipped, or retired)
contribute their "background" output through a per-sample map of their summed importance weights instead of one
window at a time. DDPM with a learned variance is not supported here.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .sampler import Retirement, SampleResult, SamplerOptions, WindowOptions, _Setup
from .scheduler import SchedulerConfig
from .sliding_window import SlidingWindow
from .step_graphs import background_graph, blend_graph, gather_graph, step_graph

__all__ = ["DeviceLayout", "DeviceOps", "OrtDeviceOps", "sample_step_major_on_device", "step_vector"]


@dataclass(frozen=True)
class DeviceLayout:
    """What the per-step work needs to know of one case: shapes, channels and the tiling's maps (host arrays).

    Attributes:
        samples: K.
        padded: the padded volume shape.
        patch: the window shape.
        image_channels: C_img.
        noisy_channel: where the noisy window goes in an engine row (0 or C_img).
        prediction_channel: the engine output channel that is blended.
        output_channels: engine output channels.
        weight: the importance map ``[*patch]``.
        inv_weight_sum: 1/Σ weight ``[*padded]``.
        interior: ``[*padded]`` bool, true inside the unpadded volume; None when nothing is padded.
        pad_value: the value of the padded margin of x_t.
    """

    samples: int
    padded: tuple[int, ...]
    patch: tuple[int, ...]
    image_channels: int
    noisy_channel: int
    prediction_channel: int
    output_channels: int
    weight: np.ndarray
    inv_weight_sum: np.ndarray
    interior: np.ndarray | None
    pad_value: float

    @property
    def full(self) -> tuple[int, ...]:
        return (self.samples, *self.padded)


def step_vector(coef: dict[str, Any]) -> np.ndarray:
    """The six float64 step coefficients (a_out, a_x, A, B, C, σ) of :mod:`diffusion_steps`' element-wise form."""
    return np.array([coef["a_out"], coef["a_x"], coef["A"], coef["B"], coef["C"], coef.get("sigma", 0.0)])


class DeviceOps(ABC):
    """The device loop's per-step work on one backend's device. Values are the device's arrays."""

    def __init__(self, layout: DeviceLayout) -> None:
        self.layout = layout

    @abstractmethod
    def upload(self, array: np.ndarray) -> Any:
        """A device copy of a host array."""

    @abstractmethod
    def download(self, value: Any) -> np.ndarray:
        """A host copy of a device array."""

    @abstractmethod
    def background(self, x: Any, bg_weight: Any, p: float, q: float) -> Any:
        """A fresh accumulator ``(p·x + q)·bg_weight`` (float32)."""

    @abstractmethod
    def gather(self, x: Any, image: Any, starts: np.ndarray) -> Any:
        """Engine rows ``[B, C_img + 1, *patch]`` for the tasks at ``starts`` ``[B, 4]`` (sample, z, y, x)."""

    @abstractmethod
    def engine(self, rows: Any, t: int) -> Any:
        """The denoiser on ``rows`` at timestep t; returns its output on the device when it has finished."""

    @abstractmethod
    def blend(self, acc: Any, y: Any, starts: np.ndarray, x: Any, a_out: float, a_x: float) -> tuple[Any, np.ndarray]:
        """``acc + Σ_j weight·y[j, prediction]`` placed at ``starts[j]``, and each task's peak predicted x0
        ``max(a_out·y + a_x·x_window)`` (float64, host). ``acc`` may be updated in place."""

    @abstractmethod
    def step(self, acc: Any, x: Any, coef: np.ndarray, noise: Any | None) -> Any:
        """x_prev = A·x0 + B·m + C·x (+ σ·z), m = acc·(1/Σ weight), x0 = clip(a_out·m + a_x·x), in double; the
        padded margin set to ``pad_value``. ``x`` may be updated in place."""


class OrtDeviceOps(DeviceOps):
    """onnxruntime: OrtValues on the session's device, the graphs of :mod:`step_graphs` through IO binding."""

    def __init__(self, backend: Any, layout: DeviceLayout, clip: float | None) -> None:
        super().__init__(layout)
        import onnxruntime as ort

        self.ort, self.backend, self.clip = ort, backend, clip
        self.kind, self.device_id = backend.ort_device, backend.device_id
        self.options = ort.SessionOptions()
        self.options.intra_op_num_threads = backend.threads or 0
        self.options.log_severity_level = 3
        self.sessions: dict[Any, Any] = {}
        self.buffers: dict[Any, Any] = {}
        self.volumes: list[Any] = []  # full-volume output buffers, reused
        self.weight = self.upload(layout.weight)
        self.fixed_step_inputs = {"scale": self.upload(layout.inv_weight_sum)}
        if layout.interior is not None:
            pad = self.upload(np.float32(layout.pad_value))
            self.fixed_step_inputs.update(interior=self.upload(layout.interior), pad_value=pad)

    def upload(self, array: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.kind, self.device_id)

    def download(self, value: Any) -> np.ndarray:
        return value.numpy()

    def empty(self, shape: tuple[int, ...], dtype: type = np.float32):
        return self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.kind, self.device_id)

    def _buffer(self, key: Any, shape: tuple[int, ...], dtype: type = np.float32):
        """A reusable output buffer per ``key`` (a graph's output for one batch size)."""
        if key not in self.buffers:
            self.buffers[key] = self.empty(shape, dtype)
        return self.buffers[key]

    def _volume_out(self, *inputs: Any):
        """A full-volume output buffer that is none of ``inputs`` (a graph cannot write over its inputs); three
        suffice: x, the accumulator and the one being written."""
        for v in self.volumes:
            if all(v is not a for a in inputs):
                return v
        self.volumes.append(self.empty(self.layout.full))
        return self.volumes[-1]

    def session(self, key: Any, build: Callable[[], Any]):
        if key not in self.sessions:
            model = build().SerializeToString()
            providers = self.backend.helper_providers()
            self.sessions[key] = self.ort.InferenceSession(model, self.options, providers=providers)
        return self.sessions[key]

    def run(self, session: Any, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        io = session.io_binding()
        for name, v in inputs.items():
            io.bind_ortvalue_input(name, v)
        for name, v in outputs.items():
            io.bind_ortvalue_output(name, v)
        session.run_with_iobinding(io)

    def background(self, x, bg_weight, p, q):
        lay = self.layout
        graph = self.session("background", lambda: background_graph(lay.samples, lay.padded))
        out = self._volume_out(x)
        self.run(graph, {"x": x, "bg_weight": bg_weight, "pq": self.upload(np.array([p, q], np.float32))}, {"acc": out})
        return out

    def gather(self, x, image, starts):
        lay, b = self.layout, len(starts)
        graph = self.session(
            ("gather", b),
            lambda: gather_graph(lay.samples, lay.padded, lay.image_channels, lay.patch, b, lay.noisy_channel),
        )
        rows = self._buffer(("rows", b), (b, lay.image_channels + 1, *lay.patch))
        self.run(graph, {"x": x, "image": image, "starts": self.upload(starts)}, {"rows": rows})
        return rows

    def engine(self, rows, t):
        b = rows.shape()[0]
        y = self._buffer(("y", b), (b, self.layout.output_channels, *self.layout.patch))
        self.run(self.backend.session, {"x": rows, "t": self.upload(np.full(b, t, np.float32))}, {"y": y})
        return y

    def blend(self, acc, y, starts, x, a_out, a_x):
        lay, b = self.layout, len(starts)
        graph = self.session(
            ("blend", b),
            lambda: blend_graph(lay.samples, lay.padded, lay.patch, lay.output_channels, lay.prediction_channel, b),
        )
        out = self._volume_out(acc, x)
        peak = self._buffer(("peak", b), (b,), np.float64)
        inputs = {"acc": acc, "y": y, "weight": self.weight, "starts": self.upload(starts), "x": x}
        inputs["ax"] = self.upload(np.array([a_out, a_x]))
        self.run(graph, inputs, {"acc_out": out, "peak": peak})
        return out, peak.numpy()

    def step(self, acc, x, coef, noise):
        lay = self.layout
        noisy, margin = noise is not None, lay.interior is not None
        graph = self.session(("step", noisy), lambda: step_graph(lay.samples, lay.padded, self.clip, noisy, margin))
        inputs = {"acc": acc, "x": x, "coef": self.upload(coef), **self.fixed_step_inputs}
        if noisy:
            inputs["noise"] = noise
        out = self._volume_out(acc, x)
        self.run(graph, inputs, {"x_prev": out})
        return out


def sample_step_major_on_device(
    image: np.ndarray,
    backend: Any,
    config: SchedulerConfig,
    options: SamplerOptions | None = None,
    window_options: WindowOptions | None = None,
    *,
    candidate: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    window: SlidingWindow | None = None,
    on_call: Callable[[int], None] | None = None,
) -> SampleResult:
    """:func:`diffseg.runtime.sampler.sample_step_major` with x_t kept on ``backend`` 's device.

    Args:
        image: ``[C_img, *volume]`` model-grid image channels, float.
        backend: a backend with ``device_loop`` true (its ``device_ops(layout, clip)`` does the per-step work).
        config, options, window_options, candidate, rng, window: as the host loop.
        on_call: called with the number of finished engine calls after each call.

    Raises:
        ValueError: learned-variance DDPM, a backend without a device loop, or the host loop's argument errors.
    """
    if not getattr(backend, "device_loop", False):
        raise ValueError(f"backend {getattr(backend, 'name', backend)!r} cannot keep x_t on its device")
    s = _Setup(image, backend.run, config, options, window_options, candidate, window, rng)
    if s.var is not None:
        raise ValueError("the device loop does not run DDPM with a learned variance; use the host loop")
    sw, k, wopt = s.sw, s.k, s.window_options
    interior = None
    if sw.needs_padding:
        interior = np.zeros(sw.padded_shape, bool)
        interior[sw.interior] = True
    layout = DeviceLayout(
        samples=k,
        padded=sw.padded_shape,
        patch=wopt.patch_size,
        image_channels=s.in_channels - 1,
        noisy_channel=s.noisy,
        prediction_channel=s.pred,
        output_channels=config.output_channels,
        weight=sw.weight,
        inv_weight_sum=sw.inv_weight_sum,
        interior=interior,
        pad_value=float(wopt.pad_value),
    )
    ops = backend.device_ops(layout, config.clip_range if config.clip_sample else None)
    x = ops.upload(s.initial_noise())
    image_v = ops.upload(s.image)
    # Σ importance weight of the windows not run, per sample: skipped windows now, retired tasks as they retire.
    bg_weight = np.zeros(layout.full, np.float32)
    if s.ids.size < sw.num_windows:
        bg_weight[...] = sw.weight_sum_of(~s.active)
    bg_weight_v = ops.upload(bg_weight)

    tasks = [(int(w), i) for w in s.ids for i in range(k)]
    starts = np.array([(i, *sw.starts[w]) for w, i in tasks], np.int64).reshape(-1, 4)
    live = list(range(len(tasks)))
    retirement = Retirement(len(tasks), wopt, len(s.pairs))
    retired = 0
    pairs = s.pairs.tolist()
    noisy = [s.scheduler.needs_noise(t, t_prev) for t, t_prev in pairs]
    noise_host = np.zeros(layout.full, np.float32) if any(noisy) else None
    for step, (t, t_prev) in enumerate(pairs):
        watch = retirement.watching(step)
        coef = s.scheduler.step_coefficients(t, t_prev)
        c_x, c_0 = s.scheduler.output_coefficients(t)
        acc = ops.background(x, bg_weight_v, c_x, -c_0)  # output_for_x0(−1) = c_x·x_t − c_0
        for first in range(0, len(live), wopt.batch_size):
            batch = live[first : first + wopt.batch_size]
            rows = ops.gather(x, image_v, starts[batch])
            begin = time.perf_counter()
            y = ops.engine(rows, t)
            s.engine.seconds += time.perf_counter() - begin
            s.engine.calls += 1
            s.engine.forwards += len(batch)
            if on_call is not None:
                on_call(s.engine.calls)
            acc, peaks = ops.blend(acc, y, starts[batch], x, coef["a_out"], coef["a_x"])
            if watch:
                for task, peak in zip(batch, peaks, strict=True):
                    retirement.observe(task, peak)
        noise = None
        if noisy[step]:  # the host loop's draw 2, in its order, placed in the padded grid
            noise_host[(slice(None), *sw.interior)] = s.rng.standard_normal((k, *s.spatial), dtype=np.float32)
            noise = ops.upload(noise_host)
        x = ops.step(acc, x, step_vector(coef), noise)
        keep, retiring = retirement.split(live) if watch else (live, [])
        if retiring:
            for task in retiring:
                w, i = tasks[task]
                bg_weight[(i, *sw.slices[w])] += sw.weight
            retired += len(retiring)
            live = keep
            bg_weight_v = ops.upload(bg_weight)
    s.retired = retired
    return s.result(ops.download(x), "step_major")
