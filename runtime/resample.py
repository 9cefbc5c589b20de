"""Resampling between grids in physical space, with SimpleITK's rules, by the compiled kernels.

Three entry points, one per input type, so that the return type never depends on the input:
:func:`resample` (``Volume`` → ``Volume``), :func:`resample_array` (array + grids → array) and
:func:`resample_image` (``SimpleITK.Image`` → ``SimpleITK.Image``). The target is any grid: a ``Volume``, a
``SimpleITK.Image`` or a :class:`~diffseg.runtime.volume.GridSpec` (a grid without an array).

Modes:

- ``linear``: trilinear, float32 out (float32, float64, int16, uint16, uint8 in). Equal to
  ``SimpleITK.Resample(..., sitkLinear, default, sitkFloat32)`` to the last bit in our tests: samples within
  half a voxel of the edge clamp to the edge voxel, farther ones get ``default``.
- ``nearest``: the nearest voxel (half-way cases round up, as ITK), any 1/2/4/8-byte dtype, same dtype out.
- ``label_vote``: for label maps; each of the 8 trilinear taps votes for its label with its weight, the
  heaviest label wins and ties go to the smallest label (the one-hot-linear-then-argmax rule of nnU-Net in one
  pass). Integer or boolean dtypes, same dtype out.

Geometry: the source continuous index of each target voxel is one affine map of its index (see
:func:`~diffseg.runtime.native.kernel_geometry`); equal or flipped directions take the kernels' fast separable
path, any other relation (oblique, permuted axes) the general 8-tap path. Target grids may be larger or smaller
than the source; no part of the source needs to overlap.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Literal

import numpy as np

from .native import check_out, extension, kernel_geometry, threads_arg, volume_array
from .volume import GridSpec, Volume

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = ["MODES", "Mode", "resample", "resample_array", "resample_image"]

logger = logging.getLogger("diffseg")

Mode = Literal["linear", "nearest", "label_vote"]
MODES: tuple[str, ...] = ("linear", "nearest", "label_vote")

_LINEAR_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.float64, np.int16, np.uint16, np.uint8))


def _output_dtype(mode: str, dtype: np.dtype) -> np.dtype:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "linear":
        if dtype not in _LINEAR_DTYPES:
            names = ", ".join(str(t) for t in _LINEAR_DTYPES)
            raise TypeError(
                f"linear resampling takes {names} sources, got {dtype}; use 'nearest' or 'label_vote' for label maps"
            )
        return np.dtype(np.float32)
    if mode == "nearest":
        if dtype.kind not in "biuf" or dtype.itemsize not in (1, 2, 4, 8):
            raise TypeError(f"nearest resampling takes boolean, integer or float sources, got {dtype}")
        return dtype
    if dtype.kind not in "biu":
        raise TypeError(f"label_vote resampling takes integer or boolean label maps, got {dtype}")
    return dtype


def _fill_value(default: float, dtype: np.dtype, mode: str) -> np.ndarray:
    """``default`` as a one-element array of the output dtype, if it is exactly representable."""
    if mode == "linear":
        if not isinstance(default, int | float | np.number) or isinstance(default, bool):
            raise TypeError(f"default must be a number, got {default!r}")
        return np.array([default], np.float32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an out-of-range cast warns; it is reported below as an error
            value = np.array([default]).astype(dtype)
            exact = bool(np.all(value.astype(np.float64) == np.float64(default))) or (
                isinstance(default, float) and np.isnan(default) and dtype.kind == "f"
            )
    except (TypeError, ValueError, OverflowError):
        exact = False
    if not exact:
        raise ValueError(f"default {default!r} is not a value of the output dtype {dtype}")
    return value


def resample_array(
    array: np.ndarray,
    source: GridSpec | Volume | sitk.Image,
    target: GridSpec | Volume | sitk.Image,
    mode: Mode = "linear",
    default: float = 0.0,
    out: np.ndarray | None = None,
    *,
    threads: int | None = None,
) -> np.ndarray:
    """Resample a ``[z, y, x]`` array from the ``source`` grid onto the ``target`` grid.

    Args:
        array: voxel values on ``source``; non-contiguous arrays are copied first.
        source: the grid of ``array`` (its size must equal ``array.shape`` reversed).
        target: the grid to sample on.
        mode: ``"linear"``, ``"nearest"`` or ``"label_vote"`` (see the module docstring).
        default: value of target voxels outside the source.
        out: optional C-contiguous buffer of the target shape and the output dtype, written in full.
        threads: worker threads (None: OpenMP's default).

    Returns:
        The resampled array (``out`` if given): float32 for ``linear``, the source dtype otherwise.

    Raises:
        TypeError: unsupported dtype for the mode, or a wrong ``out`` dtype.
        ValueError: unknown mode, grids that do not match the array, ``default`` not representable, bad ``out``.
    """
    array = volume_array(array, "array")
    src = GridSpec.of(source, "source")
    dst = GridSpec.of(target, "target")
    if array.shape != src.shape:
        raise ValueError(
            f"array has shape {array.shape} (z, y, x) but the source grid has size {src.size_xyz} (x, y, z)"
        )
    if array.dtype == np.bool_ and mode == "linear":
        raise TypeError("linear resampling of a boolean mask is meaningless; use 'nearest' or 'label_vote'")
    out_dtype = _output_dtype(mode, array.dtype)
    fill = _fill_value(default, out_dtype, mode)
    check_out(out, dst.shape, out_dtype)
    if out is None:
        out = np.empty(dst.shape, out_dtype)
    geometry = kernel_geometry(src, dst)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "resample %s %s %s -> %s (%s path)",
            mode,
            array.dtype,
            array.shape,
            dst.shape,
            "separable" if geometry[4] else "general",
        )
    ext = extension()
    nthreads = threads_arg(threads)
    if mode == "linear":
        ext.resample_linear(array, out, geometry, float(fill[0]), nthreads)
    elif mode == "nearest":
        ext.resample_nearest(array, out, geometry, fill, nthreads)
    else:
        ext.resample_label_vote(array, out, geometry, fill, nthreads)
    return out


def resample(
    volume: Volume,
    reference: GridSpec | Volume | sitk.Image,
    mode: Mode = "linear",
    default: float = 0.0,
    out: np.ndarray | None = None,
    *,
    threads: int | None = None,
) -> Volume:
    """Resample a ``Volume`` onto the grid of ``reference`` (physical space, SimpleITK's rules).

    Args:
        volume: the image to resample.
        reference: the target grid (``Volume``, ``SimpleITK.Image`` or ``GridSpec``).
        mode: ``"linear"``, ``"nearest"`` or ``"label_vote"``.
        default: value of target voxels outside ``volume``.
        out: optional output buffer (see :func:`resample_array`).
        threads: worker threads (None: OpenMP's default).

    Returns:
        A ``Volume`` on the reference grid.

    Raises:
        TypeError, ValueError: as :func:`resample_array`.
    """
    if not isinstance(volume, Volume):
        raise TypeError(
            f"volume must be a Volume, got {type(volume).__name__} (use resample_array or "
            "resample_image for arrays and SimpleITK images)"
        )
    dst = GridSpec.of(reference, "reference")
    result = resample_array(volume.array, volume, dst, mode, default, out, threads=threads)
    return Volume(result, dst.spacing, dst.origin, dst.direction)


def resample_image(
    image: sitk.Image,
    reference: GridSpec | Volume | sitk.Image,
    mode: Mode = "linear",
    default: float = 0.0,
    *,
    threads: int | None = None,
) -> sitk.Image:
    """Resample a ``SimpleITK.Image`` onto the grid of ``reference``; a drop-in for ``SimpleITK.Resample``.

    The source pixels are read in place (no copy); the result is copied once into a new image.

    Args:
        image: a 3D scalar image.
        reference: the target grid.
        mode: ``"linear"`` (float32 result), ``"nearest"`` or ``"label_vote"`` (the image's pixel type).
        default: value of target voxels outside ``image``.
        threads: worker threads (None: OpenMP's default).

    Returns:
        A new ``SimpleITK.Image`` on the reference grid.

    Raises:
        TypeError, ValueError: as :func:`resample_array`.
    """
    import SimpleITK as sitk

    if not isinstance(image, sitk.Image):
        raise TypeError(f"image must be a SimpleITK.Image, got {type(image).__name__}")
    src = GridSpec.of(image, "image")
    dst = GridSpec.of(reference, "reference")
    array = volume_array(image, "image")
    result = resample_array(array, src, dst, mode, default, threads=threads)
    output = sitk.GetImageFromArray(result)
    output.SetSpacing(dst.spacing)
    output.SetOrigin(dst.origin)
    output.SetDirection(dst.direction)
    return output
