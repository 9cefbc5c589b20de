"""A bare ``DeviceLayout`` for tests that drive one executor operation at a time (no tasks, unit weights)."""

from __future__ import annotations

import numpy as np

from diffseg.runtime.sampling import DeviceLayout


def bare_layout(
    samples: int, padded: tuple[int, ...], patch: tuple[int, ...], image_channels: int, clip: float | None = None
) -> DeviceLayout:
    """K samples on ``padded``, noisy channel last, one output channel, no padding margin, no tasks."""
    return DeviceLayout(
        samples=samples,
        padded=tuple(padded),
        patch=tuple(patch),
        image_channels=image_channels,
        noisy_channel=image_channels,
        prediction_channel=0,
        output_channels=1,
        variance_channel=None,
        clip=clip,
        weight=np.ones(patch, np.float32),
        inv_weight_sum=np.ones(padded, np.float32),
        interior=None,
        pad_value=0.0,
        tasks=np.zeros((0, 2), np.int64),
        starts=np.zeros((0, 4), np.int64),
        skip_weight=None,
    )
