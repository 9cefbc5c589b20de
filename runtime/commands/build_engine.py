"""``diffseg build-engine``: build (and cache) an engine for this machine, and check it against onnxruntime fp32."""

from __future__ import annotations

import argparse
import time

DESCRIPTION = """Build the engine of a model package for this machine and cache it (TensorRT plans are keyed by GPU,
compute capability, TensorRT version, ONNX sha256, precision and shape), then with --verify compare the engine's
output with onnxruntime fp32 on reference inputs and print the error (limits: fp32 1e-4, fp16 1e-2, bf16 2e-2).
Works for every backend: tensorrt, onnxruntime-tensorrt, onnxruntime-cuda and torch on GPUs; openvino,
onnxruntime and torch on CPUs. Exit status 1 when the check fails."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", default="default", help="model package (folder, .zip) or shipped name")
    parser.add_argument("--backend", default="auto", help="backend to build (default: auto)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="precision (default: backend's)")
    parser.add_argument("--verify", action="store_true", help="compare against onnxruntime fp32")


def run(args: argparse.Namespace) -> int:
    from diffseg.runtime.backends import get_backend
    from diffseg.runtime.manifest import load_package
    from diffseg.runtime.verify import verify_backend

    package = load_package(args.model)
    start = time.perf_counter()
    backend = get_backend(args.backend, package, args.precision)
    print(f"engine ready: {backend.describe()} in {time.perf_counter() - start:.1f} s")
    if not args.verify:
        return 0
    result = verify_backend(backend, package)
    verdict = "ok" if result.passed else "FAILED"
    print(
        f"verify {result.name} vs onnxruntime fp32: relative error {result.rel_error:.2e} "
        f"(limit {result.limit:.0e}), max abs {result.max_abs_error:.2e}, finite {result.finite}: {verdict}"
    )
    return 0 if result.passed else 1
