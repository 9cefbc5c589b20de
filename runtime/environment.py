"""What this installation has: package versions, the extension's build, CPU features, backends and devices, and the
DICOM transfer syntaxes it decodes."""

from __future__ import annotations

import importlib
import os
import platform
from typing import Any

__all__ = ["collect_info", "cpu_info"]


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name") and model in ("unknown", "", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags]
    return {"model": model, "logical_cores": os.cpu_count() or 1, "isa": isa}


def _extension() -> dict[str, Any]:
    try:
        from diffseg import _ext
    except ImportError as exc:
        return {"error": str(exc)}
    return dict(_ext.build_info())


def _module_version(name: str) -> str | None:
    try:
        mod = importlib.import_module(name)
    except Exception:  # a broken optional backend must not break `info`
        return None
    return str(getattr(mod, "__version__", "unknown"))


def _backends() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    v = _module_version("onnxruntime")
    if v:
        import onnxruntime as ort

        out["onnxruntime"] = {"available": True, "version": v, "devices": ort.get_available_providers()}
    else:
        out["onnxruntime"] = {"available": False, "reason": 'pip install "diffseg[cpu]"'}
    v = _module_version("openvino")
    if v:
        import openvino as ov

        out["openvino"] = {"available": True, "version": v, "devices": list(ov.Core().available_devices)}
    else:
        out["openvino"] = {"available": False, "reason": 'pip install "diffseg[cpu]"'}
    v = _module_version("tensorrt")
    if v:
        out["tensorrt"] = {"available": True, "version": v, "devices": ["cuda"]}
    else:
        out["tensorrt"] = {"available": False, "reason": 'pip install "diffseg[tensorrt]" on a machine with a GPU'}
    # torch is only imported here because `info` is asked for; the runtime never imports it otherwise.
    v = _module_version("torch")
    if v:
        import torch

        devices = ["cpu"] + [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        out["torch"] = {"available": True, "version": v, "devices": devices}
    else:
        out["torch"] = {"available": False, "reason": 'pip install "diffseg[export]"'}
    return out


def _engines() -> dict[str, dict[str, Any]]:
    from .backends import backend_capabilities

    return backend_capabilities()


def _codecs() -> list[dict[str, Any]] | dict[str, str]:
    """Each transfer syntax pydicom has a decoder for: decodable here or not, by which plugins (``diffseg serve``
    accepts the decodable ones); ``{"error": ...}`` when pydicom's decoders cannot be asked."""
    try:
        from .dicom.codecs import transfer_syntax_support

        return [s.as_dict() for s in transfer_syntax_support()]
    except Exception as exc:  # a broken codec plugin must not break `info`
        return {"error": f"{type(exc).__name__}: {exc}"}


def collect_info() -> dict[str, Any]:
    import numpy as np

    from diffseg import __version__

    return {
        "version": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "extension": _extension(),
        "cpu": cpu_info(),
        "backends": _backends(),
        "engines": _engines(),
        "transfer_syntaxes": _codecs(),
    }
