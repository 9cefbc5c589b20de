"""Engines behind one small interface: ``get_backend(name, package, ...)`` → ``Backend.run(x, t) -> y``."""

from __future__ import annotations

from .base import (
    BACKENDS,
    Backend,
    BackendUnavailableError,
    available_backends,
    backend_capabilities,
    get_backend,
    pick_auto,
)

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailableError",
    "available_backends",
    "backend_capabilities",
    "get_backend",
    "pick_auto",
]
