"""The compiled kernels' Python layer: grid specifications, input checks, and the entry points.

The kernels themselves live in the C++ extension ``diffseg._ext``; their Python wrappers are split by family:

- :mod:`diffseg.runtime.resample`: ``resample`` (Volume), ``resample_array`` (numpy), ``resample_image``
  (SimpleITK) — linear, nearest and label-vote resampling with SimpleITK's geometry;
- :mod:`diffseg.runtime.components`: ``connected_components``, ``label_components`` (labels and statistics in
  one pass), ``component_stats``, ``remove_small_components``.

All of them are re-exported here. This module also holds what both families share: :class:`GridSpec` (a grid
without an array), the extension loader, and the argument checks that turn bad input into ``ValueError`` /
``TypeError`` naming the argument, instead of a crash in C++.

Conventions (as :mod:`diffseg.runtime.volume`): arrays are indexed ``[z, y, x]``; sizes, spacing, origin and
direction columns are in ITK order ``(x, y, z)``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from .volume import Volume

if TYPE_CHECKING:
    import SimpleITK as sitk

    from .components import (
        ComponentStats,
        component_stats,
        connected_components,
        label_components,
        remove_small_components,
    )
    from .resample import resample, resample_array, resample_image

__all__ = [
    "ComponentStats",
    "GridSpec",
    "component_stats",
    "connected_components",
    "extension",
    "label_components",
    "release_scratch",
    "remove_small_components",
    "resample",
    "resample_array",
    "resample_image",
]

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

# Re-exported lazily (PEP 562) so that resample/components can import this module without a cycle.
_LAZY = {
    "resample": "resample",
    "resample_array": "resample",
    "resample_image": "resample",
    "ComponentStats": "components",
    "component_stats": "components",
    "connected_components": "components",
    "label_components": "components",
    "remove_small_components": "components",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__package__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    """The kernels' thread count: None → OpenMP's default (``OMP_NUM_THREADS`` or all cores)."""
    if threads is None:
        return 0
    if isinstance(threads, bool) or not isinstance(threads, int | np.integer) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    return int(threads)


@dataclass(frozen=True)
class GridSpec:
    """A sampling grid without an array: what a resampling target needs.

    Attributes:
        size_xyz: number of voxels along x, y, z (ITK order; the array shape is the reverse).
        spacing: voxel size in mm along index axes x, y, z.
        origin: physical position (mm) of the centre of voxel 0.
        direction: 3×3 direction cosines, row-major, column j = index axis j; orthonormal.
    """

    size_xyz: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = _IDENTITY

    def __post_init__(self) -> None:
        size = tuple(self.size_xyz)
        if len(size) != 3 or any(isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0 for s in size):
            raise ValueError(f"size_xyz must be three integers >= 0, got {self.size_xyz}")
        spacing = np.asarray(self.spacing, dtype=np.float64)
        if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise ValueError(f"spacing must be three positive numbers (mm), got {self.spacing}")
        origin = np.asarray(self.origin, dtype=np.float64)
        if origin.shape != (3,) or not np.all(np.isfinite(origin)):
            raise ValueError(f"origin must be three finite numbers (mm), got {self.origin}")
        d = np.asarray(self.direction, dtype=np.float64)
        if d.size != 9 or not np.all(np.isfinite(d)):
            raise ValueError(f"direction must hold 9 finite numbers (3×3, row-major), got {self.direction}")
        if not np.allclose(d.reshape(3, 3).T @ d.reshape(3, 3), np.eye(3), atol=1e-4):
            raise ValueError(f"direction must be orthonormal, got {tuple(d)}")
        object.__setattr__(self, "size_xyz", tuple(int(s) for s in size))
        object.__setattr__(self, "spacing", tuple(float(s) for s in spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in d.ravel()))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(z, y, x)``."""
        x, y, z = self.size_xyz
        return (z, y, x)

    @property
    def index_to_physical(self) -> np.ndarray:
        """The 3×3 matrix ``D·diag(spacing)`` taking an index (x, y, z) step to a physical step (mm)."""
        return np.asarray(self.direction).reshape(3, 3) @ np.diag(self.spacing)

    @classmethod
    def of(cls, grid: GridSpec | Volume | sitk.Image, name: str = "grid") -> GridSpec:
        """The grid of a ``GridSpec``, ``Volume`` or ``SimpleITK.Image``.

        Raises:
            TypeError: ``grid`` is none of these.
            ValueError: the image is not 3D.
        """
        if isinstance(grid, GridSpec):
            return grid
        if isinstance(grid, Volume):
            return cls(grid.size_xyz, grid.spacing, grid.origin, grid.direction)
        if _is_sitk_image(grid):
            if grid.GetDimension() != 3:
                raise ValueError(f"{name} must be a 3D image, got {grid.GetDimension()}D")
            return cls(tuple(grid.GetSize()), grid.GetSpacing(), grid.GetOrigin(), grid.GetDirection())
        raise TypeError(f"{name} must be a GridSpec, Volume or SimpleITK.Image, got {type(grid).__name__}")

    def physical_points(self, index_zyx: np.ndarray) -> np.ndarray:
        """Physical positions (mm, x, y, z) of continuous indices given as ``[..., 3]`` in **z, y, x** order."""
        idx = np.asarray(index_zyx, dtype=np.float64)[..., ::-1]
        return np.asarray(self.origin) + idx @ self.index_to_physical.T


def _is_sitk_image(obj: object) -> bool:
    return type(obj).__name__ == "Image" and type(obj).__module__.startswith("SimpleITK")


def index_affine(source: GridSpec, target: GridSpec) -> tuple[np.ndarray, np.ndarray]:
    """The map from a target index to a source continuous index, both (x, y, z): ``c = M @ o + b``.

    ``M = (D_s S_s)^-1 D_t S_t`` and ``b = (D_s S_s)^-1 (O_t - O_s)``. Entries below 1e-12 of the largest are
    set to exactly zero, so that equal or flipped directions give a diagonal ``M`` despite rounding.
    """
    inverse = np.linalg.inv(source.index_to_physical)
    m = inverse @ target.index_to_physical
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
        np.ascontiguousarray(target.index_to_physical),
        np.asarray(target.origin, dtype=np.float64),
        np.ascontiguousarray(np.linalg.inv(source.index_to_physical)),
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
