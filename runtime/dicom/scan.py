"""Find the image series in a folder of DICOM files.

Every file under the folder is opened once with pydicom (pixel data included, so that a truncated file is
found here and not half-way through a volume; files without the Part 10 preamble are read too, see
``files.read_dataset``); what is kept is the header without its pixel data. Files that are not DICOM, DICOM
objects that are not single-frame images (SEG, SR, RTSTRUCT, presentation states, DICOMDIR, secondary captures,
multi-frame enhanced images) and files that cannot be read are skipped, each with a logged reason and an entry
in ``ScanResult.skipped`` (``skipped_summary`` says them in one line for an error message). A file whose header
names its series but that cannot be used in its volume (pixel data cut short, no ImagePositionPatient,
ImageOrientationPatient or PixelSpacing) is recorded on its series (``SeriesInfo.broken_files``), so that loading
that series fails with the file's name instead of giving a volume with a slice missing, at an end of the stack
as well as inside it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .files import NOT_DICOM, read_dataset

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["ScanResult", "SeriesInfo", "SkippedFile", "scan_dicom", "scan_dicom_folder", "skipped_summary"]

logger = logging.getLogger("diffseg")

# SOP classes that hold no image volume even though some carry pixel data (PS3.4 Annex B).
_NON_VOLUME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT Plan",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.1.3.10": "Media Storage Directory (DICOMDIR)",
}
_NON_IMAGE_MODALITIES = {"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "PR", "KO", "DOC", "REG", "RWV"}
_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


@dataclass(frozen=True)
class SkippedFile:
    """A file that ``scan_dicom`` did not use.

    Attributes:
        path: the file.
        reason: why, in words (``not DICOM``, ``not an image: Segmentation``, ``truncated: ...``).
        broken: True for a file that looks like an image but cannot be read (truncated, corrupt); False for a
            file that is simply not an image.
    """

    path: Path
    reason: str
    broken: bool = False


@dataclass(frozen=True, eq=False)
class SeriesInfo:
    """One image series found by ``scan_dicom``: its identity and the headers of its files.

    Attributes:
        series_instance_uid: SeriesInstanceUID.
        study_instance_uid: StudyInstanceUID.
        modality: Modality (``CT``, ``PT``, ``MR`` ...).
        series_number: SeriesNumber, or None.
        series_description: SeriesDescription ('' if absent).
        frame_of_reference_uid: FrameOfReferenceUID ('' if absent).
        sop_class_uid: SOPClassUID of the first file.
        files: the image files in the order found (sorted path order, not slice order).
        headers: the datasets of ``files`` without pixel data, in the same order.
        broken_files: files of this series that cannot be used (truncated, or without their position in the
            volume), with the reason.
    """

    series_instance_uid: str
    study_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    frame_of_reference_uid: str
    sop_class_uid: str
    files: tuple[Path, ...] = field(repr=False)
    headers: tuple[Dataset, ...] = field(repr=False)
    broken_files: tuple[SkippedFile, ...] = ()

    @property
    def num_instances(self) -> int:
        """Number of readable image files in the series."""
        return len(self.files)

    @property
    def slice_thickness(self) -> float | None:
        """SliceThickness of the first file in mm, or None when absent."""
        value = self.headers[0].get("SliceThickness")
        return float(value) if value not in (None, "") else None

    @property
    def slice_normal(self) -> np.ndarray:
        """Unit normal of the first file's plane: cross product of the row and column directions."""
        iop = np.asarray([float(v) for v in self.headers[0].ImageOrientationPatient], dtype=np.float64)
        n = np.cross(iop[:3], iop[3:])
        return n / max(float(np.linalg.norm(n)), 1e-12)

    @property
    def corrected_image(self) -> tuple[str, ...]:
        """CorrectedImage values of the first file (PET), upper case."""
        return _multi(self.headers[0].get("CorrectedImage"))

    @property
    def image_type(self) -> tuple[str, ...]:
        """ImageType values of the first file, upper case."""
        return _multi(self.headers[0].get("ImageType"))

    def describe(self) -> str:
        """A short name for messages: modality, number, description, instance count and UID."""
        number = f"#{self.series_number} " if self.series_number is not None else ""
        return (
            f"{self.modality} series {number}'{self.series_description}' ({self.num_instances} images, "
            f"{self.series_instance_uid})"
        )


@dataclass(frozen=True)
class ScanResult:
    """What ``scan_dicom`` found.

    Attributes:
        series: image series, ordered by study UID, then series number, then series UID.
        skipped: files that were not used, each with its reason.
    """

    series: list[SeriesInfo]
    skipped: list[SkippedFile]


def _multi(value: object) -> tuple[str, ...]:
    if value in (None, ""):
        return ()
    if isinstance(value, str):
        return (value.strip().upper(),)
    return tuple(str(v).strip().upper() for v in value)  # type: ignore[union-attr]


def _expected_pixel_bytes(ds: Dataset) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    n = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * frames
    return (n * bits + 7) // 8


def _classify(path: Path) -> tuple[Dataset | None, SkippedFile | None]:
    """Read one file.

    Returns ``(header, None)`` for a usable image slice (pixel data dropped), ``(None, skip)`` for a file
    that is not used, and ``(header, skip)`` for an image slice of a known series that cannot be used
    (truncated, or without its position).
    """
    from pydicom.errors import InvalidDicomError

    try:
        ds = read_dataset(path)
    except InvalidDicomError:
        return None, SkippedFile(path, NOT_DICOM)
    except Exception as exc:  # pydicom raises struct.error, EOFError, ... on cut or corrupt headers
        return None, SkippedFile(path, f"unreadable DICOM header ({_why(exc)})", broken=True)
    try:
        # pydicom converts each element when it is first used, and raises then (NotImplementedError for an
        # unknown VR, ValueError...): convert them all here, so that a damaged element is this file's problem.
        ds.walk(lambda dataset, element: None)
        return _classified(path, ds)
    except Exception as exc:  # those, and values unlike their VR (an empty Rows: TypeError)
        return None, SkippedFile(path, f"unreadable DICOM header ({_why(exc)})", broken=True)


def _why(exc: Exception) -> str:
    """An exception in one line: its type and the last line of its message (pydicom adds tracebacks), cut short."""
    lines = str(exc).strip().splitlines()
    last = (lines[-1] if lines else "").removeprefix(f"{type(exc).__name__}: ")
    return f"{type(exc).__name__}: {last[:200]}"


_GEOMETRY_COUNTS = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2}


def _non_numeric_geometry(ds: Dataset) -> str | None:
    """What is wrong with the numbers that place a slice (None: each is the right count of finite numbers)."""
    for keyword, count in _GEOMETRY_COUNTS.items():
        raw = ds.get(keyword)
        values = [raw] if isinstance(raw, str) or not hasattr(raw, "__iter__") else list(raw)  # VM 1 or more
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            return f"{keyword} is not {count} numbers ({raw!r})"
        if len(numbers) != count or not all(np.isfinite(numbers)):
            return f"{keyword} is not {count} finite numbers ({raw!r})"
    return None


def _classified(path: Path, ds: Dataset) -> tuple[Dataset | None, SkippedFile | None]:
    """``_classify`` of a file that pydicom read."""
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    if sop_class in _NON_VOLUME_SOP_CLASSES:
        return None, SkippedFile(path, f"not an image volume slice: {_NON_VOLUME_SOP_CLASSES[sop_class]}")
    modality = str(ds.get("Modality", "")).upper()
    if modality in _NON_IMAGE_MODALITIES:
        return None, SkippedFile(path, f"not an image: Modality {modality}")
    if "PixelData" not in ds:
        if "Rows" in ds and "SeriesInstanceUID" in ds:
            # Image attributes but no pixels: the file was cut before its pixel data.
            return _drop_pixels(ds), SkippedFile(path, "truncated: no pixel data", broken=True)
        if "SeriesInstanceUID" not in ds:
            return None, SkippedFile(path, "truncated or corrupt: header ends before SeriesInstanceUID", broken=True)
        return None, SkippedFile(path, "no pixel data (not an image)")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        reason = f"multi-frame image ({_sop_name(sop_class)}): only single-frame slices are read"
        return None, SkippedFile(path, reason)
    missing = [
        k
        for k in (
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "PixelSpacing",
            "Rows",
            "Columns",
            "BitsAllocated",
            "SeriesInstanceUID",
        )
        if k not in ds
    ]
    if missing and "SeriesInstanceUID" in ds:
        # A slice of a series that cannot be placed in its volume: the series is refused if it is loaded, naming
        # this file (dropped, an end slice would leave no gap for the geometry checks to see).
        reason = f"image without {', '.join(missing)}: its place in the volume is unknown"
        return _drop_pixels(ds), SkippedFile(path, reason)
    if missing:
        return None, SkippedFile(path, f"image without {', '.join(missing)}: not part of a 3D volume")
    if min(int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)) < 1:  # not numbers: ValueError, see _classify
        return None, SkippedFile(path, "image of 0 rows, columns or bits: a broken header", broken=True)
    if bad := _non_numeric_geometry(ds):
        return _drop_pixels(ds), SkippedFile(path, f"{bad}: a broken header", broken=True)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta else ""
    if syntax in _NATIVE_SYNTAXES or not syntax:
        expected, got = _expected_pixel_bytes(ds), len(ds.PixelData)
        if got < expected:
            reason = f"truncated: pixel data holds {got} of {expected} bytes"
            return _drop_pixels(ds), SkippedFile(path, reason, broken=True)
    return _drop_pixels(ds), None


def _sop_name(uid: str) -> str:
    """The name of a SOP class UID (``Enhanced CT Image Storage``), or the UID when pydicom does not know it."""
    from pydicom.uid import UID

    name = UID(uid).name if uid else ""
    return name if name and name != uid else uid or "no SOPClassUID"


def skipped_summary(skipped: Iterable[SkippedFile], limit: int = 6) -> str:
    """The skipped files in one line: a count per reason (figures in reasons aside) and one example file each.

    Args:
        skipped: from ``ScanResult.skipped``.
        limit: most reasons listed (the rest are counted).

    Returns:
        e.g. ``120 files skipped: 118 × multi-frame image (Enhanced CT Image Storage): only single-frame slices
        are read, e.g. /data/ct/1.dcm; 2 × not DICOM (...), e.g. /data/README.txt``; '' when nothing was skipped.
    """
    groups: dict[str, list[SkippedFile]] = {}
    for skip in skipped:
        groups.setdefault(re.sub(r"\d+", "N", skip.reason), []).append(skip)
    if not groups:
        return ""
    ranked = sorted(groups.values(), key=len, reverse=True)
    parts = [f"{len(g)} × {g[0].reason}, e.g. {g[0].path}" for g in ranked[:limit]]
    if len(ranked) > limit:
        parts.append(f"{sum(len(g) for g in ranked[limit:])} more for {len(ranked) - limit} other reason(s)")
    return f"{sum(len(g) for g in ranked)} file(s) skipped: {'; '.join(parts)}"


def _drop_pixels(ds: Dataset) -> Dataset:
    if "PixelData" in ds:
        del ds.PixelData
    return ds


def _group(found: list[tuple[Path, Dataset, SkippedFile | None]]) -> list[SeriesInfo]:
    groups: dict[str, list[tuple[Path, Dataset, SkippedFile | None]]] = {}
    for item in found:
        groups.setdefault(str(item[1].SeriesInstanceUID), []).append(item)
    series = []
    for uid, members in groups.items():
        good = [(p, d) for p, d, skip in members if skip is None]
        broken = tuple(skip for _, _, skip in members if skip is not None)
        if not good:
            continue  # nothing readable: its files are listed in ScanResult.skipped
        first = good[0][1]
        number = str(first.get("SeriesNumber", "") or "").strip()
        series.append(
            SeriesInfo(
                series_instance_uid=uid,
                study_instance_uid=str(first.get("StudyInstanceUID", "")),
                modality=str(first.get("Modality", "")).upper(),
                series_number=int(number) if number.lstrip("+-").isdigit() else None,
                series_description=str(first.get("SeriesDescription", "")),
                frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
                sop_class_uid=str(first.get("SOPClassUID", "")),
                files=tuple(p for p, _ in good),
                headers=tuple(d for _, d in good),
                broken_files=broken,
            )
        )
    series.sort(
        key=lambda s: (
            s.study_instance_uid,
            s.series_number if s.series_number is not None else -1,
            s.series_instance_uid,
        )
    )
    return series


def scan_dicom(paths: str | Path | Iterable[str | Path]) -> ScanResult:
    """Find the image series in a folder (searched recursively) or in a list of files.

    Args:
        paths: a folder, one file, or several files and folders.

    Returns:
        A ``ScanResult``: the series found and the files skipped, each with its reason (also logged: INFO for
        files that are not images, WARNING for broken files).

    Raises:
        FileNotFoundError: a path does not exist.
    """
    roots = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    files: list[Path] = []
    for root in roots:
        if root.is_dir():
            files.extend(sorted(p for p in root.rglob("*") if p.is_file()))
        elif root.is_file():
            files.append(root)
        else:
            raise FileNotFoundError(f"{root}: no such file or folder")
    found: list[tuple[Path, Dataset, SkippedFile | None]] = []
    skipped: list[SkippedFile] = []
    for path in files:
        ds, skip = _classify(path)
        if skip is not None:
            skipped.append(skip)
            # WARNING for a file that is broken or would leave its series incomplete, INFO for one that is no image.
            (logger.warning if skip.broken or ds is not None else logger.info)("skipping %s: %s", path, skip.reason)
        if ds is not None:
            found.append((path, ds, skip))
    series = _group(found)
    logger.info("found %d image series in %d files (%d skipped)", len(series), len(files), len(skipped))
    return ScanResult(series=series, skipped=skipped)


def scan_dicom_folder(path: str | Path) -> list[SeriesInfo]:
    """The image series under a folder (recursive); see ``scan_dicom`` for the skipped files.

    Args:
        path: the folder.

    Returns:
        The series found, ordered by study UID, series number and series UID.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    return scan_dicom(path).series
