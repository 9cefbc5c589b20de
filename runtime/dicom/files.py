"""Read one DICOM file, also one written without the 128-byte preamble and ``DICM`` prefix (PS3.10 Part 10 header).

Some archives, older modalities and export tools write the bare data set: valid DICOM that ``pydicom.dcmread``
refuses without ``force=True``. ``read_dataset`` reads such a file with ``force=True`` only when it starts like a
data set (an element of group 0000, 0002 or 0008 in either byte order) and then requires what every DICOM object
has, a SOPClassUID and a SOPInstanceUID that are UIDs; anything else is refused as not DICOM, so that a text, NIfTI
or random file read by force never passes for an image. A data set without a TransferSyntaxUID gets the one it
was read with, so that its pixels decode.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["NOT_DICOM", "read_dataset"]

#: The reason given for a file that is not DICOM, with or without its Part 10 header.
NOT_DICOM = "not DICOM (no DICM prefix, and not a DICOM data set without it)"

# First two bytes of a bare data set: the group of its first element (0000 command, 0002 meta, 0008 identifying)
# in little- or big-endian order.
_DATA_SET_STARTS = {b"\x00\x00", b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"}
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_KEYS = ["SOPClassUID", "SOPInstanceUID"]


def _set_transfer_syntax(ds: Dataset) -> None:
    """Give a data set read without a TransferSyntaxUID the one it was read with (pixels need it to decode)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    meta.TransferSyntaxUID = syntax


def read_dataset(
    path: str | Path, *, stop_before_pixels: bool = False, specific_tags: list[str] | None = None
) -> Dataset:
    """``pydicom.dcmread`` of a DICOM file with or without its Part 10 header (preamble, ``DICM``, file meta).

    Args:
        path: the file.
        stop_before_pixels: do not read the pixel data.
        specific_tags: read only these keywords (SOPClassUID and SOPInstanceUID are added for a file without
            its header, to check that it is DICOM).

    Returns:
        The data set; ``file_meta.TransferSyntaxUID`` is always set.

    Raises:
        pydicom.errors.InvalidDicomError: not DICOM (``NOT_DICOM``).
        Exception: whatever pydicom raises on a damaged DICOM file (truncated header, bad element).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, specific_tags=specific_tags)
    except InvalidDicomError:
        with open(path, "rb") as fh:
            start = fh.read(2)
        if start not in _DATA_SET_STARTS:
            raise InvalidDicomError(NOT_DICOM) from None
        tags = None if specific_tags is None else [*specific_tags, *_KEYS]
        try:
            with warnings.catch_warnings():  # pydicom warns about each element it has to guess
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, specific_tags=tags, force=True)
                is_dicom = all(_UID.fullmatch(str(ds.get(k, "") or "")) for k in _KEYS)
        except Exception:  # a forced read of a file that is not DICOM fails in many ways
            is_dicom = False
        if not is_dicom:
            raise InvalidDicomError(NOT_DICOM) from None
    _set_transfer_syntax(ds)
    return ds
