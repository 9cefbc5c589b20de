"""Load one DICOM image series as a ``Volume``: slices sorted along the normal, rescaled, PET in SUVbw.

The ``Volume`` has index axes x = columns (along the row direction of ImageOrientationPatient), y = rows
(along the column direction) and z = slices sorted by ascending position along the normal n = row × column;
its direction is therefore always right-handed, whatever the file order or the InstanceNumbers.
``LoadedSeries.headers`` lists the slice datasets in the same z order, for writing derived objects (SEG)
that reference them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..volume import Volume
from .errors import DicomInputError
from .files import read_dataset
from .geometry import GeometryOptions, sort_slices
from .plausibility import PLAUSIBLE_RANGES, check_plausible
from .suv import SuvConversion, suv_conversion

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from .scan import SeriesInfo

__all__ = ["LoadOptions", "LoadedSeries", "load_series", "read_series"]

logger = logging.getLogger("diffseg")


@dataclass(frozen=True)
class LoadOptions:
    """How ``load_series`` reads a series.

    Attributes:
        geometry: tolerances of the slice-geometry checks.
        pet_suv: convert PET (Modality PT) to SUVbw; False keeps the rescaled values (Bq/ml).
    """

    geometry: GeometryOptions = field(default_factory=GeometryOptions)
    pet_suv: bool = True


@dataclass(frozen=True, eq=False)
class LoadedSeries:
    """A loaded series.

    Attributes:
        volume: the image (CT: HU, int16 when exact else float32; PET: SUVbw float32; others: float32 or
            int16).
        headers: the slice datasets without pixel data, ``headers[k]`` is ``volume.array[k]``.
        series: the ``SeriesInfo`` it came from.
        suv: the SUV conversion applied (PET with ``pet_suv``), else None.
        overrides: values outside ``PLAUSIBLE_RANGES`` used as written because ``force_units`` was given (the
            RescaleIntercept, and for PET ``suv.overrides``), one line each for the run report; empty otherwise.
    """

    volume: Volume
    headers: tuple[Dataset, ...] = field(repr=False)
    series: SeriesInfo = field(repr=False)
    suv: SuvConversion | None = None
    overrides: tuple[str, ...] = ()


def _read_pixels(path, name: str) -> tuple[Dataset, np.ndarray]:
    try:
        ds = read_dataset(path)
        return ds, ds.pixel_array
    except Exception as exc:  # pydicom and its decoders raise many types on damaged or unsupported data
        raise DicomInputError(f"{name}: cannot decode the pixels of {path} ({type(exc).__name__}: {exc})") from None


def _rescale(ds: Dataset, name: str, path) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept of a slice (absent: 1 and 0), refused unless finite with slope > 0."""
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        value = ds.get(keyword)
        try:
            values.append(default if value in (None, "") else float(value))
        except (TypeError, ValueError):
            raise DicomInputError(f"{name}: {keyword} of {path} is not a number: {value!r}") from None
    slope, intercept = values
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope <= 0:
        raise DicomInputError(
            f"{name}: {path} has RescaleSlope {slope:g} and RescaleIntercept {intercept:g}: the slope must be a "
            "finite number > 0 and the intercept finite (value = stored × slope + intercept); the file is damaged "
            "or was written wrongly"
        )
    return slope, intercept


def _checked_rescales(
    headers: tuple[Dataset, ...], files: list, modality: str, name: str, force_units: bool, overrides: list[str]
) -> list[tuple[float, float]]:
    """Each slice's (slope, intercept), the intercept checked against ``PLAUSIBLE_RANGES`` for CT and PET (once,
    at the first slice outside, with the count)."""
    rescales = [_rescale(ds, name, path) for ds, path in zip(headers, files, strict=True)]
    key = {"CT": "RescaleIntercept CT", "PT": "RescaleIntercept PT"}.get(modality)
    if key is not None:
        plausible = PLAUSIBLE_RANGES[key]
        outside = [k for k, (_, b) in enumerate(rescales) if not plausible.low <= b <= plausible.high]
        if outside:
            k = outside[0]
            unit = f" {plausible.unit}" if plausible.unit else ""
            shown = f"{rescales[k][1]:g}{unit} ({len(outside)} of {len(rescales)} slices outside)"
            check_plausible(key, rescales[k][1], "RescaleIntercept", shown, headers[k], name, force_units, overrides)
    return rescales


def read_series(series: SeriesInfo, options: LoadOptions | None = None, *, force_units: bool = False) -> LoadedSeries:
    """Load a series with its sorted headers (see ``load_series``).

    Args:
        series: from ``scan_dicom_folder``.
        options: tolerances and PET handling; ``None`` uses the defaults.
        force_units: use a RescaleIntercept outside ``PLAUSIBLE_RANGES`` (CT, PET) and, for PET to SUVbw,
            PatientWeight, RadionuclideTotalDose, RadionuclideHalfLife and the injection-to-scan time as written
            even when implausible (see ``suv_conversion``); each such value is logged and listed in
            ``LoadedSeries.overrides``.

    Returns:
        A ``LoadedSeries``.

    Raises:
        DicomInputError: broken files in the series or files without their position (ImagePositionPatient...),
            slice geometry problems (see ``sort_slices``), slices of different size, photometric interpretation
            other than MONOCHROME2, pixels that cannot be decoded, a RescaleSlope that is not > 0 or, without
            ``force_units``, a RescaleIntercept outside its range, or (PET) an attribute needed for SUVbw missing
            or, without ``force_units``, implausible. Messages name the series.
    """
    opt = options or LoadOptions()
    name = series.describe()
    if series.broken_files:
        first = series.broken_files[0]
        raise DicomInputError(
            f"{name}: {len(series.broken_files)} file(s) cannot be used, e.g. {first.path}: {first.reason}"
        )
    headers = series.headers
    sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(sizes) != 1:
        raise DicomInputError(f"{name}: slices of different sizes (rows, columns): {sorted(sizes)}")
    stack = sort_slices(
        [h.ImagePositionPatient for h in headers],
        [h.ImageOrientationPatient for h in headers],
        [h.PixelSpacing for h in headers],
        name,
        opt.geometry,
    )
    order = [int(i) for i in stack.order]
    ordered = tuple(headers[i] for i in order)
    overrides: list[str] = []
    rescales = _checked_rescales(
        ordered, [series.files[i] for i in order], series.modality, name, force_units, overrides
    )
    pet_suv = series.modality == "PT" and opt.pet_suv
    suv = suv_conversion(ordered, name, force_units=force_units) if pet_suv else None
    rows, cols = sizes.pop()
    shape = (len(order), rows, cols)
    # int16 while every slice is exact (integer stored values, slope and intercept, in range), else float32.
    array: np.ndarray | None = None
    exact = suv is None
    for k, i in enumerate(order):
        path = series.files[i]
        ds, pixels = _read_pixels(path, name)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
        if photometric != "MONOCHROME2" or pixels.shape != (rows, cols):
            raise DicomInputError(
                f"{name}: {path} has {photometric} pixels of shape {pixels.shape}; expected "
                f"MONOCHROME2 of shape {(rows, cols)}"
            )
        slope, intercept = rescales[k]
        if exact and slope.is_integer() and intercept.is_integer():
            ints = pixels.astype(np.int64) * int(slope) + int(intercept)
            if ints.min() >= -32768 and ints.max() <= 32767:
                if array is None:
                    array = np.empty(shape, dtype=np.int16)
                array[k] = ints
                continue
        if exact or array is None:
            exact = False
            array = np.empty(shape, dtype=np.float32) if array is None else array.astype(np.float32)
        values = pixels.astype(np.float64) * slope + intercept
        array[k] = values * suv.factors[k] if suv is not None else values
    if array is None:  # unreachable: a stack has >= 2 slices
        raise DicomInputError(f"{name}: no slices")
    volume = Volume(array, stack.spacing, stack.origin, stack.direction)
    logger.info("loaded %s: %r", name, volume)
    overrides += suv.overrides if suv is not None else ()
    return LoadedSeries(volume=volume, headers=ordered, series=series, suv=suv, overrides=tuple(overrides))


def load_series(series: SeriesInfo, options: LoadOptions | None = None, *, force_units: bool = False) -> Volume:
    """Load a series as a ``Volume``: sorted along the slice normal, rescaled per slice, PET in SUVbw.

    Args:
        series: from ``scan_dicom_folder``.
        options: tolerances and PET handling; ``None`` uses the defaults.
        force_units: see ``read_series``; the overrides are only logged here (``read_series`` returns them).

    Returns:
        The volume; CT in HU (int16 when every slice's values are exact integers in range, else float32),
        PET in SUVbw (float32).

    Raises:
        DicomInputError: see ``read_series``.
    """
    return read_series(series, options, force_units=force_units).volume
