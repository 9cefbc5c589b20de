"""The one exception type of the DICOM package."""

from __future__ import annotations

__all__ = ["DicomInputError"]


class DicomInputError(ValueError):
    """A DICOM input that cannot be used as it is: the message names the series or file and the problem.

    A ``ValueError``, so the CLI reports it as a user error; a DICOM node catches it to reject a study with
    the reason instead of crashing.
    """
