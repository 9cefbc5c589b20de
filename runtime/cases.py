"""Finding the cases of a cohort: a folder of case folders, a CSV, or one case; and loading a case's CT and PET.

A case is either two image files (NIfTI/NRRD/MHA, named ``ct.*`` and ``pet.*`` inside a case folder) or DICOM (a study
folder holding a CT and a PET series, or two series folders).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from .input_checks import InputChecks
from .volume import Volume, read_volume

__all__ = ["Case", "LoadedCase", "discover_cases", "load_case", "select_part"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class Case:
    """One case to segment: ``ct`` and ``pet`` are image files or DICOM folders (``pet`` None: one study folder)."""

    case_id: str
    ct: Path
    pet: Path | None


@dataclass
class LoadedCase:
    """A case as read: its volumes, the DICOM study they came from, and the input checks overridden on the way."""

    ct: Volume
    pet: Volume
    study: object | None = None  # a PetCtStudy for DICOM input (used to write DICOM SEG)
    overrides: tuple[str, ...] = ()  # each input check overridden while reading, said in words
    sources: dict[str, str] = field(default_factory=dict)  # what to call each input in messages, by modality


def _image_named(folder: Path, stem: str) -> Path | None:
    hits = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name.lower().startswith(stem + ".") and p.name.lower().endswith(IMAGE_SUFFIXES)
    ]
    if len(hits) > 1:
        raise ValueError(f"{folder}: several {stem} images ({', '.join(p.name for p in hits)}); keep one")
    return hits[0] if hits else None


def _dicom_modalities(folder: Path, wanted: frozenset[str] = frozenset({"CT", "PT"})) -> set[str]:
    """Modalities of the DICOM files under ``folder`` (headers only; stops once CT and PT were both seen)."""
    import pydicom

    seen: set[str] = set()
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
        except Exception:  # not DICOM, or damaged: read_pet_ct reports such files when the case runs
            continue
        seen.add(str(ds.get("Modality", "")))
        if wanted <= seen:
            break
    return seen


def _folder_case(folder: Path) -> Case | None:
    """An image case (ct.*/pet.*), a DICOM study holding CT and PT, or None."""
    ct, pet = _image_named(folder, "ct"), _image_named(folder, "pet")
    if ct or pet:
        if not (ct and pet):
            raise ValueError(f"{folder}: needs both ct.* and pet.* images, found only {(ct or pet).name}")
        return Case(folder.name, ct, pet)
    if {"CT", "PT"} <= _dicom_modalities(folder):
        return Case(folder.name, folder, None)  # a DICOM study folder; read_pet_ct selects the series
    return None


def discover_cases(source: str | Path) -> list[Case]:
    """Cases of a cohort folder (one case folder each), a CSV (``case_id,ct,pet``), or a single case folder.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: a malformed CSV or case folder; the message names it.
    """
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such folder or CSV file")
    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise ValueError(f"{src}: -i takes a folder or a .csv file (case_id,ct,pet)")
        with open(src, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = {"case_id", "ct", "pet"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{src}: missing columns {sorted(missing)} (need case_id, ct, pet)")
            cases = []
            for i, row in enumerate(reader, start=2):
                if not row["case_id"] or not row["ct"] or not row["pet"]:
                    raise ValueError(f"{src}: line {i}: case_id, ct and pet must all be given")
                cases.append(
                    Case(row["case_id"], (src.parent / row["ct"]).resolve(), (src.parent / row["pet"]).resolve())
                )
    else:
        single = _image_named(src, "ct") or _image_named(src, "pet")
        if single or any(p.is_file() and not p.name.startswith(".") for p in src.iterdir()):
            one = _folder_case(src)
            cases = [one] if one else []
        else:
            # A cohort (one case per sub-folder), or one DICOM study whose series sit in sub-folders.
            subfolders = [d for d in sorted(src.iterdir()) if d.is_dir() and not d.name.startswith(".")]
            cases = [c for c in map(_folder_case, subfolders) if c is not None]
            if not cases and (study := _folder_case(src)) is not None:
                cases = [study]
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"{src}: duplicate case ids {dupes}")
    if not cases:
        raise ValueError(f"{src}: no cases found (case folders with ct.*/pet.* images or DICOM, or a CSV)")
    return cases


def select_part(cases: list[Case], num_parts: int, part_id: int) -> list[Case]:
    """Every ``num_parts``-th case starting at ``part_id`` (cases sorted by id), to split a cohort."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ValueError(f"need num_parts >= 1 and 0 <= part_id < num_parts, got {num_parts} and {part_id}")
    return sorted(cases, key=lambda c: c.case_id)[part_id::num_parts]


def load_case(ct: Path, pet: Path | None, *, checks: InputChecks | None = None) -> LoadedCase:
    """Read a case: two image files, two DICOM series folders, or one DICOM study folder (``pet`` None).

    Args:
        ct: CT image file or DICOM series folder, or a DICOM study folder.
        pet: PET image file or DICOM series folder; None with a study folder.
        checks: the overrides of the input checks (None: none); DICOM SUV attributes used as written under
            ``force_units`` are recorded in ``study.overrides``.
    """
    checks = checks or InputChecks()
    if pet is not None and ct.is_file() and pet.is_file():
        return LoadedCase(read_volume(ct), read_volume(pet), sources={"CT": str(ct), "PT": str(pet)})
    from .dicom import read_pet_ct

    if pet is None:
        if not ct.is_dir():
            raise ValueError(f"{ct}: a single input must be a DICOM study folder holding a CT and a PET series")
        study = read_pet_ct(ct, force_units=checks.force_units)
    else:
        if not (ct.is_dir() and pet.is_dir()):
            raise ValueError(f"--ct {ct} and --pet {pet} must both be image files or both DICOM series folders")
        study = read_pet_ct((ct, pet), force_units=checks.force_units)
    sources = {"CT": f"CT series {study.ct_series_uid}", "PT": f"PT series {study.pet_series_uid}"}
    return LoadedCase(study.ct, study.pet, study, tuple(study.overrides), sources)
