"""OpenVINO on the CPU, fp32 or bf16 (bf16 only where the CPU computes it natively: AVX512-BF16 or AMX)."""

from __future__ import annotations

import os

import numpy as np

from .base import Backend, BackendUnavailableError

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

    def __init__(self, package, precision: str, threads: int | None = None) -> None:
        super().__init__(package, precision, threads)
        import openvino as ov

        self.core = ov.Core()
        self.model = self.core.read_model(str(package.engine("fp32").path))
        self.config = {
            "INFERENCE_PRECISION_HINT": _HINTS[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": int(threads or os.cpu_count() or 1),
        }
        self._compiled: dict[int, object] = {}
        self.device = "cpu"

    def _for_batch(self, batch: int):
        # A static shape per batch size compiles to faster kernels than a dynamic batch.
        if batch not in self._compiled:
            import openvino as ov

            model = self.model.clone()
            model.reshape({"x": ov.PartialShape([batch, self.in_channels, *self.patch]), "t": ov.PartialShape([batch])})
            compiled = self.core.compile_model(model, "CPU", self.config)
            got = compiled.get_property("INFERENCE_PRECISION_HINT")
            want = {"fp32": ov.Type.f32, "bf16": ov.Type.bf16}[self.precision]
            if got != want:
                raise BackendUnavailableError(f"OpenVINO compiled at {got}, not the requested {self.precision}")
            self._compiled[batch] = compiled.create_infer_request()
        return self._compiled[batch]

    def run(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        self._check(x, t)
        request = self._for_batch(x.shape[0])
        request.infer({"x": x, "t": t}, share_inputs=True)
        return np.array(request.get_output_tensor(0).data, copy=True)

    def close(self) -> None:
        self._compiled.clear()

    def describe(self) -> dict:
        import openvino as ov

        return {**super().describe(), "openvino": ov.get_version()}
