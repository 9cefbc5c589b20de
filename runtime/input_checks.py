"""How strictly a case's inputs are checked before the model sees them: the one set of overrides a user can give.

By default an input that is unreadable, non-finite or implausible for its modality is refused with the figures and
the option that overrides it. An override never passes silently: each use is recorded in the case's
``overrides`` (and ``report.json``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .image_file import check_grid_limits
from .units import check_units
from .volume import Volume

__all__ = ["InputChecks", "check_inputs", "finite_voxels"]


@dataclass(frozen=True)
class InputChecks:
    """The overrides of the input checks.

    Attributes:
        force_units: use values outside the plausible ranges as written (a CT that does not look like HU, a PET
            that does not look like SUVbw, DICOM SUV attributes outside their ranges) instead of refusing the case.
        nan_as: replace NaN and ±Inf voxels with this value instead of refusing the image.
    """

    force_units: bool = False
    nan_as: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.force_units, bool):
            raise TypeError(f"force_units must be True or False, got {self.force_units!r}")
        if self.nan_as is not None:
            if isinstance(self.nan_as, bool) or not isinstance(self.nan_as, int | float):
                raise TypeError(f"nan_as must be a number or None, got {self.nan_as!r}")
            if not math.isfinite(self.nan_as):
                raise ValueError(f"nan_as must be a finite number, got {self.nan_as!r}")


def finite_voxels(volume: Volume, source: str, nan_as: float | None) -> tuple[Volume, str | None]:
    """The volume if every voxel is finite; else refused, or with the non-finite voxels set to ``nan_as``.

    Returns:
        The volume to use and the override said in words (None when nothing was replaced).

    Raises:
        ValueError: non-finite voxels and ``nan_as`` None; the message gives their count and where they lie.
    """
    if not np.issubdtype(volume.array.dtype, np.floating):  # integers are always finite: no pass over them
        return volume, None
    bad = ~np.isfinite(volume.array)
    count = int(np.count_nonzero(bad))
    if count == 0:
        return volume, None
    slices = np.flatnonzero(bad.any(axis=(1, 2)))
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    where = (
        f"{count} of {bad.size} voxels are NaN or infinite, in {slices.size} slice(s) z={slices[0]}..{slices[-1]} "
        f"(first at z,y,x={first})"
    )
    if nan_as is None:
        raise ValueError(
            f"{source}: {where}; the image is damaged or was saved from a failed computation. Fix the image, or "
            f"pass --nan-as VALUE (e.g. --nan-as -1000 for a CT, 0 for a PET) to set them to VALUE"
        )
    array = np.where(bad, np.asarray(nan_as, dtype=volume.array.dtype), volume.array)
    return volume.with_array(array), f"{source}: {where}; set to {nan_as} (nan_as)"


def check_inputs(
    volumes: Mapping[str, Volume], sources: Mapping[str, str], checks: InputChecks
) -> tuple[dict[str, Volume], tuple[str, ...]]:
    """Every input volume checked before it goes onto the model grid, by modality code (``CT``, ``PT``, ...).

    Args:
        volumes: the inputs by modality code.
        sources: what to call each input in messages (its file or series), by modality code.
        checks: the overrides allowed.

    Returns:
        The volumes to use and every override applied, said in words.
    """
    used: dict[str, Volume] = {}
    overrides: list[str] = []
    for code, volume in volumes.items():
        check_grid_limits(volume.grid, sources.get(code, code))  # before any copy of an oversized volume
        volume, override = finite_voxels(volume, sources.get(code, code), checks.nan_as)
        overrides += [override] if override else []
        overrides += filter(None, [check_units(volume, code, sources.get(code, code), checks.force_units)])
        used[code] = volume
    return used, tuple(overrides)
