"""What a folder of DICOM files holds, from headers only: for finding cases before any series is loaded.

``series_counts`` counts the files of each series by modality and study; ``missing_modality`` says, for a folder
that holds a CT and no PET (or a PET and no CT), exactly that, so that a case whose PET has not been sent yet is
reported as such rather than as "no cases found". A folder that is one part of a study split into sibling folders
(``study/ct``, ``study/pet``) is not such a case: its sibling holds the other modality of the same study.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .files import read_dataset

__all__ = ["Counts", "missing_modality", "series_counts"]

_TAGS = ["Modality", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription"]
#: Files read in each sibling folder to see whether it holds the other part of a split study.
_SIBLING_FILES = 5


#: ``{modality: {(StudyInstanceUID, SeriesInstanceUID, series described): files}}``.
Counts = dict[str, dict[tuple[str, str, str], int]]


def series_counts(folder: Path, stop_when: Iterable[str] = (), limit: int | None = None) -> Counts:
    """The DICOM files under ``folder`` (recursive, headers only), counted per series.

    Args:
        folder: the folder.
        stop_when: stop once every one of these modalities was seen (the counts are then partial).
        limit: stop after this many DICOM files.

    Returns:
        ``{modality: {(StudyInstanceUID, SeriesInstanceUID, series described): files}}``, the series described as
        ``CT series #2 'desc'``; files that are not DICOM or cannot be read are left out (``read_pet_ct`` reports
        them when the case is read).
    """
    wanted = set(stop_when)
    found: Counts = {}
    read = 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        try:
            ds = read_dataset(path, stop_before_pixels=True, specific_tags=_TAGS)
        except Exception:  # not DICOM, or damaged
            continue
        modality = str(ds.get("Modality", "") or "")
        number = ds.get("SeriesNumber")
        shown = f"#{number} " if number not in (None, "") else ""
        described = f"{modality} series {shown}'{ds.get('SeriesDescription', '')}'"
        counts = found.setdefault(modality, {})
        key = (str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("SeriesInstanceUID", "") or ""), described)
        counts[key] = counts.get(key, 0) + 1
        read += 1
        if (wanted and wanted <= found.keys()) or (limit is not None and read >= limit):
            break
    return found


def missing_modality(folder: Path, found: Counts) -> str | None:
    """The message for a folder that holds a CT and no PT series, or a PT and no CT; None for any other.

    Args:
        folder: the folder.
        found: its ``series_counts`` (complete: not stopped early).

    Returns:
        ``"FOLDER: found CT series #2 'desc' (N files, UID) but no PT series; the PET may not have been sent
        yet"``; None when the folder holds both or neither, or when a sibling folder holds the other modality
        of the same study (one part of a study split into series folders).
    """
    held = {"CT", "PT"} & found.keys()
    if len(held) != 1:
        return None
    (modality,) = held
    other = "PT" if modality == "CT" else "CT"
    studies = {study for study, _, _ in found[modality]}
    if folder.parent != folder:
        for sibling in sorted(p for p in folder.parent.iterdir() if p.is_dir() and p != folder):
            if sibling.name.startswith("."):
                continue
            near = series_counts(sibling, stop_when=[other], limit=_SIBLING_FILES).get(other, {})
            if any(study in studies for study, _, _ in near):
                return None
    series = "; ".join(f"{described} ({n} files, {uid})" for (_, uid, described), n in sorted(found[modality].items()))
    what = "PET" if other == "PT" else "CT"
    return f"{folder}: found {series} but no {other} series; the {what} may not have been sent yet"
