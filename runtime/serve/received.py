"""What the node checks of a received data set before it answers success (``inspect_instance``), and the
C-STORE statuses it answers.

Status codes answered (PS3.4 Table B.2-1): ``0x0000`` stored; ``0xA700`` refused, out of resources (an instance
over ``max_instance_mb``, a study that would go over ``max_study_mb``, free disk space under
``min_free_disk_mb``, a full disk or any other failure to write the spool or the queue); ``0xA900`` data set
does not match the SOP class of the request; ``0xC000`` cannot understand (unreadable, truncated or non-DICOM
data, or UIDs that break the grammar).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import pydicom
from pydicom.uid import UID

from .spool import check_uid

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_MISMATCH",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SUCCESS",
    "InstanceError",
    "ReceivedInstance",
    "inspect_instance",
]

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


# Elements longer than this stay on disk while a received data set is checked (pixel data is never loaded).
_DEFER_BYTES = 1 << 20
_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # Float, Double Float and Pixel Data


class InstanceError(ValueError):
    """A received data set that cannot be stored; ``status`` is the C-STORE status to answer."""

    def __init__(self, message: str, status: int = STATUS_CANNOT_UNDERSTAND) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ReceivedInstance:
    """The identifying attributes of a received instance, all UIDs checked.

    Attributes:
        study_uid, series_uid, sop_instance_uid, sop_class_uid: the UIDs.
        modality: the Modality attribute (None if absent).
    """

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None


def _expected_native_bytes(ds: pydicom.Dataset) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames
    return (pixels * bits + 7) // 8


def _decode_elements(ds: pydicom.Dataset, top: bool) -> None:
    """Convert every element's value (sequences recursively), leaving top-level pixel data raw and on disk."""
    for tag in list(ds.keys()):
        if top and tag in _PIXEL_TAGS:
            continue
        elem = ds[tag]  # converts the raw element (reads a deferred value from the file)
        if elem.VR == "SQ":
            for item in elem.value:
                _decode_elements(item, False)
        else:
            _ = elem.value


def _pixel_bytes_present(ds: pydicom.Dataset, file_size: int) -> int:
    """Bytes of (native) Pixel Data really there: its length, or what the file holds of it when cut short."""
    raw = ds.get_item(0x7FE00010, keep_deferred=True)
    value = getattr(raw, "value", None)
    if value is not None:
        return len(value)
    length, tell = int(raw.length), int(raw.value_tell)
    return max(0, min(length, file_size - tell))


def inspect_instance(
    data: bytes | str | os.PathLike[str], sop_class_uid: str, sop_instance_uid: str
) -> ReceivedInstance:
    """Decode a received data set completely (pixel data excepted) and check what the node relies on.

    Checks: every element decodes (pixel data is not loaded: elements over 1 MiB are read from the file only to
    be converted); Study/Series/SOP Instance/SOP Class UIDs are present and follow the UID grammar; SOP Class
    and SOP Instance UIDs equal those of the C-STORE request; native (uncompressed) pixel data is as long as
    Rows × Columns × samples × frames × bits allocated say.

    Args:
        data: the data set in the DICOM file format (preamble, file meta, data set): its bytes, or the file.
        sop_class_uid: Affected SOP Class UID of the request.
        sop_instance_uid: Affected SOP Instance UID of the request.

    Returns:
        The instance's identifying attributes.

    Raises:
        InstanceError: with the status to answer and the reason.
    """
    in_memory = isinstance(data, bytes | bytearray | memoryview)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if in_memory:
                size = len(data)
                ds = pydicom.dcmread(io.BytesIO(bytes(data)))
            else:
                path = os.fspath(data)
                size = os.stat(path).st_size
                syntax = pydicom.filereader.read_file_meta_info(path).get("TransferSyntaxUID")
                # a deflated data set is inflated in memory, where a deferred value could not be read back
                deflated = syntax == pydicom.uid.DeflatedExplicitVRLittleEndian
                ds = pydicom.dcmread(path, defer_size=None if deflated else _DEFER_BYTES)
            _decode_elements(ds, top=True)
    except Exception as exc:  # pydicom raises many types on corrupt input; all mean "cannot understand"
        raise InstanceError(f"data set does not decode: {type(exc).__name__}: {exc}") from None
    values: dict[str, str] = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if keyword not in ds:
            raise InstanceError(f"data set has no {keyword}")
        try:
            values[keyword] = check_uid(keyword, str(ds[keyword].value))
        except ValueError as exc:
            raise InstanceError(str(exc)) from None
    if values["SOPInstanceUID"] != sop_instance_uid:
        raise InstanceError(
            f"SOPInstanceUID {values['SOPInstanceUID']} differs from the request's {sop_instance_uid}",
            STATUS_MISMATCH,
        )
    if values["SOPClassUID"] != sop_class_uid:
        raise InstanceError(
            f"SOPClassUID {values['SOPClassUID']} differs from the request's {sop_class_uid}", STATUS_MISMATCH
        )
    if "PixelData" in ds and not UID(ds.file_meta.TransferSyntaxUID).is_compressed:
        try:
            expected = _expected_native_bytes(ds)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise InstanceError(f"pixel data without a usable image description: {exc}") from None
        got = _pixel_bytes_present(ds, size)
        if got < expected:
            raise InstanceError(f"pixel data truncated: {got} bytes, expected {expected}")
    modality = ds.get("Modality")
    return ReceivedInstance(
        study_uid=values["StudyInstanceUID"],
        series_uid=values["SeriesInstanceUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        sop_class_uid=values["SOPClassUID"],
        modality=str(modality) if modality else None,
    )
