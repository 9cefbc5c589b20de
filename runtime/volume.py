"""A 3D image with its physical geometry, the one type that every stage passes around.

Axis order is written down once, here: ``array`` is indexed ``[z, y, x]`` (numpy order, slowest axis first), while
``spacing``, ``origin`` and the columns of ``direction`` are in ITK order ``(x, y, z)``. ``origin`` is the
physical position (mm, LPS) of the centre of voxel ``[0, 0, 0]``; column ``j`` of ``direction`` is the unit
vector of index axis ``j`` (x, y, z). The physical point of index ``(i, j, k)`` (x, y, z) is
``origin + direction @ (spacing * (i, j, k))``, as in SimpleITK.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = ["Volume", "read_volume", "write_volume"]


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D array with spacing, origin and direction (see the module docstring for conventions).

    Attributes:
        array: voxel values indexed ``[z, y, x]``.
        spacing: voxel size in mm along index axes x, y, z.
        origin: physical position (mm) of the centre of voxel 0.
        direction: 3×3 direction cosines, column j = index axis j.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3D [z, y, x], got shape {self.array.shape}")
        if len(self.spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be three positive numbers (mm), got {self.spacing}")
        if len(self.origin) != 3 or not all(np.isfinite(self.origin)):
            raise ValueError(f"origin must be three finite numbers (mm), got {self.origin}")
        d = np.asarray(self.direction, dtype=np.float64)
        if d.size != 9:
            raise ValueError(f"direction must hold 9 numbers (3×3, row-major), got {d.size}")
        if not np.allclose(d.reshape(3, 3).T @ d.reshape(3, 3), np.eye(3), atol=1e-4):
            raise ValueError(f"direction must be orthonormal, got {tuple(d)}")
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in d))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(z, y, x)``."""
        return self.array.shape  # type: ignore[return-value]

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        """Number of voxels along x, y, z (ITK order)."""
        z, y, x = self.array.shape
        return (x, y, z)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def index_to_physical(self, index_xyz: np.ndarray) -> np.ndarray:
        """Physical points (mm) of continuous indices given as ``[..., 3]`` in x, y, z order."""
        idx = np.asarray(index_xyz, dtype=np.float64)
        return np.asarray(self.origin) + (idx * np.asarray(self.spacing)) @ self.direction_matrix.T

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous indices (x, y, z) of physical points given as ``[..., 3]``."""
        p = np.asarray(points, dtype=np.float64) - np.asarray(self.origin)
        return (p @ self.direction_matrix) / np.asarray(self.spacing)

    def with_array(self, array: np.ndarray) -> Volume:
        """The same grid holding another array of the same shape."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction)

    def same_grid(self, other: Volume, tol: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def to_sitk(self) -> sitk.Image:
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        import SimpleITK as sitk

        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components")
        return cls(sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def __repr__(self) -> str:
        from .orientation import orientation_code

        mb = self.array.nbytes / 2**20
        sp = ", ".join(f"{s:.3g}" for s in self.spacing)
        return (
            f"Volume(shape(z,y,x)={self.shape}, spacing(x,y,z)=({sp}) mm, "
            f"orientation={orientation_code(self.direction)}, dtype={self.array.dtype}, {mb:.1f} MiB)"
        )


def read_volume(path: str | Path) -> Volume:
    """Read a NIfTI/NRRD/MHA file (anything SimpleITK reads) as a ``Volume``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable 3D scalar image; the message names the file.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise ValueError(f"{path}: cannot read image ({first})") from None
    try:
        return Volume.from_sitk(image)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def write_volume(volume: Volume, path: str | Path) -> Path:
    """Write atomically: into a temporary file beside the target, then rename."""
    import SimpleITK as sitk

    from .atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        sitk.WriteImage(volume.to_sitk(), str(tmp), useCompression=True)
    return path
