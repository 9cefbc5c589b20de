"""OpenVINO on the CPU, fp32 or bf16 (bf16 only where the CPU computes it natively: AVX512-BF16 or AMX).

A model with a condition graph compiles it too, at the same static batch 1 and precision: its features' shapes (the
denoiser's extra inputs, reshaped to batch 1 as well) come from the condition graph's outputs, and each request of
either graph is one row.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .base import Backend, BackendUnavailableError
from .openvino_graph import split_narrow_convolutions as split_narrow

__all__ = ["OpenVinoBackend"]

_HINTS = {"fp32": "f32", "bf16": "bf16"}


class OpenVinoBackend(Backend):
    name = "openvino"
    precisions = ("bf16", "fp32")
    conditioning_precisions = ("bf16", "fp32")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import openvino as ov
        except ImportError:
            return "openvino is not installed"
        if "CPU" not in ov.Core().available_devices:
            return "OpenVINO sees no CPU device"
        return None

    @classmethod
    def precision_reason(cls, precision: str) -> str | None:
        if precision not in cls.precisions:
            return f"supported: {list(cls.precisions)}"
        if precision == "bf16":
            import openvino as ov

            caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            if "BF16" not in caps:
                # OpenVINO would quietly run f32 instead; we refuse rather than mislabel the precision.
                return f"this CPU has no native bf16 (OpenVINO capabilities: {list(caps)})"
        return None

    def __init__(
        self, package, precision: str, threads: int | None = None, split_narrow_convolutions: bool = True
    ) -> None:
        """``split_narrow_convolutions=False``: compile the model as read (benchmarks/openvino_graph.py compares)."""
        super().__init__(package, precision, threads)
        import openvino as ov

        self.core = ov.Core()
        model = self.core.read_model(str(package.engine("fp32").path))
        self.rewritten = split_narrow(model) if split_narrow_convolutions else 0
        self._model = model
        # One patch per request, several requests in flight: on a CPU, OpenVINO's throughput streams (each a few
        # cores on its own request) beat one multi-threaded batch (measured on 2 cores: 56 vs 68 ms per patch at
        # batch 10), and a static batch of 1 compiles to its fastest kernels.
        shapes = {"x": [1, self.in_channels, *self.patch], "t": [1]}
        condition = None
        if self.features:
            condition = self.core.read_model(str(package.engine("fp32", role="condition").path))
            condition.reshape({"image": ov.PartialShape([1, self.image_channels, *self.patch])})
            self.feature_shapes = self._output_shapes(condition)
            shapes.update({name: [1, *shape] for name, shape in self.feature_shapes.items()})
        model.reshape({name: ov.PartialShape(shape) for name, shape in shapes.items()})
        config = {
            "INFERENCE_PRECISION_HINT": _HINTS[precision],
            "PERFORMANCE_HINT": "THROUGHPUT",
            "INFERENCE_NUM_THREADS": int(threads or os.cpu_count() or 1),
        }
        self.compiled = self.core.compile_model(model, "CPU", config)
        got = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        want = {"fp32": ov.Type.f32, "bf16": ov.Type.bf16}[precision]
        if got != want:
            raise BackendUnavailableError(f"OpenVINO compiled at {got}, not the requested {precision}")
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.queue = ov.AsyncInferQueue(self.compiled, requests)
        self.queue.set_callback(self._store)
        self.condition_queue = None
        if condition is not None:
            compiled = self.core.compile_model(condition, "CPU", config)
            index = {name: i for i, port in enumerate(compiled.outputs) for name in port.get_names()}
            self._feature_index = [index[name] for name in self.features]
            self.condition_queue = ov.AsyncInferQueue(compiled, requests)
            self.condition_queue.set_callback(self._store_features)
        self._config = config
        self._latency_request = None  # compiled on first use: a call too small to fill the streams
        self._y: np.ndarray | None = None
        self._f: list[np.ndarray] = []
        self.device = "cpu"

    def _output_shapes(self, condition) -> dict[str, list[int]]:
        """The condition graph's outputs by feature name → their shape after the batch (static at batch 1)."""
        shapes: dict[str, list[int]] = {}
        for name in self.features:
            try:
                shape = condition.output(name).get_partial_shape()
            except RuntimeError as exc:
                raise BackendUnavailableError(
                    f"OpenVINO finds no output {name!r} in the condition graph: {exc}"
                ) from None
            if not shape.is_static:
                raise BackendUnavailableError(
                    f"the condition graph's output {name} has shape {shape} at batch 1; its axes after the batch "
                    f"must be fixed"
                )
            shapes[name] = [int(d) for d in shape.to_shape()][1:]
        return shapes

    def _inputs(self, x: np.ndarray, t: np.ndarray, features: Sequence[np.ndarray], rows: slice) -> dict:
        return {"x": x[rows], "t": t[rows], **{n: f[rows] for n, f in zip(self.features, features, strict=True)}}

    def _single(self, x: np.ndarray, t: np.ndarray, features: Sequence[np.ndarray] = ()) -> np.ndarray:
        """One patch on all threads: a lone request on a throughput stream would leave the other streams idle."""
        if self._latency_request is None:
            config = {**self._config, "PERFORMANCE_HINT": "LATENCY"}
            self._latency_request = self.core.compile_model(self._model, "CPU", config).create_infer_request()
        self._latency_request.infer(self._inputs(x, t, features, slice(None)), share_inputs=True)
        return np.array(self._latency_request.get_output_tensor(0).data, copy=True)

    def _store(self, request, index: int) -> None:
        assert self._y is not None
        self._y[index] = request.get_output_tensor(0).data[0]

    def _store_features(self, request, index: int) -> None:
        for out, i in zip(self._f, self._feature_index, strict=True):
            out[index] = request.get_output_tensor(i).data[0]

    def run(self, x: np.ndarray, t: np.ndarray, features: Sequence[np.ndarray] = ()) -> np.ndarray:
        self._check(x, t, features)
        x = np.ascontiguousarray(x, dtype=np.float32)
        t = np.ascontiguousarray(t, dtype=np.float32)
        features = [np.ascontiguousarray(f, dtype=np.float32) for f in features]
        n = x.shape[0]
        if n == 1 and self.streams > 1:
            return self._single(x, t, features)
        # A last patch that would run alone on one stream goes to the latency request after the others (every thread)
        lone = 1 if self.streams > 1 and n % self.streams == 1 else 0
        self._y = np.empty((n, self.out_channels, *self.patch), np.float32)
        try:
            for i in range(n - lone):
                # the inputs outlive the requests (wait_all below), so OpenVINO may read them in place
                self.queue.start_async(self._inputs(x, t, features, slice(i, i + 1)), userdata=i, share_inputs=True)
            self.queue.wait_all()
            if lone:
                self._y[n - 1] = self._single(x[n - 1 :], t[n - 1 :], [f[n - 1 :] for f in features])[0]
            return self._y
        finally:
            self._y = None

    def condition(self, images: np.ndarray) -> Sequence[np.ndarray]:
        """The condition graph on ``images`` [B, C_img, *patch], one request per row: the features, each [B, ...]."""
        if self.condition_queue is None:
            return super().condition(images)
        self._check_images(images)
        images = np.ascontiguousarray(images, dtype=np.float32)
        n = images.shape[0]
        self._f = [np.empty((n, *self.feature_shapes[name]), np.float32) for name in self.features]
        try:
            for i in range(n):
                self.condition_queue.start_async({"image": images[i : i + 1]}, userdata=i, share_inputs=True)
            self.condition_queue.wait_all()
            return self._f
        finally:
            self._f = []

    def close(self) -> None:
        self.queue = None
        self.condition_queue = None
        self.compiled = None
        self._latency_request = None

    def describe(self) -> dict:
        import openvino as ov

        return {
            **super().describe(),
            "openvino": ov.get_version(),
            "streams": self.streams,
            "narrow_convolutions_split": self.rewritten,
        }
