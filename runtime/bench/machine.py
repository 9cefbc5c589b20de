"""The machine a benchmark ran on, and its measured peak arithmetic rate.

The peak is measured, not taken from a datasheet: a large dense matrix product at the engine's precision on the
engine's device, best of a few repeats after warm-up.

- CPU fp32: ``numpy.matmul`` on float32 (whatever BLAS numpy is built with; named in the result);
- CPU bf16: an OpenVINO ``MatMul`` compiled with ``INFERENCE_PRECISION_HINT=bf16`` (the engine that runs bf16 here);
- CUDA fp16/fp32: ``torch.matmul`` on the device (only when the torch backend is in use; torch is imported only then).

A matrix product is the best case for a CPU's or GPU's arithmetic units; 3D convolutions with few channels (the
default model has 8–64) reach a fraction of it.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from typing import Any

import numpy as np

from ..environment import cpu_info

__all__ = ["machine_info", "measure_peak_gflops", "package_versions"]

logger = logging.getLogger("diffseg")

_VERSION_MODULES = ("numpy", "SimpleITK", "onnxruntime", "openvino", "onnx", "scipy", "psutil")


def package_versions() -> dict[str, str | None]:
    """Versions of the packages that shape the timings (torch only if something already imported it)."""
    import importlib.metadata as md

    from diffseg import __version__

    out: dict[str, str | None] = {"diffseg": __version__, "python": platform.python_version()}
    for name in (*_VERSION_MODULES, *(("torch",) if "torch" in sys.modules else ())):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _blas() -> str | None:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception:  # numpy < 1.25 or a build without the record
        return None
    return f"{blas.get('name')} {blas.get('version')}".strip()


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, ISA flags, memory, OS, load and package versions."""
    import psutil

    cpu = cpu_info()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu["model"],
        "logical_cores": cpu["logical_cores"],
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpu["logical_cores"],
        "isa": cpu["isa"],
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "load_average": [round(v, 2) for v in load] if load else None,
        "blas": _blas(),
        "versions": package_versions(),
    }


def _best_rate(run, flops: float, repeats: int) -> float:
    run()  # warm-up: thread pools, page faults, kernel choice
    best = min(_timed(run) for _ in range(repeats))
    return flops / best / 1e9


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _numpy_peak(n: int, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty_like(a)
    gflops = _best_rate(lambda: np.matmul(a, b, out=c), 2.0 * n**3, repeats)
    return {"method": f"numpy float32 matmul {n}x{n} ({_blas() or 'BLAS unknown'})", "gflops": gflops}


def _openvino_peak(n: int, repeats: int, precision: str, threads: int | None) -> dict[str, Any]:
    import openvino as ov
    import openvino.opset13 as ops

    a = ops.parameter([n, n], np.float32, name="a")
    b = ops.constant(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    model = ov.Model([ops.matmul(a, b, False, False)], [a], "peak")
    config = {
        "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": int(threads or os.cpu_count() or 1),
    }
    compiled = ov.Core().compile_model(model, "CPU", config)
    got = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    request = compiled.create_infer_request()
    x = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    gflops = _best_rate(lambda: request.infer({0: x}, share_inputs=True), 2.0 * n**3, repeats)
    return {"method": f"OpenVINO MatMul {n}x{n} at {got} on the CPU", "gflops": gflops}


def _torch_cuda_peak(n: int, repeats: int, precision: str) -> dict[str, Any]:
    import torch

    dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    a = torch.randn((n, n), device="cuda", dtype=dtype)
    b = torch.randn((n, n), device="cuda", dtype=dtype)

    def run() -> None:
        for _ in range(10):
            torch.matmul(a, b)
        torch.cuda.synchronize()

    gflops = _best_rate(run, 10 * 2.0 * n**3, repeats)
    name = torch.cuda.get_device_name()
    tf32 = " (TF32 allowed)" if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32 else ""
    return {"method": f"torch.matmul {n}x{n} {precision}{tf32} on {name}", "gflops": gflops}


def measure_peak_gflops(
    device: str = "cpu", precision: str = "fp32", size: int | None = None, repeats: int = 5, threads: int | None = None
) -> dict[str, Any]:
    """Measure the peak dense arithmetic rate at ``precision`` on ``device`` (see the module docstring).

    Args:
        device: ``cpu`` or ``cuda``/``cuda:N`` (the current CUDA device is used).
        precision: ``fp32``, ``bf16`` (CPU: OpenVINO; CUDA: torch) or ``fp16`` (CUDA only).
        size: matrix side (None: 2048 on the CPU, 8192 on CUDA).
        repeats: timed repeats after one warm-up; the best is kept.
        threads: CPU threads for the OpenVINO measurement (None: all cores; numpy uses its BLAS's setting).

    Returns:
        ``{"method": str, "gflops": float, "device": str, "precision": str}``.

    Raises:
        ValueError: an unknown device or precision, or a combination not measured here (CPU fp16).
        RuntimeError: the library for the measurement is missing (openvino for CPU bf16, torch for CUDA).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if device == "cpu":
        n = size or 2048
        if precision == "fp32":
            out = _numpy_peak(n, repeats)
        elif precision == "bf16":
            try:
                out = _openvino_peak(n, repeats, "bf16", threads)
            except ImportError as exc:
                msg = f'the CPU bf16 peak is measured with OpenVINO: {exc}; pip install "diffseg[cpu]"'
                raise RuntimeError(msg) from exc
        else:
            raise ValueError(f"precision on the CPU must be fp32 or bf16, got {precision!r}")
    elif device.startswith("cuda"):
        if precision not in ("fp16", "fp32", "bf16"):
            raise ValueError(f"precision on CUDA must be fp16, fp32 or bf16, got {precision!r}")
        try:
            out = _torch_cuda_peak(size or 8192, repeats, precision)
        except ImportError as exc:
            raise RuntimeError(f'the CUDA peak is measured with torch: {exc}; pip install "diffseg[export]"') from exc
    else:
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    logger.info("peak %s %s: %.1f GFLOP/s (%s)", device, precision, out["gflops"], out["method"])
    return {**out, "device": device, "precision": precision}
