"""Native TensorRT: build a plan from the fp16 ONNX on the target GPU, cache it by key, run with execute_async_v3.

Written to the TensorRT 10 Python API (``OnnxParser``, ``build_serialized_network``, named I/O tensors,
``set_tensor_address``, ``execute_async_v3``) with CUDA memory from cuda-python. It cannot run on a machine without
an NVIDIA GPU and the ``tensorrt`` wheel, where it reports itself unavailable; ``diffseg build-engine --verify``
checks a built plan against onnxruntime fp32 on stored reference inputs. A model with a condition graph is refused
at load (``conditioning_precisions`` is empty).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..engine_cache import cache_dir, plan_key
from .base import Backend, BackendUnavailableError

__all__ = ["TensorrtBackend", "build_plan"]

logger = logging.getLogger("diffseg")


def _cuda():
    from cuda.bindings import runtime as cudart  # cuda-python >= 12.6

    return cudart


def _check_cuda(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def build_plan(
    onnx_path: Path, precision: str, batch: int, in_channels: int, patch: tuple[int, ...], workspace_gib: int = 8
) -> bytes:
    """Parse the ONNX graph and build a serialized plan with a static-batch optimisation profile."""
    import tensorrt as trt

    logger_trt = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger_trt)
    flags = 0
    if precision == "fp16" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # precision from the fp16 graph
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger_trt)
    parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    config.builder_optimization_level = 3
    profile = builder.create_optimization_profile()
    shape = (batch, in_channels, *patch)
    profile.set_shape("x", (1, *shape[1:]), shape, shape)
    profile.set_shape("t", (1,), (batch,), (batch,))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build a plan from {onnx_path.name}")
    return bytes(plan)


class TensorrtBackend(Backend):
    name = "tensorrt"
    precisions = ("fp16", "fp32")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import tensorrt  # noqa: F401

            cudart = _cuda()
        except ImportError as exc:
            return f"tensorrt or cuda-python is not installed ({exc})"
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count == 0:
            return "no CUDA device"
        return None

    @classmethod
    def precision_reason(cls, precision: str) -> str | None:
        return None if precision in cls.precisions else f"supported: {list(cls.precisions)}"

    def __init__(self, package, precision: str, threads: int | None = None, batch: int = 8, device_id: int = 0) -> None:
        super().__init__(package, precision, threads)
        import tensorrt as trt

        cudart = _cuda()
        _check_cuda(cudart.cudaSetDevice(device_id))
        props = _check_cuda(cudart.cudaGetDeviceProperties(device_id))
        gpu = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        self.device = f"cuda:{device_id} ({gpu})"
        engine_file = package.engine(precision)
        self.batch = batch
        key = plan_key(
            gpu_name=gpu,
            compute_capability=f"{props.major}.{props.minor}",
            trt_version=trt.__version__,
            onnx_sha256=engine_file.sha256,
            precision=precision,
            shapes={"x": [batch, self.in_channels, *self.patch], "t": [batch]},
        )
        self.plan_path = cache_dir("tensorrt") / f"{key}.plan"
        if not self.plan_path.exists():
            logger.info("building TensorRT plan %s (first use on this GPU; cached afterwards)", self.plan_path.name)
            plan = build_plan(engine_file.path, precision, batch, self.in_channels, self.patch)
            from ..atomic import write_bytes_atomic

            write_bytes_atomic(self.plan_path, plan)  # a cut plan on a full disk must never be cached
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise BackendUnavailableError(f"cannot deserialize {self.plan_path} (stale cache? delete it)")
        self.context = self.engine.create_execution_context()
        self.stream = _check_cuda(cudart.cudaStreamCreate())
        self.sizes = {
            "x": batch * self.in_channels * int(np.prod(self.patch)) * 4,
            "t": batch * 4,
            "y": batch * self.out_channels * int(np.prod(self.patch)) * 4,
        }
        self.buffers = {k: _check_cuda(cudart.cudaMalloc(n)) for k, n in self.sizes.items()}
        for k, ptr in self.buffers.items():
            self.context.set_tensor_address(k, int(ptr))

    def run(self, x: np.ndarray, t: np.ndarray, features: Sequence[np.ndarray] = ()) -> np.ndarray:
        self._check(x, t, features)  # a model with a condition graph was refused at load
        cudart = _cuda()
        b = x.shape[0]
        if b > self.batch:
            raise ValueError(f"this plan takes batches up to {self.batch}, got {b}")
        self.context.set_input_shape("x", (b, self.in_channels, *self.patch))
        self.context.set_input_shape("t", (b,))
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        xc, tc = np.ascontiguousarray(x, np.float32), np.ascontiguousarray(t, np.float32)
        _check_cuda(cudart.cudaMemcpyAsync(self.buffers["x"], xc.ctypes.data, xc.nbytes, h2d, self.stream))
        _check_cuda(cudart.cudaMemcpyAsync(self.buffers["t"], tc.ctypes.data, tc.nbytes, h2d, self.stream))
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        y = np.empty((b, self.out_channels, *self.patch), np.float32)
        _check_cuda(cudart.cudaMemcpyAsync(y.ctypes.data, self.buffers["y"], y.nbytes, d2h, self.stream))
        _check_cuda(cudart.cudaStreamSynchronize(self.stream))
        return y

    def close(self) -> None:
        cudart = _cuda()
        for ptr in getattr(self, "buffers", {}).values():
            cudart.cudaFree(ptr)
        self.buffers = {}
