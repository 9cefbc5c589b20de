"""DICOM in and out: find and load CT/PET series (PET in SUVbw), write and read DICOM SEG, write RTSTRUCT,
lesion tables, and synthetic DICOM series of the phantoms.

Stages, one module each: ``scan`` (files → series, each file read by ``files``) → ``select`` (rules → one series)
→ ``series`` (series → ``Volume``, with ``geometry``, ``suv`` and the ranges of ``plausibility``) → ``study`` (a
PET/CT study); ``folders`` tells from headers alone what a folder holds (for finding cases); ``seg`` (BINARY,
FRACTIONAL and LABELMAP SEG), ``rtstruct`` (RT Structure Set) and ``report`` write results; ``synthetic`` writes
phantoms as DICOM. Errors on bad input are ``DicomInputError`` (a ``ValueError``) naming the series or file and
the problem.
"""

from __future__ import annotations

from .errors import DicomInputError
from .files import read_dataset
from .geometry import GeometryOptions, align_to_grid, sort_slices
from .lesion_labels import lesion_labels
from .report import LESION_KEYS, lesion_table_header, write_lesion_table
from .rtstruct import RtstructOptions, write_rtstruct
from .scan import ScanResult, SeriesInfo, SkippedFile, scan_dicom, scan_dicom_folder, skipped_summary
from .seg import SEG_KINDS, SegOptions, read_seg, write_seg
from .select import CT_RULES, PET_RULES, SeriesRules, select_series, series_mismatches
from .series import LoadedSeries, LoadOptions, load_series, read_series
from .study import PatientInfo, PetCtRules, PetCtStudy, read_pet_ct
from .suv import SuvConversion, suv_conversion
from .synthetic import UID_ROOT, SyntheticDicomOptions, phantom_uid, write_phantom_dicom
from .times import parse_dicom_datetime, parse_dicom_dt

__all__ = [
    "CT_RULES",
    "LESION_KEYS",
    "PET_RULES",
    "SEG_KINDS",
    "UID_ROOT",
    "DicomInputError",
    "GeometryOptions",
    "LoadOptions",
    "LoadedSeries",
    "PatientInfo",
    "PetCtRules",
    "PetCtStudy",
    "RtstructOptions",
    "ScanResult",
    "SegOptions",
    "SeriesInfo",
    "SeriesRules",
    "SkippedFile",
    "SuvConversion",
    "SyntheticDicomOptions",
    "align_to_grid",
    "lesion_labels",
    "lesion_table_header",
    "load_series",
    "parse_dicom_datetime",
    "parse_dicom_dt",
    "phantom_uid",
    "read_dataset",
    "read_pet_ct",
    "read_seg",
    "read_series",
    "scan_dicom",
    "scan_dicom_folder",
    "select_series",
    "series_mismatches",
    "skipped_summary",
    "sort_slices",
    "suv_conversion",
    "write_lesion_table",
    "write_phantom_dicom",
    "write_rtstruct",
    "write_seg",
]
