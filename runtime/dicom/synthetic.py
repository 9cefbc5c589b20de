"""Synthetic DICOM: a phantom's CT and PET written as valid single-frame CT Image and PET Image series.

The two series share one Study and one Frame of Reference. PET voxels are stored as Bq/ml decay-corrected to
the series start (``Units BQML``, ``DecayCorrection START``), computed from the phantom's SUVbw with the
weight, dose and times of ``SyntheticDicomOptions``, so that the SUVbw conversion of
``diffseg.runtime.dicom.suv`` gives back the phantom SUV. Stored PET values are 16-bit with a per-slice
RescaleSlope (slice maximum / 65535), the usual scanner encoding: the quantisation error is at most half a
step, slice maximum / 131070.

UIDs are deterministic: ``pydicom.uid.generate_uid(prefix=UID_ROOT, entropy_srcs=[...])`` hashes the phantom
seed and the role of the UID (study, frame of reference, series, instance index). ``UID_ROOT`` is pydicom's
registered root for generated UIDs, ``1.2.826.0.1.3680043.8.498.``; the hash fills the remaining digits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..atomic import atomic_path

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from ..phantom import Phantom
    from ..volume import Volume

__all__ = ["F18_HALF_LIFE_S", "UID_ROOT", "SyntheticDicomOptions", "phantom_uid", "write_phantom_dicom"]

logger = logging.getLogger("diffseg")

#: Root of every UID written by the synthetic writer (pydicom's registered root for generated UIDs).
UID_ROOT = "1.2.826.0.1.3680043.8.498."
#: Fluorine-18 half-life in seconds (109.77 min), as scanners write RadionuclideHalfLife.
F18_HALF_LIFE_S = 6586.2

_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


@dataclass(frozen=True)
class SyntheticDicomOptions:
    """Acquisition facts written into the synthetic series.

    Attributes:
        weight_kg: PatientWeight.
        injected_dose_bq: RadionuclideTotalDose at the injection time (Bq, as in the classic PET IOD).
        injection_time: date and time of the injection (RadiopharmaceuticalStartDateTime).
        uptake_s: seconds from injection to the PET series start (SeriesTime = AcquisitionTime).
        frame_duration_s: PET ActualFrameDuration.
        half_life_s: RadionuclideHalfLife.
        ct_series_number: SeriesNumber of the CT.
        pet_series_number: SeriesNumber of the PET.
    """

    weight_kg: float = 75.0
    injected_dose_bq: float = 370.0e6
    injection_time: datetime = datetime(2024, 1, 2, 10, 0, 0)
    uptake_s: float = 3600.0
    frame_duration_s: float = 180.0
    half_life_s: float = F18_HALF_LIFE_S
    ct_series_number: int = 2
    pet_series_number: int = 3

    def __post_init__(self) -> None:
        for name in ("weight_kg", "injected_dose_bq", "half_life_s", "frame_duration_s"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value}")
        if not np.isfinite(self.uptake_s) or self.uptake_s < 0:
            raise ValueError(f"uptake_s must be >= 0 seconds, got {self.uptake_s}")

    @property
    def scan_time(self) -> datetime:
        """Date and time of the PET series start."""
        return self.injection_time + timedelta(seconds=self.uptake_s)

    @property
    def bqml_per_suv(self) -> float:
        """Bq/ml (decay-corrected to the series start) of one SUVbw unit: decayed dose / (weight in g)."""
        decayed = self.injected_dose_bq * 2.0 ** (-self.uptake_s / self.half_life_s)
        return decayed / (self.weight_kg * 1000.0)


def phantom_uid(seed: int, *parts: object) -> str:
    """A deterministic UID under ``UID_ROOT`` for a phantom seed and a role (e.g. ``"ct", "series"``)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=UID_ROOT, entropy_srcs=["diffseg-phantom", str(seed), *map(str, parts)]))


def _da(t: datetime) -> str:
    return t.strftime("%Y%m%d")


def _tm(t: datetime) -> str:
    return t.strftime("%H%M%S.%f")[:13]


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters."""
    text = f"{value:.10g}"
    if len(text) > 16:
        text = f"{value:.8e}"
    return text


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _common(seed: int, opt: SyntheticDicomOptions, modality: str) -> Dataset:
    """Patient, study, equipment and frame-of-reference attributes shared by every instance."""
    from pydicom.dataset import Dataset

    study_time = opt.injection_time - timedelta(minutes=5)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = f"Phantom^{seed:05d}"
    ds.PatientID = f"DIFFSEG-PHANTOM-{seed:05d}"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.PatientAge = "064Y"
    ds.PatientWeight = _ds(opt.weight_kg)
    ds.StudyInstanceUID = phantom_uid(seed, "study")
    ds.StudyDate = _da(study_time)
    ds.StudyTime = _tm(study_time)
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{seed:05d}"
    ds.AccessionNumber = f"PH{seed:05d}"
    ds.StudyDescription = "Synthetic H&N FDG PET/CT (diffseg phantom)"
    ds.FrameOfReferenceUID = phantom_uid(seed, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "diffseg"
    ds.ManufacturerModelName = "diffseg phantom"
    ds.SoftwareVersions = _software_version()
    ds.InstitutionName = "Synthetic"
    ds.Modality = modality
    ds.BodyPartExamined = "HEADNECK"
    return ds


def _software_version() -> str:
    try:
        from diffseg import __version__
    except ImportError:  # pragma: no cover - the package is always importable when installed
        return "unknown"
    return str(__version__)


def _plane(ds: Dataset, volume: Volume, k: int) -> None:
    """Image Plane module of slice ``k`` (array index z) of an axis-aligned or oblique ``Volume``."""
    d = volume.direction_matrix
    row, col, slice_dir = d[:, 0], d[:, 1], d[:, 2]
    position = np.asarray(volume.origin) + slice_dir * volume.spacing[2] * k
    ds.ImageOrientationPatient = [_ds(float(v)) for v in (*row, *col)]
    ds.ImagePositionPatient = [_ds(float(v)) for v in position]
    # SliceLocation: position along the slice normal (cross product of the row and column directions).
    ds.SliceLocation = _ds(float(np.dot(np.cross(row, col), position)))
    ds.PixelSpacing = [_ds(volume.spacing[1]), _ds(volume.spacing[0])]  # row spacing (y), column spacing (x)
    ds.SliceThickness = _ds(volume.spacing[2])
    ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[2])


def _file_meta(ds: Dataset) -> None:
    from pydicom.dataset import FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = _EXPLICIT_VR_LITTLE_ENDIAN
    ds.file_meta = meta


def _save(ds: Dataset, path: Path) -> None:
    _file_meta(ds)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def _write_ct(phantom: Phantom, out: Path, opt: SyntheticDicomOptions) -> tuple[str, list[Path]]:
    ct = phantom.ct
    if ct.array.dtype != np.int16:
        raise ValueError(f"phantom CT must be int16 HU, got {ct.array.dtype}")
    series_uid = phantom_uid(phantom.seed, "ct", "series")
    ct_time = opt.scan_time - timedelta(minutes=2)
    paths = []
    for k in range(ct.shape[0]):
        ds = _common(phantom.seed, opt, "CT")
        ds.SOPClassUID = _CT_IMAGE_STORAGE
        ds.SOPInstanceUID = phantom_uid(phantom.seed, "ct", "instance", k)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = opt.ct_series_number
        ds.SeriesDescription = "CT for attenuation correction"
        ds.SeriesDate, ds.SeriesTime = _da(ct_time), _tm(ct_time)
        ds.AcquisitionDate, ds.AcquisitionTime = _da(ct_time), _tm(ct_time)
        ds.ContentDate, ds.ContentTime = _da(ct_time), _tm(ct_time)
        ds.PatientPosition = "HFS"
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = "120"
        ds.ConvolutionKernel = "STANDARD"
        _plane(ds, ct, k)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        stored = (ct.array[k].astype(np.int32) + 1024).astype(np.int16)
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        path = out / f"CT_{k + 1:04d}.dcm"
        _save(ds, path)
        paths.append(path)
    return series_uid, paths


def _isotope(opt: SyntheticDicomOptions) -> Dataset:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.Radiopharmaceutical = "Fluorodeoxyglucose"
    item.RadiopharmaceuticalStartTime = _tm(opt.injection_time)
    item.RadiopharmaceuticalStartDateTime = opt.injection_time.strftime("%Y%m%d%H%M%S.%f")
    item.RadionuclideTotalDose = _ds(opt.injected_dose_bq)
    item.RadionuclideHalfLife = _ds(opt.half_life_s)
    item.RadionuclidePositronFraction = "0.9673"
    item.RadionuclideCodeSequence = [_code("77004003", "SCT", "^18^Fluorine")]
    item.RadiopharmaceuticalCodeSequence = [_code("35321007", "SCT", "Fluorodeoxyglucose F^18^")]
    return item


def _write_pet(phantom: Phantom, out: Path, opt: SyntheticDicomOptions) -> tuple[str, list[Path]]:
    pet = phantom.pet
    series_uid = phantom_uid(phantom.seed, "pet", "series")
    scan = opt.scan_time
    bqml = pet.array.astype(np.float64) * opt.bqml_per_suv
    if np.any(bqml < 0) or not np.all(np.isfinite(bqml)):
        raise ValueError("phantom PET must hold finite SUV >= 0")
    lam_d = np.log(2.0) * opt.frame_duration_s / opt.half_life_s
    decay_factor = lam_d / (1.0 - np.exp(-lam_d))  # decay over the frame, relative to its start
    orientation = _code("102538003", "SCT", "recumbent")
    orientation.PatientOrientationModifierCodeSequence = [_code("40199007", "SCT", "supine")]
    paths = []
    for k in range(pet.shape[0]):
        ds = _common(phantom.seed, opt, "PT")
        ds.SOPClassUID = _PET_IMAGE_STORAGE
        ds.SOPInstanceUID = phantom_uid(phantom.seed, "pet", "instance", k)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = opt.pet_series_number
        ds.SeriesDescription = "PET AC"
        ds.SeriesDate, ds.SeriesTime = _da(scan), _tm(scan)
        ds.AcquisitionDate, ds.AcquisitionTime = _da(scan), _tm(scan)
        ds.ContentDate, ds.ContentTime = _da(scan), _tm(scan)
        ds.InstanceNumber = k + 1
        ds.ImageIndex = k + 1
        ds.AcquisitionNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        _pet_modules(ds, int(pet.shape[0]), opt, orientation, float(decay_factor))
        _plane(ds, pet, k)
        _pet_pixels(ds, bqml[k])
        path = out / f"PT_{k + 1:04d}.dcm"
        _save(ds, path)
        paths.append(path)
    return series_uid, paths


def _pet_modules(
    ds: Dataset, n_slices: int, opt: SyntheticDicomOptions, orientation: Dataset, decay_factor: float
) -> None:
    """The PET Series, PET Isotope, NM/PET Patient Orientation and PET Image attributes of one slice."""
    # PET Series module.
    ds.Units = "BQML"
    ds.CountsSource = "EMISSION"
    ds.SeriesType = ["STATIC", "IMAGE"]
    ds.CorrectedImage = ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"]
    ds.DecayCorrection = "START"
    ds.RandomsCorrectionMethod = "DLYD"
    ds.AttenuationCorrectionMethod = "CT-based"
    ds.ReconstructionMethod = "OSEM"
    ds.CollimatorType = "NONE"
    ds.NumberOfSlices = n_slices
    # PET Isotope and NM/PET Patient Orientation modules.
    ds.RadiopharmaceuticalInformationSequence = [_isotope(opt)]
    ds.PatientOrientationCodeSequence = [orientation]
    ds.PatientGantryRelationshipCodeSequence = [_code("102540008", "SCT", "headfirst")]
    # PET Image module.
    ds.FrameReferenceTime = "0"
    ds.ActualFrameDuration = round(opt.frame_duration_s * 1000.0)
    ds.DecayFactor = _ds(decay_factor)
    ds.DoseCalibrationFactor = "1"


def _pet_pixels(ds: Dataset, bqml: np.ndarray) -> None:
    """One slice of Bq/ml as unsigned 16-bit values with the slice's RescaleSlope (slice maximum / 65535)."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    peak = float(bqml.max())
    slope = peak / 65535.0 if peak > 0 else 1.0
    # The slope as written (a 16-character DS) is the one that decodes the stored values.
    slope_text = _ds(slope)
    stored = np.clip(np.rint(bqml / float(slope_text)), 0, 65535).astype(np.uint16)
    ds.RescaleIntercept, ds.RescaleSlope = "0", slope_text
    ds.PixelData = np.ascontiguousarray(stored).tobytes()


def write_phantom_dicom(phantom: Phantom, out_dir: str | Path, options: SyntheticDicomOptions | None = None) -> dict:
    """Write a phantom's CT and PET as DICOM series in ``out_dir/ct`` and ``out_dir/pet``.

    Args:
        phantom: from ``diffseg.runtime.phantom.make_phantom``; its CT is int16 HU, its PET SUVbw.
        out_dir: output folder; ``ct/`` and ``pet/`` are created inside (one file per slice, written
            atomically).
        options: weight, dose and times; ``None`` uses the defaults.

    Returns:
        ``{"ct_dir", "pet_dir"}`` (Path), ``{"study_instance_uid", "frame_of_reference_uid", "ct_series_uid",
        "pet_series_uid"}`` (str), ``{"ct_files", "pet_files"}`` (lists of Path in array-z order) and
        ``"bqml_per_suv"`` (float: the Bq/ml of one SUV unit in the stored PET).

    Raises:
        ValueError: the phantom CT is not int16 or its PET holds negative or non-finite values.
    """
    opt = options or SyntheticDicomOptions()
    out = Path(out_dir)
    ct_dir, pet_dir = out / "ct", out / "pet"
    ct_dir.mkdir(parents=True, exist_ok=True)
    pet_dir.mkdir(parents=True, exist_ok=True)
    ct_uid, ct_files = _write_ct(phantom, ct_dir, opt)
    pet_uid, pet_files = _write_pet(phantom, pet_dir, opt)
    logger.info(
        "phantom %d: wrote %d CT and %d PET instances under %s",
        phantom.seed,
        len(ct_files),
        len(pet_files),
        out,
    )
    return {
        "ct_dir": ct_dir,
        "pet_dir": pet_dir,
        "study_instance_uid": phantom_uid(phantom.seed, "study"),
        "frame_of_reference_uid": phantom_uid(phantom.seed, "frame-of-reference"),
        "ct_series_uid": ct_uid,
        "pet_series_uid": pet_uid,
        "ct_files": ct_files,
        "pet_files": pet_files,
        "bqml_per_suv": opt.bqml_per_suv,
    }
