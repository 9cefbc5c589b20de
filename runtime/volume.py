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

__all__ = ["GridSpec", "Volume", "read_volume", "scalar_3d_problem", "write_volume"]

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

        problem = scalar_3d_problem(
            image.GetDimension(), image.GetNumberOfComponentsPerPixel(), image.GetSize(), image.GetPixelIDTypeAsString()
        )
        if problem:
            raise ValueError(problem)
        return cls(sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def __repr__(self) -> str:
        from .orientation import orientation_code

        mb = self.array.nbytes / 2**20
        sp = ", ".join(f"{s:.3g}" for s in self.spacing)
        return (
            f"Volume(shape(z,y,x)={self.shape}, spacing(x,y,z)=({sp}) mm, "
            f"orientation={orientation_code(self.direction)}, dtype={self.array.dtype}, {mb:.1f} MiB)"
        )


def scalar_3d_problem(dimension: int, components: int, size: tuple[int, ...], pixel_type: str = "") -> str | None:
    """Why an image of this shape is not a 3D scalar image, in words, or None: the one place that says it (for
    :meth:`Volume.from_sitk` and for the file reader, which asks before reading the voxels).

    Args:
        dimension: the image's number of dimensions.
        components: values per voxel.
        size: voxels per axis (x, y, ...).
        pixel_type: SimpleITK's pixel type in words, for the message.
    """
    shape = "×".join(str(int(n)) for n in size)
    if dimension != 3:
        return (
            f"the image is {dimension}D (size {shape}); a 3D scalar image is needed (one volume, one value per "
            "voxel): export the single 3D volume (one frame of a 4D series)"
        )
    if components != 1:
        kind = f" ({pixel_type})" if pixel_type else ""
        return (
            f"the image has {components} components per voxel{kind}, size {shape}; a 3D scalar image is needed (one "
            "value per voxel, not RGB or a vector field): export the scalar volume"
        )
    return None


def read_volume(path: str | Path) -> Volume:
    """Read a NIfTI/NRRD/MHA file (anything SimpleITK reads) as a ``Volume``, only once it is known to be whole.

    :func:`diffseg.runtime.image_file.read_image` checks the header and counts the voxel data before SimpleITK
    reads a voxel (see that module for what is checked).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, truncated, corrupt, not a 3D scalar image, has a spacing that is not positive
            and finite, or is over a limit of ``image_file``; the message names the file and says what to do.
    """
    from .image_file import read_image

    path = Path(path)
    image = read_image(path)
    try:
        return Volume.from_sitk(image)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def write_volume(volume: Volume, path: str | Path, *, mode: int | None = None) -> Path:
    """Write ``volume`` with the one writer (``atomic.atomic_path``): a temporary file, checked, then renamed.

    The check reads the written file back: its header with SimpleITK (the size must be the volume's) and, for
    ``.nii.gz``, the whole gzip stream (CRC, length, every voxel there); SimpleITK does not report a full disk, the
    check does.

    Args:
        volume: the volume.
        path: the image file; its suffix picks the format (``.nii.gz``, ``.nrrd``, ``.mha``).
        mode: the file's permission bits, set exactly; None: 0o666 less the umask.

    Returns:
        ``path``.

    Raises:
        OSError: the write or its check failed; the message names ``path``, which is left as it was.
    """
    import errno

    import SimpleITK as sitk

    from .atomic import atomic_path, check_image

    path = Path(path)
    image = volume.to_sitk()
    size = tuple(int(n) for n in image.GetSize())
    with atomic_path(path, mode=mode, check=lambda tmp: check_image(tmp, size=size, data=False)) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=True)
        except RuntimeError as exc:
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "no detail"
            raise OSError(errno.EIO, f"SimpleITK could not write the image ({last})") from None
    return path
