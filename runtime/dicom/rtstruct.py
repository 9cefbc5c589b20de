"""DICOM RT Structure Set (RTSTRUCT) of a result: one ROI per lesion and one for the whole tumour, as closed planar
contours on the CT slices, for radiotherapy planning systems (which import RTSTRUCT, rarely SEG).

Library. rt-utils 1.2.7 was evaluated and is not used. The file it writes fails ``dciodvfy`` (754 errors on a
16-slice phantom: ContourData values of 17-19 characters where DS allows 16, and no FrameOfReferenceUID,
PositionReferenceIndicator, ReferringPhysicianName, AccessionNumber or OperatorsName); it writes an empty
RTROIInterpretedType, SeriesNumber 1 and Manufacturer "Qurit", prints to stdout, and saves through its own
``open``/``save_as`` instead of our temporary file, check and rename; its OpenCV tracing puts the contour through
the centres of the boundary pixels, so a planning system that takes the voxels whose centres lie inside the contour
loses boundary voxels (Dice 0.93 against the mask on that phantom) and a one-voxel lesion gets a one-point
contour. Its reader (rounding to whole pixels, then ``cv2.fillPoly`` including the edges) grows our contours instead
(Dice 0.946), so it is not the tests' reference either. Its dataset could be
patched afterwards (UIDs, ROI fields), but that is patching most of it, with opencv-python as a runtime dependency
for the sake of one tracing call. So the dataset is built here with pydicom, module by module from the RT Structure
Set IOD (PS3.3 A.19, checked with ``dciodvfy`` in the tests), with our UIDs, coded ROI fields and atomic write, and
the contours are traced by scikit-image (``measure.find_contours``, marching squares): no pixel tracing of our own.
Collinear points are then dropped by a cross-product test (what ``measure.approximate_polygon`` does at tolerance
0, without its import of scipy.signal, 1.5 s per process).

Contours. Each CT slice ``k`` (``study.ct_headers[k]``, the slice of ``study.ct.array[k]``) is traced at level 0.5
on the slice upsampled 2 × 2 and padded, so every contour runs along the voxel edges, cutting each corner by a
quarter voxel: the voxel centres inside it are exactly the mask's voxels on that slice, and its area is the voxels'
area less 1/32 voxel per convex corner (plus 1/32 per concave one). Points are mapped to patient coordinates (LPS,
mm) from that slice's own ImagePositionPatient, ImageOrientationPatient and PixelSpacing, written with 4 decimals
(0.1 µm), and each contour references its CT image. Foreground is traced 4-connected (``fully_connected="low"``):
two voxels touching only at a corner get two contours that do not touch.

Holes and islands. Every boundary on a slice is its own CLOSED_PLANAR contour: each island's outline and each
hole's outline (a ring gives two contours, outer and inner). DICOM leaves the combination of a slice's CLOSED_PLANAR
contours to the reader (PS3.3 C.8.8.6.3 describes the single-contour "keyhole" and, for contours combined by
exclusive or, the CLOSEDPLANAR_XOR type). A planning system that combines them by exclusive or (even-odd rule; as
CLOSEDPLANAR_XOR defines and as OpenCV's ``fillPoly``, rt-utils' reader, does) shows the hole as a hole; one that
fills each contour on its own shows the ring filled (the hole's voxels added to the ROI; islands are right either
way). CLOSED_PLANAR is written rather than CLOSEDPLANAR_XOR because older importers refuse a geometric type they do
not know; a keyhole would cut a channel of voxels out of the ROI.

ROIs. Lesion ``i`` of the lesion table is ROI number ``i``, named ``"Lesion i"`` (``RtstructOptions``); the whole
tumour (all lesions) is ROI number (largest lesion id + 1), named ``"Tumour"``. Lesion labels come from the result
(``SegmentationResult.labels``) or from labelling the mask as the postprocessing does, and must match the lesion
table (ids and voxel counts; :func:`~diffseg.runtime.dicom.lesion_labels.lesion_labels`). Every ROI is
ROIGenerationAlgorithm AUTOMATIC, RTROIInterpretedType GTV (configurable), coded SCT 108369006 "Neoplasm", and the
structure set is ApprovalStatus UNAPPROVED: a proposal for a clinician to review.

Empty mask. The RTSTRUCT holds the whole-tumour ROI with no contour (its ROI Contour item has no ContourSequence,
Type 3) and no lesion ROI: a valid file (``dciodvfy``; StructureSetROISequence, ROIContourSequence and
RTROIObservationsSequence are Type 1 and may not be empty, and some readers refuse an empty one) that says
"segmented, nothing found", as the SEG's single empty frame does.

Encoding: Implicit VR Little Endian, whose 4-byte value lengths hold any ContourData (explicit VR's DS length is
2 bytes: a contour of more than about 1,300 points would not fit).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import atomic_path, check_dicom
from ..volume import Volume
from .geometry import align_to_grid
from .lesion_labels import lesion_labels
from .seg import _version

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from .study import PetCtStudy

__all__ = ["RTSTRUCT_SOP_CLASS_UID", "RtstructOptions", "write_rtstruct"]

logger = logging.getLogger("diffseg")

RTSTRUCT_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.481.3"
_DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"  # RTReferencedStudySequence's SOP class (PS3.3 C.8.8.5)
_LESION_COLOURS = (
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
    (0, 255, 0),
    (255, 128, 0),
    (0, 128, 255),
    (128, 0, 255),
    (255, 0, 128),
)
_CS_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ ")


def _check_text(name: str, value: str, limit: int) -> None:
    if not value or len(value) > limit or "\\" in value or any(c in value for c in "\r\n\f"):
        raise ValueError(f"{name} must be 1-{limit} characters without a backslash or line break, got {value!r}")


def _check_colour(name: str, colour: Sequence[int]) -> None:
    if len(colour) != 3 or any(not isinstance(v, int) or not 0 <= v <= 255 for v in colour):
        raise ValueError(f"{name} must be an RGB triple of integers 0-255, got {colour!r}")


@dataclass(frozen=True)
class RtstructOptions:
    """Identification and naming of a written RTSTRUCT.

    Attributes:
        series_instance_uid: SeriesInstanceUID; None: a new UID.
        sop_instance_uid: SOPInstanceUID; None: a new UID.
        series_description: SeriesDescription.
        series_number: SeriesNumber (900/901/903 are the SEGs').
        structure_set_label: StructureSetLabel (SH: 16 characters at most).
        structure_set_name: StructureSetName.
        lesion_name_prefix: lesion ROIs are named ``"<prefix> <lesion id>"``.
        tumour_name: ROIName of the whole-tumour ROI.
        interpreted_type: RTROIInterpretedType of every ROI (a defined term: GTV, CTV, ORGAN, CONTROL...).
        tumour_colour: ROIDisplayColor of the whole-tumour ROI (RGB 0-255).
        lesion_colours: ROIDisplayColor of the lesion ROIs, used in turn.
        algorithm_name: named in ROIGenerationDescription.
        algorithm_version: likewise; None: the diffseg version.
        manufacturer: Manufacturer.
        model_name: ManufacturerModelName.
        device_serial_number: DeviceSerialNumber.
    """

    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    series_description: str = "diffseg tumour contours (research use)"
    series_number: int = 902
    structure_set_label: str = "DIFFSEG"
    structure_set_name: str = "diffseg tumour"
    lesion_name_prefix: str = "Lesion"
    tumour_name: str = "Tumour"
    interpreted_type: str = "GTV"
    tumour_colour: tuple[int, int, int] = (255, 0, 0)
    lesion_colours: tuple[tuple[int, int, int], ...] = _LESION_COLOURS
    algorithm_name: str = "diffseg"
    algorithm_version: str | None = None
    manufacturer: str = "diffseg"
    model_name: str = "diffseg"
    device_serial_number: str = "0"

    def __post_init__(self) -> None:
        from pydicom.uid import RE_VALID_UID

        for name in ("series_instance_uid", "sop_instance_uid"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or len(value) > 64 or not RE_VALID_UID.match(value)):
                raise ValueError(f"{name} must be a valid UID (digits and dots, 64 characters at most), got {value!r}")
        if self.series_instance_uid is not None and self.series_instance_uid == self.sop_instance_uid:
            raise ValueError(
                f"series_instance_uid and sop_instance_uid must differ, got {self.sop_instance_uid!r} twice"
            )
        if not 0 <= self.series_number <= 2**31 - 1:
            raise ValueError(f"series_number must be in 0..2147483647, got {self.series_number}")
        _check_text("structure_set_label", self.structure_set_label, 16)
        _check_text("lesion_name_prefix", self.lesion_name_prefix, 58)  # LO: 64, room for " <id>"
        for name in ("series_description", "structure_set_name", "tumour_name", "algorithm_name", "manufacturer"):
            _check_text(name, getattr(self, name), 64)
        kind = self.interpreted_type
        if not kind or len(kind) > 16 or not set(kind) <= _CS_CHARS:
            raise ValueError(f"interpreted_type must be 1-16 characters of A-Z, 0-9, '_' or space, got {kind!r}")
        _check_colour("tumour_colour", self.tumour_colour)
        if not self.lesion_colours:
            raise ValueError("lesion_colours must hold at least one RGB triple, got none")
        for colour in self.lesion_colours:
            _check_colour("lesion_colours", colour)


def _trace(region: np.ndarray) -> list[np.ndarray]:
    """The closed boundaries of a 2D boolean region as ``(n, 2)`` arrays of (row, column) index coordinates,
    first point not repeated (see the module docstring: scikit-image marching squares on the region upsampled
    2 × 2, so the contour follows the voxel edges)."""
    from skimage import measure

    up = np.pad(region, 1).repeat(2, axis=0).repeat(2, axis=1).astype(np.float32)
    polygons = []
    for contour in measure.find_contours(up, 0.5, fully_connected="low"):
        points = contour[:-1]  # closed: the last point repeats the first
        before, after = points - np.roll(points, 1, axis=0), np.roll(points, -1, axis=0) - points
        turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]  # exact: points are multiples of 0.5
        points = points[turn != 0]  # a corner stays, a point on a straight run goes
        # sub-voxel u of padded voxel p spans u = 2p, 2p + 1, its centre at 2p + 0.5; the pad adds 1
        polygons.append((points - 0.5) / 2.0 - 1.0)
    return polygons


def _plane(header: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A CT slice's first-pixel centre, and the patient-space steps of one row and of one column index."""
    position = np.asarray([float(v) for v in header.ImagePositionPatient])
    iop = np.asarray([float(v) for v in header.ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in header.PixelSpacing)
    # PixelSpacing is (between rows, between columns); IOP[:3] runs along a row (column index), IOP[3:] down a column
    return position, iop[3:] * row_spacing, iop[:3] * column_spacing


def _contour_data(points_rc: np.ndarray, plane: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[str]:
    origin, row_step, column_step = plane
    xyz = origin + points_rc[:, :1] * row_step + points_rc[:, 1:] * column_step
    return [f"{v:.4f}".rstrip("0").rstrip(".") for v in xyz.ravel()]


def _contours(on_ct: np.ndarray, tumour_number: int) -> dict[int, list[tuple[int, np.ndarray]]]:
    """The contours by ROI number: ``(slice index, (n, 2) row/column points)``; each lesion id's, and the whole
    tumour's under ``tumour_number``. Traced only in each slice's bounding box of tumour."""
    out: dict[int, list[tuple[int, np.ndarray]]] = {}
    for k in np.flatnonzero(on_ct.reshape(on_ct.shape[0], -1).any(axis=1)):
        plane = on_ct[k]
        rows = np.flatnonzero(plane.any(axis=1))
        cols = np.flatnonzero(plane.any(axis=0))
        crop = plane[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        offset = np.asarray([rows[0], cols[0]], dtype=np.float64)
        regions = [(int(i), crop == i) for i in np.unique(crop) if i > 0] + [(tumour_number, crop > 0)]
        for number, region in regions:
            out.setdefault(number, []).extend((int(k), poly + offset) for poly in _trace(region))
    return out


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _header_dataset(study: PetCtStudy, opt: RtstructOptions, series_uid: str, sop_uid: str) -> Dataset:
    """Patient, General Study, RT Series, General Equipment, Frame of Reference, SOP Common, and the Structure
    Set's identification and CT references."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ImplicitVRLittleEndian

    ct = study.ct_headers[0]
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS_UID
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    if "SpecificCharacterSet" in ct:
        ds.SpecificCharacterSet = ct.SpecificCharacterSet
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_SOP_CLASS_UID, sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):  # Patient (Type 2)
        setattr(ds, keyword, ct.get(keyword, ""))
    ds.StudyInstanceUID = study.study_instance_uid  # General Study
    for keyword in ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        setattr(ds, keyword, ct.get(keyword, ""))
    if ct.get("StudyDescription"):
        ds.StudyDescription = ct.StudyDescription
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", series_uid, opt.series_number  # RT Series
    ds.SeriesDate, ds.SeriesTime, ds.SeriesDescription, ds.OperatorsName = date, time, opt.series_description, ""
    ds.Manufacturer, ds.ManufacturerModelName = opt.manufacturer, opt.model_name  # General Equipment
    ds.DeviceSerialNumber, ds.SoftwareVersions = opt.device_serial_number, _version()
    ds.FrameOfReferenceUID = study.frame_of_reference_uid  # Frame of Reference
    ds.PositionReferenceIndicator = ct.get("PositionReferenceIndicator", "")
    ds.StructureSetLabel, ds.StructureSetName = opt.structure_set_label, opt.structure_set_name  # Structure Set
    ds.InstanceNumber, ds.StructureSetDate, ds.StructureSetTime = 1, date, time
    images = []
    for header in study.ct_headers:
        image = Dataset()
        image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = header.SOPClassUID, header.SOPInstanceUID
        images.append(image)
    series = Dataset()
    series.SeriesInstanceUID, series.ContourImageSequence = study.ct_series_uid, images
    referenced_study = Dataset()
    referenced_study.ReferencedSOPClassUID = _DETACHED_STUDY_MANAGEMENT
    referenced_study.ReferencedSOPInstanceUID = study.study_instance_uid
    referenced_study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID, frame.RTReferencedStudySequence = study.frame_of_reference_uid, [referenced_study]
    ds.ReferencedFrameOfReferenceSequence = [frame]
    ds.ApprovalStatus = "UNAPPROVED"  # Approval: an automatic contour awaits review
    return ds


def _add_rois(
    ds: Dataset,
    study: PetCtStudy,
    rois: list[tuple[int, str, tuple[int, int, int]]],
    contours: dict[int, list[tuple[int, np.ndarray]]],
    opt: RtstructOptions,
) -> int:
    """Structure Set ROI, ROI Contour and RT ROI Observations items, one per ROI; returns the contours written."""
    from pydicom.dataset import Dataset

    description = f"{opt.algorithm_name} {opt.algorithm_version or _version()} (automatic, diffusion model)"
    planes = [_plane(h) for h in study.ct_headers]
    structure, contour_items, observations, written = [], [], [], 0
    for number, name, colour in rois:
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = number, study.frame_of_reference_uid, name
        roi.ROIGenerationAlgorithm, roi.ROIGenerationDescription = "AUTOMATIC", description[:64]
        structure.append(roi)
        item = Dataset()
        item.ROIDisplayColor, item.ReferencedROINumber = list(colour), number
        sequence = []
        for index, (k, points) in enumerate(contours.get(number, []), start=1):
            header = study.ct_headers[k]
            image = Dataset()
            image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = header.SOPClassUID, header.SOPInstanceUID
            contour = Dataset()
            contour.ContourImageSequence, contour.ContourNumber = [image], index
            contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", len(points)
            contour.ContourData = _contour_data(points, planes[k])
            sequence.append(contour)
        if sequence:  # Type 3: an ROI without contours (an empty mask's tumour) has none
            item.ContourSequence = sequence
        written += len(sequence)
        contour_items.append(item)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.ROIObservationLabel = name[:16]
        observation.RTROIIdentificationCodeSequence = [_code("108369006", "SCT", "Neoplasm")]
        observation.RTROIInterpretedType, observation.ROIInterpreter = opt.interpreted_type, ""
        observations.append(observation)
    ds.StructureSetROISequence = structure
    ds.ROIContourSequence = contour_items
    ds.RTROIObservationsSequence = observations
    return written


def write_rtstruct(
    mask: Volume,
    lesions: Sequence[Mapping[str, Any]] | None,
    study: PetCtStudy,
    path: str | Path,
    *,
    labels: Volume | None = None,
    connectivity: int = 26,
    options: RtstructOptions | None = None,
) -> Path:
    """Write an RTSTRUCT of a result: one ROI per lesion and one for the whole tumour, on the study's CT.

    Args:
        mask: the tumour mask on the CT grid (nonzero = tumour); its axes may be flipped or permuted relative to
            ``study.ct`` as long as it holds the same voxels.
        lesions: the lesion table (``SegmentationResult.lesions``: rows with ``id`` and ``voxels``), checked
            against the lesion labels; None: not checked.
        study: the study the result belongs to (from ``read_pet_ct``): its CT headers, UIDs and frame of
            reference.
        path: the output file; written atomically (temporary file, fsync, check, rename).
        labels: the lesion label map on the mask's grid (``SegmentationResult.labels``); None: the mask is
            labelled with ``connectivity``.
        connectivity: 6, 18 or 26: the postprocessing's (``PostprocessOptions.connectivity``), for labelling.
        options: identification, names and colours; None: the defaults.

    Returns:
        ``path``.

    Raises:
        ValueError: a mask not on the CT grid, labels that do not match the mask or the lesion table.
        OSError: the write or its check failed (the message names ``path``, which is not there).
    """
    from pydicom.uid import generate_uid

    opt = options or RtstructOptions()
    path = Path(path)
    values = lesion_labels(mask, lesions, labels=labels, connectivity=connectivity)
    try:
        on_ct = align_to_grid(values, study.ct).array
    except ValueError as exc:
        raise ValueError(
            f"write_rtstruct: mask is not on the CT grid of study {study.study_instance_uid}: {exc}"
        ) from None
    if len(study.ct_headers) != on_ct.shape[0]:
        raise ValueError(f"study has {len(study.ct_headers)} CT headers for {on_ct.shape[0]} CT slices")
    ids = [int(i) for i in np.unique(on_ct) if i > 0]
    tumour_number = (ids[-1] if ids else 0) + 1
    colours = opt.lesion_colours
    rois = [(i, f"{opt.lesion_name_prefix} {i}", colours[(i - 1) % len(colours)]) for i in ids]
    rois.append((tumour_number, opt.tumour_name, opt.tumour_colour))
    contours = _contours(on_ct, tumour_number)
    series_uid = opt.series_instance_uid or generate_uid()
    sop_uid = opt.sop_instance_uid or generate_uid()
    ds = _header_dataset(study, opt, series_uid, sop_uid)
    written = _add_rois(ds, study, rois, contours, opt)

    def check(tmp: Path) -> None:
        import pydicom

        check_dicom(tmp, SOPClassUID=RTSTRUCT_SOP_CLASS_UID, SOPInstanceUID=sop_uid)
        back = pydicom.dcmread(tmp)
        got = sum(len(item.get("ContourSequence", [])) for item in back.ROIContourSequence)
        if len(back.StructureSetROISequence) != len(rois) or got != written:
            raise ValueError(
                f"the RTSTRUCT read back has {len(back.StructureSetROISequence)} ROI(s) and {got} contour(s), "
                f"expected {len(rois)} and {written}"
            )

    with atomic_path(path, check=check) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    logger.info("wrote RTSTRUCT with %d ROI(s), %d contour(s) to %s", len(rois), written, path)
    return path
