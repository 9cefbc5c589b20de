"""The grid family: :class:`GridSpec` (a sampling grid) and :class:`Volume` (an array on a grid).

Axis conventions, written down once for the whole package: arrays are indexed ``[z, y, x]`` (numpy order, slowest
axis first), while sizes (``size_xyz``), ``spacing``, ``origin`` and the columns of ``direction`` are in ITK order
``(x, y, z)``. ``origin`` is the physical position (mm, LPS) of the centre of voxel ``[0, 0, 0]``; ``direction``
is a 3×3 orthonormal matrix stored row-major, whose column ``j`` is the unit vector of index axis ``j`` (x, y, z).
The physical point of the continuous index ``(i, j, k)`` (x, y, z) is ``origin + direction @ (spacing * (i, j, k))``,
as in SimpleITK; :meth:`GridSpec.index_to_physical` and :meth:`GridSpec.physical_to_index` are that map and its
inverse, and ``Volume`` has the same methods with the same meaning (they delegate to :attr:`Volume.grid`).

:class:`GridSpec` holds the geometry checks: a ``Volume`` validates its spacing, origin and direction by building
its grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = ["GridSpec", "Volume", "read_volume", "write_volume"]

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _float_vector(value: object, name: str, what: str) -> np.ndarray:
    """``value`` as a float64 array, or a ``ValueError`` naming ``name`` that says what was expected."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {what}, got {value!r}") from None


@dataclass(frozen=True)
class GridSpec:
    """A sampling grid without an array: what a resampling target needs (see the module docstring for axes).

    The fields are validated and normalised to tuples of Python ``int`` / ``float``.

    Attributes:
        size_xyz: number of voxels along x, y, z (ITK order; the array shape is the reverse).
        spacing: voxel size in mm along index axes x, y, z; finite and positive.
        origin: physical position (mm) of the centre of voxel 0; finite.
        direction: 3×3 direction cosines, row-major, column j = index axis j; orthonormal (to 1e-4).

    Raises:
        ValueError: a field is out of range; the message names the field and the value.
    """

    size_xyz: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = _IDENTITY

    def __post_init__(self) -> None:
        try:
            size = tuple(self.size_xyz)
        except TypeError:
            size = ()
        if len(size) != 3 or any(isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0 for s in size):
            raise ValueError(f"size_xyz must be three integers >= 0, got {self.size_xyz!r}")
        spacing = _float_vector(self.spacing, "spacing", "three positive numbers (mm)")
        if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise ValueError(f"spacing must be three positive numbers (mm), got {self.spacing!r}")
        origin = _float_vector(self.origin, "origin", "three finite numbers (mm)")
        if origin.shape != (3,) or not np.all(np.isfinite(origin)):
            raise ValueError(f"origin must be three finite numbers (mm), got {self.origin!r}")
        d = _float_vector(self.direction, "direction", "9 finite numbers (3×3, row-major)")
        if d.size != 9 or not np.all(np.isfinite(d)):
            raise ValueError(f"direction must hold 9 finite numbers (3×3, row-major), got {self.direction!r}")
        m = d.reshape(3, 3)
        if not np.allclose(m.T @ m, np.eye(3), atol=1e-4):
            raise ValueError(f"direction must be orthonormal, got {tuple(float(v) for v in d.ravel())}")
        object.__setattr__(self, "size_xyz", tuple(int(s) for s in size))
        object.__setattr__(self, "spacing", tuple(float(s) for s in spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in d.ravel()))

    @classmethod
    def of(cls, grid: GridSpec | Volume | sitk.Image, name: str = "grid") -> GridSpec:
        """The grid of a ``GridSpec`` (itself), a ``Volume`` or a ``SimpleITK.Image``.

        Raises:
            TypeError: ``grid`` is none of these.
            ValueError: the image is not 3D.
        """
        if isinstance(grid, GridSpec):
            return grid
        if isinstance(grid, Volume):
            return grid.grid
        if _is_sitk_image(grid):
            if grid.GetDimension() != 3:
                raise ValueError(f"{name} must be a 3D image, got {grid.GetDimension()}D")
            return cls(tuple(grid.GetSize()), grid.GetSpacing(), grid.GetOrigin(), grid.GetDirection())
        raise TypeError(f"{name} must be a GridSpec, Volume or SimpleITK.Image, got {type(grid).__name__}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(z, y, x)``."""
        x, y, z = self.size_xyz
        return (z, y, x)

    @property
    def direction_matrix(self) -> np.ndarray:
        """The 3×3 direction matrix (column j = index axis j)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def index_matrix(self) -> np.ndarray:
        """The 3×3 matrix ``direction @ diag(spacing)`` taking an index step (x, y, z) to a physical step (mm)."""
        return self.direction_matrix @ np.diag(self.spacing)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(np.prod(self.spacing)) / 1000.0

    def index_to_physical(self, index_xyz: np.ndarray) -> np.ndarray:
        """Physical points (mm) of continuous indices given as ``[..., 3]`` in **x, y, z** order."""
        idx = np.asarray(index_xyz, dtype=np.float64)
        return np.asarray(self.origin) + (idx * np.asarray(self.spacing)) @ self.direction_matrix.T

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous indices (x, y, z) of physical points (mm) given as ``[..., 3]``; the inverse of
        :meth:`index_to_physical`."""
        p = np.asarray(points, dtype=np.float64) - np.asarray(self.origin)
        return (p @ self.direction_matrix) / np.asarray(self.spacing)

    def physical_points(self, index_zyx: np.ndarray) -> np.ndarray:
        """Physical points (mm, x, y, z) of continuous indices given as ``[..., 3]`` in **z, y, x** (array) order."""
        return self.index_to_physical(np.asarray(index_zyx, dtype=np.float64)[..., ::-1])


def _is_sitk_image(obj: object) -> bool:
    """Whether ``obj`` is a ``SimpleITK.Image``, without importing SimpleITK."""
    return type(obj).__name__ == "Image" and type(obj).__module__.startswith("SimpleITK")


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D array on a grid (see the module docstring for conventions).

    Spacing, origin and direction are validated as :class:`GridSpec` validates them, and normalised the same way.

    Attributes:
        array: voxel values indexed ``[z, y, x]``.
        spacing: voxel size in mm along index axes x, y, z.
        origin: physical position (mm) of the centre of voxel 0.
        direction: 3×3 direction cosines, row-major, column j = index axis j.

    Raises:
        ValueError: the array is not 3D, or a geometry field is out of range (the message names it).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = _IDENTITY

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3D [z, y, x], got shape {self.array.shape}")
        grid = GridSpec(self.size_xyz, self.spacing, self.origin, self.direction)
        object.__setattr__(self, "spacing", grid.spacing)
        object.__setattr__(self, "origin", grid.origin)
        object.__setattr__(self, "direction", grid.direction)
        object.__setattr__(self, "_grid", grid)

    @property
    def grid(self) -> GridSpec:
        """The grid of this volume: its size, spacing, origin and direction without the array."""
        grid: GridSpec = self._grid  # type: ignore[attr-defined]
        if grid.size_xyz != self.size_xyz:  # the array was reshaped in place
            grid = GridSpec(self.size_xyz, grid.spacing, grid.origin, grid.direction)
            object.__setattr__(self, "_grid", grid)
        return grid

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
        """The 3×3 direction matrix (column j = index axis j)."""
        return self.grid.direction_matrix

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return self.grid.voxel_volume_ml

    def index_to_physical(self, index_xyz: np.ndarray) -> np.ndarray:
        """Physical points (mm) of continuous indices ``[..., 3]`` (x, y, z); see :meth:`GridSpec.index_to_physical`."""
        return self.grid.index_to_physical(index_xyz)

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous indices (x, y, z) of physical points ``[..., 3]``; see :meth:`GridSpec.physical_to_index`."""
        return self.grid.physical_to_index(points)

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
