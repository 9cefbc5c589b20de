"""Connected components, per-component statistics and small-component removal, by the compiled kernels.

Numbering follows ``scipy.ndimage.label`` and cc3d: components are numbered 1..n in raster order (``[z, y, x]``,
x fastest) of their first voxel, whatever the thread count. Two foreground models:

- ``multilabel=True`` (default, as cc3d): voxels connect only to voxels of the same non-zero value, so a label
  map of several classes yields components per class;
- ``multilabel=False`` (as scipy): every non-zero voxel is foreground.

For a binary mask both give the same result. Connectivity is 6 (faces), 18 (faces and edges) or 26 (faces,
edges and corners; the default for lesions, as in the DESIGN).

Masks may be boolean or any integer type; ``Volume`` and ``SimpleITK.Image`` are accepted wherever an array is,
and give the geometry for millimetre centroids and volumes. Arrays come back as arrays whatever the input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from .native import check_out, extension, threads_arg, volume_array
from .volume import GridSpec, Volume, _is_sitk_image

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = [
    "ComponentStats",
    "Connectivity",
    "component_stats",
    "connected_components",
    "label_components",
    "remove_small_components",
]

logger = logging.getLogger("diffseg")

Connectivity = Literal[6, 18, 26]
_LABEL_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.uint32, np.int32, np.uint64, np.int64))
_INTENSITY_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.float64, np.int16, np.uint16, np.uint8, np.int32))

ArrayLike3D = np.ndarray | Volume


@dataclass(frozen=True, eq=False)
class ComponentStats:
    """Per-component measurements; row ``i`` describes component ``i + 1``.

    Attributes:
        voxel_count: ``[n]`` int64 voxels per component.
        bbox_start: ``[n, 3]`` int64 first index along z, y, x.
        bbox_stop: ``[n, 3]`` int64 one past the last index along z, y, x (``slice(start, stop)``).
        centroid_index: ``[n, 3]`` float64 mean index along z, y, x.
        centroid_mm: ``[n, 3]`` float64 physical centroid (x, y, z, mm, LPS), or None without a grid.
        volume_ml: ``[n]`` float64 volume in millilitres, or None without a grid.
        intensity_sum: ``[n]`` float64 sum of the intensity image over the component, or None.
        intensity_max: ``[n]`` float64 maximum (NaN if the component holds a NaN), or None.
        intensity_mean: ``[n]`` float64 mean, or None.
    """

    voxel_count: np.ndarray
    bbox_start: np.ndarray
    bbox_stop: np.ndarray
    centroid_index: np.ndarray
    centroid_mm: np.ndarray | None = None
    volume_ml: np.ndarray | None = None
    intensity_sum: np.ndarray | None = None
    intensity_max: np.ndarray | None = None
    intensity_mean: np.ndarray | None = None

    @property
    def n(self) -> int:
        """Number of components."""
        return int(self.voxel_count.shape[0])

    def bbox_slices(self, label: int) -> tuple[slice, slice, slice]:
        """Array slices ``(z, y, x)`` of the bounding box of component ``label`` (1-based).

        Raises:
            ValueError: ``label`` is not in 1..n.
        """
        if not 1 <= label <= self.n:
            raise ValueError(f"label must be in 1..{self.n}, got {label}")
        a, b = self.bbox_start[label - 1], self.bbox_stop[label - 1]
        return (slice(int(a[0]), int(b[0])), slice(int(a[1]), int(b[1])), slice(int(a[2]), int(b[2])))

    def __repr__(self) -> str:
        extra = []
        if self.intensity_sum is not None:
            extra.append("intensity")
        if self.centroid_mm is not None:
            extra.append("mm")
        return f"ComponentStats(n={self.n}, voxels={int(self.voxel_count.sum())}{', ' if extra else ''}" + (
            ", ".join(extra) + ")"
        )


def _mask_array(mask: object, name: str = "mask") -> np.ndarray:
    array = volume_array(mask, name)
    if array.dtype == np.bool_:
        return array.view(np.uint8)
    if array.dtype.kind == "i":  # signed labels: the kernels only compare values, the bits are enough
        return array.view(np.dtype(f"u{array.dtype.itemsize}"))
    if array.dtype.kind != "u":
        raise TypeError(f"{name} must hold booleans or integers, got {array.dtype}")
    return array


def _connectivity(connectivity: int) -> int:
    if connectivity not in (6, 18, 26) or isinstance(connectivity, bool):
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity!r}")
    return int(connectivity)


def _grid_of(grid: GridSpec | Volume | sitk.Image | None, *candidates: object) -> GridSpec | None:
    """The explicit grid, else the first Volume/SimpleITK image among the inputs, else None."""
    if grid is not None:
        return GridSpec.of(grid, "grid")
    for c in candidates:
        if isinstance(c, Volume) or _is_sitk_image(c):
            return GridSpec.of(c)
    return None


def _intensity_array(intensity: object, shape: tuple[int, ...], mask: object) -> np.ndarray | None:
    if intensity is None:
        return None
    array = volume_array(intensity, "intensity")
    if array.shape != shape:
        raise ValueError(f"intensity has shape {array.shape} but the mask has shape {shape}; resample it first")
    if array.dtype not in _INTENSITY_DTYPES:
        names = ", ".join(str(t) for t in _INTENSITY_DTYPES)
        raise TypeError(f"intensity must have one of the dtypes {names}, got {array.dtype}")
    if isinstance(intensity, Volume) and isinstance(mask, Volume) and not intensity.same_grid(mask):
        raise ValueError("intensity and mask are on different grids (spacing, origin or direction differ)")
    return array


def _stats_from_raw(raw: dict, grid: GridSpec | None) -> ComponentStats:
    count = raw["count"]
    bbox = raw["bbox"]
    centroid = raw["centroid"]
    centroid_mm = volume_ml = None
    if grid is not None:
        centroid_mm = grid.physical_points(centroid) if len(centroid) else np.zeros((0, 3))
        volume_ml = count * grid.voxel_volume_ml
    mean = None
    if raw["sum"] is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = raw["sum"] / np.where(count > 0, count, 1)
        mean[count == 0] = np.nan
    return ComponentStats(
        voxel_count=count,
        bbox_start=np.ascontiguousarray(bbox[:, :3]),
        bbox_stop=np.ascontiguousarray(bbox[:, 3:]),
        centroid_index=centroid,
        centroid_mm=centroid_mm,
        volume_ml=volume_ml,
        intensity_sum=raw["sum"],
        intensity_max=raw["max"],
        intensity_mean=mean,
    )


def _labels_out(out: np.ndarray | None, shape: tuple[int, ...]) -> None:
    if out is None:
        return
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    if out.dtype not in _LABEL_DTYPES:
        raise TypeError(f"out must be one of {', '.join(str(t) for t in _LABEL_DTYPES)}, got {out.dtype}")
    check_out(out, shape, out.dtype)


def _dtype_arg(dtype: object) -> str | None:
    if dtype is None:
        return None
    dt = np.dtype(dtype)
    if dt not in _LABEL_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(str(t) for t in _LABEL_DTYPES)}, got {dt}")
    return dt.name


def connected_components(
    mask: ArrayLike3D | sitk.Image,
    connectivity: Connectivity = 26,
    *,
    multilabel: bool = True,
    out: np.ndarray | None = None,
    dtype: np.dtype | type | str | None = None,
    threads: int | None = None,
) -> tuple[np.ndarray, int]:
    """Label the connected components of a mask.

    Args:
        mask: ``[z, y, x]`` boolean or integer mask (array, ``Volume`` or ``SimpleITK.Image``).
        connectivity: 6, 18 or 26.
        multilabel: different non-zero values are different components (False: any non-zero is foreground).
        out: optional label buffer (uint8/16/32/64 or int32/64, mask's shape), written in full.
        dtype: dtype of a new label array; None picks the smallest of uint8/uint16/uint32 that holds n.
        threads: worker threads (None: OpenMP's default).

    Returns:
        ``(labels, n)``: labels 1..n in raster order of each component's first voxel, 0 for background.

    Raises:
        TypeError: a float mask, or an unsupported ``out``/``dtype``.
        ValueError: not 3D, bad connectivity, ``out`` of the wrong shape or too small a dtype for n.
    """
    array = _mask_array(mask)
    _labels_out(out, array.shape)
    labels, n = extension().connected_components(
        array, _connectivity(connectivity), bool(multilabel), out, _dtype_arg(dtype), threads_arg(threads)
    )
    return labels, int(n)


def label_components(
    mask: ArrayLike3D | sitk.Image,
    connectivity: Connectivity = 26,
    *,
    intensity: ArrayLike3D | sitk.Image | None = None,
    grid: GridSpec | Volume | sitk.Image | None = None,
    multilabel: bool = True,
    out: np.ndarray | None = None,
    dtype: np.dtype | type | str | None = None,
    threads: int | None = None,
) -> tuple[np.ndarray, ComponentStats]:
    """Label components and measure them in the same pass (statistics cost O(runs), not O(voxels)).

    Args:
        mask: as :func:`connected_components`.
        connectivity: 6, 18 or 26.
        intensity: optional image on the mask's grid (e.g. SUV or HU) for sum/max/mean per component.
        grid: geometry for ``centroid_mm``/``volume_ml``; defaults to that of ``mask`` if it is a
            ``Volume``/image, else the millimetre fields are None.
        multilabel, out, dtype, threads: as :func:`connected_components`.

    Returns:
        ``(labels, stats)``; ``stats.n`` is the number of components.

    Raises:
        TypeError, ValueError: as :func:`connected_components`; also an intensity of another shape or grid.
    """
    array = _mask_array(mask)
    _labels_out(out, array.shape)
    image = _intensity_array(intensity, array.shape, mask)
    labels, _, raw = extension().label_with_stats(
        array, _connectivity(connectivity), bool(multilabel), image, out, _dtype_arg(dtype), threads_arg(threads)
    )
    return labels, _stats_from_raw(raw, _grid_of(grid, mask))


def component_stats(
    labels: ArrayLike3D | sitk.Image,
    n: int | None = None,
    *,
    intensity: ArrayLike3D | sitk.Image | None = None,
    grid: GridSpec | Volume | sitk.Image | None = None,
    threads: int | None = None,
) -> ComponentStats:
    """Statistics of the components 1..n of a label image (from any labeller: ours, scipy, cc3d, ITK).

    Args:
        labels: ``[z, y, x]`` label image (uint8/16/32/64 or int32/64; 0 is background).
        n: number of components; None takes ``labels.max()`` (one more pass over the image).
        intensity: optional image on the same grid for sum/max/mean.
        grid: geometry for the millimetre fields (default: that of ``labels`` if it is a Volume/image).
        threads: worker threads (None: OpenMP's default).

    Returns:
        The statistics; components with no voxel get count 0, zero boxes and NaN centroids/means.

    Raises:
        TypeError: unsupported label or intensity dtype.
        ValueError: not 3D, negative n, a label above n, or an intensity of another shape or grid.
    """
    array = volume_array(labels, "labels")
    if array.dtype not in _LABEL_DTYPES:
        raise TypeError(f"labels must be one of {', '.join(str(t) for t in _LABEL_DTYPES)}, got {array.dtype}")
    if array.dtype.kind == "i":
        if array.size and array.min() < 0:
            raise ValueError(f"labels must be >= 0, got a minimum of {array.min()}")
        array = array.view(np.dtype(f"u{array.dtype.itemsize}"))
    if n is None:
        n = int(array.max()) if array.size else 0
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    image = _intensity_array(intensity, array.shape, labels)
    raw = extension().component_stats(array, int(n), image, threads_arg(threads))
    return _stats_from_raw(raw, _grid_of(grid, labels))


def remove_small_components(
    mask: ArrayLike3D | sitk.Image,
    min_voxels: int,
    keep_largest: int | None = None,
    connectivity: Connectivity = 26,
    *,
    multilabel: bool = True,
    out: np.ndarray | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Remove components under ``min_voxels`` voxels and, optionally, all but the ``keep_largest`` largest.

    Args:
        mask: boolean or integer mask (array, ``Volume`` or ``SimpleITK.Image``).
        min_voxels: components with fewer voxels are removed (0 or 1 keeps all).
        keep_largest: if given, keep at most this many of the remaining components, the largest first
            (ties: the first in raster order).
        connectivity: 6, 18 or 26.
        multilabel: as :func:`connected_components`.
        out: optional buffer of the mask's shape and dtype, written in full; may be the mask itself.
        threads: worker threads (None: OpenMP's default).

    Returns:
        The cleaned mask: the input values where a kept component lies, 0 elsewhere; same dtype as the mask.

    Raises:
        TypeError: a float mask or a wrong ``out`` dtype.
        ValueError: not 3D, bad connectivity, negative ``min_voxels``/``keep_largest``, bad ``out``.
    """
    array = volume_array(mask, "mask")
    if array.dtype.kind not in "biu":
        raise TypeError(f"mask must hold booleans or integers, got {array.dtype}")
    if isinstance(min_voxels, bool) or not isinstance(min_voxels, int | np.integer) or min_voxels < 0:
        raise ValueError(f"min_voxels must be an integer >= 0, got {min_voxels!r}")
    if keep_largest is not None and (
        isinstance(keep_largest, bool) or not isinstance(keep_largest, int | np.integer) or keep_largest < 0
    ):
        raise ValueError(f"keep_largest must be an integer >= 0 or None, got {keep_largest!r}")
    check_out(out, array.shape, array.dtype)
    if out is not None and out is not array and np.shares_memory(out, array):
        raise ValueError("out overlaps the mask without being the mask itself")
    kernel_view = _mask_array(array)
    out_view = None if out is None else out.view(kernel_view.dtype)
    cleaned, found, kept = extension().remove_small(
        kernel_view,
        _connectivity(connectivity),
        bool(multilabel),
        int(min_voxels),
        -1 if keep_largest is None else int(keep_largest),
        out_view,
        threads_arg(threads),
    )
    logger.debug("remove_small_components: kept %d of %d components", kept, found)
    return out if out is not None else cleaned.view(array.dtype)
