"""OpenVINO on the CPU, fp32 or bf16 (bf16 only where the CPU computes it natively: AVX512-BF16 or AMX)."""

from __future__ import annotations

import os

import numpy as np

from .base import Backend, BackendUnavailableError
from .openvino_graph import split_narrow_convolutions as split_narrow

__all__ = ["OpenVinoBackend"]

_HINTS = {"fp32": "f32", "bf16": "bf16"}


class OpenVinoBackend(Backend):
    name = "openvino"
    precisions = ("bf16", "fp32")

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
        model.reshape({"x": ov.PartialShape([1, self.in_channels, *self.patch]), "t": ov.PartialShape([1])})
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
        self._config = config
        self._latency_request = None  # compiled on first use: a call too small to fill the streams
        self._y: np.ndarray | None = None
        self.device = "cpu"

    def _single(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """One patch on all threads: a lone request on a throughput stream would leave the other streams idle."""
        if self._latency_request is None:
            config = {**self._config, "PERFORMANCE_HINT": "LATENCY"}
            self._latency_request = self.core.compile_model(self._model, "CPU", config).create_infer_request()
        self._latency_request.infer({"x": x, "t": t}, share_inputs=True)
        return np.array(self._latency_request.get_output_tensor(0).data, copy=True)

    def _store(self, request, index: int) -> None:
        assert self._y is not None
        self._y[index] = request.get_output_tensor(0).data[0]

    def run(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        self._check(x, t)
        x = np.ascontiguousarray(x, dtype=np.float32)
        t = np.ascontiguousarray(t, dtype=np.float32)
        n = x.shape[0]
        if n == 1 and self.streams > 1:
            return self._single(x, t)
        # A last patch that would run alone on one stream goes to the latency request after the others (every thread)
        lone = 1 if self.streams > 1 and n % self.streams == 1 else 0
        self._y = np.empty((n, self.out_channels, *self.patch), np.float32)
        try:
            for i in range(n - lone):
                # x and t outlive the requests (wait_all below), so OpenVINO may read them in place
                self.queue.start_async({"x": x[i : i + 1], "t": t[i : i + 1]}, userdata=i, share_inputs=True)
            self.queue.wait_all()
            if lone:
                self._y[n - 1] = self._single(x[n - 1 :], t[n - 1 :])[0]
            return self._y
        finally:
            self._y = None

    def close(self) -> None:
        self.queue = None
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
