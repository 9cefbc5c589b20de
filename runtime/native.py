"""The compiled extension's loader and the argument checks its Python wrappers share.

The kernels live in the C++ extension ``diffseg._ext``; their Python wrappers are :mod:`diffseg.runtime.resample`
and :mod:`diffseg.runtime.components`. What both need is here: :func:`extension` (the loader, with a build hint
when the extension is missing), :func:`release_scratch`, and the checks that turn bad input into ``ValueError`` /
``TypeError`` naming the argument instead of a crash in C++ (:func:`threads_arg`, :func:`volume_array`,
:func:`check_out`), plus the grid pair in the form the resampling kernels take (:func:`index_affine`,
:func:`kernel_geometry`). Grids themselves are :class:`~diffseg.runtime.volume.GridSpec` (axis conventions in
:mod:`diffseg.runtime.volume`).
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from .volume import GridSpec, Volume, _is_sitk_image

__all__ = [
    "check_out",
    "extension",
    "index_affine",
    "kernel_geometry",
    "release_scratch",
    "threads_arg",
    "volume_array",
]


def extension() -> ModuleType:
    """The compiled extension ``diffseg._ext``.

    Raises:
        ImportError: the extension is not built; the message says how to build it.
    """
    try:
        from diffseg import _ext
    except ImportError as exc:
        raise ImportError(
            f"the compiled kernels (diffseg._ext) are not available ({exc}); build them with "
            "`pip install .` or, in a development checkout, `scripts/dev-install.sh`"
        ) from None
    return _ext


def release_scratch() -> None:
    """Free the scratch memory the kernels keep between calls (it is otherwise reused by the next call)."""
    extension().release_scratch()


def threads_arg(threads: int | None) -> int:
    """The kernels' thread count: None → OpenMP's default (``OMP_NUM_THREADS`` or all cores).

    Raises:
        ValueError: ``threads`` is neither None nor a positive integer.
    """
    if threads is None:
        return 0
    if isinstance(threads, bool) or not isinstance(threads, int | np.integer) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    return int(threads)


def index_affine(source: GridSpec, target: GridSpec) -> tuple[np.ndarray, np.ndarray]:
    """The map from a target index to a source continuous index, both (x, y, z): ``c = M @ o + b``.

    ``M = (D_s S_s)^-1 D_t S_t`` and ``b = (D_s S_s)^-1 (O_t - O_s)``. Entries below 1e-12 of the largest are
    set to exactly zero, so that equal or flipped directions give a diagonal ``M`` despite rounding.
    """
    inverse = np.linalg.inv(source.index_matrix)
    m = inverse @ target.index_matrix
    b = inverse @ (np.asarray(target.origin) - np.asarray(source.origin))
    scale = np.abs(m).max()
    m[np.abs(m) <= 1e-12 * scale] = 0.0
    return np.ascontiguousarray(m), np.ascontiguousarray(b)


def kernel_geometry(source: GridSpec, target: GridSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """What the resampling kernels take: the grids as ITK holds them, and whether the map is separable.

    ``(D_t S_t, O_t, (D_s S_s)^-1, O_s, separable)``; the kernels compose them in ITK's order of operations so
    that continuous indices, and hence results, match SimpleITK's to the bit on axis-aligned grids. The inverse
    is numpy's (LU), which is exact for axis-aligned matrices (ITK's SVD inverse gives the same there).
    ``separable`` says that the map is diagonal (equal or flipped directions): the kernels' fast path.
    """
    m, _ = index_affine(source, target)
    separable = bool(np.count_nonzero(m - np.diag(np.diag(m))) == 0)
    return (
        np.ascontiguousarray(target.index_matrix),
        np.asarray(target.origin, dtype=np.float64),
        np.ascontiguousarray(np.linalg.inv(source.index_matrix)),
        np.asarray(source.origin, dtype=np.float64),
        separable,
    )


def volume_array(value: object, name: str) -> np.ndarray:
    """The voxel array of an ndarray, ``Volume`` or ``SimpleITK.Image``, as a 3D C-contiguous array.

    Non-contiguous arrays are copied; read-only arrays are used as they are.

    Raises:
        TypeError: not an array, Volume or image.
        ValueError: not 3D.
    """
    if isinstance(value, Volume):
        array = value.array
    elif _is_sitk_image(value):
        import SimpleITK as sitk

        if value.GetDimension() != 3 or value.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"{name} must be a 3D scalar image, got {value.GetDimension()}D")
        array = sitk.GetArrayViewFromImage(value)
    elif isinstance(value, np.ndarray):
        array = value
    else:
        raise TypeError(f"{name} must be a numpy array, Volume or SimpleITK.Image, got {type(value).__name__}")
    if array.ndim != 3:
        raise ValueError(f"{name} must be a 3D array [z, y, x], got shape {array.shape}")
    return np.ascontiguousarray(array)


def check_out(out: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype, name: str = "out") -> None:
    """Checks a caller-provided output buffer: ndarray, shape, dtype, C-contiguous, writeable.

    Raises:
        TypeError: not an ndarray, or the wrong dtype.
        ValueError: wrong shape, not C-contiguous, or read-only.
    """
    if out is None:
        return
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {out.shape}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {out.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writeable")
