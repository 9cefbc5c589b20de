"""Read a PET/CT study from DICOM: the CT in HU, the PET in SUVbw, and the headers a SEG references."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..volume import Volume
from .errors import DicomInputError
from .scan import SeriesInfo, scan_dicom, skipped_summary
from .select import CT_RULES, PET_RULES, SeriesRules, select_series
from .series import LoadedSeries, LoadOptions, read_series
from .suv import SuvConversion

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["PatientInfo", "PetCtRules", "PetCtStudy", "read_pet_ct"]

logger = logging.getLogger("diffseg")


@dataclass(frozen=True)
class PetCtRules:
    """How ``read_pet_ct`` picks the two series.

    Attributes:
        ct: rules of the CT series.
        pet: rules of the PET series.
        same_study: CT and PET must share StudyInstanceUID.
        same_frame_of_reference: CT and PET must share FrameOfReferenceUID (same patient coordinates, as a
            hybrid scanner writes them); False accepts separate frames (registration is then the user's job).
        allow_broken_files: False: any unreadable (truncated, corrupt) file in the folders is an error, since
            a file cut before its series UID may be a missing end slice that no geometry check can see; True:
            such files are ignored (those of the selected series are still refused).
    """

    ct: SeriesRules = CT_RULES
    pet: SeriesRules = PET_RULES
    same_study: bool = True
    same_frame_of_reference: bool = True
    allow_broken_files: bool = False


@dataclass(frozen=True)
class PatientInfo:
    """Patient and study identification copied from the CT (strings as in DICOM, '' when absent).

    Attributes:
        patient_id: PatientID.
        patient_name: PatientName.
        birth_date: PatientBirthDate (YYYYMMDD).
        sex: PatientSex.
        weight_kg: PatientWeight of the PET (used for SUVbw), None when absent.
        accession_number: AccessionNumber.
        study_date: StudyDate.
        study_description: StudyDescription.
    """

    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    weight_kg: float | None
    accession_number: str
    study_date: str
    study_description: str


@dataclass(frozen=True, eq=False)
class PetCtStudy:
    """A PET/CT study read from DICOM.

    Attributes:
        ct: CT in HU on its own grid (sorted along the slice normal, see ``load_series``).
        pet: PET in SUVbw on its own grid.
        study_instance_uid: StudyInstanceUID (of the CT).
        ct_series_uid: SeriesInstanceUID of the CT.
        pet_series_uid: SeriesInstanceUID of the PET.
        frame_of_reference_uid: FrameOfReferenceUID of the CT.
        ct_headers: CT slice datasets without pixel data; ``ct_headers[k]`` is ``ct.array[k]`` (SEG sources).
        pet_headers: PET slice datasets without pixel data, likewise.
        patient: identification of patient and study.
        suv: how the PET was converted to SUVbw.
        ct_series: the CT ``SeriesInfo`` (files).
        pet_series: the PET ``SeriesInfo`` (files).
        overrides: what was used as written although implausible, because the caller asked (``force_units``):
            one line each naming the series, attribute, file, value and plausible range, for the run report;
            empty when nothing was forced.
    """

    ct: Volume
    pet: Volume
    study_instance_uid: str
    ct_series_uid: str
    pet_series_uid: str
    frame_of_reference_uid: str
    ct_headers: tuple[Dataset, ...] = field(repr=False)
    pet_headers: tuple[Dataset, ...] = field(repr=False)
    patient: PatientInfo = field(repr=False)
    suv: SuvConversion = field(repr=False)
    ct_series: SeriesInfo = field(repr=False)
    pet_series: SeriesInfo = field(repr=False)
    overrides: tuple[str, ...] = ()


def _patient(ct: Dataset, pet: Dataset) -> PatientInfo:
    weight = pet.get("PatientWeight") or ct.get("PatientWeight")
    return PatientInfo(
        patient_id=str(ct.get("PatientID", "")),
        patient_name=str(ct.get("PatientName", "")),
        birth_date=str(ct.get("PatientBirthDate", "")),
        sex=str(ct.get("PatientSex", "")),
        weight_kg=float(weight) if weight not in (None, "") else None,
        accession_number=str(ct.get("AccessionNumber", "")),
        study_date=str(ct.get("StudyDate", "")),
        study_description=str(ct.get("StudyDescription", "")),
    )


def _scan(folder: Path, what: str, allow_broken: bool) -> tuple[list[SeriesInfo], str]:
    """The image series under a folder, and what was skipped said in one line ('' if nothing)."""
    if not folder.exists():
        raise FileNotFoundError(f"{what} {folder}: no such folder")
    result = scan_dicom(folder)
    broken = [s for s in result.skipped if s.broken]
    if broken and not allow_broken:
        raise DicomInputError(
            f"{what} {folder}: {len(broken)} file(s) cannot be read, e.g. {broken[0].path}: "
            f"{broken[0].reason} (incomplete transfer?); PetCtRules(allow_broken_files=True) ignores them"
        )
    skipped = skipped_summary(result.skipped)
    if not result.series:
        raise DicomInputError(f"{what} {folder}: no DICOM image series found ({skipped or 'no files'})")
    return result.series, skipped


def _require(candidates: list[SeriesInfo], modality: str, where: str, skipped: str) -> None:
    """Refuse a folder that holds no series of ``modality``, saying what it holds instead."""
    if any(s.modality == modality for s in candidates):
        return
    found = "; ".join(s.describe() for s in candidates)
    also = f" ({skipped})" if skipped else ""
    what = {"PT": "PET", "CT": "CT"}.get(modality, modality)
    among = ", or it is among the files skipped" if skipped else ""
    raise DicomInputError(
        f"{where}: found {found} but no {modality} series{also}; the {what} may not have been sent yet{among} (or "
        "lies in another folder: pass (ct_dir, pet_dir))"
    )


def _candidates(
    source: str | Path | tuple[str | Path, str | Path], rules: PetCtRules
) -> tuple[list[SeriesInfo], list[SeriesInfo]]:
    """The series to pick the CT and the PET from: of one study folder (both), or of a CT and a PET folder."""
    if isinstance(source, tuple):
        if len(source) != 2:
            raise ValueError(f"source must be a folder or a (ct_dir, pet_dir) pair, got {len(source)} paths")
        ct_candidates, ct_skipped = _scan(Path(source[0]), "CT folder", rules.allow_broken_files)
        pet_candidates, pet_skipped = _scan(Path(source[1]), "PET folder", rules.allow_broken_files)
        _require(ct_candidates, rules.ct.modality, f"CT folder {source[0]}", ct_skipped)
        _require(pet_candidates, rules.pet.modality, f"PET folder {source[1]}", pet_skipped)
        return ct_candidates, pet_candidates
    candidates, skipped = _scan(Path(source), "study folder", rules.allow_broken_files)
    for modality in (rules.ct.modality, rules.pet.modality):
        _require(candidates, modality, f"study folder {source}", skipped)
    studies = sorted({s.study_instance_uid for s in candidates})
    if len(studies) > 1:
        raise DicomInputError(
            f"study folder {source} holds {len(studies)} studies ({', '.join(studies)}): "
            "pass one study's folder or (ct_dir, pet_dir)"
        )
    return candidates, candidates


def read_pet_ct(
    source: str | Path | tuple[str | Path, str | Path],
    rules: PetCtRules | None = None,
    options: LoadOptions | None = None,
    *,
    force_units: bool = False,
) -> PetCtStudy:
    """Read the CT and the PET of one PET/CT study.

    Args:
        source: one folder holding the study (searched recursively; it must hold a single study), or a pair
            ``(ct_dir, pet_dir)``.
        rules: series selection; ``None`` uses an axial CT and an axial attenuation-corrected PET of the same
            study and frame of reference (``PetCtRules()``).
        options: slice-geometry tolerances; PET is always converted to SUVbw here.
        force_units: use the CT's and PET's RescaleIntercept and the PET's PatientWeight, RadionuclideTotalDose,
            RadionuclideHalfLife and injection-to-scan time as written even when outside their plausible ranges
            (``diffseg.runtime.dicom.plausibility.PLAUSIBLE_RANGES``); each such value is logged as a warning and listed
            in ``PetCtStudy.overrides``. False (default): such a study is refused.

    Returns:
        A ``PetCtStudy``.

    Raises:
        FileNotFoundError: a folder does not exist.
        DicomInputError: unreadable files (see ``PetCtRules.allow_broken_files``), no image series (the message
            counts the files skipped per reason, e.g. multi-frame enhanced CT), no CT or no PT series (the message
            names the series found instead), no or ambiguous series, several studies in one folder, CT and PET
            from different studies or frames of reference, slice geometry problems (a slice without its position
            included), a RescaleSlope not > 0, or PET attributes for SUVbw missing or, without ``force_units``,
            implausible (e.g. RadionuclideTotalDose in MBq, PatientWeight in g: the message names the file, the
            attribute, the value and the plausible range).
    """
    rules = rules or PetCtRules()
    opt = options or LoadOptions()
    if not opt.pet_suv:
        raise ValueError("read_pet_ct always gives the PET in SUVbw: options.pet_suv must be True")
    ct_candidates, pet_candidates = _candidates(source, rules)
    ct_info = select_series(ct_candidates, rules.ct)
    pet_info = select_series(pet_candidates, rules.pet)
    if rules.same_study and ct_info.study_instance_uid != pet_info.study_instance_uid:
        raise DicomInputError(
            f"CT and PET belong to different studies ({ct_info.study_instance_uid} vs "
            f"{pet_info.study_instance_uid}); set PetCtRules(same_study=False) to accept"
        )
    if rules.same_frame_of_reference and ct_info.frame_of_reference_uid != pet_info.frame_of_reference_uid:
        raise DicomInputError(
            f"CT and PET have different FrameOfReferenceUID ({ct_info.frame_of_reference_uid!r} vs "
            f"{pet_info.frame_of_reference_uid!r}): their coordinates may not agree; set "
            "PetCtRules(same_frame_of_reference=False) to accept"
        )
    ct = read_series(ct_info, opt, force_units=force_units)
    pet = read_series(pet_info, opt, force_units=force_units)
    if pet.suv is None:  # unreachable with pet_suv=True and Modality PT
        raise DicomInputError(f"{pet_info.describe()}: no SUV conversion")
    return PetCtStudy(
        ct=ct.volume,
        pet=pet.volume,
        study_instance_uid=ct_info.study_instance_uid,
        ct_series_uid=ct_info.series_instance_uid,
        pet_series_uid=pet_info.series_instance_uid,
        frame_of_reference_uid=ct_info.frame_of_reference_uid,
        ct_headers=ct.headers,
        pet_headers=pet.headers,
        patient=_patient(ct.headers[0], pet.headers[0]),
        suv=pet.suv,
        ct_series=ct_info,
        pet_series=pet_info,
        overrides=(*ct.overrides, *pet.overrides),
    )


def read_single_series(
    folder: str | Path, modality: str, options: LoadOptions | None = None, *, force_units: bool = False
) -> tuple[LoadedSeries, SeriesInfo]:
    """Read the one series of ``modality`` under ``folder`` (a model input given by itself: a CT for a CT-only model,
    an MR), selected as a PET/CT study's series are (``CT_RULES``, ``PET_RULES``, else the modality's defaults).

    Raises:
        FileNotFoundError: the folder does not exist.
        DicomInputError: unreadable files, no series of ``modality`` (the message names what the folder holds), an
            ambiguous choice, or a series that cannot be read whole.
    """
    rules = {"CT": CT_RULES, "PT": PET_RULES}.get(modality) or SeriesRules(modality=modality)
    candidates, skipped = _scan(Path(folder), f"{modality} folder", False)
    _require(candidates, modality, f"{modality} folder {folder}", skipped)
    info = select_series(candidates, rules)
    return read_series(info, options or LoadOptions(), force_units=force_units), info
