"""The step-major sampler with x_t on the engine's device (onnxruntime backends: CUDA on a GPU, CPU in tests).

The host loop (:func:`diffseg.runtime.sampler.sample_step_major`) keeps x_t in numpy and copies every batch to the
engine and back. Here the global x_t, the accumulator, the image and the importance maps are ``OrtValue`` s on the
engine's device for the whole chain; each step runs the graphs of :mod:`diffseg.runtime.step_graphs` (gather rows,
background, blend, scheduler step) and the denoiser through IO binding, all on that device. What crosses the bus per
step: the window starts of each batch (int64 [B, 4]), the B peaks that decide retirement, the step's six
coefficients, and, for stochastic steps only, the noise (drawn on the host with the case's generator, in the host
loop's order, so both loops take the same numbers).

Same results as the host loop, up to float32 rounding: the step is the same element-wise form in double; windows
that are not run (skipped, or retired) contribute their "background" output through a per-sample map of their summed
importance weights instead of one window at a time. DDPM with a learned variance is not supported here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .diffusion_steps import x0_coefficients
from .sampler import SampleResult, SamplerOptions, WindowOptions, _Setup
from .scheduler import SchedulerConfig
from .sliding_window import SlidingWindow
from .step_graphs import background_graph, blend_graph, gather_graph, step_graph

__all__ = ["DeviceGraphs", "sample_step_major_on_device"]


class DeviceGraphs:
    """OrtValues and helper sessions on one onnxruntime backend's device."""

    def __init__(self, backend: Any) -> None:
        import onnxruntime as ort

        self.ort = ort
        self.backend = backend
        self.kind, self.device_id = backend.ort_device, backend.device_id
        self.options = ort.SessionOptions()
        self.options.intra_op_num_threads = backend.threads or 0
        self.options.log_severity_level = 3
        self.sessions: dict[Any, Any] = {}

    def value(self, array: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.kind, self.device_id)

    def empty(self, shape: tuple[int, ...], dtype: type = np.float32):
        return self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.kind, self.device_id)

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
        backend: an onnxruntime backend (``device_loop`` true): its session runs the denoiser.
        config, options, window_options, candidate, rng, window: as the host loop.
        on_call: called with the number of finished engine calls after each call.

    Raises:
        ValueError: learned-variance DDPM, or the host loop's argument errors.
    """
    if not getattr(backend, "device_loop", False):
        raise ValueError(f"backend {getattr(backend, 'name', backend)!r} cannot keep x_t on its device")
    s = _Setup(image, backend.run, config, options, window_options, candidate, window, rng)
    if s.var is not None:
        raise ValueError("the device loop does not run DDPM with a learned variance; use the host loop")
    sw, k, wopt = s.sw, s.k, s.window_options
    patch, padded = wopt.patch_size, sw.padded_shape
    dev = DeviceGraphs(backend)
    c_img = s.in_channels - 1
    full = (k, *padded)

    x = dev.value(s.initial_noise())
    x_next = dev.empty(full)
    image_v = dev.value(s.image)
    weight_v = dev.value(sw.weight)
    scale_v = dev.value(sw.inv_weight_sum)
    acc, acc_next = dev.empty(full), dev.empty(full)
    # Σ importance weight of the windows not run, per sample: skipped windows now, retired tasks as they retire.
    bg_weight = np.zeros(full, np.float32)
    if s.ids.size < sw.num_windows:
        bg_weight[...] = sw.weight_sum_of(~s.active)
    bg_weight_v = dev.value(bg_weight)
    step_inputs: dict[str, Any] = {"scale": scale_v}
    if sw.needs_padding:
        interior = np.zeros(padded, bool)
        interior[sw.interior] = True
        step_inputs.update(interior=dev.value(interior), pad_value=dev.value(np.float32(wopt.pad_value)))

    tasks = [(int(w), i) for w in s.ids for i in range(k)]
    starts = np.array([(i, *sw.starts[w]) for w, i in tasks], np.int64).reshape(-1, 4)
    live = list(range(len(tasks)))
    streak = np.zeros(len(tasks), np.int32)
    patience = wopt.retire_after
    x0_level = 2.0 * wopt.retire_level - 1.0
    retired = 0
    buffers: dict[int, tuple[Any, Any, Any]] = {}  # batch size -> (rows, y, peak)

    def batch_buffers(b: int):
        if b not in buffers:
            buffers[b] = (
                dev.empty((b, s.in_channels, *patch)),
                dev.empty((b, config.output_channels, *patch)),
                dev.empty((b,), np.float64),
            )
        return buffers[b]

    background = dev.session("background", lambda: background_graph(k, padded))
    pairs = s.pairs.tolist()
    noisy = [s.scheduler.needs_noise(t, t_prev) for t, t_prev in pairs]
    noise_host = np.zeros(full, np.float32) if any(noisy) else None
    for step, (t, t_prev) in enumerate(pairs):
        watch = patience > 0 and step < len(pairs) - 1
        c_x, c_0 = s.scheduler.output_coefficients(t)
        pq = dev.value(np.array([c_x, -c_0], np.float32))  # output_for_x0(−1) = c_x·x_t − c_0
        dev.run(background, {"x": x, "bg_weight": bg_weight_v, "pq": pq}, {"acc": acc})
        ab = float(s.scheduler.alphas_cumprod[t])
        ax = dev.value(np.array(x0_coefficients(ab, config.prediction_type), np.float64))
        t_values: dict[int, Any] = {}
        for first in range(0, len(live), wopt.batch_size):
            batch = live[first : first + wopt.batch_size]
            b = len(batch)
            rows, y, peak = batch_buffers(b)
            starts_v = dev.value(starts[batch])
            gather = dev.session(("gather", b), lambda b=b: gather_graph(k, padded, c_img, patch, b, s.noisy))
            dev.run(gather, {"x": x, "image": image_v, "starts": starts_v}, {"rows": rows})
            if b not in t_values:
                t_values[b] = dev.value(np.full(b, t, np.float32))
            begin = time.perf_counter()
            dev.run(backend.session, {"x": rows, "t": t_values[b]}, {"y": y})
            s.engine.seconds += time.perf_counter() - begin
            s.engine.calls += 1
            s.engine.forwards += b
            if on_call is not None:
                on_call(s.engine.calls)
            blend = dev.session(
                ("blend", b), lambda b=b: blend_graph(k, padded, patch, config.output_channels, s.pred, b)
            )
            inputs = {"acc": acc, "y": y, "weight": weight_v, "starts": starts_v, "x": x, "ax": ax}
            dev.run(blend, inputs, {"acc_out": acc_next, "peak": peak})
            acc, acc_next = acc_next, acc
            if watch:
                for task, value in zip(batch, peak.numpy(), strict=True):
                    streak[task] = streak[task] + 1 if value <= x0_level else 0
        coef = s.scheduler.step_coefficients(t, t_prev)
        inputs = {"acc": acc, "x": x, **step_inputs}
        inputs["coef"] = dev.value(
            np.array([coef["a_out"], coef["a_x"], coef["A"], coef["B"], coef["C"], coef.get("sigma", 0.0)])
        )
        if noisy[step]:  # the host loop's draw 2, in its order, placed in the padded grid
            noise_host[(slice(None), *sw.interior)] = s.rng.standard_normal((k, *s.spatial), dtype=np.float32)
            inputs["noise"] = dev.value(noise_host)
        stepper = dev.session(
            ("step", coef["clip"], noisy[step]),
            lambda c=coef["clip"], n=noisy[step]: step_graph(k, padded, c, n, sw.needs_padding),
        )
        dev.run(stepper, inputs, {"x_prev": x_next})
        x, x_next = x_next, x
        if watch and (streak[live] >= patience).any():
            for task in live:
                if streak[task] >= patience:
                    w, i = tasks[task]
                    bg_weight[(i, *sw.slices[w])] += sw.weight
                    retired += 1
            live = [task for task in live if streak[task] < patience]
            bg_weight_v = dev.value(bg_weight)
    s.retired = retired
    return s.result(x.numpy(), "step_major")
