"""Reverse-diffusion sampling of a segmentation mask over a whole volume, in two loop orders.

- :func:`sample_step_major` (default): a global x_t per sample, one blended sliding-window pass per step, on the host
  or, with ``device_ops``, on the engine's device (:mod:`.step_major`, :mod:`.host_ops`, :mod:`.device_ops`);
- :func:`sample_window_major`: the whole chain per window, as Diff-UNet (:mod:`.window_major`).

What both share (inputs, tiling, noise order, results) is :mod:`.plan`.
"""

from __future__ import annotations

from collections.abc import Callable

from ..diffusion_schedule import SamplerOptions
from ..sliding_window import WindowOptions
from .device_ops import DeviceLayout, DeviceOps, step_vector
from .host_ops import HostOps
from .plan import EngineCounter, Retirement, SampleResult, SamplingPlan, binary_entropy
from .step_major import layout_of, sample_step_major
from .window_major import sample_window_major

__all__ = [
    "LOOP_ORDERS",
    "DeviceLayout",
    "DeviceOps",
    "EngineCounter",
    "HostOps",
    "Retirement",
    "SampleResult",
    "SamplerOptions",
    "SamplingPlan",
    "WindowOptions",
    "binary_entropy",
    "layout_of",
    "sample_step_major",
    "sample_window_major",
    "step_vector",
]

LOOP_ORDERS: dict[str, Callable[..., SampleResult]] = {
    "step_major": sample_step_major,
    "window_major": sample_window_major,
}
