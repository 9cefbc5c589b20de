"""Slice geometry of a DICOM series, and exact re-indexing of a volume onto a grid that holds the same voxels.

A series is a stack of planes. Each plane has ImageOrientationPatient (row direction r, column direction c)
and ImagePositionPatient p (centre of its first pixel, mm, LPS). Slices are sorted along the normal n = r ×
c by d = n · p (as GDCM, ITK and MONAI Deploy do), never by InstanceNumber or file name. The stack is a
volume only when every plane has the same orientation, pixel spacing and size, the steps of d are equal, and
every p lies on the line p₀ + d·n (otherwise the gantry was tilted or the stack is sheared).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..volume import Volume
from .errors import DicomInputError

__all__ = ["GeometryOptions", "SliceStack", "align_to_grid", "sort_slices"]


@dataclass(frozen=True)
class GeometryOptions:
    """Tolerances of the slice-geometry checks.

    Attributes:
        orientation_atol: largest difference between direction cosines of two slices, and largest |r · c|.
        spacing_rtol: largest deviation of one slice step from the median step, relative to the median (a
            gap of one missing slice is a deviation of 1.0).
        duplicate_mm: two slices closer than this along the normal are duplicates.
        tilt_mm: largest in-plane offset of a slice position from the line through the first slice along the
            normal (a tilted gantry of 1° shifts 3 mm slices by 0.05 mm each).
    """

    orientation_atol: float = 1e-3
    spacing_rtol: float = 0.01
    duplicate_mm: float = 0.01
    tilt_mm: float = 0.05

    def __post_init__(self) -> None:
        for name in ("orientation_atol", "spacing_rtol", "duplicate_mm", "tilt_mm"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value}")


@dataclass(frozen=True)
class SliceStack:
    """The geometry of a sorted slice stack.

    Attributes:
        order: indices into the input lists, sorted along the normal (ascending d).
        origin: ImagePositionPatient of the first sorted slice.
        spacing: (column spacing x, row spacing y, slice step z), mm.
        direction: 3×3 row-major matrix whose columns are r, c and n (the Volume convention).
    """

    order: np.ndarray
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]


def _floats(value: object, n: int, what: str, name: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise DicomInputError(f"{name}: {what} is not numeric: {value!r}") from None
    if arr.size != n or not np.all(np.isfinite(arr)):
        raise DicomInputError(f"{name}: {what} must hold {n} finite numbers, got {value!r}")
    return arr


def sort_slices(
    positions: Sequence[Sequence[float]],
    orientations: Sequence[Sequence[float]],
    pixel_spacings: Sequence[Sequence[float]],
    name: str,
    options: GeometryOptions | None = None,
) -> SliceStack:
    """Sort the slices of a series along its normal and check that they form a regular volume.

    Args:
        positions: ImagePositionPatient of each slice.
        orientations: ImageOrientationPatient of each slice.
        pixel_spacings: PixelSpacing (row spacing, column spacing) of each slice.
        name: the series, as messages should name it.
        options: tolerances; ``None`` uses the defaults.

    Returns:
        The sort order and the grid of the volume.

    Raises:
        DicomInputError: fewer than 2 slices, inconsistent or non-orthogonal orientation, inconsistent pixel
            spacing, duplicate positions, non-uniform spacing (a missing slice), or a tilted/sheared stack.
            The message names ``name`` and the slices concerned.
    """
    opt = options or GeometryOptions()
    n_slices = len(positions)
    if n_slices < 2:
        raise DicomInputError(f"{name}: a volume needs at least 2 slices, got {n_slices}")
    iop = np.stack([_floats(o, 6, "ImageOrientationPatient", name) for o in orientations])
    ipp = np.stack([_floats(p, 3, "ImagePositionPatient", name) for p in positions])
    spacing = np.stack([_floats(s, 2, "PixelSpacing", name) for s in pixel_spacings])
    row, col, normal = _plane_axes(iop, name, opt)
    worst = int(np.argmax(np.abs(spacing - spacing[0]).max(axis=1)))
    if np.abs(spacing[worst] - spacing[0]).max() > opt.spacing_rtol * spacing[0].min():
        raise DicomInputError(
            f"{name}: inconsistent PixelSpacing: slice 0 has {spacing[0].tolist()} mm, "
            f"slice {worst} has {spacing[worst].tolist()} mm"
        )
    d = ipp @ normal
    order = np.argsort(d, kind="stable")
    d_sorted, ipp_sorted = d[order], ipp[order]
    step = _slice_step(d_sorted, ipp_sorted, order, name, opt)
    _check_not_tilted(d_sorted, ipp_sorted, normal, name, opt)
    direction = np.stack([row, col, normal], axis=1)
    return SliceStack(
        order=order,
        origin=tuple(float(v) for v in ipp_sorted[0]),
        spacing=(float(spacing[0, 1]), float(spacing[0, 0]), step),
        direction=tuple(float(v) for v in direction.ravel()),
    )


def _plane_axes(iop: np.ndarray, name: str, opt: GeometryOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row direction r, column direction c (made exactly orthonormal) and normal n = r × c of the slices, checked
    to be the same on every slice and made of orthogonal unit vectors."""
    worst = int(np.argmax(np.abs(iop - iop[0]).max(axis=1)))
    if np.abs(iop[worst] - iop[0]).max() > opt.orientation_atol:
        raise DicomInputError(
            f"{name}: inconsistent ImageOrientationPatient: slice 0 has {iop[0].tolist()}, "
            f"slice {worst} has {iop[worst].tolist()}"
        )
    row, col = iop[0, :3], iop[0, 3:]
    if abs(np.linalg.norm(row) - 1) > opt.orientation_atol or abs(np.linalg.norm(col) - 1) > opt.orientation_atol:
        raise DicomInputError(f"{name}: ImageOrientationPatient {iop[0].tolist()} is not made of unit vectors")
    if abs(float(row @ col)) > opt.orientation_atol:
        angle = np.degrees(np.arccos(np.clip(row @ col, -1, 1)))
        raise DicomInputError(
            f"{name}: non-orthogonal ImageOrientationPatient: rows and columns at {angle:.2f}° instead of 90°"
        )
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    col = col - (row @ col) * row
    col /= np.linalg.norm(col)
    return row, col, np.cross(row, col)


def _slice_step(
    d_sorted: np.ndarray, ipp_sorted: np.ndarray, order: np.ndarray, name: str, opt: GeometryOptions
) -> float:
    """The slice step (mm), the median of the sorted positions' steps along the normal, checked to be uniform and
    free of duplicates."""
    steps = np.diff(d_sorted)
    dup = np.nonzero(steps < opt.duplicate_mm)[0]
    if dup.size:
        k = int(dup[0])
        raise DicomInputError(
            f"{name}: duplicate slice positions ({dup.size} repeated): e.g. slices {int(order[k])} and "
            f"{int(order[k + 1])} at {ipp_sorted[k].round(3).tolist()} mm (several acquisitions or time "
            "frames in one series?)"
        )
    step = float(np.median(steps))
    bad = np.nonzero(np.abs(steps - step) > opt.spacing_rtol * step)[0]
    if bad.size:
        k = int(bad[0])
        ratio = steps[k] / step
        what = (
            f"{round(ratio) - 1} missing slice(s)"
            if ratio > 1.5 and abs(ratio - round(ratio)) < 0.1
            else "non-uniform slice spacing"
        )
        raise DicomInputError(
            f"{name}: {what}: the step between positions {d_sorted[k]:.3f} and {d_sorted[k + 1]:.3f} mm "
            f"along the normal is {steps[k]:.3f} mm, the median step is {step:.3f} mm ({bad.size} irregular "
            "step(s))"
        )
    return step


def _check_not_tilted(
    d_sorted: np.ndarray, ipp_sorted: np.ndarray, normal: np.ndarray, name: str, opt: GeometryOptions
) -> None:
    """Refuse a stack whose positions leave the line through the first one along the normal (tilt or shear)."""
    lateral = (ipp_sorted - ipp_sorted[0]) - np.outer(d_sorted - d_sorted[0], normal)
    offset = np.linalg.norm(lateral, axis=1)
    if offset.max() > opt.tilt_mm:
        height = float(d_sorted[-1] - d_sorted[0])
        angle = np.degrees(np.arctan2(float(offset[-1]), height))
        raise DicomInputError(
            f"{name}: tilted gantry or sheared slice stack: slice positions move {offset.max():.2f} mm in "
            f"plane over {height:.1f} mm along the normal (about {angle:.1f}°); resample it to an orthogonal "
            "grid first"
        )


def align_to_grid(volume: Volume, reference: Volume, tol: float = 1e-3) -> Volume:
    """Re-index ``volume`` onto ``reference``'s grid when both hold the same voxel centres.

    The same grid may be stored with axes flipped or permuted (a NIfTI written in RAS, a mask read back by
    another tool): this finds the permutation and flips that map one onto the other, exactly, with no
    interpolation.

    Args:
        volume: the volume to re-index (e.g. a mask).
        reference: the target grid (e.g. the CT as loaded from DICOM).
        tol: tolerance in voxels of ``reference`` for the voxel centres to coincide.

    Returns:
        A ``Volume`` on ``reference``'s grid (same origin, spacing, direction) holding ``volume``'s values.

    Raises:
        ValueError: the two grids do not hold the same voxel centres (resample ``volume`` first).
    """
    ref_shape = np.asarray(reference.size_xyz)
    # Index axis j of `volume`, expressed in reference index units: must be ±(unit vector of one axis).
    axes = (volume.direction_matrix * np.asarray(volume.spacing)).T  # row j = physical step of axis j
    in_ref = (axes @ reference.direction_matrix) / np.asarray(reference.spacing)
    start = reference.physical_to_index(np.asarray(volume.origin))
    perm, signs = [], []
    for j in range(3):
        k = int(np.argmax(np.abs(in_ref[j])))
        unit = np.zeros(3)
        unit[k] = np.sign(in_ref[j, k])
        if not np.allclose(in_ref[j], unit, atol=tol) or k in perm:
            raise ValueError(
                f"volume grid (spacing {volume.spacing}, direction {volume.direction}) is not the "
                f"reference grid (spacing {reference.spacing}, direction {reference.direction}) up to "
                "axis flips and permutations: resample it first"
            )
        perm.append(k)
        signs.append(int(unit[k]))
    size = np.asarray(volume.size_xyz)
    for j in range(3):
        k = perm[j]
        want = 0.0 if signs[j] > 0 else float(ref_shape[k] - 1)
        if size[j] != ref_shape[k] or abs(start[k] - want) > tol:
            raise ValueError(
                f"volume grid (size {tuple(volume.size_xyz)}, origin {volume.origin}) does not cover "
                f"the reference grid (size {tuple(reference.size_xyz)}, origin {reference.origin}) "
                "voxel for voxel: resample it first"
            )
    # numpy axis of ITK axis a is 2 - a; output numpy axis (2 - perm[j]) takes input numpy axis (2 - j).
    source_for_output = [0, 0, 0]
    for j in range(3):
        source_for_output[2 - perm[j]] = 2 - j
    array = np.transpose(volume.array, source_for_output)
    flips = tuple(2 - perm[j] for j in range(3) if signs[j] < 0)
    if flips:
        array = np.flip(array, axis=flips)
    return reference.with_array(np.ascontiguousarray(array))
