"""Orientation codes (the three-letter 'RAS'/'LPS' names) for direction matrices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["orientation_code"]

# ITK's physical space is LPS: +x points to the patient's Left, +y Posterior, +z Superior.
_POSITIVE = "LPS"
_NEGATIVE = "RAI"


def orientation_code(direction: Sequence[float]) -> str:
    """Three letters naming where each index axis (x, y, z) points; '?' for an oblique axis."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    letters = []
    for j in range(3):
        column = d[:, j]
        k = int(np.argmax(np.abs(column)))
        if abs(column[k]) < 0.99:
            letters.append("?")
        else:
            letters.append(_POSITIVE[k] if column[k] > 0 else _NEGATIVE[k])
    return "".join(letters)
