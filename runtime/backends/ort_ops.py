"""The step-major loop's array work on an onnxruntime session's device: OrtValues and small ONNX graphs through IO
binding (:mod:`.ort_step_graphs`), so that x_t, the accumulator and the image never leave the device.

Windows that are not run (skipped, or retired) contribute their "background" output through a per-sample map of their
summed importance weights, updated when tasks retire. DDPM with a learned variance is not supported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..sampling.device_ops import DeviceLayout, DeviceOps, step_vector
from .ort_step_graphs import background_graph, blend_graph, gather_graph, step_graph

__all__ = ["OrtDeviceOps"]


class OrtDeviceOps(DeviceOps):
    """onnxruntime: OrtValues on the session's device, the graphs of :mod:`.ort_step_graphs` through IO binding.

    Args:
        backend: an onnxruntime backend (``session``, ``ort_device``, ``device_id``, ``helper_providers``).
        layout: the case's layout.

    Raises:
        BackendUnavailableError: a learned-variance model (the host loop runs those).
    """

    def __init__(self, backend: Any, layout: DeviceLayout) -> None:
        super().__init__(layout)
        import onnxruntime as ort

        self.ort, self.backend = ort, backend
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
        # Σ importance weight of the windows not run, per sample: skipped windows now, retired tasks as they retire.
        self.bg_weight = np.zeros(layout.full, np.float32)
        if layout.skip_weight is not None:
            self.bg_weight[...] = layout.skip_weight
        self.bg_weight_v = self.upload(self.bg_weight)

    def upload(self, array: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.kind, self.device_id)

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

    def run_graph(self, session: Any, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        io = session.io_binding()
        for name, v in inputs.items():
            io.bind_ortvalue_input(name, v)
        for name, v in outputs.items():
            io.bind_ortvalue_output(name, v)
        session.run_with_iobinding(io)

    def _starts(self, batch: list[int]):
        return self.upload(self.layout.starts[batch])

    def begin(self, x_init: np.ndarray, image: np.ndarray) -> None:
        self.x = self.upload(x_init)
        self.image = self.upload(image)

    def reset(self, t: int, c_x: float, c_0: float) -> None:
        lay = self.layout
        graph = self.session("background", lambda: background_graph(lay.samples, lay.padded))
        out = self._volume_out(self.x)
        pq = self.upload(np.array([c_x, -c_0], np.float32))  # output_for_x0(−1) = c_x·x_t − c_0
        self.run_graph(graph, {"x": self.x, "bg_weight": self.bg_weight_v, "pq": pq}, {"acc": out})
        self.acc = out

    def gather(self, batch: list[int], first: int):
        lay, b = self.layout, len(batch)
        graph = self.session(
            ("gather", b),
            lambda: gather_graph(lay.samples, lay.padded, lay.image_channels, lay.patch, b, lay.noisy_channel),
        )
        rows = self._buffer(("rows", b), (b, lay.image_channels + 1, *lay.patch))
        self.run_graph(graph, {"x": self.x, "image": self.image, "starts": self._starts(batch)}, {"rows": rows})
        return rows

    def engine(self, rows, t: int):
        b = rows.shape()[0]
        y = self._buffer(("y", b), (b, self.layout.output_channels, *self.layout.patch))
        self.backend.run_bound(rows, self.upload(np.full(b, t, np.float32)), y)
        return y

    def blend(self, y, batch: list[int], t: int, watch: bool, a_out: float, a_x: float):
        lay, b = self.layout, len(batch)
        graph = self.session(
            ("blend", b),
            lambda: blend_graph(lay.samples, lay.padded, lay.patch, lay.output_channels, lay.prediction_channel, b),
        )
        out = self._volume_out(self.acc, self.x)
        peak = self._buffer(("peak", b), (b,), np.float64)
        inputs = {"acc": self.acc, "y": y, "weight": self.weight, "starts": self._starts(batch), "x": self.x}
        inputs["ax"] = self.upload(np.array([a_out, a_x]))
        self.run_graph(graph, inputs, {"acc_out": out, "peak": peak})
        self.acc = out
        return peak.numpy() if watch else None

    def step(self, coef: dict[str, Any], noise: np.ndarray | None) -> None:
        lay = self.layout
        noisy, margin = noise is not None, lay.interior is not None
        graph = self.session(("step", noisy), lambda: step_graph(lay.samples, lay.padded, lay.clip, noisy, margin))
        inputs = {"acc": self.acc, "x": self.x, "coef": self.upload(step_vector(coef)), **self.fixed_step_inputs}
        if noisy:
            inputs["noise"] = self.upload(noise)
        out = self._volume_out(self.acc, self.x)
        self.run_graph(graph, inputs, {"x_prev": out})
        self.x = out

    def retire(self, retiring: list[int], live: list[int]) -> None:
        for task in retiring:
            self.bg_weight[self.layout.region(task)] += self.layout.weight
        self.bg_weight_v = self.upload(self.bg_weight)

    def final_x(self) -> np.ndarray:
        return self.x.numpy()
