"""ONNX Runtime: CPU, CUDA (IO binding, device buffers reused across calls) and the TensorRT execution provider.

A model with a condition graph runs on the CPU backend (a second session on the condition file); the CUDA and
TensorRT providers refuse it at load (their IO bindings hold x, t and y only).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import Backend, BackendUnavailableError

if TYPE_CHECKING:
    from ..sampling.device_ops import DeviceLayout, DeviceOps

__all__ = ["OrtCpuBackend", "OrtCudaBackend", "OrtTensorrtBackend"]


def _providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


class _OrtBase(Backend):
    provider = "CPUExecutionProvider"
    ort_device = "cpu"  # where OrtValues of this backend live (onnxruntime's device name)
    device_id = 0
    has_device_ops = True  # OrtDeviceOps: the sampler's steps as ONNX graphs on the session's device

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            providers = _providers()
        except ImportError:
            return "onnxruntime is not installed"
        if cls.provider not in providers:
            return f"onnxruntime has no {cls.provider} (providers here: {providers})"
        return None

    def session_options(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = self.threads or os.cpu_count() or 1
        if self.provider != "CPUExecutionProvider":  # fail at load instead of quietly placing nodes on the CPU
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        so.log_severity_level = 3
        return so

    def _session(self, path: Path, providers: list) -> Any:
        """An InferenceSession on ``path`` with exactly the ``providers`` asked for, in that order."""
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), self.session_options(), providers=providers)
        # Every provider asked for must be active, in the order asked: onnxruntime otherwise drops one it cannot
        # start and runs the graph on the next (or appends the CPU provider behind a GPU one) without a word.
        wanted = [p if isinstance(p, str) else p[0] for p in providers]
        active = session.get_providers()
        if active[: len(wanted)] != wanted or active[0] != self.provider:
            raise BackendUnavailableError(f"onnxruntime activated providers {active}, not the requested {wanted}")
        self.providers = wanted
        return session

    def _open(self, path: Path, providers: list) -> None:
        self.session = self._session(path, providers)

    def device_ops(self, layout: DeviceLayout) -> DeviceOps:
        """The step-major loop's array work on this session's device (:class:`.ort_ops.OrtDeviceOps`)."""
        from .ort_ops import OrtDeviceOps

        return OrtDeviceOps(self, layout)

    def run_bound(self, x: Any, t: Any, y: Any) -> None:
        """One engine call on OrtValues already on the session's device, writing into ``y``."""
        io = self.session.io_binding()
        io.bind_ortvalue_input("x", x)
        io.bind_ortvalue_input("t", t)
        io.bind_ortvalue_output("y", y)
        self.session.run_with_iobinding(io)

    def helper_providers(self) -> list:
        """Providers for the sampler's small step graphs: the engine's device, without TensorRT (nothing to gain
        from an engine build for element-wise graphs)."""
        if self.ort_device == "cpu":
            return ["CPUExecutionProvider"]
        return [("CUDAExecutionProvider", {"device_id": self.device_id})]

    def close(self) -> None:
        self.session = None

    def describe(self) -> dict:
        import onnxruntime as ort

        # With the TensorRT provider, nodes TensorRT does not take run on the CUDA provider listed behind it.
        return {
            **super().describe(),
            "provider": self.provider,
            "providers": self.providers,
            "onnxruntime": ort.__version__,
        }


class OrtCpuBackend(_OrtBase):
    """onnxruntime on the CPU (fp32; the fp16 graph is slower than fp32 on CPUs).

    A model with a condition graph gets a second session on its condition file (``condition``); ``run`` feeds the
    features by name after x and t.
    """

    name = "onnxruntime"
    provider = "CPUExecutionProvider"
    precisions = ("fp32",)
    conditioning_precisions = ("fp32",)

    def __init__(self, package, precision: str, threads: int | None = None) -> None:
        super().__init__(package, precision, threads)
        self._open(package.engine(precision).path, ["CPUExecutionProvider"])
        self.condition_session = None
        if self.features:
            path = package.engine(precision, role="condition").path
            self.condition_session = self._session(path, ["CPUExecutionProvider"])

    def run(self, x: np.ndarray, t: np.ndarray, features: Sequence[np.ndarray] = ()) -> np.ndarray:
        self._check(x, t, features)
        return self.session.run(["y"], {"x": x, "t": t, **dict(zip(self.features, features, strict=True))})[0]

    def condition(self, images: np.ndarray) -> Sequence[np.ndarray]:
        """The condition graph on ``images`` [B, C_img, *patch]: the features, each [B, ...]."""
        if self.condition_session is None:
            return super().condition(images)
        self._check_images(images)
        images = np.ascontiguousarray(images, dtype=np.float32)
        return self.condition_session.run(list(self.features), {"image": images})

    def close(self) -> None:
        self.session = None
        self.condition_session = None


class OrtCudaBackend(_OrtBase):
    """onnxruntime CUDA provider with IO binding: device buffers per batch size, reused across calls.

    Written to the documented API (``io_binding``, ``OrtValue.ortvalue_from_shape_and_type``, ``update_inplace``);
    it cannot run on a machine without an NVIDIA GPU and onnxruntime-gpu, where it reports itself unavailable.
    """

    name = "onnxruntime-cuda"
    provider = "CUDAExecutionProvider"
    ort_device = "cuda"
    precisions = ("fp16", "fp32")

    def __init__(self, package, precision: str, threads: int | None = None, device_id: int = 0) -> None:
        super().__init__(package, precision, threads)
        self.device = f"cuda:{device_id}"
        self.device_id = device_id
        opts = {
            "device_id": device_id,
            "cudnn_conv_algo_search": "HEURISTIC",
            "cudnn_conv_use_max_workspace": "1",
            "do_copy_in_default_stream": "1",
        }
        self._open(package.engine(precision).path, [(self.provider, opts)])
        self._bound: dict[int, tuple] = {}

    def _binding(self, batch: int):
        import onnxruntime as ort

        if batch not in self._bound:
            x = ort.OrtValue.ortvalue_from_shape_and_type(
                [batch, self.in_channels, *self.patch], np.float32, "cuda", self.device_id
            )
            t = ort.OrtValue.ortvalue_from_shape_and_type([batch], np.float32, "cuda", self.device_id)
            y = ort.OrtValue.ortvalue_from_shape_and_type(
                [batch, self.out_channels, *self.patch], np.float32, "cuda", self.device_id
            )
            io = self.session.io_binding()
            io.bind_ortvalue_input("x", x)
            io.bind_ortvalue_input("t", t)
            io.bind_ortvalue_output("y", y)
            self._bound[batch] = (io, x, t, y)
        return self._bound[batch]

    def run(self, x: np.ndarray, t: np.ndarray, features: Sequence[np.ndarray] = ()) -> np.ndarray:
        self._check(x, t, features)  # a model with a condition graph was refused at load
        io, xv, tv, yv = self._binding(x.shape[0])
        xv.update_inplace(np.ascontiguousarray(x))
        tv.update_inplace(np.ascontiguousarray(t))
        self.session.run_with_iobinding(io)
        return yv.numpy()


class OrtTensorrtBackend(OrtCudaBackend):
    """onnxruntime's TensorRT execution provider with an engine and timing cache beside the user's cache dir."""

    name = "onnxruntime-tensorrt"
    provider = "TensorrtExecutionProvider"
    precisions = ("fp16", "fp32")

    def __init__(
        self, package, precision: str, threads: int | None = None, device_id: int = 0, max_batch: int = 16
    ) -> None:
        Backend.__init__(self, package, precision, threads)
        from ..engine_cache import cache_dir

        self.device = f"cuda:{device_id}"
        self.device_id = device_id
        cache = cache_dir("ort-trt")
        shape = "x".join(map(str, (self.in_channels, *self.patch)))
        trt_opts = {
            "device_id": device_id,
            "trt_fp16_enable": precision == "fp16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            "trt_profile_min_shapes": f"x:1x{shape},t:1",
            "trt_profile_opt_shapes": f"x:{max_batch}x{shape},t:{max_batch}",
            "trt_profile_max_shapes": f"x:{max_batch}x{shape},t:{max_batch}",
            "trt_builder_optimization_level": 3,
        }
        # The fp32 graph is given to TensorRT; its fp16 flag sets the precision (TRT 10 weak typing).
        self._open(
            package.engine("fp32").path,
            [(self.provider, trt_opts), ("CUDAExecutionProvider", {"device_id": device_id})],
        )
        self._bound = {}
