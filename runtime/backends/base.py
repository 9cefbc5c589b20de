"""The backend interface, the registry of backends by name, and the ``auto`` choice.

A backend loads one engine of a model package for a fixed patch, keeps its buffers where its device is, and runs
``run(x, t) -> y`` with ``x`` float32 ``[B, C, *patch]``, ``t`` float32 ``[B]``, ``y`` float32 ``[B, out, *patch]``.
A backend or precision that cannot be had raises ``BackendUnavailableError``; nothing falls back silently.

What a backend can do is declared on the class, so that ``auto``, ``diffseg info`` and the pipeline ask the same
questions of every backend: ``precisions``; ``unavailable_reason()`` (why it cannot run here, or None);
``precision_reason(precision)`` (why it cannot run that precision here, or None); ``has_device_ops`` (whether
``device_ops(layout)`` keeps the sampler's x_t on the engine's device); ``conditioning_precisions`` (the
precisions at which it runs a model with a condition graph: ``run(x, t, features)`` and ``conditioner``); and, once
loaded, ``device``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..manifest import ModelPackage

if TYPE_CHECKING:
    from ..sampling.device_ops import DeviceLayout, DeviceOps

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailableError",
    "available_backends",
    "backend_capabilities",
    "check_threads",
    "conditioning_backends",
    "get_backend",
    "pick_auto",
]

logger = logging.getLogger("diffseg")


class BackendUnavailableError(RuntimeError):
    """The requested backend, provider, device or precision is not available here; the message says why and how."""


def check_threads(threads: object) -> int | None:
    """``threads`` as the engines take it: an int >= 1, or None for all cores (the one check of the option).

    Raises:
        ValueError: anything else (0 and negative numbers included: the engines read them as "all cores" or fail
            with a message that does not name the option).
    """
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int | np.integer) or threads < 1:
        raise ValueError(f"threads must be an int >= 1 (None: all cores), got {threads!r}")
    return int(threads)


# The methods that use the engine: once the backend is closed, each raises a RuntimeError that says so.
_ENGINE_METHODS = ("run", "run_bound", "run_tensor", "device_ops", "condition")


def _refused_when_closed(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def guarded(self: Backend, *args: Any, **kwargs: Any) -> Any:
        if self.closed:
            raise RuntimeError(
                f"backend {self.name!r} was closed; load the model again (a new Segmenter) to run more cases"
            )
        return method(self, *args, **kwargs)

    return guarded


def _closed_once(close: Callable[[Backend], None]) -> Callable[[Backend], None]:
    @functools.wraps(close)
    def close_once(self: Backend) -> None:
        if self.closed:
            return
        try:
            close(self)
        finally:
            self.closed = True

    return close_once


class Backend(ABC):
    """One engine, loaded for a fixed patch size.

    ``close()`` releases the engine; a second call does nothing, and the engine methods of every backend (``run``,
    ``run_bound``, ``run_tensor``, ``device_ops``) raise a ``RuntimeError`` after it: a subclass's own definitions
    of them are wrapped once, here, when the subclass is created.

    Attributes:
        name: the registry name.
        precisions: the precisions it can run, its default first.
        has_device_ops: ``device_ops(layout)`` keeps the step-major loop's arrays on the engine's device.
        conditioning_precisions: the precisions at which it runs a model with a condition graph (none: it refuses
            one with ``BackendUnavailableError``).
        device: where the engine runs (``cpu``, ``cuda:0``), set when loaded.
        features: the names of the condition graph's features the denoiser takes after (x, t); () without one.
        closed: ``close()`` was called.
    """

    name: ClassVar[str] = ""
    precisions: ClassVar[tuple[str, ...]] = ()
    has_device_ops: ClassVar[bool] = False
    conditioning_precisions: ClassVar[tuple[str, ...]] = ()
    closed: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for method in _ENGINE_METHODS:
            if method in cls.__dict__:
                setattr(cls, method, _refused_when_closed(cls.__dict__[method]))
        if "close" in cls.__dict__:
            cls.close = _closed_once(cls.__dict__["close"])  # type: ignore[method-assign]

    def __init__(self, package: ModelPackage, precision: str, threads: int | None = None) -> None:
        self.threads = check_threads(threads)
        if precision not in self.precisions:
            raise BackendUnavailableError(
                f"backend {self.name!r} runs precisions {list(self.precisions)}, not {precision!r}"
            )
        m = package.manifest
        self.features: tuple[str, ...] = m.conditioning
        if self.features and precision not in self.conditioning_precisions:
            where = "; ".join(f"{name} at {', '.join(p)}" for name, p in conditioning_backends().items())
            raise BackendUnavailableError(
                f"backend {self.name!r} at {precision} cannot run {m.name!r}: the model has a condition graph "
                f"(features {list(self.features)}), which runs on {where}"
            )
        self.package = package
        self.precision = precision
        self.in_channels = m.in_channels
        self.image_channels = len(m.inputs)
        self.out_channels = m.output_channels
        self.patch = tuple(m.patch_size)
        self.device = "cpu"

    @classmethod
    @abstractmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run on this machine (missing library, provider or device), or None."""

    @classmethod
    def precision_reason(cls, precision: str) -> str | None:
        """Why this backend cannot run ``precision`` here, or None."""
        return None if precision in cls.precisions else f"supported: {list(cls.precisions)}"

    @abstractmethod
    def run(self, x: np.ndarray, t: np.ndarray, features: Sequence[np.ndarray] = ()) -> np.ndarray:
        """One engine call: ``x`` [B, C, *patch] float32, ``t`` [B] float32 (and, for a model with a condition
        graph, its ``features`` of the rows' windows, each [B, ...]) → ``y`` [B, out, *patch] float32."""

    @property
    def conditioner(self) -> Callable[[np.ndarray], Sequence[np.ndarray]] | None:
        """The package's condition graph ``condition(images [B, C_img, *patch]) → features`` on this engine, or None
        when the model has none (the sampler then calls ``run(x, t)``)."""
        return self.condition if self.features else None

    def condition(self, images: np.ndarray) -> Sequence[np.ndarray]:
        """One call of the condition graph: ``images`` [B, C_img, *patch] float32 → the features, each [B, ...]
        float32, in the order of ``features``.

        Raises:
            BackendUnavailableError: the backend runs no condition graph (the package has none).
        """
        raise BackendUnavailableError(f"backend {self.name!r} has no condition graph loaded (the model has none)")

    @_refused_when_closed
    def device_ops(self, layout: DeviceLayout) -> DeviceOps:
        """The step-major loop's array work on this engine's device.

        Raises:
            BackendUnavailableError: the backend has none (``has_device_ops`` is false) or cannot run this layout.
        """
        raise BackendUnavailableError(f"backend {self.name!r} cannot keep the sampler's x_t on its device")

    def close(self) -> None:
        """Release the engine (sessions, device memory); a second call does nothing."""
        self.closed = True

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "precision": self.precision, "device": self.device}

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """What the class declares, for ``diffseg info`` and reports."""
        return {"precisions": list(cls.precisions), "device_ops": cls.has_device_ops}

    def _check(self, x: np.ndarray, t: np.ndarray, features: Sequence[np.ndarray] = ()) -> None:
        want = (self.in_channels, *self.patch)
        if x.ndim != 5 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must be [B, {', '.join(map(str, want))}], got {list(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be [B] = [{x.shape[0]}], got {list(t.shape)}")
        if len(features) != len(self.features):
            raise ValueError(
                f"features must be the condition graph's {len(self.features)} arrays {list(self.features)}, got "
                f"{len(features)}"
            )
        for name, f in zip(self.features, features, strict=True):
            if np.ndim(f) < 1 or np.shape(f)[0] != x.shape[0]:
                raise ValueError(f"feature {name} must be [B = {x.shape[0]}, ...], got {list(np.shape(f))}")

    def _check_images(self, images: np.ndarray) -> None:
        want = (self.image_channels, *self.patch)
        if images.ndim != 5 or tuple(images.shape[1:]) != want:
            raise ValueError(f"images must be [B, {', '.join(map(str, want))}], got {list(images.shape)}")

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# name -> (module, class); modules import their engine library only when loaded.
BACKENDS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("ort_backend", "OrtCpuBackend"),
    "onnxruntime-cuda": ("ort_backend", "OrtCudaBackend"),
    "onnxruntime-tensorrt": ("ort_backend", "OrtTensorrtBackend"),
    "openvino": ("openvino_backend", "OpenVinoBackend"),
    "tensorrt": ("tensorrt_backend", "TensorrtBackend"),
    "torch": ("torch_backend", "TorchBackend"),
}
INSTALL_HINTS = {
    "onnxruntime": 'pip install "diffseg[cpu]"',
    "onnxruntime-cuda": 'pip install "diffseg[gpu]" (onnxruntime-gpu, CUDA 12) on a machine with an NVIDIA GPU',
    "onnxruntime-tensorrt": 'pip install "diffseg[gpu,tensorrt]" on a machine with an NVIDIA GPU',
    "openvino": 'pip install "diffseg[cpu]"',
    "tensorrt": 'pip install "diffseg[tensorrt]" on a machine with an NVIDIA GPU',
    "torch": 'pip install "diffseg[export]"',
}


def _backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)} or 'auto', got {name!r}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


def conditioning_backends() -> dict[str, tuple[str, ...]]:
    """Each backend that runs a model with a condition graph → the precisions at which it does."""
    out: dict[str, tuple[str, ...]] = {}
    for name in BACKENDS:
        try:
            precisions = _backend_class(name).conditioning_precisions
        except ImportError:
            continue
        if precisions:
            out[name] = precisions
    return out


def available_backends() -> dict[str, str | None]:
    """Each backend name → None when it can run here, else the reason it cannot."""
    out: dict[str, str | None] = {}
    for name in BACKENDS:
        try:
            out[name] = _backend_class(name).unavailable_reason()
        except ImportError as exc:
            out[name] = f"{exc}; {INSTALL_HINTS[name]}"
    return out


def backend_capabilities() -> dict[str, dict[str, Any]]:
    """What each backend declares and whether it can run here: ``available``, ``reason``, ``precisions`` (each
    precision → None when it can run here, else why not), ``device_ops``."""
    out: dict[str, dict[str, Any]] = {}
    for name in BACKENDS:
        try:
            cls = _backend_class(name)
        except ImportError as exc:
            out[name] = {"available": False, "reason": f"{exc}; {INSTALL_HINTS[name]}", "precisions": {}}
            continue
        reason = cls.unavailable_reason()
        precisions = {p: (reason or cls.precision_reason(p)) for p in cls.precisions}
        out[name] = {"available": reason is None, "reason": reason, "precisions": precisions, **cls.capabilities()}
        out[name]["precisions"] = precisions
    return out


# Fastest first. On CPUs with native bf16, OpenVINO bf16 beats fp32 by about 1.7x on the default model
# (benchmarks/backends.py); onnxruntime's CPU provider is the slowest of the CPU engines for 3D convolutions.
_AUTO_ORDER = [
    ("tensorrt", "fp16"),
    ("onnxruntime-tensorrt", "fp16"),
    ("onnxruntime-cuda", "fp16"),
    ("torch", "fp16"),  # only on CUDA
    ("openvino", "bf16"),
    ("openvino", "fp32"),
    ("onnxruntime", "fp32"),
]


# Device nodes of the NVIDIA driver (Linux, containers) and of WSL's GPU paravirtualisation: without one, no GPU
# backend can run, and ``auto`` does not import their libraries (torch above all) to find that out.
_GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")
_GPU_BACKENDS = {"tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda"}


def _gpu_candidate(name: str, precision: str) -> bool:
    return name in _GPU_BACKENDS or (name == "torch" and precision == "fp16")


def pick_auto(precision: str | None = None, conditioned: bool = False) -> tuple[str, str]:
    """The fastest (backend, precision) available here; with ``precision`` given, the fastest for it.

    Candidates are tried fastest first and stop at the first that can run, so that only the libraries needed to
    decide are imported; GPU candidates are skipped without an import when the machine has no GPU device node.
    ``conditioned``: the model has a condition graph (only ``conditioning_precisions`` candidates).
    """
    has_gpu = any(os.path.exists(node) for node in _GPU_DEVICE_NODES)
    reasons: dict[str, str] = {}
    for name, prec in _AUTO_ORDER:
        if precision is not None and prec != precision:
            continue
        if _gpu_candidate(name, prec) and not has_gpu:
            reasons.setdefault(name, "no GPU device node (" + ", ".join(_GPU_DEVICE_NODES) + ")")
            continue
        try:
            cls = _backend_class(name)
            why = cls.unavailable_reason() or cls.precision_reason(prec)
            if why is None and conditioned and prec not in cls.conditioning_precisions:
                why = f"runs no condition graph at {prec}"
        except ImportError as exc:
            why = f"{exc}; {INSTALL_HINTS[name]}"
        if why is None:
            return name, prec
        reasons.setdefault(name, why)
    raise BackendUnavailableError(
        f"no backend can run precision {precision or 'any'} here: " + "; ".join(f"{k}: {v}" for k, v in reasons.items())
    )


def get_backend(name: str, package: ModelPackage, precision: str | None = None, threads: int | None = None) -> Backend:
    """Load ``package`` on backend ``name`` (or ``auto``), at ``precision`` (None: the backend's default).

    Raises:
        ValueError: unknown backend name, or ``threads`` not an int >= 1 or None.
        BackendUnavailableError: the backend or precision cannot run here (with the install hint).
    """
    threads = check_threads(threads)  # before a library is imported or an engine loaded
    if name == "auto":
        name, auto_precision = pick_auto(precision, conditioned=bool(package.manifest.conditioning))
        precision = precision or auto_precision
        logger.info("backend auto: picked %s at %s", name, precision)
    cls = _backend_class(name)
    reason = cls.unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {reason}; {INSTALL_HINTS[name]}")
    precision = precision or cls.precisions[0]
    why = cls.precision_reason(precision)
    if why is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run {precision}: {why}")
    return cls(package, precision, threads)
